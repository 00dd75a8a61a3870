"""The study spec: the YAML sections, their validation (every problem at once, with its YAML path), the
arms the runner enumerates and the units of work (tune slots, final seeds, literature seeds) they make.

Protocols (DESIGN.md "Studies"): ``fair`` tunes each arm on validation classes with an equal budget and
reruns its best config with every final seed (with ``final.refit``, retrained on every training class);
``literature`` reruns a paper's fixed recipe (the arm's config with the study's ``literature`` overrides;
full precision unless they say otherwise) on every training class, without tuning, once per seed. A study
runs either or both (``protocol:``; ``dmlh study run --protocol``). A study with ``fair:`` takes its fair
arms' config, budget and seeds from a shared protocol file and only its method from the study
(``harness.study.protocol``); its ``base`` is then the literature recipe alone. A paper study's ``recipe:``
is checked against the literature config of every arm (``harness.study.recipe``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import optuna
import pydantic
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from pydantic import BaseModel, ConfigDict, Field

from harness import config
from harness.config import RunConfig
from harness.errors import ConfigError
from harness.store import tune_study_name
from harness.study.labels import format_value, format_values, short_names
from harness.study.space import TuneParam, matches, parse_param, representative, when_holds
from harness.types import CLUSTERING_METRICS, METRICS, recall_k

if TYPE_CHECKING:
    from harness.study.protocol import Fair

Protocol = Literal["fair", "literature", "both"]
#: Every training class trains (no validation carve-out): a literature run, and a refit fair final run.
ALL_TRAINING_CLASSES: dict[str, Any] = {"data.val_fraction": 0.0}
#: What a literature-protocol run always sets.
LITERATURE_FIXED: dict[str, Any] = ALL_TRAINING_CLASSES
#: What a literature-protocol run sets unless the study's ``literature:`` says otherwise: full precision
#: (no paper trains with autocast; autocast is a speed setting of the fair protocol).
LITERATURE_DEFAULTS: dict[str, Any] = {"train.amp": False}


class _StrictModel(BaseModel):
    """A study YAML section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class _Tune(_StrictModel):
    n_trials: int = Field(ge=1)
    params: dict[str, Any] = Field(default_factory=dict)
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["median", "hyperband"] | None = None


class _Final(_StrictModel):
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    #: Retrain each arm's chosen config on every training class (no validation classes: the last epoch is
    #: reported) instead of rerunning it on the split it was tuned on.
    refit: bool = False


class _Objective(_StrictModel):
    metric: str = "recall@1"
    split: Literal["val"] = "val"


class _FairTune(_StrictModel):
    #: The method's own hyperparameters, as ``tune.params`` (the protocol gives the budget).
    params: dict[str, Any] = Field(default_factory=dict)


class _Method(_StrictModel):
    """The method under study on the fair protocol (``harness.study.protocol.METHOD_KEYS``)."""

    model: Any = None
    loss: Any = None
    miner: Any = None
    synthesis: Any = None
    regularizers: Any = None


class _Fair(_StrictModel):
    """A study's fair arms: the shared protocol file and the method under study on it."""

    #: The protocol file, relative to the study file's folder (``protocols/fair.yaml``).
    protocol: str = Field(min_length=1)
    #: The protocol's dataset part; default: the dataset of the study's base.
    dataset: str | None = None
    method: _Method = Field(default_factory=_Method)
    tune: _FairTune | None = None


