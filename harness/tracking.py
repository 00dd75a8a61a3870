"""Experiment trackers (``--track``, a study's ``track:``): every finished run logged to MLflow, TensorBoard
or Weights & Biases through the tracker's own client, so runs and studies read in the tools researchers
already keep their experiments in.

A run logs its resolved config as params, its per-epoch history as metrics (step = epoch), its final metrics
as ``final/<metric>`` and ``study`` / ``arm`` / ``stage`` / ``seed`` as tags; a study's report figures go to
the study once its report is written. A study reads as nested runs: an MLflow parent run with a child run per
trained run; a TensorBoard log dir per study with a subdir per run; W&B runs grouped by study, ``job_type``
= stage.

Trackers are components of kind ``tracker`` in the one registry (a plugin may add one). A missing client is a
``ConfigError`` naming the extra to install, before any training. A tracker that fails (an unreachable server,
a client error) says so in one warning line and is dropped: it never fails or stops a run or a study.
Worker processes get the picklable ``TrackSpec`` of each tracker (with the MLflow parent run's id) and open
their own clients.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pandas as pd
import yaml

from harness.errors import ConfigError
from harness.registry import register, registry
from harness.rundir import is_complete

log = logging.getLogger(__name__)

KIND = "tracker"
#: The MLflow experiment and the W&B project runs go to unless MLFLOW_EXPERIMENT_NAME / WANDB_PROJECT (or
#: ``wandb:PROJECT``) say otherwise.
PROJECT = "dml-harness"
#: What a study's parent run (MLflow) carries under ``ROLE_TAG``, to be found again when the study resumes.
ROLE_TAG, STUDY_ROLE = "dmlh.role", "study"

T = TypeVar("T")


@dataclass(frozen=True)
class TrackSpec:
    """One tracker as ``--track`` names it (``kind[:target]``), picklable for worker processes; ``parent`` is
    the study's MLflow parent run."""

    kind: str
    target: str | None = None
    parent: str | None = None


@dataclass(frozen=True)
class RunRecord:
    """What a tracker logs of one finished run, read from its run folder (``harness.rundir``)."""

    name: str
    config: dict[str, Any]
    #: (epoch, the epoch's numeric history columns)
    history: list[tuple[int, dict[str, float]]]
    metrics: dict[str, float]
    tags: dict[str, str]
    study: str | None = None

    @classmethod
    def read(cls, folder: Path, name: str, tags: Mapping[str, object], study: str | None) -> RunRecord:
        config = yaml.safe_load((folder / "config.yaml").read_text())
        summary = json.loads((folder / "metrics.json").read_text())
        metrics = {k: float(v) for k, v in summary["metrics"].items() if _finite(v)}
        metrics["best_epoch"] = float(summary["best_epoch"])
        history = []
        for row in pd.read_csv(folder / "history.csv").to_dict("records"):
            values = {str(k): float(v) for k, v in row.items() if k != "epoch" and _finite(v)}
            history.append((int(row["epoch"]), values))
        all_tags = {"seed": config.get("seed"), **({"study": study} if study else {}), **tags}
        return cls(name, config, history, metrics, {k: str(v) for k, v in all_tags.items()}, study)

    def params(self) -> dict[str, str]:
        """The resolved config as flat dotted params (``loss.margin``)."""
        return {k: str(v) for k, v in flatten(self.config).items()}


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{dotted.path: leaf}`` (lists are leaves)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class Tracker(ABC):
    """An experiment tracker. The public methods are the guarded calls the engine makes: the first exception
    of a client is logged once and turns the tracker off; subclasses implement the ``_`` methods."""

    #: The module of the tracker's client, and the extra of dml-harness that installs it.
    client: ClassVar[str]
    extra: ClassVar[str]

    def __init__(self, target: str | None = None):
        self.target = target
        self.failed = False

    @classmethod
    def default_target(cls, results: Path) -> str | None:
        """The target without ``:target`` (None: the client's own default)."""
        return None

    def start_study(self, study: str) -> str | None:
        """In the study's main process before any run: the id of the study's parent run, if the tracker
        has one."""
        return self._guarded("open the study", self._start_study, study)

    def log_run(self, run: RunRecord, parent: str | None) -> None:
        self._guarded(f"log run {run.name!r}", self._log_run, run, parent)

    def end_study(self, study: str, plots: Path | None, parent: str | None) -> None:
        """After the study (and its report): its figures in ``plots``, and the study marked finished."""
        self._guarded("log the report", self._end_study, study, plots, parent)

    def _guarded(self, what: str, call: Callable[..., T], *args: Any) -> T | None:
        if self.failed:
            return None
        try:
            return call(*args)
        except Exception as e:  # a tracker never fails or stops a run or a study
            self.failed = True
            reason = (str(e).strip().splitlines() or [""])[0][:300]
            log.warning(
                "tracker %s (%s) could not %s: %s: %s; going on without it",
                self.client,
                self.target or "default",
                what,
                type(e).__name__,
                reason,
            )
            return None

    def _start_study(self, study: str) -> str | None:
        """Called once per study invocation in its main process, before any worker starts: open the study
        (e.g. create or find its parent run) and return what each run of it needs (a parent run id)."""
        return None

    @abstractmethod
    def _log_run(self, run: RunRecord, parent: str | None) -> None:
        """Called in the process that ran it (a worker process of a study) once a run's record is written:
        log it; ``parent`` is what ``_start_study`` returned (None for a single ``dmlh run``)."""

    @abstractmethod
    def _end_study(self, study: str, plots: Path | None, parent: str | None) -> None:
        """Called in the study's main process after its report (``plots``: the report's figures folder;
        None without a report): log the figures, close the study."""


