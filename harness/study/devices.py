"""Which device each worker process of a study holds: one worker per visible GPU by default, ``--gpus`` to
pick devices, ``--trials-per-gpu`` to pack small trials, ``--gpus-per-trial`` to give a trial several GPUs.

A worker is pinned by its own ``CUDA_VISIBLE_DEVICES``, set in the environment its process starts with, so
CUDA never sees another device in it (PyTorch's ``cuda`` is then the worker's device). Device ids are kept
as the user's environment names them (indices, or GPU UUIDs under Slurm and MIG), so ``--gpus 1,3`` on a
machine whose ``CUDA_VISIBLE_DEVICES`` is ``4,5,6,7`` pins workers to 5 and 7, as PyTorch would number them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from harness.errors import ConfigError

log = logging.getLogger(__name__)

ENV = "CUDA_VISIBLE_DEVICES"


@dataclass(frozen=True)
class Slot:
    """One worker process: its number and the GPU ids it sees (empty: a CPU worker, not pinned)."""

    index: int
    gpus: tuple[str, ...] = ()

    @property
    def env(self) -> dict[str, str]:
        """The environment variables its process starts with."""
        return {ENV: ",".join(self.gpus)} if self.gpus else {}

    def describe(self) -> str:
        return f"GPU {','.join(self.gpus)} ({ENV}={','.join(self.gpus)})" if self.gpus else "the CPU"


def visible_gpus() -> list[str]:
    """The GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` where set (Slurm, a user's choice),
    else every GPU PyTorch counts. The main process of a study never trains, so counting here is harmless."""
    value = os.environ.get(ENV)
    if value is not None:
        ids = [v.strip() for v in value.split(",")]
        # CUDA stops at the first invalid id ("-1", ""): so do we
        out = []
        for v in ids:
            if not v or v.startswith("-"):
                break
            out.append(v)
        return out
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def parse_gpus(text: str | None) -> list[int] | None:
    """``--gpus 0,2,5`` as indices (None: every visible GPU)."""
    if text is None:
        return None
    try:
        picked = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise ConfigError(f"--gpus takes comma-separated device indices such as 0,2,5 (got {text!r})") from e
    if not picked or any(i < 0 for i in picked) or len(set(picked)) != len(picked):
        raise ConfigError(f"--gpus takes distinct device indices >= 0 such as 0,2,5 (got {text!r})")
    return picked


def plan_workers(
    workers: int | str = "auto",
    gpus: list[int] | None = None,
    trials_per_gpu: int = 1,
    gpus_per_trial: int = 1,
    visible: list[str] | None = None,
) -> list[Slot]:
    """The worker processes of a study on this machine.

    Without a GPU: ``workers`` CPU workers (``auto``: 1, as before GPUs were placed). With GPUs: the devices
    (all visible ones, or the ``gpus`` indices among them) are cut into groups of ``gpus_per_trial``; ``auto``
    gives each group ``trials_per_gpu`` workers; a number of workers is dealt over the groups in turn."""
    if trials_per_gpu < 1 or gpus_per_trial < 1:
        raise ConfigError(
            f"--trials-per-gpu and --gpus-per-trial must be >= 1 (got {trials_per_gpu}, {gpus_per_trial})"
        )
    if workers != "auto" and (not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"--workers must be 'auto' or a number >= 1 (got {workers!r})")
    visible = visible_gpus() if visible is None else visible
    if gpus is not None:
        bad = [i for i in gpus if i >= len(visible)]
        if bad:
            raise ConfigError(
                f"--gpus {','.join(map(str, gpus))}: no device {', '.join(map(str, bad))}; this machine "
                f"shows {len(visible)} GPU(s)" + (f" ({ENV}={','.join(visible)})" if visible else "")
            )
        visible = [visible[i] for i in gpus]
    if not visible:
        if trials_per_gpu > 1 or gpus_per_trial > 1:
            raise ConfigError("--trials-per-gpu / --gpus-per-trial: no GPU is visible on this machine")
        return [Slot(i) for i in range(1 if workers == "auto" else int(workers))]
    if gpus_per_trial > len(visible):
        raise ConfigError(f"--gpus-per-trial {gpus_per_trial}: only {len(visible)} GPU(s) to use")
    groups = [tuple(visible[i : i + gpus_per_trial]) for i in range(0, len(visible), gpus_per_trial)]
    if len(groups[-1]) < gpus_per_trial:
        log.warning(
            "--gpus-per-trial %d: GPU %s left idle (%d GPUs do not split into groups of %d)",
            gpus_per_trial,
            ",".join(groups[-1]),
            len(visible),
            gpus_per_trial,
        )
        groups.pop()
    count = len(groups) * trials_per_gpu if workers == "auto" else int(workers)
    if count > len(groups) * trials_per_gpu:
        log.warning(
            "%d workers on %d GPU group(s): up to %d trials share a device (--trials-per-gpu %d)",
            count,
            len(groups),
            -(-count // len(groups)),
            trials_per_gpu,
        )
    return [Slot(i, groups[i % len(groups)]) for i in range(count)]


def trial_device(choice: str, world_size: int = 1) -> str:
    """Where a run with ``train.device: choice`` trains in this worker, as the store records it: ``cpu``, or
    ``cuda:`` and the GPU ids (this machine's numbering) of its ``world_size`` ranks."""
    import torch

    if choice == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return "cuda:" + ",".join(visible_gpus()[:world_size])
