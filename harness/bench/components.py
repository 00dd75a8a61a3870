"""Speed benchmarks of components (`dmlh bench eval|losses|methods`) against reference
implementations. Speed and memory targets are checked here, never by timed tests.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from harness.bench import bench_parser


def bench_eval(options: list[str]) -> None:
    """Seconds of our retrieval metrics vs pytorch-metric-learning and a raw faiss search; peak memory."""
    import faiss
    import pandas as pd
    import torch

    args = _eval_parser().parse_args(options)
    if args.threads is not None:  # 1 thread gives stable figures on a loaded machine (no OpenMP barriers)
        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)

    x, y = _eval_data(args.n, args.dim, args.seed)
    ks = tuple(2**i for i in range(args.k.bit_length()) if 2**i <= args.k)
    results: dict[str, Any] = {}
    functions, ours_name, raw_name = _eval_runs(x, y, ks)
    runs = {name: _timed(fn, results, name) for name, fn in functions.items()}
    # round-robin, best of each: robust to load from other processes
    seconds = {name: min(t, default=float("inf")) for name, t in _interleaved(runs, args.repeats).items()}
    ours, pml_s, raw_s = seconds[ours_name], seconds[_PML], seconds[raw_name]
    table = pd.DataFrame({"seconds": seconds})
    table["ours (auto) / row"] = ours / table["seconds"]
    threads = faiss.omp_get_max_threads()
    print(f"N={args.n}, D={args.dim}, {y.max() + 1} classes, ks={ks}, faiss threads={threads}")
    print_table(table, 3)
    print(f"ours/PML = {ours / pml_s:.3f} (<= 0.5 wanted), ours/raw faiss = {ours / raw_s:.3f} (<= 1.3)")
    ref, got = results[_PML], results[ours_name]
    print(
        f"check: precision@1 {got['precision@1']:.6f} (PML {ref['precision_at_1']:.6f}), "
        f"map@r {got['map@r']:.6f} (PML {ref['mean_average_precision_at_r']:.6f})"
    )
    if args.memory_n > 0:
        _eval_print_memory(args.memory_n, args.memory_dim, args.seed)


_PML = "PML AccuracyCalculator"  # the row name of the reference in `dmlh bench eval`


def _eval_parser() -> argparse.ArgumentParser:
    """The options of `dmlh bench eval`."""
    parser = bench_parser("eval")
    parser.add_argument("--n", type=int, default=30_000, help="number of embeddings (self-retrieval)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=8, help="largest K of Recall@K (ks = 1, 2, 4, ..., k)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timings are the best of this many runs")
    parser.add_argument("--threads", type=int, default=None, help="faiss/torch threads (default: faiss's)")
    parser.add_argument("--memory-n", type=int, default=60_000, help="0 skips the memory measurement")
    parser.add_argument("--memory-dim", type=int, default=512)
    return parser


def _eval_runs(
    x: np.ndarray, y: np.ndarray, ks: tuple[int, ...]
) -> tuple[dict[str, Callable[[], Any]], str, str]:
    """The functions `dmlh bench eval` times, by row name (ours with each backend, PML, a raw faiss
    search of the K the metrics need), and the names of the ours (auto) and raw faiss rows."""
    import faiss
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    from harness.evaluate import _faster_cpu_backend, retrieval_metrics

    dim = x.shape[1]
    k_raw = max(max(ks), int(np.bincount(y).max()) - 1) + 1  # what the metrics need, self included
    pml = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
        k="max_bin_count",
        device=torch.device("cpu"),
    )

    def raw_faiss() -> None:
        index = faiss.IndexFlatIP(dim)
        index.add(x)
        index.search(x, k_raw)

    ours_name = f"ours (auto = {_faster_cpu_backend(dim)} here, no NMI)"
    raw_name = f"raw faiss IndexFlatIP, k={k_raw}"
    runs = {
        ours_name: lambda: retrieval_metrics(x, y, ks, nmi=False),
        "ours (faiss, no NMI)": lambda: retrieval_metrics(x, y, ks, backend="faiss", nmi=False),
        "ours (faiss, with NMI)": lambda: retrieval_metrics(x, y, ks, backend="faiss", nmi=True),
        "ours (torch, no NMI)": lambda: retrieval_metrics(x, y, ks, backend="torch", nmi=False),
        _PML: lambda: pml.get_accuracy(torch.from_numpy(x), torch.from_numpy(y)),
        raw_name: raw_faiss,
    }
    return runs, ours_name, raw_name


def _eval_print_memory(n: int, dim: int, seed: int) -> None:
    """Print the peak memory of the metrics on n×dim embeddings, measured in a fresh process (the high-water
    mark of this one holds the timing runs)."""
    import subprocess
    import sys

    child = f"import harness.bench.components as b; b._eval_peak_memory({n}, {dim}, {seed})"
    out = subprocess.run([sys.executable, "-c", child], check=True, capture_output=True, text=True).stdout
    embeddings_mib, peak_mib, run_s = (float(v) for v in out.split())
    print(
        f"memory: N={n}, D={dim} (embeddings {embeddings_mib:.0f} MiB, metrics w/o"
        f" NMI in {run_s:.1f} s): peak RSS above the embeddings {peak_mib:.0f} MiB (target < 2048 MiB)"
    )


def _eval_data(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised embeddings of ~n/5 classes of SOP-like sizes (2-8 images) around class centres."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.repeat(np.arange(n // 2), rng.integers(2, 9, size=n // 2))[:n])
    y = np.unique(y, return_inverse=True)[1]
    centres = rng.standard_normal((y.max() + 1, dim), dtype=np.float32)
    x = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 8192):  # in blocks: no float64 or full-size temporaries
        rows = slice(s, s + 8192)
        block = centres[y[rows]] + 1.2 * rng.standard_normal((len(y[rows]), dim), dtype=np.float32)
        x[rows] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return x, y


def _eval_peak_memory(n: int, dim: int, seed: int) -> None:
    """(Run in a fresh process.) Print embeddings MiB, peak RSS MiB above them, seconds of the metrics."""
    from harness.evaluate import retrieval_metrics

    def status_mib(key: str) -> float:
        line = next(r for r in open("/proc/self/status").read().splitlines() if r.startswith(key + ":"))
        return int(line.split()[1]) / 1024

    x, y = _eval_data(n, dim, seed)
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark to the current RSS
        f.write("5")
    base = status_mib("VmRSS")
    start = time.perf_counter()
    retrieval_metrics(x, y, nmi=False)  # the default backend (auto)
    print(x.nbytes / 2**20, status_mib("VmHWM") - base, time.perf_counter() - start)


def bench_losses(options: list[str]) -> int:
    """Forward + backward ms of every registered loss vs its pytorch-metric-learning equivalent; returns the
    exit status: 1 when a row misses its target.

    Same inputs for both (random embeddings, P×K labels with K=4), interleaved repeats after a warm-up,
    median reported. Targets: ours/PML <= 1.0 everywhere, < 0.7 for batch-all triplet and multi-similarity.
    Each loss declares its reference implementations next to itself (``register(..., references=...)``,
    ``harness.plugins.Reference``); a loss that declares none is timed alone. Each row is printed as soon
    as it is measured; the rows that missed their target are listed again at the end. ``--quick``: B = 128
    only, fewer repeats (about 10 s on one core; the full run about 2 minutes).
    """
    import torch

    from harness import registry

    parser = _losses_parser()
    args = parser.parse_args(options)
    for key, value in (_LOSSES_QUICK if args.quick else _LOSSES_FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.set_num_threads(args.threads)
    names = registry.registry("loss").names()
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        parser.error(f"unknown loss {', '.join(unknown)} (registered: {', '.join(names)})")
    cases = []
    for name in args.only or names:
        references = registry.registry("loss").get(name).references
        cases += [(name, case) for case in (references() if references else [None])]
    print(
        f"D={args.dim}, K=4, {torch.get_num_threads()} threads, B={', '.join(map(str, args.sizes))}, "
        f"median of {args.repeats} forward+backward runs (ms)",
        flush=True,
    )
    variant_width = max((len(case.variant) for _, case in cases if case), default=0)
    line = _losses_line(max(len(name) for name, _ in cases), variant_width)
    print(line(None), flush=True)
    missed = []
    for name, case in cases:
        for b in args.sizes:
            row = _losses_row(name, case, b, args)
            print(line(row), flush=True)
            if row["ok"] == "NO":
                missed.append(row)
    total = len(cases) * len(args.sizes)
    if not missed:
        print(f"all {total} rows within their targets", flush=True)
        return 0
    print(f"\n{len(missed)} of {total} rows missed their target:", flush=True)
    print(line(None))
    for row in missed:
        print(line(row))
    return 1


#: `dmlh bench losses` defaults, and those of ``--quick`` (explicit options win over either).
_LOSSES_FULL: dict[str, Any] = {"sizes": [128, 256, 512], "repeats": 15, "warmup": 2}
_LOSSES_QUICK: dict[str, Any] = {"sizes": [128], "repeats": 7, "warmup": 1}


def _losses_parser() -> argparse.ArgumentParser:
    """The options of `dmlh bench losses`."""
    full, quick = _LOSSES_FULL, _LOSSES_QUICK
    parser = bench_parser("losses")
    parser.add_argument(
        "--quick", action="store_true", help=f"B={quick['sizes'][0]} only, {quick['repeats']} repeats"
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=None, help=f"batch sizes (P×4; default {full['sizes']})"
    )
    parser.add_argument("--dim", type=int, default=512)
    repeats = f"timed runs per loss and size (median; default {full['repeats']})"
    parser.add_argument("--repeats", type=int, default=None, help=repeats)
    warmup = f"untimed runs first (default {full['warmup']})"
    parser.add_argument("--warmup", type=int, default=None, help=warmup)
    parser.add_argument("--only", nargs="+", default=None, help="loss names to run (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on shared machines)")
    parser.add_argument(
        "--pml-max-gib",
        type=float,
        default=3.0,
        help="skip a PML run whose estimated peak memory is larger (PML lifted structure)",
    )
    return parser


#: (column, width, alignment) of a `dmlh bench losses` row; loss and variant widths fit the names.
_LOSSES_COLUMNS = (
    ("B", 4, ">"),
    ("ours ms", 9, ">"),
    ("PML ms", 9, ">"),
    ("ours/PML", 8, ">"),
    ("target", 6, ">"),
    ("ok", 3, ">"),
)


def _losses_line(loss_width: int, variant_width: int) -> Callable[[dict[str, Any] | None], str]:
    """A formatter of fixed-width rows (the header for None), so rows can be printed one at a time."""
    columns = (("loss", max(loss_width, 4), "<"), ("variant", max(variant_width, 7), "<"), *_LOSSES_COLUMNS)

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "-" if value != value else f"{value:.2f}"  # NaN: no reference time
        return str(value)

    def line(row: dict[str, Any] | None) -> str:
        cells = [f"{key if row is None else cell(row[key]):{align}{width}}" for key, width, align in columns]
        return "  ".join([*cells, "note" if row is None else row["note"]]).rstrip()

    return line


def _losses_row(name: str, case: Any, b: int, args: argparse.Namespace) -> dict[str, Any]:
    """The table row of loss ``name`` at batch size ``b`` against reference ``case`` (a
    ``harness.plugins.Reference``, or None: timed alone): ms of both, their ratio and its target."""
    import torch

    from harness import registry

    gen = torch.Generator().manual_seed(args.seed)
    labels = torch.arange(b // 4).repeat_interleave(4)[torch.randperm(b // 4 * 4, generator=gen)]
    emb = torch.randn(len(labels), args.dim, generator=gen)
    context = {"num_classes": b // 4, "embedding_dim": args.dim, "miner": None, "synthesis": None}
    ours = registry.build("loss", name, context=context, **(case.params if case else {}))
    pml, note, goal = None, case.note if case else "", case.target if case else 1.0
    if case is not None and case.gib is not None and case.gib(b) > args.pml_max_gib:
        note = f"PML skipped: needs ~{case.gib(b):.0f} GiB > --pml-max-gib"
    elif case is not None:
        pml = _losses_timer(case.build(b // 4, args.dim), emb, labels)
    ours_run = _losses_timer(_value_of(ours), emb, labels)
    ours_ms, pml_ms = _losses_interleaved(ours_run, pml, args.warmup, args.repeats)
    ratio = ours_ms / pml_ms if pml_ms else float("nan")
    ok = ratio < goal if goal < 1 else ratio <= goal
    target = f"<{goal}" if goal < 1 else f"<={goal}"
    return {
        "loss": name,
        "variant": case.variant if case else "",
        "B": len(labels),
        "ours ms": ours_ms,
        "PML ms": pml_ms or float("nan"),
        "ours/PML": ratio,
        "target": target if pml_ms else "",
        "ok": ("yes" if ok else "NO") if pml_ms else "",
        "note": note,
    }


def _value_of(loss: Any) -> Callable[[Any, Any], Any]:
    """Our loss as a function returning the tensor (it returns a LossOutput)."""
    return lambda e, y: loss(e, y).value


def _losses_timer(loss: Callable[[Any, Any], Any], emb: Any, labels: Any) -> Callable[[], float]:
    """A function that runs forward + backward of ``loss`` on a fresh leaf copy of emb; returns seconds."""

    def once() -> float:
        x = emb.detach().clone().requires_grad_(True)
        start = time.perf_counter()
        loss(x, labels).backward()
        return time.perf_counter() - start

    return once


def _losses_interleaved(
    ours: Callable[[], float], pml: Callable[[], float] | None, warmup: int, repeats: int
) -> tuple[float, float | None]:
    """Median ms of ours and PML, runs interleaved so that load changes hit both alike."""
    runs = {"ours": ours} if pml is None else {"ours": ours, "PML": pml}
    _warm_up(runs.values(), warmup)
    ms = {name: 1000 * float(np.median(t)) for name, t in _interleaved(runs, repeats).items()}
    return ms["ours"], ms.get("PML")


def _warm_up(runs: Iterable[Callable[[], object]], rounds: int) -> None:
    """Call every run ``rounds`` times, round-robin, untimed: first-call costs (allocation, kernel choice)
    stay out of the figures."""
    calls = list(runs)
    for _ in range(rounds):
        for run in calls:
            run()


def _interleaved(runs: Mapping[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """The times every run returns (each run times itself), by run name, over ``rounds`` rounds that call
    the runs in turn: load changes from other processes hit every run alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            times[name].append(run())
    return times


