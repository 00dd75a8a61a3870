"""``dmlh table FILE.yaml``: one methods × datasets table across studies, the table every DML paper prints
(rows: methods, each under the protocols asked for; columns: datasets × Recall@K or MAP@R).

The table file names the studies (a study name in the results store, or a study YAML, relative to the
table file), which arm of which study is which method, the metrics per dataset (defaults: CUB-200-2011 and
Cars196 R@1/2/4/8, SOP R@1/10/100/1000, In-Shop R@1/10/20/30/40/50) and the protocols (``published``: the
study's ``published:`` block; ``literature`` and ``fair``: our final runs of that protocol). It works on
whatever results exist: a study that has not run gives its published numbers and ``—``. Bold is decided
per column and protocol among the methods, as in a study's report (``stats.bold_cells``, Holm-corrected
across the table); published numbers have no seeds and are never bold.

Written to ``<results>/tables/<name>/``: ``<name>.csv`` (tidy: one row per method, protocol, dataset and
metric, fractions), ``.md``, ``.tex`` (one column), ``_wide.tex`` (``table*``) and ``.html``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pydantic
from pydantic import BaseModel, ConfigDict, Field

from harness import config, store
from harness.errors import ConfigError
from harness.reporting import page, paper, stats
from harness.reporting.tables import NA, cell, legend, to_markdown, write_table
from harness.study.spec import arm_labels
from harness.types import METRICS, metric_title, recall_k, recall_name

log = logging.getLogger(__name__)

Protocol = Literal["published", "literature", "fair"]
DATASET_TITLES = {"cub200": "CUB-200-2011", "cars196": "Cars196", "sop": "SOP", "inshop": "In-Shop"}
_R = [1, 2, 4, 8]
#: The Recall@K each dataset's papers print; other datasets get R@1/2/4/8.
DEFAULT_METRICS = {
    "cub200": [recall_name(k) for k in _R],
    "cars196": [recall_name(k) for k in _R],
    "sop": [recall_name(k) for k in (1, 10, 100, 1000)],
    "inshop": [recall_name(k) for k in (1, 10, 20, 30, 40, 50)],
}
PROTOCOL_TITLES: dict[Protocol, str] = {
    "published": "published",
    "literature": "ours, literature",
    "fair": "ours, fair",
}
PROTOCOL_NOTES = {
    "published": "published: the paper's number",
    "literature": "ours, literature: the paper's recipe on every training class, untuned, last epoch",
    "fair": "ours, fair: one protocol for every method, hyperparameters tuned and epochs selected on "
    "validation classes",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Dataset(_Strict):
    title: str | None = None
    metrics: list[str] | None = None


class TableSpec(_Strict):
    """A table file: which arm of which study is which method, and what the columns are."""

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    caption: str | None = None
    #: Study names (in the results store) or study YAML files (relative to the table file).
    studies: list[str] = Field(min_length=1)
    #: Row label → the arm label in every listed study that has it, or ``{study: arm label}``.
    methods: dict[str, str | dict[str, str]] = Field(min_length=1)
    #: Dataset name → its column title and metrics; also orders the datasets (others follow).
    datasets: dict[str, _Dataset] = Field(default_factory=dict)
    #: The metrics of every dataset not given its own (e.g. ``[map@r]``); default: ``DEFAULT_METRICS``.
    metrics: list[str] | None = None
    protocols: list[Protocol] = Field(default_factory=lambda: list(PROTOCOL_TITLES), min_length=1)


@dataclass
class _Study:
    """What the table needs of one study: its dataset, arms, published numbers and final runs."""

    name: str
    dataset: str
    arms: list[str]
    published: dict[str, dict[str, Any]]
    runs: pd.DataFrame


def _dataset_name(raw: dict[str, Any]) -> str:
    """``base.data.dataset`` of a study dict (a name or ``{name: …}``)."""
    dataset = ((raw.get("base") or {}).get("data") or {}).get("dataset")
    return str(dataset.get("name") if isinstance(dataset, dict) else dataset)


def _final_runs(
    name: str, storage: str | None, results: str | Path
) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    """The complete final runs of study ``name`` (each with its ``protocol``) and its stored spec; None
    where the store has no such study."""
    if storage is None and not store.journal_path(name, results).is_file():
        return None
    if name not in store.study_names(store.resolve(name, storage, results)[2], name):
        return None
    df = store.load(name, storage, results)
    meta = df.attrs["meta"]
    if df.empty:
        return df, meta
    final = df[(df.stage == "final") & (df.state == "COMPLETE")]
    return final.assign(protocol=paper.protocols(final)), meta


def _load_study(entry: str, folder: Path, storage: str | None, results: str | Path) -> _Study:
    """A study from its YAML (``*.yaml``, relative to ``folder``) or its name in the store; what ran (the
    store's spec) wins over the YAML."""
    raw: dict[str, Any] | None = None
    if entry.endswith((".yaml", ".yml")):
        raw = config.load_yaml(folder / entry)
        name = str(raw.get("name") or Path(entry).stem)
    else:
        name = entry
    found = _final_runs(name, storage, results)
    if found is not None:
        runs, meta = found
        published = meta.get("published") or (raw or {}).get("published") or {}
        raw = meta.get("spec") or raw or {}
        arms = [a["label"] for a in meta.get("arms", [])]
    elif raw is None:
        raise ConfigError(f"studies: {entry}: no such study in the results store, and not a study YAML")
    else:
        runs, arms, published = pd.DataFrame(), arm_labels(raw), raw.get("published") or {}
    log.info("%s: %d complete final runs", name, len(runs))
    return _Study(name, _dataset_name(raw), arms, published, runs)


def load_table_spec(path: str | Path) -> TableSpec:
    """Read and check a table file (every problem at once, with its YAML path)."""
    raw = config.load_yaml(path)
    try:
        spec = TableSpec.model_validate(raw)
    except pydantic.ValidationError as e:
        raise ConfigError(config._pydantic_problems(e, TableSpec)) from e
    metrics = [*(spec.metrics or []), *(m for d in spec.datasets.values() for m in d.metrics or [])]
    bad = [m for m in metrics if recall_k(m) is None and m not in METRICS]
    if bad:
        raise ConfigError([f"metrics: {m!r} is not a metric (recall@K, {', '.join(METRICS)})" for m in bad])
    return spec


def _cells(spec: TableSpec, studies: dict[str, _Study]) -> dict[tuple[str, str], tuple[_Study, str]]:
    """(method, dataset) → (study, arm); every problem (an unknown study or arm, two studies of one
    dataset for one method) raised at once."""
    out: dict[tuple[str, str], tuple[_Study, str]] = {}
    problems = []
    for method, which in spec.methods.items():
        if isinstance(which, str):
            pairs = [(s, which) for s in studies.values() if which in s.arms]
            if not pairs:
                problems.append(f"methods.{method}: no study has an arm {which!r}")
        else:
            pairs = []
            for name, arm in which.items():
                if name not in studies:
                    problems.append(f"methods.{method}.{name}: not one of studies ({', '.join(studies)})")
                elif arm not in studies[name].arms:
                    arms = "; ".join(studies[name].arms)
                    problems.append(f"methods.{method}.{name}: no arm {arm!r} (arms: {arms})")
                else:
                    pairs.append((studies[name], arm))
        for study, arm in pairs:
            if (method, study.dataset) in out:
                other = out[(method, study.dataset)][0].name
                hint = f" (write {{{study.name}: {arm!r}}})" if isinstance(which, str) else ""
                problems.append(
                    f"methods.{method}: two studies of {study.dataset} ({other}, {study.name}); a method "
                    f"has one study per dataset{hint}"
                )
            out[(method, study.dataset)] = (study, arm)
    if problems:
        raise ConfigError(problems)
    return out


def combined_table(spec: TableSpec, studies: dict[str, _Study]) -> pd.DataFrame:
    """The tidy table: one row per (method, protocol, dataset, metric) in table order, with ``study``,
    ``arm``, ``mean``, ``std``, ``n`` (seeds; published: NaN), ``bold`` and ``p_holm`` (against the best
    method of its column and protocol). Values are fractions; NaN where there is no number."""
    where = _cells(spec, studies)
    datasets = list(dict.fromkeys([*spec.datasets, *(s.dataset for s in studies.values())]))
    rows: list[dict[str, Any]] = []
    seeds: list[dict[str, Any]] = []
    for method in spec.methods:
        for protocol in spec.protocols:
            for dataset in datasets:
                study, arm = where.get((method, dataset), (None, ""))
                for metric in _metrics(spec, dataset):
                    key = f"{dataset}/{metric}/{protocol}"
                    row: dict[str, Any] = {"method": method, "protocol": protocol, "dataset": dataset}
                    row |= {"metric": metric, "study": study.name if study else "", "arm": arm, "key": key}
                    if protocol == "published":
                        value = (study.published.get(arm) or {}).get(metric) if study else None
                        row["mean"] = math.nan if value is None else float(value) / 100
                    else:
                        values = _values(study, arm, protocol, metric)
                        row |= {"mean": values.mean(), "std": values.std(), "n": len(values)}
                        seeds += [
                            {"column": key, "row": method, "seed": s, "value": v} for s, v in values.items()
                        ]
                    rows.append(row)
    columns = ["method", "protocol", "dataset", "metric", "study", "arm", "mean", "std", "n"]
    table = pd.DataFrame(rows).reindex(columns=[*columns, "key"])
    bold = stats.bold_cells(pd.DataFrame(seeds, columns=["column", "row", "seed", "value"]))
    keys = list(zip(table.key, table.method, strict=True))
    table["bold"] = [bool(bold.bold.get(k, False)) for k in keys]
    table["p_holm"] = [bold.p_holm.get(k, math.nan) for k in keys]
    return table.drop(columns="key")


def _metrics(spec: TableSpec, dataset: str) -> list[str]:
    own = spec.datasets.get(dataset)
    return (
        (own.metrics if own else None)
        or spec.metrics
        or DEFAULT_METRICS.get(dataset, DEFAULT_METRICS["cub200"])
    )


def _values(study: _Study | None, arm: str, protocol: str, metric: str) -> pd.Series:
    """The arm's test ``metric`` under ``protocol``, by seed (empty without runs)."""
    col = f"test/{metric}"
    if study is None or protocol == "published" or study.runs.empty or col not in study.runs:
        return pd.Series([], dtype=float)
    runs = study.runs[(study.runs.arm == arm) & (study.runs.protocol == protocol)]
    return runs.groupby("seed")[col].mean().dropna()


def _short(metric: str) -> str:
    return metric_title(metric).replace("Recall@", "R@")


def table_display(table: pd.DataFrame, spec: TableSpec) -> pd.DataFrame:
    """The readable table: method (on its first row) and protocol, then one column per dataset and metric
    (a two-level header); ``mean ± std`` in %, bold and marks as ``tables.cell``, published as printed."""
    wide = table.set_index(["method", "protocol", "dataset", "metric"])
    columns = list(dict.fromkeys(zip(table.dataset, table.metric, strict=True)))
    rows = list(dict.fromkeys(zip(table.method, table.protocol, strict=True)))
    several = len(spec.protocols) > 1
    out = []
    for method, protocol in rows:
        first = protocol == spec.protocols[0]
        line = {("", "method"): method if first else ""} | (
            {("", "protocol"): PROTOCOL_TITLES[protocol]} if several else {}
        )
        for dataset, metric in columns:
            r = wide.loc[(method, protocol, dataset, metric)]
            title = (_title(spec, dataset), _short(metric))
            if protocol == "published":
                line[title] = NA if math.isnan(r["mean"]) else f"{100 * r['mean']:.1f}"
            else:
                line[title] = cell(r["mean"], r["std"], int(r["n"]), bool(r["bold"]))
        out.append(line)
    return pd.DataFrame(out, columns=pd.MultiIndex.from_tuples(list(out[0])) if out else None)


def _title(spec: TableSpec, dataset: str) -> str:
    own = spec.datasets.get(dataset)
    return (own.title if own else None) or DATASET_TITLES.get(dataset, dataset)


def caption(spec: TableSpec, name: str) -> str:
    """The table's caption: the file's, or what the rows and columns are."""
    if spec.caption:
        return spec.caption
    return f"{name}: test metrics (%) of each method per dataset; " + "; ".join(
        PROTOCOL_NOTES[p] for p in spec.protocols
    )


def write_combined(
    path: str | Path,
    storage: str | None = None,
    results: str | Path = "results",
    out: str | Path | None = None,
) -> tuple[Path, str]:
    """Write the table of table file ``path``; return its folder and the Markdown table with its legend."""
    path = Path(path)
    spec = load_table_spec(path)
    name = spec.name or path.stem
    studies = {}
    for entry in spec.studies:
        study = _load_study(entry, path.parent, storage, results)
        studies[study.name] = study
    table = combined_table(spec, studies)
    shown = table_display(table, spec)
    folder = Path(out) if out is not None else Path(results) / "tables" / name
    folder.mkdir(parents=True, exist_ok=True)
    ours = [p for p in spec.protocols if p != "published"]
    text = legend(published="published" in spec.protocols)
    text += " Bold compares the methods within one protocol." if len(ours) > 1 else ""
    cap = caption(spec, name)
    numeric = table.set_index(["method", "protocol", "dataset", "metric"])
    labels = sum(1 for group, _ in shown.columns if not group)
    write_table(numeric, shown, folder / name, cap, text, n_labels=labels)
    sources = [
        f"- `{s.name}` ({_title(spec, s.dataset)}): {len(s.runs)} complete final runs"
        for s in studies.values()
    ]
    lines = [f"# {name}", "", cap + ".", "", to_markdown(shown), text, "", "## Studies", "", *sources]
    page.write_html(name, lines, folder, {}).replace(folder / f"{name}.html")
    return folder, to_markdown(shown) + "\n" + text
