"""The fair protocol as one shared file (DESIGN.md "Studies"; issue #25): everything but the method under
study comes from the protocol, so the fair numbers of every study on a dataset come from one config and
share a table (as in Musgrave et al., "A Metric Learning Reality Check", ECCV 2020).

A study's ``fair:`` names the protocol and the method::

    fair:
      protocol: protocols/fair.yaml   # relative to the study file's folder
      dataset: cub200                 # optional: the dataset of the study's base
      method:                         # the method under study: model, loss, miner, synthesis, regularizers
        loss: {name: triplet, margin: 0.2}
      tune:                           # the method's own hyperparameters (the protocol gives the budget)
        params: {loss.margin: {low: 0.05, high: 0.5}}

A protocol file states each of its settings with its source and why (``ProtocolEntry``): ``settings`` (every
dataset), ``datasets.<name>`` (that dataset's budget and evaluation), ``method_defaults`` (what a method
that does not say gets), and what every method gets alike: ``tune`` (trials, sampler), ``objective`` (the
validation metric that chooses) and ``final`` (seeds, retraining on every training class). The fair config
of an arm is the method defaults, then the method, then the settings and the dataset's entries (which a
method cannot change), then the arm's factor levels. ``resolve_fair`` also checks that the protocol states
every setting outside the method that decides a number (``recipe.DECISIVE``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
from pydantic import Field

from harness import config
from harness.errors import ConfigError
from harness.study.recipe import RecipeEntry, decisive
from harness.study.spec import _Final, _Objective, _StrictModel, _Tune

#: The config sections a study's method sets; the protocol sets everything else.
METHOD_KEYS = ("model", "loss", "miner", "synthesis", "regularizers")
#: Settings under a method key that the protocol fixes all the same (one embedding size for every method).
PROTOCOL_KEYS_IN_METHOD = ("model.embedding_dim",)


class ProtocolEntry(RecipeEntry):
    """One setting of a protocol: ``key``, ``value``, ``source`` (paper …, code … or ours) and always
    ``why`` (no ``when``: a protocol is the same for every arm)."""

    why: str = Field(min_length=1)
    when: dict[str, Any] = Field(default_factory=dict, max_length=0)


class ProtocolTune(_Tune):
    """The tuning budget every method gets (its parameters come from the study's ``fair.tune``)."""

    params: dict[str, Any] = Field(default_factory=dict, max_length=0)
    why: str = Field(min_length=1)


class ProtocolObjective(_Objective):
    why: str = Field(min_length=1)


class ProtocolFinal(_Final):
    why: str = Field(min_length=1)


class ProtocolFile(_StrictModel):
    """A protocol file (``studies/protocols/*.yaml``)."""

    name: str = Field(min_length=1)
    #: The protocol it follows (the paper, its code).
    source: str = Field(min_length=1)
    settings: list[ProtocolEntry] = Field(min_length=1)
    method_defaults: list[ProtocolEntry] = Field(default_factory=list)
    datasets: dict[str, list[ProtocolEntry]] = Field(min_length=1)
    tune: ProtocolTune
    objective: ProtocolObjective
    final: ProtocolFinal
    #: What the protocol would do that the harness cannot yet, each said in one line.
    not_supported: list[str] = Field(default_factory=list)


@dataclass(frozen=True)
class Fair:
    """A study's fair protocol, resolved for its dataset and method: ``base`` is every arm's fair config
    before its factor levels."""

    path: Path
    protocol: ProtocolFile
    dataset: str
    base: dict[str, Any]

    @property
    def entries(self) -> list[ProtocolEntry]:
        """The protocol's settings for this dataset (method defaults, settings, the dataset's)."""
        return [
            *self.protocol.method_defaults,
            *self.protocol.settings,
            *self.protocol.datasets[self.dataset],
        ]

    def meta(self) -> dict[str, Any]:
        """What the store and the reports read back (JSON)."""
        p = self.protocol
        return {
            "name": p.name,
            "path": str(self.path),
            "source": p.source,
            "dataset": self.dataset,
            "entries": [e.model_dump(exclude={"when"}) for e in self.entries],
            "tune": p.tune.model_dump(exclude={"params"}),
            "objective": p.objective.model_dump(),
            "final": p.final.model_dump(),
            "not_supported": p.not_supported,
        }


def _under(path: str, keys: tuple[str, ...]) -> bool:
    return any(path == k or path.startswith(k + ".") for k in keys)


def protocol_fixes(path: str) -> bool:
    """Whether the protocol, not the method, decides the setting at dotted ``path``."""
    return not _under(path, METHOD_KEYS) or _under(path, PROTOCOL_KEYS_IN_METHOD)


def load_protocol(path: Path) -> tuple[ProtocolFile | None, list[str]]:
    """The protocol file at ``path`` and its problems (each prefixed with the file)."""
    try:
        raw = config.load_yaml(path)
    except ConfigError as e:
        return None, e.problems
    try:
        protocol = ProtocolFile.model_validate(raw)
    except pydantic.ValidationError as e:
        return None, [f"{path}: {p}" for p in config._pydantic_problems(e, ProtocolFile)]
    problems = []
    entries = [("settings", x) for x in protocol.settings] + [
        (f"datasets.{d}", x) for d, xs in protocol.datasets.items() for x in xs
    ]
    for where, entry in [*entries, *(("method_defaults", x) for x in protocol.method_defaults)]:
        if entry.kind is None:
            problems.append(
                f"{path}: {where} ({entry.key}).source: {entry.source!r} must be 'ours' or start with "
                "'paper' or 'code'"
            )
    for where, entry in entries:
        if not protocol_fixes(entry.key):
            problems.append(
                f"{path}: {where} ({entry.key}): part of the method under study ({', '.join(METHOD_KEYS)}); "
                "a protocol default for it goes under method_defaults"
            )
    problems += [
        f"{path}: method_defaults ({x.key}): not a method key ({', '.join(METHOD_KEYS)})"
        for x in protocol.method_defaults
        if protocol_fixes(x.key)
    ]
    common = [x.key for x in protocol.settings]
    for where, keys in [
        ("settings", common),
        *((f"datasets.{d}", [x.key for x in xs]) for d, xs in protocol.datasets.items()),
    ]:
        problems += [
            f"{path}: {where}: {k} is stated twice" for k in sorted({k for k in keys if keys.count(k) > 1})
        ]
        if where != "settings":
            problems += [
                f"{path}: {where}: {k} is also in settings" for k in dict.fromkeys(keys) if k in common
            ]
    return protocol, problems


def _dataset_name(base: dict[str, Any]) -> str | None:
    node = config.lookup(base, "data.dataset", None)
    name = node.get("name") if isinstance(node, dict) else node
    return str(name) if name else None


def _method(method: dict[str, Any], defaults: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The method's sections on top of the protocol's defaults: a component of the default's kind (same
    name, or none given) updates it, another replaces it."""
    out = dict(defaults)
    problems = []
    for key, value in method.items():
        default, value = config._component(defaults.get(key)), config._component(value)
        if (
            isinstance(default, dict)
            and isinstance(value, dict)
            and value.get("name", default["name"]) == default["name"]
        ):
            value = {**default, **value}
        out[key] = value
    for path in PROTOCOL_KEYS_IN_METHOD:
        if config.lookup(method, path, None) is not None:
            problems.append(f"fair.method.{path}: the protocol fixes it; leave it out of the method")
    return out, problems


def _coverage(protocol: ProtocolFile, path: Path, dataset: str, base: dict[str, Any]) -> list[str]:
    """Each setting outside the method that decides a number and that the protocol does not state."""
    try:
        resolved = config.validate(base).to_dict()
    except ConfigError:
        return []  # the arms' configs report it (a factor may complete the method)
    stated = tuple(e.key for e in (*protocol.settings, *protocol.datasets[dataset]))
    return [
        f"{path}: {leaf} (= {value!r} for {dataset}) decides the number and the protocol does not state it; "
        "add {key: " + leaf + ", value: …, source: paper …|code …|ours, why: …}"
        for leaf, value in decisive(resolved).items()
        if protocol_fixes(leaf) and not _under(leaf, stated)
    ]


def resolve_fair(
    protocol_path: str, dataset: str | None, method: dict[str, Any], base: dict[str, Any], folder: Path | None
) -> tuple[Fair | None, list[str]]:
    """A study's ``fair:`` resolved: the protocol file (``protocol_path`` relative to ``folder``, the study
    file's folder, else to the working directory), its part for ``dataset`` (default: the dataset of the
    study's ``base``) and ``method`` on top. Returns the problems with their YAML paths."""
    path = Path(protocol_path)
    path = path if path.is_absolute() else (folder or Path.cwd()) / path
    if not path.is_file():
        where = f"the study file's folder {folder}" if folder else "the working directory (no study file)"
        return None, [f"fair.protocol: {path} not found (a path is relative to {where})"]
    protocol, problems = load_protocol(path)
    if protocol is None or problems:
        return None, [f"fair.protocol: {p}" for p in problems]
    name = dataset or _dataset_name(base)
    if name is None:
        return None, ["fair.dataset: the study's base names no data.dataset; name the protocol's dataset"]
    if name not in protocol.datasets:
        known = list(protocol.datasets)
        close = config.did_you_mean(name, known)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        return None, [
            f"fair.dataset: {name!r} is not a dataset of {path.name}; {hint}(has: {', '.join(known)})"
        ]
    defaults: dict[str, Any] = {}
    for e in protocol.method_defaults:
        defaults = config.assign(defaults, {e.key: e.value})
    fair_base, problems = _method(method, defaults)
    try:
        fair_base = config.assign(
            fair_base, {e.key: e.value for e in (*protocol.settings, *protocol.datasets[name])}
        )
    except ConfigError as e:
        return None, problems + [f"fair.protocol: {path}: {p}" for p in e.problems]
    problems += [f"fair.protocol: {p}" for p in _coverage(protocol, path, name, fair_base)]
    return Fair(path, protocol, name, fair_base), problems
