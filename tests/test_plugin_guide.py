"""docs/plugins.md cannot rot (issue #27): every Python block of the guide is pasted where its first line
says, into a copy of the project's ``methods`` package; the guide's own tests run, and its `dmlh run` line
trains one epoch with the new components."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "plugins.md"


def guide_files() -> dict[str, str]:
    """Path (the block's first line, ``# methods/...py``) → source, for every Python block of the guide."""
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    files = {}
    for block in blocks:
        first = block.splitlines()[0]
        assert re.fullmatch(r"# (methods|tests)/[\w/]+\.py", first), f"no path on its first line: {first}"
        files[first[2:]] = block
    return files


def test_readme_links_the_guide_and_lists_the_run_files() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Adding a method") :]
    assert "docs/plugins.md" in section[: section.index("\n## ", 1)]
    assert "test_embeddings.npz" in readme[readme.index("## Where results go") :]


def test_the_guide_covers_a_loss_a_miner_a_backbone_and_a_regularizer() -> None:
    sources = "\n".join(guide_files().values())
    for kind in ("loss", "miner", "backbone", "regularizer"):
        assert f'@register("{kind}", ' in sources, kind
        assert f'check_component("{kind}", ' in sources, kind


def test_the_guide_pasted_into_a_project_passes_its_tests_and_runs(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "methods", tmp_path / "methods", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "studies" / "configs").mkdir(parents=True)
    shutil.copy(ROOT / "studies" / "configs" / "digits.yaml", tmp_path / "studies" / "configs")
    for path, source in guide_files().items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(source)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TQDM_DISABLE": "1"}  # the copy of methods/ first

    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert re.search(r"\b8 passed", tests.stdout), tests.stdout[-500:]

    runs = re.findall(r"^dmlh run .*$", GUIDE.read_text().replace("\\\n", " "), flags=re.M)
    assert len(runs) == 1 and "train.epochs=1" in runs[0], runs
    command = shlex.split(runs[0])
    run = subprocess.run(
        [sys.executable, "-m", "harness.cli", "--results", str(tmp_path / "results"), *command[1:]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "recall@1" in run.stdout
    assert "circle: epoch 1/1" in run.stderr  # the log lines carry the run's --name
    dropped = re.search(r"loss\.name=circle: dropped the parameters of loss 'triplet': (.*)", run.stderr)
    assert dropped and sorted(dropped.group(1).split(", ")) == ["margin=0.2", "mining='batch_hard'"]
    config = (tmp_path / "results" / "runs" / "circle" / "config.yaml").read_text()
    assert "name: circle" in config and "uniformity" in config
    assert "name: tiny_convnet" in config and "input_size: 8" in config  # set before or after its name
