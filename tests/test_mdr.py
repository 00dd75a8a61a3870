"""MDR regulariser against a step-by-step loop implementation of METHODS.md 6.2."""

from __future__ import annotations

import math

import pytest
import torch

from harness import registry
from harness.errors import ConfigError
from methods.mdr import HIST_BINS, MDR


def make_mdr(**params: object) -> MDR:
    return registry.build("regularizer", "mdr", path="regularizers.0", **params)


class NaiveMDR:
    """METHODS.md 6.2 written out with Python loops; keeps its own running statistics."""

    def __init__(self, levels: list[float], momentum: float = 0.9, include_diagonal: bool = True):
        self.levels, self.momentum, self.include_diagonal = levels, momentum, include_diagonal
        self.mean: float | None = None
        self.std: float | None = None

    def __call__(self, e: torch.Tensor) -> float:
        b = len(e)
        dist = [
            [0.0 if i == j else math.sqrt(max(float(((e[i] - e[j]) ** 2).sum()), 1e-12)) for j in range(b)]
            for i in range(b)
        ]
        values = [dist[i][j] for i in range(b) for j in range(b) if self.include_diagonal or i != j]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        if self.mean is None:
            self.mean, self.std = mean, std
        else:
            self.mean = self.momentum * self.mean + (1 - self.momentum) * mean
            self.std = self.momentum * self.std + (1 - self.momentum) * std
        gaps = []
        for i in range(b):
            for j in range(b):
                if i != j:
                    d_hat = (dist[i][j] - self.mean) / self.std
                    gaps.append(min(abs(d_hat - s) for s in self.levels))
        return sum(gaps) / len(gaps)


def batch(seed: int, b: int = 8, d: int = 5) -> torch.Tensor:
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("diagonal", ["include", "exclude"])
def test_matches_naive_over_several_batches(diagonal: str) -> None:
    levels = [-2.0, -0.5, 0.75, 2.5]  # any K (exact in float32: the module starts in float32)
    mdr = make_mdr(levels=levels, weight=0.6, level_l2=0.01, stats_diagonal=diagonal).double().train()
    naive = NaiveMDR(levels, include_diagonal=diagonal == "include")
    for seed in range(4):
        e = batch(seed) * (1 + seed)  # different scales so the running stats move
        out = mdr(e, torch.zeros(len(e), dtype=torch.long))
        expected = 0.6 * naive(e) + 0.01 * sum(s * s for s in levels)
        assert out.value.item() == pytest.approx(expected, rel=1e-10)
        assert mdr.running_mean.item() == pytest.approx(naive.mean, rel=1e-10)
        assert mdr.running_std.item() == pytest.approx(naive.std, rel=1e-10)


def test_diagonal_flag_changes_statistics() -> None:
    e = batch(0).float()
    inc, exc = make_mdr(stats_diagonal="include"), make_mdr(stats_diagonal="exclude")
    inc(e), exc(e)
    b = len(e)
    # including B zeros lowers the mean by the factor (B-1)/B and raises the std
    assert inc.running_mean.item() == pytest.approx(exc.running_mean.item() * (b - 1) / b, rel=1e-5)
    assert inc.running_std.item() > exc.running_std.item()


def test_running_stats_after_two_batches() -> None:
    mdr = make_mdr()
    e1, e2 = batch(1).float(), 3 * batch(2).float()
    mu1, sd1 = mdr.batch_stats(torch.cdist(e1, e1))
    mu2, sd2 = mdr.batch_stats(torch.cdist(e2, e2))
    mdr(e1), mdr(e2)
    assert mdr.running_mean.item() == pytest.approx(0.9 * mu1.item() + 0.1 * mu2.item(), rel=1e-5)
    assert mdr.running_std.item() == pytest.approx(0.9 * sd1.item() + 0.1 * sd2.item(), rel=1e-5)


def test_eval_mode_uses_running_stats_without_updating() -> None:
    mdr = make_mdr()
    mdr(batch(1).float())
    mean = mdr.running_mean.clone()
    mdr.eval()
    out = mdr(5 * batch(2).float())
    assert torch.equal(mdr.running_mean, mean)
    assert out.stats["running_mean"] == mean
    assert sum(mdr.epoch_diagnostics()["mdr_level_pairs"]) == 8 * 7  # only the training batch is accumulated
    fresh = make_mdr().eval()  # before any training batch: the batch's own statistics
    fresh(batch(3).float())
    assert not bool(fresh.initialized)


