"""`dmlh bench study`: the study runner's own overhead and its scaling with worker processes, on a study of
tiny synthetic trials (the trials' training time is not the runner's)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from harness.bench import bench_parser
from harness.bench.components import print_table


def bench_study(options: list[str]) -> None:
    """The study runner's overhead (study wall time / sum of trial times, target <= 1.10) and the throughput
    of --workers 2 against --workers 1 (target >= 1.6x on 2 cores), on a study of tiny synthetic trials."""
    import logging
    import tempfile

    import pandas as pd
    import yaml

    args = _study_parser().parse_args(options)
    logging.getLogger("harness").setLevel(logging.WARNING)
    spec = _study_spec(args.trials, args.batches)
    from harness import registry, train  # noqa: F401  (import time is not the runner's overhead)

    registry.load_plugins()
    with tempfile.TemporaryDirectory(prefix="dmlh-bench-study-") as tmp:
        path = Path(tmp) / "bench.yaml"
        path.write_text(yaml.safe_dump(spec))
        rows = [_study_row(path, workers, Path(tmp) / f"workers{workers}") for workers in args.workers]
    table = pd.DataFrame(rows).set_index("workers")
    base = table.iloc[0]
    table["speedup"] = table["trials/min"] / base["trials/min"]
    steady = "trials/min (first start→last end)"
    table["speedup (first start→last end)"] = table[steady] / base[steady]
    print_table(table, 2)
    print("targets: overhead <= 1.10 with 1 worker; speedup >= 1.6 with 2 workers on 2 cores")


def _study_parser() -> argparse.ArgumentParser:
    """The options of `dmlh bench study`."""
    parser = bench_parser("study")
    parser.add_argument("--trials", type=int, default=20, help="trials per study (one arm, this many seeds)")
    parser.add_argument(
        "--batches", type=int, default=600, help="training batches per trial (~2 s on 2 cores)"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare")
    return parser


def _study_spec(trials: int, batches: int) -> dict[str, Any]:
    """The benchmarked study: one arm of ``trials`` seeds, each a triplet run of ``batches`` batches of 16
    on 8×8 synthetic images (tiny trials, so the runner's own costs show)."""
    return {
        "name": "bench",
        "base": {
            "data": {"dataset": {"name": "synthetic", "num_classes": 16, "per_class": 10, "size": 8}},
            "sampler": {"p": 4, "k": 4, "batches_per_epoch": batches},
            "backbone": {"name": "small_convnet", "width": 8, "input_size": 8},
            "model": {"name": "embedder", "embedding_dim": 16},
            "loss": {"name": "triplet", "mining": "batch_hard"},
            "train": {"epochs": 1},
            "eval": {"nmi": False},
        },
        "final": {"seeds": list(range(trials))},
    }


def _study_row(path: Path, workers: int, results: Path) -> dict[str, Any]:
    """Run the study file ``path`` with ``workers`` workers into ``results``; its row of the table."""
    from harness import store, study

    t0 = time.perf_counter()
    study.run_study(path, workers=workers, results=results, report=False)
    wall = time.perf_counter() - t0
    df = store.load("bench", results=results)
    busy = (df.datetime_complete.max() - df.datetime_start.min()).total_seconds()
    return {
        "workers": workers,
        "trials": len(df),
        "wall_s": wall,
        "sum_trial_s": df.duration.sum(),
        "overhead": wall / df.duration.sum(),
        "trials/min": 60 * len(df) / wall,
        "trials/min (first start→last end)": 60 * len(df) / busy,
    }
