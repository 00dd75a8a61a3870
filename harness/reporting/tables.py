"""The table formats of a report: ``mean ± std`` cells in %, honest bold, marks, Δ against a baseline, and
each table written four ways under one caption and one legend: CSV (the numbers), Markdown, and LaTeX
that compiles as pasted into a two-column paper (``.tex`` fits ``\\columnwidth``, ``_wide.tex`` is a
``table*`` that fits ``\\textwidth``).

A table is built once as text (Markdown conventions: ``**bold**``, Unicode symbols); the LaTeX is
converted from it cell by cell (``tex_cell``), so the two never disagree."""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.reporting.stats import ALPHA
from harness.types import metric_title

#: Cells with fewer seeds than this are marked (``DAGGER``): too few for the paired test to say much.
MIN_SEEDS = 3
DAGGER = "†"
#: A missing cell (no run, no published number): never shown as 0.
NA = "—"
#: The first line of every ``.tex`` table: the packages it needs.
TEX_REQUIRES = "% requires \\usepackage{booktabs} and \\usepackage{graphicx} (for \\resizebox)"


def is_best(means: pd.Series) -> pd.Series:
    """The highest mean of a column, ties (up to float rounding) included."""
    return pd.Series(np.isclose(means, means.max(), rtol=0, atol=1e-12), index=means.index)


def pm(mean: float, std: float) -> str:
    """``mean ± std`` in % (no ± without a std: one seed)."""
    return f"{100 * mean:.1f}" + ("" if math.isnan(std) else f" ± {100 * std:.1f}")


def cell(
    mean: float, std: float, n: int, bold: bool = False, delta: float | None = None, star: bool = False
) -> str:
    """One table cell: ``mean ± std`` in %, ``(+Δ)`` in points (``*``: distinguishable), in bold where the
    data supports it, ``†`` after it from fewer than ``MIN_SEEDS`` seeds; ``NA`` without a value."""
    if math.isnan(mean):
        return NA
    text = pm(mean, std) + ("" if delta is None else f" ({100 * delta:+.1f}{'*' if star else ''})")
    return (f"**{text}**" if bold else text) + (DAGGER if n < MIN_SEEDS else "")


def legend(*, delta: bool = False, published: bool = False) -> str:
    """The sentence under a table that says what bold, ± and its marks mean."""
    parts = [
        "Test metrics in %, mean ± sample std over seeds (no ± from one seed).",
        "Bold: the best mean of each column and every cell a paired t-test over seeds does not find worse "
        f"(p ≥ {ALPHA} against the best, Holm-corrected across the table); equal values are bold alike.",
    ]
    if delta:
        parts.append(
            f"(+Δ): difference from the baseline row in points; *: paired t-test p < {ALPHA} against it "
            "(uncorrected)."
        )
    parts.append(
        f"{DAGGER}: fewer than {MIN_SEEDS} seeds; a cell with fewer than 2 seeds in common with the best "
        "cannot be tested and stays bold."
    )
    if published:
        parts.append("Published: as printed in the paper, never bold (no seeds to test).")
    parts.append(f"{NA}: no result.")
    return " ".join(parts)


def arm_titles(meta: dict[str, Any], arms: Sequence[str]) -> dict[str, str]:
    """Human labels of arms for the tables: the study's ``labels:`` where it names the arm, else made from
    the arm's factor levels (``Triplet + Symmetrical``, ``Abe (m = 8, lambda div = 1)``); an arm whose
    automatic label is not unique keeps its own."""
    given = meta.get("labels") or {}
    display = {a["label"]: a.get("display") or {} for a in meta.get("arms", [])}
    auto = {arm: auto_title(display.get(arm) or {}) or arm for arm in arms}
    counts = pd.Series(list(auto.values())).value_counts()
    return {arm: given.get(arm) or (auto[arm] if counts[auto[arm]] == 1 else arm) for arm in arms}


_OFF = {"none", "null", "false", "[]", "no"}


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _words(text: str) -> str:
    """``multi_similarity`` → ``Multi similarity``: config spelling as words, first letter capitalised."""
    return _capital(re.sub(r"[_=]", " ", text.strip("[]")).strip())


def auto_title(display: Mapping[str, Any]) -> str:
    """A label from factor levels as shown (``{loss: triplet, synthesis: symmetrical}``): component levels
    joined by ``+`` (off levels such as ``none`` left out), numbers and flags in parentheses."""
    names, numbers = [], []
    for factor, value in display.items():
        short, text = factor.removesuffix(".name").split(".")[-1].replace("_", " "), str(value)
        if text.lower() in _OFF:
            continue
        if text.lower() == "true":
            numbers.append(short)
        elif re.fullmatch(r"-?[\d.]+(e-?\d+)?|\[[-\d., e]*\]", text):  # a number or a list of numbers
            numbers.append(f"{short} = {text.replace(',', ', ')}")
        else:
            names.append(_words(text))
    if not names and not numbers:
        return _words("no " + ", no ".join(f.removesuffix(".name").split(".")[-1] for f in display))
    head = " + ".join(names)
    return f"{head} ({', '.join(numbers)})" if head and numbers else head or _capital(", ".join(numbers))


