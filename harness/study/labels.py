"""Short, readable labels of arm factor values (``loss=triplet``, ``regularizers=[mdr(levels=3)]``)."""

from __future__ import annotations

import json
from itertools import accumulate
from typing import Any


def format_value(value: Any) -> str:
    """One config value as a short label: ``none``, ``true``, ``0.001``, a component list by its names."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):  # components in a list (regularizers) show their names
        return (
            "["
            + ",".join(
                str(v["name"]) if isinstance(v, dict) and "name" in v else format_value(v) for v in value
            )
            + "]"
        )
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def format_values(values: list[Any]) -> list[str]:
    """Short labels of a factor's values: a component dict shows its name, plus the params that tell
    apart dicts of the same name."""
    if all(isinstance(v, list) for v in values) and len(set(map(format_value, values))) < len(values):
        # lists of components (regularizers) that differ only in params: the same rule over all their items
        items = format_values([item for v in values for item in v])
        ends = list(accumulate(len(v) for v in values))
        return ["[" + ",".join(items[e - len(v) : e]) + "]" for v, e in zip(values, ends, strict=True)]
    names = [v.get("name") if isinstance(v, dict) else None for v in values]
    out = []
    for v, n in zip(values, names, strict=True):
        if not isinstance(v, dict) or n is None:
            out.append(format_value(v))
            continue
        same = [w for w, m in zip(values, names, strict=True) if m == n and isinstance(w, dict)]
        differ = sorted(k for k in v if k != "name" and any(w.get(k) != v.get(k) for w in same))
        out.append(n + (f"({', '.join(f'{k}={format_value(v.get(k))}' for k in differ)})" if differ else ""))
    return out


def short_names(paths: list[str]) -> dict[str, str]:
    """``loss.name`` → ``loss``, ``model.lambda_div`` → ``lambda_div``; the full path where ambiguous."""
    short = {p: p.removesuffix(".name").split(".")[-1] for p in paths}
    counts = {s: list(short.values()).count(s) for s in short.values()}
    return {p: (s if counts[s] == 1 else p.removesuffix(".name")) for p, s in short.items()}
