"""The prepared device check (`dmlh bench gpu --all`, or `bash harness/bench/gpu_check.sh`): on one GPU, in
under 8 minutes, every CUDA-only test (`pytest -m cuda`) and the GPU figures of the README:

- ``tests``: ``pytest -m cuda`` (the tests skipped without a GPU);
- ``steps``: images/s of GoogLeNet's training step at 224 px, batch 128 (P×K = 32×4), on synthetic tensors,
  in float32, float16 AMP (today's default on CUDA), bfloat16 AMP, + channels_last, + torch.compile;
- ``pipeline``: a CUB-sized folder (6,000 JPEGs of 500×375): the decoded-image cache's build time, the
  step on synthetic tensors (b) and through the cache with batched GPU augmentation (c), (c)/(b), and the
  wall-clock of one training epoch of the trainer;
- ``eval``: retrieval metrics of 60k×512 CUDA embeddings with faiss-gpu and with torch's GEMM;
- ``workers``: 2 workers on one GPU against 1 (not measured yet: a TODO line).

Each section runs in a process of its own with its own time limit (its process group is killed when it
runs over), so one that fails or hangs does not stop the others; the exit status says whether all passed.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

#: Seconds each section may run (together under 8 minutes with the processes' start-up).
SECTION_LIMITS = {"tests": 140, "steps": 150, "pipeline": 120, "eval": 45}
#: The whole check's budget in seconds: a section gets at most what is left of it.
BUDGET_S = 465
#: What the sections measure on (a test runs them on the CPU with a small model and small sizes).
DEVICE = torch.device("cuda")
MODEL: dict[str, Any] = {"backbone": {"name": "googlenet", "pretrained": False}}
P, K, SIZE = 32, 4, 224
JPEG_SIZE = (500, 375)
#: The ``train`` options of each row of the ``steps`` section.
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("float32 (train.amp: false)", {"amp": False}),
    ("float16 AMP (the default)", {}),
    ("bfloat16 AMP (train.amp_dtype: bfloat16)", {"amp_dtype": "bfloat16"}),
    ("float32 + channels_last", {"amp": False, "channels_last": True}),
    ("bfloat16 AMP + channels_last", {"amp_dtype": "bfloat16", "channels_last": True}),
    (
        "bfloat16 AMP + channels_last + compile (default)",
        {"amp_dtype": "bfloat16", "channels_last": True, "compile": "default"},
    ),
]
TODO_WORKERS = (
    "TODO: 2 workers on 1 GPU vs 1 worker (dmlh study run --workers 2 on one device) is not measured yet"
)


def run_all(args: argparse.Namespace) -> int:
    """Run every section in its own process (see the module docstring); 0 when all of them passed."""
    root = Path(__file__).resolve().parents[2]
    start = time.perf_counter()
    print(
        f"device check: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}",
        flush=True,
    )
    failed = []
    with tempfile.TemporaryDirectory(prefix="dmlh-gpu-check-") as tmp:
        for name, limit in SECTION_LIMITS.items():
            left = args.budget - (time.perf_counter() - start)
            if left < 10:
                print(f"\n== {name}: skipped, the {args.budget:.0f} s budget is spent", flush=True)
                failed.append(f"{name} (no time left)")
                continue
            if name == "tests":
                cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests"]
            else:
                cmd = [
                    sys.executable,
                    "-m",
                    "harness.cli",
                    "bench",
                    "gpu",
                    "--section",
                    name,
                    "--workdir",
                    tmp,
                ]
                cmd += ["--images", str(args.images), "--eval-n", str(args.eval_n)]
                cmd += ["--batches", str(args.batches), "--warmup", str(args.warmup)]
            status = _run_section(name, cmd, min(limit, left), root)
            if status != "ok":
                failed.append(f"{name} ({status})")
    print(f"\n{TODO_WORKERS}")
    took = time.perf_counter() - start
    print(
        f"device check: {took:.0f} s; "
        + (f"FAILED: {', '.join(failed)}" if failed else "all sections passed")
    )
    return 1 if failed else 0


def _run_section(name: str, cmd: list[str], limit: float, cwd: Path) -> str:
    """Run one section's command (output straight through), killing its process group after ``limit`` s."""
    print(f"\n== {name} (limit {limit:.0f} s): {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "TQDM_DISABLE": "1"}  # no progress bars in the report
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        print(f"== {name}: TIMED OUT after {limit:.0f} s (killed)", flush=True)
        return f"timed out after {limit:.0f} s"
    except BaseException:  # interrupted: the section's own session would outlive us
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    print(
        f"== {name}: {'ok' if rc == 0 else f'exit {rc}'} in {time.perf_counter() - start:.0f} s", flush=True
    )
    return "ok" if rc == 0 else f"exit {rc}"


def run_section(name: str, args: argparse.Namespace) -> None:
    """One section of the check, in this process (what ``run_all`` starts)."""
    {"steps": _steps, "pipeline": _pipeline, "eval": _eval}[name](args)


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _row(measurement: str, value: float | str, unit: str = "") -> None:
    text = f"{value:10.1f}" if isinstance(value, float) else f"{value:>10}"
    print(f"  {measurement:<62} {text} {unit}", flush=True)


def _model_config(**train: Any) -> Any:
    from harness import config

    raw = {
        "name": "gpu-check",
        "sampler": {"p": P, "k": K},
        **MODEL,
        "loss": {"name": "multi_similarity"},
        "train": {"device": DEVICE.type, **train},
    }
    return config.validate(config.name_default_components(raw))


def _steps(args: argparse.Namespace) -> None:
    """GoogLeNet 224 px B=128 training step images/s per speed option (synthetic tensors on the GPU)."""
    from harness.learner import Learner

    device = DEVICE
    images = torch.rand(P * K, 3, SIZE, SIZE, device=device)
    labels = torch.arange(P * K, device=device) // K
    backbone = MODEL["backbone"]["name"]
    print(
        f"{backbone} {SIZE} px, batch {P * K}, training step, synthetic tensors ({args.batches} timed steps)"
    )
    for name, train in VARIANTS:
        try:
            torch.manual_seed(0)
            lrn = Learner.build(_model_config(**train), num_classes=100, in_channels=3, device=device)
            lrn.model.train()
            scaler = torch.amp.GradScaler(DEVICE.type, enabled=lrn.grad_scaling)

            def step(lrn: Learner = lrn, scaler: torch.amp.GradScaler = scaler) -> None:
                total, _ = lrn.objective(images, labels)
                lrn.optimizer.zero_grad(set_to_none=True)
                scaler.scale(total).backward()
                scaler.step(lrn.optimizer)
                scaler.update()

            t = time.perf_counter()
            for _ in range(args.warmup):
                step()
            _sync()
            warm_s = time.perf_counter() - t
            t = time.perf_counter()
            for _ in range(args.batches):
                step()
            _sync()
            rate = P * K * args.batches / (time.perf_counter() - t)
            _row(name, rate, f"images/s (warm-up {warm_s:.0f} s)")
            del lrn, scaler
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
        except Exception as e:  # one variant failing (a compile error) must not hide the others
            _row(name, f"FAILED: {type(e).__name__}: {str(e)[:200]}")


def _pipeline(args: argparse.Namespace) -> None:
    """The CUB-sized folder through the cache and GPU batch augmentation: (b), (c), (c)/(b), one epoch."""
    from harness import config
    from harness.bench.fixtures import write_cub_like
    from harness.bench.pipeline import _trainer, step_rates
    from harness.monitor import Progress

    t = time.perf_counter()
    root = write_cub_like(Path(args.workdir) / "CUB_200_2011", args.images, JPEG_SIZE)
    _row(
        f"write {args.images} JPEGs of {JPEG_SIZE[0]}×{JPEG_SIZE[1]} (fixture)", time.perf_counter() - t, "s"
    )
    raw = _model_config().to_dict()
    raw["data"] = {**raw["data"], "dataset": {"name": "cub200", "root": str(root)}, "val_fraction": 0}
    cfg = config.validate(raw)
    t = time.perf_counter()
    tr = _trainer(cfg, "disk", True)
    _row(f"decode them into the cache, {tr.num_workers} workers", time.perf_counter() - t, "s")
    print(f"  (batched augmentation: {tr.augment})", flush=True)
    b, c = step_rates(tr, args.warmup, args.batches)
    _row(f"(b) {MODEL['backbone']['name']} {SIZE} px B={P * K} step, synthetic tensors", b, "images/s")
    _row("(c) cached pipeline + GPU batch augment + step", c, "images/s")
    _row("(c)/(b) (target >= 0.9)", f"{c / b:.2f}")
    t = time.perf_counter()
    tr.train_epoch(0, Progress("epoch", 1, len(tr.sampler)))
    _sync()
    _row(
        f"one epoch of the trainer ({len(tr.sampler)} batches of {P * K} = {len(tr.sampler) * P * K} images)",
        time.perf_counter() - t,
        "s",
    )


def _eval(args: argparse.Namespace) -> None:
    """Retrieval metrics of ``eval_n``×512 CUDA embeddings: faiss-gpu (where it works) vs torch's GEMM."""
    from harness import evaluate
    from harness.bench.components import _eval_data

    x_np, y_np = _eval_data(args.eval_n, 512, 0)
    x, y = torch.from_numpy(x_np).to(DEVICE), torch.from_numpy(y_np).to(DEVICE)
    problem = evaluate.faiss_gpu_problem(x.device)
    backends: list[evaluate.Backend] = ["torch", "faiss"] if problem is None else ["torch"]
    if problem is not None:
        _row(f"faiss-gpu at {args.eval_n}×512", "n/a", f"({problem})")
    results = {}
    for backend in backends:
        evaluate.retrieval_metrics(x[:2000], y[:2000], nmi=False, backend=backend)  # warm-up
        _sync()
        t = time.perf_counter()
        results[backend] = evaluate.retrieval_metrics(x, y, nmi=False, backend=backend)
        _sync()
        name = "faiss-gpu" if backend == "faiss" else "torch GEMM on the GPU"
        _row(f"retrieval metrics of {args.eval_n}×512, {name}", time.perf_counter() - t, "s")
    if len(results) == 2:
        _row("same metrics from both", str(results["torch"] == results["faiss"]))
