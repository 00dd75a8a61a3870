"""ABE-M: every branching point / attention depth, divergence loss, heads variant, diagnostics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness import registry
from harness.errors import ConfigError
from harness.model import Embedder, StagedBackbone
from harness.plugins import AttentionMaps
from harness.types import ModelOutput
from methods.abe import ABE, divergence_loss


def small_convnet(**params: object) -> StagedBackbone:
    return registry.build(
        "backbone", "small_convnet", context={"in_channels": 1}, width=4, input_size=16, **params
    )


def avg_pool(backbone: StagedBackbone) -> nn.Module:
    return registry.build("pooling", "avg", context={"in_channels": backbone.out_channels})


def make_abe(backbone: StagedBackbone, pooling: nn.Module | None = None, **params: object) -> ABE:
    pooling = pooling or avg_pool(backbone)
    return registry.build(
        "model", "abe", context={"backbone": backbone, "pooling": pooling}, path="model", **params
    )


@pytest.fixture(scope="module")
def googlenet() -> StagedBackbone:
    return registry.build("backbone", "googlenet")


def reference_learner(abe: ABE, x: torch.Tensor, m: int) -> torch.Tensor:
    """Learner m on its own: f_m(x) = G(S(x) ⊙ A_m(S(x))), A_m's 1×1 conv being the m-th channel block."""
    s = abe.backbone(x, end=abe.branch)
    c = s.shape[1]
    logits = abe.attention_masks(abe.attention_trunk(s))[:, m * c : (m + 1) * c]
    if logits.shape[-2:] != s.shape[-2:]:
        logits = F.interpolate(logits, size=s.shape[-2:], mode="bilinear", align_corners=False)
    g = abe.backbone(s * torch.sigmoid(logits), start=abe.branch)
    return F.normalize(abe.head(abe.pooling(g)), dim=-1)


def check_abe(abe: ABE, x: torch.Tensor) -> None:
    """Shapes, concatenation, divergence, the batched learners against one-by-one, gradients."""
    b, m, d = x.shape[0], abe.m, abe.embedding_dim // abe.m
    abe.eval()
    with torch.no_grad():
        out = abe(x)
        assert out.embeddings.shape == (b, abe.embedding_dim) and len(out.parts) == m
        torch.testing.assert_close(out.embeddings, torch.cat(out.parts, dim=1))
        for i, part in enumerate(out.parts):
            assert part.shape == (b, d)
            torch.testing.assert_close(part.norm(dim=1), torch.ones(b))
            torch.testing.assert_close(part, reference_learner(abe, x, i), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            out.aux_losses["divergence"], abe.lambda_div * divergence_loss(torch.stack(out.parts), abe.m_div)
        )
    abe.train()
    out = abe(x)
    (sum(p.sum() for p in out.parts) + out.aux_losses["divergence"]).backward()
    stages = abe.backbone.stages
    s_params = [p for n in abe.backbone.stage_range(None, abe.branch) for p in stages[n].parameters()]
    g_params = [p for n in abe.backbone.stage_range(abe.branch) for p in stages[n].parameters()]
    for group in (s_params, g_params, list(abe.attention_trunk.parameters()), list(abe.head.parameters())):
        assert all(p.grad is not None for p in group)
    assert abe.attention_masks.weight.grad.abs().sum() > 0


# -- divergence loss -----------------------------------------------------------------------------------------


def naive_divergence(parts: torch.Tensor, margin: float) -> torch.Tensor:
    m, b, _ = parts.shape
    total = torch.zeros(())
    for i in range(b):
        for p in range(m):
            for q in range(p + 1, m):
                total = total + torch.clamp(margin - ((parts[p, i] - parts[q, i]) ** 2).sum(), min=0)
    return total / b


@pytest.mark.parametrize("margin", [0.5, 1.0, 3.0])
def test_divergence_loss_matches_a_naive_loop(margin: float) -> None:
    parts = F.normalize(torch.randn(4, 5, 6), dim=-1)
    parts[1, 0] = parts[0, 0]  # one image with two identical learners
    torch.testing.assert_close(divergence_loss(parts, margin), naive_divergence(parts, margin))


