"""The Optuna work queue: every unit of work is a WAITING trial that a worker claims (WAITING → RUNNING,
atomically, as ``Study.ask`` does); a worker that dies mid-trial is detected (same host: its process is
gone; any host: its heartbeat stops) and its trial is failed and re-queued with the same parameters.

The queue knows units and trial states only, nothing of training: what a claimed trial runs is the
objective's business (``harness.study.objective``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from harness.errors import ConfigError
from harness.rundir import pid_alive
from harness.store import HEARTBEAT_GRACE_S, HEARTBEAT_INTERVAL_S, open_storage, outage_recent
from harness.study.spec import StudySpec, Unit

log = logging.getLogger(__name__)

#: A lost trial (dead worker) is re-queued at most this many times.
MAX_RETRIES = 2
#: User attributes that identify a unit of work; copied onto a retry.
UNIT_ATTRS = ("unit", "stage", "protocol", "arm", "slot", "seed", "arm_display")
HOST = socket.gethostname()
#: The folder of a study's journal heartbeat files (one per running trial, named by its trial id).
HEARTBEATS = "heartbeats"


def unit_status(trials: list[FrozenTrial]) -> str:
    """A unit's state from its trials: ``done``, ``pending`` (queued/running), ``failed``, ``missing``."""
    states = {t.state for t in trials}
    if states & {TrialState.COMPLETE, TrialState.PRUNED}:
        return "done"
    if states & {TrialState.RUNNING, TrialState.WAITING}:
        return "pending"
    return "failed" if TrialState.FAIL in states else "missing"


def worker_gone(t: FrozenTrial, beat: Path | None, now: float) -> bool | None:
    """Whether the worker that claimed the RUNNING trial ``t`` is gone: on this host, its process no longer
    exists; elsewhere, its journal heartbeat file ``beat`` is older than HEARTBEAT_GRACE_S (a trial claimed a
    moment ago has none yet: its start counts). None where this cannot tell: another host on an RDB storage
    (there Optuna's heartbeat decides) or no ``beat`` given."""
    worker = t.user_attrs.get("worker")
    if worker and worker["host"] == HOST and worker["pid"] != os.getpid():
        return not pid_alive(worker["pid"])
    if beat is None:
        return None
    last = (
        beat.stat().st_mtime if beat.exists() else t.datetime_start.timestamp() if t.datetime_start else now
    )
    return now - last > HEARTBEAT_GRACE_S


class Snapshot:
    """All trials of the study's Optuna studies at one moment, grouped by unit."""

    def __init__(self, studies: dict[str, optuna.Study], spec: StudySpec):
        self.trials = {name: s.get_trials(deepcopy=False) for name, s in studies.items()}
        self.units: dict[tuple[str, str], list[FrozenTrial]] = {(u.study, u.key): [] for u in spec.units()}
        for study_name, trials in self.trials.items():
            for t in trials:
                key = (study_name, t.user_attrs.get("unit", ""))
                if key in self.units and not t.user_attrs.get("duplicate"):
                    self.units[key].append(t)

    def status(self, unit: Unit) -> str:
        return unit_status(self.units[(unit.study, unit.key)])

    def all(self) -> Iterator[tuple[str, FrozenTrial]]:
        for study_name, trials in self.trials.items():
            for t in trials:
                yield study_name, t


@dataclass(frozen=True)
class UnitView:
    """One unit of work as ``dmlh study status`` shows it. ``state``: finished (a complete or pruned trial),
    running (its worker lives), dead (claimed by a worker that is gone: re-queued by the next ``dmlh study
    run``), queued, or failed. ``trial``: the running or dead trial."""

    study: str
    stage: str
    arm: str
    state: str
    trial: FrozenTrial | None = None


def survey(storage: BaseStorage, names: list[str], folder: Path) -> list[UnitView]:
    """Every unit of work that Optuna studies ``names`` (of the study in ``folder``) hold a trial of, read
    only. A RUNNING trial is running only while its worker lives (``worker_gone``; on an RDB storage, a
    worker elsewhere by Optuna's heartbeat): a killed study leaves RUNNING trials that nobody runs."""
    journal = isinstance(storage, JournalStorage)
    now = time.time()
    views = []
    for name in names:
        study_id = storage.get_study_id_from_name(name)
        stale = set() if journal else set(getattr(storage, "_get_stale_trial_ids", lambda _: [])(study_id))
        units: dict[str, list[FrozenTrial]] = {}
        for t in storage.get_all_trials(study_id, deepcopy=False):
            if "unit" in t.user_attrs and not t.user_attrs.get("duplicate"):
                units.setdefault(t.user_attrs["unit"], []).append(t)
        for trials in units.values():
            attrs = trials[0].user_attrs
            stage = attrs.get("stage", "?")
            stage += " (literature)" if attrs.get("protocol") == "literature" else ""
            state = {"done": "finished", "pending": "queued"}.get(unit_status(trials), "failed")
            running = [t for t in trials if t.state == TrialState.RUNNING]
            if not running or state == "finished":
                views.append(UnitView(name, stage, attrs.get("arm", "?"), state))
                continue
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, running[-1].number)
            gone = worker_gone(running[-1], folder / HEARTBEATS / str(trial_id) if journal else None, now)
            state = "dead" if gone or (gone is None and trial_id in stale) else "running"
            views.append(UnitView(name, stage, attrs.get("arm", "?"), state, running[-1]))
    return views


