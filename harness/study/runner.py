"""The study runner: queue a study's units, run worker processes until every unit is settled, report.

``run_study`` places its workers (``harness.study.devices``). On the CPU: this process plus ``workers - 1``
loky worker processes (joblib's process pool). With GPUs: one loky process per worker, each started with its
own ``CUDA_VISIBLE_DEVICES`` (pinned before CUDA exists in it), while this process shows the progress. Each
worker loops: reap the trials of dead workers (re-queued), claim a queued unit, run it through the
objective. A worker process that dies (killed, out of memory) costs only its trial: the others re-queue and
finish it (or a new worker on the dead one's device does), and the study ends with one line saying what
happened, then the report.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from harness import logs
from harness.config import lookup
from harness.errors import ConfigError, HarnessError, Interrupted, TrainingError
from harness.store import lost_numbers, open_storage
from harness.study.devices import ENV, Slot, parse_gpus, plan_workers
from harness.study.objective import Objective, make_pruner, make_sampler
from harness.study.queue import Snapshot, WorkQueue, open_studies, prepare
from harness.study.spec import StudySpec, load_study
from harness.tracking import Tracking
from harness.tracking import parse as parse_track

log = logging.getLogger(__name__)

#: Stop when more than this fraction of the trials finished in this run failed (after MIN_FINISHED).
FAIL_FRACTION, MIN_FINISHED = 0.5, 4
#: Seconds an idle worker waits before looking for work again.
POLL_S = 0.5
#: GPU workers: how many times a worker replaces one that died before the study ends with the rest unrun.
RESTARTS = 8


class StudyIncompleteError(HarnessError):
    """The study ended (report written, folder ``report``) with arms that have no completed final run."""

    def __init__(self, message: str, report: Path | None = None):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Context:
    """Everything a worker process needs (picklable)."""

    spec: StudySpec
    storage: str | None
    results: Path
    invocation: str
    #: CPU threads of a trial whose config leaves ``train.threads`` unset (``trial_threads``).
    threads: int
    deadline: float | None
    log_level: int
    #: GPUs each trial trains on (``train.distributed.world_size`` of its runs); 1 = one process per trial.
    gpus_per_trial: int = 1
    #: The experiment trackers every finished run is logged to (``--track``; a worker opens its own clients).
    tracking: Tracking | None = None


class Worker:
    """Claims queued units and runs them until every unit is settled (done or failed)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.spec = ctx.spec

        def options(name: str) -> dict[str, Any]:
            return {"sampler": make_sampler(self.spec, name), "pruner": make_pruner(self.spec, name)}

        self.queue = WorkQueue(ctx.spec, ctx.storage, ctx.results, ctx.invocation, options)
        self.objective = Objective(
            ctx.spec, self.queue, ctx.results / ctx.spec.name, ctx.gpus_per_trial, ctx.tracking
        )

    def work(self) -> int:
        """Run units until all are settled, the deadline passes or most trials fail; return how many ran."""
        ran = 0
        while True:
            snap = self.queue.snapshot()
            if self.queue.reap_lost(snap):
                continue
            self._check_failures(snap)
            if self.ctx.deadline is not None and time.time() > self.ctx.deadline:
                log.info("study %s: timeout reached, not starting new trials", self.spec.name)
                return ran
            if all(snap.status(u) in ("done", "failed", "missing") for u in self.spec.units()):
                return ran
            for unit, trial in self.queue.candidates(snap):
                trial_id = self.queue.claim(unit, trial)
                if trial_id is not None:
                    self.objective(unit, trial_id, snap)
                    ran += 1
                    break
            else:
                time.sleep(POLL_S)

    def _check_failures(self, snap: Snapshot) -> None:
        """Stop the study when most trials this invocation finished failed: the configs are broken."""
        lost = {(s, n) for s, ts in snap.trials.items() for n in lost_numbers(ts)}
        mine = [
            t
            for s, t in snap.all()
            if t.user_attrs.get("invocation") == self.ctx.invocation
            and t.state.is_finished()
            and (s, t.number) not in lost
            and not t.user_attrs.get("duplicate")
        ]
        failed = [t for t in mine if t.state == TrialState.FAIL]
        if len(mine) >= MIN_FINISHED and len(failed) > FAIL_FRACTION * len(mine):
            first = min(failed, key=lambda t: t.number)
            raise TrainingError(
                f"stopping study {self.spec.name!r}: {len(failed)} of the {len(mine)} trials finished in "
                f"this run failed, so the configs are probably broken. First failure "
                f"({first.user_attrs.get('arm')}): "
                f"{first.user_attrs.get('reason')}. Tracebacks: `dmlh study status {self.spec.name}` and "
                f"failed.json in {self.ctx.results / self.spec.name / 'runs'}/*/"
            )


