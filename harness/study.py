"""The Optuna study runner: study YAML → arms × (tune trials, then final seeds) → results store.

A study has a ``base`` RunConfig, ``arms`` (the factors the tables report; the runner enumerates their
product itself), an optional ``tune`` stage (nuisance hyperparameters searched per arm with an equal
budget, on validation classes) and a ``final`` stage (the best config of each arm rerun with every seed;
its test metrics are what reports show). Nothing is ever selected on test classes.

Coordination goes through the Optuna storage only, so any number of worker processes on any number of
machines can share a study: every unit of work (an arm's tune slot, an arm's final seed) is enqueued as a
WAITING trial; a worker claims one atomically (WAITING → RUNNING, as ``Study.ask`` does); finished units
are skipped by a rerun; a worker that dies mid-trial is detected (same host: its process is gone; any host:
its heartbeat stops) and its trial is failed and re-queued with the same parameters. Each tune stage is its
own Optuna study (``NAME/tune/<arm>``), so TPE, the pruner and parameter importances see one arm only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import socket
import threading
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import accumulate, product
from pathlib import Path
from typing import Any, Literal

import optuna
import pydantic
import yaml
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage
from optuna.trial import FrozenTrial, TrialState
from pydantic import BaseModel, ConfigDict, Field

from harness import config
from harness.errors import ConfigError, HarnessError, TrainingError
from harness.store import (
    HEARTBEAT_GRACE_S,
    HEARTBEAT_INTERVAL_S,
    lost_numbers,
    open_storage,
    tune_study_name,
)

log = logging.getLogger(__name__)

#: A lost trial (dead worker) is re-queued at most this many times.
MAX_RETRIES = 2
#: Stop when more than this fraction of the trials finished in this run failed (after MIN_FINISHED).
FAIL_FRACTION, MIN_FINISHED = 0.5, 4
#: Seconds an idle worker waits before looking for work again.
POLL_S = 0.5
#: User attributes that identify a unit of work; copied onto a retry.
UNIT_ATTRS = ("unit", "stage", "arm", "slot", "seed", "arm_display")
HOST = socket.gethostname()
METRICS = ("map@r", "r_precision", "precision@1", "nmi")


# ---------------------------------------------------------------------------------------------------------
# The study spec
# ---------------------------------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Tune(_Model):
    n_trials: int = Field(ge=1)
    params: dict[str, Any] = Field(default_factory=dict)
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["median", "hyperband"] | None = None


class _Final(_Model):
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)


class _Objective(_Model):
    metric: str = "recall@1"
    split: Literal["val"] = "val"


class _Study(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    base: dict[str, Any] = Field(default_factory=dict)
    # a factor is a dotted config path with a list of values, or a name with named variants, each a
    # mapping of dotted paths to values (several config changes compared as one factor level)
    arms: dict[str, Any] = Field(default_factory=dict)  # checked in parse_study (one message per factor)
    baseline: dict[str, Any] | None = None
    tune: _Tune | None = None
    final: _Final = Field(default_factory=_Final)
    objective: _Objective = Field(default_factory=_Objective)
    timeout: float | None = Field(None, gt=0)


@dataclass(frozen=True)
class Arm:
    """One combination of factor values: ``raw`` is the base config with them applied (unresolved)."""

    label: str
    values: dict[str, Any]
    display: dict[str, str]
    raw: dict[str, Any]


@dataclass(frozen=True)
class TuneParam:
    """A nuisance hyperparameter: dotted config path, Optuna distribution, the condition it exists under."""

    path: str
    distribution: BaseDistribution
    when: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Unit:
    """One unit of work: an arm's tune slot or an arm's final seed, in Optuna study ``study``."""

    study: str
    key: str
    attrs: dict[str, Any]


@dataclass(frozen=True)
class StudySpec:
    """A validated study: what the runner enumerates and what reports need to know."""

    name: str
    raw: dict[str, Any]
    arms: list[Arm]
    factors: list[str]
    baseline: str | None
    params: list[TuneParam]
    n_trials: int
    sampler: str
    pruner: str | None
    seeds: list[int]
    metric: str
    timeout: float | None

    def arm(self, label: str) -> Arm:
        return next(a for a in self.arms if a.label == label)

    def config(self, arm: Arm, assignments: dict[str, Any]) -> config.RunConfig:
        """The resolved RunConfig of ``arm`` with ``assignments`` (tuned values, seed) applied."""
        return config.validate(_assign(arm.raw, assignments))

    def suggest(self, trial: optuna.Trial | optuna.trial.FixedTrial, arm: Arm) -> dict[str, Any]:
        """Sample the tune params that apply to ``arm`` (each ``when`` is checked on the config so far)."""
        tuned: dict[str, Any] = {}
        for p in self.params:
            if p.when and not _when_holds(p.when, self.config(arm, tuned).to_dict()):
                continue
            d = p.distribution
            if isinstance(d, CategoricalDistribution):
                tuned[p.path] = trial.suggest_categorical(p.path, d.choices)  # type: ignore[arg-type]
            elif isinstance(d, IntDistribution):
                tuned[p.path] = trial.suggest_int(p.path, d.low, d.high, step=d.step, log=d.log)
            else:
                assert isinstance(d, FloatDistribution)
                tuned[p.path] = trial.suggest_float(p.path, d.low, d.high, step=d.step, log=d.log)
        return tuned

    def tune_studies(self) -> list[str]:
        return [tune_study_name(self.name, a.label) for a in self.arms] if self.n_trials else []

    def units(self) -> list[Unit]:
        """Every unit of work, arm by arm: tune slots, then final seeds."""
        out = []
        for arm in self.arms:
            common = {"arm": arm.label, "arm_display": arm.display}
            tune_study = tune_study_name(self.name, arm.label)
            out += [
                Unit(tune_study, f"tune/{s}", {"stage": "tune", "slot": s, **common})
                for s in range(self.n_trials)
            ]
            out += [
                Unit(self.name, f"{arm.label}/seed={s}", {"stage": "final", "seed": s, **common})
                for s in self.seeds
            ]
        return out

    def fingerprint(self) -> str:
        """Hash of what the stored results depend on (arms, seeds and budgets may change between runs)."""
        keep = {k: self.raw.get(k) for k in ("base", "objective")}
        keep["tune_params"] = (self.raw.get("tune") or {}).get("params")
        blob = json.dumps(keep, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def meta(self) -> dict[str, Any]:
        """What the store and the reports read back (JSON)."""
        return {
            "name": self.name,
            "fingerprint": self.fingerprint(),
            "factors": self.factors,
            "arms": [{"label": a.label, "values": a.values, "display": a.display} for a in self.arms],
            "baseline": self.baseline,
            "metric": self.metric,
            "seeds": self.seeds,
            "n_trials": self.n_trials,
            "tune_params": [p.path for p in self.params],
            "spec": json.loads(json.dumps(self.raw, default=str)),
        }


def _yaml_value(value: Any) -> str:
    """``value`` as a YAML flow string that parses back to the same value (for apply_overrides)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30)
    return text.removesuffix("\n...\n").strip()