class _StudyYAML(_StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    base: dict[str, Any] = Field(default_factory=dict)
    # a factor is a dotted config path with a list of values, or a name with named variants, each a
    # mapping of dotted paths to values (several config changes compared as one factor level)
    arms: dict[str, Any] = Field(default_factory=dict)  # checked in parse_study (one message per factor)
    baseline: dict[str, Any] | None = None
    #: Partial factor assignments whose arms are left out of the product, e.g. ``{model.m: 1,
    #: model.lambda_div: 1.0}`` (one learner has no divergence: the same model as λ_div = 0).
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    tune: _Tune | None = None
    final: _Final = Field(default_factory=_Final)
    objective: _Objective = Field(default_factory=_Objective)
    timeout: float | None = Field(None, gt=0)
    #: Experiment trackers every run is logged to, as ``--track`` takes them (``harness.tracking``).
    track: list[str] | str = Field(default_factory=list)
    #: Seeds every tune trial's sampler (one seed per arm and slot, derived from this one).
    seed: int = 0
    protocol: Protocol = "fair"
    #: Dotted config overrides of the literature protocol (the paper's fixed recipe), on top of each arm.
    literature: dict[str, Any] = Field(default_factory=dict)
    #: Published numbers per arm label: ``{<arm label>: {source: "Table 1, row 'Triplet'", recall@1: 52.3}}``
    #: (values in %, as papers print them).
    published: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: Settings no paper or official code gives (our choices), shown in the paper table's caption.
    unpublished: list[str] = Field(default_factory=list)
    #: The literature protocol's settings as data, each with its source (paper, official code, ours),
    #: checked against every arm's literature config (``harness.study.recipe``); null: no check.
    recipe: list[Any] | None = None
    #: What a reader of the study's tables must know about how its arms differ beyond their factors (e.g.
    #: which images of a batch a loss uses), shown in the comparison table's caption.
    notes: list[str] = Field(default_factory=list)
    #: The fair arms from a shared protocol file (``harness.study.protocol``); None: from ``base``.
    fair: _Fair | None = None
    #: Human labels of arms for the tables, ``{<arm label>: "Triplet + Symm"}``; an arm not named gets an
    #: automatic one from its factor levels (``harness.reporting.tables.arm_titles``).
    labels: dict[str, str] = Field(default_factory=dict)


@dataclass(frozen=True)
class Arm:
    """One combination of factor values: ``raw`` is the base config with them applied (unresolved), ``fair``
    the fair protocol's config with them applied (None: ``raw``)."""

    label: str
    values: dict[str, Any]
    display: dict[str, str]
    raw: dict[str, Any]
    fair: dict[str, Any] | None = None

    @property
    def fair_raw(self) -> dict[str, Any]:
        """The arm's config under the fair protocol (unresolved)."""
        return self.raw if self.fair is None else self.fair


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
    seed: int = 0
    protocol: Protocol = "fair"
    literature: dict[str, Any] = field(default_factory=dict)
    refit: bool = False
    #: The shared fair protocol, or None (the fair arms from ``base``).
    fair: Fair | None = None

    @property
    def protocols(self) -> tuple[str, ...]:
        """The protocols this study runs, ``fair`` and/or ``literature``."""
        return _protocols(self.protocol)

    def arm(self, label: str) -> Arm:
        return next(a for a in self.arms if a.label == label)

    def config(self, arm: Arm, assignments: dict[str, Any]) -> config.RunConfig:
        """The resolved fair-protocol RunConfig of ``arm`` with ``assignments`` (tuned values, seed)."""
        return config.validate(config.assign(arm.fair_raw, assignments))

    def final_config(self, arm: Arm, tuned: dict[str, Any], seed: int) -> RunConfig:
        """The fair final run of ``arm``: its chosen values and ``seed``; with ``refit``, on every training
        class."""
        return self.config(arm, {**tuned, "seed": seed, **(ALL_TRAINING_CLASSES if self.refit else {})})

    def literature_config(self, arm: Arm, seed: int) -> RunConfig:
        """The literature-protocol RunConfig of ``arm``: the study's ``literature`` overrides, every
        training class, ``seed``; nothing tuned."""
        overrides = {**LITERATURE_DEFAULTS, **self.literature, **LITERATURE_FIXED, "seed": seed}
        return config.validate(config.assign(arm.raw, overrides))

    def suggest(self, trial: optuna.Trial | optuna.trial.FixedTrial, arm: Arm) -> dict[str, Any]:
        """Sample the tune params that apply to ``arm`` (each ``when`` is checked on the config so far)."""
        tuned: dict[str, Any] = {}
        for p in self.params:
            if p.when and not when_holds(p.when, self.config(arm, tuned).to_dict()):
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
        """The Optuna study of each arm's tune stage (none without tuning or the fair protocol)."""
        if not self.n_trials or "fair" not in self.protocols:
            return []
        return [tune_study_name(self.name, a.label) for a in self.arms]

    def units(self) -> list[Unit]:
        """Every unit of work of the study's protocols, interleaved across arms so that a study stopped at
        any time (``timeout``) has spent its budget evenly: tune slot 0 of every arm, slot 1 of every arm,
        ..., then final seeds the same way, then literature seeds."""

        def common(arm: Arm) -> dict[str, Any]:
            return {"arm": arm.label, "arm_display": arm.display}

        out = []
        if "fair" in self.protocols:
            out += [
                Unit(
                    tune_study_name(self.name, a.label),
                    f"tune/{s}",
                    {"stage": "tune", "slot": s, **common(a)},
                )
                for s in range(self.n_trials)
                for a in self.arms
            ]
            out += [
                Unit(
                    self.name,
                    f"{a.label}/seed={s}",
                    {"stage": "final", "protocol": "fair", "seed": s, **common(a)},
                )
                for s in self.seeds
                for a in self.arms
            ]
        if "literature" in self.protocols:
            out += [
                Unit(
                    self.name,
                    f"{a.label}/literature/seed={s}",
                    {"stage": "final", "protocol": "literature", "seed": s, **common(a)},
                )
                for s in self.seeds
                for a in self.arms
            ]
        return out

    def sampler_seed(self, arm: Arm, slot: int) -> int:
        """The seed of the sampler that suggests tune slot ``slot`` of ``arm`` (from the study's ``seed``):
        a rerun with one worker suggests the same values, and any trial can be replayed on its own."""
        blob = f"{self.seed}/{arm.label}/{slot}".encode()
        return int.from_bytes(hashlib.sha256(blob).digest()[:4], "big")

    def fingerprint(self) -> str:
        """Hash of what the stored results depend on (arms, seeds and budgets may change between runs)."""
        keep = {k: self.raw.get(k) for k in ("base", "objective")}
        keep["tune_params"] = (self.raw.get("tune") or {}).get("params")
        if self.literature:  # only when set, so that studies without one keep their fingerprint
            keep["literature"] = self.literature
        if self.fair is not None:  # the protocol's config, not its path
            keep["fair"] = {"base": self.fair.base, "metric": self.metric, "refit": self.refit}
            keep["tune_params"] = ((self.raw.get("fair") or {}).get("tune") or {}).get("params")
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
            "sampler": self.sampler if self.n_trials else None,
            "pruner": self.pruner,
            "seed": self.seed,
            "protocol": self.protocol,
            "refit": self.refit,
            "fair_protocol": self.fair.meta() if self.fair is not None else None,
            "published": self.raw.get("published") or {},
            "unpublished": self.raw.get("unpublished") or [],
            "recipe": self.raw.get("recipe") or [],
            "notes": self.raw.get("notes") or [],
            "labels": self.raw.get("labels") or {},
            "spec": json.loads(json.dumps(self.raw, default=str)),
        }


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------


