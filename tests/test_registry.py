"""Registry: registration, schemas from signatures, context injection and the error messages."""

from __future__ import annotations

from typing import Annotated, Literal

import pytest
from pydantic import Field

from harness import config, registry
from harness.errors import ConfigError, UnknownComponentError
from harness.registry import Registry, build, register, validate_params


class Widget:
    """A test component."""

    def __init__(self, *, size: int = 3, mode: Literal["a", "b"] = "a", num_classes: int):
        self.size, self.mode, self.num_classes = size, mode, num_classes


@pytest.fixture(scope="module", autouse=True)
def _widget() -> None:
    register("testkind", "widget")(Widget)


def test_schema_separates_hyperparameters_from_context() -> None:
    entry = registry.registry("testkind").get("widget")
    assert list(entry.params) == ["size", "mode"]
    assert entry.context == {"num_classes"}
    assert entry.summary == "A test component."


def test_build_passes_only_requested_context() -> None:
    w = build("testkind", "widget", context={"num_classes": 7, "embedding_dim": 5}, size=4)
    assert (w.size, w.mode, w.num_classes) == (4, "a", 7)


def test_duplicate_name_is_an_error_unless_replace() -> None:
    reg = Registry("k")
    reg.add("x", Widget)
    with pytest.raises(ValueError, match="already registered"):
        reg.add("x", Widget)
    reg.add("x", Widget, replace=True)


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(UnknownComponentError) as e:
        registry.registry("testkind").get("widgit", "model.name")
    msg = str(e.value)
    assert "model.name" in msg and "'widget'" in msg and "did you mean" in msg


def test_unknown_and_illtyped_parameters_all_reported() -> None:
    problems = validate_params("testkind", "widget", {"sise": 2, "mode": "c"}, "loss")
    assert len(problems) == 2
    assert "loss.sise" in problems[0] and "'size'" in problems[0]
    assert "loss.mode" in problems[1] and "'c'" in problems[1]
    assert validate_params("testkind", "widget", {"size": "x"}, "p")[0].startswith("p.size")
    with pytest.raises(ConfigError, match="unknown parameter"):
        build("testkind", "widget", context={"num_classes": 1}, path="loss", sise=2)


def test_describe_lists_parameters_and_defaults() -> None:
    text = registry.describe(["testkind"])
    assert "widget" in text and "size: int = 3" in text and "mode: Literal['a', 'b'] = 'a'" in text


class Gauge:
    """A component with declared constraints and one cross-parameter check in its constructor."""

    def __init__(self, *, low: Annotated[float, Field(ge=0)] = 0.0, high: float = 1.0):
        if high <= low:
            raise ConfigError(f"high: {high} must exceed low = {low}")
        self.low, self.high = low, high


def test_signature_constraints_are_checked_with_the_true_path() -> None:
    register("testkind", "gauge", replace=True)(Gauge)
    assert validate_params("testkind", "gauge", {"low": -1}, "regularizers.3") == [
        "regularizers.3.low: -1 is not a valid float (ge=0) (Input should be greater than or equal to 0)"
    ]
    assert "low: float (ge=0) = 0.0" in registry.describe(["testkind"])


def test_build_prefixes_constructor_errors_with_its_path() -> None:
    register("testkind", "gauge", replace=True)(Gauge)
    with pytest.raises(ConfigError) as e:
        build("testkind", "gauge", path="regularizers.2", low=0.5, high=0.1)
    assert e.value.problems == ["regularizers.2.high: 0.1 must exceed low = 0.5"]


def test_mdr_constraint_names_its_position_in_the_list() -> None:
    raw = {"regularizers": [{"name": "mdr"}, {"name": "mdr", "momentum": 1.5, "levels": []}]}
    with pytest.raises(ConfigError) as e:
        config.validate(raw)
    assert [p.split(":")[0] for p in e.value.problems] == ["regularizers.1.momentum", "regularizers.1.levels"]


def test_lookup_walks_dotted_paths_through_mappings_and_lists() -> None:
    raw = {"regularizers": [{"name": "mdr"}, {"name": "mdr", "weight": 0.3}], "loss": "triplet"}
    assert config.lookup(raw, "regularizers.1.weight") == 0.3
    assert config.lookup(raw, "regularizers.2.weight", None) is None
    assert config.lookup(raw, "loss.margin", "absent") == "absent"  # through a shorthand: no value
    with pytest.raises(KeyError):
        config.lookup(raw, "model.m")


def test_a_loss_declares_its_reference_and_is_benchmarked_against_it(capsys: pytest.CaptureFixture) -> None:
    """``dmlh bench losses`` reads the references a loss registers next to itself: no bench.py edit."""
    import torch

    from harness.bench.components import bench_losses
    from harness.plugins import Reference
    from harness.types import LossOutput

    def reference() -> list[Reference]:
        return [Reference(lambda c, d: lambda e, y: (e**2).mean(), {"scale": 2.0}, variant="squares")]

    @register("loss", "toy_squares", replace=True, references=reference)
    class ToySquares(torch.nn.Module):
        def __init__(self, *, scale: float = 1.0):
            super().__init__()
            self.scale = scale

        def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> LossOutput:
            return LossOutput(self.scale * (embeddings**2).mean())

    try:
        assert registry.registry("loss").get("toy_squares").references is reference
        bench_losses(
            ["--only", "toy_squares", "--sizes", "8", "--dim", "4", "--repeats", "1", "--warmup", "0"]
        )
    finally:  # keep the session's loss registry to the real losses
        registry.registry("loss")._entries.pop("toy_squares")
    row = next(line for line in capsys.readouterr().out.splitlines() if "toy_squares" in line)
    assert "squares" in row and "<=1.0" in row


def test_selection_metric_must_be_computed_by_the_evaluation() -> None:
    """A typo or a K not in eval.ks is a config error before training, not a failure at the first epoch."""
    with pytest.raises(ConfigError, match=r"train.selection_metric: 'recall@3' is not computed"):
        config.validate({"train": {"selection_metric": "recall@3"}})
    with pytest.raises(ConfigError, match="clustering metrics need eval.nmi: true"):
        config.validate({"train": {"selection_metric": "nmi"}, "eval": {"nmi": False}})
    assert config.validate({"train": {"selection_metric": "map@r"}}).train.selection_metric == "map@r"
    no_val = {"data": {"val_fraction": 0.0}, "train": {"selection_metric": "recall@3"}}
    assert config.validate(no_val)  # nothing is selected without validation classes
