"""Saved test embeddings of a run and the pictures made from them: retrieval grids, t-SNE maps, the
per-query bootstrap, one colour per arm."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_train import tiny

from harness.evaluate import knn
from harness.reporting import embeddings, figures, stats
from harness.rundir import write_run
from harness.train import run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny run (synthetic in-memory images) written as the study writes it."""
    return write_run(run(tiny()), tmp_path_factory.mktemp("run") / "r0")


def test_a_run_keeps_its_test_neighbours_and_an_embedding_sample(run_dir: Path) -> None:
    saved = embeddings.read(run_dir)
    assert saved is not None
    metrics = pd.read_json(run_dir / "metrics.json", typ="series")["metrics"]
    q = len(saved["query_labels"])
    assert saved["neighbours"].shape == (q, embeddings.TOP_K) and saved["neighbours"].dtype == np.int32
    assert (
        not saved["separate_query"] and (saved["neighbours"] != np.arange(q)[:, None]).all()
    )  # self excluded
    h = embeddings.hits(saved)
    for k in (1, 2, 4, 8):  # the neighbours are the retrieval the test metrics scored
        assert h[:, :k].any(1).mean() == pytest.approx(metrics[f"test/recall@{k}"])
    assert (
        saved["map_embeddings"].dtype == np.float16 and len(saved["map_index"]) == q
    )  # < MAP_CLASSES classes
    assert "gallery_items" not in saved  # in-memory pixels: read again from the config
    assert (run_dir / embeddings.FILE).stat().st_size < 20_000


def test_knn_of_the_saved_sample_matches_a_naive_loop(run_dir: Path) -> None:
    saved = embeddings.read(run_dir)
    assert saved is not None
    x = saved["map_embeddings"].astype(np.float32)
    _, idx = knn(x, 3)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    for i in range(len(x)):
        d = [np.inf if j == i else 1 - float(unit[i] @ unit[j]) for j in range(len(x))]
        assert sorted(d)[:3] == pytest.approx(sorted(d[j] for j in idx[i].tolist()), abs=1e-5)


def two_arms(run_dir: Path) -> tuple[dict, list[str]]:
    order = ["a", "b"]
    final = pd.DataFrame({"arm": order, "seed": [0, 0], "run_dir": [str(run_dir)] * 2})
    return figures.saved_runs(final, order), order


def test_retrieval_grids_frame_correct_and_wrong_neighbours(run_dir: Path, tmp_path: Path) -> None:
    runs, order = two_arms(run_dir)
    paths = figures.plot_retrieval_grids(runs, order, "a", tmp_path)
    assert {p.name for p in paths} >= {
        "retrieval_random.png",
        "retrieval_hardest.pdf",
        "retrieval_random.pdf",
    }
    pixels = (
        np.asarray(Image.open(tmp_path / "retrieval_random.png").convert("RGB")).reshape(-1, 3).astype(int)
    )
    h = embeddings.hits(runs["a"][1])
    shown = h[figures.grid_queries(runs["a"][1])["random"], : figures.SHOW_K]
    for colour, expected in ((figures.CORRECT, shown.any()), (figures.WRONG, (~shown).any())):
        rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(pixels - rgb).max(1) < 8).any() == expected
    hardest = figures.grid_queries(runs["a"][1])["hardest"]
    assert h[hardest, : figures.SHOW_K].sum(1).max() <= h[:, : figures.SHOW_K].sum(1).min() + 1


def test_embedding_maps_and_the_query_bootstrap(run_dir: Path, tmp_path: Path) -> None:
    runs, order = two_arms(run_dir)
    assert (tmp_path / "embedding_maps.png") in figures.plot_embedding_maps(runs, order, tmp_path)
    boot = figures.query_bootstrap(runs, order, [1, 4])
    found = embeddings.hits(runs["a"][1])[:, :4].any(1)
    row = boot[(boot.arm == "a") & (boot.metric == "recall@4")].iloc[0]
    assert row.value == pytest.approx(found.mean())
    assert (row.ci_low, row.ci_high) == pytest.approx(stats.bootstrap_mean_ci(found.astype(float)))


def test_a_collapsed_arm_is_left_out_of_the_maps(run_dir: Path, tmp_path: Path) -> None:
    runs, order = two_arms(run_dir)
    collapsed = {**runs["b"][1], "map_embeddings": np.ones_like(runs["b"][1]["map_embeddings"])}
    runs["b"] = (runs["b"][0], collapsed)
    assert figures.plot_embedding_maps(runs, order, tmp_path)  # arm a alone (t-SNE of one point: NaN)
    assert figures.plot_embedding_maps({"b": runs["b"]}, ["b"], tmp_path) == []


def test_every_plot_gives_an_arm_the_same_colour(tmp_path: Path) -> None:
    from harness.reporting import plots

    order = ["first arm", "second arm", "third arm"]
    hist = pd.DataFrame(
        [
            {"arm": a, "seed": s, "epoch": e, "val/recall@1": 0.1 * e + i, "diag/level": e * (i + 1)}
            for i, a in enumerate(order)
            for s in (0, 1)
            for e in (1, 2, 3)
        ]
    )
    final = pd.DataFrame(
        {"arm": order * 2, "seed": [0] * 3 + [1] * 3, "test/recall@1": np.linspace(0.1, 0.6, 6)}
    )
    plots.plot_learning_curves(hist, "recall@1", order, tmp_path / "curves")
    plots.plot_diagnostics(hist, order, tmp_path / "diag")
    plots.plot_per_arm(final, "recall@1", order, tmp_path / "bars")
    palette = figures.arm_palette(order)
    assert palette == figures.arm_palette(order) and len(set(palette.values())) == 3
    for name in ("curves", "diag", "bars"):
        svg = (tmp_path / f"{name}.svg").read_text().lower()
        for colour in palette.values():
            hexa = "#" + "".join(f"{round(255 * c):02x}" for c in colour)
            assert re.search(hexa, svg), (name, hexa)