def _work(ctx: Context, slot: Slot | None = None) -> int:
    """Worker entry point (in this process or a loky worker process, pinned to ``slot``'s GPUs)."""
    import torch

    repeats = logs.setup(ctx.log_level)  # a loky worker process starts with no handlers
    if slot is not None and slot.gpus:  # the environment this process really started with
        seen = os.environ.get(ENV)
        if seen != slot.env[ENV] or torch.cuda.is_initialized():
            raise TrainingError(f"worker {slot.index} was to hold {slot.describe()} but sees {ENV}={seen}")
        log.info(
            "study %s: worker %d (pid %d) holds %s", ctx.spec.name, slot.index, os.getpid(), slot.describe()
        )
    torch.set_num_threads(ctx.threads)
    if slot is None or not slot.gpus:  # CPU arithmetic: the same kernels in every worker and every run
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        return Worker(ctx).work()
    finally:
        repeats.summary()


class Progress:
    """A bar of settled units / all units, with the running trials' arm and epoch (own storage and thread);
    without a terminal, one log line per settled unit with the arm, its value and the study's progress."""

    def __init__(self, ctx: Context, period: float = 1.0):
        self.ctx = ctx
        self.period = period
        self.studies = open_studies(
            open_storage(ctx.storage, ctx.spec.name, ctx.results, create=True), ctx.spec
        )
        self.units = ctx.spec.units()
        self.bar = logs.progress_bar(total=len(self.units), desc=f"study {ctx.spec.name}", unit="trial")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="study-progress")
        self.t0 = time.time()
        self.settled: set[tuple[str, str]] | None = None

    def _update(self) -> None:
        snap = Snapshot(self.studies, self.ctx.spec)
        settled = {(u.study, u.key): u for u in self.units if snap.status(u) in ("done", "failed")}
        if self.settled is not None and self.bar.disable:
            for key in settled.keys() - self.settled:
                self._log_settled(snap, settled[key], len(settled))
        self.settled = set(settled)
        self.bar.update(len(settled) - self.bar.n)
        running = [t for _, t in snap.all() if t.state == TrialState.RUNNING]
        self.bar.set_postfix_str(
            "; ".join(
                f"{t.user_attrs.get('arm')} {t.user_attrs.get('stage')} "
                f"epoch {max(t.intermediate_values, default=0)}"
                for t in running
            )
        )

    def _log_settled(self, snap: Snapshot, unit: Any, done: int) -> None:
        trials = snap.units[(unit.study, unit.key)]
        last = max(trials, key=lambda t: t.number)
        elapsed = time.time() - self.t0
        left = elapsed / max(done, 1) * (len(self.units) - done)
        value = f"{last.value:.4f}" if last.value is not None else last.state.name.lower()
        log.info(
            "study %s: %s %s (%s): %s %s; %d/%d units, %.0fs elapsed, ~%.0fs left",
            self.ctx.spec.name,
            unit.attrs["stage"],
            unit.key,
            unit.attrs["arm"],
            self.ctx.spec.metric,
            value,
            done,
            len(self.units),
            elapsed,
            left,
        )

    def _loop(self) -> None:
        while not self.stop.wait(self.period):
            self._update()

    def __enter__(self) -> Progress:
        self._update()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self._update()
        self.bar.close()


def _run_workers(ctx: Context, slots: list[Slot]) -> list[str]:
    """Run the workers of ``slots``; return one line per worker process that died (its work is finished by
    the others, or by a new worker). CPU workers: this process (already warm, so it starts at once) plus
    ``len(slots) - 1`` loky processes. GPU workers: a loky process each, started with the slot's
    ``CUDA_VISIBLE_DEVICES``; a dead one's device gets a new worker until the work is settled."""
    with _torch_settings_kept():
        if not slots[0].gpus:
            return _run_cpu_workers(ctx, len(slots))
        lost: list[str] = []
        pending = slots
        for _ in range(RESTARTS + 1):
            died = _run_pinned(ctx, pending)
            lost += [line for _, line in died]
            pending = [slot for slot, _ in died[:1]]  # one fresh worker finishes what the dead left
            if not pending:
                break
        return lost


@contextmanager
def _torch_settings_kept() -> Iterator[None]:
    """Restore this process's torch thread count and deterministic-kernel mode afterwards (on the CPU this
    process is a worker too, and ``run_study`` may be called from a longer-lived program)."""
    import torch

    threads = torch.get_num_threads()
    mode, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    fill = torch.utils.deterministic.fill_uninitialized_memory  # type: ignore[attr-defined]
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill  # type: ignore[attr-defined]


