"""The table formats of a report: ``mean ± std`` cells in %, the best mean in bold, Δ against a baseline,
and each table written three ways (CSV with the numbers, Markdown, LaTeX booktabs) under one caption."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.types import metric_title


def is_best(means: pd.Series) -> pd.Series:
    """The highest mean of a column, ties (up to float rounding) included."""
    return pd.Series(np.isclose(means, means.max(), rtol=0, atol=1e-12), index=means.index)


def pm(mean: float, std: float, tex: bool = False) -> str:
    pm = " $\\pm$ " if tex else " ± "
    return f"{100 * mean:.1f}" + ("" if math.isnan(std) else f"{pm}{100 * std:.1f}")


def bold(text: str, tex: bool) -> str:
    return f"\\textbf{{{text}}}" if tex else f"**{text}**"


_TEX_SPECIAL = re.compile(r"([&%$#_{}])")


def tex_escape(text: str) -> str:
    return _TEX_SPECIAL.sub(r"\\\1", text)


def display(
    summary: pd.DataFrame,
    metrics: list[str],
    tex: bool,
    deltas: dict[str, pd.Series] | None = None,
    label_columns: Sequence[str] = ("arm",),
) -> pd.DataFrame:
    """The human-readable table: metric cells ``mean ± std`` (in %), the best mean of each column in bold,
    ``(+Δ)`` against the baseline when ``deltas`` is given (``(+Δ*)`` where ``<m>_distinguishable``)."""
    esc = tex_escape if tex else str
    rows = summary.reset_index()
    show = pd.DataFrame({c: rows[c].map(lambda v: esc(str(v))) for c in label_columns})
    show["runs"] = rows["runs"].astype(int)
    for m in metrics:
        cells = []
        for i, r in rows.iterrows():
            cell = pm(r[f"{m}_mean"], r[f"{m}_std"], tex)
            if deltas is not None:
                mark = "*" if r.get(f"{m}_distinguishable") is True else ""
                cell += f" ({100 * deltas[m].iloc[i]:+.1f}{mark})"
            cells.append(bold(cell, tex) if r[f"{m}_best"] else cell)
        show[esc(metric_title(m)) + (" (%)" if not tex else " (\\%)")] = cells
    return show


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (numbers right-aligned)."""

    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(cell(c) for c in df.columns) + " |"
    align = "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(df.columns))) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, align, *body]) + "\n"


_TEX_SYMBOLS = {"±": "$\\pm$", "Δ": "$\\Delta$", "≥": "$\\geq$", "<": "$<$"}


def tex_caption(text: str) -> str:
    """A caption for LaTeX: special characters escaped, the symbols the captions use in math mode."""
    return re.sub("|".join(_TEX_SYMBOLS), lambda m: _TEX_SYMBOLS[m.group()], tex_escape(text))


def write_table(
    numeric: pd.DataFrame, md: pd.DataFrame, tex: pd.DataFrame, stem: Path, caption: str, n_labels: int = 1
) -> None:
    """CSV (numeric), Markdown and LaTeX (booktabs) versions of one table."""
    numeric.to_csv(stem.with_suffix(".csv"))
    stem.with_suffix(".md").write_text(f"{caption}\n\n{to_markdown(md)}")
    align = "l" * n_labels + "r" * (len(tex.columns) - n_labels)
    latex = tex.to_latex(
        index=False,
        escape=False,
        caption=tex_caption(caption),
        label=f"tab:{stem.name}",
        column_format=align,
    )
    stem.with_suffix(".tex").write_text(latex)