def _pngs(plots: Path | None) -> list[Path]:
    return sorted(plots.glob("*.png")) if plots is not None and plots.is_dir() else []


@register(KIND, "mlflow")
class MLflowTracker(Tracker):
    """MLflow, ``mlflow[:URI]``: a parent run per study, a child run per run.

    URI defaults to MLflow's own (MLFLOW_TRACKING_URI); the experiment is MLFLOW_EXPERIMENT_NAME or
    dml-harness."""

    client, extra = "mlflow", "mlflow"

    def __init__(self, target: str | None = None):
        super().__init__(target)
        self._api: Any = None
        self._experiment = ""

    def _open(self) -> Any:
        if self._api is None:
            from mlflow.tracking import MlflowClient

            if not logging.getLogger("harness").isEnabledFor(logging.DEBUG):
                logging.getLogger("mlflow").setLevel(logging.WARNING)  # its database setup lines
            api = MlflowClient(tracking_uri=self.target)
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
            found = api.get_experiment_by_name(name)
            self._experiment = found.experiment_id if found else api.create_experiment(name)
            self._api = api
        return self._api

    def _start_study(self, study: str) -> str:
        api = self._open()
        query = f"tags.study = '{study}' and tags.`{ROLE_TAG}` = '{STUDY_ROLE}'"
        found = api.search_runs([self._experiment], query, max_results=1)
        if found:  # a resumed study: its runs join the same parent
            api.update_run(found[0].info.run_id, status="RUNNING")
            return str(found[0].info.run_id)
        run = api.create_run(self._experiment, run_name=study, tags={"study": study, ROLE_TAG: STUDY_ROLE})
        return str(run.info.run_id)

    def _log_run(self, run: RunRecord, parent: str | None) -> None:
        from mlflow.entities import Metric, Param

        api = self._open()
        tags = {**run.tags, **({"mlflow.parentRunId": parent} if parent else {})}
        run_id = api.create_run(self._experiment, run_name=run.name, tags=tags).info.run_id
        now = int(time.time() * 1000)
        metrics = [
            Metric(_mlflow_key(k), v, now, epoch) for epoch, row in run.history for k, v in row.items()
        ] + [Metric(_mlflow_key(f"final/{k}"), v, now, 0) for k, v in run.metrics.items()]
        params = [Param(k, v[:6000]) for k, v in run.params().items()]  # MLflow's longest param value
        for i in range(0, len(params), 100):  # MLflow's batch limits: 100 params, 1000 metrics
            api.log_batch(run_id, params=params[i : i + 100])
        for i in range(0, len(metrics), 1000):
            api.log_batch(run_id, metrics=metrics[i : i + 1000])
        api.set_terminated(run_id)

    def _end_study(self, study: str, plots: Path | None, parent: str | None) -> None:
        if parent is None:
            return
        api = self._open()
        if plots is not None and plots.is_dir():
            api.log_artifacts(parent, str(plots), "plots")
        api.set_terminated(parent)


