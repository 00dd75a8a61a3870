"""The results store: Optuna storages as the index of trials, and one pandas DataFrame of all runs.

A study ``NAME`` lives in one Optuna storage as a root study ``NAME`` (the final-stage trials, plus the
study spec in its user attributes) and one study ``NAME/tune/<arm>`` per arm with a tune stage. The
per-run files under ``results/NAME/runs/<run_key>/`` are the record; ``load`` joins both views.

Storages: the default is Optuna's journal file at ``results/NAME/journal.log`` (safe for several worker
processes, also on NFS); ``sqlite:///…`` for one worker; ``postgresql://…`` (any SQLAlchemy URL) for
many machines, with Optuna's heartbeats so that a dead worker's trial is detected.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState

from harness.errors import ConfigError, HarnessError
from harness.journal import SafeJournalBackend

log = logging.getLogger(__name__)

#: Seconds between two heartbeats of a running trial, and after which a silent trial counts as lost.
HEARTBEAT_INTERVAL_S = 10
HEARTBEAT_GRACE_S = 60
TUNE_INFIX = "/tune/"
JOURNAL = "journal.log"


def tune_study_name(name: str, arm: str) -> str:
    return f"{name}{TUNE_INFIX}{arm}"


def journal_path(name: str, results: str | Path) -> Path:
    return Path(results) / name / JOURNAL


def open_storage(
    url: str | None,
    name: str,
    results: str | Path,
    *,
    workers: int = 1,
    create: bool = False,
    on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None,
) -> BaseStorage:
    """The storage of study ``name``: ``url`` (an SQLAlchemy URL) or the journal file under ``results``.

    ``on_stale(study, trial)`` is called (RDB storages) for a trial whose worker stopped beating, by the one
    process that failed it.

    SQLite is refused for more than one worker: it locks the whole database file and concurrent
    Optuna writes fail (optuna#820, #6036).
    """
    if url is None:
        path = journal_path(name, results)
        if not create and not path.is_file():
            raise HarnessError(
                f"no study {name!r}: {path} not found (run `dmlh study run STUDY.yaml` first, or pass "
                "--storage and --results where the study lives)"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(SafeJournalBackend(path))
    if url.startswith("sqlite") and workers > 1:
        raise ConfigError(
            f"--storage {url}: SQLite supports one worker only (it locks the whole file; parallel Optuna "
            "writes fail). Use the default journal storage (omit --storage) or a PostgreSQL URL "
            "for --workers > 1"
        )
    import sqlalchemy.exc

    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RetryingStorage(
                    RDBStorage(
                        url,
                        engine_kwargs={"pool_pre_ping": True},
                        heartbeat_interval=HEARTBEAT_INTERVAL_S,
                        grace_period=HEARTBEAT_GRACE_S,
                        heartbeat_stale_trial_callback=on_stale,
                    )
                )
        except (ImportError, ValueError, sqlalchemy.exc.ArgumentError) as e:
            raise ConfigError(f"--storage {url}: cannot open it ({type(e).__name__}: {e})") from e
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as e:
            # several machines creating the tables of a fresh database at once: the losers retry
            if attempt == 2:
                raise HarnessError(f"--storage {url}: cannot create Optuna's tables ({e})") from e
            time.sleep(1.0 + attempt)
        except sqlalchemy.exc.SQLAlchemyError as e:
            raise HarnessError(f"--storage {url}: cannot connect ({type(e).__name__}: {e})") from e
    raise AssertionError("unreachable")


def resolve(
    study_name_or_path: str | Path, storage: str | None = None, results: str | Path = "results"
) -> tuple[str, Path, BaseStorage]:
    """(study name, study folder, storage) from a study name, a study folder or its journal file."""
    p = Path(study_name_or_path)
    if storage is None and (p.name == JOURNAL and p.is_file() or (p / JOURNAL).is_file()):
        folder = p.parent if p.name == JOURNAL else p
        return folder.name, folder, open_storage(None, folder.name, folder.parent)
    name = str(study_name_or_path)
    return name, Path(results) / name, open_storage(storage, name, results)


def study_names(storage: BaseStorage, name: str) -> list[str]:
    """The root study (if it exists) and its tune studies, root first."""
    names = [s.study_name for s in storage.get_all_studies()]
    tune = sorted(n for n in names if n.startswith(name + TUNE_INFIX))
    return ([name] if name in names else []) + tune


def load_meta(storage: BaseStorage, name: str) -> dict[str, Any]:
    """The study's spec as the runner stored it (arms, factors, objective, baseline, ...)."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError as e:
        raise HarnessError(
            f"no study {name!r} in this storage (it has: "
            f"{', '.join(s.study_name for s in storage.get_all_studies()) or 'none'})"
        ) from e
    return dict(storage.get_study_user_attrs(study_id).get("meta", {}))


def lost_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of trials whose worker died (re-run as a retry) — not failures of the config."""
    return {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}


def _row(t: FrozenTrial, study: str, results_dir: Path, lost: set[int]) -> dict[str, Any]:
    ua = t.user_attrs
    run_key = ua.get("run_key")
    row: dict[str, Any] = {
        "study": study,
        "number": t.number,
        "state": t.state.name,
        "stage": ua.get("stage"),
        "arm": ua.get("arm"),
        "seed": ua.get("seed"),
        "slot": ua.get("slot"),
        "run_key": run_key,
        "run_dir": str(results_dir / "runs" / run_key) if run_key else None,
        "value": t.value if t.state == TrialState.COMPLETE else None,
        "duration": ua.get("duration", t.duration.total_seconds() if t.duration else math.nan),
        "datetime_start": t.datetime_start,
        "datetime_complete": t.datetime_complete,
        "best_epoch": ua.get("best_epoch"),
        "lost": t.number in lost,
        "protocol": ua.get("protocol"),
        "reason": ua.get("reason"),
        "traceback": ua.get("traceback"),
        "reused_from": ua.get("reused_from"),
        "retry_of": ua.get("retry_of"),
        "host": (ua.get("worker") or {}).get("host"),
        "gpus": (ua.get("worker") or {}).get("gpus"),
        "device": ua.get("device"),
    }
    row.update(ua.get("arm_display", {}))
    row.update(ua.get("tuned", {}))
    row.update(ua.get("metrics", {}))
    row.update({f"time/{k}": v for k, v in (ua.get("timings") or {}).items()})
    return row


def load(
    study_name_or_path: str | Path, storage: str | None = None, results: str | Path = "results"
) -> pd.DataFrame:
    """One row per run (trial) of a study: stage, arm, seed, arm factors and tuned parameters (as dotted-path
    columns), metrics (``val/…``, ``test/…``, ``test_last/…``), timings in seconds (``time/…``, e.g.
    ``time/epoch_s`` per training epoch, offline mining included), state, duration, run_key and run folder,
    and where it ran: ``host``, ``gpus`` (the worker's ``CUDA_VISIBLE_DEVICES``) and ``device``.

    Queued (WAITING) trials and concurrently claimed duplicates are left out. ``df.attrs["meta"]`` holds the
    study spec (arms, factors, objective, baseline).
    """
    name, folder, store = resolve(study_name_or_path, storage, results)
    rows = []
    for sname in study_names(store, name):
        trials = optuna.load_study(study_name=sname, storage=store).get_trials(deepcopy=False)
        lost = lost_numbers(trials)
        rows += [
            _row(t, sname, folder, lost)
            for t in trials
            if t.state != TrialState.WAITING and not t.user_attrs.get("duplicate")
        ]
    df = pd.DataFrame(rows)
    for col in ("seed", "slot", "best_epoch", "retry_of"):
        if col in df:
            df[col] = df[col].astype("Int64")
    df.attrs["meta"] = load_meta(store, name)
    df.attrs["name"] = name
    df.attrs["folder"] = str(folder)
    return df


def read_history(run_dir: str | Path) -> pd.DataFrame | None:
    """A run's per-epoch history (None when its folder is not on this machine)."""
    path = Path(run_dir) / "history.csv"
    return pd.read_csv(path) if path.is_file() else None


# ---------------------------------------------------------------------------------------------------------
# Retrying a restarted database server
# ---------------------------------------------------------------------------------------------------------

#: How long a storage call keeps retrying a lost database connection (the environment variable
#: DMLH_STORAGE_RETRY_FOR, in seconds, replaces it), its first and longest pause, and how often a worker
#: waiting on the database says so.
RETRY_FOR_S = 900.0
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 8.0
RETRY_SAY_EVERY_S = 60.0


def retry_for_s() -> float:
    value = os.environ.get("DMLH_STORAGE_RETRY_FOR")
    try:
        return float(value) if value else RETRY_FOR_S
    except ValueError as e:
        raise ConfigError(f"DMLH_STORAGE_RETRY_FOR={value!r}: a number of seconds") from e


class _Outage:
    """What this process says while the database is away: one warning when the first call loses it, a line
    with the time left every RETRY_SAY_EVERY_S, one line when it is back (whichever thread notices)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.since: float | None = None
        self.said = 0.0
        self.ended: float | None = None

    def lost(self, what: str, cause: BaseException, deadline: float) -> None:
        now = time.monotonic()
        with self.lock:
            if self.since is None:
                self.since = self.said = now
                reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
                log.warning(
                    "storage: lost the database connection in %s (%s); waiting for it for up to %.0f s",
                    what,
                    reason,
                    deadline - now,
                )
            elif now - self.said >= RETRY_SAY_EVERY_S:
                self.said = now
                waited, left = now - self.since, deadline - now
                log.warning("storage: still no database after %.0f s; waiting %.0f s more", waited, left)

    def back(self) -> None:
        with self.lock:
            if self.since is not None:
                self.ended = time.monotonic()
                log.warning("storage: the database is back after %.0f s", self.ended - self.since)
                self.since = None

    def recent(self, seconds: float) -> bool:
        """Whether the database is away now or came back less than ``seconds`` ago."""
        with self.lock:
            return self.since is not None or (
                self.ended is not None and time.monotonic() - self.ended < seconds
            )


_OUTAGE = _Outage()


def outage_recent() -> bool:
    """Whether this process saw the database away within the last heartbeat grace period: every running
    trial's heartbeat then looks stale, though its worker lives and beats again as soon as it can."""
    return _OUTAGE.recent(HEARTBEAT_GRACE_S + HEARTBEAT_INTERVAL_S)


def _transient(error: BaseException) -> bool:
    """A lost or refused database connection (server restart, network), not a bad request. Optuna wraps
    SQLAlchemy's errors in StorageInternalError; the cause tells. PendingRollbackError is a session whose
    connection was invalidated by a drop mid-transaction: its next call fails until it is rolled back."""
    import sqlalchemy.exc

    exc = sqlalchemy.exc
    lost = (exc.OperationalError, exc.InterfaceError, exc.DisconnectionError, exc.PendingRollbackError)
    cause = error.__cause__ if isinstance(error, optuna.exceptions.StorageInternalError) else error
    return isinstance(cause, lost)


class RetryingStorage(BaseStorage, BaseHeartbeat):
    """An RDB storage whose calls survive a database restart or outage: a call failing with a lost
    connection is retried with exponential back-off (RETRY_FIRST_S doubling up to RETRY_MAX_S) for up to
    ``retry_for_s()`` (15 minutes by default), and the process says so in a few lines (``_Outage``).

    Retrying is safe because every call is idempotent or made so here: reads, attribute / intermediate
    value / heartbeat writes (upserts) and parameters (a repeated insert is ignored by Optuna) can simply run
    again. The three writes whose first attempt may have committed before the connection dropped are checked
    before they run again: a study that exists already is returned, a queued (WAITING) trial identical to the
    one being created is returned instead of a second copy, and a trial already in the requested state
    (finished with the same values, or claimed RUNNING since this call began) counts as done."""

    def __init__(self, inner: RDBStorage):
        self.inner = inner

    def _call(self, what: str, fn: Callable[[], Any], check: Callable[[], Any] | None = None) -> Any:
        """``fn()``, retried on a lost connection; before a retry ``check()`` may return the result of an
        attempt that committed (anything but None)."""
        deadline, pause, attempt = time.monotonic() + retry_for_s(), RETRY_FIRST_S, 0
        while True:
            try:
                if attempt and check is not None:
                    done = check()
                    if done is not None:
                        _OUTAGE.back()
                        return done
                result = fn()
                if attempt:
                    _OUTAGE.back()
                return result
            except Exception as e:
                if not _transient(e) or time.monotonic() + pause > deadline:
                    raise
                attempt += 1
                _OUTAGE.lost(what, e.__cause__ or e, deadline)
                time.sleep(pause)
                pause = min(2 * pause, RETRY_MAX_S)
                self.inner.scoped_session.remove()  # the retry starts on a new session, not a broken one

    # -- the writes a retry could repeat -----------------------------------------------------------------
    def create_new_study(self, directions: Any, study_name: str | None = None) -> int:
        def existing() -> int | None:
            try:
                return self.inner.get_study_id_from_name(study_name) if study_name else None
            except KeyError:
                return None

        create = lambda: self.inner.create_new_study(directions, study_name)  # noqa: E731
        return int(self._call("create_new_study", create, existing))

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        def queued_copy() -> int | None:
            if template_trial is None or template_trial.state != TrialState.WAITING:
                return None
            for t in self.inner.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
                if (t.params, t.user_attrs, t.system_attrs) == (
                    template_trial.params,
                    template_trial.user_attrs,
                    template_trial.system_attrs,
                ):
                    return t._trial_id
            return None

        create = lambda: self.inner.create_new_trial(study_id, template_trial)  # noqa: E731
        return int(self._call("create_new_trial", create, queued_copy))

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        since = datetime.datetime.now()  # Optuna stamps datetime_start with the client's clock

        def committed() -> bool | None:
            t = self.inner.get_trial(trial_id)
            if t.state != state:
                return None
            if state == TrialState.RUNNING:
                return True if t.datetime_start is not None and t.datetime_start >= since else None
            return True if values is None or list(values) == t.values else None

        update = lambda: self.inner.set_trial_state_values(trial_id, state, values)  # noqa: E731
        return bool(self._call("set_trial_state_values", update, committed))

    # -- idempotent calls ----------------------------------------------------------------------------------
    def delete_study(self, study_id: int) -> None:
        self._call("delete_study", lambda: self.inner.delete_study(study_id))

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._call("set_study_user_attr", lambda: self.inner.set_study_user_attr(study_id, key, value))

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._call("set_study_system_attr", lambda: self.inner.set_study_system_attr(study_id, key, value))

    def get_study_id_from_name(self, study_name: str) -> int:
        return int(self._call("get_study_id", lambda: self.inner.get_study_id_from_name(study_name)))

    def get_study_name_from_id(self, study_id: int) -> str:
        return str(self._call("get_study_name_from_id", lambda: self.inner.get_study_name_from_id(study_id)))

    def get_study_directions(self, study_id: int) -> Any:
        return self._call("get_study_directions", lambda: self.inner.get_study_directions(study_id))

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return dict(self._call("get_study_user_attrs", lambda: self.inner.get_study_user_attrs(study_id)))

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return dict(self._call("get_study_system_attrs", lambda: self.inner.get_study_system_attrs(study_id)))

    def get_all_studies(self) -> Any:
        return self._call("get_all_studies", self.inner.get_all_studies)

    def set_trial_param(
        self, trial_id: int, param_name: str, param_value_internal: float, distribution: Any
    ) -> None:
        self._call(
            "set_trial_param",
            lambda: self.inner.set_trial_param(trial_id, param_name, param_value_internal, distribution),
        )

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return int(
            self._call(
                "get_trial_id",
                lambda: self.inner.get_trial_id_from_study_id_trial_number(study_id, trial_number),
            )
        )

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self._call(
            "set_trial_intermediate_value",
            lambda: self.inner.set_trial_intermediate_value(trial_id, step, intermediate_value),
        )

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._call("set_trial_user_attr", lambda: self.inner.set_trial_user_attr(trial_id, key, value))

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._call("set_trial_system_attr", lambda: self.inner.set_trial_system_attr(trial_id, key, value))

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._call("get_trial", lambda: self.inner.get_trial(trial_id))  # type: ignore[no-any-return]

    def get_all_trials(self, study_id: int, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        trials = self._call("get_all_trials", lambda: self.inner.get_all_trials(study_id, deepcopy, states))
        return list(trials)

    def remove_session(self) -> None:
        self.inner.remove_session()

    def record_heartbeat(self, trial_id: int) -> None:
        self._call("record_heartbeat", lambda: self.inner.record_heartbeat(trial_id))

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return list(self._call("get_stale_trial_ids", lambda: self.inner._get_stale_trial_ids(study_id)))

    def get_heartbeat_interval(self) -> int | None:
        return self.inner.get_heartbeat_interval()

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.inner.get_heartbeat_stale_trial_callback()
