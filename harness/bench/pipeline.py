"""Benchmarks of the input pipeline and the training loop (`dmlh bench data|train|gpu`).

- ``data CONFIG``: images/s of (a) the input pipeline alone, decoding the files (JPEG), from the
  decoded-image cache (the workers' uint8 crops, ``CachedCrop``: the CPU's default), and from the cache with
  the batched augmentation (``data.batch_augment: true``; (a) then includes the augmentation, which runs in
  the training process), (b) the model's training step alone on
  synthetic tensors, (c) both together, and (c)/(b): 1.0 means the input pipeline costs the training
  nothing.
- ``train CONFIG``: ms per step of the harness's training epoch against a bare PyTorch loop with the same
  model, loss and optimizer on the same batches (target: harness / bare <= 1.05).
- ``gpu``: on a GPU, the training step of GoogLeNet at 224 px and batch 128, a synthetic CUB-sized epoch
  (6,000 JPEGs of 500×375) through the cache, and the evaluation of 60k×512 embeddings; on a machine
  without one it says so and exits 0.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from harness.bench import bench_parser

log = logging.getLogger(__name__)


def _parser(what: str, config: bool = True) -> argparse.ArgumentParser:
    parser = bench_parser(what)
    if config:
        parser.add_argument("config", help="RunConfig YAML")
        parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.num_workers=1")
    parser.add_argument("--batches", type=int, default=30, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the training process")
    return parser


def _setup(args: argparse.Namespace) -> Any:
    """The config of ``args`` (device resolved), with logging of the harness quietened."""
    from harness import config

    logging.getLogger("harness").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    return config.load(args.config, args.overrides)


def _rate(batches: Iterable[Any], step: Callable[[Any], None], warmup: int, n: int, device: Any) -> float:
    """Images/s of ``step`` over ``n`` batches of ``batches`` after ``warmup`` untimed ones."""
    it = iter(batches)
    for _ in range(warmup):
        step(next(it))
    _sync(device)
    start, images = time.perf_counter(), 0
    for _ in range(n):
        batch = next(it)
        step(batch)
        images += len(batch[1])
    _sync(device)
    return images / (time.perf_counter() - start)


def _sync(device: Any) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _endless(loader: torch.utils.data.DataLoader, sampler: Any) -> Iterator[Any]:
    """Batches of ``loader`` epoch after epoch (the sampler's epoch advancing)."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def _trainer(cfg: Any, cache: str, batch_augment: bool | str | None = None) -> Any:
    """The harness's own trainer of ``cfg`` with ``data.cache`` set to ``cache`` (and
    ``data.batch_augment`` to ``batch_augment`` unless None)."""
    from harness.config import validate
    from harness.train import _Trainer, seed_everything

    raw = cfg.to_dict()
    raw["data"]["cache"] = cache
    if batch_augment is not None:
        raw["data"]["batch_augment"] = batch_augment
    seed_everything(cfg.seed)
    return _Trainer(validate(raw))


def _train_step(tr: Any) -> Callable[[Any], None]:
    """One optimisation step of the trainer's learner on a batch (images moved to its device and
    augmented there when the trainer batches its augmentation)."""

    def step(batch: Any) -> None:
        images, labels = batch
        images = _on_device(tr, images)
        labels = torch.as_tensor(labels).to(tr.device, non_blocking=True)
        total, _ = tr.learner.objective(images, labels)
        tr.optimizer.zero_grad(set_to_none=True)
        total.backward()
        tr.optimizer.step()

    return step


def _on_device(tr: Any, images: Any) -> torch.Tensor:
    """``images`` on the trainer's device, through its batched augmentation when they are canvases of it,
    normalised when they are the workers' uint8 crops (synthetic tensors are already the model's input)."""
    from harness.data.batch_augment import Canvas

    images = images.to(tr.device, non_blocking=True)
    if isinstance(images, Canvas):
        return tr.augment(images)
    if images.dtype == torch.uint8 and tr.crops is not None:  # the workers' uint8 crops (CachedCrop)
        return tr.crops.normalise(images)
    return images


def _pipeline_end(tr: Any) -> Callable[[Any], None]:
    """What the training process does to a batch before the step: move it (and augment it, batched)."""

    def end(batch: Any) -> None:
        _on_device(tr, batch[0])

    return end


#: (data.cache, data.batch_augment, name) of the input pipelines ``bench data`` compares.
PIPELINES = (("off", False, "JPEG"), ("disk", False, "cached"), ("disk", True, "cached + batch augment"))


def bench_data(options: list[str]) -> None:
    """Images/s of the input pipeline (JPEG and cached), the training step, and both (see the module).

    Every measurement is taken once per round, the rounds interleaved (the order of the pipelines reversed
    every other round), and the medians are reported: on shared cores the load changes from one second to
    the next, and it then hits every pipeline alike instead of the one that happened to run then."""
    parser = _parser("data")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are reported)")
    args = parser.parse_args(options)
    cfg = _setup(args)
    trainers: dict[str, Any] = {}
    for cache, batch_augment, path in PIPELINES:
        tr = _trainer(cfg, cache, batch_augment)
        if tr.splits.train.in_memory and cache == "disk":
            break  # in-memory images: nothing to decode or cache
        trainers["in-memory arrays" if tr.splits.train.in_memory else path] = tr
    loaders = {path: _endless(tr.loader, tr.sampler) for path, tr in trainers.items()}
    first = next(iter(trainers.values()))
    first.model.train()
    images, labels = next(loaders[next(iter(trainers))])
    synthetic = (torch.rand_like(_on_device(first, images).float()), labels)
    measured: dict[str, list[float]] = {}

    def measure(name: str, batches: Iterable[Any], step: Callable[[Any], None], tr: Any) -> None:
        rate = _rate(batches, step, args.warmup, args.batches, tr.device)
        measured.setdefault(name, []).append(rate)

    for r in range(args.rounds):
        for path, tr in list(trainers.items())[:: 1 if r % 2 == 0 else -1]:
            measure(f"(a) input pipeline, {path}", loaders[path], _pipeline_end(tr), tr)
            tr.model.train()
            measure(f"(c) pipeline + step, {path}", loaders[path], _train_step(tr), tr)
        measure("(b) training step, synthetic tensors", _repeat(synthetic), _train_step(first), first)
    _print_data(cfg, first, tuple(synthetic[0].shape), measured, args)