def _assign(raw: dict[str, Any], assignments: dict[str, Any]) -> dict[str, Any]:
    return config.apply_overrides(raw, [f"{p}={_yaml_value(v)}" for p, v in assignments.items()])


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):  # components in a list (regularizers) show their names
        return (
            "["
            + ",".join(str(v["name"]) if isinstance(v, dict) and "name" in v else _show(v) for v in value)
            + "]"
        )
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def _show_values(values: list[Any]) -> list[str]:
    """Short labels of a factor's values: a component dict shows its name, plus the params that tell
    apart dicts of the same name."""
    if all(isinstance(v, list) for v in values) and len(set(map(_show, values))) < len(values):
        # lists of components (regularizers) that differ only in params: the same rule over all their items
        items = _show_values([item for v in values for item in v])
        ends = list(accumulate(len(v) for v in values))
        return ["[" + ",".join(items[e - len(v) : e]) + "]" for v, e in zip(values, ends, strict=True)]
    names = [v.get("name") if isinstance(v, dict) else None for v in values]
    out = []
    for v, n in zip(values, names, strict=True):
        if not isinstance(v, dict) or n is None:
            out.append(_show(v))
            continue
        same = [w for w, m in zip(values, names, strict=True) if m == n and isinstance(w, dict)]
        differ = sorted(k for k in v if k != "name" and any(w.get(k) != v.get(k) for w in same))
        out.append(n + (f"({', '.join(f'{k}={_show(v.get(k))}' for k in differ)})" if differ else ""))
    return out


def _short_names(paths: list[str]) -> dict[str, str]:
    """``loss.name`` → ``loss``, ``model.lambda_div`` → ``lambda_div``; the full path where ambiguous."""
    short = {p: p.removesuffix(".name").split(".")[-1] for p in paths}
    counts = {s: list(short.values()).count(s) for s in short.values()}
    return {p: (s if counts[s] == 1 else p.removesuffix(".name")) for p, s in short.items()}


def _lookup(d: Any, path: str) -> Any:
    for key in path.split("."):
        if isinstance(d, list) and key.isdigit() and int(key) < len(d):
            d = d[int(key)]
        elif isinstance(d, dict) and key in d:
            d = d[key]
        else:
            raise KeyError(path)
    return d


def _matches(node: Any, want: Any) -> bool:
    """Does config value ``node`` match a ``when``/baseline value (a component matches its name)?"""
    if isinstance(want, list) and not isinstance(node, list):
        return any(_matches(node, w) for w in want)
    if isinstance(node, dict) and isinstance(want, str):
        return node.get("name") == want
    return bool(node == want)


def _when_holds(when: dict[str, Any], resolved: dict[str, Any]) -> bool:
    return all(_matches(_lookup(resolved, path), want) for path, want in when.items())


