"""``report.html``: the report as one self-contained page (plots embedded as base64 PNG, no scripts, no
external assets), readable offline from the results folder in any browser; its only links are to the
figure files beside it (SVG and PDF for papers), each checked to exist.

It is rendered from the same lines as ``report.md`` (the small Markdown subset the report writes:
headings, paragraphs, bullet lists, pipe tables, images with their captions), plus each arm's resolved
config and the environment.
"""

from __future__ import annotations

import base64
import html
import importlib.metadata
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

#: Packages whose versions the page lists (those installed).
PACKAGES = (
    "dml-harness",
    "torch",
    "torchvision",
    "numpy",
    "pandas",
    "optuna",
    "scikit-learn",
    "faiss-cpu",
    "faiss-gpu-cu12",
    "pytorch-metric-learning",
    "matplotlib",
    "seaborn",
)

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto;
       max-width: 80rem; padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.7rem; } h2 { font-size: 1.3rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; } tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; }
figcaption { font-size: 0.85rem; color: #555; }
pre { background: #f6f8fa; padding: 0.6rem; overflow-x: auto; font-size: 0.8rem; }
code { background: #f3f3f3; padding: 0 0.2rem; }
"""


def _inline(text: str) -> str:
    """Escape ``text`` and render the inline Markdown the report uses: `code` and **bold**."""
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)


def _cells(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [c.strip().replace("\\|", "|") for c in cells]


def _image(alt: str, src: str, caption: str, folder: Path) -> str:
    """A figure: the PNG embedded, its caption, and links to the files of it that exist (PNG, SVG, PDF)."""
    path = folder / src
    if not path.is_file():
        return f"<p>(missing figure {html.escape(src)})</p>"
    data = base64.b64encode(path.read_bytes()).decode()
    files = [
        f'<a href="{html.escape(Path(src).with_suffix(s).as_posix())}">{s[1:].upper()}</a>'
        for s in (".png", ".svg", ".pdf")
        if path.with_suffix(s).is_file()
    ]
    return (
        f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
        f"<figcaption><strong>{_inline(alt)}.</strong> {_inline(caption)} ({' · '.join(files)})"
        "</figcaption></figure>"
    )


def markdown_to_html(lines: list[str], folder: Path) -> str:
    """The body of the page from the report's Markdown lines (images read from ``folder``; an image's
    caption is the emphasised line under it)."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.extend(lines[i].splitlines())
                i += 1
            head, rows = _cells(block[0]), [_cells(r) for r in block[2:]]
            out.append(
                "<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr></thead>"
            )
            out.append(
                "<tbody>"
                + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows)
                + "</tbody></table>"
            )
            continue
        if line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append(f"<ul>{''.join(items)}</ul>")
            continue
        if m := re.fullmatch(r"!\[([^\]]*)\]\(([^)]+)\)", line.strip()):
            below = lines[i + 1].strip() if i + 1 < len(lines) else ""
            caption = below[1:-1] if re.fullmatch(r"\*[^*].*\*", below) else ""
            out.append(_image(m.group(1), m.group(2), caption, folder))
            i += 2 if caption else 1
            continue
        elif m := re.match(r"(#{1,6}) (.*)", line):
            level = len(m.group(1))
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "\n".join(out)


def _git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "unknown (not a git checkout)"


def environment() -> dict[str, str]:
    """Versions of the packages that produced the numbers, the harness commit and this machine."""
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "harness commit": _git_commit(),
    }
    for name in PACKAGES:
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        import torch

        env["accelerator (report machine)"] = (
            torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
        )
    except ImportError:
        pass
    return env


def configs_html(configs: dict[str, dict[str, Any]]) -> str:
    """Each arm's resolved config (of its first final run), folded."""
    parts = ["<h2>Resolved configs</h2>"]
    for arm, cfg in configs.items():
        text = yaml.safe_dump(cfg, sort_keys=False)
        parts.append(
            f"<details><summary>{html.escape(arm)}</summary><pre>{html.escape(text)}</pre></details>"
        )
    return "\n".join(parts)


def environment_html(env: dict[str, str], devices: dict[str, str]) -> str:
    """The environment table, with the device each arm's config asked for."""
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in env.items())
    rows += "".join(
        f"<tr><td>train.device of {html.escape(arm)}</td><td>{html.escape(d)}</td></tr>"
        for arm, d in devices.items()
    )
    return f"<h2>Environment</h2><table><tbody>{rows}</tbody></table>"


def write_html(title: str, lines: list[str], folder: Path, configs: dict[str, dict[str, Any]]) -> Path:
    """Write ``folder/report.html`` from the report's Markdown ``lines`` and the arms' resolved configs."""
    devices = {arm: str(cfg.get("train", {}).get("device", "?")) for arm, cfg in configs.items()}
    body = markdown_to_html(lines, folder)
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>\n{body}\n{configs_html(configs) if configs else ''}\n"
        f"{environment_html(environment(), devices)}\n</body></html>\n"
    )
    path = folder / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
