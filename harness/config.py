"""Typed run configuration: YAML in, dotted overrides, validation that reports every problem at once.

A component field (dataset, backbone, pooling, model, loss, miner, synthesis, regularizers,
optimizer, scheduler, eval.whitening) is ``{name: ..., <params>}`` or just ``name``; its params
are checked against the registered constructor's signature. ``resolve`` fills every default so
the saved config is complete and its hash identifies the run.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import logging
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from harness import plugins, registry
from harness.distributed import batch_problems
from harness.errors import ConfigError
from harness.types import CLUSTERING_METRICS, METRICS, recall_name

log = logging.getLogger(__name__)

Component = dict[str, Any]


#: What YAML 1.1 reads as a boolean: ``cache: off`` arrives as False, in a file and in a dotted override.
_OFF_WORDS = ("off", "no", "false", "n")
_ON_WORDS = ("on", "yes", "true", "y")


def _is_off(value: Any) -> bool:
    return value is False or (isinstance(value, str) and value.lower() in _OFF_WORDS)


def _is_on(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() in _ON_WORDS)


def _switch(off: Any, on: Any = None) -> Any:
    """A ``mode="before"`` validator for a switch-like option: YAML's booleans (``off``/``no``/``false``
    arrive as False) and their words as strings are the option's ``off`` value, and, when it has one, its
    ``on`` value; anything else is validated as it is."""

    def convert(value: Any) -> Any:
        if _is_off(value):
            return off
        if on is not None and _is_on(value):
            return on
        return value

    return convert


def _component(value: Any) -> Any:
    """Accept the ``name`` shorthand for ``{name: name}``; ``none``/null (and YAML's ``off``/``false``)
    means absent."""
    if value is None or _is_off(value) or (isinstance(value, str) and value.lower() == "none"):
        return None
    if isinstance(value, str):
        return {"name": value}
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSection(_Section):
    """Where images come from and how they are split and transformed."""

    dataset: Component = Field(default_factory=lambda: {"name": "digits"})
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    split_seed: int = 0
    transform: Literal["auto", "imagenet", "grey", "symm_official", "mdr_official", "abe_official"] = "auto"
    input_size: int | None = None
    resize_size: int | None = None
    #: DataLoader worker processes; ``auto``: 0 for in-memory images, else the CPUs available minus one
    #: (at most 8). Workers persist across epochs.
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    #: Decoded-image cache of image files (``harness.data.cache``): ``auto`` uses a disk cache when it fits
    #: ``cache_budget_gib`` and the free space, ``disk``/``memory`` always, ``off`` never.
    cache: Literal["auto", "off", "memory", "disk"] = "auto"
    cache_budget_gib: float = Field(64.0, gt=0)
    #: Random crops, flips and normalisation of a training batch at once on the training device
    #: (``harness.data.batch_augment``; workers only copy uint8 images); ``auto``: on CUDA, when the images
    #: come from the cache and the recipe is batched (not ``grey``). On the CPU ``auto`` leaves the crops to
    #: the DataLoader workers (``CachedCrop``: uint8, one resize per image), which never slows the step.
    batch_augment: bool | Literal["auto"] = "auto"
    #: Train without image files that fail to decode (their count is logged) instead of refusing to start.
    skip_bad: bool = False
    #: An image file with a side shorter than this many pixels is a bad file (refused, or dropped with
    #: ``skip_bad``); ``harness.data.images.MIN_SIDE``.
    min_side: int = Field(8, ge=1)

    _c = field_validator("dataset", mode="before")(_component)
    _cache = field_validator("cache", mode="before")(_switch("off"))
    _ba = field_validator("batch_augment", mode="before")(_switch(False, True))


class SamplerSection(_Section):
    """``kind: pk``: P×K batches, P classes × K images. ``kind: pairs``: ABE-M's batches of
    ``positive_pairs`` same-class and ``negative_pairs`` different-class random pairs. ``kind: triplets``:
    batches of ``triplets`` (anchor, positive, negative) triplets an offline miner (``miner: offline``)
    mined from the whole training split. An epoch is ``batches_per_epoch`` batches, by default about as
    many images as the training split has."""

    kind: Literal["pk", "pairs", "triplets"] = "pk"
    p: int = Field(8, ge=2)
    k: int = Field(4, ge=1)
    positive_pairs: int = Field(16, ge=0)
    negative_pairs: int = Field(16, ge=0)
    triplets: int = Field(16, ge=1)
    batches_per_epoch: int | None = Field(None, ge=1)
    #: Each sampled image this many times per batch, each copy augmented anew (MultiGrain); 1 = off.
    repeated_augmentations: int = Field(1, ge=1)


class DistributedSection(_Section):
    """One run across ``world_size`` processes with DDP (``harness.distributed``): one GPU each on CUDA
    (rank r on the r-th visible device), all on the CPU otherwise; the global batch is the sampler's, shared
    out in equal contiguous shards and gathered for the loss, so the numbers are those of one process."""

    world_size: int = Field(1, ge=1)
    #: ``auto``: nccl when training on CUDA, else gloo.
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    #: Seconds any collective waits for the other ranks before the run fails (nothing waits forever).
    timeout_s: float = Field(1800.0, gt=0)


class TrainSection(_Section):
    epochs: int = Field(5, ge=0)
    eval_every: int = Field(1, ge=1)
    #: Evaluate the test classes every this many epochs and record the best epoch's ``test_best/…`` (by
    #: ``selection_metric``): test-set selection, reported labelled as such, for the literature protocol of
    #: papers whose official code selects that way (MDR, Proxy-Anchor). Never used to select anything else.
    best_test_every: int | None = Field(None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    #: Autocast dtype when ``amp`` is on (CUDA only): bfloat16 needs no gradient scaling. Losses and
    #: regularizers still get float32 embeddings.
    amp_dtype: Literal["float16", "bfloat16"] = "float16"
    #: The model's weights and its input batches in the channels_last memory format (faster convolutions on
    #: tensor cores); same numbers within float tolerance.
    channels_last: bool = False
    #: ``torch.compile`` of the model's forward (in place: module names and checkpoints unchanged), with
    #: this mode; ``false`` = eager. Works on the CPU too (inductor's C++ backend needs a C++ compiler).
    compile: Literal[False, "default", "max-autotune"] = False
    grad_clip: float | None = Field(None, gt=0)
    warmup_epochs: int = Field(0, ge=0)
    backbone_lr_mult: float = Field(1.0, ge=0)
    head_lr_mult: float = Field(1.0, ge=0)
    loss_lr_mult: float = Field(1.0, ge=0)
    selection_metric: str = "recall@1"
    save_checkpoint: bool = False
    threads: int | None = Field(None, ge=1)
    distributed: DistributedSection = Field(default_factory=DistributedSection)

    _compile = field_validator("compile", mode="before")(_switch(False, "default"))


class EvalSection(_Section):
    ks: list[int] = Field(default_factory=lambda: [1, 2, 4, 8])
    distance: Literal["cosine", "euclidean"] = "cosine"
    batch_size: int = Field(256, ge=1)
    backend: Literal["auto", "faiss", "torch"] = "auto"
    nmi: bool = True
    whitening: Component | None = None
    #: Embed and score the test classes at the end of the run. Off in tune trials (``harness.study`` sets
    #: it): they select on validation classes, and test classes are touched by final runs only.
    test: bool = True

    _c = field_validator("whitening", mode="before")(_component)


class RunConfig(_Section):
    """Everything one training run depends on; ``run(config)`` is a pure function of it."""

    name: str = "run"
    seed: int = 0
    data: DataSection = Field(default_factory=DataSection)
    sampler: SamplerSection = Field(default_factory=SamplerSection)
    backbone: Component = Field(default_factory=lambda: {"name": "small_convnet"})
    pooling: Component = Field(default_factory=lambda: {"name": "avg"})
    model: Component = Field(default_factory=lambda: {"name": "embedder"})
    loss: Component = Field(default_factory=lambda: {"name": "triplet"})
    miner: Component | None = None
    synthesis: Component | None = None
    regularizers: list[Component] = Field(default_factory=list)
    optimizer: Component = Field(default_factory=lambda: {"name": "adam"})
    scheduler: Component | None = None
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)

    _c = field_validator("backbone", "pooling", "model", "loss", "optimizer", mode="before")(_component)
    _o = field_validator("miner", "synthesis", "scheduler", mode="before")(_component)

    @field_validator("regularizers", mode="before")
    @classmethod
    def _regs(cls, v: Any) -> Any:
        return [_component(x) for x in v] if isinstance(v, list) else v

    def components(self) -> list[tuple[str, str, Component]]:
        """(kind, dotted path, spec) for every component field that is set."""
        return _components(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def run_key(self) -> str:
        """Short stable hash of the canonical resolved config (what identifies a run)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


#: (kind, dotted path) of every single-component field of a RunConfig.
COMPONENT_FIELDS = (
    ("dataset", "data.dataset"),
    ("backbone", "backbone"),
    ("pooling", "pooling"),
    ("model", "model"),
    ("loss", "loss"),
    ("miner", "miner"),
    ("synthesis", "synthesis"),
    ("optimizer", "optimizer"),
    ("scheduler", "scheduler"),
    ("whitening", "eval.whitening"),
)


_RAISE, _ABSENT = object(), object()


def lookup(raw: Any, path: str, default: Any = _RAISE) -> Any:
    """The value at dotted ``path`` of a config dict (list items by index: ``regularizers.1.weight``);
    ``default``, or KeyError without one, where there is none. The one dotted-path reader of the harness."""
    node = raw
    for key in path.split("."):
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        elif isinstance(node, dict) and key in node:
            node = node[key]
        elif default is _RAISE:
            raise KeyError(path)
        else:
            return default
    return node


def _components(raw: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(kind, path, spec) of every component present in a (possibly invalid) config dict."""
    out = []
    for kind, path in COMPONENT_FIELDS:
        node = lookup(raw, path, None)
        if _component(node) is not None:
            out.append((kind, path, _component(node)))
    regs = raw.get("regularizers") if isinstance(raw, dict) else None
    if isinstance(regs, list):
        out += [("regularizer", f"regularizers.{i}", _component(r)) for i, r in enumerate(regs)]
    return out


def split_params(spec: Component) -> tuple[str, dict[str, Any]]:
    """``{name: n, **params}`` → ``(n, params)``."""
    params = dict(spec)
    return str(params.pop("name", "")), params


def _section_model(kind: Any) -> type[BaseModel] | None:
    """The section model a field holds: its type, or the model of an optional section (``Model | None``)."""
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    return next((k for k in options if isinstance(k, type) and issubclass(k, BaseModel)), None)


def _keys_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys the section at ``loc`` of ``model`` allows (empty where ``loc`` is not a section)."""
    for key in loc:
        field = model.model_fields.get(str(key))
        section = _section_model(field.annotation) if field else None
        if section is None:
            return []
        model = section
    return list(model.model_fields)


def did_you_mean(key: str, keys: list[str]) -> list[str]:
    """The valid keys ``key`` may be a typo of (the suggestion of every config error)."""
    return difflib.get_close_matches(key, keys, n=3, cutoff=0.5)


def unknown_key(path: str, keys: list[str]) -> str:
    """The problem of an unknown key at dotted ``path``: the keys it may be a typo of, and the valid ones."""
    close = did_you_mean(path.rsplit(".", 1)[-1], keys)
    hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
    return f"{path}: unknown key; {hint}(valid: {', '.join(keys)})" if keys else f"{path}: unknown key"


def _pydantic_problems(e: pydantic.ValidationError, model: type[BaseModel]) -> list[str]:
    """One line per error with its dotted path; an unknown key with the valid keys it may be a typo of. A
    required key that such a typo misspells is not reported again (the typo says it)."""
    hints = {}
    for err in e.errors():
        if err["type"] == "extra_forbidden":
            keys = _keys_at(model, err["loc"][:-1])
            hints[tuple(err["loc"])] = keys, did_you_mean(str(err["loc"][-1]), keys)
    meant = {(*loc[:-1], c) for loc, (_, close) in hints.items() for c in close}
    problems = []
    for err in e.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc) or "<root>"
        if loc in hints:
            problems.append(unknown_key(path, hints[loc][0]))
        elif err["type"] == "missing":
            problems += [] if loc in meant else [f"{path}: {err['msg']}"]
        else:
            problems.append(f"{path}: {err['msg']} (got {err.get('input')!r})")
    return problems


def _component_problems(raw: dict[str, Any]) -> list[str]:
    problems = []
    for kind, path, spec in _components(raw):
        if not isinstance(spec, dict) or "name" not in spec:
            problems.append(f"{path}: a component needs a 'name' (got {spec!r})")
            continue
        name, params = split_params(spec)
        problems += registry.validate_params(kind, name, params, path)
    return problems


def _compatibility_problems(cfg: RunConfig) -> list[str]:
    """A loss takes a miner / synthesis only if its constructor asks for one; miner outputs must match."""
    loss_name = str(cfg.loss.get("name"))
    if loss_name not in registry.registry("loss"):
        return []
    loss = registry.registry("loss").get(loss_name)
    problems = []
    for kind, spec in (("miner", cfg.miner), ("synthesis", cfg.synthesis)):
        if spec is not None and kind not in loss.context:
            problems.append(f"{kind}: loss {loss_name!r} cannot take a {kind} (it would be a silent no-op)")
    if (
        cfg.miner is not None
        and "miner" in loss.context
        and cfg.miner.get("name") in registry.registry("miner")
    ):
        miner = registry.registry("miner").get(cfg.miner["name"])
        produces = plugins.produces(miner.obj)
        accepts = plugins.accepts_miner(loss.obj)
        if produces not in accepts:
            problems.append(
                f"miner: {miner.name!r} produces {produces}, loss {loss_name!r} accepts {', '.join(accepts)}"
            )
    return problems


def _offline_mining_problems(cfg: RunConfig) -> list[str]:
    """A miner that mines the whole training split (``plugins.SplitMiner``) and ``sampler.kind: triplets``,
    which batches its triplets, only work together; repeated augmentations would break the triplet order."""
    name = cfg.miner.get("name") if cfg.miner is not None else None
    miners = registry.registry("miner")
    offline = name in miners and plugins.mines_split(miners.get(str(name)).obj)
    kind = cfg.sampler.kind
    problems = []
    if offline and kind != "triplets":
        problems.append(
            f"miner: {name!r} mines triplets from the whole training split and trains on them only with "
            f"sampler.kind: triplets (got sampler.kind: {kind})"
        )
    if kind == "triplets" and not offline:
        problems.append(
            "sampler.kind: 'triplets' batches the triplets an offline miner mines from the training split; "
            f"set miner: offline (got miner: {name or 'none'})"
        )
    if kind == "triplets" and cfg.sampler.repeated_augmentations > 1:
        problems.append(
            "sampler.repeated_augmentations: not with sampler.kind: triplets (the copies would break the "
            "anchor, positive, negative order of its batches)"
        )
    return problems


def _selection_problems(cfg: RunConfig) -> list[str]:
    """``train.selection_metric`` names a metric the validation evaluation computes (said before training
    starts, not at the first validation); without validation classes nothing is selected."""
    ev, metric = cfg.eval, cfg.train.selection_metric
    if not ev.test and cfg.train.best_test_every:
        return ["train.best_test_every: evaluates the test classes, which eval.test: false leaves out"]
    computed = [recall_name(k) for k in ev.ks] + [m for m in METRICS if ev.nmi or m not in CLUSTERING_METRICS]
    if cfg.data.val_fraction == 0 or metric in computed:
        return []
    hint = "; clustering metrics need eval.nmi: true" if metric in CLUSTERING_METRICS else ""
    return [f"train.selection_metric: {metric!r} is not computed (computed: {', '.join(computed)}){hint}"]


#: The ``data.transform`` recipes ``harness.data.batch_augment`` runs on batches (``BATCHED`` there).
BATCHED_TRANSFORMS = ("imagenet", "symm_official", "mdr_official", "abe_official")


def _data_problems(cfg: RunConfig) -> list[str]:
    """What the data section says wrong by itself, found before any image is read (not after the image check
    and the cache): a batched augmentation of a recipe that is not batched."""
    data = cfg.data
    if data.batch_augment is True and data.transform not in ("auto", *BATCHED_TRANSFORMS):
        return [
            f"data.batch_augment: the {data.transform!r} transform is not batched (batched: "
            f"{', '.join(BATCHED_TRANSFORMS)}); set data.batch_augment: auto or false"
        ]
    return []


def _fill_defaults(spec: Component, kind: str) -> Component:
    name, params = split_params(spec)
    entry = registry.registry(kind).get(name)
    full = {"name": name}
    for p in entry.params.values():
        full[p.name] = registry.coerce(p, params[p.name]) if p.name in params else copy.deepcopy(p.default)
    return json.loads(json.dumps(full, default=list))  # tuples → lists: canonical JSON form


def validate(raw: dict[str, Any]) -> RunConfig:
    """Parse ``raw`` into a resolved RunConfig or raise ConfigError listing every problem."""
    problems = _component_problems(raw)
    try:
        cfg = RunConfig.model_validate(raw)
    except pydantic.ValidationError as e:
        raise ConfigError(_pydantic_problems(e, RunConfig) + problems) from e
    problems += _compatibility_problems(cfg) + _selection_problems(cfg) + _offline_mining_problems(cfg)
    problems += batch_problems(cfg.sampler, cfg.train.distributed.world_size) + _data_problems(cfg)
    if problems:
        raise ConfigError(problems)
    problems = _build_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return resolve(cfg)


def _build_problems(cfg: RunConfig) -> list[str]:
    """A third-party component that cannot be built with these params (a plugin written against another
    version of the harness's interfaces) is a config error, found before any data is read."""
    problems = []
    for kind, path, spec in cfg.components():
        name, params = split_params(spec)
        problem = registry.build_problem(kind, name, params, path)
        if problem:
            problems.append(problem)
    return problems


def resolve(cfg: RunConfig) -> RunConfig:
    """Copy of ``cfg`` with every component's defaults written out."""
    data = cfg.to_dict()
    for kind, path, spec in cfg.components():
        filled = _fill_defaults(spec, kind)
        _set(data, path.split("."), filled)
    return RunConfig.model_validate(data)


def _set(d: Any, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        d = d[int(k)] if isinstance(d, list) else d.setdefault(k, {})
    last = keys[-1]
    if isinstance(d, list):
        d[int(last)] = value
    else:
        d[last] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a copy of ``raw``. A component switch
    (``loss=ms`` or ``loss.name=ms``) drops the old component's parameters and logs what it dropped."""
    out = copy.deepcopy(raw)
    problems = []
    touched: set[str] = set()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r}: expected dotted.path=value")
            continue
        try:
            note = _set_path(out, key.strip(), parse_yaml(value) if value.strip() else None, touched)
        except (ValueError, IndexError, TypeError, AttributeError, yaml.YAMLError) as e:
            problems.append(f"override {item!r}: {e}")
            continue
        if note:
            log.info("%s: %s", item, note)
    if problems:
        raise ConfigError(problems)
    return out


#: The dotted paths of a RunConfig that hold one component (``regularizers.<i>`` hold one each).
_COMPONENT_PATHS = frozenset(path for _, path in COMPONENT_FIELDS)


def _is_component(keys: list[str]) -> bool:
    """Whether ``keys`` lead to a component of a RunConfig, or of a study file's ``base`` (a RunConfig)."""
    path = ".".join(keys[1:] if keys[:1] == ["base"] else keys)
    return path in _COMPONENT_PATHS or re.fullmatch(r"regularizers\.\d+", path) is not None


def _set_path(raw: dict[str, Any], path: str, value: Any, touched: set[str] | None = None) -> str | None:
    """Set dotted ``path`` of ``raw`` in place, creating mappings (and expanding ``loss: triplet``).

    Switching a component to another name, whole (``loss: ms``) or by its name (``loss.name: ms``), drops
    the old component's parameters: they would be unknown to the new one. Parameters set earlier in the same
    change (their paths in ``touched``, to which ``path`` is added) are kept, so ``loss.alpha=3 loss.name=ms``
    and ``loss.name=ms loss.alpha=3`` agree. Returns a note of what was dropped (None: nothing)."""
    keys = path.split(".")
    node: Any = raw
    for k in keys[:-1]:
        if isinstance(node, list):
            if isinstance(node[int(k)], str):  # `regularizers: [mdr]`
                node[int(k)] = {"name": node[int(k)]}
            node = node[int(k)]
        else:
            if isinstance(node.get(k), str):  # component shorthand `loss: triplet`
                node[k] = {"name": node[k]}
            node = node.setdefault(k, {})
    touched = set() if touched is None else touched
    old: Any = None
    dropped: dict[str, Any] = {}
    if keys[-1] == "name" and _is_component(keys[:-1]) and isinstance(node, dict) and "name" in node:
        old, where = node.get("name"), ".".join(keys[:-1])
        if old != value:
            dropped = {k: node.pop(k) for k in list(node) if k != "name" and f"{where}.{k}" not in touched}
    elif _is_component(keys) and isinstance(node, dict) and isinstance(node.get(keys[-1]), dict):
        old, where = node[keys[-1]].get("name"), path
        kept = value if isinstance(value, dict) else {}
        dropped = {k: v for k, v in node[keys[-1]].items() if k != "name" and k not in kept}
    _set(node, keys[-1:], value)
    touched.add(path)
    if not dropped:
        return None
    return f"dropped the parameters of {where} {old!r}: {', '.join(f'{k}={v!r}' for k, v in dropped.items())}"


def assign(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``raw`` with each dotted path of ``values`` set to its value: ``apply_overrides`` for
    values that are already Python objects (no YAML text round trip), a component switch included (what it
    drops is logged at debug level: a study assigns its arms' values many times)."""
    out = copy.deepcopy(raw)
    problems = []
    touched: set[str] = set()
    for path, value in values.items():
        try:
            note = _set_path(out, path, copy.deepcopy(value), touched)
        except (ValueError, IndexError, TypeError, AttributeError) as e:
            problems.append(f"{path}: cannot set it to {value!r} ({e})")
            continue
        if note:
            log.debug("%s=%r: %s", path, value, note)
    if problems:
        raise ConfigError(problems)
    return out


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` (no dot) as a float, as every DML config writes learning rates."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str) -> Any:
    """Parse YAML text with the harness's loader (see ``_Loader``)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = parse_yaml(p.read_text()) or {}
    except yaml.YAMLError as e:  # PyYAML names a parsed string "<unicode string>": name the file instead
        raise ConfigError(f"{p}: not valid YAML: {str(e).replace('<unicode string>', str(p))}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    return data


def name_default_components(raw: dict[str, Any]) -> dict[str, Any]:
    """Copy of ``raw`` with every default component it leaves out written as ``{name: <default>}``, so an
    override such as ``optimizer.lr=0.01`` applies to the default optimizer."""
    out = copy.deepcopy(raw)
    defaults = RunConfig().to_dict()
    for _, path in COMPONENT_FIELDS:
        default = lookup(defaults, path)
        if isinstance(default, dict) and lookup(out, path, _ABSENT) is _ABSENT:
            _set(out, path.split("."), {"name": default["name"]})
    return out


def load(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a RunConfig from YAML, apply dotted overrides, validate and resolve."""
    return validate(apply_overrides(name_default_components(load_yaml(path)), overrides or []))
