"""What a long run tells its log: progress lines without a terminal, per-epoch speed, collapse warnings.

tqdm turns itself off when stderr is not a terminal (a batch job, ``nohup``, ``> log``), so a run also
logs through ``logging``: one line per epoch, and one every ``PROGRESS_EVERY_S`` seconds within an epoch
when no bar is showing. ``CollapseCheck`` reads each epoch's embedding statistics (``embedding_stats`` of
the training batches) and warns when the embedding has collapsed: every image mapped to (nearly) the
same point, which a margin loss then reports as a loss pinned at its margin.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from harness.errors import NonFiniteLossError

log = logging.getLogger(__name__)

#: Seconds between two progress lines within one epoch when no progress bar is showing.
PROGRESS_EVERY_S = 300.0
#: An epoch counts as collapsed when the mean distance between different-class embeddings of its training
#: batches is below this fraction of the mean embedding norm (healthy runs: 0.3-1.4; the collapsed
#: batch-hard triplet run of issue #15: 0.010).
COLLAPSE_SPREAD = 0.05
#: Mean embedding norm below which the embeddings count as all zero.
ZERO_NORM = 1e-6
#: A metric loss within this fraction of ``loss.margin`` counts as pinned at the margin.
MARGIN_TOLERANCE = 0.05
#: Training steps between two reads of the loss statistics (and the NaN check) from the device.
READ_EVERY = 25


def embedding_stats(embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean Euclidean distance of same-class pairs (``embed/pos_dist``, NaN without any) and of
    different-class pairs (``embed/neg_dist``) in a batch, and the mean embedding norm (``embed/norm``):
    the quantities that shrink to 0 when the embedding collapses. Tensors on the embeddings' device: nothing
    is read back to the host (``StepStats`` reads them once per interval)."""
    e = embeddings.detach().float()
    dist = torch.cdist(e, e)
    same = labels[:, None] == labels[None, :]
    pos = same & ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    neg = ~same
    return {  # 0 / 0 is NaN: no pair of the kind
        "embed/pos_dist": (dist * pos).sum() / pos.sum(),
        "embed/neg_dist": (dist * neg).sum() / neg.sum(),
        "embed/norm": e.norm(dim=1).mean(),
    }


class StepStats:
    """The loss statistics of an epoch's training steps, kept on the training device: ``add`` after each
    step queues a few device additions and never reads a tensor back (the host never waits for the GPU);
    ``read`` does, once per interval (``READ_EVERY`` steps) and at the end of the epoch. A non-finite loss
    is remembered with its step and components and raised (``NonFiniteLossError``) at the next read."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch  # 0-based, for the message
        self.keys: list[str] | None = None
        self.sums: torch.Tensor | None = None
        self.first_bad: torch.Tensor | None = None  # [step, loss, components...] of the first NaN/Inf loss
        self.steps = 0
        self.last: dict[str, float] = {}

    def add(self, step: int, loss: torch.Tensor, stats: dict[str, torch.Tensor | float]) -> None:
        """Count one step's ``loss`` and ``stats`` (tensors or floats) in the sums, on the loss's device."""
        keys = ["loss", *stats]
        if self.keys is not None and keys != self.keys:  # a step with other statistics: settle the sums
            self.read()
        device = loss.device
        row = torch.stack(
            [
                v.detach().float().reshape(()).to(device, non_blocking=True)
                if isinstance(v, torch.Tensor)
                else torch.full((), float(v), device=device)
                for v in (loss, *stats.values())
            ]
        )
        bad = ~torch.isfinite(row[0])
        at = torch.cat([torch.full((1,), float(step), device=device), row])
        if self.sums is None or self.first_bad is None:
            self.keys, self.sums, self.first_bad = keys, row, torch.where(bad, at, torch.full_like(at, -1.0))
        else:
            self.sums = self.sums + row
            fresh = bad & (self.first_bad[0] < 0)
            self.first_bad = torch.where(fresh, at, self.first_bad)
        self.steps += 1

    def read(self) -> dict[str, float]:
        """The mean of every statistic since the epoch began (one host read); raises NonFiniteLossError
        naming the first step (0-based ``step`` of ``add``, shown 1-based) whose loss was NaN or Inf."""
        if self.sums is None or self.first_bad is None or self.keys is None:
            return dict(self.last)
        sums, bad = torch.stack([self.sums, self.first_bad[1:]]).tolist(), self.first_bad[0].item()
        if bad >= 0:
            parts = ", ".join(f"{k}={v:.4g}" for k, v in zip(self.keys[1:], sums[1][1:], strict=True))
            raise NonFiniteLossError(
                f"loss became {sums[1][0]} at epoch {self.epoch + 1}, step {int(bad) + 1} (components: "
                f"{parts}); try a lower optimizer.lr or train.grad_clip"
            )
        self.last = {k: v / self.steps for k, v in zip(self.keys, sums[0], strict=True)}
        return dict(self.last)


def _duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``12s``."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Progress lines of one run: ``step`` after every batch (a line every ``PROGRESS_EVERY_S`` when no bar
    shows), ``epoch_line`` after every epoch (always logged)."""

    def __init__(self, name: str, epochs: int, steps_per_epoch: int):
        self.name, self.epochs, self.steps = name, epochs, steps_per_epoch
        self.start = time.perf_counter()
        self.epoch_start = self.start
        self.last_line = self.start
        self.images = 0

    def begin_epoch(self) -> None:
        self.epoch_start = self.last_line = time.perf_counter()
        self.images = 0

    def remaining(self, epoch: int, step: int) -> float:
        """Estimated seconds left after ``step`` of 0-based ``epoch``: the run's pace so far."""
        done = epoch + step / max(self.steps, 1)
        elapsed = time.perf_counter() - self.start
        return elapsed / done * (self.epochs - done) if done > 0 else math.nan

    def step(self, epoch: int, step: int, loss: float, images: int, bar_shown: bool) -> None:
        """Count ``images`` of batch ``step`` (1-based); log a line if none was logged for a while."""
        self.images += images
        now = time.perf_counter()
        if bar_shown or now - self.last_line < PROGRESS_EVERY_S:
            return
        self.last_line = now
        rate = self.images / max(now - self.epoch_start, 1e-9)
        log.info(
            "%s: epoch %d/%d, step %d/%d: loss %.4f, %.1f images/s, elapsed %s, remaining ~%s",
            self.name,
            epoch + 1,
            self.epochs,
            step,
            self.steps,
            loss,
            rate,
            _duration(now - self.start),
            _duration(self.remaining(epoch, step)),
        )

    def epoch_line(self, row: dict[str, Any], selection: str) -> str:
        """One line for the epoch's history ``row``: loss, speed, times, validation metric if any."""
        epoch = int(row["epoch"])
        val = row.get(f"val/{selection}")
        return (
            f"{self.name}: epoch {epoch}/{self.epochs}, step {self.steps}/{self.steps}: "
            f"loss {row['train/loss']:.4f}, {row['images_per_s']:.1f} images/s, "
            f"train {_duration(row['train_s'])}"
            + (f", val {_duration(row['eval_s'])}, val {selection} {val:.4f}" if val is not None else "")
            + f", elapsed {_duration(time.perf_counter() - self.start)}"
            + f", remaining ~{_duration(self.remaining(epoch, 0))}"
        )