def _print_data(
    cfg: Any, tr: Any, shape: tuple[int, ...], measured: dict[str, list[float]], args: argparse.Namespace
) -> None:
    """The table of ``bench data``: each measurement's median images/s, (c)/(b) and the ratios to JPEG
    (medians of the per-round ratios)."""
    b = np.array(measured["(b) training step, synthetic tensors"])
    rows = []
    for name in sorted(measured, key=lambda n: n[:3]):  # (a), (b), (c), each in pipeline order
        rate = np.array(measured[name])
        row = {"measurement": name, "images/s": float(np.median(rate))}
        if name.startswith("(c)"):
            row["(c)/(b)"] = float(np.median(rate / b))
        rows.append(row)
    print(
        f"{cfg.name}: {cfg.data.dataset.get('name')}, batch {shape}, {tr.num_workers} DataLoader "
        f"workers, {torch.get_num_threads()} torch threads, device {tr.device}; medians of {args.rounds} "
        f"interleaved rounds of {args.batches} batches"
    )
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.2f}", na_rep=""))
    jpeg = measured.get("(a) input pipeline, JPEG")
    for _, _, path in PIPELINES[1:]:
        if jpeg and f"(a) input pipeline, {path}" in measured:
            ratio = np.median(np.array(measured[f"(a) input pipeline, {path}"]) / np.array(jpeg))
            print(f"{path} / JPEG pipeline = {ratio:.2f} (target >= 5)")
    print("(c)/(b) target with the cache >= 0.95")


def step_rates(tr: Any, warmup: int, batches: int) -> tuple[float, float]:
    """Images/s of ``tr``'s training step (b) on one synthetic batch repeated and (c) fed by its loader."""
    tr.model.train()
    loader = _endless(tr.loader, tr.sampler)
    images, labels = next(loader)
    synthetic = (torch.rand_like(_on_device(tr, images)), labels)
    b = _rate(_repeat(synthetic), _train_step(tr), warmup, batches, tr.device)
    c = _rate(loader, _train_step(tr), warmup, batches, tr.device)
    return b, c


def _repeat(batch: Any) -> Iterator[Any]:
    while True:
        yield batch