def _mlflow_key(key: str) -> str:
    """A metric name MLflow accepts (``val/recall@1`` → ``val/recall_at_1``)."""
    return re.sub(r"[^\w./\- :]", "_", key.replace("@", "_at_"))


@register(KIND, "tensorboard")
class TensorBoardTracker(Tracker):
    """TensorBoard, ``tensorboard[:DIR]``: a log dir per study, a subdir per run.

    DIR defaults to <results>/tensorboard; a study's runs go to DIR/<study>/<run>, a single run to
    DIR/runs/<name>; the config and the tags are its HParams."""

    client, extra = "tensorboard", "tensorboard"

    @classmethod
    def default_target(cls, results: Path) -> str:
        return str(results / "tensorboard")

    def _writer(self, study: str | None, name: str) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(Path(self.target or "runs") / (study or "runs") / _slug(name)))

    def _log_run(self, run: RunRecord, parent: str | None) -> None:
        with self._writer(run.study, run.name) as w:
            for epoch, row in run.history:
                for key, value in row.items():
                    w.add_scalar(key, value, epoch)
            hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in _hparams(run)}
            last = run.history[-1][0] if run.history else 0
            final = {f"final/{k}": v for k, v in run.metrics.items()}
            w.add_hparams(hparams, final, run_name=".", global_step=last)  # "." : in the run's own dir

    def _end_study(self, study: str, plots: Path | None, parent: str | None) -> None:
        import numpy as np
        from PIL import Image

        pngs = _pngs(plots)
        if pngs:
            with self._writer(study, "report") as w:
                for png in pngs:
                    w.add_image(png.stem, np.asarray(Image.open(png).convert("RGB")), dataformats="HWC")


def _hparams(run: RunRecord) -> Iterable[tuple[str, Any]]:
    yield from flatten(run.config).items()
    yield from ((f"tag.{k}", v) for k, v in run.tags.items())


def _slug(name: str) -> str:
    """A run name as a folder name."""
    return re.sub(r"[^\w.,=+@-]+", "_", name).strip("_") or "run"


@register(KIND, "wandb")
class WandbTracker(Tracker):
    """Weights & Biases, ``wandb[:PROJECT]``: group = study, job_type = stage.

    PROJECT defaults to WANDB_PROJECT or dml-harness; WANDB_MODE=offline works as usual. The final metrics go
    to the run's summary."""

    client, extra = "wandb", "wandb"

    def _init(self, **kwargs: Any) -> Any:
        import wandb

        project = self.target or os.environ.get("WANDB_PROJECT") or PROJECT
        settings = wandb.Settings(silent=True, console="off")  # our log stays ours
        return wandb.init(project=project, reinit="create_new", settings=settings, **kwargs)

    def _log_run(self, run: RunRecord, parent: str | None) -> None:
        tags = [f"{k}={run.tags[k]}"[:64] for k in ("study", "arm", "stage", "seed") if k in run.tags]
        config = {**run.config, "dmlh": run.tags}
        job = run.tags.get("stage", "run")
        r = self._init(name=run.name, group=run.study, job_type=job, config=config, tags=tags)
        try:
            for epoch, row in run.history:
                r.log(row, step=epoch)
            r.summary.update({f"final/{k}": v for k, v in run.metrics.items()})
        finally:
            r.finish()

    def _end_study(self, study: str, plots: Path | None, parent: str | None) -> None:
        import wandb

        pngs = _pngs(plots)
        if pngs:
            tags = [f"study={study}"[:64]]
            r = self._init(name=f"{study} report", group=study, job_type="report", tags=tags)
            try:
                r.log({f"plots/{p.stem}": wandb.Image(str(p)) for p in pngs})
            finally:
                r.finish()


