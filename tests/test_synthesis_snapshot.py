"""Symmetrical synthesis's per-epoch snapshot (original and synthetic points of the last training batch) and
the report's t-SNE of them (issue #12)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_study import tiny_study, write

from harness import store, study
from harness.reporting import diagnostics
from methods.synthesis import SNAPSHOT_POINTS, SymmetricalSynthesis


def _mirror(axis: list[float], point: list[float]) -> torch.Tensor:
    """``2 proj_axis(point) - point`` written out (alpha=2, beta=1)."""
    a, p = torch.tensor(axis, dtype=torch.float64), torch.tensor(point, dtype=torch.float64)
    return 2 * (p @ a) / (a @ a) * a - p


def test_snapshot_holds_the_batch_originals_and_their_reflections() -> None:
    # a single image first (no classmate), 15 classes of 3 and one of 2 (47 points), then a class of 2 that
    # the limit of 48 cuts to one image (left out), then more classes
    labels = [99] + [c for c in range(15) for _ in range(3)] + [15, 15, 16, 16] + [17] * 4
    labels_t = torch.tensor(labels)
    x = torch.randn(len(labels), 100, dtype=torch.float64)
    s = SymmetricalSynthesis()
    s.hardest_negatives(x, labels_t, "euclidean")
    snap = s.epoch_diagnostics()["synthesis_snapshot"]
    assert SNAPSHOT_POINTS == 48
    assert snap["labels"] == labels[1:48]
    original = torch.tensor(snap["original"], dtype=torch.float64)
    assert original.shape == (47, 47)  # 100 dimensions written in a basis of the 47 points' span
    # an isometry of the kept points: the same pairwise distances as the embeddings
    torch.testing.assert_close(
        torch.cdist(original, original), torch.cdist(x[1:48], x[1:48]), atol=2e-3, rtol=0
    )
    for i, j in enumerate(snap["partner"]):
        assert j != i and labels[1 + j] == labels[1 + i]
        assert j == min((k for k in range(47) if labels[1 + k] == labels[1 + i] and k != i),
                        key=lambda k: (k - i) % 47)  # fmt: skip
        torch.testing.assert_close(
            torch.tensor(snap["synthetic"][i], dtype=torch.float64),
            _mirror(snap["original"][j], snap["original"][i]),
            atol=2e-3,
            rtol=0,
        )
    assert len(json.dumps(snap)) < 40_000
    assert "synthesis_snapshot" not in s.epoch_diagnostics()  # reset after reading


def test_snapshot_of_an_npair_batch_and_none_in_eval_mode() -> None:
    """For N-pair the points are A then P, each reflected about its pair's other member (S2, S1)."""
    s = SymmetricalSynthesis()
    a, p = torch.randn(5, 3), torch.randn(5, 3)
    s.pooled_logits(a, p, lambda u, v: u @ v.T, [(0, 1)])
    snap = s.epoch_diagnostics()["synthesis_snapshot"]
    assert snap["labels"] == [0, 1, 2, 3, 4] * 2 and snap["partner"] == [5, 6, 7, 8, 9, 0, 1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor(snap["synthetic"][:5]), s.reflect(p, a), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(snap["synthetic"][5:]), s.reflect(a, p), atol=1e-4, rtol=0)
    s.eval()
    s.hardest_negatives(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), "cosine")
    assert "synthesis_snapshot" not in s.epoch_diagnostics()


@pytest.mark.slow
def test_a_study_report_draws_the_synthesis_maps_only_for_synthesis(tmp_path: Path) -> None:
    spec = tiny_study("synthesis_maps", arms={"synthesis": [None, "symmetrical"]}, final={"seeds": [0]})
    spec["base"]["train"]["epochs"] = 3
    out = study.run_study(write(tmp_path, spec), results=tmp_path / "results")
    assert out is not None
    final = store.load("synthesis_maps", results=tmp_path / "results")
    arms = dict(zip(final.arm, final.run_dir, strict=True))
    assert [e for e, _ in diagnostics.records(arms["synthesis=symmetrical"], "synthesis_snapshot")] == [
        1,
        2,
        3,
    ]
    assert diagnostics.records(arms["synthesis=none"], "synthesis_snapshot") == []
    drawn = {p.name for p in (out / "plots").iterdir() if p.name.startswith("synthesis_tsne")}
    assert drawn == {f"synthesis_tsne.{ext}" for ext in ("png", "svg", "pdf")}
    svg = (out / "plots" / "synthesis_tsne.svg").read_text()
    assert "synthesis=symmetrical, epoch 3" in svg and "t-SNE 1" in svg and "synthesis=none" not in svg
    plain = final[final.arm == "synthesis=none"]
    assert diagnostics.plot_synthesis_maps(plain, ["synthesis=none"], tmp_path) == []