def _metric_names(raw: dict[str, Any]) -> set[str] | None:
    """The validation metrics a config's evaluation produces (None if its ``eval`` or ``train`` section is
    itself invalid): clustering ones only where one selects the epoch (k-means is too slow to run at
    every validation)."""
    try:
        ev = config.EvalSection.model_validate(raw.get("eval") or {})
        clustering = (
            ev.nmi
            and config.TrainSection.model_validate(raw.get("train") or {}).selection_metric
            in CLUSTERING_METRICS
        )
    except pydantic.ValidationError:
        return None
    return {f"recall@{k}" for k in ev.ks} | {m for m in METRICS if m not in CLUSTERING_METRICS or clustering}


def _config_problems(raw: dict[str, Any]) -> tuple[config.RunConfig | None, list[str]]:
    """The validated RunConfig of ``raw`` (None if invalid) and its problems."""
    try:
        return config.validate(raw), []
    except ConfigError as e:
        return None, e.problems


def _arm_problems(
    arm: Arm, model: _StudyYAML, params: list[TuneParam], protocols: tuple[str, ...], metric: str
) -> list[str]:
    """Problems of one arm under the protocols that run: its fair config, tune params and objective
    ``metric``; its literature config."""
    problems = _fair_problems(arm, params, metric) if "fair" in protocols else []
    if "literature" in protocols:
        problems += _literature_problems(arm, model.literature)
    return problems


def _literature_problems(arm: Arm, literature: dict[str, Any]) -> list[str]:
    """Problems of the arm's literature-protocol config (its ``literature`` overrides applied)."""
    from harness.learner import check_assembly

    try:
        overrides = {**LITERATURE_DEFAULTS, **literature, **LITERATURE_FIXED}
        cfg, problems = _config_problems(config.assign(arm.raw, overrides))
    except ConfigError as e:
        cfg, problems = None, e.problems
    problems = [f"literature: {p}" for p in problems]
    return problems if cfg is None or problems else [f"literature: {p}" for p in check_assembly(cfg)]


