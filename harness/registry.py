"""One registry mechanism for every kind of component (dataset, backbone, pooling, model, loss, ...).

A component is a class or factory registered under ``(kind, name)``. Its hyperparameters are its
keyword-only constructor arguments with defaults; the registry reads them (and their type hints)
from the signature, so the schema is the code. Names in ``CONTEXT_PARAMS`` are things the engine
knows (number of classes, the built backbone, the miner...) and passes only to constructors that
ask for them by name; users never set them.

Constraints are declared on the signature too (``Annotated[float, Field(ge=0)]``, ``Literal[...]``) and
checked by pydantic before anything is built, with the component's true dotted config path. A constructor
that still raises a ``ConfigError`` writes its problems relative to itself (``"embedding_dim: ..."``);
``build`` prefixes them with the path it was given.

Built-ins and third-party plugins load the same way, lazily, through the entry-point group
``dmlh.plugins``: the loaded object is a module (importing it registers its components) or a
callable that is called once. A plugin that fails to load is logged, skipped and listed as broken.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import inspect
import json
import logging
import pkgutil
import re
import sys
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pydantic
import torch

from harness.errors import ConfigError, HarnessError, UnknownComponentError
from harness.plugins import BenchVariant, InterfaceDeprecationWarning, Reference

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "dmlh.plugins"

#: Constructor arguments supplied by the engine, never by the user: a keyword-only parameter with one of
#: these names and *no default* is context; with a default it is an ordinary hyperparameter.
CONTEXT_PARAMS = frozenset(
    {
        "num_classes",
        "embedding_dim",
        "in_channels",
        "backbone",
        "pooling",
        "miner",
        "synthesis",
        "optimizer",
        "epochs",
        "params",
    }
)

#: Engine modules that register generic components (the embedder model, optimizers, schedulers, trackers).
_ENGINE_MODULES = ("harness.model", "harness.optim", "harness.data.datasets", "harness.tracking")

_MISSING = inspect.Parameter.empty


@dataclass(frozen=True)
class Param:
    """One user-settable hyperparameter of a component."""

    name: str
    default: Any
    annotation: Any

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    def type_name(self) -> str:
        """The annotation as a user reads it: ``float (ge=0, le=1)`` for ``Annotated[float, Field(...)]``."""
        return _type_name(self.annotation)

    def describe(self) -> str:
        default = "required" if self.required else repr(self.default)
        return f"{self.name}: {self.type_name()} = {default}"


_BOUNDS = ("gt", "ge", "lt", "le", "multiple_of", "min_length", "max_length")


def _type_name(ann: Any) -> str:
    origin = typing.get_origin(ann)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(ann)
        constraints = [c for m in meta for c in getattr(m, "metadata", [m])]  # FieldInfo, annotated_types
        bounds = [
            f"{k}={getattr(c, k)}" for c in constraints for k in _BOUNDS if getattr(c, k, None) is not None
        ]
        return f"{_type_name(base)} ({', '.join(bounds)})" if bounds else _type_name(base)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(ann))
    if ann is type(None):
        return "None"
    return ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")


@dataclass(frozen=True)
class Entry:
    """A registered component: the object, its user parameters and the context it asks for."""

    kind: str
    name: str
    obj: Callable[..., Any]
    params: Mapping[str, Param]
    context: frozenset[str]
    plugin: str
    references: Callable[[], list[Reference]] | None = None
    bench: tuple[BenchVariant, ...] = ()

    @property
    def summary(self) -> str:
        """The first sentence of the docstring (which may run over several lines), for `dmlh list`."""
        paragraph = " ".join((inspect.getdoc(self.obj) or "").split("\n\n")[0].split())
        # a sentence ends at a full stop before a capital letter or the end; "e.g. x" or "(3.0)" go on
        return re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph)[0]

    @property
    def origin(self) -> str:
        """Where the component comes from, as `dmlh list` shows it: ``harness`` (the engine), its file in the
        project's ``methods/`` folder, or the entry point and the installed package that declares it."""
        module = str(getattr(self.obj, "__module__", "") or "")
        top = module.split(".")[0]
        if top == "harness":
            return "harness"
        if top == "methods":  # its file in the project: methods/losses/circle.py
            package = str(getattr(sys.modules.get(module), "__file__", "")).endswith("__init__.py")
            return "/".join([*module.split("."), *(["__init__"] if package else [])]) + ".py"
        dists = ", ".join(_distributions().get(top, [])) or "not installed"
        return f"plugin {self.plugin}, package {dists}"


