"""``dmlh bench ddp``: the time of one training step of one run across W ranks (``train.distributed``), each
with its shard of the global batch, against one process holding the whole batch, on the same machine.

On the CPU the ranks share the cores (each gets its share of the threads), so this measures the overhead of
the gathers and the gradient all-reduce rather than a speed-up; on GPUs each rank has its own device.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from harness import config
from harness.bench import bench_parser
from harness.distributed import SINGLE, Dist, launch, resolve_backend
from harness.learner import Learner


def _raw(args: argparse.Namespace) -> dict[str, Any]:
    return config.name_default_components(
        {
            "backbone": {"name": "small_convnet", "width": args.width, "input_size": args.size},
            "model": {"name": "embedder", "embedding_dim": 64},
            "loss": {"name": args.loss},
            "sampler": {"p": args.p, "k": args.k},
            "train": {"device": args.device},
        }
    )


def _steps(dist: Dist, raw: dict[str, Any], steps: int, warmup: int) -> float:
    """Seconds per step (median) of this rank's shard; every rank steps in lockstep."""
    cfg = config.validate(raw)
    device = dist.place(torch.device("cuda" if cfg.train.device == "cuda" else "cpu"))
    torch.manual_seed(0)
    learner = Learner.build(cfg, num_classes=cfg.sampler.p, in_channels=1, device=device)
    learner.global_batch = dist.global_batch
    params = [p for g in learner.optimizer.param_groups for p in g["params"]]
    p, k, size = cfg.sampler.p, cfg.sampler.k, int(cfg.backbone["input_size"])
    images = torch.randn(p * k, 1, size, size, device=device)
    labels = torch.arange(p, device=device).repeat_interleave(k)
    n = p * k // dist.world_size
    shard = slice(dist.rank * n, (dist.rank + 1) * n)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        total, _ = learner.objective(images[shard], labels[shard])
        learner.optimizer.zero_grad(set_to_none=True)
        total.backward()
        dist.average_gradients(params)
        learner.optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def bench_ddp(argv: list[str]) -> None:
    ap = bench_parser("ddp")
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--p", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--loss", default="triplet")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = ap.parse_args(argv)
    raw = _raw(args)
    threads = torch.get_num_threads()
    one = _steps(SINGLE, raw, args.steps, args.warmup)
    backend = resolve_backend("auto", args.device)
    many = launch(_steps, (raw, args.steps, args.warmup), args.world_size, backend, timeout_s=600)
    batch = args.p * args.k
    shape = f"global batch {batch} ({args.p}×{args.k}), {args.size} px"
    print(f"device {args.device}, {threads} threads, {shape}")
    print(f"1 process × {batch} images:  {1000 * one:8.1f} ms/step")
    print(f"{args.world_size} ranks × {batch // args.world_size} images: {1000 * many:8.1f} ms/step (rank 0)")