def _published_problems(model: _StudyYAML, arms: list[Arm]) -> list[str]:
    """``published:`` names arms that exist and gives numbers of metrics the harness computes."""
    labels = {a.label for a in arms}
    problems = []
    for label, row in model.published.items():
        if label not in labels:
            problems.append(f"published.{label}: not an arm label (arms: {'; '.join(sorted(labels))})")
        for key, value in row.items():
            if key == "source":
                continue
            if recall_k(key) is None and key not in METRICS:
                problems.append(f"published.{label}.{key}: not a metric (recall@K, {', '.join(METRICS)})")
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                problems.append(f"published.{label}.{key}: expected a number in %, got {value!r}")
    return problems


def _protocols(protocol: str) -> tuple[str, ...]:
    """``both`` → (fair, literature); a single protocol → itself."""
    return ("fair", "literature") if protocol == "both" else (protocol,)


def _fair_problems(arm: Arm, params: list[TuneParam], metric: str) -> list[str]:
    """Problems of one arm's fair protocol: its config, the tune params that apply to it, the objective. The
    config problems of an arm on a protocol file (``fair:``) say so."""
    from harness.learner import check_assembly

    raw, shared = arm.fair_raw, arm.fair is not None
    cfg, problems = _config_problems(raw)
    resolved = cfg.to_dict() if cfg is not None else raw
    applying = {p.path: representative(p.distribution) for p in params if when_holds(p.when, resolved)}
    try:
        _, tuned_problems = _config_problems(config.assign(raw, applying))
    except ConfigError as e:
        tuned_problems = e.problems
    tune = "fair.tune.params" if shared else "tune.params"
    problems = [f"fair: {p}" if shared else p for p in problems]
    problems += [f"{tune}: {x}" for x in tuned_problems if x not in problems and f"fair: {x}" not in problems]
    names = _metric_names(raw)
    if names is not None and metric not in names:
        problems.append(
            f"objective.metric: {metric!r} is not a validation metric of this config (have "
            f"{', '.join(sorted(names))})"
            + ("; for nmi set train.selection_metric: nmi" if metric == "nmi" else "")
        )
    if cfg is not None and not problems:
        problems += [f"fair: {p}" if shared else p for p in check_assembly(cfg)]
    if cfg is not None and cfg.data.val_fraction <= 0:
        problems.append(
            f"{'fair.protocol' if shared else 'base'}.data.val_fraction: must be > 0 (tuning and epoch "
            "selection use validation classes, never test classes)"
        )
    return problems


def _yaml_place(problem: str, factors: list[str], label: str | None) -> str:
    """Prefix a config problem with its place in the study YAML: an arm factor, the base, or one arm."""
    if problem.startswith(("base.", "tune.", "objective.", "literature", "fair")):
        return problem if label is None else f"arms ({label}): {problem}"
    if any(problem.startswith(f + ".") or problem.startswith(f + ":") for f in factors):
        return f"arms.{problem}" if label is None else f"arms ({label}): {problem}"
    return f"base.{problem}" if label is None else f"arms ({label}): {problem}"


def _baseline(
    raw: dict[str, Any] | None, arms: list[Arm], factors: list[str]
) -> tuple[str | None, list[str]]:
    """The label of the one arm ``baseline:`` names (None without one) and the problems finding it."""
    if not raw:
        return None, []
    unknown = [p for p in raw if p not in factors]
    if unknown:
        return None, [f"baseline: {', '.join(unknown)} not an arm factor (factors: {', '.join(factors)})"]
    hits = [
        a
        for a in arms
        if all(matches(a.values[p], v) or a.display[p] == format_value(v) for p, v in raw.items())
    ]
    if len(hits) != 1:
        labels = ", ".join(repr(a.label) for a in hits) or "none"
        return None, [f"baseline: {raw!r} must match exactly one arm (matches: {labels})"]
    return hits[0].label, []


def _validate_top(raw: dict[str, Any]) -> tuple[_StudyYAML, list[str]]:
    """The top-level sections; a broken section is reported and left out so that the rest is still checked."""
    try:
        return _StudyYAML.model_validate(raw), []
    except pydantic.ValidationError as e:
        problems = config._pydantic_problems(e, _StudyYAML)
        bad = {err["loc"][0] for err in e.errors() if err["loc"]}
        rest = {k: v for k, v in raw.items() if k not in bad} | ({"name": "invalid"} if "name" in bad else {})
        try:
            return _StudyYAML.model_validate(rest), problems
        except pydantic.ValidationError:
            raise ConfigError(problems) from e


