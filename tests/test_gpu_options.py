"""GPU speed options (``train.amp_dtype``, ``train.channels_last``, ``train.compile``), faiss-gpu evaluation
with its torch fallback, and the device check (``harness/bench/gpu_check.sh``). The CPU tests run
everywhere; the ``cuda``-marked ones are skipped, with the reason, without a CUDA GPU (tests/conftest.py)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import config, evaluate
from harness.errors import ConfigError
from harness.evaluate import retrieval_metrics
from harness.learner import Learner
from harness.monitor import Progress

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "name": "tiny",
    "data": {"dataset": {"name": "synthetic", "num_classes": 12, "per_class": 8, "size": 8, "channels": 3}},
    "sampler": {"p": 3, "k": 4, "batches_per_epoch": 3},
    "backbone": {"name": "small_convnet", "width": 4, "input_size": 8},
    "model": {"name": "embedder", "embedding_dim": 8},
    "loss": {"name": "multi_similarity"},
    "train": {"epochs": 1},
    "eval": {"nmi": False},
}


def tiny(**train: object) -> config.RunConfig:
    raw = config.name_default_components(TINY)
    raw["train"] = {**raw["train"], **train}
    return config.validate(raw)


def learner(device: str = "cpu", **train: object) -> Learner:
    torch.manual_seed(0)
    return Learner.build(tiny(**train), num_classes=6, in_channels=3, device=torch.device(device))


def batch(device: str = "cpu", size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(12, 3, size, size, generator=gen)
    return images.to(device), (torch.arange(12) % 3).to(device)


# -- config ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("compile", "fast", "'default' or 'max-autotune'"),
        ("compile", 3, "'default' or 'max-autotune'"),
        ("amp_dtype", "float32", "'float16' or 'bfloat16'"),
    ],
)
def test_bad_speed_options_name_the_path_and_the_allowed_values(
    key: str, value: object, allowed: str
) -> None:
    with pytest.raises(ConfigError) as e:
        tiny(**{key: value})
    assert any(p.startswith(f"train.{key}:") and allowed in p for p in e.value.problems), e.value.problems


def test_compile_takes_yaml_booleans() -> None:
    """``train.compile: on`` (YAML's true) is torch.compile's default mode, ``off`` is eager (issue #31)."""
    assert tiny(compile=True).train.compile == "default"
    assert tiny(compile=False).train.compile is False


def test_speed_options_default_to_todays_behaviour() -> None:
    train = config.RunConfig().train
    assert (train.amp, train.amp_dtype, train.channels_last, train.compile) == (True, "float16", False, False)
    plain = learner()
    assert not plain.amp and plain.amp_dtype == torch.float16 and not plain.grad_scaling  # no AMP on the CPU
    assert not plain.model._forward_pre_hooks and getattr(plain.model, "_compiled_call_impl", None) is None


def test_grad_scaling_only_for_float16_autocast() -> None:
    base = learner()
    assert dataclasses.replace(base, amp=True).grad_scaling
    assert not dataclasses.replace(base, amp=True, amp_dtype=torch.bfloat16).grad_scaling
    assert learner(amp_dtype="bfloat16").amp_dtype == torch.bfloat16


# -- bfloat16 autocast, channels_last, compile on the CPU ------------------------------------------------


@pytest.mark.skipif(
    not torch.amp.autocast_mode.is_autocast_available("cpu"), reason="this torch has no CPU autocast"
)
def test_bfloat16_autocast_step_on_the_cpu_is_finite_and_close_to_float32() -> None:
    """The objective's autocast line with bfloat16 (AMP itself stays off on the CPU; the CUDA test below runs
    it there): the forward runs in bfloat16, the loss gets float32 embeddings, the step is finite."""
    images, labels = batch()
    fp32 = learner()
    bf16 = dataclasses.replace(learner(amp_dtype="bfloat16"), amp=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert bf16.model(images, labels).embeddings.dtype == torch.bfloat16  # autocast is really on
    total, stats = bf16.objective(images, labels)
    reference, _ = fp32.objective(images, labels)
    assert total.dtype == torch.float32 and torch.isfinite(total)
    torch.testing.assert_close(total, reference, rtol=0.05, atol=0.05)
    bf16.optimizer.zero_grad()
    total.backward()
    bf16.optimizer.step()
    assert all(torch.isfinite(p).all() for p in bf16.model.parameters())
    assert np.isfinite(list(stats.values())).all()


def assert_same_embeddings(
    reference: Learner, other: Learner, images: torch.Tensor, labels: torch.Tensor, atol: float, rtol: float
) -> None:
    """``other``'s model gives ``reference``'s embeddings in train and in eval mode."""
    for mode in (True, False):
        reference.model.train(mode)
        other.model.train(mode)
        torch.testing.assert_close(
            other.model(images, labels).embeddings,
            reference.model(images, labels).embeddings,
            rtol=rtol,
            atol=atol,
        )


def test_channels_last_on_the_cpu_equals_contiguous() -> None:
    images, labels = batch()
    plain, nhwc = learner(), learner(channels_last=True)
    assert plain.model.state_dict().keys() == nhwc.model.state_dict().keys()
    conv = next(p for p in nhwc.model.parameters() if p.ndim == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    seen: list[bool] = []
    first = next(m for m in nhwc.model.modules() if isinstance(m, torch.nn.Conv2d))
    first.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last))
    )
    assert_same_embeddings(plain, nhwc, images, labels, atol=1e-5, rtol=1e-5)
    assert seen and all(seen)  # the input batches reach the convolutions in channels_last
    a, _ = plain.objective(images, labels)
    b, _ = nhwc.objective(images, labels)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compile_is_lazy_and_keeps_the_module() -> None:
    """``train.compile`` compiles in place at the first forward: building (as ``check_assembly`` does on the
    CPU for every config) costs nothing, and names, checkpoints and isinstance checks are unchanged."""
    start = time.perf_counter()
    compiled = learner(compile="max-autotune")
    assert time.perf_counter() - start < 10
    assert compiled.model._compiled_call_impl is not None
    assert type(compiled.model) is type(learner().model)
    assert compiled.model.state_dict().keys() == learner().model.state_dict().keys()


@pytest.mark.slow
def test_compiled_model_matches_eager_on_the_cpu() -> None:
    """torch.compile works on the CPU (inductor's C++ backend; ~30 s for this tiny model on 2 cores)."""
    images, labels = batch()
    eager, compiled = learner(), learner(compile="default")
    assert_same_embeddings(eager, compiled, images, labels, atol=1e-5, rtol=1e-4)


# -- faiss-gpu and its fallback ---------------------------------------------------------------------------


@pytest.fixture
def fresh_note() -> None:
    evaluate._note_no_faiss_gpu.cache_clear()


def test_without_faiss_gpu_cuda_embeddings_use_torch_and_say_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fresh_note: None
) -> None:
    monkeypatch.setattr(evaluate, "_probe_faiss_gpu", lambda index: "faiss has no GPU support (test)")
    cuda = torch.device("cuda", 0)
    with caplog.at_level(logging.INFO, logger="harness.evaluate"):
        assert [evaluate._resolve_backend("auto", cuda, work=10**9, dim=512) for _ in range(3)] == [
            "torch"
        ] * 3
        assert evaluate._resolve_backend("torch", cuda) == "torch"
    lines = [r.getMessage() for r in caplog.records if r.name == "harness.evaluate"]
    assert lines == [
        "evaluation: faiss has no GPU support (test); "
        "CUDA embeddings are searched with torch's GEMM + top-k on the GPU"
    ]
    assert evaluate._resolve_backend("faiss", cuda) == "faiss-cpu"  # asked for faiss: faiss, on the CPU