def _number(value: Any) -> float | int:
    """A YAML number; ``1e-4`` (which YAML 1.1 reads as a string) included."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{value!r} is not a number")
    if isinstance(value, (int, float)):
        return value
    return float(value)


def _distribution(path: str, spec: Any) -> tuple[TuneParam | None, list[str]]:
    """Parse ``tune.params.<path>``: a list of choices, or ``{low, high, log, step}`` / ``{choices}``,
    either with an optional ``when: {path: value}``."""
    where = f"tune.params.{path}"
    when: Any = {}
    if isinstance(spec, dict):
        spec = dict(spec)
        when = spec.pop("when", None) or {}
        unknown = sorted(set(spec) - {"low", "high", "log", "step", "choices"})
        if unknown:
            return None, [
                f"{where}: unknown key(s) {', '.join(unknown)} (allowed: low, high, log, step, choices, when)"
            ]
        if not isinstance(when, dict):
            return None, [f"{where}.when: expected a mapping of dotted path to value(s), got {when!r}"]
        if "choices" in spec:
            spec = spec["choices"]
    if isinstance(spec, list):
        if not spec or not all(c is None or isinstance(c, (bool, int, float, str)) for c in spec):
            return None, [
                f"{where}: choices must be a non-empty list of scalars (compare components with arms); "
                f"got {spec!r}"
            ]
        return TuneParam(path, CategoricalDistribution(spec), when), []
    if not isinstance(spec, dict) or "low" not in spec or "high" not in spec:
        return None, [f"{where}: expected a list of choices or {{low, high, log, step}}, got {spec!r}"]
    try:
        low, high = _number(spec["low"]), _number(spec["high"])
        step = _number(spec["step"]) if spec.get("step") is not None else None
        log_ = bool(spec.get("log", False))
        if all(isinstance(x, int) for x in (low, high, step if step is not None else 1)):
            dist: BaseDistribution = IntDistribution(int(low), int(high), log=log_, step=int(step or 1))
        else:
            dist = FloatDistribution(float(low), float(high), log=log_, step=step)
    except (ValueError, TypeError) as e:
        return None, [f"{where}: {e}"]
    return TuneParam(path, dist, when), []


def _representative(dist: BaseDistribution) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[0]
    assert isinstance(dist, (FloatDistribution, IntDistribution))
    return dist.low


def _metric_names(raw: dict[str, Any]) -> set[str] | None:
    """The validation metrics a config's evaluation produces (None if its ``eval`` or ``train`` section is
    itself invalid): NMI only where it selects the epoch (k-means is too slow to run every validation)."""
    try:
        ev = config.EvalSection.model_validate(raw.get("eval") or {})
        nmi = ev.nmi and config.TrainSection.model_validate(raw.get("train") or {}).selection_metric == "nmi"
    except pydantic.ValidationError:
        return None
    return {f"recall@{k}" for k in ev.ks} | {m for m in METRICS if m != "nmi" or nmi}


def _problems(raw: dict[str, Any]) -> tuple[config.RunConfig | None, list[str]]:
    try:
        return config.validate(raw), []
    except ConfigError as e:
        return None, e.problems


#: The sections ``Learner.build`` reads: arms equal in these assemble alike (built once).
_ASSEMBLED = (
    "backbone",
    "pooling",
    "model",
    "loss",
    "miner",
    "synthesis",
    "regularizers",
    "optimizer",
    "train",
)


def _assembly_problems(cfg: config.RunConfig) -> list[str]:
    """Problems only assembling the components shows (a stage name, a component combination): the arm's
    model, loss, regularizers and optimizer are built on the CPU without weights, so that a typo fails
    before the study starts rather than in every trial of the arm."""
    raw = cfg.to_dict()
    if "pretrained" in raw["backbone"]:
        raw["backbone"]["pretrained"] = False
    return list(_assemble(json.dumps({k: raw[k] for k in _ASSEMBLED}, sort_keys=True, default=str)))


@functools.lru_cache(maxsize=64)
def _assemble(sections: str) -> tuple[str, ...]:
    import torch

    from harness.train import Learner

    try:
        cfg = config.validate(json.loads(sections))
        Learner.build(cfg, num_classes=4, in_channels=3, device=torch.device("cpu"))
    except ConfigError as e:
        return tuple(e.problems)
    return ()


def _arm_problems(arm: Arm, params: list[TuneParam], metric: str) -> list[str]:
    """Problems of one arm: its config, the tune params that apply to it, the objective."""
    cfg, problems = _problems(arm.raw)
    resolved = cfg.to_dict() if cfg is not None else arm.raw
    applying = {}
    for p in params:
        try:
            if _when_holds(p.when, resolved):
                applying[p.path] = _representative(p.distribution)
        except KeyError as e:
            if cfg is not None:
                problems.append(f"tune.params.{p.path}.when: {e.args[0]!r} is not a config path")
    _, tuned_problems = _problems(_assign(arm.raw, applying))
    problems += [f"tune.params: {x}" for x in tuned_problems if x not in problems]
    names = _metric_names(arm.raw)
    if names is not None and metric not in names:
        problems.append(
            f"objective.metric: {metric!r} is not a validation metric of this config (have "
            f"{', '.join(sorted(names))})"
            + ("; for nmi set train.selection_metric: nmi" if metric == "nmi" else "")
        )
    if cfg is not None and not problems:
        problems += _assembly_problems(cfg)
    if cfg is not None and cfg.data.val_fraction <= 0:
        problems.append(
            "base.data.val_fraction: must be > 0 (tuning and epoch selection use validation classes, "
            "never test classes)"
        )
    return problems


def _where(problem: str, factors: list[str], label: str | None) -> str:
    """Prefix a config problem with its place in the study YAML: an arm factor, the base, or one arm."""
    if problem.startswith(("base.", "tune.", "objective.")):
        return problem if label is None else f"arms ({label}): {problem}"
    if any(problem.startswith(f + ".") or problem.startswith(f + ":") for f in factors):
        return f"arms.{problem}" if label is None else f"arms ({label}): {problem}"
    return f"base.{problem}" if label is None else f"arms ({label}): {problem}"


def _baseline(
    raw: dict[str, Any] | None, arms: list[Arm], factors: list[str]
) -> tuple[str | None, list[str]]:
    if not raw:
        return None, []
    unknown = [p for p in raw if p not in factors]
    if unknown:
        return None, [f"baseline: {', '.join(unknown)} not an arm factor (factors: {', '.join(factors)})"]
    hits = [
        a for a in arms if all(_matches(a.values[p], v) or a.display[p] == _show(v) for p, v in raw.items())
    ]
    if len(hits) != 1:
        labels = ", ".join(repr(a.label) for a in hits) or "none"
        return None, [f"baseline: {raw!r} must match exactly one arm (matches: {labels})"]
    return hits[0].label, []


def _validate_top(raw: dict[str, Any]) -> tuple[_Study, list[str]]:
    """The top-level sections; a broken section is reported and left out so that the rest is still checked."""
    try:
        return _Study.model_validate(raw), []
    except pydantic.ValidationError as e:
        problems = config._pydantic_problems(e, _Study)
        bad = {err["loc"][0] for err in e.errors() if err["loc"]}
        rest = {k: v for k, v in raw.items() if k not in bad} | ({"name": "invalid"} if "name" in bad else {})
        try:
            return _Study.model_validate(rest), problems
        except pydantic.ValidationError:
            raise ConfigError(problems) from e


def parse_study(raw: dict[str, Any], name: str | None = None) -> StudySpec:
    """Validate a study dict; raise ConfigError listing every problem (with its YAML path) at once."""
    raw = dict(raw)
    if name:
        raw["name"] = name
    model, problems = _validate_top(raw)
    for f, vs in model.arms.items():
        if not isinstance(vs, (list, dict)) or not vs:
            problems.append(
                f"arms.{f}: give a non-empty list of values or a mapping of named variants, got {vs!r}"
            )
    factors = [f for f, vs in model.arms.items() if isinstance(vs, (list, dict)) and vs]
    variants = {f: model.arms[f] for f in factors if isinstance(model.arms[f], dict)}
    for f, vs in variants.items():
        problems += [
            f"arms.{f}.{name}: a variant is a mapping of dotted config paths to values, got {v!r}"
            for name, v in vs.items()
            if not isinstance(v, dict) or not v
        ]
    levels = {f: list(model.arms[f]) for f in factors}  # a variant factor's levels are its names
    short = _short_names([f for f in factors if f not in variants]) | {f: f for f in variants}
    shown = {f: list(vs) if f in variants else _show_values(vs) for f, vs in levels.items()}
    arms = []
    for combo in product(*(range(len(levels[f])) for f in factors)):
        values = {f: levels[f][i] for f, i in zip(factors, combo, strict=True)}
        display = {f: shown[f][i] for f, i in zip(factors, combo, strict=True)}
        label = ", ".join(f"{short[f]}={display[f]}" for f in factors) or "base"
        assignments: dict[str, Any] = {}
        for f, v in values.items():
            changes = variants[f][v] if f in variants else {f: v}
            assignments.update(changes if isinstance(changes, dict) else {})
        try:
            base = {"name": model.name, **model.base}  # runs are named after their study unless base says
            arm_raw = _assign(config.name_default_components(base), assignments)
        except ConfigError as e:
            problems += [f"arms ({label}): {x}" for x in e.problems]
            continue
        arms.append(Arm(label, values, display, arm_raw))
    if len({a.label for a in arms}) != len(arms):
        problems.append("arms: two arms have the same label; give the values of a factor distinct names")
    params = []
    if model.tune is not None and not model.tune.params:
        problems.append(
            "tune.params: empty; list the hyperparameters to tune, or leave out tune: to skip the stage"
        )
    for path, dist_spec in (model.tune.params if model.tune else {}).items():
        param, errs = _distribution(path, dist_spec)
        problems += errs
        if path in factors:
            problems.append(f"tune.params.{path}: is also an arm factor (a factor is compared, not tuned)")
        if param:
            params.append(param)
    per_arm = {a.label: _arm_problems(a, params, model.objective.metric) for a in arms}
    common = set.intersection(*(set(v) for v in per_arm.values())) if per_arm else set()
    problems += [_where(p, factors, None) for p in sorted(common)]
    for label, errs in per_arm.items():
        problems += [_where(p, factors, label) for p in errs if p not in common]
    for p in params:
        if p.when and not any(_holds_for(p, a) for a in arms):
            problems.append(f"tune.params.{p.path}.when: {p.when} holds for no arm (it would never be tuned)")
    baseline, errs = _baseline(model.baseline, arms, factors)
    problems += errs
    if problems:
        raise ConfigError(problems)
    return StudySpec(
        name=model.name,
        raw=raw,
        arms=arms,
        factors=factors,
        baseline=baseline,
        params=params,
        n_trials=model.tune.n_trials if model.tune else 0,
        sampler=model.tune.sampler if model.tune else "tpe",
        pruner=model.tune.pruner if model.tune else None,
        seeds=model.final.seeds,
        metric=model.objective.metric,
        timeout=model.timeout,
    )


def _holds_for(p: TuneParam, arm: Arm) -> bool:
    try:
        return _when_holds(p.when, config.validate(arm.raw).to_dict())
    except (KeyError, ConfigError):
        return False


def load_study(path: str | Path, overrides: list[str] | None = None, name: str | None = None) -> StudySpec:
    """Load, override (``base.train.epochs=1``, ``tune.n_trials=2``) and validate a study YAML."""
    return parse_study(config.apply_overrides(config.load_yaml(path), list(overrides or [])), name)


# ---------------------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    """Everything a worker process needs (picklable)."""

    spec: StudySpec
    storage: str | None
    results: Path
    invocation: str
    threads: int
    deadline: float | None
    log_level: int


def _unit_status(trials: list[FrozenTrial]) -> str:
    states = {t.state for t in trials}
    if states & {TrialState.COMPLETE, TrialState.PRUNED}:
        return "done"
    if states & {TrialState.RUNNING, TrialState.WAITING}:
        return "pending"
    return "failed" if TrialState.FAIL in states else "missing"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Snapshot:
    """All trials of the study's Optuna studies at one moment, grouped by unit."""

    def __init__(self, studies: dict[str, optuna.Study], spec: StudySpec):
        self.trials = {name: s.get_trials(deepcopy=False) for name, s in studies.items()}
        self.units: dict[tuple[str, str], list[FrozenTrial]] = {(u.study, u.key): [] for u in spec.units()}
        for sname, trials in self.trials.items():
            for t in trials:
                key = (sname, t.user_attrs.get("unit", ""))
                if key in self.units and not t.user_attrs.get("duplicate"):
                    self.units[key].append(t)

    def status(self, unit: Unit) -> str:
        return _unit_status(self.units[(unit.study, unit.key)])

    def all(self) -> Iterator[tuple[str, FrozenTrial]]:
        for sname, trials in self.trials.items():
            for t in trials:
                yield sname, t