def _exclude_problems(exclude: list[dict[str, Any]], levels: dict[str, list[Any]]) -> list[str]:
    """What is wrong with ``exclude``: a factor the study does not have, or a level it does not list."""
    problems = []
    for i, ex in enumerate(exclude):
        for f, v in ex.items():
            if f not in levels:
                problems.append(f"exclude[{i}].{f}: not a factor of arms ({', '.join(levels) or 'none'})")
            elif v not in levels[f]:
                problems.append(f"exclude[{i}].{f}: {v!r} is not one of its levels {levels[f]}")
    return problems


def _arms(
    model: _StudyYAML, problems: list[str], fair_base: dict[str, Any] | None = None
) -> tuple[list[Arm], list[str]]:
    """The arms (the product of the factor levels, each applied to the base, and to ``fair_base``, the
    fair protocol's config, where the study has one) and the factors; problems are appended to
    ``problems``."""
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
    short = short_names([f for f in factors if f not in variants]) | {f: f for f in variants}
    shown = {f: list(vs) if f in variants else format_values(vs) for f, vs in levels.items()}
    problems += _exclude_problems(model.exclude, levels)
    arms = []
    for combo in product(*(range(len(levels[f])) for f in factors)):
        values = {f: levels[f][i] for f, i in zip(factors, combo, strict=True)}
        if any(all(values.get(f) == v for f, v in ex.items()) for ex in model.exclude):
            continue
        display = {f: shown[f][i] for f, i in zip(factors, combo, strict=True)}
        label = ", ".join(f"{short[f]}={display[f]}" for f in factors) or "base"
        assignments: dict[str, Any] = {}
        for f, v in values.items():
            changes = variants[f][v] if f in variants else {f: v}
            assignments.update(changes if isinstance(changes, dict) else {})
        named = {"name": model.name}  # runs are named after their study unless base says
        try:
            arm_raw = config.assign(config.name_default_components({**named, **model.base}), assignments)
            fair = None
            if fair_base is not None:
                fair = config.assign(config.name_default_components({**named, **fair_base}), assignments)
        except ConfigError as e:
            problems += [f"arms ({label}): {x}" for x in e.problems]
            continue
        arms.append(Arm(label, values, display, arm_raw, fair))
    if len({a.label for a in arms}) != len(arms):
        problems.append("arms: two arms have the same label; give the values of a factor distinct names")
    return arms, factors


def _fair(model: _StudyYAML, raw: dict[str, Any], folder: Path | None, problems: list[str]) -> Fair | None:
    """The study's shared fair protocol, None without ``fair:`` or where it does not resolve; problems are
    appended to ``problems``."""
    if model.fair is None:
        return None
    from harness.study.protocol import METHOD_KEYS, protocol_fixes, resolve_fair

    f = model.fair
    method = f.method.model_dump(exclude_unset=True)
    fair, errs = resolve_fair(f.protocol, f.dataset, method, model.base, folder)
    problems += errs
    problems += [
        f"fair.tune.params.{path}: the protocol fixes it; tune the method's own hyperparameters (under "
        f"{', '.join(METHOD_KEYS)})"
        for path in (f.tune.params if f.tune else {})
        if protocol_fixes(path)
    ]
    problems += [
        f"{key}: a study with fair: takes it from its protocol ({f.protocol}){hint}"
        for key, hint in (
            ("tune", "; the method's own hyperparameters go under fair.tune.params"),
            ("final", ", for both protocols"),
            ("objective", ""),
        )
        if key in raw
    ]
    return fair