def test_divergence_loss_on_hand_made_embeddings() -> None:
    eye = torch.eye(3)  # three learners with orthogonal unit embeddings: ‖f_m − f_n‖² = 2
    parts = eye.unsqueeze(1).expand(3, 2, 3)  # [M=3, B=2, d=3]
    assert divergence_loss(parts, 1.0).item() == 0.0
    torch.testing.assert_close(divergence_loss(parts, 2.5), torch.tensor(3 * 0.5))
    same = torch.tensor([1.0, 0.0, 0.0]).expand(3, 2, 3)  # identical learners: every pair costs the margin
    torch.testing.assert_close(divergence_loss(same, 1.0), torch.tensor(3.0))


# -- architecture --------------------------------------------------------------------------------------------

SMALL_SPLITS = [(b, d) for b, d in itertools.combinations(["block1", "block2", "block3", "block4"], 2)]


@pytest.mark.parametrize(("branch", "depth"), SMALL_SPLITS)
def test_every_split_of_the_small_convnet(branch: str, depth: str) -> None:
    abe = make_abe(
        small_convnet(), m=3, embedding_dim=12, branch=branch, attention_depth=depth, lambda_div=0.5
    )
    names = abe.backbone.stage_names
    assert len(abe.attention_trunk) == names.index(depth) - names.index(branch)
    check_abe(abe, torch.randn(2, 1, 16, 16))


def test_every_branching_point_and_attention_depth_of_googlenet(googlenet: StagedBackbone) -> None:
    names = googlenet.stage_names
    splits = [(b, None) for b in names[:-1]] + [("pool3", d) for d in names[names.index("pool3") + 1 :]]
    x = torch.randn(2, 3, 32, 32)
    for branch, depth in splits:
        abe = make_abe(googlenet, m=2, embedding_dim=8, branch=branch, attention_depth=depth)
        expected_depth = depth or (
            "inception4e" if names.index(branch) < names.index("inception4e") else names[-1]
        )
        assert abe.attention_depth == expected_depth
        check_abe(abe, x)


def test_defaults_follow_the_backbone(googlenet: StagedBackbone) -> None:
    abe = make_abe(googlenet)
    assert (abe.branch, abe.attention_depth, abe.m, abe.embedding_dim) == ("pool3", "inception4e", 8, 512)
    assert abe.attention_masks.in_channels == 832 and abe.attention_masks.out_channels == 8 * 480
    assert [type(m).__name__ for m in abe.attention_trunk][:1] == ["Inception"] and len(
        abe.attention_trunk
    ) == 5
    small = make_abe(small_convnet())  # derived from the small convnet's stage reductions
    assert (small.branch, small.attention_depth) == ("block2", "block3")


def test_parameters_of_s_and_g_stay_under_the_backbone(googlenet: StagedBackbone) -> None:
    abe = make_abe(googlenet, m=2, embedding_dim=8)
    backbone_ids = {id(p) for p in abe.backbone.parameters()}
    assert backbone_ids == {id(p) for p in googlenet.parameters()}
    head = [p for n, p in abe.named_parameters() if not n.startswith("backbone.")]
    assert head and not any(id(p) in backbone_ids for p in head)
    # the attention trunk is a separate copy of inception4a…4e, initialised from the backbone's weights
    torch.testing.assert_close(
        abe.attention_trunk[0].branch1.conv.weight, googlenet.stages.inception4a.branch1.conv.weight
    )
    assert abe.attention_trunk[0].branch1.conv.weight is not googlenet.stages.inception4a.branch1.conv.weight


