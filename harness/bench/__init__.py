"""Speed benchmarks, `dmlh bench WHAT [options]`: components (eval, losses, methods) in ``components``,
the study runner's overhead in ``study``, the input pipeline and training loop (data, train, gpu) in
``pipeline``, one run across DDP ranks in ``ddp``, and ``fixture`` (a folder of JPEGs to measure the
pipeline on).

``BENCHES`` names each benchmark's function and its one-line description (`dmlh bench --help`); the module
is imported only when the benchmark runs, so building the command line imports none of them.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

#: name → ("module:function", one-line description). A benchmark takes its command-line options and returns
#: None, or its exit status (`dmlh bench losses`: 1 when a row misses its target).
BENCHES: dict[str, tuple[str, str]] = {
    "eval": (
        "components:bench_eval",
        "retrieval metrics' time and peak memory vs pytorch-metric-learning and a raw faiss search",
    ),
    "losses": (
        "components:bench_losses",
        "forward + backward ms of every loss vs pytorch-metric-learning (exit 1: a row missed)",
    ),
    "study": ("study:bench_study", "the study runner's overhead and the speed-up of 2 workers over 1"),
    "methods": ("components:bench_methods", "ms per training step of each method variant vs plain triplet"),
    "data": ("pipeline:bench_data", "images/s of the input pipeline, the training step, and both together"),
    "train": ("pipeline:bench_train", "ms per step of the harness's training loop vs a bare PyTorch loop"),
    "gpu": ("pipeline:bench_gpu", "the GPU figures; --all: the prepared device check, CUDA tests included"),
    "fixture": ("fixtures:bench_fixture", "write a folder of JPEGs to measure the input pipeline on"),
    "ddp": ("ddp:bench_ddp", "ms per step of one run across W DDP ranks vs one process"),
}

__all__ = ["BENCHES", "bench", "bench_parser", "main"]


def bench_parser(what: str) -> argparse.ArgumentParser:
    """The option parser of `dmlh bench WHAT`, described by its line of ``BENCHES``."""
    return argparse.ArgumentParser(prog=f"dmlh bench {what}", description=BENCHES[what][1])


def bench(what: str) -> Callable[[list[str]], int | None]:
    """The function of benchmark ``what`` (its module imported now)."""
    module, function = BENCHES[what][0].split(":")
    fn: Callable[[list[str]], int | None] = getattr(importlib.import_module(f"{__name__}.{module}"), function)
    return fn


def main(what: str, options: list[str]) -> None:
    """Dispatch `dmlh bench WHAT [options]`; a non-zero status of the benchmark exits with it."""
    status = bench(what)(options)
    if status:
        raise SystemExit(status)
