"""RunConfig: YAML loading, dotted overrides, validation reporting every problem with its path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from harness import config
from harness.errors import ConfigError


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_defaults_are_resolved_and_saved(tmp_path: Path) -> None:
    cfg = config.load(_write(tmp_path, {"name": "x", "backbone": "small_convnet"}))
    assert cfg.backbone == {
        "name": "small_convnet", "width": 32, "input_size": 28, "downsampling": None, "convs_per_block": None,
        "frozen_bn": False,
    }  # fmt: skip
    assert cfg.optimizer["lr"] == pytest.approx(1e-3)
    assert cfg.model["embedding_dim"] == 128


def test_dotted_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, {"backbone": "small_convnet", "optimizer": {"name": "adam"}})
    cfg = config.load(
        path, ["optimizer.lr=0.01", "train.epochs=3", "backbone.width=8", "eval.ks=[1, 10]", "optimizer=sgd"]
    )
    assert cfg.optimizer["name"] == "sgd" and cfg.optimizer["momentum"] == 0.9
    cfg = config.load(path, ["optimizer.lr=0.01", "train.epochs=3", "backbone.width=8", "eval.ks=[1, 10]"])
    assert cfg.optimizer["lr"] == 0.01 and cfg.train.epochs == 3 and cfg.backbone["width"] == 8
    assert cfg.eval.ks == [1, 10]


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        {
            "trian": {"epochs": 2},  # typo of a section
            "train": {"epochs": "many", "eval_evry": 2},  # ill-typed, misspelt
            "backbone": {"name": "small_convnet", "widht": 8},  # unknown parameter
            "optimizer": {"name": "adamm"},  # unknown component
        },
    )
    with pytest.raises(ConfigError) as e:
        config.load(path)
    problems = e.value.problems
    assert len(problems) == 5, problems
    assert any(p.startswith("train.eval_evry: unknown key; did you mean 'eval_every'") for p in problems)
    assert any(p.startswith("trian: unknown key; did you mean 'train'?") for p in problems)
    assert any(p.startswith("train.epochs") for p in problems)
    assert any(p.startswith("backbone.widht") and "'width'" in p for p in problems)
    assert any(p.startswith("optimizer.name") and "'adam'" in p for p in problems)


def test_override_reaches_a_default_component_and_floats_parse(tmp_path: Path) -> None:
    cfg = config.load(
        _write(tmp_path, {}), ["optimizer.lr=1e-4", "data.dataset.train_classes=[0, 1, 2, 3, 4, 5]"]
    )
    assert cfg.optimizer == {**cfg.optimizer, "name": "adam", "lr": 1e-4}
    assert cfg.data.dataset["name"] == "digits" and cfg.data.dataset["train_classes"] == [0, 1, 2, 3, 4, 5]
    assert config.load(_write(tmp_path, {"optimizer": {"name": "sgd", "lr": 1}})).optimizer["lr"] == 1.0


def test_bad_override_and_bad_yaml(tmp_path: Path) -> None:
    path = _write(tmp_path, {})
    with pytest.raises(ConfigError, match="expected dotted.path=value"):
        config.load(path, ["train.epochs"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "missing.yaml")


def test_run_key_is_stable_and_sensitive(tmp_path: Path) -> None:
    path = _write(tmp_path, {"backbone": "small_convnet"})
    a, b = config.load(path), config.load(path)
    assert a.run_key() == b.run_key()
    assert config.load(path, ["seed=1"]).run_key() != a.run_key()
    # the defaults written out or left implicit give the same run
    explicit = config.load(_write(tmp_path, a.to_dict()))
    assert explicit.run_key() == a.run_key()


def test_every_config_snippet_of_the_readme_validates() -> None:
    """Each top-level entry of the README's RunConfig snippets (method sections included), on the digits
    config, is a valid config: the documentation cannot drift from the parameters."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    base = config.load_yaml(Path(__file__).parents[1] / "studies/configs/digits.yaml")
    checked = 0
    for block in re.findall(r"```yaml\n(.*?)```", readme, re.S):
        if "arms:" in block or block.startswith(("recipe:", "studies:", "fair:")):  # study and table snippets
            continue  # (tests/test_study.py, tests/test_tables.py, tests/test_fair_protocol.py)
        entries: list[list[str]] = []
        for line in block.splitlines():
            if line and not line[0].isspace() and not line.startswith("#"):
                entries.append([line])
            elif entries:
                entries[-1].append(line)
        for entry in entries:
            config.validate(config.name_default_components({**base, **config.parse_yaml("\n".join(entry))}))
            checked += 1
    assert checked >= 30


def test_yaml_booleans_are_accepted_for_switch_like_options(tmp_path: Path) -> None:
    """Issue #31, item 2: YAML reads the documented ``cache: off`` as False, in a file and on the command
    line; every switch-like option takes YAML's booleans."""
    text = "data:\n  cache: off\n  batch_augment: no\nminer: off\ntrain:\n  compile: on\n"
    path = tmp_path / "switches.yaml"
    path.write_text(text)  # written as a user writes it, not through yaml.safe_dump (which would quote)
    cfg = config.load(path)
    got = (cfg.data.cache, cfg.data.batch_augment, cfg.miner, cfg.train.compile)
    assert got == ("off", False, None, "default")
    overrides = ["data.cache=off", "data.batch_augment=on", "train.compile=off", "synthesis=false"]
    cfg = config.load(path, overrides)
    got = (cfg.data.cache, cfg.data.batch_augment, cfg.train.compile, cfg.synthesis)
    assert got == ("off", True, False, None)
    cfg = config.load(path, ["data.cache=disk", "data.batch_augment=auto"])
    assert (cfg.data.cache, cfg.data.batch_augment) == ("disk", "auto")
    with pytest.raises(ConfigError, match="data.cache"):
        config.load(path, ["data.cache=sometimes"])


def test_config_only_errors_come_before_any_data_is_read(tmp_path: Path) -> None:
    """Issue #31, item 6: ``batch_augment: true`` with the ``grey`` recipe, or a stage name the backbone does
    not have, is a config error, not one found after the image check and the cache (the dataset folder here
    does not exist: a dataset error would mean the data was read first)."""
    from harness import train
    from harness.data.batch_augment import BATCHED

    assert config.BATCHED_TRANSFORMS == BATCHED  # the one list, as config validation and the augment read it
    missing = {"dataset": {"name": "cub200", "root": str(tmp_path / "nowhere")}}
    with pytest.raises(ConfigError, match="data.batch_augment: the 'grey' transform is not batched"):
        config.validate({"data": {**missing, "transform": "grey", "batch_augment": True}})
    config.validate({"data": {**missing, "transform": "imagenet", "batch_augment": True}})
    cfg = config.validate({"data": missing, "model": {"name": "abe", "branch": "nope"}})
    with pytest.raises(ConfigError, match="model.branch 'nope' is not a stage"):
        train.run(cfg)