def test_zero_when_every_distance_is_on_a_level() -> None:
    # a regular simplex: every off-diagonal distance equals 1, so the std over the off-diagonal entries
    # is 0; with the diagonal zeros included, (1 - μ)/σ is one value: put a level exactly there
    b = 6
    e = torch.eye(b, dtype=torch.float64) / math.sqrt(2)
    mean = (b - 1) / b
    std = math.sqrt(((b * b - b) * (1 - mean) ** 2 + b * mean**2) / (b * b - 1))
    d_hat = (1 - mean) / std
    mdr = make_mdr(levels=[-3.0, 0.0], level_l2=0.0).double()
    mdr.levels.data[1] = d_hat  # set in float64 (the constructor's float32 would round it)
    out = mdr(e)
    assert out.value.item() == pytest.approx(0.0, abs=1e-9)
    assert make_mdr(level_l2=0.0).double()(e).value.item() > 0.1  # the default levels are off it
    # two distance values, each on its own level
    e2 = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    mdr2 = make_mdr(level_l2=0.0).double()
    d = torch.tensor([1.0, 3.0, 1.0, 2.0, 3.0, 2.0], dtype=torch.float64)
    full = torch.cat([d, torch.zeros(3, dtype=torch.float64)])
    mu, sd = full.mean().item(), full.std().item()
    mdr2.levels.data = torch.tensor([(1 - mu) / sd, (2 - mu) / sd, (3 - mu) / sd], dtype=torch.float64)
    assert mdr2(e2).value.item() == pytest.approx(0.0, abs=1e-12)


def test_state_dict_restores_running_stats() -> None:
    mdr = make_mdr()
    mdr(batch(1).float()), mdr(2 * batch(2).float())
    state = mdr.state_dict()
    assert {"levels", "running_mean", "running_std", "initialized"} <= set(state)
    restored = make_mdr()
    restored.load_state_dict(state)
    assert bool(restored.initialized)
    e = batch(3).float()
    torch.testing.assert_close(restored(e).value, mdr(e).value)
    torch.testing.assert_close(restored.running_mean, mdr.running_mean)


def test_gradcheck_float64() -> None:
    mdr = make_mdr(levels=[-1.0, 0.3, 1.4]).double()
    mdr(batch(0))  # initialise running stats, then eval: a pure function of (embeddings, levels)
    mdr.eval()
    e = batch(1).requires_grad_(True)

    levels = mdr.levels.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: mdr(x).value, (e,))
    assert torch.autograd.gradcheck(
        lambda s: torch.func.functional_call(mdr, {"levels": s}, (e.detach(),)).value, (levels,)
    )


def test_diagnostics_accumulate_and_reset() -> None:
    mdr = make_mdr()
    mdr(batch(1).float()), mdr(batch(2).float())
    diag = mdr.epoch_diagnostics()
    assert sum(diag["mdr_hist_counts"]) == 2 * 8 * 7 == sum(diag["mdr_level_pairs"])
    assert len(diag["mdr_hist_counts"]) == HIST_BINS and len(diag["mdr_hist_edges"]) == HIST_BINS + 1
    assert diag["mdr_levels"] == pytest.approx([-3.0, 0.0, 3.0])
    assert [diag[f"mdr_level_{i}"] for i in range(3)] == diag["mdr_levels"]  # scalars for the history
    shares = [diag[f"mdr_level_{i}_pair_share"] for i in range(3)]
    assert shares == pytest.approx([n / (2 * 8 * 7) for n in diag["mdr_level_pairs"]])
    assert sum(mdr.epoch_diagnostics()["mdr_hist_counts"]) == 0


def test_levels_are_learned_and_bad_config_rejected() -> None:
    mdr = make_mdr()
    out = mdr(batch(1).float().requires_grad_(True))
    out.value.backward()
    assert mdr.levels.grad is not None and mdr.levels.grad.abs().sum() > 0
    with pytest.raises(ConfigError):
        make_mdr(levels=[])
    yaml_params = {"levels": [-3, 0, 3], "weight": 0.6, "level_l2": 0.01, "momentum": 0.9}
    assert registry.validate_params("regularizer", "mdr", yaml_params, "regularizers.0") == []
    assert registry.validate_params("regularizer", "mdr", {"stats_diagonal": "off"}, "regularizers.0")


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_mdr_runs_in_float32_under_bf16_autocast(input_dtype: torch.dtype) -> None:
    """Under AMP (CPU bf16 autocast here) the MDR term is float32 and equals the fp32 computation."""
    torch.manual_seed(3)
    e = (torch.randn(16, 32) * 3).to(input_dtype)
    reference, amp = make_mdr(), make_mdr()
    want = reference(e.float())
    x = e.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = amp(x)
    assert got.value.dtype == torch.float32
    torch.testing.assert_close(got.value, want.value, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(amp.running_mean, reference.running_mean)
    got.value.backward()
    assert x.grad is not None and x.grad.dtype == input_dtype and torch.isfinite(x.grad.float()).all()


def test_mean_distance_head_gives_float32_embeddings_under_bf16_autocast() -> None:
    """MDR's head (learning without L2 norm) is scaled in fp32 under AMP, equal to the fp32 computation."""
    from harness.model import mean_distance_scale

    e = torch.randn(16, 8)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = mean_distance_scale(e.to(torch.bfloat16))
    assert out.dtype == torch.float32
    want = mean_distance_scale(e.to(torch.bfloat16).float())
    assert torch.allclose(out, want)
    d = torch.cdist(out, out)
    assert abs(float(d.sum() / (16 * 15)) - 1.0) < 1e-5  # mean off-diagonal distance 1 after scaling
