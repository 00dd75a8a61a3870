"""MDR distance histograms and ABE learner similarity from the diagnostics a run recorded (hand-written
diagnostics.json files in the format train.run writes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from harness.reporting import diagnostics


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