def parse_study(
    raw: dict[str, Any], name: str | None = None, protocol: str | None = None, folder: Path | None = None
) -> StudySpec:
    """Validate a study dict; raise ConfigError listing every problem (with its YAML path) at once.
    ``protocol`` (fair | literature | both) replaces the file's ``protocol:``; ``folder`` is the study file's
    (a ``fair.protocol`` path is relative to it)."""
    raw = dict(raw)
    if name:
        raw["name"] = name
    if protocol:
        raw["protocol"] = protocol
    model, problems = _validate_top(raw)
    fair = _fair(model, raw, folder, problems)
    arms, factors = _arms(model, problems, fair.base if fair is not None else None)
    # the budget, seeds and objective: the protocol's for a study with fair:, else the study's own
    tune = model.fair.tune if model.fair else model.tune
    where = "fair.tune.params" if model.fair else "tune.params"
    budget = fair.protocol.tune if fair is not None else model.tune
    final = fair.protocol.final if fair is not None else model.final
    metric = (fair.protocol.objective if fair is not None else model.objective).metric
    params = []
    if tune is not None and not tune.params:
        problems.append(
            f"{where}: empty; list the hyperparameters to tune, or leave out tune: to skip the stage"
        )
    for path, dist_spec in (tune.params if tune else {}).items():
        param, errs = parse_param(path, dist_spec, where)
        problems += errs
        if path in factors:
            problems.append(f"{where}.{path}: is also an arm factor (a factor is compared, not tuned)")
        if param:
            params.append(param)
    protocols = _protocols(model.protocol)
    # a fair: that does not resolve is reported above; its arms' fair configs cannot be checked
    checked = tuple(p for p in protocols if p != "fair" or "fair" not in raw or fair is not None)
    per_arm = {a.label: _arm_problems(a, model, params, checked, metric) for a in arms}
    common = set.intersection(*(set(v) for v in per_arm.values())) if per_arm else set()
    problems += [_yaml_place(p, factors, None) for p in sorted(common)]
    for label, errs in per_arm.items():
        problems += [_yaml_place(p, factors, label) for p in errs if p not in common]
    for p in params:
        # an arm whose config is invalid (reported above) cannot tell: no "holds for no arm" then
        if p.when and all(_holds_for(p, a) is False for a in arms):
            problems.append(f"{where}.{p.path}.when: {p.when} holds for no arm (it would never be tuned)")
    baseline, errs = _baseline(model.baseline, arms, factors)
    problems += errs + _published_problems(model, arms)
    arm_labels = {a.label for a in arms}
    problems += [f"labels.{k}: not an arm label" for k in model.labels if k not in arm_labels]
    if model.recipe is not None:
        problems += _recipe_problems(model, arms)
    if problems:
        raise ConfigError(problems)
    return StudySpec(
        name=model.name,
        raw=raw,
        arms=arms,
        factors=factors,
        baseline=baseline,
        params=params,
        n_trials=budget.n_trials if budget is not None and params else 0,
        sampler=budget.sampler if budget is not None else "tpe",
        pruner=budget.pruner if budget is not None else None,
        seeds=final.seeds,
        metric=metric,
        timeout=model.timeout,
        seed=model.seed,
        protocol=model.protocol,
        literature=model.literature,
        refit=final.refit,
        fair=fair,
    )


def _recipe_problems(model: _StudyYAML, arms: list[Arm]) -> list[str]:
    """The ``recipe:`` against the literature config of every arm (``harness.study.recipe``)."""
    from harness.study.recipe import recipe_problems

    def literature(arm: Arm) -> dict[str, Any] | None:
        try:
            overrides = {**LITERATURE_DEFAULTS, **model.literature, **LITERATURE_FIXED}
            return config.validate(config.assign(arm.raw, overrides)).to_dict()
        except ConfigError:
            return None  # reported by the arm's literature check

    variants = {f: vs for f, vs in model.arms.items() if isinstance(vs, dict)}
    return recipe_problems(model.recipe or [], arms, variants, literature)


def _holds_for(p: TuneParam, arm: Arm) -> bool | None:
    """Whether ``p.when`` holds for the arm's resolved config. An invalid config (reported on its own) is
    read as written where it says; None where it cannot tell (a default it leaves out)."""
    try:
        resolved = config.validate(arm.fair_raw).to_dict()
    except ConfigError:
        try:
            return when_holds(p.when, arm.fair_raw)
        except (TypeError, AttributeError):
            return None
    return when_holds(p.when, resolved)


def load_study(
    path: str | Path,
    overrides: list[str] | None = None,
    name: str | None = None,
    protocol: str | None = None,
) -> StudySpec:
    """Load, override (``base.train.epochs=1``, ``tune.n_trials=2``) and validate a study YAML."""
    raw = config.apply_overrides(config.load_yaml(path), list(overrides or []))
    return parse_study(raw, name, protocol, Path(path).parent)


def arm_labels(raw: dict[str, Any]) -> list[str]:
    """The arm labels of a study dict from its factors alone, no config validated (cheap: ``dmlh table``
    names the arms of studies that have not run; ``parse_study`` checks the rest)."""
    model, problems = _validate_top(raw)
    return [a.label for a in _arms(model, problems)[0]]
