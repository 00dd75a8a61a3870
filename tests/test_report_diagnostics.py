"""MDR distance histograms and ABE learner similarity from the diagnostics a run recorded (hand-written
diagnostics.json files in the format train.run writes); ABE's attention masks from a tiny study."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from test_study import tiny_study, write

from harness import store, study
from harness.reporting import diagnostics, embeddings, figures


def run_dir(tmp: Path, name: str, rows: list[dict]) -> str:
    d = tmp / name
    d.mkdir()
    (d / "diagnostics.json").write_text(json.dumps(rows))
    return str(d)


def test_mdr_histograms_and_abe_similarity_are_drawn_from_recorded_diagnostics(tmp_path: Path) -> None:
    edges = np.linspace(-6, 6, 49).tolist()
    mdr = [
        {
            "epoch": e,
            "MDR/mdr_levels": [-1.0 * e, 0.0, 1.0 * e],
            "MDR/mdr_hist_edges": edges,
            "MDR/mdr_hist_counts": list(range(48)),
        }
        for e in range(1, 6)
    ]
    abe = [
        {"epoch": e, "ABE/learner_self_similarity_matrix": [[1.0, 0.5 / e], [0.5 / e, 1.0]]} for e in (1, 2)
    ]
    final = pd.DataFrame(
        {
            "arm": ["plain", "mdr", "mdr", "abe"],
            "seed": [0, 1, 0, 0],
            "run_dir": [
                run_dir(tmp_path, "plain", []),
                run_dir(tmp_path, "mdr1", mdr),
                run_dir(tmp_path, "mdr0", mdr[:2]),
                run_dir(tmp_path, "abe", abe),
            ],
        }
    )
    assert [e for e, _ in diagnostics.records(final.run_dir[1], "mdr_levels")] == [1, 2, 3, 4, 5]
    assert diagnostics.records(final.run_dir[0], "mdr_levels") == []
    assert diagnostics._pick(5) == [0, 2, 4] and diagnostics._pick(2) == [0, 1]
    assert diagnostics._first_run(final, "mdr", "mdr_hist_counts") == final.run_dir[2]  # lowest seed
    order = ["plain", "mdr", "abe"]
    paths = diagnostics.plot_mdr_histograms(final, order, tmp_path)
    paths += diagnostics.plot_learner_similarity(final, order, tmp_path)
    names = {p.name for p in paths}
    assert {
        "mdr_distance_histograms.png",
        "mdr_distance_histograms.pdf",
        "abe_learner_similarity.svg",
    } <= names
    svg = (tmp_path / "abe_learner_similarity.svg").read_text()
    assert "0.25" in svg and "epoch 2" in svg  # the last epoch's matrix, annotated
    assert diagnostics.plot_mdr_histograms(final[final.arm == "plain"], ["plain"], tmp_path) == []


@pytest.mark.slow
def test_a_study_report_draws_the_abe_attention_masks_and_only_for_abe(tmp_path: Path) -> None:
    """A tiny study, ABE-M against an embedder: the ABE arm's runs keep their masks and the report draws
    them; the embedder's runs keep none."""
    abe = {"name": "abe", "m": 2, "embedding_dim": 8, "branch": "block2"}
    embedder = {"name": "embedder", "embedding_dim": 8}
    spec = tiny_study(
        "attention",
        arms={"model": {"abe": {"model": abe}, "embedder": {"model": embedder}}},
        final={"seeds": [0]},
    )
    spec["base"]["loss"] = {"name": "contrastive"}
    out = study.run_study(write(tmp_path, spec), results=tmp_path / "results")
    assert out is not None
    final = store.load("attention", results=tmp_path / "results")
    saved = {arm: embeddings.read(d) for arm, d in zip(final.arm, final.run_dir, strict=True)}
    assert saved["model=abe"]["attention_masks"].shape[:2] == (2, 4)
    assert not any(k.startswith("attention") for k in saved["model=embedder"])
    drawn = {p.name for p in (out / "plots").iterdir() if p.name.startswith("abe_attention_masks")}
    assert drawn == {"abe_attention_masks_model_abe.png", "abe_attention_masks_model_abe.pdf"}


def test_attention_masks_are_drawn_over_their_images(tmp_path: Path) -> None:
    """Hand-made saved masks: learner 2 looks at the top half only; a run without masks draws nothing."""
    masks = np.zeros((2, 3, 4, 4), np.float16)
    masks[0], masks[1, :, :2] = 1.0, 1.0
    saved = {
        "attention_masks": masks,
        "attention_index": np.array([0, 2, 4], np.int32),
        "attention_images": np.full((3, 16, 16, 3), 128, np.uint8),
        "gallery_labels": np.arange(6),
    }
    for name, arrays in (("abe", saved), ("plain", {"gallery_labels": np.arange(6)})):
        (tmp_path / name).mkdir()
        embeddings.write(tmp_path / name, arrays)
    dirs = [str(tmp_path / "plain"), str(tmp_path / "abe")]
    final = pd.DataFrame({"arm": ["plain", "abe"], "seed": [0, 0], "run_dir": dirs})
    paths = diagnostics.plot_attention_masks(final, ["plain", "abe"], tmp_path)
    assert [p.name for p in paths] == ["abe_attention_masks_abe.png", "abe_attention_masks_abe.pdf"]
    assert diagnostics.plot_attention_masks(final[final.arm == "plain"], ["plain"], tmp_path) == []
    tile = diagnostics._overlay(saved["attention_images"][0], masks[1, 0])
    assert tile.shape == (figures.THUMB, figures.THUMB, 3)
    cmap, alpha = plt.get_cmap(diagnostics.ATTENTION_CMAP), diagnostics.ATTENTION_ALPHA
    for row, value in ((0, 1.0), (-1, 0.0)):  # the mask's top edge is 1, its bottom edge 0
        want = (1 - alpha) * 128 + alpha * 255 * np.asarray(cmap(value)[:3])
        np.testing.assert_allclose(tile[row, 0], want, atol=1)
