"""The interfaces between the engine and its plugins in one place: what a plugin declares, who reads it.

A plugin is registered under a kind (``harness.registry``) and built from its keyword-only constructor
arguments. Beyond its call signature (``forward``), a plugin may declare the capabilities below; the engine
reads them through these Protocols and helpers only, never by guessing attribute names elsewhere.

- backbone (``harness.model.StagedBackbone``): ordered named stages with ``feature_info`` (per stage its
  output channels and reduction, as timm's ``feature_info``) and the ``data_config`` its weights expect.
  Read by ``model.build_model`` (pooling ``in_channels``), the transforms (``learner.Learner``) and model
  plugins that split the network (ABE derives its default branching point from the reductions).
- model: ``(images, labels=None) -> ModelOutput`` with an ``embedding_dim``; parameters under its
  ``backbone`` attribute (``HasBackbone``) form the backbone learning-rate group (``learner.param_groups``).
- parameter options (``set_param_options``): a parameter may carry its own learning-rate multiplier and be
  exempt from weight decay (GeM's p, proxies); ``learner.param_groups`` gives it a group of its own.
- miner (``Miner``): declares ``produces`` ("pairs" or "triplets"); a loss that takes a miner declares the
  kinds it ``accepts_miner``. ``config.validate`` checks the pairing before anything is built.
- offline miner (``SplitMiner``): a triplet miner that picks its triplets from the whole training split
  (FaceNet's offline generation). ``train._Trainer`` embeds the split every ``refresh_every`` epochs and
  hands the miner's triplets to the sampler (``TripletBatches``, ``sampler.kind: triplets``), whose batches
  are those triplets in a row; ``config.validate`` checks that the two come together.
- benchmarks (``register(..., references=..., bench=...)``): a loss may name reference implementations
  (``Reference``: a pytorch-metric-learning loss set to the same semantics) that ``dmlh bench losses`` times
  it against; any component may declare ``BenchVariant`` rows for ``dmlh bench methods``.
- diagnostics (``EpochDiagnostics``): any module of the model, loss or regularizers with an
  ``epoch_diagnostics()`` method is asked once per epoch by ``learner.Learner`` for scalars (history columns)
  and records (diagnostics file); it resets its accumulators.
- attention (``AttentionMaps``): a model with spatial attention gives each learner's mask of a few test
  images; ``train.run`` saves them with the test embeddings and the report draws them over the images.
- ensemble (``Ensemble``): a model whose embedding concatenates several learners' embeddings says which
  columns are whose; ``train.run`` scores each learner alone on the test split (``test_learner<m>/…``)
  and the report sets them beside the ensemble (ABE's individual learners vs ABE-M).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

#: What a miner returns: (anchor, positive, negative) index tensors, or (a1, p, a2, n) pair tensors.
MinedKind = Literal["pairs", "triplets"]


@runtime_checkable
class EpochDiagnostics(Protocol):
    """A component that accumulates per-batch observations and reports them once per epoch."""

    def epoch_diagnostics(self) -> dict[str, Any]:
        """Scalars (→ history ``diag/<key>``) and other JSON values (→ diagnostics); then reset."""
        ...


@runtime_checkable
class AttentionMaps(Protocol):
    """A model with spatial attention that can show where each of its learners looks (ABE-M's masks)."""

    def attention_maps(self, images: torch.Tensor) -> torch.Tensor | None:
        """[M, B, h, w] masks in [0, 1] at the model's own resolution (averaged over channels); None when
        this configuration of the model has no attention (ABE's heads variant)."""
        ...


@runtime_checkable
class Ensemble(Protocol):
    """A model whose retrieval embedding is the concatenation of several learners' embeddings (ABE-M)."""

    def learner_columns(self) -> list[slice]:
        """Each learner's columns of the embedding, in learner order; empty for a single learner (the
        embedding is then the learner's own, nothing to compare)."""
        ...


@runtime_checkable
class HasBackbone(Protocol):
    """A model whose parameters under ``backbone`` form the backbone learning-rate group."""

    backbone: nn.Module


class Miner(Protocol):
    """A miner class: ``miner(embeddings, labels)`` returns index tensors of the kind it ``produces``."""

    produces: ClassVar[MinedKind]


class MinerTakingLoss(Protocol):
    """A loss class whose constructor asks for a ``miner``, with the kinds of mined tuples it uses."""

    accepts_miner: ClassVar[tuple[MinedKind, ...]]


@runtime_checkable
class SplitMiner(Protocol):
    """A triplet miner that mines the whole training split offline, not the batch.

    Every ``refresh_every`` epochs (from epoch 0, the initial model) the trainer embeds the training split in
    eval mode with the test transform and calls ``mine_split``; the sampler then builds every batch from the
    returned triplets, each as 3 consecutive images (anchor, positive, negative), and the miner's batch-level
    ``forward`` gives the loss exactly those triplets back.
    """

    refresh_every: int

    def mine_split(
        self, embeddings: Tensor, labels: Tensor, rng: np.random.Generator
    ) -> tuple[np.ndarray, dict[str, float]]:
        """``[T, 3]`` int64 indices into the split (anchor, positive, negative) and scalar statistics of the
        mining (history columns ``mining/<key>``). ``rng`` is the run's generator for this refresh."""
        ...


@runtime_checkable
class TripletBatches(Protocol):
    """A batch sampler that serves the triplets a ``SplitMiner`` mined (``harness.data.sampler``)."""

    def set_triplets(self, triplets: np.ndarray, epoch: int) -> None:
        """Build the batches of ``epoch`` and the epochs after it (until the next call) from ``triplets``
        ``[T, 3]`` (anchor, positive, negative)."""
        ...


class InterfaceDeprecationWarning(FutureWarning):
    """A plugin uses an interface of the harness that changed (shown to users; ``dmlh list`` and the contract
    checks of ``harness.testing`` report it, with the one-line change to make)."""


def mines_split(miner_cls: object) -> bool:
    """Whether a miner class mines the whole training split (``SplitMiner``), read before it is built."""
    return callable(getattr(miner_cls, "mine_split", None))


def produces(miner_cls: object) -> str | None:
    """The kind of tuples a miner class declares it produces (None: it declares none, a contract error)."""
    return getattr(miner_cls, "produces", None)


def accepts_miner(loss_cls: object) -> tuple[str, ...]:
    """The kinds of mined tuples a loss class accepts (empty: it declares none)."""
    return tuple(getattr(loss_cls, "accepts_miner", ()))


def set_param_options(param: nn.Parameter, *, lr_mult: float = 1.0, no_weight_decay: bool = False) -> None:
    """Give ``param`` its own learning-rate multiplier and/or exempt it from weight decay."""
    param.lr_mult = lr_mult  # type: ignore[attr-defined]
    param.no_weight_decay = no_weight_decay  # type: ignore[attr-defined]


def param_options(param: nn.Parameter) -> tuple[float, bool]:
    """``(lr_mult, no_weight_decay)`` of a parameter (1.0, False unless ``set_param_options`` set them)."""
    return float(getattr(param, "lr_mult", 1.0)), bool(getattr(param, "no_weight_decay", False))


@dataclass(frozen=True)
class Reference:
    """A reference implementation a loss is benchmarked against (``dmlh bench losses``).

    build(num_classes, dim) -> fn(embeddings, labels) -> reference loss tensor; it imports its library
    (pytorch-metric-learning, a dev dependency) when called. params: our constructor params for this row;
    target: the ours/reference time ratio wanted; gib(B): the reference's estimated peak memory in GiB where
    it grows faster than B², so the benchmark can skip it on small machines.
    """

    build: Callable[[int, int], Callable[[Any, Any], Any]]
    params: dict[str, Any] = field(default_factory=dict)
    variant: str = ""
    target: float = 1.0
    note: str = ""
    gib: Callable[[int], float] | None = None


@dataclass(frozen=True)
class BenchVariant:
    """A row of ``dmlh bench methods``: the change, merged into the benchmark's base RunConfig (a triplet
    embedder on the small convnet), that switches the component on."""

    label: str
    change: dict[str, Any]