def open_studies(
    storage: BaseStorage, spec: StudySpec, options: Callable[[str], dict[str, Any]] | None = None
) -> dict[str, optuna.Study]:
    """The study's Optuna studies (root first, then one per arm's tune stage), loaded with ``options(name)``
    (sampler, pruner)."""
    return {
        name: optuna.load_study(study_name=name, storage=storage, **(options(name) if options else {}))
        for name in [spec.name, *spec.tune_studies()]
    }


def prepare(storage: BaseStorage, spec: StudySpec) -> None:
    """Create the Optuna studies, check the stored results come from the same spec, queue missing units."""
    root = optuna.create_study(
        study_name=spec.name, storage=storage, direction="maximize", load_if_exists=True
    )
    old = root.user_attrs.get("meta")
    if old and old["fingerprint"] != spec.fingerprint():
        raise ConfigError(
            f"study {spec.name!r} already holds results of a different base config, tune params or "
            "objective; "
            "use --name NEW_NAME for a new study (or remove the old one's results)"
        )
    root.set_user_attr("meta", spec.meta())
    studies = {spec.name: root}
    for name in spec.tune_studies():
        studies[name] = optuna.create_study(
            study_name=name, storage=storage, direction="maximize", load_if_exists=True
        )
    snap = Snapshot(studies, spec)
    queued = 0
    for unit in spec.units():
        if snap.status(unit) in ("missing", "failed"):
            studies[unit.study].enqueue_trial({}, user_attrs={"unit": unit.key, **unit.attrs})
            queued += 1
    log.info(
        "study %s: %d arms, %d units, %d queued now", spec.name, len(spec.arms), len(spec.units()), queued
    )


