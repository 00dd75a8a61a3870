"""The objective adapter: one claimed unit → its RunConfig → ``train.run`` → the trial's values and the run
record. The only place where Optuna meets training (``train.run`` does not know Optuna exists)."""

from __future__ import annotations

import logging
import math
import time
import traceback
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from harness.config import RunConfig
from harness.errors import HarnessError, TrainingError
from harness.store import tune_study_name
from harness.study.queue import Snapshot, WorkQueue
from harness.study.spec import Arm, StudySpec, Unit

log = logging.getLogger(__name__)


def make_sampler(spec: StudySpec, study_name: str, seed: int | None = None) -> optuna.samplers.BaseSampler:
    """The sampler of one of the study's Optuna studies: TPE (or random) for a tune stage, random for the
    root study (whose trials have no parameters)."""
    if study_name == spec.name or spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    startup = max(2, min(10, spec.n_trials // 2))
    return optuna.samplers.TPESampler(n_startup_trials=startup, constant_liar=True, seed=seed)


def make_pruner(spec: StudySpec, study_name: str) -> optuna.pruners.BasePruner:
    """The pruner of a tune stage (deterministic: median or hyperband); never one for the final stage."""
    if study_name == spec.name or spec.pruner is None:
        return optuna.pruners.NopPruner()
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=max(2, min(5, spec.n_trials // 3)))


class Objective:
    """Runs claimed units of ``spec``, tells their trials the outcome, keeps run records in folder/runs."""

    def __init__(self, spec: StudySpec, queue: WorkQueue, folder: Path):
        self.spec = spec
        self.queue = queue
        self.folder = folder

    def _resolve(self, unit: Unit, trial: optuna.Trial, snap: Snapshot) -> tuple[dict[str, Any], RunConfig]:
        """The tuned values and the RunConfig of ``unit``: sampled (tune), the arm's best tuned config
        with the unit's seed (fair final), or the arm's literature recipe with it (literature)."""
        arm = self.spec.arm(unit.attrs["arm"])
        if unit.attrs["stage"] == "tune":
            tuned = self.spec.suggest(trial, arm)
            return tuned, self.spec.config(arm, tuned)
        if unit.attrs.get("protocol") == "literature":
            return {}, self.spec.literature_config(arm, unit.attrs["seed"])
        tuned = self._best_tuned(arm, snap)
        return tuned, self.spec.config(arm, {**tuned, "seed": unit.attrs["seed"]})

    def _best_tuned(self, arm: Arm, snap: Snapshot) -> dict[str, Any]:
        """The tuned values of the arm's best complete tune trial (by the validation objective)."""
        if not self.spec.n_trials:
            return {}
        done = [
            t
            for t in snap.trials[tune_study_name(self.spec.name, arm.label)]
            if t.state == TrialState.COMPLETE and not t.user_attrs.get("duplicate")
        ]
        if not done:
            raise TrainingError(
                f"arm {arm.label!r}: no tune trial completed, so there is no best config to rerun"
            )
        best = max(done, key=lambda t: (t.value, -t.number))
        return dict(best.user_attrs.get("tuned", {}))

    @staticmethod
    def _reusable(run_key: str, snap: Snapshot) -> tuple[str, FrozenTrial] | None:
        """A complete trial (any stage) that already ran the config ``run_key``."""
        for study_name, t in snap.all():
            if (
                t.state == TrialState.COMPLETE
                and t.user_attrs.get("run_key") == run_key
                and "metrics" in t.user_attrs
            ):
                return study_name, t
        return None

    def __call__(self, unit: Unit, trial_id: int, snap: Snapshot) -> None:
        """Run ``unit`` as trial ``trial_id`` (claimed by this worker). A failure of the run (NaN loss, OOM,
        a plugin bug) is recorded on the trial and in the run folder; the study goes on."""
        from harness import train
        from harness.rundir import write_run

        study = self.queue.studies[unit.study]
        arm = self.spec.arm(unit.attrs["arm"])
        stage = unit.attrs["stage"]
        literature = unit.attrs.get("protocol") == "literature"
        if stage == "tune":  # a sampler seeded for this slot: reruns suggest the same, any trial replays
            sampler_seed = self.spec.sampler_seed(arm, unit.attrs["slot"])
            study.sampler = make_sampler(self.spec, unit.study, sampler_seed)
        trial = optuna.Trial(study, trial_id)
        what = f"{stage} trial {trial.number} ({arm.label}, " + (
            f"{'literature ' if literature else ''}seed {unit.attrs['seed']})"
            if stage == "final"
            else f"slot {unit.attrs['slot']})"
        )
        set_attr = trial.set_user_attr
        if stage == "tune":
            set_attr("sampler_seed", sampler_seed)
        t0 = time.perf_counter()
        try:
            tuned, cfg = self._resolve(unit, trial, snap)
        except HarnessError as e:
            self._fail(study, trial, what, e, None, t0)
            return
        run_key = cfg.run_key()
        run_dir = self.folder / "runs" / run_key
        set_attr("run_key", run_key)
        set_attr("tuned", tuned)
        reuse = self._reusable(run_key, snap)
        if reuse is not None:  # the same resolved config already ran (e.g. the tune run of the final seed)
            study_name, done = reuse
            for key in ("metrics", "best_epoch"):
                set_attr(key, done.user_attrs.get(key))
            set_attr("duration", 0.0)
            set_attr("reused_from", f"{study_name}#{done.number}")
            study.tell(trial, done.value)
            log.info("%s: same config as %s#%d, reused its results", what, study_name, done.number)
            return
        metric = self.spec.metric

        def reporter(epoch: int, val: dict[str, float]) -> None:
            value = val.get(metric, math.nan)
            if math.isfinite(value):
                trial.report(value, epoch)
            if stage == "tune" and self.spec.pruner and trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} (val {metric} {value:.4f})")

        log.info("%s: start (run %s)", what, run_key)
        try:
            with self.queue.heartbeat(trial_id):
                result = train.run(cfg, reporter)
        except optuna.TrialPruned as e:
            set_attr("duration", time.perf_counter() - t0)
            set_attr("reason", str(e))
            study.tell(trial, state=TrialState.PRUNED)
            log.info("%s: %s", what, e)
            return
        except KeyboardInterrupt:
            self.queue.interrupted(unit.study, trial_id)
            raise
        except Exception as e:  # any failure of the run is recorded, the study goes on
            self._fail(study, trial, what, e, run_dir, t0, cfg.to_dict())
            return
        write_run(result, run_dir, save_checkpoint=cfg.train.save_checkpoint)
        # a literature run has no validation classes: its trial value is the last epoch's test metric
        value = result.metrics.get(f"{'test_last' if literature else 'val'}/{metric}", math.nan)
        set_attr("metrics", {k: v for k, v in result.metrics.items() if math.isfinite(v)})
        set_attr("best_epoch", result.best_epoch)
        set_attr("duration", time.perf_counter() - t0)
        if not math.isfinite(value):
            error = TrainingError(f"{'test_last' if literature else 'val'}/{metric} is {value}")
            self._fail(study, trial, what, error, run_dir, t0, cfg.to_dict())
            return
        study.tell(trial, value)
        log.info(
            "%s: val %s %.4f, test %s %.4f (%.1fs)",
            what,
            metric,
            value,
            metric,
            result.metrics.get(f"test/{metric}", math.nan),
            time.perf_counter() - t0,
        )

    def _fail(
        self,
        study: optuna.Study,
        trial: optuna.Trial,
        what: str,
        error: BaseException,
        run_dir: Path | None,
        t0: float,
        cfg: dict[str, Any] | None = None,
    ) -> None:
        """Record ``error`` on the trial (reason, traceback) and, with a run folder, as its failed.json."""
        from harness.rundir import write_failure

        reason = f"{type(error).__name__}: {error}"
        tb = "".join(traceback.format_exception(error))
        trial.set_user_attr("reason", reason)
        trial.set_user_attr("traceback", tb)
        trial.set_user_attr("duration", time.perf_counter() - t0)
        if run_dir is not None:
            record = {"trial": trial.number, "study": study.study_name, "reason": reason, "traceback": tb}
            write_failure(run_dir, record, cfg)
        study.tell(trial, state=TrialState.FAIL)
        log.warning("%s failed: %s", what, reason)
