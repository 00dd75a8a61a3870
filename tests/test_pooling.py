"""Pooling: GeM limits and parameter attributes, R-MAC regions against a direct loop, CGD."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness import registry
from harness.config import RunConfig
from harness.errors import ConfigError
from harness.model import build_model
from harness.types import ModelOutput
from methods.pooling import RMAC, rmac_regions


def pool(name: str, in_channels: int = 6, **params: object) -> torch.nn.Module:
    return registry.build("pooling", name, context={"in_channels": in_channels, "num_classes": 5}, **params)


def test_spoc_is_avg_and_mac_is_max() -> None:
    x = torch.rand(3, 6, 5, 4)
    torch.testing.assert_close(pool("spoc")(x), x.mean(dim=(2, 3)))
    torch.testing.assert_close(pool("avg")(x), pool("spoc")(x))
    torch.testing.assert_close(pool("mac")(x), x.flatten(2).max(dim=2).values)


def test_gem_limits() -> None:
    x = 0.5 + 0.5 * torch.rand(2, 6, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(pool("gem", p=1.0).double()(x), x.mean(dim=(2, 3)))
    mac = x.amax(dim=(2, 3))
    errors = [(pool("gem", p=p).double()(x) - mac).abs().max().item() for p in (3.0, 30.0, 300.0, 3000.0)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 2e-3
    # the definition, elementwise
    p = 3.0
    expected = torch.stack(
        [torch.stack([(c.clamp_min(1e-6) ** p).mean() ** (1 / p) for c in img]) for img in x]
    )
    torch.testing.assert_close(pool("gem", p=p).double()(x), expected)


def test_gem_p_is_one_shared_parameter_with_its_own_group() -> None:
    gem = pool("gem")
    assert [n for n, _ in gem.named_parameters()] == ["p"]
    assert gem.p.numel() == 1 and gem.p.item() == 3.0 and gem.p.requires_grad
    assert gem.p.lr_mult == 10.0 and gem.p.no_weight_decay is True
    gem(torch.rand(2, 6, 3, 3)).sum().backward()
    assert gem.p.grad is not None and gem.p.grad.abs().item() > 0
    assert not pool("gem", learn_p=False).p.requires_grad
    assert pool("gem", p_lr_mult=5.0).p.lr_mult == 5.0


def test_gem_p_group_in_the_engine() -> None:
    from harness.learner import param_groups

    cfg = RunConfig.model_validate(
        {"pooling": {"name": "gem"}, "backbone": {"name": "small_convnet", "width": 4}}
    )
    model = build_model(cfg, num_classes=3, in_channels=1)
    groups = {g["name"]: g for g in param_groups(model, [], cfg)}
    assert [p is model.pooling.p for p in groups["head×10/no_wd"]["params"]] == [True]
    assert groups["head×10/no_wd"]["weight_decay"] == 0.0


@pytest.mark.parametrize(
    ("h", "w", "count"),
    [(7, 7, 1 + 4 + 9), (7, 10, 2 + 6 + 12), (10, 7, 2 + 6 + 12), (12, 30, 4 * 1 + 5 * 2 + 6 * 3), (1, 1, 1)],
)
def test_rmac_region_counts(h: int, w: int, count: int) -> None:
    regions = rmac_regions(h, w, 3)
    assert len(regions) == count
    for top, left, side in regions:
        assert 0 <= top and top + side <= h and 0 <= left and left + side <= w


def test_rmac_region_grid_overlap() -> None:
    # 7×10: level 1 has two 7×7 squares at both ends (overlap 4/7, the closest to 40% among 2..7 regions)
    assert [r for r in rmac_regions(7, 10) if r[2] == 7] == [(0, 0, 7), (0, 3, 7)]
    # 12×30: 2..7 squares of side 12 would overlap by -0.5, 0.25, 0.5, 0.625, 0.7, 0.75: 4 are closest to 40%
    lvl1 = [r for r in rmac_regions(12, 30) if r[2] == 12]
    assert [left for _, left, _ in lvl1] == [0, 6, 12, 18]
    # level 3 on 12×30: side 6, 3 + 3 = 6 squares along the width, step 24/5 = 4.8 (floored)
    assert sorted({r[1] for r in rmac_regions(12, 30) if r[2] == 6}) == [0, 4, 9, 14, 19, 24]
    # level 2 on 7×7: side floor(14/3) = 4, starts 0 and 3 in both directions
    assert sorted(r for r in rmac_regions(7, 7) if r[2] == 4) == [(0, 0, 4), (0, 3, 4), (3, 0, 4), (3, 3, 4)]


@pytest.mark.parametrize(("h", "w"), [(7, 7), (7, 10), (9, 5), (2, 3)])
def test_rmac_against_direct_loop(h: int, w: int) -> None:
    x = torch.rand(2, 6, h, w)

    def l2(v: torch.Tensor) -> torch.Tensor:
        return v / (v.norm() + 1e-6)

    expected = []
    for img in x:
        v = l2(img.flatten(1).max(dim=1).values)
        for top, left, side in rmac_regions(h, w, 3):
            v = v + l2(img[:, top : top + side, left : left + side].flatten(1).max(dim=1).values)
        expected.append(v)
    torch.testing.assert_close(RMAC(in_channels=6, levels=3)(x), torch.stack(expected))


def test_cgd_shapes_and_aux_loss() -> None:
    cgd = pool("cgd", descriptors="SMG", dim=12, weight=2.0)
    assert cgd.out_dim == 12
    x, labels = torch.rand(4, 6, 3, 3), torch.tensor([0, 1, 4, 4])
    out = cgd(x, labels)
    assert isinstance(out, ModelOutput) and out.embeddings.shape == (4, 12)
    torch.testing.assert_close(out.embeddings.norm(dim=1), torch.ones(4))
    for part in out.embeddings.split(4, dim=1):  # each branch is unit-norm before the final normalisation
        torch.testing.assert_close(part.norm(dim=1), torch.full((4,), 3**-0.5))
    # the first descriptor (SPoC) feeds the classifier: CE with smoothing 0.1 on logits / 0.5
    logits = cgd.classifier(x.mean(dim=(2, 3))) / 0.5
    expected = 2.0 * F.cross_entropy(logits, labels, label_smoothing=0.1)
    torch.testing.assert_close(out.aux_losses["cgd_ce"], expected)
    out.aux_losses["cgd_ce"].backward()
    assert cgd.classifier[1].weight.grad is not None
    cgd.eval()
    plain = cgd(x)
    assert isinstance(plain, torch.Tensor) and plain.shape == (4, 12)


def test_cgd_in_the_embedder_and_bad_config() -> None:
    cfg = RunConfig.model_validate(
        {
            "backbone": {"name": "small_convnet", "width": 4},
            "pooling": {"name": "cgd", "descriptors": "MG", "dim": 8},
            "model": {"name": "embedder", "head": False},
        }
    )
    model = build_model(cfg, num_classes=3, in_channels=1).train()
    out = model(torch.rand(4, 1, 28, 28), torch.tensor([0, 0, 1, 2]))
    assert out.embeddings.shape == (4, 8) and model.embedding_dim == 8 and "cgd_ce" in out.aux_losses
    with pytest.raises(ConfigError, match="divisible"):
        pool("cgd", descriptors="SMG", dim=8)
    with pytest.raises(ConfigError, match="distinct letters"):
        pool("cgd", descriptors="SX")
