"""One CLI grammar (issue #27): every subcommand described in --help, component switches by name on the
command line, a run's --name in its log lines, `dmlh list` saying where each component comes from."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from harness import config, registry
from harness.bench import BENCHES
from harness.cli import build_parser, main


def _subcommands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ("dmlh",)
) -> Iterator[tuple[str, str | None]]:
    """(command line, its help in the parent's --help) of every subcommand, walking the whole tree."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield " ".join((*path, name)), helps.get(name)
                yield from _subcommands(sub, (*path, name))


def test_every_subcommand_has_a_one_line_description() -> None:
    found = dict(_subcommands(build_parser()))
    expected = {"dmlh run", "dmlh list", "dmlh data check", "dmlh study run", "dmlh study status"}
    expected |= {"dmlh study check", "dmlh report"} | {f"dmlh bench {what}" for what in BENCHES}
    assert expected <= set(found)
    undescribed = {cmd: text for cmd, text in found.items() if not text or "\n" in text}
    assert not undescribed


@pytest.mark.parametrize("what", sorted(BENCHES))
def test_dmlh_bench_what_help_is_the_benchmarks_own_with_its_description(
    what: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["bench", what, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dmlh bench {what}")
    assert BENCHES[what][1] in " ".join(out.split())


TRIPLET = {"name": "triplet", "margin": 0.3, "mining": "batch_hard"}
DROPPED = "dropped the parameters of loss 'triplet': margin=0.3, mining='batch_hard'"


@pytest.mark.parametrize("switch", ["loss.name=multi_similarity", "loss=multi_similarity"])
def test_a_loss_switched_by_name_drops_the_old_parameters_with_a_note(
    switch: str, caplog: pytest.LogCaptureFixture
) -> None:
    raw = config.name_default_components({"loss": TRIPLET})
    with caplog.at_level(logging.INFO, logger="harness.config"):
        cfg = config.validate(config.apply_overrides(raw, [switch]))
    assert cfg.loss["name"] == "multi_similarity" and "margin" not in cfg.loss
    assert f"{switch}: {DROPPED}" in caplog.messages


@pytest.mark.parametrize(
    ("path", "old", "new"),
    [
        ("miner", {"name": "batch_hard", "distance": "cosine"}, "semi_hard"),
        ("backbone", {"name": "small_convnet", "width": 4}, "resnet18"),
        ("pooling", {"name": "gem", "p": 4.0}, "avg"),
        ("data.dataset", {"name": "synthetic", "num_classes": 12}, "digits"),
        ("optimizer", {"name": "sgd", "momentum": 0.8}, "adam"),
        ("scheduler", {"name": "step", "step_size": 3}, "cosine"),
        ("regularizers.0", {"name": "classification", "weight": 0.5}, "mdr"),
    ],
)
def test_every_component_switches_by_name(path: str, old: dict[str, object], new: str) -> None:
    raw = config.assign(config.name_default_components({"regularizers": ["classification"]}), {path: old})
    switched = config.apply_overrides(raw, [f"{path}.name={new}"])
    assert config.lookup(switched, path) == {"name": new}
    config.validate(switched)


def test_a_parameter_set_on_the_same_command_line_is_kept_before_or_after_the_name() -> None:
    raw = config.name_default_components({"loss": TRIPLET})
    switch, alpha = "loss.name=multi_similarity", "loss.alpha=3"
    for overrides in ([alpha, switch], [switch, alpha]):
        assert config.validate(config.apply_overrides(raw, overrides)).loss["alpha"] == 3
    same = config.apply_overrides(raw, ["loss.name=triplet"])  # the same name: nothing is switched
    assert same["loss"] == TRIPLET


def test_a_study_switches_components_by_name_in_its_overrides_and_arms() -> None:
    from harness.study import parse_study

    base = {
        "data": {"dataset": {"name": "synthetic", "num_classes": 12, "per_class": 6, "size": 8}},
        "sampler": {"p": 3, "k": 2},
        "backbone": {"name": "small_convnet", "width": 4, "input_size": 8},
        "loss": TRIPLET,
        "train": {"epochs": 1},
    }
    study = {"name": "switch", "base": base, "arms": {"loss.name": ["triplet", "multi_similarity"]}}
    spec = parse_study(study)
    assert [arm.raw["loss"] for arm in spec.arms] == [TRIPLET, {"name": "multi_similarity"}]
    overridden = config.apply_overrides(study, ["base.loss.name=contrastive"])
    assert overridden["base"]["loss"] == {"name": "contrastive"}


def test_a_runs_name_names_its_log_lines_and_its_config(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    run = {
        "name": "digits-triplet",
        "data": {"dataset": {"name": "synthetic", "num_classes": 12, "per_class": 6, "size": 8}},
        "sampler": {"p": 3, "k": 2, "batches_per_epoch": 2},
        "backbone": {"name": "small_convnet", "width": 4, "input_size": 8},
        "model": {"name": "embedder", "embedding_dim": 8},
        "train": {"epochs": 1},
        "eval": {"nmi": False},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    with caplog.at_level(logging.INFO):
        assert main(["--results", str(tmp_path), "run", str(path), "--name", "myloss"]) == 0
    assert any(m.startswith("myloss: epoch 1/1") for m in caplog.messages), caplog.messages
    assert not any("digits-triplet" in m for m in caplog.messages)
    assert yaml.safe_load((tmp_path / "runs" / "myloss" / "config.yaml").read_text())["name"] == "myloss"
    assert "run written to" in capsys.readouterr().out


def test_dmlh_list_gives_whole_first_sentences_and_where_each_component_comes_from() -> None:
    text = registry.describe(["pooling", "optimizer"])
    assert (
        "  rmac  (methods/pooling.py)  Regional MAC (cirtorch ``rmac``): global MAC plus max-pooled regions "
        "on L levels, each L2-normalised, summed (the embedder's normalisation then L2-normalises the sum).\n"
    ) in text
    assert "  adam  (harness)  Adam (weight decay as L2 in the gradient" in text
    assert "builtin" not in text


def test_an_entry_point_plugin_is_shown_with_its_package() -> None:
    class Outside:
        """A component of an installed package."""

    Outside.__module__ = "pytorch_metric_learning.losses"
    entry = registry.Entry("loss", "outside", Outside, {}, frozenset(), "pml_plugin")
    assert entry.origin == "plugin pml_plugin, package pytorch-metric-learning"


def test_a_yaml_syntax_error_names_the_file_line_and_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1\nloss: triplet\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f'in "{bad}", line 2, column 11' in err and "<unicode string>" not in err