def bench_train(options: list[str]) -> None:
    """ms per step of the harness's ``train_epoch`` against a bare loop (same model, loss, optimizer and
    batches); both start from the same seed and step through the same pre-gathered batches."""
    from harness.monitor import Progress

    parser = _parser("train")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (the median is reported)")
    args = parser.parse_args(options)
    cfg = _setup(args)
    harness_tr, bare_tr = _trainer(cfg, cfg.data.cache), _trainer(cfg, cfg.data.cache)
    batches = list(itertools.islice(_endless(harness_tr.loader, harness_tr.sampler), args.batches))
    harness_tr.loader = batches  # the same batches for both: this measures the loop, not the data

    def harness_epoch() -> None:
        harness_tr.train_epoch(0, Progress(cfg.name, 1, len(batches)))

    bare_step = _train_step(bare_tr)

    def bare_epoch() -> None:
        bare_tr.model.train()
        bare_tr.loss.train()
        for batch in batches:
            bare_step(batch)

    times: dict[str, list[float]] = {"harness": [], "bare PyTorch loop": []}
    for epoch in (harness_epoch, bare_epoch):
        epoch()  # warm-up
    order = [("harness", harness_epoch), ("bare PyTorch loop", bare_epoch)]
    for r in range(args.rounds):  # interleaved rounds, alternating which goes first: load hits both alike
        for name, epoch in order[:: 1 if r % 2 == 0 else -1]:
            _sync(harness_tr.device)
            start = time.perf_counter()
            epoch()
            _sync(harness_tr.device)
            times[name].append(1000 * (time.perf_counter() - start) / len(batches))
    ms = {name: float(np.median(t)) for name, t in times.items()}
    print(
        f"{cfg.name}: ms per training step (median of {args.rounds} rounds of {len(batches)} steps), "
        f"device {harness_tr.device}, {torch.get_num_threads()} threads"
    )
    for name, v in ms.items():
        print(f"  {name:<18} {v:8.2f} ms")
    print(f"harness / bare = {ms['harness'] / ms['bare PyTorch loop']:.3f} (target <= 1.05)")


def bench_gpu(options: list[str]) -> None:
    """GPU figures (see the module docstring); says "no GPU present" and returns on a CPU-only machine."""
    parser = _parser("gpu", config=False)
    parser.add_argument("--images", type=int, default=6000, help="JPEGs of the synthetic CUB-sized epoch")
    parser.add_argument("--eval-n", type=int, default=60_000)
    parser.add_argument("--all", action="store_true", help="the device check: every section, CUDA tests too")
    parser.add_argument("--section", choices=["steps", "pipeline", "eval"], help="one section of --all")
    parser.add_argument("--workdir", default=None, help="folder of the --section's fixture")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole --all check")
    args = parser.parse_args(options)
    if not torch.cuda.is_available():
        print("no GPU present: dmlh bench gpu measures nothing on this machine")
        return
    logging.getLogger("harness").setLevel(logging.WARNING)
    if args.all or args.section:  # harness/bench/gpu.py: the prepared device check
        from harness.bench import gpu

        if args.section:
            with tempfile.TemporaryDirectory(prefix="dmlh-bench-gpu-") as tmp:
                args.workdir = args.workdir or tmp
                gpu.run_section(args.section, args)
            return
        args.budget = args.budget or gpu.BUDGET_S
        raise SystemExit(gpu.run_all(args))
    with tempfile.TemporaryDirectory(prefix="dmlh-bench-gpu-") as tmp:
        rows = _gpu_training(Path(tmp), args)
    rows.append(_gpu_eval(args.eval_n))
    print(f"{torch.cuda.get_device_name()}")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.2f}", na_rep=""))


def _gpu_training(tmp: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """GoogLeNet at 224 px, batch 128 (P=32, K=4) on a synthetic CUB-like folder: cache build time,
    synthetic-tensor step and cached pipeline + step images/s."""
    from harness import config
    from harness.bench.fixtures import write_cub_like

    root = write_cub_like(tmp / "CUB_200_2011", args.images, (500, 375))
    raw = {
        "name": "gpu",
        "data": {"dataset": {"name": "cub200", "root": str(root)}, "cache": "disk", "val_fraction": 0},
        "sampler": {"p": 32, "k": 4},
        "backbone": {"name": "googlenet", "pretrained": False},
        "loss": {"name": "multi_similarity"},
        "train": {"device": "cuda"},
    }
    cfg = config.validate(raw)
    start = time.perf_counter()
    tr = _trainer(cfg, "disk")
    build_s = time.perf_counter() - start
    b, c = step_rates(tr, args.warmup, args.batches)
    return [
        {"measurement": f"decode {args.images} JPEGs 500×375 into the cache (s)", "value": build_s},
        {"measurement": "GoogLeNet 224 px B=128 step, synthetic tensors (images/s)", "value": b},
        {"measurement": "GoogLeNet 224 px B=128, cached pipeline + step (images/s)", "value": c},
        {"measurement": "(c)/(b)", "value": c / b},
    ]


def _gpu_eval(n: int) -> dict[str, Any]:
    """Seconds of the retrieval metrics of ``n``×512 embeddings (faiss on the GPU where it has one)."""
    from harness.bench.components import _eval_data
    from harness.evaluate import retrieval_metrics

    x, y = _eval_data(n, 512, 0)
    start = time.perf_counter()
    retrieval_metrics(x, y, nmi=False, backend="faiss")
    return {"measurement": f"retrieval metrics of {n}×512 (s)", "value": time.perf_counter() - start}
