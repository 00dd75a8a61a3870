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

from harness.config import RunConfig, assign, validate
from harness.errors import HarnessError, TrainingError
from harness.store import tune_study_name
from harness.study.devices import trial_device
from harness.study.queue import Snapshot, WorkQueue
from harness.study.spec import Arm, StudySpec, Unit
from harness.tracking import Tracking

log = logging.getLogger(__name__)

#: What a tune trial's config sets: it selects on validation classes and never embeds the test classes
#: (they are touched by final runs only), so its run record has no test metric.
VALIDATION_ONLY: dict[str, Any] = {"eval.test": False, "train.best_test_every": None}


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

    def __init__(
        self,
        spec: StudySpec,
        queue: WorkQueue,
        folder: Path,
        world_size: int = 1,
        tracking: Tracking | None = None,
    ):
        self.spec = spec
        self.queue = queue
        self.folder = folder
        #: GPUs of each trial (``--gpus-per-trial``): its runs train with DDP over that many ranks.
        self.world_size = world_size
        #: The experiment trackers each finished unit is logged to (``--track``).
        self.tracking = tracking or Tracking()

    def _resolve(self, unit: Unit, trial: optuna.Trial, snap: Snapshot) -> tuple[dict[str, Any], RunConfig]:
        """The tuned values and the RunConfig of ``unit``: sampled (tune), the arm's best tuned config
        with the unit's seed (fair final; retrained on every training class with ``final.refit``), or the
        arm's literature recipe with it (literature)."""
        arm = self.spec.arm(unit.attrs["arm"])
        if unit.attrs["stage"] == "tune":
            tuned = self.spec.suggest(trial, arm)
            return tuned, self._placed(self.spec.config(arm, {**tuned, **VALIDATION_ONLY}))
        if unit.attrs.get("protocol") == "literature":
            return {}, self._placed(self.spec.literature_config(arm, unit.attrs["seed"]))
        tuned = self._best_tuned(arm, snap)
        return tuned, self._placed(self.spec.final_config(arm, tuned, unit.attrs["seed"]))

    def _placed(self, cfg: RunConfig) -> RunConfig:
        """``cfg`` on this worker's GPUs: ``train.distributed.world_size`` from ``--gpus-per-trial``."""
        if self.world_size == 1:
            return cfg
        return validate(assign(cfg.to_dict(), {"train.distributed.world_size": self.world_size}))

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
        study = self.queue.studies[unit.study]
        trial, what = self._open(unit, study, trial_id)
        t0 = time.perf_counter()
        try:
            tuned, cfg = self._resolve(unit, trial, snap)
        except HarnessError as e:
            self._fail(study, trial, what, e, None, t0)
            return
        run_key = cfg.run_key()
        trial.set_user_attr("run_key", run_key)
        trial.set_user_attr("tuned", tuned)
        reuse = self._reusable(run_key, snap)
        if reuse is None:
            self._train(unit, study, trial_id, trial, what, cfg, t0)
            return
        study_name, done = reuse  # the same resolved config already ran (e.g. the tune run of the final seed)
        for key in ("metrics", "best_epoch", "timings"):
            trial.set_user_attr(key, done.user_attrs.get(key))
        trial.set_user_attr("duration", 0.0)
        trial.set_user_attr("reused_from", f"{study_name}#{done.number}")
        study.tell(trial, done.value)
        log.info("%s: same config as %s#%d, reused its results", what, study_name, done.number)
        self.tracking.log_unit(self.folder / "runs" / run_key, self.spec.name, unit.attrs, trial.number)

    def _open(self, unit: Unit, study: optuna.Study, trial_id: int) -> tuple[optuna.Trial, str]:
        """The claimed trial (a tune slot gets a sampler seeded for it: reruns suggest the same values and
        any trial replays) and the words that name it in the log."""
        arm = self.spec.arm(unit.attrs["arm"])
        literature = unit.attrs.get("protocol") == "literature"
        if unit.attrs["stage"] == "tune":
            sampler_seed = self.spec.sampler_seed(arm, unit.attrs["slot"])
            study.sampler = make_sampler(self.spec, unit.study, sampler_seed)
        trial = optuna.Trial(study, trial_id)
        if unit.attrs["stage"] == "tune":
            trial.set_user_attr("sampler_seed", sampler_seed)
            return trial, f"tune trial {trial.number} ({arm.label}, slot {unit.attrs['slot']})"
        lit = "literature " if literature else ""
        return trial, f"final trial {trial.number} ({arm.label}, {lit}seed {unit.attrs['seed']})"

    def _train(
        self,
        unit: Unit,
        study: optuna.Study,
        trial_id: int,
        trial: optuna.Trial,
        what: str,
        cfg: RunConfig,
        t0: float,
    ) -> None:
        """Train ``cfg`` (reporting each epoch's validation metric to the pruner), write its run record and
        tell the trial its value: the validation metric, or for a run without validation classes (literature,
        a refit fair final) the last epoch's test metric."""
        from harness import train
        from harness.rundir import write_run

        metric, tune = self.spec.metric, unit.attrs["stage"] == "tune"
        run_dir = self.folder / "runs" / cfg.run_key()

        def reporter(epoch: int, val: dict[str, float]) -> None:
            value = val.get(metric, math.nan)
            if math.isfinite(value):
                trial.report(value, epoch)
            if tune and self.spec.pruner and trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} (val {metric} {value:.4f})")

        trial.set_user_attr("device", trial_device(cfg.train.device, cfg.train.distributed.world_size))
        log.info("%s: start (run %s)", what, cfg.run_key())
        try:
            with self.queue.heartbeat(trial_id):
                result = train.run(cfg, reporter)
        except optuna.TrialPruned as e:
            trial.set_user_attr("duration", time.perf_counter() - t0)
            trial.set_user_attr("reason", str(e))
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
        key = f"{'val' if cfg.data.val_fraction > 0 else 'test_last'}/{metric}"
        value = result.metrics.get(key, math.nan)
        trial.set_user_attr("metrics", {k: v for k, v in result.metrics.items() if math.isfinite(v)})
        trial.set_user_attr("best_epoch", result.best_epoch)
        trial.set_user_attr("timings", result.timings)  # seconds: kept out of the (reproducible) metrics
        trial.set_user_attr("duration", time.perf_counter() - t0)
        if not math.isfinite(value):
            self._fail(study, trial, what, TrainingError(f"{key} is {value}"), run_dir, t0, cfg.to_dict())
            return
        study.tell(trial, value)
        self.tracking.log_unit(run_dir, self.spec.name, unit.attrs, trial.number)
        test = result.metrics.get(f"test/{metric}")
        scored = "" if test is None else f", test {metric} {test:.4f}"  # none in a tune trial
        log.info("%s: %s %.4f%s (%.1fs)", what, key, value, scored, time.perf_counter() - t0)

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
