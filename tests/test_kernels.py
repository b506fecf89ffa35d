"""The fused CPU loops (lib/merging/kernels.py) give the torch code's bits: TIES's fold and final
step, DARE's sparsified tensor, and the threshold search's count-and-keep, on values chosen to
break them (signed zeros, entries equal to a threshold, exact cancellations, overflow)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.merging import kernels
from lib.merging.dare import dare_keep_mask, dare_tensor
from lib.merging.ties import KthLargest, observe_magnitudes, sample_bracket, ties_merge_tensor


def bits(t: torch.Tensor) -> torch.Tensor:
    """Equal bits, not just equal values (−0.0 ≠ +0.0 here)."""
    return t.reshape(-1).view(torch.uint8)


@pytest.fixture(params=["fused", "torch"])
def path(request, monkeypatch):
    """Run the code under test through the fused loops, or (as on a GPU) through torch: each
    test asserts the loop it meant to exercise ran, or did not."""
    ran = []
    if request.param == "torch":
        monkeypatch.setattr(kernels, "fusable", lambda *tensors: False)
    for name in ("ties_fold", "ties_finish", "dare_sparse", "magnitudes_between"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, _n=name, **k: (ran.append(_n), _f(*a, **k))[1])
    return request.param, ran


def hard_case(g: torch.Generator, n: int = 4000, experts: int = 4, dtype=torch.float32):
    """θ0 with many ±0 entries; experts equal to θ0, or ±0, or θ0 plus multiples of 0.5: signed
    zeros, exact cancellations (Σ τ̂ = 0) and magnitudes tied with a threshold."""
    theta0 = torch.where(torch.rand(n, generator=g) < 0.5, torch.tensor(-0.0), torch.tensor(0.0))
    theta0 = torch.where(torch.rand(n, generator=g) < 0.3, torch.randint(-2, 3, (n,), generator=g).float(), theta0)
    thetas = []
    for _ in range(experts):
        x = theta0 + torch.randint(-2, 3, (n,), generator=g).float() * 0.5
        x = torch.where(torch.rand(n, generator=g) < 0.2, theta0, x)
        x = torch.where(torch.rand(n, generator=g) < 0.1, torch.tensor(-0.0), x)
        thetas.append(x.to(dtype))
    return theta0.to(dtype), thetas


def ties_masked(theta0, experts, thresholds, disjoint, scale):
    """TIES for one tensor written plainly, with boolean masks and selection."""
    pos_sum, neg_sum = torch.zeros_like(theta0), torch.zeros_like(theta0)
    pos_count, neg_count = torch.zeros_like(theta0), torch.zeros_like(theta0)
    for ft, thr in zip(experts, thresholds):
        tau = ft - theta0
        tau = tau.masked_fill_(tau.abs() < thr, 0)
        pos_sum.add_(tau.clamp(min=0))
        neg_sum.add_(tau.clamp(max=0))
        pos_count.add_(tau > 0)
        neg_count.add_(tau < 0)
    sign = (pos_sum + neg_sum).sign_()
    if disjoint == "mean":
        pos_sum.div_(pos_count.clamp_(min=1))
        neg_sum.div_(neg_count.clamp_(min=1))
    merged = torch.where(sign > 0, pos_sum, torch.where(sign < 0, neg_sum, 0.0))
    return merged.mul_(scale).add_(theta0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("disjoint", ["mean", "sum"])
@pytest.mark.parametrize("thresholds", [[0.0] * 4, [0.5, 1.0, 0.5, 1.5], [float("inf"), 0.5, 0.0, 1.0]])
def test_ties_tensor_equals_the_masked_form_bit_for_bit(path, dtype, disjoint, thresholds):
    which, ran = path
    g = torch.Generator().manual_seed(4)
    for scale in (0.7, -0.3, 1.0):
        theta0, thetas = hard_case(g, dtype=dtype)
        got = ties_merge_tensor(theta0, iter(thetas), thresholds, disjoint, scale)
        assert torch.equal(bits(got), bits(ties_masked(theta0, thetas, thresholds, disjoint, scale)))
    assert (torch.signbit(theta0) & (theta0 == 0)).any()  # the case has −0s
    assert ("ties_fold" in ran and "ties_finish" in ran) == (which == "fused")


@pytest.mark.parametrize("disjoint", ["mean", "sum"])
def test_ties_tensor_where_the_sums_overflow(path, disjoint):
    """Sums past float32's range: ±inf, which the torch code selects around (inf·0 is NaN)."""
    big = torch.tensor([3e38, -3e38, 3e38, 1.0, -0.0, 2e38])
    theta0 = torch.zeros(6)
    thetas = [big, big.clone(), -big, big * 0.5]
    got = ties_merge_tensor(theta0, iter(thetas), [0.5] * 4, disjoint, 1.0)
    assert torch.isinf(got).any()
    assert torch.equal(bits(got), bits(ties_masked(theta0, thetas, [0.5] * 4, disjoint, 1.0)))


