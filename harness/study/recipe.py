"""A paper study's recipe as data (DESIGN.md "Studies": the recipe is data, not comments).

A study's ``recipe:`` lists the settings of its literature protocol, each with its source::

    recipe:
    - {key: optimizer, value: {name: adam, lr: 1.0e-4}, source: "code train.py"}
    - {key: optimizer.betas, value: [0.9, 0.999], source: "code: tf.train.AdamOptimizer's defaults"}
    - {key: loss.margin, value: 0.2, source: ours, why: "the official code has no triplet loss",
       when: {loss: [triplet, triplet_semihard]}}

``source`` is ``paper …`` (the paper's text), ``code …`` (its official code) or ``ours`` (our choice; then
``why`` says why in one line). ``value`` is a config value, or a mapping (or list of mappings) that states
some of the keys under ``key``. ``when`` limits an entry to the arms whose factors take these levels (the
factor under study differs per arm, so its settings are read per arm).

``recipe_problems`` resolves the literature config of every arm and reports, with its YAML path, each entry
whose value differs from that config, and each setting that decides the number (``DECISIVE``) that no entry
states. A factor's own level (``model.m: 4``, a variant's ``loss: {name: …}``) is the arm's definition and
needs no entry; the parameters that come with it do.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from harness import config
from harness.errors import ConfigError
from harness.study.labels import format_value
from harness.study.space import matches

if TYPE_CHECKING:
    import argparse

    from harness.study.spec import Arm

#: The settings that decide a reported number: dotted prefixes of the resolved RunConfig (a component's
#: name and every parameter under it). Each leaf under one of them needs a recipe entry.
DECISIVE: tuple[str, ...] = (
    # optimizer (name, lr, momentum, weight_decay, betas, decay …) and its schedule
    "optimizer",
    "scheduler",
    "train.warmup_epochs",
    "train.backbone_lr_mult",
    "train.head_lr_mult",
    "train.loss_lr_mult",
    "train.grad_clip",
    # batch composition and length of training
    "sampler.kind",
    "sampler.batches_per_epoch",
    "sampler.repeated_augmentations",
    "train.epochs",
    # images: split, geometry and normalisation
    "data.dataset",
    "data.transform",
    "data.input_size",
    "data.resize_size",
    # network: backbone and its BN mode, pooling, embedding size and normalisation
    "backbone",
    "pooling",
    "model",
    # objective: loss and its parameters, miner, synthesis, regularizers and their weights
    "loss",
    "miner",
    "synthesis",
    "regularizers",
    # precision and evaluation (which epoch, which distance)
    "train.amp",
    "train.eval_every",
    "train.best_test_every",
    "eval.distance",
)
#: Decisive only under a condition on the resolved config (the batch composition of each sampler kind;
#: the autocast dtype when autocast is on).
DECISIVE_WHEN: dict[str, Callable[[dict[str, Any]], bool]] = {
    "sampler.p": lambda c: c["sampler"]["kind"] == "pk",
    "sampler.k": lambda c: c["sampler"]["kind"] == "pk",
    "sampler.positive_pairs": lambda c: c["sampler"]["kind"] == "pairs",
    "sampler.negative_pairs": lambda c: c["sampler"]["kind"] == "pairs",
    "sampler.triplets": lambda c: c["sampler"]["kind"] == "triplets",
    "train.amp_dtype": lambda c: bool(c["train"]["amp"]),
}
#: Leaves under a decisive prefix that decide nothing (where the files are).
NOT_DECISIVE: tuple[str, ...] = ("data.dataset.root",)

SourceKind = Literal["paper", "code", "ours"]
#: How the report names each source kind, in the order it prints them.
SOURCE_TITLES: dict[str, str] = {"paper": "from the paper", "code": "from the official code", "ours": "ours"}


class RecipeEntry(BaseModel):
    """One ``recipe:`` entry (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1)
    value: Any
    source: str = Field(min_length=1)
    why: str | None = None
    when: dict[str, Any] = Field(default_factory=dict)

    @property
    def kind(self) -> SourceKind | None:
        """``paper``, ``code`` or ``ours`` (None: a source that says none of them)."""
        s = self.source.strip().lower()
        if s == "ours":
            return "ours"
        for kind in ("paper", "code"):
            if s.startswith(kind) or s.startswith(f"official {kind}"):
                return kind  # type: ignore[return-value]
        return None