class _Worker:
    """Claims queued units and runs them until every unit is settled (done or failed)."""

    def __init__(self, ctx: _Context):
        self.ctx = ctx
        self.spec = ctx.spec
        self.folder = ctx.results / self.spec.name
        self.storage = open_storage(
            ctx.storage, self.spec.name, ctx.results, create=True, on_stale=self._on_stale
        )
        self._requeued = False
        self.journal = isinstance(self.storage, JournalStorage)
        self.heartbeats = self.folder / "heartbeats"
        self.studies = {
            name: optuna.load_study(
                study_name=name, storage=self.storage, sampler=self._sampler(name), pruner=self._pruner(name)
            )
            for name in [self.spec.name, *self.spec.tune_studies()]
        }
        self.ids = {name: self.storage.get_study_id_from_name(name) for name in self.studies}

    def _sampler(self, study: str) -> optuna.samplers.BaseSampler:
        if study == self.spec.name or self.spec.sampler == "random":
            return optuna.samplers.RandomSampler()
        startup = max(2, min(10, self.spec.n_trials // 2))
        return optuna.samplers.TPESampler(n_startup_trials=startup, constant_liar=True)

    def _pruner(self, study: str) -> optuna.pruners.BasePruner:
        if study == self.spec.name or self.spec.pruner is None:
            return optuna.pruners.NopPruner()
        if self.spec.pruner == "hyperband":
            return optuna.pruners.HyperbandPruner()
        return optuna.pruners.MedianPruner(n_startup_trials=max(2, min(5, self.spec.n_trials // 3)))

    # -- the loop ---------------------------------------------------------------------------------
    def work(self) -> int:
        """Run units until all are settled, the deadline passes or most trials fail; return how many ran."""
        ran = 0
        while True:
            snap = _Snapshot(self.studies, self.spec)
            if self._reap_lost(snap):
                continue
            self._check_failures(snap)
            if self.ctx.deadline is not None and time.time() > self.ctx.deadline:
                log.info("study %s: timeout reached, not starting new trials", self.spec.name)
                return ran
            units = self.spec.units()
            if all(snap.status(u) in ("done", "failed", "missing") for u in units):
                return ran
            for unit, trial in self._candidates(snap, units):
                trial_id = self._claim(unit, trial)
                if trial_id is not None:
                    self._execute(unit, trial_id, snap)
                    ran += 1
                    break
            else:
                time.sleep(POLL_S)

    def _candidates(self, snap: _Snapshot, units: list[Unit]) -> Iterator[tuple[Unit, FrozenTrial]]:
        """Queued trials of units nobody runs; finals first (once their arm's tune stage is settled)."""
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
            if u.attrs["stage"] == "final" and not tune_settled[u.attrs["arm"]]:
                continue
            if snap.status(u) != "pending" or any(t.state == TrialState.RUNNING for t in trials):
                continue
            yield u, min((t for t in trials if t.state == TrialState.WAITING), key=lambda t: t.number)

    def _claim(self, unit: Unit, trial: FrozenTrial) -> int | None:
        """WAITING → RUNNING atomically; None if another worker was faster (or claimed a duplicate)."""
        study_id = self.ids[unit.study]
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        try:
            if not self.storage.set_trial_state_values(trial_id, TrialState.RUNNING):
                return None
        except UpdateFinishedTrialError:
            return None
        self.storage.set_trial_user_attr(trial_id, "worker", {"host": HOST, "pid": os.getpid()})
        self.storage.set_trial_user_attr(trial_id, "invocation", self.ctx.invocation)
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

    # -- dead workers -----------------------------------------------------------------------------
    def _trial_id(self, sname: str, t: FrozenTrial) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.ids[sname], t.number)

    def _is_lost(self, sname: str, t: FrozenTrial, now: float) -> bool:
        worker = t.user_attrs.get("worker")
        if worker and worker["host"] == HOST and worker["pid"] != os.getpid():
            return not _pid_alive(worker["pid"])
        if not self.journal:  # RDB storages: Optuna's heartbeat (fail_stale_trials) decides
            return False
        beat = self.heartbeats / str(self._trial_id(sname, t))
        last = (
            beat.stat().st_mtime
            if beat.exists()
            else t.datetime_start.timestamp()
            if t.datetime_start
            else now
        )
        return now - last > HEARTBEAT_GRACE_S

    def _reap_lost(self, snap: _Snapshot) -> bool:
        """Fail and re-queue the trials of dead workers; True if any was re-queued."""
        now = time.time()
        self._requeued = False
        for sname, t in snap.all():
            if t.state != TrialState.RUNNING or not self._is_lost(sname, t, now):
                continue
            trial_id = self._trial_id(sname, t)
            try:
                self.storage.set_trial_user_attr(trial_id, "reason", "lost: its worker died mid-trial")
                if self.storage.set_trial_state_values(trial_id, TrialState.FAIL):
                    self._requeue(sname, t)
            except UpdateFinishedTrialError:
                continue  # another worker reaped it first
        if not self.journal:
            for study in self.studies.values():
                optuna.storages.fail_stale_trials(study)  # calls _on_stale for the trials it failed
        return self._requeued

    def _on_stale(self, study: optuna.Study, t: FrozenTrial) -> None:
        self._requeue(study.study_name, t)

    def _requeue(self, sname: str, t: FrozenTrial) -> bool:
        unit = t.user_attrs.get("unit")
        retries = [
            x
            for x in self.studies[sname].get_trials(deepcopy=False)
            if x.user_attrs.get("unit") == unit and "retry_of" in x.user_attrs
        ]
        if len(retries) >= MAX_RETRIES:
            log.error(
                "trial %d (%s) lost its worker %d times; not retrying it again", t.number, unit, len(retries)
            )
            return False
        attrs = {k: t.user_attrs[k] for k in UNIT_ATTRS if k in t.user_attrs}
        self.studies[sname].enqueue_trial(t.params, user_attrs={**attrs, "retry_of": t.number})
        log.warning("trial %d (%s, %s) lost its worker; re-queued", t.number, t.user_attrs.get("arm"), unit)
        self._requeued = True
        return True

    def _check_failures(self, snap: _Snapshot) -> None:
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
                f"failed.json in {self.folder / 'runs'}/*/"
            )

    # -- one trial --------------------------------------------------------------------------------
    @contextmanager
    def _heartbeat(self, trial_id: int) -> Iterator[None]:
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

    def _best_tuned(self, arm: Arm, snap: _Snapshot) -> dict[str, Any]:
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

    def _reusable(self, run_key: str, snap: _Snapshot) -> tuple[str, FrozenTrial] | None:
        for sname, t in snap.all():
            if (
                t.state == TrialState.COMPLETE
                and t.user_attrs.get("run_key") == run_key
                and "metrics" in t.user_attrs
            ):
                return sname, t
        return None

    def _execute(self, unit: Unit, trial_id: int, snap: _Snapshot) -> None:
        from harness import train
        from harness.rundir import write_run

        study = self.studies[unit.study]
        trial = optuna.Trial(study, trial_id)
        arm = self.spec.arm(unit.attrs["arm"])
        stage = unit.attrs["stage"]
        what = f"{stage} trial {trial.number} ({arm.label}, " + (
            f"seed {unit.attrs['seed']})" if stage == "final" else f"slot {unit.attrs['slot']})"
        )
        set_attr = trial.set_user_attr
        t0 = time.perf_counter()
        try:
            if stage == "tune":
                tuned = self.spec.suggest(trial, arm)
                cfg = self.spec.config(arm, tuned)
            else:
                tuned = self._best_tuned(arm, snap)
                cfg = self.spec.config(arm, {**tuned, "seed": unit.attrs["seed"]})
        except HarnessError as e:
            self._fail(study, trial, what, e, None, t0)
            return
        run_key = cfg.run_key()
        run_dir = self.folder / "runs" / run_key
        set_attr("run_key", run_key)
        set_attr("tuned", tuned)
        reuse = self._reusable(run_key, snap)
        if reuse is not None:  # the same resolved config already ran (e.g. the tune run of the final seed)
            sname, done = reuse
            for key in ("metrics", "best_epoch"):
                set_attr(key, done.user_attrs.get(key))
            set_attr("duration", 0.0)
            set_attr("reused_from", f"{sname}#{done.number}")
            study.tell(trial, done.value)
            log.info("%s: same config as %s#%d, reused its results", what, sname, done.number)
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
            with self._heartbeat(trial_id):
                result = train.run(cfg, reporter)
        except optuna.TrialPruned as e:
            set_attr("duration", time.perf_counter() - t0)
            set_attr("reason", str(e))
            study.tell(trial, state=TrialState.PRUNED)
            log.info("%s: %s", what, e)
            return
        except KeyboardInterrupt:
            set_attr("reason", "interrupted")
            self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
            self._requeue(unit.study, self.storage.get_trial(trial_id))
            raise
        except (
            Exception
        ) as e:  # any failure of the run (NaN loss, OOM, a plugin bug) is recorded, the study goes on
            self._fail(study, trial, what, e, run_dir, t0, cfg.to_dict())
            return
        write_run(result, run_dir, save_checkpoint=cfg.train.save_checkpoint)
        value = result.metrics.get(f"val/{metric}", math.nan)
        set_attr("metrics", {k: v for k, v in result.metrics.items() if math.isfinite(v)})
        set_attr("best_epoch", result.best_epoch)
        set_attr("duration", time.perf_counter() - t0)
        if not math.isfinite(value):
            self._fail(
                study, trial, what, TrainingError(f"val/{metric} is {value}"), run_dir, t0, cfg.to_dict()
            )
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
        reason = f"{type(error).__name__}: {error}"
        tb = "".join(traceback.format_exception(error))
        trial.set_user_attr("reason", reason)
        trial.set_user_attr("traceback", tb)
        trial.set_user_attr("duration", time.perf_counter() - t0)
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            record = {"trial": trial.number, "study": study.study_name, "reason": reason, "traceback": tb}
            tmp = run_dir / ".failed.json.tmp"
            tmp.write_text(json.dumps(record, indent=2))
            os.replace(tmp, run_dir / "failed.json")
            if cfg is not None and not (run_dir / "config.yaml").exists():
                (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        study.tell(trial, state=TrialState.FAIL)
        log.warning("%s failed: %s", what, reason)


def _work(ctx: _Context) -> int:
    """Worker entry point (in this process or a loky worker process)."""
    import torch

    if not logging.getLogger().handlers:
        logging.basicConfig(level=ctx.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(ctx.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return _Worker(ctx).work()


# ---------------------------------------------------------------------------------------------------------
# Planning, progress, entry points
# ---------------------------------------------------------------------------------------------------------


def _prepare(storage: BaseStorage, spec: StudySpec) -> None:
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
    snap = _Snapshot(studies, spec)
    queued = 0
    for unit in spec.units():
        if snap.status(unit) in ("missing", "failed"):
            studies[unit.study].enqueue_trial({}, user_attrs={"unit": unit.key, **unit.attrs})
            queued += 1
    log.info(
        "study %s: %d arms, %d units, %d queued now", spec.name, len(spec.arms), len(spec.units()), queued
    )


class _Progress:
    """A bar of settled units / all units, with the running trials' arm and epoch (own storage and thread)."""

    def __init__(self, ctx: _Context, period: float = 1.0):
        from tqdm.auto import tqdm

        self.ctx = ctx
        self.period = period
        storage = open_storage(ctx.storage, ctx.spec.name, ctx.results, create=True)
        self.studies = {
            n: optuna.load_study(study_name=n, storage=storage)
            for n in [ctx.spec.name, *ctx.spec.tune_studies()]
        }
        self.units = ctx.spec.units()
        self.bar = tqdm(total=len(self.units), desc=f"study {ctx.spec.name}", unit="trial", disable=None)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="study-progress")

    def _update(self) -> None:
        snap = _Snapshot(self.studies, self.ctx.spec)
        done = sum(snap.status(u) in ("done", "failed") for u in self.units)
        self.bar.update(done - self.bar.n)
        running = [t for _, t in snap.all() if t.state == TrialState.RUNNING]
        self.bar.set_postfix_str(
            "; ".join(
                f"{t.user_attrs.get('arm')} {t.user_attrs.get('stage')} "
                f"epoch {max(t.intermediate_values, default=0)}"
                for t in running
            )
        )

    def _loop(self) -> None:
        while not self.stop.wait(self.period):
            self._update()

    def __enter__(self) -> _Progress:
        self._update()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self._update()
        self.bar.close()


def _run_workers(ctx: _Context, workers: int) -> None:
    """``workers`` workers: this process (already warm, so it starts at once) plus ``workers - 1`` loky
    worker processes (joblib's process pool), each with its share of the CPU threads."""
    import torch

    threads = torch.get_num_threads()
    futures = []
    executor = None
    if workers > 1:
        from joblib.externals.loky import get_reusable_executor

        executor = get_reusable_executor(max_workers=workers - 1)
        futures = [executor.submit(_work, ctx) for _ in range(workers - 1)]
    try:
        _work(ctx)
        for f in futures:
            f.result()
    except BaseException:
        if executor is not None:
            executor.shutdown(wait=True, kill_workers=True)  # don't leave workers behind on an error
            executor = None
        raise
    finally:
        torch.set_num_threads(threads)
        if executor is not None:
            executor.shutdown(wait=False)  # idle workers exit on their own


def run_study(
    path: str | Path,
    storage: str | None = None,
    workers: int = 1,
    name: str | None = None,
    results: str | Path = "results",
    overrides: list[str] | None = None,
    *,
    report: bool = True,
) -> Path | None:
    """Run (or resume) a study: validate it, queue its units, run ``workers`` worker processes until
    every unit is settled, then write the report. Returns the report folder (None with ``report=False``)."""
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1 (got {workers})")
    spec = load_study(path, overrides, name)
    store = open_storage(storage, spec.name, results, workers=workers, create=True)
    _prepare(store, spec)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ctx = _Context(
        spec=spec,
        storage=storage,
        results=Path(results),
        invocation=uuid.uuid4().hex,
        threads=max(1, cores // workers),
        deadline=time.time() + spec.timeout if spec.timeout else None,
        log_level=logging.getLogger("harness").getEffectiveLevel(),
    )
    t0 = time.perf_counter()
    with _Progress(ctx):
        _run_workers(ctx, workers)
    log.info("study %s: this run took %.1fs", spec.name, time.perf_counter() - t0)
    if log.isEnabledFor(logging.INFO):
        log.info("%s", status(spec.name, storage, results))
    if not report:
        return None
    from harness.report import write_report

    return write_report(spec.name, storage=storage, results=results)


def status(name: str, storage: str | None = None, results: str | Path = "results") -> str:
    """Counts by stage and state, the best arms so far (validation objective for tune, test mean over seeds
    for final) and the time spent."""
    import pandas as pd

    from harness import store

    df = store.load(name, storage, results)
    meta = df.attrs["meta"]
    metric = meta.get("metric", "recall@1")
    lines = [f"study {name}: {len(df)} trials"]
    if df.empty:
        return lines[0] + " (none started yet)"
    counts = df.groupby(["stage", "state"]).size().unstack(fill_value=0)
    lines += ["", counts.to_string()]
    tune = df[(df.stage == "tune") & (df.state == "COMPLETE")]
    if not tune.empty:
        best = tune.groupby("arm")["value"].agg(["max", "count"]).sort_values("max", ascending=False)
        best.columns = [f"best val/{metric}", "trials"]
        lines += ["", "tune (validation classes):", best.to_string(float_format=lambda v: f"{v:.4f}")]
    final = df[(df.stage == "final") & (df.state == "COMPLETE")]
    col = f"test/{metric}"
    if not final.empty and col in final:
        agg = final.groupby("arm")[col].agg(["mean", "std", "count"]).sort_values("mean", ascending=False)
        agg.columns = [f"{col} mean", "std", "seeds"]
        lines += [
            "",
            "final (test classes, mean ± std over seeds):",
            agg.to_string(float_format=lambda v: f"{v:.4f}"),
        ]
    failed = df[(df.state == "FAIL") & ~df.lost]
    if not failed.empty:
        lines += ["", "failed:"] + [
            f"  #{r.number} {r.arm} ({r.stage}): {r.reason}" for r in failed.itertuples()
        ]
    start, end = df.datetime_start.min(), df.datetime_complete.max()
    wall = (end - start).total_seconds() if pd.notna(start) and pd.notna(end) else math.nan
    lines += ["", f"time: {df.duration.sum():.1f}s in trials, {wall:.1f}s from first start to last end"]
    return "\n".join(lines)
