"""Speed benchmarks (`dmlh bench eval|losses|study|methods`) against reference implementations.

Speed and memory targets are checked here, never by timed tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


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
    """ms per training step (forward + loss + backward + optimizer step) of method variants vs plain triplet.

    Every variant is assembled from a RunConfig dict by the engine's own builders (config validation,
    ``build_model``, ``build_component``, ``param_groups``) on the small convnet with 28×28 grey inputs and
    P×K labels; a variant whose component is not registered is skipped with a note. Variants run in
    interleaved rounds; the figure is the median over rounds of the mean step time.
    """
    import argparse
    import statistics

    import pandas as pd
    import torch

    from harness import registry
    from harness.config import validate
    from harness.errors import ConfigError
    from harness.train import pick_device

    parser = argparse.ArgumentParser(prog="dmlh bench methods")
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
    args = parser.parse_args(options)
    if args.batch % args.k:
        parser.error(f"--batch {args.batch} is not a multiple of --k {args.k}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    num_classes = args.batch // args.k

    base = {
        "backbone": {"name": "small_convnet", "width": args.width, "input_size": 28},
        "model": {"name": "embedder", "embedding_dim": args.dim},
        "loss": {"name": "triplet"},
        "train": {"device": args.device},
    }
    abe = [
        (f"ABE-M, M={m}", {"model": {"name": "abe", "m": m, "embedding_dim": args.dim}}, [("model", "abe")])
        for m in (1, 2, 4, 8)
    ]
    variants: list[tuple[str, dict, list[tuple[str, str]]]] = [
        ("triplet (baseline)", {}, [("loss", "triplet")]),
        ("+ symmetrical synthesis", {"synthesis": "symmetrical"}, [("synthesis", "symmetrical")]),
        (
            "+ MDR (mean_distance head)",
            {
                "model": {"name": "embedder", "embedding_dim": args.dim, "normalize": "mean_distance"},
                "regularizers": ["mdr"],
            },
            [("regularizer", "mdr")],
        ),
        *abe,
        ("GeM pooling", {"pooling": "gem"}, [("pooling", "gem")]),
        ("R-MAC pooling", {"pooling": "rmac"}, [("pooling", "rmac")]),
    ]

    gen = torch.Generator().manual_seed(args.seed)
    images = torch.rand(args.batch, 1, 28, 28, generator=gen).to(device)
    labels = torch.arange(num_classes).repeat_interleave(args.k).to(device)
    steps: dict[str, Callable[[], None]] = {}
    notes: dict[str, str] = {}
    for name, change, needs in variants:
        missing = [f"{kind} {n!r}" for kind, n in needs if n not in registry.registry(kind)]
        if missing:
            notes[name] = f"skipped: {', '.join(missing)} not registered"
            continue
        try:
            cfg = validate({**base, **change})
        except ConfigError as e:
            notes[name] = f"skipped: {'; '.join(e.problems)}"
            continue
        torch.manual_seed(args.seed)
        steps[name] = _methods_step(cfg, num_classes, images, labels)
        notes[name] = ""

    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    for _ in range(args.rounds):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            _sync(device)
            times[name].append(1000 * (time.perf_counter() - start) / args.steps)

    medians = {name: statistics.median(t) for name, t in times.items()}
    baseline = medians.get(variants[0][0], float("nan"))
    rows = []
    for name, _, _ in variants:
        ms = medians.get(name, float("nan"))
        overhead = f"{100 * (ms / baseline - 1):+.1f}%" if name in medians else ""
        rows.append({"variant": name, "ms/step": ms, "overhead": overhead, "note": notes[name]})
    print(
        f"training step at B={args.batch} (P={num_classes}×K={args.k}), small_convnet width {args.width}, "
        f"28×28 grey, {args.dim}-D, device {device}, {torch.get_num_threads()} threads; "
        f"median over {args.rounds} rounds of {args.steps} steps"
    )
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.1f}"))


def _sync(device: Any) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _methods_step(cfg: Any, num_classes: int, images: Any, labels: Any) -> Callable[[], None]:
    """One training step of ``cfg`` as the engine assembles it: model (+ aux losses, per-part metric loss)
    + loss (+ miner, synthesis) + regularizers, backward, optimizer step."""
    from torch import nn

    from harness.model import build_component, build_model
    from harness.train import param_groups

    device = images.device
    model = build_model(cfg, num_classes=num_classes, in_channels=1).to(device).train()
    ctx = {"num_classes": num_classes, "embedding_dim": model.embedding_dim}
    miner = build_component(cfg.miner, "miner", "miner", **ctx) if cfg.miner else None
    synthesis = build_component(cfg.synthesis, "synthesis", "synthesis", **ctx) if cfg.synthesis else None
    loss = build_component(cfg.loss, "loss", "loss", miner=miner, synthesis=synthesis, **ctx)
    regs = nn.ModuleList(
        build_component(r, "regularizer", f"regularizers.{i}", **ctx) for i, r in enumerate(cfg.regularizers)
    )
    loss.to(device).train()
    regs.to(device).train()
    groups = param_groups(model, [loss, regs], cfg)
    optimizer = build_component(cfg.optimizer, "optimizer", "optimizer", params=groups)

    def step() -> None:
        out = model(images, labels)
        parts = out.parts if out.parts is not None else [out.embeddings]
        total = sum(loss(p.float(), labels).value for p in parts)
        total = total + sum(r(out.embeddings.float(), labels).value for r in regs)
        total = total + sum(out.aux_losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    return step