def trial_threads(spec: StudySpec, slots: list[Slot], cores: int) -> int:
    """The CPU threads of each trial whose config leaves ``train.threads`` unset.

    CPU workers: the study's ``base.train.threads``, else every core, whatever ``--workers`` is: the thread
    count decides how a sum is split into partial sums, so it is part of a trial's arithmetic and the same
    study must get the same one with 1 or N workers. Workers that then oversubscribe the cores are said once,
    with the remedy. GPU workers compute on their GPU: each keeps its share of the cores."""
    base = lookup(spec.raw, "base.train.threads", None)
    if slots[0].gpus:
        return base or max(1, cores // len(slots))
    threads = base or cores
    if len(slots) * threads > cores:
        log.warning(
            "study %s: %d CPU workers x %d threads per trial on %d cores: they share the cores, so each "
            "trial is slower (its numbers are those of 1 worker); to give each worker cores of its own, set "
            "base.train.threads: %d in the study (a new study: the thread count is part of each run's "
            "config)",
            spec.name,
            len(slots),
            threads,
            cores,
            max(1, cores // len(slots)),
        )
    return threads


def _run_cpu_workers(ctx: Context, workers: int) -> list[str]:
    from joblib.externals.loky.process_executor import TerminatedWorkerError

    futures = []
    executor = None
    lost: list[str] = []
    if workers > 1:
        from joblib.externals.loky import get_reusable_executor

        executor = get_reusable_executor(max_workers=workers - 1)
        futures = [executor.submit(_work, ctx) for _ in range(workers - 1)]
    try:
        _work(ctx)
        for f in futures:
            try:
                f.result()
            except TerminatedWorkerError as e:
                lost.append(str(e).splitlines()[0])
        if lost:  # the dead workers' trials were re-queued by the living: finish whatever is left
            executor = None  # loky replaces a broken executor on the next get_reusable_executor
            _work(ctx)
    except BaseException:
        if executor is not None:
            executor.shutdown(wait=True, kill_workers=True)  # don't leave workers behind on an error
            executor = None
        raise
    finally:
        if executor is not None:
            executor.shutdown(wait=False)  # idle workers exit on their own
    return lost


def _run_pinned(ctx: Context, slots: list[Slot]) -> list[tuple[Slot, str]]:
    """One loky process per slot, each with its own environment; the slots whose process died."""
    from joblib.externals.loky import ProcessPoolExecutor
    from joblib.externals.loky.process_executor import TerminatedWorkerError

    executors = [ProcessPoolExecutor(max_workers=1, env=slot.env) for slot in slots]
    died: list[tuple[Slot, str]] = []
    try:
        futures = [ex.submit(_work, ctx, slot) for ex, slot in zip(executors, slots, strict=True)]
        for slot, f in zip(slots, futures, strict=True):
            try:
                f.result()
            except TerminatedWorkerError as e:
                died.append((slot, f"worker {slot.index} on {slot.describe()}: {str(e).splitlines()[0]}"))
    except BaseException:
        for ex in executors:
            ex.shutdown(wait=True, kill_workers=True)  # don't leave workers behind on an error
        raise
    for ex in executors:
        ex.shutdown(wait=True)
    return died


def check_batches(spec: StudySpec, world_size: int = 1) -> None:
    """Every arm's batches against its training split and the ranks of a trial, before any trial runs
    (``sampler.p`` above the split's classes fails here with the arm named, not as a study of failed
    trials). Loads each distinct dataset once; its image check is cached, so the trials do not decode the
    files again."""
    from harness.data import load_splits
    from harness.data.sampler import build_sampler
    from harness.distributed import batch_problems

    configs = [(f"arms ({a.label})", spec.config(a, {})) for a in spec.arms if "fair" in spec.protocols]
    configs += [
        (f"literature ({a.label})", spec.literature_config(a, 0))
        for a in spec.arms
        if "literature" in spec.protocols
    ]
    splits: dict[str, Any] = {}
    problems: dict[str, list[str]] = {}
    for where, cfg in configs:
        data = cfg.data.model_dump_json()
        if data not in splits:
            splits[data] = load_splits(cfg.data)
        try:
            build_sampler(cfg.sampler, splits[data].train.labels, cfg.seed)
        except ConfigError as e:
            for p in e.problems:
                problems.setdefault(p, []).append(where)
        for p in batch_problems(cfg.sampler, world_size):
            p = p.replace("train.distributed.world_size", "--gpus-per-trial")
            problems.setdefault(p, []).append(where)
    if problems:
        raise ConfigError([f"{', '.join(places)}: {p}" for p, places in problems.items()])


def incomplete_arms(spec: StudySpec, storage: str | None, results: str | Path) -> list[str]:
    """``arm (protocol)`` of every arm and protocol of the study with no completed final run."""
    studies = open_studies(open_storage(storage, spec.name, results, create=True), spec)
    snap = Snapshot(studies, spec)
    done = {
        (u.attrs["arm"], u.attrs["protocol"])
        for u in spec.units()
        if u.attrs["stage"] == "final"
        and any(t.state == TrialState.COMPLETE for t in snap.units[(u.study, u.key)])
    }
    return [f"{a.label} ({p})" for p in spec.protocols for a in spec.arms if (a.label, p) not in done]


def _interrupted(ctx: Context) -> KeyboardInterrupt:
    """What Ctrl-C tells the user: how many units are finished and stored (a plain interrupt when the store
    cannot be read at that moment)."""
    try:
        studies = open_studies(open_storage(ctx.storage, ctx.spec.name, ctx.results), ctx.spec)
    except Exception:  # noqa: BLE001 - the store being down must not hide the interrupt
        return KeyboardInterrupt()
    units = ctx.spec.units()
    snap = Snapshot(studies, ctx.spec)
    return Interrupted(sum(snap.status(u) == "done" for u in units), len(units))


def run_study(
    path: str | Path,
    storage: str | None = None,
    workers: int | str = "auto",
    name: str | None = None,
    results: str | Path = "results",
    overrides: list[str] | None = None,
    *,
    protocol: str | None = None,
    report: bool = True,
    gpus: str | None = None,
    trials_per_gpu: int = 1,
    gpus_per_trial: int = 1,
    track: list[str] | None = None,
) -> Path | None:
    """Run (or resume) a study: validate it, queue its units, run its worker processes until every unit is
    settled, then write the report. Returns the report folder (None with ``report=False``).

    ``workers`` (a number, or ``auto``: one per visible GPU, 1 on the CPU), ``gpus`` (``"0,2,5"``),
    ``trials_per_gpu`` and ``gpus_per_trial`` place the workers (``harness.study.devices.plan_workers``).
    ``protocol`` (fair | literature | both) and ``track`` (experiment trackers, ``harness.tracking``) replace
    the study file's. Raises StudyIncompleteError (after writing the report) when an arm has no completed
    final run, naming the arms and why."""
    slots = plan_workers(workers, parse_gpus(gpus), trials_per_gpu, gpus_per_trial)
    spec = load_study(path, overrides, name, protocol)
    tracking = Tracking(parse_track(track or spec.raw.get("track"), results, "--track" if track else "track"))
    check_batches(spec, gpus_per_trial)
    prepare(open_storage(storage, spec.name, results, workers=len(slots), create=True), spec)
    tracking.start_study(spec.name)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ctx = Context(
        spec=spec,
        storage=storage,
        results=Path(results),
        invocation=uuid.uuid4().hex,
        threads=trial_threads(spec, slots, cores),
        deadline=time.time() + spec.timeout if spec.timeout else None,
        log_level=logging.getLogger("harness").getEffectiveLevel(),
        gpus_per_trial=gpus_per_trial,
        tracking=tracking,
    )
    if slots[0].gpus:
        groups = sorted({",".join(s.gpus) for s in slots})
        log.info("study %s: %d worker(s) on GPU %s", spec.name, len(slots), "; ".join(groups))
    t0 = time.perf_counter()
    try:
        with Progress(ctx):
            lost = _run_workers(ctx, slots)
    except KeyboardInterrupt:
        raise _interrupted(ctx) from None
    for line in lost:
        log.warning(
            "study %s: a worker process died (%s); its trial was re-queued and finished", spec.name, line
        )
    log.info("study %s: this run took %.1fs", spec.name, time.perf_counter() - t0)
    from harness.reporting.status import status

    if log.isEnabledFor(logging.INFO):
        log.info("%s", status(spec.name, storage, results))
    out = None
    if report:
        from harness.report import write_report

        out = write_report(spec.name, storage=storage, results=results)
    tracking.end_study(spec.name, out / "plots" if out is not None else None)
    missing = incomplete_arms(spec, storage, results)
    if missing:
        raise StudyIncompleteError(
            f"study {spec.name}: {len(missing)} arm(s) have no completed final run: {'; '.join(missing)} "
            f"(reasons: `dmlh study status {spec.name}`"
            + (f"; report: {out}" if out is not None else "")
            + ")",
            out,
        )
    return out