def test_the_torch_path_runs_for_what_the_loops_cannot_take():
    """bfloat16 and non-contiguous tensors, and mixed dtypes, go through torch."""
    x = torch.zeros(4, 4)
    assert kernels.fusable(x, x.clone()) and kernels.fusable(x.double(), x.double())
    assert not kernels.fusable(x.bfloat16(), x.bfloat16())
    assert not kernels.fusable(x, x.T)  # a transposed view
    assert not kernels.fusable(x, x.double())
    assert not kernels.fusable(torch.zeros(4, dtype=torch.int64))
    assert not kernels.fusable(x.to("meta"), x.to("meta"))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:  # GPU memory is predicted on fake tensors: no memory to loop over
        fake = mode.from_tensor(x)
        assert fake.device.type == "cpu" and not kernels.fusable(fake, fake)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("drop_rate", [0.0, 0.6, 0.9])
def test_dare_tensor_equals_the_masked_form_bit_for_bit(path, dtype, drop_rate):
    which, ran = path
    g = torch.Generator().manual_seed(5)
    theta0, thetas = hard_case(g, experts=3, dtype=dtype)
    for t, x in enumerate(thetas):
        for offset in (0, 7):  # a piece of a longer key draws the key's mask there
            keep = dare_keep_mask(theta0.shape, drop_rate, 9, t, "w", offset).bool()
            tau = x - theta0
            expected = tau.masked_fill_(~keep, 0).div_(1.0 - drop_rate).add_(theta0)
            got = dare_tensor(theta0, x, drop_rate, 9, t, "w", offset)
            assert got.dtype == dtype and torch.equal(bits(got), bits(expected))
    assert ("dare_sparse" in ran) == (which == "fused")


@pytest.mark.parametrize("capacity", [10**6, 50])  # everything kept, or binned (the histogram passes)
def test_the_fused_count_and_keep_finds_the_torch_threshold(path, capacity):
    which, ran = path
    g = torch.Generator().manual_seed(6)
    theta0, thetas = hard_case(g, n=20000, experts=1)
    theta0, expert = theta0.reshape(100, 200), thetas[0].reshape(100, 200)
    magnitudes = (expert - theta0).abs().reshape(-1)
    for k in (1, 500, 4000, 19999):
        selection = KthLargest(k, torch.float32, capacity)
        selection.bracket(*sample_bracket(magnitudes[::7].numpy(), magnitudes.numel(), k))
        while not selection.done:
            for rows in (slice(0, 37), slice(37, 100)):  # in chunks, as a merge observes keys
                observe_magnitudes(selection, theta0[rows].contiguous(), expert[rows].contiguous(), torch.float32)
            selection.end_pass()
        assert selection.value == torch.topk(magnitudes, k).values[-1].item()
    assert ("magnitudes_between" in ran) == (which == "fused")


def test_count_and_keep_on_a_hand_example():
    theta0 = torch.zeros(7)
    expert = torch.tensor([0.5, -2.0, 1.0, -1.0, 3.0, 0.0, -0.75])
    out = np.empty(7, dtype=np.float32)
    above, inside = kernels.magnitudes_between(theta0, expert, 0.75, 2.0, out)
    assert above == 2 and inside.tolist() == [1.0, 1.0, 0.75]  # |−2| and 3 at or above 2; [0.75, 2) kept in order
    with pytest.raises(ValueError, match="7 entries"):
        kernels.magnitudes_between(theta0, expert, 0.75, 2.0, np.empty(6, dtype=np.float32))


def test_blocks_in_threads_change_no_bit(monkeypatch):
    """A tensor split into blocks, each looped over in its own thread, gives the one loop's bits
    (and the kept magnitudes in the same order)."""
    g = torch.Generator().manual_seed(7)
    theta0, thetas = hard_case(g, n=5000, experts=3)
    spread = theta0 + 2 * torch.rand(theta0.shape, generator=g) - 1  # distinct magnitudes: their order shows
    magnitudes_at = {}
    results = {}
    for threads in (1, 3):
        monkeypatch.setattr(kernels, "MIN_BLOCK", 1000)
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        assert len(kernels._blocks(theta0.numel())) == threads
        merged = ties_merge_tensor(theta0, iter(thetas), [0.5, 1.0, 0.5], "mean", 0.3)
        sparse = dare_tensor(theta0, thetas[0], 0.6, 1, 0, "w")
        out = np.empty(theta0.numel(), dtype=np.float32)
        magnitudes_at[threads] = kernels.magnitudes_between(theta0, spread, 0.5, 0.9, out)
        results[threads] = (bits(merged), bits(sparse))
    assert all(torch.equal(a, b) for a, b in zip(results[1], results[3]))
    (above_1, kept_1), (above_3, kept_3) = magnitudes_at[1], magnitudes_at[3]
    assert above_1 == above_3 and np.array_equal(kept_1, kept_3) and kept_1.size > 0


def test_dare_ties_refuses_a_sparsified_entry_that_overflows(path):
    """τ/(1 − p) past float32's range: refused with the task and key named, whether the fused
    loop applies the mask or the sparse tensor is formed first."""
    which, ran = path
    from lib.merging.dare import SparseExpert

    theta0 = torch.zeros(64)
    fine, huge = torch.full((64,), 0.5), torch.full((64,), 3e38)  # finite; 3e38 / (1 − 0.9) is not
    experts = [SparseExpert(theta0, x, 0.9, 0, t, "layer.weight") for t, x in enumerate([fine, huge])]
    with pytest.raises(ValueError, match=r"DARE's finetuned\[1\].*layer\.weight"):
        ties_merge_tensor(theta0, iter(experts), [0.1, 0.1])
    assert ("ties_fold" in ran) == (which == "fused")
