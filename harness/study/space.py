"""The tune search space: ``tune.params`` entries → Optuna distributions, and their ``when`` conditions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from harness.config import lookup, unknown_key

#: The keys of a ``tune.params`` entry given as a mapping.
PARAM_KEYS = ("low", "high", "log", "step", "choices", "when")


@dataclass(frozen=True)
class TuneParam:
    """A nuisance hyperparameter: dotted config path, Optuna distribution, the condition it exists under."""

    path: str
    distribution: BaseDistribution
    when: dict[str, Any] = field(default_factory=dict)


def matches(node: Any, want: Any) -> bool:
    """Does config value ``node`` match a ``when``/baseline value (a component matches its name)?"""
    if isinstance(want, list) and not isinstance(node, list):
        return any(matches(node, w) for w in want)
    if isinstance(node, dict) and isinstance(want, str):
        return node.get("name") == want
    return bool(node == want)


_ABSENT = object()


def when_holds(when: dict[str, Any], resolved: dict[str, Any]) -> bool:
    """Every ``path: value`` of ``when`` holds for the config (a path the config lacks does not hold: e.g.
    ``regularizers.0.name`` of an arm without regularizers)."""
    return all(
        (node := lookup(resolved, path, _ABSENT)) is not _ABSENT and matches(node, want)
        for path, want in when.items()
    )


def _number(value: Any) -> float | int:
    """A YAML number; ``1e-4`` (which YAML 1.1 reads as a string) included."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{value!r} is not a number")
    if isinstance(value, (int, float)):
        return value
    return float(value)


def parse_param(path: str, spec: Any, section: str = "tune.params") -> tuple[TuneParam | None, list[str]]:
    """Parse ``<section>.<path>``: a list of choices, or ``{low, high, log, step}`` / ``{choices}``,
    either with an optional ``when: {path: value}``."""
    where = f"{section}.{path}"
    when: Any = {}
    if isinstance(spec, dict):
        spec = dict(spec)
        when = spec.pop("when", None) or {}
        unknown = [k for k in spec if k not in PARAM_KEYS]
        if unknown:
            return None, [unknown_key(f"{where}.{k}", list(PARAM_KEYS)) for k in unknown]
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


def representative(dist: BaseDistribution) -> Any:
    """A value of ``dist`` to validate configs with (its first choice or its lower bound)."""
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[0]
    assert isinstance(dist, (FloatDistribution, IntDistribution))
    return dist.low