def _signature_schema(obj: Callable[..., Any]) -> tuple[dict[str, Param], frozenset[str]]:
    target = obj.__init__ if inspect.isclass(obj) else obj  # type: ignore[misc]
    sig = inspect.signature(target)
    try:
        hints = typing.get_type_hints(target, include_extras=True)
    except Exception:  # unresolvable forward references: fall back to no type checks
        hints = {}
    params: dict[str, Param] = {}
    context: set[str] = set()
    for p in sig.parameters.values():
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in CONTEXT_PARAMS and p.default is _MISSING:
            context.add(p.name)
            continue
        params[p.name] = Param(p.name, p.default, hints.get(p.name, Any))
    return params, frozenset(context)


class Registry:
    """Components of one kind, by name."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def add(
        self,
        name: str,
        obj: Callable[..., Any],
        *,
        replace: bool = False,
        plugin: str = "",
        references: Callable[[], list[Reference]] | None = None,
        bench: Iterable[BenchVariant] = (),
    ) -> None:
        if name in self._entries and not replace:
            raise ValueError(
                f"{self.kind} {name!r} is already registered (by {self._entries[name].plugin or 'builtin'}); "
                "pass replace=True to override it"
            )
        params, context = _signature_schema(obj)
        self._entries[name] = Entry(
            self.kind, name, obj, params, context, plugin or obj.__module__, references, tuple(bench)
        )

    def get(self, name: str, path: str = "") -> Entry:
        if name not in self._entries:
            raise UnknownComponentError(self.unknown_message(name, path))
        return self._entries[name]

    def unknown_message(self, name: object, path: str) -> str:
        close = difflib.get_close_matches(str(name), list(self._entries), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        where = f"{path}: " if path else ""
        return (
            f"{where}unknown {self.kind} {name!r}{hint} (known: {', '.join(sorted(self._entries)) or 'none'})"
        )

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries


_REGISTRIES: dict[str, Registry] = {}
_BROKEN_PLUGINS: dict[str, str] = {}
_plugins_loaded = False
_loading_plugin = ""


def registry(kind: str) -> Registry:
    """The registry of ``kind`` (created on first use); plugins are loaded first."""
    load_plugins()
    return _REGISTRIES.setdefault(kind, Registry(kind))


def kinds() -> list[str]:
    load_plugins()
    return sorted(_REGISTRIES)


def register(
    kind: str,
    name: str,
    *,
    replace: bool = False,
    references: Callable[[], list[Reference]] | None = None,
    bench: Iterable[BenchVariant] = (),
) -> Callable[[Any], Any]:
    """Class/function decorator: ``@register("loss", "triplet")``. ``references`` (a function returning the
    reference implementations, imported when called) and ``bench`` rows are what ``dmlh bench`` times."""

    def deco(obj: Any) -> Any:
        reg = _REGISTRIES.setdefault(kind, Registry(kind))
        reg.add(name, obj, replace=replace, plugin=_loading_plugin, references=references, bench=bench)
        return obj

    return deco


def load_plugins() -> None:
    """Import every ``dmlh.plugins`` entry point once (built-in ``methods`` first)."""
    global _plugins_loaded, _loading_plugin
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for mod in _ENGINE_MODULES:
        importlib.import_module(mod)
    eps = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name != "builtin")
    seen: set[str] = set()
    for ep in eps:
        if ep.value in seen:  # the same distribution visible twice on sys.path
            continue
        seen.add(ep.value)
        _loading_plugin = ep.name
        try:
            loaded = ep.load()
            if callable(loaded) and not inspect.ismodule(loaded):
                loaded()
        except Exception as e:  # a broken third-party plugin must not take the harness down
            _broken(ep.name, e)
        finally:
            _loading_plugin = ""


def import_submodules(package: str) -> None:
    """Import every module under ``package`` (sorted, subpackages included), so a plugin package registers a
    new method by its file alone. A module that fails to import is logged and listed as a broken plugin under
    its module name; the others still load. Called from a plugin package's ``__init__``."""
    pkg = importlib.import_module(package)

    def failed(name: str) -> None:  # a subpackage whose __init__ raised while walking
        _broken(name, sys.exc_info()[1])

    found = pkgutil.walk_packages(pkg.__path__, f"{package}.", onerror=failed)
    for name in sorted(m.name for m in found):
        try:
            importlib.import_module(name)
        except Exception as e:  # one broken file must not hide the other methods
            _broken(name, e)