@dataclass
class CollapseCheck:
    """Watches the per-epoch embedding statistics of the training batches for a collapsed embedding.

    ``margin`` is the metric loss's ``margin`` from the resolved config (None without one): a collapsed
    embedding makes a margin loss sit exactly at its margin, which the warning then says."""

    margin: float | None = None
    first: int | None = None
    last: int | None = None
    reason: str = ""
    epochs: list[int] = field(default_factory=list)

    def update(self, row: dict[str, Any]) -> str | None:
        """Check the epoch's history ``row``; the reason (also logged as a warning) if it collapsed."""
        norm = row.get("train/embed/norm", math.nan)
        neg = row.get("train/embed/neg_dist", math.nan)
        pos = row.get("train/embed/pos_dist", math.nan)
        if not math.isfinite(norm) or not math.isfinite(neg):
            return None
        if norm < ZERO_NORM:
            reason = f"the embeddings are all zero (mean norm {norm:.2g})"
        elif neg / norm < COLLAPSE_SPREAD:
            reason = (
                f"every image maps to nearly the same point: mean distance {pos:.4f} within classes, "
                f"{neg:.4f} between classes, at an embedding norm of {norm:.3g}"
            )
        else:
            return None
        loss = row.get("train/loss/metric", math.nan)
        if self.margin and abs(loss - self.margin) <= MARGIN_TOLERANCE * self.margin:
            reason += f"; the loss ({loss:.4f}) is pinned at loss.margin ({self.margin:g})"
        epoch = int(row["epoch"])
        self.first = epoch if self.first is None else self.first
        self.last, self.reason = epoch, reason
        self.epochs.append(epoch)
        log.warning("epoch %d: embedding collapsed: %s (try a lower optimizer.lr)", epoch, reason)
        return reason

    def collapsed(self, last_epoch: int) -> bool:
        """Whether the embedding was still collapsed at ``last_epoch``."""
        return self.last is not None and self.last == last_epoch

    def warnings(self, last_epoch: int) -> list[str]:
        """The run summary's warnings (empty for a healthy run)."""
        if self.first is None:
            return []
        when = f"in {len(self.epochs)} of {last_epoch} epochs (first epoch {self.first}, " + (
            "still at the last)" if self.collapsed(last_epoch) else f"recovered by epoch {last_epoch})"
        )
        return [f"embedding collapsed {when}: {self.reason}; try a lower optimizer.lr"]


#: History columns of symmetrical synthesis (``methods.synthesis``): how often a reflection was the hardest
#: negative of its class, and how often one beat the originals of a negative entry.
SYNTHESIS_FRACTIONS = ("diag/synthetic_hard_fraction", "diag/synthetic_entry_fraction")


def inert_synthesis(history: list[dict[str, Any]]) -> str | None:
    """A warning when symmetrical synthesis recorded its fractions every epoch and they stayed 0: no
    reflection was ever harder than the originals it competed with, so the loss never saw one and the run
    trained as without synthesis (e.g. α = 1 or β = 0.5 at K = 8). None otherwise."""
    rows = [[row.get(c) for c in SYNTHESIS_FRACTIONS] for row in history]
    if not rows or any(v is None or not math.isfinite(v) or v > 0 for r in rows for v in r):
        return None
    return (
        f"symmetrical synthesis had no effect: in all {len(rows)} epochs no reflection was harder than the "
        "originals it competed with (diag/synthetic_hard_fraction and synthetic_entry_fraction 0), so the "
        "run trained as without synthesis; check synthesis.alpha / beta and sampler.k"
    )