def _timed(fn: Callable[[], Any], results: dict[str, Any], name: str) -> Callable[[], float]:
    """``fn`` as a run that returns its seconds, its latest result kept in ``results[name]``."""

    def run() -> float:
        start = time.perf_counter()
        results[name] = fn()
        return time.perf_counter() - start

    return run


def print_table(table: Any, digits: int, **options: Any) -> None:
    """Print a pandas DataFrame with its floats to ``digits`` decimals (``options``: of ``to_string``)."""
    print(table.to_string(float_format=lambda v: f"{v:.{digits}f}", **options))


def bench_methods(options: list[str]) -> None:
    """ms per training step (forward + loss + backward + optimizer step) of method variants vs plain triplet.

    The variants are the ``bench`` rows registered components declare (``harness.plugins.BenchVariant``),
    each merged into the base config (a triplet embedder). Every variant is assembled from a RunConfig dict
    by the engine's own builders (config validation, ``build_model``, ``build_component``,
    ``param_groups``) on the small convnet with 28×28 grey inputs and P×K labels. Variants run in
    interleaved rounds; the figure is the median over rounds of the mean step time.
    """
    import statistics

    import pandas as pd
    import torch

    from harness.train import pick_device

    parser = _methods_parser()
    args = parser.parse_args(options)
    if args.batch % args.k:
        parser.error(f"--batch {args.batch} is not a multiple of --k {args.k}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    num_classes = args.batch // args.k
    variants = _methods_variants(args)
    steps, notes = _methods_steps(variants, args, device)
    _warm_up(steps.values(), args.warmup)
    runs = {name: _methods_timer(step, args.steps, device) for name, step in steps.items()}
    medians = {name: statistics.median(t) for name, t in _interleaved(runs, args.rounds).items()}
    baseline = medians.get(variants[0][0], float("nan"))
    rows = []
    for name, _ in variants:
        ms = medians.get(name, float("nan"))
        overhead = f"{100 * (ms / baseline - 1):+.1f}%" if name in medians else ""
        rows.append({"variant": name, "ms/step": ms, "overhead": overhead, "note": notes[name]})
    print(
        f"training step at B={args.batch} (P={num_classes}×K={args.k}), small_convnet width {args.width}, "
        f"28×28 grey, {args.dim}-D, device {device}, {torch.get_num_threads()} threads; "
        f"median over {args.rounds} rounds of {args.steps} steps"
    )
    print_table(pd.DataFrame(rows), 1, index=False)


def _methods_parser() -> argparse.ArgumentParser:
    """The options of `dmlh bench methods`."""
    parser = bench_parser("methods")
    parser.add_argument("--batch", type=int, default=128, help="batch size B = P·K")
    parser.add_argument("--k", type=int, default=4, help="images per class K")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--width", type=int, default=32, help="small_convnet width")
    parser.add_argument("--dim", type=int, default=128, help="embedding dimension")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _methods_variants(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """(row name, RunConfig dict) of the baseline (a triplet embedder on the small convnet) and of every
    ``bench`` variant registered components declare, merged into it."""
    from harness import registry

    base = {
        "backbone": {"name": "small_convnet", "width": args.width, "input_size": 28},
        "model": {"name": "embedder", "embedding_dim": args.dim},
        "loss": {"name": "triplet"},
        "train": {"device": args.device},
    }
    changes: list[tuple[str, dict[str, Any]]] = [("triplet (baseline)", {})] + [
        (v.label, v.change)
        for kind in registry.kinds()
        for e in registry.registry(kind).entries()
        for v in e.bench
    ]
    return [(name, _merged(base, change)) for name, change in changes]


def _methods_steps(
    variants: list[tuple[str, dict[str, Any]]], args: argparse.Namespace, device: Any
) -> tuple[dict[str, Callable[[], None]], dict[str, str]]:
    """The training step of every variant whose config validates (on fixed random images of ``device``),
    and a note per variant: empty, or why it is skipped."""
    import torch

    from harness.config import validate
    from harness.errors import ConfigError

    num_classes = args.batch // args.k
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.rand(args.batch, 1, 28, 28, generator=gen).to(device)
    labels = torch.arange(num_classes).repeat_interleave(args.k).to(device)
    steps: dict[str, Callable[[], None]] = {}
    notes: dict[str, str] = {}
    for name, raw in variants:
        try:
            cfg = validate(raw)
        except ConfigError as e:
            notes[name] = f"skipped: {'; '.join(e.problems)}"
            continue
        torch.manual_seed(args.seed)
        steps[name] = _methods_step(cfg, num_classes, images, labels)
        notes[name] = ""
    return steps, notes


def _methods_timer(step: Callable[[], None], steps: int, device: Any) -> Callable[[], float]:
    """A run of ``steps`` training steps (the device synchronised around them); returns ms per step."""

    def run() -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        return 1000 * (time.perf_counter() - start) / steps

    return run


def _merged(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``change`` merged in: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in change.items():
        old = out.get(key)
        out[key] = _merged(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return out


def _sync(device: Any) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _methods_step(cfg: Any, num_classes: int, images: Any, labels: Any) -> Callable[[], None]:
    """One training step of ``cfg`` exactly as training takes it (``Learner.objective``), backward and
    optimizer step included."""
    from harness.learner import Learner

    learner = Learner.build(cfg, num_classes, in_channels=1, device=images.device)
    learner.model.train()

    def step() -> None:
        total, _ = learner.objective(images, labels)
        learner.optimizer.zero_grad(set_to_none=True)
        total.backward()
        learner.optimizer.step()

    return step
