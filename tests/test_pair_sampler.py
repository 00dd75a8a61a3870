"""ABE-M's pair sampler: batches of random same-class and different-class pairs."""

from __future__ import annotations

import numpy as np
import pytest

from harness.config import validate
from harness.data.sampler import PairSampler, PKSampler, build_sampler
from harness.errors import ConfigError

LABELS = np.repeat(np.arange(20), 5)


def test_each_batch_has_16_positive_then_16_negative_pairs() -> None:
    sampler = PairSampler(LABELS, 16, 16, batches_per_epoch=50, seed=3)
    batches = list(sampler)
    assert len(batches) == 50
    for batch in batches:
        assert len(batch) == 64
        pairs = np.asarray(batch).reshape(-1, 2)
        same = LABELS[pairs[:, 0]] == LABELS[pairs[:, 1]]
        assert same[:16].all() and not same[16:].any()
        assert (pairs[:16, 0] != pairs[:16, 1]).all()  # two distinct images of the class
    # random pairs: over many batches every class and most images appear
    used = np.unique(np.concatenate(batches))
    assert len(used) > 0.95 * len(LABELS)


def test_positive_pairs_are_uniform_over_classes_and_ordered_image_pairs() -> None:
    """Naive expectation: each class 1/C of the positive pairs, each ordered pair (i, j), i != j, of a
    class equally often."""
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2])
    sampler = PairSampler(labels, 64, 0, batches_per_epoch=400, seed=0)
    pairs = np.concatenate([np.asarray(b).reshape(-1, 2) for b in sampler])
    assert (labels[pairs[:, 0]] == labels[pairs[:, 1]]).all() and (pairs[:, 0] != pairs[:, 1]).all()
    class_freq = np.bincount(labels[pairs[:, 0]], minlength=3) / len(pairs)
    np.testing.assert_allclose(class_freq, 1 / 3, atol=0.01)
    class2 = pairs[labels[pairs[:, 0]] == 2]
    counts = np.unique(class2[:, 0] * 10 + class2[:, 1], return_counts=True)[1]
    assert len(counts) == 12  # all 4 * 3 ordered pairs of class 2
    np.testing.assert_allclose(counts / counts.sum(), 1 / 12, atol=0.01)


def test_pair_batches_depend_only_on_seed_and_epoch() -> None:
    a, b = PairSampler(LABELS, 4, 4, 5, seed=1), PairSampler(LABELS, 4, 4, 5, seed=1)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)


def test_single_image_classes_never_make_positive_pairs() -> None:
    labels = np.array([0, 1, 2, 3, 3])  # only class 3 has two images
    batch = next(iter(PairSampler(labels, 8, 2, 1)))
    pairs = np.asarray(batch).reshape(-1, 2)
    assert (labels[pairs[:8]] == 3).all()
    with pytest.raises(ConfigError, match="positive_pairs"):
        PairSampler(np.arange(5), 2, 2)


def test_sampler_kind_selects_the_sampler() -> None:
    cfg = validate({"sampler": {"kind": "pairs", "positive_pairs": 16, "negative_pairs": 16}})
    assert isinstance(build_sampler(cfg.sampler, LABELS, 0), PairSampler)
    assert isinstance(build_sampler(validate({}).sampler, LABELS, 0), PKSampler)
    with pytest.raises(ConfigError, match="sampler.kind"):
        validate({"sampler": {"kind": "triplets"}})


def test_repeated_augmentations_repeat_each_image_and_the_copies_differ() -> None:
    """MultiGrain's repeated augmentation: every image R times in a row, each copy augmented anew."""
    import torch

    from harness.data import ImageSet
    from harness.data.transforms import build_transforms
    from harness.types import DataConfig

    cfg = validate({"sampler": {"p": 4, "k": 2, "repeated_augmentations": 3}})
    sampler = build_sampler(cfg.sampler, LABELS, 0)
    batch = next(iter(sampler))
    assert len(batch) == 4 * 2 * 3 and len(sampler) == len(PKSampler(LABELS, 4, 2))
    triples = np.asarray(batch).reshape(-1, 3)
    assert (triples == triples[:, :1]).all()  # R consecutive copies of each image
    plain = next(iter(PKSampler(LABELS, 4, 2)))
    assert triples[:, 0].tolist() == plain  # the same images as without repetition
    images = ImageSet(
        np.random.default_rng(0).integers(0, 255, (len(LABELS), 32, 32), dtype=np.uint8), LABELS
    )
    train_tf, _ = build_transforms(
        validate({}).data,
        DataConfig(input_size=32, resize_size=32, in_channels=1, mean=(0.5,), std=(0.5,)),
        1,
    )
    data = images.with_transform(train_tf)
    torch.manual_seed(0)
    copies = [data[i][0] for i in batch[:3]]
    assert not torch.equal(copies[0], copies[1]) or not torch.equal(copies[1], copies[2])
