"""store.RetryingStorage: a lost database connection is retried with back-off, and a write whose first
attempt committed before the connection dropped is not repeated (no duplicated trial, no false failure)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
import sqlalchemy.exc
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from harness import store


def _lost() -> optuna.exceptions.StorageInternalError:
    """What Optuna raises when the server went away mid-call."""
    err = optuna.exceptions.StorageInternalError("An exception is raised during the commit.")
    err.__cause__ = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection"))
    return err


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """A fake clock for store's back-off: sleeping advances it; returns the pauses taken."""
    now, pauses = [0.0], []

    def sleep(s: float) -> None:
        pauses.append(s)
        now[0] += s

    monkeypatch.setattr(store, "time", SimpleNamespace(monotonic=lambda: now[0], sleep=sleep))
    return pauses


@pytest.fixture
def storage(tmp_path: Path) -> store.RetryingStorage:
    return store.RetryingStorage(RDBStorage(f"sqlite:///{tmp_path / 'db.sqlite'}"))


def _fail_first(
    monkeypatch: pytest.MonkeyPatch, inner: Any, name: str, commit: bool, times: int = 1
) -> None:
    """``inner.name`` loses the connection on its first ``times`` calls (after committing if ``commit``)."""
    real: Callable[..., Any] = getattr(inner, name)
    calls = [0]

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] <= times:
            if commit:
                real(*args, **kwargs)
            raise _lost()
        return real(*args, **kwargs)

    monkeypatch.setattr(inner, name, flaky)


def test_lost_connection_is_retried_with_exponential_back_off(
    storage: store.RetryingStorage,
    monkeypatch: pytest.MonkeyPatch,
    clock: list[float],
    caplog: pytest.LogCaptureFixture,
) -> None:
    _fail_first(monkeypatch, storage.inner, "get_all_studies", commit=False, times=4)
    with caplog.at_level(logging.WARNING, logger="harness.store"):
        assert storage.get_all_studies() == []
    assert clock == [0.5, 1.0, 2.0, 4.0]
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2, said  # one line when it is lost, one when it is back: not one per retry
    assert "lost the database connection in get_all_studies" in said[0] and "server closed" in said[0]
    assert "waiting for it for up to 900 s" in said[0]
    assert said[1] == "storage: the database is back after 8 s"


def test_a_long_outage_is_waited_out_with_a_line_a_minute(
    storage: store.RetryingStorage,
    monkeypatch: pytest.MonkeyPatch,
    clock: list[float],
    caplog: pytest.LogCaptureFixture,
) -> None:
    _fail_first(monkeypatch, storage.inner, "get_all_studies", commit=False, times=40)  # ~5 minutes away
    with caplog.at_level(logging.WARNING, logger="harness.store"):
        assert storage.get_all_studies() == []
    assert 280 < sum(clock) < 320  # before: given up after 60 s, the trial recorded as failed
    said = [r.getMessage() for r in caplog.records]
    assert sum("still no database" in m for m in said) == 4 and "back after" in said[-1], said


def test_the_retry_window_is_set_by_the_environment(
    storage: store.RetryingStorage, monkeypatch: pytest.MonkeyPatch, clock: list[float]
) -> None:
    monkeypatch.setenv("DMLH_STORAGE_RETRY_FOR", "30")
    _fail_first(monkeypatch, storage.inner, "get_all_studies", commit=False, times=1000)
    with pytest.raises(optuna.exceptions.StorageInternalError):
        storage.get_all_studies()
    assert 20 < sum(clock) <= 30


def test_gives_up_after_the_retry_window_and_never_retries_bad_requests(
    storage: store.RetryingStorage, monkeypatch: pytest.MonkeyPatch, clock: list[float]
) -> None:
    _fail_first(monkeypatch, storage.inner, "get_all_studies", commit=False, times=1000)
    with pytest.raises(optuna.exceptions.StorageInternalError):
        storage.get_all_studies()
    assert sum(clock) <= store.RETRY_FOR_S and max(clock) == store.RETRY_MAX_S
    clock.clear()
    with pytest.raises(KeyError):
        storage.get_study_id_from_name("nope")
    assert clock == []


def test_a_committed_enqueue_is_not_duplicated(
    storage: store.RetryingStorage, monkeypatch: pytest.MonkeyPatch, clock: list[float]
) -> None:
    study = optuna.create_study(study_name="s", storage=storage)
    _fail_first(monkeypatch, storage.inner, "create_new_trial", commit=True)
    study.enqueue_trial({}, user_attrs={"unit": "a/seed=0"})
    study.enqueue_trial({}, user_attrs={"unit": "a/seed=1"})  # a different unit is still created
    assert [t.user_attrs["unit"] for t in study.get_trials()] == ["a/seed=0", "a/seed=1"]
    assert clock == [0.5]


def test_a_committed_claim_and_tell_count_as_done(
    storage: store.RetryingStorage, monkeypatch: pytest.MonkeyPatch, clock: list[float]
) -> None:
    study = optuna.create_study(study_name="s", storage=storage)
    study.enqueue_trial({}, user_attrs={"unit": "u"})
    trial_id = study.get_trials()[0]._trial_id
    _fail_first(monkeypatch, storage.inner, "set_trial_state_values", commit=True, times=2)
    assert storage.set_trial_state_values(trial_id, TrialState.RUNNING)  # our claim, not another worker's
    assert storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [0.5])  # no UpdateFinishedTrialError
    t = storage.get_trial(trial_id)
    assert t.state == TrialState.COMPLETE and t.values == [0.5] and len(study.get_trials()) == 1
    # a trial another worker claimed before this call began is not ours
    study.enqueue_trial({}, user_attrs={"unit": "v"})
    other = study.get_trials()[1]._trial_id
    assert storage.set_trial_state_values(other, TrialState.RUNNING)
    assert not storage.set_trial_state_values(other, TrialState.RUNNING)


def test_a_committed_study_creation_returns_the_study(
    storage: store.RetryingStorage, monkeypatch: pytest.MonkeyPatch, clock: list[float]
) -> None:
    _fail_first(monkeypatch, storage.inner, "create_new_study", commit=True)
    study = optuna.create_study(study_name="s", storage=storage)
    assert [s.study_name for s in storage.get_all_studies()] == ["s"]
    assert study._study_id == storage.get_study_id_from_name("s")


def test_a_session_left_in_an_invalid_transaction_by_a_drop_is_retried(
    storage: store.RetryingStorage, clock: list[float]
) -> None:
    """After a drop mid-transaction the next call on the session fails with PendingRollbackError
    (seen in the PostgreSQL restart test); it is a lost connection, retried on a fresh session."""
    optuna.create_study(storage=storage.inner, study_name="s")
    storage.inner.scoped_session().connection().invalidate()  # what a server restart does to it
    with pytest.raises(optuna.exceptions.StorageInternalError) as raised:
        storage.inner.get_all_studies()
    assert isinstance(raised.value.__cause__, sqlalchemy.exc.PendingRollbackError)
    storage.inner.scoped_session().connection().invalidate()
    assert [s.study_name for s in storage.get_all_studies()] == ["s"]
    assert clock == [0.5]
