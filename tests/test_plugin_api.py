"""Out-of-tree plugins across an interface change (issue #31, item 1): a backbone written before
``StagedBackbone`` took ``reductions`` still works (with a deprecation warning and the line to change); one
that cannot be built at all is reported by ``dmlh list`` and by config validation before any data is read,
in one line naming its package and what to change; ``harness.testing`` runs the contract checks on a
plugin for its own test suite."""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from test_plugins import _dmlh, _make_package
from torch import nn

from harness import cli, config, registry, testing
from harness.errors import ConfigError
from harness.model import StagedBackbone
from harness.plugins import InterfaceDeprecationWarning
from harness.registry import register
from harness.types import DataConfig


def _stages() -> OrderedDict[str, nn.Module]:
    return OrderedDict(
        stem=nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU()),
        block=nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.MaxPool2d(2)),
    )


class LastWeeksNet(StagedBackbone):
    """A backbone written against last week's API: no ``reductions``."""

    def __init__(self, *, in_channels: int, frozen_bn: bool = False):
        dc = DataConfig(input_size=16, resize_size=16, mean=(0.5,), std=(0.5,), in_channels=1)
        super().__init__(_stages(), {"stem": 4, "block": 8}, dc, frozen_bn=frozen_bn)


class AncientNet(StagedBackbone):
    """A backbone written against an API older still (no data config): it cannot be built."""

    def __init__(self, *, in_channels: int, width: int = 4):
        super().__init__(_stages(), {"stem": 4, "block": 8})  # type: ignore[call-arg]


NAMES = {"last_weeks_net": LastWeeksNet, "ancient_net": AncientNet}


@pytest.fixture()
def old_plugins() -> Iterator[None]:
    """Register the two backbones as a third-party plugin would (from this module), and remove them after."""
    for name, cls in NAMES.items():
        register("backbone", name)(cls)
    yield
    for name in NAMES:
        registry.registry("backbone")._entries.pop(name, None)
    registry._PROBES.clear()


def test_old_style_backbone_still_works_with_a_warning_saying_what_to_pass(old_plugins: None) -> None:
    with pytest.warns(InterfaceDeprecationWarning, match=r"pass reductions=\{'stem': 2, 'block': 4\}"):
        net = registry.build("backbone", "last_weeks_net", context={"in_channels": 1})
    assert net.stage_reductions == {"stem": 2, "block": 4}
    assert net.training  # measuring the reductions left the mode as it was
    testing.check_backbone("last_weeks_net")  # the stage contract holds
    with pytest.raises(AssertionError, match="deprecated dml-harness interface.*reductions="):
        testing.check_component("backbone", "last_weeks_net")  # but a plugin's own tests say what to change


def test_unbuildable_backbone_is_one_config_error_before_any_data(old_plugins: None, tmp_path: Path) -> None:
    raw = {
        "data": {"dataset": {"name": "cub200", "root": str(tmp_path / "no_such_folder")}},
        "backbone": {"name": "ancient_net", "width": 8},
    }
    with pytest.raises(ConfigError) as e:
        config.validate(raw)
    assert len(e.value.problems) == 1
    problem = e.value.problems[0]
    assert "\n" not in problem and problem.startswith("backbone: backbone 'ancient_net' of plugin")
    assert f"module {__name__}" in problem  # where to fix it
    assert "missing 1 required positional argument: 'data_config'" in problem
    assert "now StagedBackbone(stages" in problem and "reductions" in problem  # what to change
    # `dmlh run` says the same and reads no data (the dataset folder does not exist)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["--results", str(tmp_path / "results"), "run", str(path)]) == 2


def test_dmlh_list_shows_the_unbuildable_and_the_deprecated_plugin(
    old_plugins: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["list", "backbone"]) == 0
    out = capsys.readouterr().out
    assert "BROKEN: backbone: backbone 'ancient_net' of plugin" in out
    assert "[broken plugins]" in out.split("ancient_net", 2)[-1]
    assert "deprecated: " in out and "pass reductions={'stem': 2, 'block': 4}" in out
    assert "small_convnet" in out and out.count("BROKEN") == 1  # built-ins are not probed, nor broken