# ---------------------------------------------------------------------------------------------------------
# The engine's side: parse, start a study, log runs, end a study
# ---------------------------------------------------------------------------------------------------------


def tracker_class(kind: str) -> type[Tracker]:
    """The registered tracker ``kind``: a ``Tracker`` subclass."""
    obj = registry(KIND).get(kind).obj
    if not (isinstance(obj, type) and issubclass(obj, Tracker)):
        raise ConfigError(f"tracker {kind!r} ({obj!r}) is not a subclass of harness.tracking.Tracker")
    return obj


def parse(texts: str | Iterable[str] | None, results: str | Path, where: str = "--track") -> list[TrackSpec]:
    """``mlflow[:URI]``, ``tensorboard[:DIR]``, ``wandb[:PROJECT]`` (a plugin's tracker likewise) as specs
    with their default targets. Raises ConfigError, before anything trains: an unknown tracker (with the
    close names) or one whose client is not installed (with the extra that installs it)."""
    reg = registry(KIND)
    specs, problems = [], []
    for text in [texts] if isinstance(texts, str) else list(texts or []):
        kind, _, target = str(text).partition(":")
        if kind not in reg:
            problems.append(reg.unknown_message(kind, where))
            continue
        cls = tracker_class(kind)
        if importlib.util.find_spec(cls.client) is None:
            problems.append(
                f"{where}: {kind} needs its client {cls.client!r}: pip install 'dml-harness[{cls.extra}]'"
            )
            continue
        specs.append(TrackSpec(kind, target or cls.default_target(Path(results))))
    if problems:
        raise ConfigError(problems)
    return specs


class Tracking:
    """The trackers of one process. Pickled into a worker process it is its specs (with the study's parent
    run, a failed tracker left out), and the worker opens its own clients."""

    def __init__(self, specs: Iterable[TrackSpec] = ()):
        self._open(list(specs))

    def _open(self, specs: list[TrackSpec]) -> None:
        self.specs = specs
        self.trackers: list[Tracker] = [tracker_class(s.kind)(s.target) for s in specs]

    def __getstate__(self) -> dict[str, list[TrackSpec]]:
        return {"specs": [s for s, t in zip(self.specs, self.trackers, strict=True) if not t.failed]}

    def __setstate__(self, state: dict[str, list[TrackSpec]]) -> None:
        self._open(state["specs"])

    def __bool__(self) -> bool:
        return bool(self.specs)

    def start_study(self, study: str) -> None:
        """Open the study in every tracker (an MLflow parent run, created or found again), before any run."""
        self.specs = [
            replace(s, parent=t.start_study(study)) for s, t in zip(self.specs, self.trackers, strict=True)
        ]

    def log_run(self, folder: Path, name: str, tags: Mapping[str, object], study: str | None = None) -> None:
        """Log the complete run record in ``folder`` to every tracker."""
        if not self or not is_complete(folder):
            return
        run = RunRecord.read(folder, name, tags, study)
        for spec, tracker in zip(self.specs, self.trackers, strict=True):
            tracker.log_run(run, spec.parent)

    def log_unit(self, folder: Path, study: str, attrs: Mapping[str, Any], trial: int) -> None:
        """Log a study's unit (a tune slot or a final seed, ``harness.study.spec.Unit.attrs``) as a run of
        the study, named and tagged by its arm, stage and slot or seed."""
        literature = attrs.get("protocol") == "literature"
        which = f"tune {attrs['slot']}" if attrs["stage"] == "tune" else f"seed {attrs['seed']}"
        name = f"{attrs['arm']} {'literature ' if literature else ''}{which}"
        tags = {k: attrs[k] for k in ("arm", "stage", "protocol", "slot") if k in attrs}
        self.log_run(folder, name, {**tags, "trial": trial}, study)

    def end_study(self, study: str, plots: Path | None) -> None:
        """After the study's report: its figures (``plots``), and the study marked finished."""
        for spec, tracker in zip(self.specs, self.trackers, strict=True):
            tracker.end_study(study, plots, spec.parent)