def display(
    summary: pd.DataFrame,
    metrics: list[str],
    deltas: dict[str, pd.Series] | None = None,
    label_columns: Sequence[str] = ("arm",),
    titles: Mapping[str, str] | None = None,
    baseline: str | None = None,
) -> pd.DataFrame:
    """The readable table: label columns (arms by their ``titles``), runs, and per metric ``mean ± std`` in
    % with ``<m>_bold`` in bold and ``†`` where ``<m>_seeds`` < ``MIN_SEEDS``; ``(+Δ)`` against the baseline
    when ``deltas`` is given (``*`` where ``<m>_distinguishable``), on every row but the ``baseline``'s."""
    rows = summary.reset_index()
    titles = titles or {}
    show = pd.DataFrame(
        {c: rows[c].map(lambda v, c=c: titles.get(v, v) if c == "arm" else str(v)) for c in label_columns}
    )
    show["runs"] = rows["runs"].astype(int)
    for m in metrics:
        n = rows[f"{m}_seeds"] if f"{m}_seeds" in rows else rows["runs"]
        cells = []
        for i, r in rows.iterrows():
            delta = None if deltas is None or r["arm"] == baseline else deltas[m].iloc[i]
            star = r.get(f"{m}_distinguishable") is True
            bold = bool(r.get(f"{m}_bold", r.get(f"{m}_best", False)))
            cells.append(cell(r[f"{m}_mean"], r[f"{m}_std"], int(n.iloc[i]), bold, delta, star))
        show[metric_title(m) + " (%)"] = cells
    return show