def test_check_plugin_runs_every_contract_check_of_a_plugin(old_plugins: None) -> None:
    assert set(testing.plugin_components(__name__)) == {("backbone", n) for n in NAMES}
    with pytest.raises(AssertionError, match="ancient_net.*cannot be built|reductions="):
        testing.check_plugin(__name__)
    registry.registry("backbone")._entries.pop("ancient_net")
    with pytest.raises(AssertionError, match="reductions="):
        testing.check_plugin(__name__)


def test_a_current_plugin_passes_check_plugin() -> None:
    class CurrentNet(StagedBackbone):
        """Declares its reductions."""

        def __init__(self, *, in_channels: int):
            dc = DataConfig(input_size=16, resize_size=16, mean=(0.5,), std=(0.5,), in_channels=1)
            super().__init__(_stages(), {"stem": 4, "block": 8}, dc, reductions={"stem": 2, "block": 4})

    register("backbone", "current_net")(CurrentNet)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", InterfaceDeprecationWarning)
            testing.check_plugin(__name__)
        assert registry.build_problem("backbone", "current_net") is None
    finally:
        registry.registry("backbone")._entries.pop("current_net")
        registry._PROBES.clear()


OLD_PACKAGE = """
\"\"\"An out-of-tree package of backbones written against older dml-harness APIs.\"\"\"
from collections import OrderedDict

from torch import nn

from harness.model import StagedBackbone
from harness.registry import register
from harness.types import DataConfig


def _stages():
    return OrderedDict(
        stem=nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU()),
        block=nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1)),
    )


@register("backbone", "pkg_last_weeks")
class LastWeeks(StagedBackbone):
    \"\"\"No reductions.\"\"\"

    def __init__(self, *, in_channels: int):
        dc = DataConfig(input_size=8, resize_size=8, mean=(0.5,), std=(0.5,), in_channels=1)
        super().__init__(_stages(), {"stem": 4, "block": 8}, dc)


@register("backbone", "pkg_ancient")
class Ancient(StagedBackbone):
    \"\"\"No data config either.\"\"\"

    def __init__(self, *, in_channels: int):
        super().__init__(_stages(), {"stem": 4, "block": 8})
"""


@pytest.fixture(scope="module")
def old_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package above installed with pip into a private site folder, with its dmlh.plugins entry point."""
    root = tmp_path_factory.mktemp("oldplugin")
    pkg = _make_package(root, "dmlh_oldnets", OLD_PACKAGE)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*cmd, "--target", str(root / "site"), str(pkg)], check=True, capture_output=True)
    return root / "site"


def test_installed_old_plugin_package_listed_refused_and_still_working(
    old_site: Path, tmp_path: Path
) -> None:
    listed = _dmlh(old_site, "list", "backbone")
    assert listed.returncode == 0, listed.stderr
    assert (
        "BROKEN: backbone: backbone 'pkg_ancient' of plugin 'dmlh_oldnets' (package dmlh-oldnets;"
        in listed.stdout
    )
    assert "pass reductions={'stem': 2, 'block': 8} to super().__init__" in listed.stdout
    base = {
        "data": {"dataset": {"name": "synthetic", "num_classes": 8, "per_class": 4, "size": 8}},
        "sampler": {"p": 2, "k": 2, "batches_per_epoch": 2},
        "model": {"name": "embedder", "embedding_dim": 8},
        "train": {"epochs": 1},
        "eval": {"nmi": False},
    }
    ancient = {**base, "name": "ancient", "backbone": "pkg_ancient"}
    ancient["data"] = {"dataset": {"name": "cub200", "root": str(tmp_path / "no_such_folder")}}
    (tmp_path / "ancient.yaml").write_text(yaml.safe_dump(ancient))
    run = _dmlh(
        old_site, "--results", str(tmp_path / "r"), "run", str(tmp_path / "ancient.yaml"), cwd=tmp_path
    )
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if "pkg_ancient" in line]
    assert len(errors) == 1 and "package dmlh-oldnets" in errors[0] and "now StagedBackbone(" in errors[0]
    assert "cub200" not in run.stderr and "Traceback" not in run.stderr  # no data read, no raw TypeError
    (tmp_path / "old.yaml").write_text(yaml.safe_dump({**base, "name": "old", "backbone": "pkg_last_weeks"}))
    run = _dmlh(old_site, "--results", str(tmp_path / "r"), "run", str(tmp_path / "old.yaml"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "recall@1" in run.stdout and "InterfaceDeprecationWarning" in run.stderr