def test_frozen_bn_also_freezes_the_attention_trunk() -> None:
    abe = make_abe(small_convnet(frozen_bn=True), m=2, embedding_dim=8, branch="block1").train()
    bns = [m for m in abe.modules() if isinstance(m, nn.BatchNorm2d)]
    assert any(m in set(abe.attention_trunk.modules()) for m in bns)
    assert not any(m.training for m in bns) and abe.attention_masks.training
    assert all(m.training for m in make_abe(small_convnet(), m=2, embedding_dim=8).train().modules())


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"branch": "block9"}, "model.branch 'block9' is not a stage"),
        ({"branch": "block4"}, "final stage"),
        ({"branch": "block2", "attention_depth": "block2"}, "model.attention_depth: 'block2' must"),
        ({"branch": "block3", "attention_depth": "block1"}, "must come after"),
        ({"attention_depth": "nope"}, "model.attention_depth 'nope' is not a stage"),
        ({"m": 3, "embedding_dim": 16}, "not divisible"),
        ({"m": 0}, "model.m: 0 is not a valid int"),
        ({"lambda_div": -1.0}, "model.lambda_div: -1.0 is not a valid float"),
    ],
)
def test_config_errors(params: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_abe(small_convnet(), **params)


def test_variant_is_validated_by_the_registry() -> None:
    assert registry.validate_params("model", "abe", {"variant": "mixture"}, "model")
    assert not registry.validate_params("model", "abe", {"variant": "heads", "m": 4, "m_div": 2.0}, "model")


# -- M = 1, λ = 0, heads -------------------------------------------------------------------------------------


def test_one_learner_without_divergence_has_no_aux_loss() -> None:
    abe = make_abe(small_convnet(), m=1, embedding_dim=8, lambda_div=0.0).train()
    out = abe(torch.randn(3, 1, 16, 16), torch.arange(3))
    assert out.aux_losses == {} and len(out.parts) == 1
    torch.testing.assert_close(out.parts[0], out.embeddings)
    assert abe.epoch_diagnostics() == {}
    two = make_abe(small_convnet(), m=2, embedding_dim=8, lambda_div=0.0).train()
    out = two(torch.randn(3, 1, 16, 16))
    assert out.aux_losses == {} and "divergence_unweighted" in out.stats


def test_attention_maps_are_each_learners_sigmoid_mask_averaged_over_channels() -> None:
    abe = make_abe(small_convnet(), m=3, embedding_dim=12, branch="block2", attention_depth="block4").eval()
    x = torch.randn(2, 1, 16, 16)
    assert isinstance(abe, AttentionMaps)
    with torch.no_grad():
        maps = abe.attention_maps(x)
        s = abe.backbone(x, end="block2")  # [B, C, 8, 8]; block4's 4×4 logits are resized to it
        c = s.shape[1]
        logits = F.interpolate(
            abe.attention_masks(abe.attention_trunk(s)), size=(8, 8), mode="bilinear", align_corners=False
        )
    assert maps is not None and maps.shape == (3, 2, 8, 8)
    assert 0 < maps.min() and maps.max() < 1
    for m in range(3):  # learner m's mask: the m-th channel block of the 1×1 conv (as reference_learner)
        torch.testing.assert_close(maps[m], torch.sigmoid(logits[:, m * c : (m + 1) * c]).mean(1))
    heads = make_abe(small_convnet(), m=3, embedding_dim=12, variant="heads")
    assert heads.attention_maps(x) is None


def test_heads_with_one_learner_is_the_single_learner_baseline() -> None:
    backbone, x = small_convnet(), torch.randn(3, 1, 16, 16)
    abe = make_abe(backbone, m=1, embedding_dim=8, lambda_div=0.0, variant="heads")
    base = Embedder(backbone=backbone, pooling=avg_pool(backbone), embedding_dim=8)
    assert sum(p.numel() for p in abe.parameters()) == sum(p.numel() for p in base.parameters())
    base.head.load_state_dict(abe.heads[0].state_dict())
    abe.eval(), base.eval()
    with torch.no_grad():
        out, ref = abe(x), base(x)
    torch.testing.assert_close(out.embeddings, ref.embeddings)
    assert out.aux_losses == {}


@pytest.mark.parametrize("branch", ["block2", "block4"])
def test_heads_variant(branch: str) -> None:
    backbone = small_convnet()
    abe = make_abe(backbone, m=3, embedding_dim=12, branch=branch, variant="heads")
    after = backbone.stage_range(branch)
    assert len(abe.head_stages) == 2 and all(len(s) == len(after) for s in abe.head_stages)
    assert not hasattr(abe, "attention_masks") and abe.attention_depth is None
    x = torch.randn(4, 1, 16, 16)
    abe.eval()
    with torch.no_grad():
        out = abe(x)
        s = backbone(x, end=branch)
        maps = [backbone(s, start=branch), *(stages(s) for stages in abe.head_stages)]
        for part, head, g in zip(out.parts, abe.heads, maps, strict=True):
            torch.testing.assert_close(part, F.normalize(head(g.mean(dim=(2, 3))), dim=-1))
    assert out.embeddings.shape == (4, 12) and "divergence" in out.aux_losses
    abe.train()
    out = abe(x)
    (out.parts[2].sum() + out.aux_losses["divergence"]).backward()
    assert (
        next(abe.head_stages[1].parameters(), None) is None
        or next(abe.head_stages[1].parameters()).grad is not None
    )


# -- pooling that returns a ModelOutput, diagnostics ---------------------------------------------------------


class LabelledPooling(nn.Module):
    """Average pooling with an aux loss that needs the labels (like CGD's classifier)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.out_dim = in_channels
        self.seen_labels: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        self.seen_labels = labels
        return ModelOutput(embeddings=x.mean(dim=(2, 3)), aux_losses={"ce": x.mean()})


def test_pooling_aux_losses_and_labels_per_learner() -> None:
    backbone = small_convnet()
    pooling = LabelledPooling(backbone.out_channels)
    abe = make_abe(backbone, pooling, m=2, embedding_dim=8)
    labels = torch.tensor([3, 1, 2])
    out = abe(torch.randn(3, 1, 16, 16), labels)
    assert set(out.aux_losses) == {"ce", "divergence"}
    assert pooling.seen_labels.tolist() == [3, 1, 2, 3, 1, 2]  # learner-major, like the batched features


def test_epoch_diagnostics_report_the_learners_self_similarity() -> None:
    abe = make_abe(small_convnet(), m=3, embedding_dim=12).train()
    parts = []
    for _ in range(2):
        parts.append(torch.stack(abe(torch.randn(4, 1, 16, 16)).parts).detach())
    abe.eval()
    abe(torch.randn(4, 1, 16, 16))  # evaluation batches are not counted
    f = torch.cat(parts, dim=1)  # [M, 8, d]
    sims = [F.cosine_similarity(f[p], f[q], dim=1) for p, q in itertools.combinations(range(3), 2)]
    diag = abe.epoch_diagnostics()
    assert diag["learner_self_similarity"] == pytest.approx(torch.cat(sims).mean().item(), abs=1e-6)
    matrix = torch.tensor(diag["learner_self_similarity_matrix"])
    assert matrix.shape == (3, 3)
    torch.testing.assert_close(matrix.diagonal(), torch.ones(3))
    assert abe.epoch_diagnostics() == {}  # reset after reporting


# -- end to end ----------------------------------------------------------------------------------------------


def test_abe_trains_end_to_end_and_records_its_diagnostics() -> None:
    from harness import config
    from harness.train import run

    cfg = config.validate({
        "name": "abe-e2e",
        "data": {"dataset": {"name": "synthetic", "num_classes": 12, "per_class": 8, "size": 8}},
        "sampler": {"p": 3, "k": 4, "batches_per_epoch": 2},
        "backbone": {"name": "small_convnet", "width": 4, "input_size": 8},
        "model": {"name": "abe", "m": 2, "embedding_dim": 8, "branch": "block2", "lambda_div": 0.5},
        "loss": {"name": "contrastive"},
        "train": {"epochs": 1},
        "eval": {"nmi": False, "ks": [1, 2]},
    })  # fmt: skip
    result = run(cfg)
    assert 0.0 <= result.metrics["test/recall@1"] <= 1.0
    row = result.history[0]
    assert row["train/aux/divergence"] > 0 and -1.0 <= row["diag/learner_self_similarity"] <= 1.0
    assert len(result.diagnostics[0]["ABE/learner_self_similarity_matrix"]) == 2
    saved = result.embeddings  # the masks of the first image of each of the first 4 test classes
    assert saved["attention_masks"].shape == (2, 4, 4, 4) and saved["attention_masks"].dtype == np.float16
    assert saved["attention_images"].shape == (4, 8, 8, 3) and saved["attention_images"].dtype == np.uint8
    labels = saved["gallery_labels"]
    assert len(set(labels[saved["attention_index"]])) == 4 and saved["attention_index"][0] == 0


def test_the_divergence_loss_alone_separates_the_learners_through_their_masks() -> None:
    """Learners that differ only by their attention masks (shared G and head) start almost identical; the
    divergence gradient must reach the per-learner 1×1 convs and pull the learners apart."""
    torch.manual_seed(0)
    abe = make_abe(small_convnet(), m=3, embedding_dim=12, branch="block2", attention_depth="block3").train()
    x = torch.randn(16, 1, 16, 16)
    opt = torch.optim.Adam(abe.attention_masks.parameters(), lr=0.05)  # only the per-learner masks move
    abe(x)
    before = abe.epoch_diagnostics()["learner_self_similarity"]
    for _ in range(30):
        out = abe(x)
        opt.zero_grad()
        out.aux_losses["divergence"].backward()
        opt.step()
    abe.epoch_diagnostics()
    abe(x)
    after = abe.epoch_diagnostics()["learner_self_similarity"]
    assert before > 0.9 and after < before - 0.3, (before, after)


def _glorot_bound(w: torch.Tensor) -> float:
    fan_out, fan_in = w.shape[0] * w[0, 0].numel(), w.shape[1] * w[0, 0].numel()
    return (6 / (fan_in + fan_out)) ** 0.5


@pytest.mark.parametrize("variant", ["attention", "heads"])
def test_xavier_init_gives_glorot_uniform_weights(variant: str) -> None:
    """init: xavier: every embedding layer and each learner's 1×1 conv block is U(±sqrt(6/(fan_in+fan_out)))
    (std = bound/√3), biases zero; the default keeps PyTorch's init (a different, fan-in-only bound)."""
    torch.manual_seed(0)
    abe = make_abe(small_convnet(), m=4, embedding_dim=64, variant=variant, init="xavier")
    default = make_abe(small_convnet(), m=4, embedding_dim=64, variant=variant)
    assert (abe.init, default.init) == ("xavier", "default")
    linears = [abe.head] if variant == "attention" else list(abe.heads)
    blocks = [lin.weight for lin in linears]
    if variant == "attention":
        conv = abe.attention_masks.weight
        blocks += list(conv.chunk(4))  # per learner: fan_out = C of S, not 4·C
        assert abe.attention_masks.bias.abs().max() == 0
    for w in blocks:
        bound = _glorot_bound(w)
        assert w.abs().max() <= bound
        assert w.std().item() == pytest.approx(bound / 3**0.5, rel=0.25)
        assert w.abs().max() > 0.8 * bound  # fills its range, not a narrower one
    assert all(lin.bias.abs().max() == 0 for lin in linears)
    d_lin = default.head if variant == "attention" else default.heads[0]
    assert d_lin.weight.abs().max() <= 1 / d_lin.weight.shape[1] ** 0.5  # PyTorch's kaiming-uniform bound
    assert d_lin.bias.abs().max() > 0


def test_paper_recipe_defaults() -> None:
    """ABE-M defaults: M = 8 learners splitting a 512-D embedding, λ_div = 1, m_div = 1 (METHODS.md §5)."""
    abe = make_abe(small_convnet())
    assert (abe.m, abe.embedding_dim, abe.lambda_div, abe.m_div, abe.init) == (8, 512, 1.0, 1.0, "default")
    assert abe.head.out_features == 512 // 8
    x = torch.randn(3, 1, 16, 16)
    abe.eval()
    with torch.no_grad():
        out = abe(x)
    assert out.embeddings.shape == (3, 512) and [p.shape for p in out.parts] == [(3, 64)] * 8
    loss = registry.build("loss", "contrastive", context={"miner": None, "synthesis": None}, neg_margin=1.0)
    assert loss.neg_margin == 1.0  # the paper's contrastive margin m_c = 1 is a config value


def test_per_learner_attention_gives_each_learner_its_own_trunk_and_conv() -> None:
    kw = {"m": 3, "embedding_dim": 12, "branch": "block2", "attention_depth": "block3"}
    shared = make_abe(small_convnet(), **kw)
    assert shared.attention == "shared_trunk"  # the default
    torch.manual_seed(0)
    abe = make_abe(small_convnet(), attention="per_learner", **kw).eval()
    trunks = abe.attention_trunk
    assert isinstance(trunks, nn.ModuleList) and len(trunks) == 3
    n_trunk = sum(p.numel() for p in shared.attention_trunk.parameters())
    assert sum(p.numel() for p in trunks.parameters()) == 3 * n_trunk
    with torch.no_grad():  # make the copies differ, as training would
        for i, t in enumerate(trunks):
            for p in t.parameters():
                p.add_(0.1 * (i + 1))
    x = torch.randn(2, 1, 16, 16)
    w, bias = abe.attention_masks.weight, abe.attention_masks.bias
    with torch.no_grad():
        s = abe.backbone(x, end=abe.branch)
        c = s.shape[1]
        parts = abe(x).parts
        for m in range(3):  # learner m alone: its own trunk, its own 1×1 conv block, G, the head
            logits = F.conv2d(trunks[m](s), w[m * c : (m + 1) * c], bias[m * c : (m + 1) * c])
            logits = F.interpolate(logits, size=s.shape[-2:], mode="bilinear", align_corners=False)
            g = abe.backbone(s * torch.sigmoid(logits), start=abe.branch)
            want = F.normalize(abe.head(abe.pooling(g)), dim=-1)
            torch.testing.assert_close(parts[m], want, atol=1e-5, rtol=1e-4)
    abe.train()
    out = abe(x)
    (sum(p.sum() for p in out.parts) + out.aux_losses["divergence"]).backward()
    assert all(p.grad is not None for t in trunks for p in t.parameters())