def _flat(columns: pd.Index) -> list[str]:
    """Column names of one header row (a two-level header joined by a space)."""
    return [" ".join(str(p) for p in c if p) if isinstance(c, tuple) else str(c) for c in columns]


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (numbers right-aligned)."""

    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(cell(c) for c in _flat(df.columns)) + " |"
    align = "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(df.columns))) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, align, *body]) + "\n"


#: Plain text → LaTeX text mode: the special characters escaped, the symbols the tables use in math mode.
_TEX = {
    "\\": "\\textbackslash{}",
    "&": "\\&",
    "%": "\\%",
    "$": "\\$",
    "#": "\\#",
    "_": "\\_",
    "{": "\\{",
    "}": "\\}",
    "~": "\\textasciitilde{}",
    "^": "\\textasciicircum{}",
    "<": "$<$",
    ">": "$>$",
    "±": "$\\pm$",
    "Δ": "$\\Delta$",
    "×": "$\\times$",
    "→": "$\\rightarrow$",
    "−": "$-$",
    "≥": "$\\geq$",
    "≤": "$\\leq$",
    "≈": "$\\approx$",
    "†": "$^\\dagger$",
    "—": "--",
    "–": "--",
    "‘": "`",
    "’": "'",
    "“": "``",
    "”": "''",
    "…": "\\ldots{}",
    "·": "$\\cdot$",
}
#: Greek capitals LaTeX has a command for (the others look like Latin letters).
_GREEK_CAPITALS = {"Gamma", "Delta", "Theta", "Lambda", "Xi", "Pi", "Sigma", "Upsilon", "Phi", "Psi", "Omega"}
_TEX_SPECIAL = re.compile(r"[\\&%$#_{}~^<>]|[^\x00-\x7f]")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
#: Where LaTeX may break a long token of a wrapped column (after these characters).
_BREAK = re.compile(r"(\\_|[./,=:;])")


def _tex_char(ch: str) -> str:
    """One special or non-ASCII character for pdflatex: the table's symbols, Greek letters in math mode,
    Latin-1 letters as they are (LaTeX's UTF-8 input knows them), others by their ASCII base letter."""
    if ch in _TEX:
        return _TEX[ch]
    name = unicodedata.name(ch, "").split()
    if name[:2] == ["GREEK", "SMALL"]:
        return f"$\\{name[-1].lower()}$"
    if name[:2] == ["GREEK", "CAPITAL"] and name[-1].capitalize() in _GREEK_CAPITALS:
        return f"$\\{name[-1].capitalize()}$"
    if "\u00c0" <= ch <= "\u00ff":
        return ch
    return unicodedata.normalize("NFKD", ch).encode("ascii", "ignore").decode() or "?"


def tex_escape(text: str) -> str:
    """Plain text as LaTeX text (special characters escaped, symbols in math mode)."""
    return _TEX_SPECIAL.sub(lambda m: _tex_char(m.group()), text)


def tex_cell(text: Any, breakable: bool = False) -> str:
    """A cell of a built table as LaTeX: ``**bold**`` → ``\\textbf``, the rest escaped; ``breakable``: a
    line may break after ``. / , = : ;`` and underscores (long settings in wrapped columns)."""
    parts = _BOLD.split(str(text))
    out = "".join(f"\\textbf{{{tex_escape(p)}}}" if i % 2 else tex_escape(p) for i, p in enumerate(parts))
    return _BREAK.sub(r"\1\\allowbreak{}", out) if breakable else out


def _short(header: Any) -> str:
    """A short LaTeX header, so that tables fit a column: ``Recall@1 (%)`` → ``R@1`` (the caption and
    legend say the unit)."""
    return tex_cell(re.sub(r"Recall@", "R@", str(header)).replace(" (%)", ""))


def _header(columns: pd.Index, n_labels: int, newline: str) -> list[str]:
    """The header rows: a two-level header gets its groups over their columns with ``\\cmidrule``."""
    if not isinstance(columns, pd.MultiIndex):
        return [" & ".join(_short(c) for c in columns) + f" {newline}"]
    top: list[Any] = []
    spans: list[int] = []
    rules: list[str] = []
    start = 0
    for i, (group, _) in enumerate(columns):
        if i and group == columns[i - 1][0]:
            spans[-1] += 1
            continue
        top.append(group)
        spans.append(1)
    for group, span in zip(top, spans, strict=True):
        if start >= n_labels and group:
            rules.append(f"\\cmidrule(lr){{{start + 1}-{start + span}}}")
        start += span
    first = " & ".join(
        tex_cell(g) if s == 1 else f"\\multicolumn{{{s}}}{{c}}{{{tex_cell(g)}}}"
        for g, s in zip(top, spans, strict=True)
    )
    second = " & ".join(_short(c[1]) for c in columns)
    return [f"{first} {newline}", " ".join(rules), f"{second} {newline}"]


def to_latex(
    df: pd.DataFrame,
    caption: str,
    label: str,
    legend_text: str = "",
    n_labels: int = 1,
    wrap: Mapping[str, str] | None = None,
    wide: bool = False,
) -> str:
    """A booktabs table float that compiles as pasted: ``table`` shrunk to ``\\columnwidth`` where wider
    (``wide``: ``table*`` and ``\\textwidth``), the caption above, the legend under it. ``wrap`` gives the
    columns that wrap their text, by name, with a width (``12em``)."""
    wrap = wrap or {}
    names = _flat(df.columns)
    spec = "".join(
        f"p{{{wrap[c]}}}" if c in wrap else "l" if i < n_labels else "r" for i, c in enumerate(names)
    )
    newline = "\\tabularnewline" if wrap else "\\\\"  # \raggedright in a p column redefines \\
    body = []
    for row in df.itertuples(index=False):
        cells = [
            ("\\raggedright " + tex_cell(v, breakable=True)) if c in wrap else tex_cell(v)
            for c, v in zip(names, row, strict=True)
        ]
        body.append(" & ".join(cells) + f" {newline}")
    env, width = ("table*", "\\textwidth") if wide else ("table", "\\columnwidth")
    lines = [
        TEX_REQUIRES,
        f"\\begin{{{env}}}[tbp]",
        "\\centering",
        f"\\caption{{{tex_escape(caption)}}}",
        f"\\label{{{label}}}",
        f"\\resizebox{{\\ifdim\\width>{width}{width}\\else\\width\\fi}}{{!}}{{%",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        *_header(df.columns, n_labels, newline),
        "\\midrule",
        *body,
        "\\bottomrule",
        "\\end{tabular}}",
    ]
    if legend_text:
        lines.append(f"\\par\\smallskip{{\\footnotesize\\raggedright {tex_escape(legend_text)}\\par}}")
    lines.append(f"\\end{{{env}}}")
    return "\n".join(lines) + "\n"


def write_table(
    numeric: pd.DataFrame,
    shown: pd.DataFrame,
    stem: Path,
    caption: str,
    legend_text: str = "",
    n_labels: int = 1,
    wrap: Mapping[str, str] | None = None,
) -> None:
    """CSV (``numeric``), Markdown, LaTeX (``.tex`` for a column, ``_wide.tex`` for the page width) of one
    table; the caption above and the legend under it."""
    numeric.to_csv(stem.with_suffix(".csv"))
    under = f"\n{legend_text}\n" if legend_text else ""
    stem.with_suffix(".md").write_text(f"{caption}\n\n{to_markdown(shown)}{under}")
    label = f"tab:{stem.name}"
    stem.with_suffix(".tex").write_text(to_latex(shown, caption, label, legend_text, n_labels, wrap))
    wide = to_latex(shown, caption, label, legend_text, n_labels, wrap, wide=True)
    stem.with_name(f"{stem.name}_wide.tex").write_text(wide)
