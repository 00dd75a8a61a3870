"""One training run across several processes (DDP): ``train.distributed.world_size`` ranks, one per GPU
(or all on the CPU with gloo), with global-batch semantics.

Every rank draws the same seeded global batches and keeps its contiguous shard (``ShardedBatches``); after
the model's forward the embeddings, ABE's parts and the labels are gathered in rank order (``Dist.
global_batch``), so the loss, miner, synthesis, MDR and ABE's divergence see exactly the single-process
batch. The gradient arithmetic: every rank computes the same global loss L; the gather's backward sums the
incoming gradient over ranks (W · ∂L/∂e_local) and ``average_gradients`` divides every parameter's
gradient by W, so a backbone gets Σ_r J_rᵀ ∂L/∂e_r = ∂L/∂θ, the replicated loss / regularizer parameters
(proxies, MDR levels) the mean of W equal gradients (= ∂L/∂φ), and an aux loss the model averages over its
local shard (ABE's divergence) the mean over ranks of the local means = the global mean (equal shards).

Evaluation: each rank embeds a contiguous shard of the split, the shards are gathered in order and rank 0
computes the metrics, which every rank receives (``Dist.on_main``); rank 0 also calls the pruner's reporter
and broadcasts its decision (``Dist.report``), so every rank takes the same path and none waits forever.

Two ways to start: ``launch`` spawns the ranks from one process (``dmlh run ... train.distributed.
world_size=2``; the caller gets rank 0's return value, the reporter runs in the caller), or the ranks are
started by ``torchrun`` (``from_env``). A rank that fails ends the whole run with one line naming it
(``TrainingError``); the process-group timeout bounds every collective.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib
import logging
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from harness import logs
from harness.errors import ConfigError, HarnessError, TrainingError
from harness.types import ModelOutput

if TYPE_CHECKING:
    from harness.config import RunConfig, SamplerSection

log = logging.getLogger(__name__)

#: ``module:function`` called in every spawned rank before it starts (tests: make a rank die, switch off
#: augmentation); never set outside tests.
HOOK_ENV = "DMLH_DISTRIBUTED_HOOK"
#: Seconds a parent waits for its ranks to exit after the run ended, before it terminates them.
EXIT_GRACE_S = 30.0
#: Seconds a parent collects further failures after the first, to name the rank that failed first.
FAILURE_GRACE_S = 2.0


class Stopped(Exception):
    """Rank 0's reporter stopped the run (a pruned trial); every rank leaves its loop."""


# -- the global batch ---------------------------------------------------------------------------------------


def global_batch_size(section: SamplerSection) -> int:
    """Images in one global batch of ``sampler``."""
    if section.kind == "triplets":
        return 3 * section.triplets
    per = (
        section.p * section.k
        if section.kind == "pk"
        else 2 * (section.positive_pairs + section.negative_pairs)
    )
    return per * section.repeated_augmentations


def batch_problems(section: SamplerSection, world_size: int) -> list[str]:
    """The global batch must split into ``world_size`` equal contiguous shards."""
    size = global_batch_size(section)
    if world_size <= 1 or size % world_size == 0:
        return []
    return [
        f"train.distributed.world_size: {world_size} ranks cannot share the global batch of {size} images "
        f"(sampler.kind {section.kind}) equally; pick a batch divisible by {world_size}"
    ]


class ShardedBatches:
    """Rank ``rank``'s contiguous shard of every batch of the (same, seeded) global ``sampler``."""

    def __init__(self, sampler: Any, rank: int, world_size: int):
        self.sampler, self.rank, self.world_size = sampler, rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.sampler:
            n = len(batch) // self.world_size
            if n * self.world_size != len(batch):
                raise TrainingError(
                    f"a batch of {len(batch)} images does not split over {self.world_size} ranks"
                )
            yield list(batch[self.rank * n : (self.rank + 1) * n])


