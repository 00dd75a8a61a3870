"""Speed benchmarks, `dmlh bench WHAT [options]`: components (eval, losses, methods) in ``components``,
the study runner's overhead in ``study``, the input pipeline and training loop (data, train, gpu) in
``pipeline``, and ``fixture`` (a folder of JPEGs to measure the pipeline on)."""

from __future__ import annotations

from collections.abc import Callable

from harness.bench.components import bench_eval, bench_losses, bench_methods
from harness.bench.ddp import bench_ddp
from harness.bench.fixtures import bench_fixture
from harness.bench.pipeline import bench_data, bench_gpu, bench_train
from harness.bench.study import bench_study

#: A benchmark returns None, or its exit status (`dmlh bench losses`: 1 when a row misses its target).
BENCHES: dict[str, Callable[[list[str]], int | None]] = {
    "eval": bench_eval,
    "losses": bench_losses,
    "study": bench_study,
    "methods": bench_methods,
    "data": bench_data,
    "train": bench_train,
    "gpu": bench_gpu,
    "fixture": bench_fixture,
    "ddp": bench_ddp,
}

__all__ = ["BENCHES", "bench_data", "bench_eval", "bench_gpu", "bench_losses", "bench_methods", "main"]


def main(what: str, options: list[str]) -> None:
    """Dispatch `dmlh bench WHAT [options]`; a non-zero status of the benchmark exits with it."""
    status = BENCHES[what](options)
    if status:
        raise SystemExit(status)
