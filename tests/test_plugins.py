"""Third-party plugins: a tiny out-of-tree package, installed for real, found through the
`dmlh.plugins` entry-point group and used from a YAML; a broken plugin is reported, not fatal."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

PLUGIN = '''
"""A toy DML loss shipped outside dml-harness."""
import torch
from harness.registry import register
from harness.types import LossOutput


@register("loss", "toy_center")
class ToyCenterLoss(torch.nn.Module):
    """Pull each embedding to its class mean (a toy)."""

    def __init__(self, *, weight: float = 1.0):
        super().__init__()
        self.weight = weight

    def forward(self, embeddings, labels):
        _, inverse = labels.unique(return_inverse=True)
        onehot = torch.nn.functional.one_hot(inverse).float()
        means = (onehot.T @ embeddings) / onehot.sum(0, keepdim=True).T
        value = self.weight * ((embeddings - means[inverse]) ** 2).sum(1).mean()
        return LossOutput(value, {"spread": value.detach()})
'''


def _make_package(root: Path, name: str, module_source: str) -> Path:
    pkg = root / name
    (pkg / name).mkdir(parents=True)
    (pkg / name / "__init__.py").write_text(module_source)
    (pkg / "pyproject.toml").write_text(
        textwrap.dedent(f'''
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{name.replace("_", "-")}"
        version = "0.0.1"
        [project.entry-points."dmlh.plugins"]
        {name} = "{name}"
        [tool.setuptools]
        packages = ["{name}"]
    ''')
    )
    return pkg


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Install a good and a broken plugin package into a private site folder with pip."""
    root = tmp_path_factory.mktemp("plugins")
    site = root / "site"
    for name, src in (("dmlh_toy", PLUGIN), ("dmlh_broken", "raise ImportError('missing dependency foo')\n")):
        pkg = _make_package(root, name, src)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--no-build-isolation",
                "--target",
                str(site),
                str(pkg),
            ],
            check=True,
            capture_output=True,
        )
    return site


def _dmlh(site: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site), "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, env=env, cwd=cwd
    )


def test_plugin_listed_and_broken_plugin_reported(plugin_site: Path) -> None:
    out = _dmlh(plugin_site, "list", "loss")
    assert out.returncode == 0, out.stderr
    assert "toy_center" in out.stdout and "weight: float = 1.0" in out.stdout
    assert "toy_center  (plugin dmlh_toy, package dmlh-toy)" in out.stdout  # where it comes from (#27)
    assert "dmlh_broken" in out.stdout and "missing dependency foo" in out.stdout


def test_plugin_used_from_yaml(plugin_site: Path, tmp_path: Path) -> None:
    cfg = {
        "name": "toy",
        "data": {"dataset": {"name": "synthetic", "num_classes": 16, "per_class": 6, "size": 8}},
        "sampler": {"p": 3, "k": 2, "batches_per_epoch": 2},
        "backbone": {"name": "small_convnet", "width": 4, "input_size": 8},
        "model": {"name": "embedder", "embedding_dim": 8},
        "loss": {"name": "toy_center", "weight": 0.5},
        "train": {"epochs": 1},
        "eval": {"nmi": False},
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = _dmlh(plugin_site, "--results", str(tmp_path / "results"), "run", str(path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "recall@1" in out.stdout
    saved = yaml.safe_load((tmp_path / "results" / "runs" / "toy" / "config.yaml").read_text())
    assert saved["loss"] == {"name": "toy_center", "weight": 0.5}


CIRCLE = '''
"""A new loss dropped into methods/losses/ with nothing else edited."""
import torch
from harness.registry import register
from harness.types import LossOutput


@register("loss", "circle_toy")
class CircleToyLoss(torch.nn.Module):
    """Squared distance of same-class pairs (a toy)."""

    def __init__(self, *, gamma: float = 2.0):
        super().__init__()
        self.gamma = gamma

    def forward(self, embeddings, labels):
        same = (labels[:, None] == labels[None, :]).float()
        value = self.gamma * (torch.cdist(embeddings, embeddings) ** 2 * same).mean()
        return LossOutput(value)
'''


def test_new_method_file_is_discovered_without_an_import_line(tmp_path: Path) -> None:
    """A copy of the ``methods`` package (first on sys.path) with one new and one broken loss file."""
    methods = Path(__import__("methods").__file__).parent
    shutil.copytree(methods, tmp_path / "methods", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "methods" / "losses" / "circle_toy.py").write_text(CIRCLE)
    (tmp_path / "methods" / "losses" / "broken_toy.py").write_text("raise ImportError('no module foo')\n")
    listed = _dmlh(tmp_path, "list", "loss", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "circle_toy" in listed.stdout and "gamma: float = 2.0" in listed.stdout
    assert "circle_toy  (methods/losses/circle_toy.py)" in listed.stdout  # its file, not "builtin" (#27)
    assert "triplet" in listed.stdout  # the other files still load
    assert "methods.losses.broken_toy: ImportError: no module foo" in listed.stdout
    cfg = {
        "name": "circle",
        "data": {"dataset": {"name": "synthetic", "num_classes": 16, "per_class": 6, "size": 8}},
        "sampler": {"p": 3, "k": 2, "batches_per_epoch": 2},
        "backbone": {"name": "small_convnet", "width": 4, "input_size": 8},
        "model": {"name": "embedder", "embedding_dim": 8},
        "loss": {"name": "circle_toy", "gamma": 1.0},
        "train": {"epochs": 1},
        "eval": {"nmi": False},
    }
    path = tmp_path / "circle.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = _dmlh(tmp_path, "--results", str(tmp_path / "results"), "run", str(path), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "recall@1" in run.stdout


def test_builtin_plugins_declare_the_interfaces_the_engine_reads() -> None:
    """A loss that asks for a miner says which mined tuples it takes; every miner says what it produces."""
    from harness import plugins, registry

    for entry in registry.registry("loss").entries():
        if "miner" in entry.context:
            assert plugins.accepts_miner(entry.obj), f"loss {entry.name} takes a miner but declares no kinds"
    for entry in registry.registry("miner").entries():
        assert plugins.produces(entry.obj) in ("pairs", "triplets"), entry.name
    for kind, name in (("model", "abe"), ("regularizer", "mdr")):
        assert issubclass(registry.registry(kind).get(name).obj, plugins.EpochDiagnostics)
