"""Speed benchmarks (`dmlh bench eval|losses|study|methods`) against reference implementations.

Speed and memory targets are checked here, never by timed tests.
"""

from __future__ import annotations


def main(what: str, options: list[str]) -> None:
    """Dispatch `dmlh bench WHAT [options]`."""
    benches = {"eval": bench_eval, "losses": bench_losses, "study": bench_study, "methods": bench_methods}
    benches[what](options)


def bench_eval(options: list[str]) -> None:
    raise NotImplementedError


def bench_losses(options: list[str]) -> None:
    raise NotImplementedError


def bench_study(options: list[str]) -> None:
    raise NotImplementedError


def bench_methods(options: list[str]) -> None:
    raise NotImplementedError