def test_with_faiss_gpu_cuda_embeddings_use_it(monkeypatch: pytest.MonkeyPatch, fresh_note: None) -> None:
    monkeypatch.setattr(evaluate, "_probe_faiss_gpu", lambda index: None)
    for backend in ("auto", "faiss"):
        assert evaluate._resolve_backend(backend, torch.device("cuda", 0)) == "faiss-gpu"
    assert evaluate._resolve_backend("torch", torch.device("cuda", 0)) == "torch"
    assert evaluate._resolve_backend("faiss", torch.device("cpu")) == "faiss-cpu"  # the CPU is unchanged


def test_the_probe_is_asked_once_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    probe = evaluate.functools.cache(lambda index: calls.append(index) or "no GPU part (test)")
    monkeypatch.setattr(evaluate, "_probe_faiss_gpu", probe)
    for index in (0, 1, 0, 1, 0):
        assert evaluate.faiss_gpu_problem(torch.device("cuda", index)) == "no GPU part (test)"
    assert calls == [0, 1]


# -- the device check on a machine without a GPU ------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU message is for CPU-only machines")
def test_gpu_check_says_no_gpu_present_and_exits_0() -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    start = time.perf_counter()
    done = subprocess.run(
        ["bash", str(ROOT / "harness" / "bench" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "no GPU present" in done.stdout
    assert time.perf_counter() - start < 60


# -- on a CUDA GPU ----------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_amp_training_steps_are_finite_on_cuda(dtype: str) -> None:
    lrn = learner("cuda", amp_dtype=dtype)
    assert lrn.amp and lrn.amp_dtype == getattr(torch, dtype) and lrn.grad_scaling == (dtype == "float16")
    scaler = torch.amp.GradScaler("cuda", enabled=lrn.grad_scaling)
    images, labels = batch("cuda", size=32)
    seen: list[torch.dtype] = []
    conv = next(m for m in lrn.model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    for _ in range(5):
        total, stats = lrn.objective(images, labels)
        assert total.dtype == torch.float32 and torch.isfinite(total), stats
        lrn.optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(lrn.optimizer)
        scaler.update()
    assert set(seen) == {getattr(torch, dtype)}
    assert all(torch.isfinite(p).all() for p in lrn.model.parameters())


@pytest.fixture
def no_tf32(monkeypatch: pytest.MonkeyPatch) -> None:
    """Full float32 convolutions and matmuls: layouts and kernels then agree to float32 rounding."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.mark.cuda
def test_channels_last_equals_contiguous_on_cuda(no_tf32: None) -> None:
    images, labels = batch("cuda", size=32)
    plain, nhwc = learner("cuda", amp=False), learner("cuda", amp=False, channels_last=True)
    assert_same_embeddings(plain, nhwc, images, labels, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_compiled_model_matches_eager_on_cuda(no_tf32: None) -> None:
    images, labels = batch("cuda", size=32)
    eager, compiled = learner("cuda", amp=False), learner("cuda", amp=False, compile="default")
    assert_same_embeddings(eager, compiled, images, labels, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_faiss_gpu_and_torch_search_give_the_same_metrics(distance: str) -> None:
    problem = evaluate.faiss_gpu_problem(torch.device("cuda", torch.cuda.current_device()))
    if problem is not None:
        pytest.skip(f"faiss cannot search on this GPU: {problem}")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5000, 64, generator=gen).cuda()
    y = (torch.arange(5000) % 100).cuda()
    assert evaluate._resolve_backend("faiss", x.device) == "faiss-gpu"
    faiss_gpu = retrieval_metrics(x, y, distance=distance, backend="faiss", nmi=True)
    gemm = retrieval_metrics(x, y, distance=distance, backend="torch", nmi=True)
    assert faiss_gpu == gemm


@pytest.mark.cuda
def test_training_step_never_synchronises_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.cuda.set_sync_debug_mode("error")`` over 50 steps of the trainer's epoch loop on batches
    already on the device: any host read (``.item()``, a Python branch on a tensor) raises, except the
    statistics' interval reads (``StepStats.read``, by design). bfloat16 autocast: float16's GradScaler
    reads its inf flag every step."""
    from harness.monitor import StepStats
    from harness.train import _Trainer

    raw = config.name_default_components(TINY)
    raw["train"] = {**raw["train"], "device": "cuda", "amp_dtype": "bfloat16"}
    real_read = StepStats.read

    def read(self: StepStats) -> dict[str, float]:
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            return real_read(self)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    monkeypatch.setattr(StepStats, "read", read)
    raw["sampler"]["batches_per_epoch"] = 50
    tr = _Trainer(config.validate(raw))
    batches = [(x.cuda(), torch.as_tensor(y).cuda()) for x, y in tr.loader]
    tr.loader = batches
    tr.train_epoch(0, Progress("warm-up", 1, len(batches)))  # allocations and cuDNN autotuning first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tr.train_epoch(1, Progress("sync", 2, len(batches)))
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_the_check_sections_run_on_the_cpu_with_a_small_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The sections `gpu_check.sh` runs on a GPU, on the CPU with a small model, small images and no compile
    (its row is the CUDA test's and the slow CPU test's): every code path of the check runs here first."""
    from harness.bench import gpu

    monkeypatch.setattr(gpu, "DEVICE", torch.device("cpu"))
    small = {
        "backbone": {"name": "small_convnet", "width": 4, "input_size": 16},
        "model": {"name": "embedder"},
    }
    monkeypatch.setattr(gpu, "MODEL", small)
    monkeypatch.setattr(gpu, "P", 4)
    monkeypatch.setattr(gpu, "K", 2)
    monkeypatch.setattr(gpu, "SIZE", 16)
    monkeypatch.setattr(gpu, "JPEG_SIZE", (40, 30))
    monkeypatch.setattr(gpu, "VARIANTS", [v for v in gpu.VARIANTS if "compile" not in v[1]])
    args = argparse.Namespace(images=400, eval_n=2000, batches=2, warmup=1, workdir=str(tmp_path))
    for section in ("steps", "pipeline", "eval"):
        gpu.run_section(section, args)
    out = capsys.readouterr().out
    assert "FAILED" not in out
    for row in (
        "float32 (train.amp: false)",
        "bfloat16 AMP + channels_last",
        "(c)/(b)",
        "one epoch of the trainer",
    ):
        assert row in out
    assert "faiss-gpu at 2000×512" in out and "torch GEMM on the GPU" in out


def test_a_section_that_fails_or_hangs_does_not_stop_the_check(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from harness.bench import gpu

    start = time.perf_counter()
    hang = [
        sys.executable,
        "-c",
        "import subprocess, sys, time; subprocess.Popen(['sleep', '60']); time.sleep(60)",
    ]
    assert gpu._run_section("hangs", hang, 1.0, ROOT) == "timed out after 1 s"
    assert gpu._run_section("fails", [sys.executable, "-c", "raise SystemExit(3)"], 30, ROOT) == "exit 3"
    assert gpu._run_section("passes", [sys.executable, "-c", "print('fine')"], 30, ROOT) == "ok"
    assert time.perf_counter() - start < 20  # the hanging one (and its child) were killed at its limit

    ran: list[tuple[str, float]] = []
    outcomes = {"tests": "ok", "steps": "exit 1", "pipeline": "ok", "eval": "ok"}
    monkeypatch.setattr(
        gpu, "_run_section", lambda name, cmd, limit, cwd: ran.append((name, limit)) or outcomes[name]
    )
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    args = argparse.Namespace(images=6000, eval_n=60000, batches=30, warmup=3, budget=gpu.BUDGET_S)
    assert gpu.run_all(args) == 1
    assert [name for name, _ in ran] == ["tests", "steps", "pipeline", "eval"]  # on after the failed one
    assert sum(gpu.SECTION_LIMITS.values()) <= gpu.BUDGET_S < 8 * 60
    out = capsys.readouterr().out
    assert "FAILED: steps (exit 1)" in out and gpu.TODO_WORKERS in out