class WorkQueue:
    """One worker's view of the queue: claim a unit, prove it alive while it runs, reap dead workers' trials.

    ``options(study_name)`` gives the keyword arguments (sampler, pruner) its Optuna studies are loaded with.
    """

    def __init__(
        self,
        spec: StudySpec,
        storage_url: str | None,
        results: Path,
        invocation: str,
        options: Callable[[str], dict[str, Any]] | None = None,
    ):
        self.spec = spec
        self.invocation = invocation
        self.storage = open_storage(storage_url, spec.name, results, create=True, on_stale=self._on_stale)
        self.journal = isinstance(self.storage, JournalStorage)
        self.heartbeats = results / spec.name / HEARTBEATS
        self.studies = open_studies(self.storage, spec, options)
        self.ids = {name: self.storage.get_study_id_from_name(name) for name in self.studies}
        self._requeued = False

    def snapshot(self) -> Snapshot:
        return Snapshot(self.studies, self.spec)

    def trial_id(self, study_name: str, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.ids[study_name], number)

    # -- claiming -------------------------------------------------------------------------------------
    def candidates(self, snap: Snapshot) -> Iterator[tuple[Unit, FrozenTrial]]:
        """Queued trials of units nobody runs, in the spec's interleaved order, finals first (a fair final
        once its arm's tune stage is settled; literature runs need no tuning)."""
        units = self.spec.units()
        tune_settled = {
            arm.label: all(
                snap.status(u) in ("done", "failed")
                for u in units
                if u.attrs["arm"] == arm.label and u.attrs["stage"] == "tune"
            )
            for arm in self.spec.arms
        }
        order = sorted(units, key=lambda u: u.attrs["stage"] != "final")
        for u in order:
            trials = snap.units[(u.study, u.key)]
            if u.attrs.get("protocol") == "fair" and not tune_settled[u.attrs["arm"]]:
                continue
            if snap.status(u) != "pending" or any(t.state == TrialState.RUNNING for t in trials):
                continue
            yield u, min((t for t in trials if t.state == TrialState.WAITING), key=lambda t: t.number)

    def claim(self, unit: Unit, trial: FrozenTrial) -> int | None:
        """WAITING → RUNNING atomically; the trial id, or None if another worker was faster (or a
        concurrently queued copy of the unit runs already)."""
        trial_id = self.trial_id(unit.study, trial.number)
        try:
            if not self.storage.set_trial_state_values(trial_id, TrialState.RUNNING):
                return None
        except UpdateFinishedTrialError:
            return None
        # the GPUs this worker process was pinned to (harness.study.devices): the store's ``gpus`` column
        worker = {"host": HOST, "pid": os.getpid(), "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}
        self.storage.set_trial_user_attr(trial_id, "worker", worker)
        self.storage.set_trial_user_attr(trial_id, "invocation", self.invocation)
        rivals = [
            t
            for t in self.studies[unit.study].get_trials(deepcopy=False)
            if t.user_attrs.get("unit") == unit.key
            and t.number != trial.number
            and not t.user_attrs.get("duplicate")
            and (
                t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                or (t.state == TrialState.RUNNING and t.number < trial.number)
            )
        ]
        if rivals:  # two copies of one unit were queued concurrently: the lower-numbered one runs
            self.storage.set_trial_user_attr(trial_id, "duplicate", True)
            self.storage.set_trial_user_attr(trial_id, "reason", f"duplicate of trial {rivals[0].number}")
            self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
            return None
        return trial_id

    # -- dead workers ---------------------------------------------------------------------------------
    def _is_lost(self, study_name: str, t: FrozenTrial, now: float) -> bool:
        beat = self.heartbeats / str(self.trial_id(study_name, t.number)) if self.journal else None
        return bool(worker_gone(t, beat, now))  # RDB storages elsewhere: Optuna's heartbeat decides

    def reap_lost(self, snap: Snapshot) -> bool:
        """Fail and re-queue the trials of dead workers; True if any was re-queued."""
        now = time.time()
        self._requeued = False
        for study_name, t in snap.all():
            if t.state != TrialState.RUNNING or not self._is_lost(study_name, t, now):
                continue
            trial_id = self.trial_id(study_name, t.number)
            try:
                self.storage.set_trial_user_attr(trial_id, "reason", "lost: its worker died mid-trial")
                if self.storage.set_trial_state_values(trial_id, TrialState.FAIL):
                    self.requeue(study_name, t)
            except UpdateFinishedTrialError:
                continue  # another worker reaped it first
        if not self.journal and not outage_recent():  # after an outage, heartbeats catch up first
            for study in self.studies.values():
                optuna.storages.fail_stale_trials(study)  # calls _on_stale for the trials it failed
        return self._requeued

    def _on_stale(self, study: optuna.Study, t: FrozenTrial) -> None:
        self.requeue(study.study_name, t)

    def requeue(self, study_name: str, t: FrozenTrial, interrupted: bool = False) -> bool:
        """Queue a copy of trial ``t`` (same params and unit) unless its unit lost its worker MAX_RETRIES
        times already (a trial interrupted by the user does not count)."""
        unit = t.user_attrs.get("unit")
        retries = [
            x
            for x in self.studies[study_name].get_trials(deepcopy=False)
            if x.user_attrs.get("unit") == unit
            and "retry_of" in x.user_attrs
            and "interrupted" not in x.user_attrs
        ]
        if len(retries) >= MAX_RETRIES and not interrupted:
            log.error(
                "trial %d (%s) lost its worker %d times; not retrying it again", t.number, unit, len(retries)
            )
            return False
        attrs = {k: t.user_attrs[k] for k in UNIT_ATTRS if k in t.user_attrs}
        attrs |= {"retry_of": t.number} | ({"interrupted": True} if interrupted else {})
        self.studies[study_name].enqueue_trial(t.params, user_attrs=attrs)
        what = (t.number, t.user_attrs.get("arm"), unit)
        if interrupted:
            log.info("trial %d (%s, %s) was interrupted; queued again", *what)
        else:
            log.warning("trial %d (%s, %s) lost its worker; re-queued", *what)
        self._requeued = True
        return True

    def interrupted(self, study_name: str, trial_id: int) -> None:
        """This worker was interrupted (Ctrl-C) mid-trial: fail the trial and queue it again."""
        self.storage.set_trial_user_attr(trial_id, "reason", "interrupted")
        self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
        self.requeue(study_name, self.storage.get_trial(trial_id), interrupted=True)

    @contextmanager
    def heartbeat(self, trial_id: int) -> Iterator[None]:
        """Prove this worker alive while the trial runs (a file's mtime for the journal, Optuna's for RDB)."""
        path = self.heartbeats / str(trial_id)
        if self.journal:
            path.parent.mkdir(parents=True, exist_ok=True)
            beat: Callable[[], None] = path.touch
        else:
            beat = lambda: self.storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]  # noqa: E731
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(HEARTBEAT_INTERVAL_S):
                beat()

        beat()
        thread = threading.Thread(target=loop, daemon=True, name=f"heartbeat-{trial_id}")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            path.unlink(missing_ok=True)