class _Gather(torch.autograd.Function):
    """All ranks' equal-sized ``x`` concatenated in rank order; backward: the incoming gradient summed over
    ranks (each rank's loss contributes), then this rank's rows (gloo has no reduce_scatter)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        ctx.rank, ctx.rows = rank, x.shape[0]
        out = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None, None


def batch_gather(x: torch.Tensor) -> torch.Tensor:
    """Inside a model's training forward: the global batch of this rank's shard ``x`` (differentiable, rank
    order), for a statistic of the whole batch (MDR's mean-distance scale); ``x`` itself in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _Gather.apply(x, dist.get_rank(), dist.get_world_size())


@dataclass
class Dist:
    """This process's place in a run: rank, world size, local device index. ``SINGLE``: one process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: rank 0 of a spawned run: the pipe to the parent (its reporter runs there)
    parent: Any = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def place(self, device: torch.device) -> torch.device:
        """This rank's device: ``cuda:<local rank>`` of the visible GPUs, or the CPU."""
        if not self.active or device.type != "cuda":
            return device
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable gather of every rank's ``x`` in rank order (as is in one process)."""
        return _Gather.apply(x, self.rank, self.world_size) if self.active else x

    def global_batch(self, out: ModelOutput, labels: torch.Tensor) -> tuple[ModelOutput, torch.Tensor]:
        """The model's output of the local shard → the output of the global batch: embeddings, parts and
        labels gathered; aux losses keep their local gradient but take the value averaged over ranks (the
        global per-image mean), as do the model's tensor statistics."""
        if not self.active:
            return out, labels
        parts = None
        if out.parts is not None:
            parts = list(self.gather(torch.stack(out.parts, dim=1)).unbind(1))
        labels = self.gather(labels)
        aux, stats = self._mean_over_ranks(out.aux_losses, out.stats)
        return replace(
            out, embeddings=self.gather(out.embeddings), parts=parts, aux_losses=aux, stats=stats
        ), labels

    def _mean_over_ranks(
        self, aux: dict[str, torch.Tensor], stats: dict[str, float | torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, float | torch.Tensor]]:
        keys = list(aux) + list(stats)
        if not keys:
            return aux, stats
        device = next(iter(aux.values())).device if aux else None
        for v in stats.values():
            device = v.device if device is None and isinstance(v, torch.Tensor) else device
        values = [aux[k].detach() for k in aux] + [
            v.detach() if isinstance(v, torch.Tensor) else torch.tensor(float(v)) for v in stats.values()
        ]
        flat = torch.stack([v.reshape(()).to(device=device, dtype=torch.float64) for v in values])
        dist.all_reduce(flat)
        flat = flat / self.world_size
        mean = dict(zip(keys, flat.unbind(), strict=True))
        new_aux = {k: v + (mean[k].to(v.dtype) - v.detach()) for k, v in aux.items()}
        return new_aux, {k: mean[k] for k in stats}

    def average_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """Average every gradient over ranks in one flat all-reduce (what DDP does, after the backward)."""
        if not self.active:
            return
        grads = [p.grad for p in params if p.grad is not None]
        for group in _by_device_dtype(grads):
            flat = torch.cat([g.reshape(-1) for g in group])
            dist.all_reduce(flat)
            flat /= self.world_size
            offset = 0
            for g in group:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def broadcast_modules(self, *modules: nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank (replicas start equal even if an init differs)."""
        if not self.active:
            return
        with torch.no_grad():
            for module in modules:
                for t in [*module.parameters(), *module.buffers()]:
                    _broadcast(t.data)

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank, before evaluating: the same model
        embeds every shard even where BatchNorm could not be synchronised (the CPU)."""
        if not self.active:
            return
        with torch.no_grad():
            for t in module.buffers():
                _broadcast(t)

    def on_main(self, compute: Callable[[], Any]) -> Any:
        """``compute()`` on rank 0, its result on every rank."""
        if not self.active:
            return compute()
        box = [compute() if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def report(
        self, reporter: Callable[[int, dict[str, float]], None] | None, epoch: int, val: dict[str, float]
    ) -> None:
        """Rank 0 calls ``reporter`` (the pruner); its decision reaches every rank: if it raised, every rank
        raises it (or ``Stopped`` where the exception does not pickle)."""
        if not self.active:
            if reporter is not None:
                reporter(epoch, val)
            return
        error: BaseException | None = None
        if self.is_main and reporter is not None:
            try:
                reporter(epoch, val)
            except BaseException as e:  # noqa: BLE001 - the decision every rank must follow
                error = e
        decision = [_picklable(error) if self.is_main else None]
        dist.broadcast_object_list(decision, src=0)
        if error is not None:
            raise error
        if decision[0] is not None:
            raise decision[0]

    def threads(self, wanted: int | None) -> int | None:
        """This rank's share of ``wanted`` CPU threads (None: leave as is)."""
        return wanted if wanted is None or not self.active else max(1, wanted // self.world_size)

    @torch.no_grad()
    def embed(
        self,
        embed_fn: Callable[[torch.utils.data.Dataset], tuple[torch.Tensor, torch.Tensor]],
        dataset: torch.utils.data.Dataset,
        batch_size: int,
        dim: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and labels of a whole split, in order: each rank embeds a contiguous shard (whole
        evaluation batches where there are enough, so each batch is the single-process one), the shards are
        gathered (padded to equal size) and every rank gets them all."""
        if not self.active:
            return embed_fn(dataset)
        n = len(dataset)  # type: ignore[arg-type]
        lo, hi = eval_shard(n, batch_size, self.rank, self.world_size)
        if hi > lo:
            emb, labels = embed_fn(torch.utils.data.Subset(dataset, range(lo, hi)))
        else:
            emb, labels = torch.zeros(0, dim), torch.zeros(0, dtype=torch.long)
        device = (
            torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
        )
        width = max(
            hi - lo
            for lo, hi in (eval_shard(n, batch_size, r, self.world_size) for r in range(self.world_size))
        )
        out = []
        for t in (emb.float(), labels.long()):
            padded = torch.zeros((width, *t.shape[1:]), dtype=t.dtype, device=device)
            padded[: len(t)] = t.to(device)
            got = [torch.empty_like(padded) for _ in range(self.world_size)]
            dist.all_gather(got, padded)
            shards = (eval_shard(n, batch_size, r, self.world_size) for r in range(self.world_size))
            out.append(torch.cat([g[: h - lo_] for g, (lo_, h) in zip(got, shards, strict=True)]).cpu())
        return out[0], out[1]


SINGLE = Dist()


def _broadcast(t: torch.Tensor) -> None:
    """Rank 0's values of ``t`` in place (a bool tensor travels as bytes: not every backend takes bool)."""
    if t.dtype == torch.bool:
        data = t.to(torch.uint8)
        dist.broadcast(data, 0)
        t.copy_(data.bool())
    else:
        dist.broadcast(t, 0)


def eval_shard(n: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s ``[lo, hi)`` of ``n`` items: whole batches of ``batch_size`` shared out as evenly as
    they go when every rank gets one, else items shared out evenly."""
    batches = math.ceil(n / batch_size)
    if batches >= world_size:
        bounds = np.linspace(0, batches, world_size + 1).round().astype(int) * batch_size
    else:
        bounds = np.linspace(0, n, world_size + 1).round().astype(int)
    return int(min(bounds[rank], n)), int(min(bounds[rank + 1], n))


def _by_device_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return list(groups.values())


def _picklable(error: BaseException | None) -> BaseException | None:
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001
        return Stopped(f"{type(error).__name__}: {error}")
    return error


def sync_batchnorm(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """BatchNorm layers as SyncBatchNorm (global-batch statistics) on CUDA. PyTorch's SyncBatchNorm runs on
    GPUs only: on the CPU each rank's BatchNorm layers in training mode normalise with its own shard's
    statistics (said in a log line; ``frozen_bn`` backbones are exact)."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    frozen = bool(getattr(getattr(model, "backbone", None), "frozen_bn", False))
    if world_size <= 1 or not has_bn or (frozen and device.type != "cuda"):
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    log.warning(
        "train.distributed on the CPU: PyTorch's SyncBatchNorm needs a GPU, so BatchNorm layers in training "
        "mode use each rank's own shard statistics (not the global batch's); use frozen_bn for exact equality"
    )
    return model


# -- starting the ranks ------------------------------------------------------------------------------------


def resolve_backend(backend: str, device: str) -> str:
    """``auto``: nccl when the run trains on CUDA, else gloo."""
    if backend != "auto":
        return backend
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return "nccl" if cuda else "gloo"


def from_env() -> bool:
    """Started by torchrun (or another launcher that sets RANK, WORLD_SIZE and MASTER_ADDR)?"""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def env_rank() -> int:
    """This process's rank under a launcher (0 without one)."""
    return int(os.environ.get("RANK", "0"))


@contextlib.contextmanager
def env_process_group(cfg: RunConfig) -> Iterator[Dist]:
    """The process group of a launcher-started rank (torchrun), torn down on the way out."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if world != cfg.train.distributed.world_size and rank == 0:
        log.info(
            "launcher world size %d overrides train.distributed.world_size %d",
            world,
            cfg.train.distributed.world_size,
        )
    problems = batch_problems(cfg.sampler, world)
    if problems:
        raise ConfigError(problems)
    backend = resolve_backend(cfg.train.distributed.backend, cfg.train.device)
    if backend == "nccl":
        torch.cuda.set_device(local)
    timeout = datetime.timedelta(seconds=cfg.train.distributed.timeout_s)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    if rank != 0:
        _quiet()
    try:
        yield Dist(rank, world, local)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _quiet() -> None:
    """Ranks other than 0 log warnings of their own only and show no progress bars."""
    logging.getLogger("harness").setLevel(logging.ERROR)
    os.environ["TQDM_DISABLE"] = "1"


@dataclass
class _Spec:
    rank: int
    world_size: int
    port: int
    backend: str
    timeout_s: float
    threads: int
    log_level: int


def _watch_parent(parent_pid: int) -> None:
    """End this rank when the process that spawned it is gone (no orphans keep a GPU)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(3)


def _rank_main(
    spec: _Spec, fn: Callable[..., Any], args: tuple[Any, ...], conn: Any, parent_pid: int
) -> None:
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    repeats = logs.setup(spec.log_level)  # as the parent's: faiss's loader and others quiet
    torch.set_num_threads(max(1, spec.threads // spec.world_size))
    if spec.rank != 0:
        _quiet()
    try:
        hook = os.environ.get(HOOK_ENV)
        if hook:
            module, name = hook.split(":")
            getattr(importlib.import_module(module), name)(spec.rank)
        if spec.backend == "nccl":
            torch.cuda.set_device(spec.rank)
        dist.init_process_group(
            spec.backend,
            init_method=f"tcp://127.0.0.1:{spec.port}",
            rank=spec.rank,
            world_size=spec.world_size,
            timeout=datetime.timedelta(seconds=spec.timeout_s),
        )
        ctx = Dist(spec.rank, spec.world_size, spec.rank, parent=conn if spec.rank == 0 else None)
        result = fn(ctx, *args)
        conn.send(("result", pickle.dumps(_to_cpu(result)) if spec.rank == 0 else None, None))
    except Stopped:
        conn.send(("stopped", None, None))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which ends the run
        with contextlib.suppress(Exception):
            conn.send(("error", f"{type(e).__name__}: {_one_line(e)}", _picklable_harness_error(e)))
        os._exit(1)
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    repeats.summary()
    conn.close()


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:500] + ("…" if len(text) > 500 else "")


def _picklable_harness_error(e: BaseException) -> bytes | None:
    if not isinstance(e, HarnessError):
        return None
    try:
        return pickle.dumps(e)
    except Exception:  # noqa: BLE001
        return None


def _to_cpu(obj: Any) -> Any:
    """Tensors anywhere in ``obj`` (a RunResult's checkpoint) moved to the CPU, for the pipe."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return replace(
            obj, **{f.name: _to_cpu(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
        )
    return obj


def ask_parent(ctx: Dist, epoch: int, val: dict[str, float]) -> None:
    """The reporter of a spawned rank 0: the parent calls the real one; raises ``Stopped`` if it raised."""
    ctx.parent.send(("report", (epoch, val), None))
    if ctx.parent.recv() != "ok":
        raise Stopped(f"the reporter stopped the run at epoch {epoch}")


#: messages of peers that lost a rank: the rank that failed first is named instead
_PEER_LOST = ("connection closed", "connection reset", "broken pipe", "timed out", "timeout", "peer", "nccl")


def launch(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    world_size: int,
    backend: str = "gloo",
    timeout_s: float = 1800.0,
    reporter: Callable[[int, dict[str, float]], None] | None = None,
) -> Any:
    """Run ``fn(Dist, *args)`` in ``world_size`` spawned ranks and return rank 0's result. Rank 0's
    ``ask_parent`` calls ``reporter`` here; if the reporter raises, every rank stops and its exception is
    raised here. A rank that fails (an exception, killed) ends the run: every rank is ended and a one-line
    ``TrainingError`` names the rank that failed first (a ``HarnessError`` of a rank is raised as is)."""
    if mp.current_process().daemon:
        raise TrainingError(
            "train.distributed: a daemonic process cannot spawn ranks; run the trial in a normal process"
        )
    ctx = mp.get_context("spawn")
    port = free_port()
    procs, conns = [], []
    spec = dict(
        world_size=world_size,
        port=port,
        backend=backend,
        timeout_s=timeout_s,
        threads=torch.get_num_threads(),
        log_level=logging.getLogger().getEffectiveLevel(),
    )
    # a spawned child re-enters the parent's default start method: a loky worker (a study worker) names
    # 'loky', which a fresh interpreter does not know, so the ranks start under 'spawn'
    default = mp.get_start_method(allow_none=True)
    foreign = default not in (None, "spawn", "fork", "forkserver")
    if foreign:
        mp.set_start_method("spawn", force=True)
    try:
        for rank in range(world_size):
            here, there = ctx.Pipe()
            p = ctx.Process(
                target=_rank_main,
                args=(_Spec(rank=rank, **spec), fn, args, there, os.getpid()),  # type: ignore[arg-type]
                name=f"dmlh-rank{rank}",
            )
            p.start()
            there.close()
            procs.append(p)
            conns.append(here)
        if foreign:
            mp.set_start_method(default, force=True)
            foreign = False
        return _supervise(procs, conns, reporter)
    finally:
        if foreign:
            mp.set_start_method(default, force=True)
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)


def _supervise(
    procs: list[Any], conns: list[Any], reporter: Callable[[int, dict[str, float]], None] | None
) -> Any:
    """Serve rank 0's reports until every rank has said it is done; on the first failure collect the others
    for a moment, then raise the one that names the rank that failed first."""
    result: Any = None
    stopped_by: BaseException | None = None
    done: set[int] = set()
    closed: set[int] = set()  # ranks whose pipe reached its end
    failures: list[tuple[int, str, bytes | None]] = []  # rank, message, pickled HarnessError
    first_failure: float | None = None
    while len(done) < len(procs):
        if first_failure is not None and time.monotonic() > first_failure + FAILURE_GRACE_S:
            break
        waiting = [c for r, c in enumerate(conns) if r not in done and r not in closed]
        waiting += [p.sentinel for r, p in enumerate(procs) if r not in done]
        timeout = None if first_failure is None else FAILURE_GRACE_S / 4
        for obj in multiprocessing.connection.wait(waiting, timeout=timeout):
            rank = next(r for r in range(len(procs)) if obj is conns[r] or obj == procs[r].sentinel)
            if rank in done:
                continue
            if obj is not conns[rank]:  # the process ended: anything it sent is read first
                if rank not in closed and conns[rank].poll():
                    continue
                procs[rank].join(1)
                code = procs[rank].exitcode
                done.add(rank)
                failures.append((rank, f"died ({_exit_reason(code)})", None))
                first_failure = first_failure or time.monotonic()
                continue
            try:
                kind, payload, extra = obj.recv()
            except (EOFError, OSError):
                closed.add(rank)  # its sentinel says how it ended
                continue
            if kind == "report":
                try:
                    if reporter is not None:
                        reporter(*payload)
                    obj.send("ok")
                except BaseException as e:  # noqa: BLE001 - the ranks stop, then it is raised here
                    stopped_by = e
                    obj.send("stop")
                continue
            done.add(rank)
            if kind == "result" and rank == 0:
                result = pickle.loads(payload)
            elif kind == "error":
                failures.append((rank, payload, extra))
                first_failure = first_failure or time.monotonic()
    if failures:
        # a rank whose peer failed reports a lost connection / timeout: name the one that failed first
        failures.sort(key=lambda f: any(s in f[1].lower() for s in _PEER_LOST))
        rank, message, pickled = failures[0]
        if pickled is not None and stopped_by is None:
            raise pickle.loads(pickled)
        if stopped_by is None:
            raise TrainingError(f"train.distributed: rank {rank} failed: {message}")
    if stopped_by is not None:
        raise stopped_by
    for p in procs:  # they are tearing down their process group
        p.join(EXIT_GRACE_S)
    return result


def _exit_reason(code: int) -> str:
    if code < 0:
        import signal

        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"