def _broken(name: str, e: BaseException | None) -> None:
    log.warning("plugin module %s failed to load: %s", name, e)
    _BROKEN_PLUGINS[name] = f"{type(e).__name__}: {e}"


def broken_plugins() -> dict[str, str]:
    load_plugins()
    return dict(_BROKEN_PLUGINS)


def _type_check(param: Param, value: Any, path: str) -> str | None:
    if param.annotation is Any:
        return None
    try:
        pydantic.TypeAdapter(param.annotation).validate_python(value, strict=False)
    except pydantic.ValidationError as e:
        msg = e.errors()[0]["msg"]
        return f"{path}.{param.name}: {value!r} is not a valid {param.type_name()} ({msg})"
    except Exception:  # annotation pydantic cannot handle (e.g. nn.Module): no check
        return None
    return None


def coerce(param: Param, value: Any) -> Any:
    """``value`` converted to the parameter's type (e.g. the int 1 for a float parameter → 1.0)."""
    if param.annotation is Any or value is None:
        return value
    try:
        return pydantic.TypeAdapter(param.annotation).validate_python(value, strict=False)
    except Exception:  # validated before; annotations pydantic cannot handle are left as they are
        return value


def validate_params(kind: str, name: str, params: Mapping[str, Any], path: str) -> list[str]:
    """All problems with ``params`` for component ``kind/name`` (unknown, missing, ill-typed)."""
    try:
        entry = registry(kind).get(name, path + ".name" if path else "")
    except UnknownComponentError as e:
        return e.problems
    problems = []
    for key, value in params.items():
        if key not in entry.params:
            close = difflib.get_close_matches(key, list(entry.params), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            valid = ", ".join(entry.params) or "none"
            problems.append(f"{path}.{key}: unknown parameter of {kind} {name!r}{hint} (valid: {valid})")
            continue
        err = _type_check(entry.params[key], value, path)
        if err:
            problems.append(err)
    for p in entry.params.values():
        if p.required and p.name not in params:
            problems.append(f"{path}.{p.name}: required parameter of {kind} {name!r} is missing")
    return problems


def build(
    kind: str, name: str, /, context: Mapping[str, Any] | None = None, path: str = "", **params: Any
) -> Any:
    """Build component ``kind/name`` from user ``params`` plus the ``context`` entries it asks for.

    Raises ConfigError naming ``path`` for an unknown name or unknown / ill-typed / out-of-range parameters;
    a user error the constructor raises itself (any ``HarnessError``) comes back prefixed with ``path``.
    """
    path = path or kind
    problems = validate_params(kind, name, params, path)
    if problems:
        raise ConfigError(problems)
    entry = registry(kind).get(name)
    ctx = {k: v for k, v in (context or {}).items() if k in entry.context}
    try:
        return entry.obj(**params, **ctx)
    except ConfigError as e:
        raise ConfigError([_at(path, p, entry) for p in e.problems]) from e
    except HarnessError as e:
        if str(e).startswith(path):
            raise
        raise type(e)(f"{path}: {e}") from e


def _at(path: str, problem: str, entry: Entry) -> str:
    """``problem`` as raised by ``entry``'s constructor, located at ``path``: a problem that starts with one
    of its parameter names is relative (``"m: ..."`` → ``"model.m: ..."``); one that already names a dotted
    path is left as it is; any other gets ``"<path>: "`` in front."""
    head = problem.split(":", 1)[0].split(" ", 1)[0]
    if head in entry.params:
        return f"{path}.{problem}"
    if problem.startswith(path) or "." in head:
        return problem
    return f"{path}: {problem}"


#: Stand-ins for the context a constructor may ask for, in a build probe (``build_problem``); a component that
#: asks for anything else (a model's built backbone) is not probed.
_PROBE_CONTEXT: dict[str, Any] = {
    "num_classes": 4,
    "embedding_dim": 16,
    "in_channels": 3,
    "miner": None,
    "synthesis": None,
    "epochs": 1,
}
_PROBES: dict[str, tuple[str | None, list[str]]] = {}
#: Kinds whose building reads data (a dataset loads its images): never built to probe them.
_NOT_PROBED = frozenset({"dataset"})


def is_builtin(entry: Entry) -> bool:
    """Whether ``entry`` comes with dml-harness (its ``methods`` package or the engine)."""
    return entry.plugin == "builtin" or entry.plugin.split(".")[0] in ("harness", "methods")


def build_problem(
    kind: str, name: str, params: Mapping[str, Any] | None = None, path: str = ""
) -> str | None:
    """Why the third-party component ``kind/name`` cannot be built with ``params`` (None: it can), in one
    line naming its package and what to change: an interface change of the harness breaks a plugin here,
    before any data is read, not as a raw TypeError in the middle of a run. Built-ins are covered by the
    contract tests and not probed; nor is a component that asks for context other than ``_PROBE_CONTEXT``."""
    problem, _ = _probe(kind, name, params or {})
    return f"{path or kind}: {problem}" if problem else None


def build_warnings(kind: str, name: str) -> list[str]:
    """The deprecation warnings that building the third-party component ``kind/name`` from its defaults
    gives."""
    return _probe(kind, name, {})[1]


def _probe(kind: str, name: str, params: Mapping[str, Any]) -> tuple[str | None, list[str]]:
    entry = registry(kind).get(name)
    if kind in _NOT_PROBED or is_builtin(entry) or not entry.context <= set(_PROBE_CONTEXT):
        return None, []
    key = json.dumps([kind, name, params], sort_keys=True, default=repr)
    if key not in _PROBES:
        _PROBES[key] = _build_on_meta(entry, params)
    return _PROBES[key]


def _build_on_meta(entry: Entry, params: Mapping[str, Any]) -> tuple[str | None, list[str]]:
    """Build ``entry`` on torch's meta device (no memory, no compute; on the CPU if that fails)."""
    ctx = {k: _PROBE_CONTEXT[k] for k in entry.context}
    error: Exception | None = None
    for device in ("meta", "cpu"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with torch.device(device):
                    entry.obj(**params, **ctx)
            except HarnessError:  # a user error (an absent weights file): the real build reports it
                return None, []
            except Exception as e:  # any defect of the plugin: reported, never raised
                error = e
                continue
        deprecated = [w.message for w in caught if issubclass(w.category, InterfaceDeprecationWarning)]
        notes = [f"deprecated: {message}" for message in deprecated]
        return None, notes
    assert error is not None
    return (
        f"{entry.kind} {entry.name!r} of {_package(entry)} cannot be built: {type(error).__name__}: {error}; "
        f"{_fix(entry, error)}",
        [],
    )


@functools.cache
def _distributions() -> Mapping[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _package(entry: Entry) -> str:
    """``plugin 'x' (package dist-name, module mod)``: where a user goes to fix a component."""
    module = str(getattr(entry.obj, "__module__", "") or "")
    dists = _distributions().get(module.split(".")[0], [])
    package = ", ".join(dists) or f"{module.split('.')[0]}, not an installed distribution"
    return f"plugin {entry.plugin!r} (package {package}; module {module})"


def _fix(entry: Entry, error: Exception) -> str:
    """What to change: a call to a harness base class of another version gets that class's signature now."""
    called = re.search(r"(\w+)\.__init__\(\)", str(error))
    if isinstance(error, TypeError) and called and inspect.isclass(entry.obj):
        for base in entry.obj.__mro__[1:]:
            if base.__name__ == called.group(1) and base.__module__.split(".")[0] == "harness":
                signature = str(inspect.signature(base)).replace("'", "")  # postponed annotations
                return (
                    f"it calls {base.__name__}.__init__ as another dml-harness version had it; now "
                    f"{base.__name__}{signature} ({base.__module__}): update the plugin's call, or install "
                    "the dml-harness version it was written for"
                )
    return "fix the plugin, or install the dml-harness version it was written for"


def describe(kinds_: Iterable[str] | None = None) -> str:
    """Human-readable listing of every component with its parameters and defaults (``dmlh list``)."""
    lines: list[str] = []
    unbuildable: list[str] = []
    for kind in kinds_ or kinds():
        reg = registry(kind)
        lines.append(f"[{kind}]")
        for e in reg.entries():
            lines.append(f"  {e.name}  ({e.origin})  {e.summary}")
            for p in e.params.values():
                lines.append(f"      {p.describe()}")
            problem = build_problem(kind, e.name)
            if problem:
                unbuildable.append(problem)
                lines.append(f"      BROKEN: {problem}")
            lines.extend(f"      {note}" for note in build_warnings(kind, e.name))
    broken = broken_plugins()
    if broken or unbuildable:
        lines.append("[broken plugins]")
        lines.extend(f"  {name}: {err}" for name, err in broken.items())
        lines.extend(f"  {problem}" for problem in unbuildable)
    return "\n".join(lines)