def source_kind(entry: dict[str, Any]) -> SourceKind | None:
    """The source kind of a raw entry (as stored in the study's metadata)."""
    try:
        return RecipeEntry.model_validate(entry).kind
    except Exception:  # noqa: BLE001 - a malformed stored entry has no kind
        return None


def leaves(value: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every leaf of a config value: mappings and non-empty lists of mappings
    are walked (list items by index), anything else is a leaf."""
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            yield from leaves(v, f"{prefix}.{i}" if prefix else str(i))
    else:
        yield prefix, value


def decisive(resolved: dict[str, Any]) -> dict[str, Any]:
    """The decisive leaves of a resolved config dict (path → value)."""
    out = {}
    for path, value in leaves(resolved, ""):
        if path in NOT_DECISIVE:
            continue
        cond = DECISIVE_WHEN.get(path)
        if any(path == p or path.startswith(p + ".") for p in DECISIVE) or (
            cond is not None and cond(resolved)
        ):
            out[path] = value
    return out


def same(a: Any, b: Any) -> bool:
    """Config values equal (numbers within float rounding; lists and tuples alike)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


def _factor_paths(arm: Arm, variants: dict[str, dict[str, Any]]) -> set[str]:
    """The leaves a factor level defines itself: a dotted factor's path (and a component's ``.name``); each
    dotted path a named variant sets to a plain value, or to a component (its ``.name``)."""
    out: set[str] = set()
    for factor, level in arm.values.items():
        changes = variants[factor].get(level) if factor in variants else {factor: level}
        for path, value in (changes or {}).items():
            out.add(f"{path}.name" if isinstance(value, (dict, str)) and _is_component(path) else path)
            if isinstance(value, list) and not value:
                out.add(path)
    return out


def _is_component(path: str) -> bool:
    return path in {p for _, p in config.COMPONENT_FIELDS}


def _applies(entry: RecipeEntry, arm: Arm) -> bool:
    return all(
        f in arm.values and (matches(arm.values[f], want) or arm.display[f] == format_value(want))
        for f, want in entry.when.items()
    )


def _when_problems(i: int, entry: RecipeEntry, arms: list[Arm]) -> list[str]:
    factors = arms[0].values if arms else {}
    problems = [
        f"recipe[{i}] ({entry.key}).when.{f}: not an arm factor (factors: {', '.join(factors) or 'none'})"
        for f in entry.when
        if f not in factors
    ]
    if not problems and not any(_applies(entry, a) for a in arms):
        problems.append(f"recipe[{i}] ({entry.key}).when: {entry.when} holds for no arm")
    return problems


def _arms_text(labels: list[str], n_arms: int) -> str:
    return (
        "every arm" if len(labels) == n_arms and n_arms > 1 else "arm " + "; ".join(repr(x) for x in labels)
    )


def recipe_problems(
    recipe: list[Any],
    arms: list[Arm],
    variants: dict[str, dict[str, Any]],
    literature_config: Callable[[Arm], dict[str, Any] | None],
) -> list[str]:
    """Every problem of a study's ``recipe:`` against the literature config of each arm
    (``literature_config(arm)``: the resolved config dict, or None where it does not resolve)."""
    problems: list[str] = []
    entries: list[tuple[int, RecipeEntry]] = []
    for i, raw in enumerate(recipe):
        try:
            entry = RecipeEntry.model_validate(raw)
        except Exception as e:  # noqa: BLE001 - pydantic's errors, said with the entry's place
            problems += [f"recipe[{i}]: {p}" for p in config._pydantic_problems(e, RecipeEntry)]  # type: ignore[arg-type]
            continue
        where = f"recipe[{i}] ({entry.key})"
        if entry.kind is None:
            problems.append(
                f"{where}.source: {entry.source!r} must be 'ours' or start with 'paper' or 'code' "
                "(the paper's text, its official code)"
            )
        if entry.kind == "ours" and not (entry.why or "").strip():
            problems.append(f"{where}.why: a setting of ours says why in one line")
        problems += _when_problems(i, entry, arms)
        entries.append((i, entry))
    wrong: dict[tuple[int, str, str, str], list[str]] = {}
    missing: dict[tuple[str, str], list[str]] = {}
    for arm in arms:
        resolved = literature_config(arm)
        if resolved is None:
            continue
        flat = dict(leaves(resolved, ""))
        covered = _factor_paths(arm, variants)
        for i, entry in entries:
            if not _applies(entry, arm):
                continue
            stated = dict(leaves(entry.value, entry.key))
            if isinstance(entry.value, dict) and not entry.value:
                stated = {entry.key: entry.value}
            for path, want in stated.items():
                if path not in flat:
                    near = [p for p in flat if p.startswith(entry.key.split(".")[0])][:8]
                    wrong.setdefault((i, path, "no such setting", ", ".join(near)), []).append(arm.label)
                    continue
                covered.add(path)
                if not same(flat[path], want):
                    key = (i, path, format_value(want), format_value(flat[path]))
                    wrong.setdefault(key, []).append(arm.label)
        for path, value in decisive(resolved).items():
            if path not in covered:
                missing.setdefault((path, format_value(value)), []).append(arm.label)
    n = len(arms)
    for (i, path, want, got), labels in wrong.items():
        if want == "no such setting":
            problems.append(
                f"recipe[{i}] ({path}): not a setting of the literature config of {_arms_text(labels, n)}"
                + (f" (settings there: {got}, …)" if got else "")
            )
        else:
            problems.append(
                f"recipe[{i}] ({path}): the recipe says {want}, the literature config of "
                f"{_arms_text(labels, n)} has {got}"
            )
    for (path, value), labels in missing.items():
        problems.append(
            f"recipe: {path} (= {value} in {_arms_text(labels, n)}) decides the number and is neither in the "
            "recipe nor marked ours; add {key: " + path + ", value: …, source: paper …|code …|ours, why: …}"
        )
    return problems


def recipe_rows(meta: dict[str, Any]) -> list[dict[str, str]]:
    """The recipe of a study's metadata as rows (setting, value, source kind, source, why, arms), sorted
    by source kind (paper, official code, ours), then in file order."""
    rows = []
    for entry in meta.get("recipe") or []:
        if not isinstance(entry, dict):
            continue
        kind = source_kind(entry) or "ours"
        when = entry.get("when") or {}
        key, value = str(entry.get("key")), entry.get("value")
        walk = (
            isinstance(value, dict)
            and value
            or (isinstance(value, list) and value and all(isinstance(v, dict) for v in value))
        )
        shown = (
            ", ".join(f"{p.removeprefix(key + '.')}={format_value(v)}" for p, v in leaves(value, key))
            if walk
            else format_value(value)
        )
        rows.append(
            {
                "setting": key,
                "value": shown,
                "kind": kind,
                "source": "" if kind == "ours" else str(entry.get("source")),
                "why": str(entry.get("why") or ""),
                "arms": ", ".join(f"{f}={format_value(v)}" for f, v in when.items()),
            }
        )
    order = list(SOURCE_TITLES)
    return sorted(rows, key=lambda r: order.index(r["kind"]))


def check_study(path: str, overrides: list[str] | None = None) -> str:
    """``dmlh study check``: validate a study (its recipe against the literature config of every arm);
    raises ConfigError listing every problem, else returns a one-paragraph summary."""
    from harness.study.spec import load_study

    spec = load_study(path, overrides)
    recipe = spec.raw.get("recipe") or []
    kinds = [source_kind(e) for e in recipe]
    fair = (
        f"; its fair arms use the protocol {spec.fair.path} ({spec.fair.dataset}), which states every "
        "setting outside the method that decides the number"
        if spec.fair is not None
        else ""
    )
    if not recipe:
        return f"{spec.name}: valid ({len(spec.arms)} arms); it has no recipe: block to check{fair}"
    counts = ", ".join(f"{kinds.count(k)} {SOURCE_TITLES[k]}" for k in SOURCE_TITLES)  # type: ignore[arg-type]
    return (
        f"{spec.name}: the recipe ({len(recipe)} entries: {counts}) matches the literature config of every "
        f"arm ({len(spec.arms)}), and it states every setting that decides the number{fair}"
    )


def cmd_check(args: argparse.Namespace) -> None:
    """The ``dmlh study check STUDY [overrides]`` command: one line per study file."""
    paths = [a for a in args.studies if "=" not in a]
    overrides = [a for a in args.studies if "=" in a] + list(getattr(args, "overrides", None) or [])
    failed: list[str] = []
    for path in paths:
        try:
            print(check_study(path, overrides))
        except ConfigError as e:
            print(f"{path}: {e}", file=sys.stderr)
            failed.append(path)
    if failed:
        raise ConfigError(
            [f"{p}: see above" for p in failed]
            + [
                "a recipe value is the claim a paper study makes; for a deliberate trial run add the "
                "override recipe=null"
            ]
        )


__all__ = ["DECISIVE", "RecipeEntry", "check_study", "recipe_problems", "recipe_rows"]
