"""Behaviour of the closed-form merges in lib/merging/ (METHODS.md, section 1)."""
from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path

import pytest
import torch

from lib import merging as M

SHAPES = {"a.weight": (4, 3), "a.bias": (4,), "b.weight": (5, 4)}


def make_sd(seed: int, dtype=torch.float32, shift: float = 0.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {k: (torch.randn(s, generator=g) + shift).to(dtype) for k, s in SHAPES.items()}
    sd["bn.num_batches_tracked"] = torch.tensor(seed, dtype=torch.int64)
    return sd


def make_bn_sd(seed: int, theta0_seed: int | None = None) -> dict[str, torch.Tensor]:
    """``make_sd`` plus BatchNorm buffers whose shifts from θ0's are large (they would win any
    top-k ranking) and sum to more than θ0's running variance (Task Arithmetic at λ = 1 would
    make it negative)."""
    sd = make_sd(seed)
    g = torch.Generator().manual_seed(3000 + seed)
    if theta0_seed is None:  # the pretrained model
        sd["bn.running_mean"] = torch.zeros(4)
        sd["bn.running_var"] = torch.ones(4)
    else:
        sd["bn.running_mean"] = 50.0 + 10.0 * torch.rand(4, generator=g)
        sd["bn.running_var"] = 0.1 + 0.2 * torch.rand(4, generator=g)  # shift ≈ −0.8 each
    return sd


BUFFERS = ("bn.running_mean", "bn.running_var")


def _strip(sd):
    return {k: v for k, v in sd.items() if k not in BUFFERS}


def make_stats(seed: int, like: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return {k: torch.rand(v.shape, generator=g) + 0.1 for k, v in like.items() if v.is_floating_point()}


GRAM_ROWS = 20


def make_grams(seed: int, rows: int = GRAM_ROWS) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2000 + seed)
    out = {}
    for k in ("a.weight", "b.weight"):
        x = torch.randn(rows, SHAPES[k][1], generator=g)
        out[k] = x.T @ x
    return out


def gram_counts(rows: int = GRAM_ROWS) -> dict[str, int]:
    return {"a.weight": rows, "b.weight": rows}


def assert_sd_close(a, b, **tol):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m: f"{k}: {m}")


def clone(x):
    if isinstance(x, dict):
        return {k: clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clone(v) for v in x]
    return x.clone() if isinstance(x, torch.Tensor) else x


def assert_equal_deep(a, b):
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_equal_deep(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_equal_deep(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


# ------------------------------------------------------------------ merging one model


def test_single_model_is_returned_unchanged():
    theta0, theta1 = make_sd(0), make_sd(1)
    fisher, gram = make_stats(1, theta1), make_grams(1)
    h0 = {k: torch.zeros_like(v) for k, v in fisher.items()}
    tol = dict(rtol=1e-5, atol=1e-5)
    assert_sd_close(M.weight_average([theta1]), theta1)
    assert_sd_close(M.fisher_merging([theta1], [fisher]), theta1, **tol)
    assert_sd_close(M.regmean([theta1], [gram], alpha=0.9, counts=[gram_counts()]), theta1, **tol)
    assert_sd_close(M.task_arithmetic(theta0, [theta1], 1.0) | _nbt(theta1), theta1, **tol)
    assert_sd_close(M.ties_merging(theta0, [theta1], density=1.0, scale=1.0) | _nbt(theta1), theta1, **tol)
    assert_sd_close(M.gradient_matching(theta0, [theta1], [fisher], h0) | _nbt(theta1), theta1, **tol)


def _nbt(sd):
    """Non-floating tensors come from the pretrained model; overwrite them to compare."""
    return {k: v for k, v in sd.items() if not v.is_floating_point()}


def test_non_floating_tensors_come_from_first_or_pretrained_model():
    theta0, thetas = make_sd(0), [make_sd(1), make_sd(2)]
    for merged in (M.task_arithmetic(theta0, thetas, 0.3), M.ties_merging(theta0, thetas),
                   M.gradient_matching(theta0, thetas, [make_stats(1, thetas[0])] * 2, make_stats(0, theta0))):
        assert merged["bn.num_batches_tracked"].item() == 0
    assert M.weight_average(thetas)["bn.num_batches_tracked"].item() == 1
    assert M.slerp(thetas[1], thetas[0])["bn.num_batches_tracked"].item() == 2


# ------------------------------------------------------------------ inputs untouched


def _all_calls():
    theta0, thetas = make_bn_sd(0), [make_bn_sd(1, 0), make_bn_sd(2, 0)]
    fishers = [_strip(make_stats(1, thetas[0])), _strip(make_stats(2, thetas[0]))]  # buffers have none
    grams = [make_grams(1), make_grams(2)]
    h0 = _strip(make_stats(0, theta0))
    return {
        "weight_average": (M.weight_average, (thetas, [1.0, 2.0])),
        "task_vectors": (M.task_vectors, (theta0, thetas)),
        "task_arithmetic": (M.task_arithmetic, (theta0, thetas, 0.3)),
        "ties_mean": (M.ties_merging, (theta0, thetas, 0.5, 1.0, "mean")),
        "ties_sum": (M.ties_merging, (theta0, thetas, 0.5, 0.3, "sum")),
        "ties_trim_and_elect": (M.ties_trim_and_elect, (theta0, thetas, 0.5)),
        "dare": (M.dare, (theta0, thetas, 0.5, 0)),
        "fisher": (M.fisher_merging, (thetas, fishers)),
        "regmean": (lambda *a: M.regmean(*a, counts=[gram_counts()] * 2, ridge=1e-3), (thetas, grams, 0.9)),
        "gradient_matching": (M.gradient_matching, (theta0, thetas, fishers, h0, 0.7)),
        "slerp": (M.slerp, (thetas[0], thetas[1], 0.3)),
        "task_vector_apply": (lambda tv, sd: tv.apply_to(sd, 0.5), (M.TaskVector(theta0, thetas[0]), theta0)),
    }


@pytest.mark.parametrize("name", list(_all_calls()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inputs_are_not_modified(name, dtype):
    fn, args = _all_calls()[name]
    # The statistics stay float32; the models take the dtype under test.
    args = tuple(_cast_models(a, dtype) for a in args)
    before = clone([a for a in args if not isinstance(a, (int, float, str, M.TaskVector))])
    result = fn(*args)
    after = [a for a in args if not isinstance(a, (int, float, str, M.TaskVector))]
    assert_equal_deep(before, after)
    # Outputs are fresh tensors: writing to them leaves the inputs alone.
    for sd in result if isinstance(result, list) else [result]:
        for v in sd.values():
            v.add_(1) if v.is_floating_point() else v.fill_(-7)
    assert_equal_deep(before, after)


def _cast_models(a, dtype):
    def is_model(sd):
        return isinstance(sd, dict) and "a.bias" in sd and "bn.num_batches_tracked" in sd

    if is_model(a):
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in a.items()}
    if isinstance(a, list) and a and is_model(a[0]):
        return [_cast_models(sd, dtype) for sd in a]
    return a


def test_half_precision_is_computed_in_float32_and_returned_in_input_dtype():
    theta0, thetas = make_sd(0), [make_sd(1), make_sd(2)]
    bf = lambda sd: {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}
    low = M.task_arithmetic(bf(theta0), [bf(t) for t in thetas], 0.3)
    ref = M.task_arithmetic(
        {k: v.float() if v.is_floating_point() else v for k, v in bf(theta0).items()},
        [{k: v.float() if v.is_floating_point() else v for k, v in bf(t).items()} for t in thetas], 0.3)
    assert all(v.dtype == torch.bfloat16 for k, v in low.items() if k != "bn.num_batches_tracked")
    assert_sd_close(low, bf(ref))


# ------------------------------------------------------------------ Task Arithmetic


def test_task_arithmetic_and_task_vector_class_agree():
    theta0, thetas = make_sd(0), [make_sd(1), make_sd(2), make_sd(3)]
    ta = M.task_arithmetic(theta0, thetas, 0.3)
    tvs = [M.TaskVector(theta0, t) for t in thetas]
    assert_sd_close(sum(tvs).apply_to(theta0, 0.3), ta, rtol=1e-6, atol=1e-6)
    assert_sd_close((0.3 * sum(tvs)).apply_to(theta0), ta, rtol=1e-6, atol=1e-6)
    # τ1 − τ2 + τ2 = τ1 and −τ undoes τ.
    back = (tvs[0] - tvs[1] + tvs[1]).apply_to(theta0)
    assert_sd_close(back | _nbt(thetas[0]), thetas[0], rtol=1e-6, atol=1e-6)
    assert_sd_close((-tvs[0]).apply_to(thetas[0]) | _nbt(theta0), theta0, rtol=1e-6, atol=1e-6)
    listed = M.task_vectors(theta0, thetas)
    assert set(listed[0]) == set(SHAPES)  # non-floating keys are not task vector entries
    torch.testing.assert_close(listed[1]["a.weight"], thetas[1]["a.weight"] - theta0["a.weight"])


# ------------------------------------------------------------------------------ TIES


def _from_taus(theta0, taus):
    return [{k: theta0[k] + tau[k] for k in tau} for tau in taus]


def test_ties_mean_and_sum_on_a_hand_example():
    theta0 = {"w": torch.zeros(4)}
    taus = [[1.0, 2.0, -3.0, 1.0], [3.0, -1.0, -1.0, 1.0], [0.0, 0.0, 0.0, -1.5]]
    thetas = _from_taus(theta0, [{"w": torch.tensor(t)} for t in taus])
    # Elected signs (+, +, −, +); agreeing entries: {1, 3}, {2}, {−3, −1}, {1, 1}. The last
    # entry's sign comes from the sum (2 − 1.5 > 0), not from the means (1 − 1.5 < 0).
    mean = M.ties_merging(theta0, thetas, density=1.0, disjoint="mean")["w"]
    total = M.ties_merging(theta0, thetas, density=1.0, scale=0.5, disjoint="sum")["w"]
    torch.testing.assert_close(mean, torch.tensor([2.0, 2.0, -2.0, 1.0]))
    torch.testing.assert_close(total, 0.5 * torch.tensor([4.0, 2.0, -4.0, 2.0]))


def _ties_reference(theta0, thetas, density, disjoint):
    """Dense TIES over the flattened concatenation, as in the TIES authors' code."""
    keys = list(SHAPES)
    flat = lambda sd: torch.cat([sd[k].flatten() for k in keys])
    taus = torch.stack([flat(t) - flat(theta0) for t in thetas])
    n_keep = round(density * taus.shape[1])
    threshold = taus.abs().topk(n_keep, dim=1).values[:, -1:]
    taus = taus * (taus.abs() >= threshold)
    sign = taus.sum(0).sign()
    selected = taus * torch.where(sign > 0, taus > 0, taus < 0)
    merged = selected.sum(0)
    if disjoint == "mean":
        merged = merged / (selected != 0).sum(0).clamp(min=1)
    out, offset = {}, 0
    for k in keys:
        out[k] = theta0[k] + merged[offset:offset + theta0[k].numel()].view(theta0[k].shape)
        offset += theta0[k].numel()
    return out


@pytest.mark.parametrize("disjoint", ["mean", "sum"])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_a_dense_reference(density, disjoint):
    theta0, thetas = make_sd(0), [make_sd(s) for s in (1, 2, 3, 4)]
    merged = M.ties_merging(theta0, thetas, density=density, disjoint=disjoint)
    reference = _ties_reference(theta0, thetas, density, disjoint)
    for k in SHAPES:
        torch.testing.assert_close(merged[k], reference[k], rtol=1e-5, atol=1e-6)


def test_ties_density_one_sum_equals_task_arithmetic_exactly_where_signs_agree():
    g = torch.Generator().manual_seed(0)
    theta0 = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    magnitude = lambda s: torch.rand(s, generator=g) + 0.5  # bounded away from 0
    sign = lambda s: torch.randint(0, 2, s, generator=g) * 2.0 - 1
    tau1 = {k: sign(s) * magnitude(s) for k, s in SHAPES.items()}
    conflict = {k: torch.rand(s, generator=g) < 0.3 for k, s in SHAPES.items()}
    tau2 = {k: torch.where(conflict[k], -1.0, 1.0) * tau1[k].sign() * magnitude(s) for k, s in SHAPES.items()}
    thetas = _from_taus(theta0, [tau1, tau2])
    ties = M.ties_merging(theta0, thetas, density=1.0, scale=1.0, disjoint="sum")
    ta = M.task_arithmetic(theta0, thetas, 1.0)
    for k in SHAPES:
        c = conflict[k]
        assert c.any() and (~c).any()
        torch.testing.assert_close(ties[k][~c], ta[k][~c])
        assert ((ties[k][c] - ta[k][c]).abs() > 0.1).all()  # the outvoted τ is dropped
        # At a conflict only the larger-magnitude task vector survives.
        winner = torch.where(tau1[k].abs() > tau2[k].abs(), tau1[k], tau2[k])
        torch.testing.assert_close(ties[k][c], (theta0[k] + winner)[c])


def test_ties_trim_ranks_globally_across_tensors():
    # Tensor "big" holds the 6 largest |τ| overall; per-tensor ranking at density 0.5 would
    # instead keep half of each tensor.
    theta0 = {"big": torch.zeros(6), "small": torch.zeros(6)}
    tau = {"big": torch.tensor([10.0, -11, 12, -13, 14, 15]), "small": torch.tensor([0.1, -0.2, 0.3, 0.4, -0.5, 0.6])}
    (theta1,) = _from_taus(theta0, [tau])
    merged = M.ties_merging(theta0, [theta1], density=0.5, scale=1.0)
    torch.testing.assert_close(merged["big"], tau["big"])
    torch.testing.assert_close(merged["small"], torch.zeros(6))
    (trimmed,) = M.ties_trim_and_elect(theta0, [theta1], density=0.5)
    assert_sd_close(trimmed, {"big": tau["big"], "small": torch.zeros(6)})
    # Density 0.25 of 12 entries keeps the top 3: 15, 14, −13.
    kept = M.ties_merging(theta0, [theta1], density=0.25)["big"]
    torch.testing.assert_close(kept, torch.tensor([0.0, 0, 0, -13, 14, 15]))


def test_ties_trim_and_elect_sums_to_the_sum_merge():
    theta0, thetas = make_sd(0), [make_sd(1), make_sd(2), make_sd(3)]
    parts = M.ties_trim_and_elect(theta0, thetas, density=0.4)
    merged = M.ties_merging(theta0, thetas, density=0.4, scale=0.3, disjoint="sum")
    for k in SHAPES:
        torch.testing.assert_close(merged[k], theta0[k] + 0.3 * sum(p[k] for p in parts))
        nonzero = torch.stack([p[k] != 0 for p in parts])
        signs = torch.stack([p[k].sign() for p in parts])
        # Surviving entries all share one sign per position.
        assert ((signs * nonzero).abs().sum(0) == (signs * nonzero).sum(0).abs()).all()


def test_ties_rejects_bad_arguments():
    theta0, thetas = make_sd(0), [make_sd(1)]
    with pytest.raises(ValueError, match="disjoint"):
        M.ties_merging(theta0, thetas, disjoint="median")
    with pytest.raises(ValueError, match="density"):
        M.ties_merging(theta0, thetas, density=1.5)


# ------------------------------------------------------------------------------ DARE


def _dare_setup():
    g = torch.Generator().manual_seed(0)
    theta0 = {"w": torch.randn(100, 100, generator=g)}
    tau = torch.randn(100, 100, generator=g)
    return theta0, [{"w": theta0["w"] + tau}], tau


def test_dare_drops_the_right_fraction_and_rescales():
    theta0, thetas, tau = _dare_setup()
    p, n = 0.7, tau.numel()
    (sparse,) = M.dare(theta0, thetas, drop_rate=p, seed=3)
    new_tau = sparse["w"] - theta0["w"]
    kept = new_tau.abs() > 1e-6
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    torch.testing.assert_close(new_tau[kept], tau[kept] / (1 - p), rtol=1e-4, atol=1e-4)


def test_dare_is_unbiased_deterministic_and_seed_dependent():
    theta0, thetas, tau = _dare_setup()
    p, seeds = 0.5, 200
    mean = sum(M.dare(theta0, thetas, p, s)[0]["w"] - theta0["w"] for s in range(seeds)) / seeds
    # Per entry the estimate has std |τ|·sqrt(p/(1−p)/seeds); average the error over entries.
    rel_err = ((mean - tau) / tau.abs().clamp(min=1e-3)).abs().mean().item()
    assert rel_err < 3 * math.sqrt(p / (1 - p) / seeds)
    assert torch.equal(M.dare(theta0, thetas, p, 7)[0]["w"], M.dare(theta0, thetas, p, 7)[0]["w"])
    assert not torch.equal(M.dare(theta0, thetas, p, 7)[0]["w"], M.dare(theta0, thetas, p, 8)[0]["w"])
    # Two tasks with one seed get different masks; drop_rate 0 is the identity.
    two = M.dare(theta0, thetas * 2, p, 7)
    assert not torch.equal(two[0]["w"], two[1]["w"])
    torch.testing.assert_close(M.dare(theta0, thetas, 0.0, 7)[0]["w"], thetas[0]["w"])
    with pytest.raises(ValueError, match="drop_rate"):
        M.dare(theta0, thetas, 1.0, 0)


def test_dare_mask_does_not_depend_on_other_keys():
    theta0, thetas = make_sd(0), [make_sd(1)]
    full = M.dare(theta0, thetas, 0.5, 0)[0]
    only = M.dare({"b.weight": theta0["b.weight"]}, [{"b.weight": thetas[0]["b.weight"]}], 0.5, 0)[0]
    assert torch.equal(full["b.weight"], only["b.weight"])


# -------------------------------------------------------------------- Fisher merging


def test_fisher_merging_equal_fishers_is_the_average_and_weights_matter():
    thetas = [make_sd(1), make_sd(2), make_sd(3)]
    fisher = make_stats(0, thetas[0])
    assert_sd_close(M.fisher_merging(thetas, [fisher] * 3), M.weight_average(thetas), rtol=1e-5, atol=1e-6)
    w = [1.0, 0.0, 3.0]
    assert_sd_close(M.fisher_merging(thetas, [fisher] * 3, weights=w), M.weight_average(thetas, w),
                    rtol=1e-5, atol=1e-6)


def test_fisher_merging_formula_zero_fisher_fallback_and_missing_keys():
    thetas = [make_sd(1), make_sd(2)]
    f1, f2 = make_stats(1, thetas[0]), make_stats(2, thetas[0])
    f1["a.bias"] = torch.zeros(4)
    f2["a.bias"] = torch.tensor([0.0, 0.0, 1.0, 2.0])
    del f1["b.weight"], f2["b.weight"]
    merged = M.fisher_merging(thetas, [f1, f2])
    k = "a.weight"
    torch.testing.assert_close(merged[k], (f1[k] * thetas[0][k] + f2[k] * thetas[1][k]) / (f1[k] + f2[k]))
    avg = (thetas[0]["a.bias"] + thetas[1]["a.bias"]) / 2
    torch.testing.assert_close(merged["a.bias"][:2], avg[:2])  # all-zero Fisher: the average
    torch.testing.assert_close(merged["a.bias"][2:], thetas[1]["a.bias"][2:])  # only model 2 informs
    torch.testing.assert_close(merged["b.weight"], (thetas[0]["b.weight"] + thetas[1]["b.weight"]) / 2)
    del f1["a.weight"]
    with pytest.raises(ValueError, match="a.weight"):
        M.fisher_merging(thetas, [f1, f2])


# --------------------------------------------------------------------------- RegMean


def test_regmean_with_alpha_one_is_least_squares_on_pooled_data():
    g = torch.Generator().manual_seed(0)
    d_in, d_out = 6, 3
    xs = [torch.randn(n, d_in, generator=g, dtype=torch.float64) for n in (30, 20)]
    ws = [torch.randn(d_out, d_in, generator=g, dtype=torch.float64) for _ in xs]
    biases = [torch.randn(d_out, generator=g, dtype=torch.float64) for _ in xs]
    models = [{"lin.weight": w, "lin.bias": b} for w, b in zip(ws, biases)]
    grams = [{"lin.weight": x.T @ x} for x in xs]
    merged = M.regmean(models, grams, alpha=1.0, gram_normalization="sum")
    x_all = torch.cat(xs)
    y_all = torch.cat([x @ w.T for x, w in zip(xs, ws)])
    lstsq = torch.linalg.lstsq(x_all, y_all).solution.T
    torch.testing.assert_close(merged["lin.weight"], lstsq)
    torch.testing.assert_close(merged["lin.bias"], (biases[0] + biases[1]) / 2)  # no Gram: averaged


def test_regmean_shrinks_off_diagonals_and_validates_gram_shapes():
    thetas = [make_sd(1), make_sd(2)]
    grams = [make_grams(1), make_grams(2)]
    # alpha = 0 keeps only diag(G): each input column is an independent, diag-weighted mean.
    merged = M.regmean(thetas, grams, alpha=0.0, counts=[gram_counts()] * 2)
    d1, d2 = (torch.diagonal(g["a.weight"]) for g in grams)
    expected = (thetas[0]["a.weight"] * d1 + thetas[1]["a.weight"] * d2) / (d1 + d2)
    torch.testing.assert_close(merged["a.weight"], expected)
    bad = [dict(g) for g in grams]
    bad[1]["b.weight"] = torch.eye(5)
    with pytest.raises(ValueError, match="b.weight"):
        M.regmean(thetas, bad, gram_normalization="sum")
    with pytest.raises(ValueError, match="a.bias"):
        M.regmean(thetas, [g | {"a.bias": torch.eye(4)} for g in grams], gram_normalization="sum")


# ----------------------------------------------------------------- gradient matching


def _gm_setup():
    theta0 = {k: v.double() for k, v in make_sd(0).items() if v.is_floating_point()}
    thetas = [{k: v.double() for k, v in make_sd(s).items() if v.is_floating_point()} for s in (1, 2, 3)]
    hs = [{k: v.double() for k, v in make_stats(s, theta0).items()} for s in (1, 2, 3)]
    return theta0, thetas, hs


def test_gradient_matching_reduces_to_weight_averaging():
    theta0, thetas, hs = _gm_setup()
    zero = {k: torch.zeros_like(v) for k, v in theta0.items()}
    merged = M.gradient_matching(theta0, thetas, [hs[0]] * 3, zero, scale=1.0)
    assert_sd_close(merged, M.weight_average(thetas), rtol=1e-9, atol=1e-9)


def test_gradient_matching_reduces_to_task_arithmetic():
    theta0, thetas, hs = _gm_setup()
    huge = {k: torch.full_like(v, 1e10) for k, v in theta0.items()}
    for scale in (0.3, 1.0):
        merged = M.gradient_matching(theta0, thetas, hs, huge, scale=scale)
        assert_sd_close(merged, M.task_arithmetic(theta0, thetas, scale), rtol=1e-7, atol=1e-7)


def test_gradient_matching_reduces_to_fisher_merging_and_falls_back_to_ta():
    theta0, thetas, hs = _gm_setup()
    zero = {k: torch.zeros_like(v) for k, v in theta0.items()}
    merged = M.gradient_matching(theta0, thetas, hs, zero, scale=1.0)
    assert_sd_close(merged, M.fisher_merging(thetas, hs), rtol=1e-9, atol=1e-9)
    # Keys with no Hessian anywhere: Task Arithmetic with the same scale.
    drop = lambda d: {k: v for k, v in d.items() if k != "a.bias"}
    merged = M.gradient_matching(theta0, thetas, [drop(h) for h in hs], drop(zero), scale=0.4)
    torch.testing.assert_close(merged["a.bias"], M.task_arithmetic(theta0, thetas, 0.4)["a.bias"])
    with pytest.raises(ValueError, match="a.bias"):
        M.gradient_matching(theta0, thetas, [drop(hs[0]), hs[1], hs[2]], zero)


# ----------------------------------------------------------------------------- SLERP


def test_slerp_endpoints_norm_preservation_and_colinear_fallback():
    a, b = make_sd(1), make_sd(2)
    assert_sd_close(M.slerp(a, b, 0.0), a, rtol=1e-5, atol=1e-5)
    assert_sd_close(M.slerp(a, b, 1.0) | _nbt(b), b, rtol=1e-5, atol=1e-5)
    # Orthogonal vectors of equal norm stay on the circle: norm preserved, angle t·π/2.
    u, v = {"w": torch.tensor([3.0, 0.0])}, {"w": torch.tensor([0.0, 3.0])}
    for t in (0.1, 0.5, 0.8):
        w = M.slerp(u, v, t)["w"]
        torch.testing.assert_close(w.norm(), torch.tensor(3.0))
        torch.testing.assert_close(w, 3.0 * torch.tensor([math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)]))
    # Colinear (same or opposite direction): linear interpolation.
    x = {"w": torch.tensor([1.0, 2.0, 3.0])}
    for c in (2.0, -1.0):
        y = {"w": c * x["w"]}
        torch.testing.assert_close(M.slerp(x, y, 0.25)["w"], 0.75 * x["w"] + 0.25 * y["w"])
    zero = {"w": torch.zeros(3)}
    torch.testing.assert_close(M.slerp(zero, x, 0.5)["w"], 0.5 * x["w"])


# ------------------------------------------------------------------------- validation


@pytest.mark.parametrize("method", ["weight_average", "task_arithmetic", "ties", "fisher", "regmean",
                                    "gradient_matching", "slerp", "dare"])
def test_mismatched_keys_shapes_and_dtypes_raise_naming_the_key(method):
    good, other = make_sd(0), make_sd(1)
    bad_shape = other | {"a.bias": torch.zeros(5)}
    bad_dtype = other | {"a.bias": other["a.bias"].double()}
    bad_keys = {k: v for k, v in other.items() if k != "b.weight"}
    fisher = make_stats(0, good)
    grams = make_grams(0)

    def call(second):
        if method == "weight_average":
            return M.weight_average([good, second])
        if method == "fisher":
            return M.fisher_merging([good, second], [fisher, fisher])
        if method == "regmean":
            return M.regmean([good, second], [grams, grams], counts=[gram_counts()] * 2)
        if method == "slerp":
            return M.slerp(good, second)
        if method == "gradient_matching":
            return M.gradient_matching(good, [second], [fisher], fisher)
        if method == "dare":
            return M.dare(good, [second], 0.5, 0)
        return M.MERGE_METHODS[method](good, [second], 1.0)

    for second, key in ((bad_shape, "a.bias"), (bad_dtype, "a.bias"), (bad_keys, "b.weight")):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            call(second)


def test_empty_inputs_raise():
    theta0 = make_sd(0)
    with pytest.raises(ValueError, match="empty"):
        M.weight_average([])
    with pytest.raises(ValueError, match="empty"):
        M.task_arithmetic(theta0, [], 1.0)
    with pytest.raises(ValueError, match="empty"):
        M.ties_merging(theta0, [])
    with pytest.raises(ValueError, match="empty"):
        M.fisher_merging([], [])


def test_registry_names_the_merges():
    for name, fn in M.MERGE_METHODS.items():
        assert fn is getattr(M, {"ties": "ties_merging", "fisher": "fisher_merging"}.get(name, name))
    assert set(M.MERGE_METHODS) >= {"weight_average", "task_arithmetic", "ties", "fisher", "regmean",
                                    "gradient_matching", "slerp"}


# --------------------------------------------------------------------------- buffers
# METHODS.md §1: BatchNorm running statistics get the average over the models in every
# method; they are never trimmed, sign-elected, dropped or rescaled.

def _bn_models():
    return make_bn_sd(0), [make_bn_sd(1, 0), make_bn_sd(2, 0)]


def _buffer_merges(theta0, thetas):
    """Every merge of ``thetas`` (2 models), by name, as a call to make."""
    fishers = [make_stats(1, thetas[0]), make_stats(2, thetas[0])]  # Fishers for buffers too
    grams = [make_grams(1), make_grams(2)]
    registry = {f"registry {name}": (lambda m=method: m(theta0, thetas, _registry_stats(theta0, thetas),
                                                          **{h: grid[-1] for h, grid in m.tuned.items()}))
                for name, method in M.REGISTRY.items()}
    return {
        "weight_average": lambda: M.weight_average(thetas),
        "task_arithmetic": lambda: M.task_arithmetic(theta0, thetas, 1.0),
        "ties_mean": lambda: M.ties_merging(theta0, thetas, density=0.2),
        "ties_sum": lambda: M.ties_merging(theta0, thetas, density=0.2, scale=1.0, disjoint="sum"),
        "dare_ta": lambda: M.task_arithmetic(theta0, M.dare(theta0, thetas, 0.5, 0), 1.0),
        "fisher": lambda: M.fisher_merging(thetas, fishers),
        "regmean": lambda: M.regmean(thetas, grams, counts=[gram_counts()] * 2),
        "slerp": lambda: M.slerp(thetas[0], thetas[1]),
        **registry,
    }


_BUFFER_MERGES = ["weight_average", "task_arithmetic", "ties_mean", "ties_sum", "dare_ta", "fisher", "regmean",
                  "slerp", *(f"registry {name}" for name in M.REGISTRY)]


@pytest.mark.parametrize("method", _BUFFER_MERGES)
def test_every_merge_averages_the_buffers(method):
    theta0, thetas = _bn_models()
    merged = _buffer_merges(theta0, thetas)[method]()
    for k in BUFFERS:
        torch.testing.assert_close(merged[k], (thetas[0][k] + thetas[1][k]) / 2)
    assert (merged["bn.running_var"] > 0).all()


def test_task_arithmetic_no_longer_adds_up_buffer_shifts():
    theta0, thetas = _bn_models()
    merged = M.task_arithmetic(theta0, thetas, 1.0)
    old_rule = theta0["bn.running_var"] + sum(t["bn.running_var"] - theta0["bn.running_var"] for t in thetas)
    assert (old_rule < 0).all()  # the fixture makes the old rule visible ...
    assert (merged["bn.running_var"] > 0).all()  # ... and the buffer rule avoids it
    # The other keys still follow Task Arithmetic.
    torch.testing.assert_close(merged["a.weight"], theta0["a.weight"] + sum(t["a.weight"] - theta0["a.weight"] for t in thetas))


def test_buffers_keyword_chooses_the_buffer_keys():
    theta0, thetas = _bn_models()
    as_buffer = M.task_arithmetic(theta0, thetas, 1.0, buffers=["a.bias"])
    torch.testing.assert_close(as_buffer["a.bias"], (thetas[0]["a.bias"] + thetas[1]["a.bias"]) / 2)
    as_params = M.task_arithmetic(theta0, thetas, 1.0, buffers=[])  # no buffers: TA on every key
    torch.testing.assert_close(as_params["bn.running_var"],
                               thetas[0]["bn.running_var"] + thetas[1]["bn.running_var"] - theta0["bn.running_var"])
    with pytest.raises(ValueError, match="bn.nope"):
        M.task_arithmetic(theta0, thetas, 1.0, buffers=["bn.nope"])


def test_slerp_interpolates_buffers_linearly():
    a, b = make_bn_sd(1, 0), make_bn_sd(2, 0)
    merged = M.slerp(a, b, 0.25)
    for k in BUFFERS:
        torch.testing.assert_close(merged[k], 0.75 * a[k] + 0.25 * b[k])


@pytest.mark.parametrize("density", [0.1, 0.3])
def test_ties_ranking_and_outputs_leave_buffers_out(density):
    theta0, thetas = _bn_models()
    # The buffers' shifts (≈ 50) are the largest |τ| entries: ranked with the rest they would
    # use up the top-k and leave every weight trimmed.
    merged = M.ties_merging(theta0, thetas, density=density)
    assert_sd_close(_strip(merged), M.ties_merging(_strip(theta0), [_strip(t) for t in thetas], density=density))
    parts = M.ties_trim_and_elect(theta0, thetas, density=density)
    plain = M.ties_trim_and_elect(_strip(theta0), [_strip(t) for t in thetas], density=density)
    assert all(set(p) == set(SHAPES) for p in parts)  # no buffer in the τ's
    for p, q in zip(parts, plain):
        assert_sd_close(p, q)


def test_dare_copies_buffers_unchanged():
    theta0, thetas = _bn_models()
    for sparse, ft in zip(M.dare(theta0, thetas, 0.9, 0), thetas):
        for k in BUFFERS:
            assert torch.equal(sparse[k], ft[k])
        assert not torch.equal(sparse["a.weight"], ft["a.weight"])  # the weights were dropped


def test_task_vectors_keep_buffers():
    theta0, thetas = _bn_models()
    (tau,) = M.task_vectors(theta0, thetas[:1])
    torch.testing.assert_close(tau["bn.running_var"], thetas[0]["bn.running_var"] - theta0["bn.running_var"])


# ----------------------------------------------------------------- Fisher: relative floor


@pytest.mark.parametrize("factor", [1e-12, 1e6])
def test_fisher_merging_is_invariant_to_scaling_all_fishers(factor):
    thetas = [make_sd(1), make_sd(2), make_sd(3)]
    fishers = [make_stats(s, thetas[0]) for s in (1, 2, 3)]
    reference = M.fisher_merging(thetas, fishers)
    scaled = M.fisher_merging(thetas, [{k: factor * v for k, v in f.items()} for f in fishers])
    assert_sd_close(scaled, reference, rtol=1e-5, atol=1e-6)


def test_fisher_floor_is_relative_to_the_tensors_fisher_scale():
    thetas = [{"w": torch.tensor([2.0, 4.0])}, {"w": torch.tensor([6.0, 8.0])}]
    fishers = [{"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([1.0, 1.0])}]
    eps = 0.5
    den = torch.tensor([1.0, 2.0])  # Σ wt Ft with wt = 1/2
    num = torch.tensor([0.5 * 2 + 0.5 * 6, 1.5 * 4 + 0.5 * 8])
    merged = M.fisher_merging(thetas, fishers, eps=eps)["w"]
    torch.testing.assert_close(merged, num / (den + eps * den.mean()))


# ------------------------------------------------------------- RegMean: normalisation, ridge


def _regmean_tasks(rows=(40, 10), d_in=5, d_out=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, d_in, generator=g, dtype=torch.float64) for n in rows]
    models = [{"lin.weight": torch.randn(d_out, d_in, generator=g, dtype=torch.float64)} for _ in xs]
    grams = [{"lin.weight": x.T @ x} for x in xs]
    counts = [{"lin.weight": len(x)} for x in xs]
    return xs, models, grams, counts


def _weighted_lstsq(xs, models, row_weights):
    """argmin_W Σt ct ||Xt Wᵀ − Xt Wtᵀ||², by least squares over rows scaled by √ct."""
    x = torch.cat([x * c ** 0.5 for x, c in zip(xs, row_weights)])
    y = torch.cat([x @ m["lin.weight"].T * c ** 0.5 for x, m, c in zip(xs, models, row_weights)])
    return torch.linalg.lstsq(x, y).solution.T


def test_regmean_mean_weighs_tasks_equally_and_sum_by_rows():
    xs, models, grams, counts = _regmean_tasks(rows=(40, 10))
    mean = M.regmean(models, grams, alpha=1.0, counts=counts)["lin.weight"]
    total = M.regmean(models, grams, alpha=1.0, gram_normalization="sum")["lin.weight"]
    torch.testing.assert_close(mean, _weighted_lstsq(xs, models, [1 / len(x) for x in xs]))
    torch.testing.assert_close(total, _weighted_lstsq(xs, models, [1.0, 1.0]))
    assert (mean - total).abs().max() > 1e-3  # different token counts: different merges


def test_regmean_mean_and_sum_agree_for_equal_counts():
    xs, models, grams, counts = _regmean_tasks(rows=(25, 25))
    mean = M.regmean(models, grams, alpha=0.8, counts=counts)["lin.weight"]
    total = M.regmean(models, grams, alpha=0.8, gram_normalization="sum")["lin.weight"]
    torch.testing.assert_close(mean, total)


def test_regmean_ridge_sends_unexcited_directions_to_the_average():
    xs, models, grams, counts = _regmean_tasks(rows=(30, 20), d_in=5)
    dead = 2  # an input no task ever excites (a dead ReLU): zero row and column in every Gram
    for x in xs:
        x[:, dead] = 0
    grams = [{"lin.weight": x.T @ x} for x in xs]
    with pytest.raises(ValueError, match="ridge"):
        M.regmean(models, grams, alpha=1.0, counts=counts)
    merged = M.regmean(models, grams, alpha=1.0, counts=counts, ridge=1e-9)["lin.weight"]
    average = (models[0]["lin.weight"] + models[1]["lin.weight"]) / 2
    torch.testing.assert_close(merged[:, dead], average[:, dead])
    # The excited directions are RegMean's solution without the dead input (up to the ridge).
    live = [j for j in range(5) if j != dead]
    reduced = M.regmean([{"lin.weight": m["lin.weight"][:, live]} for m in models],
                        [{"lin.weight": g["lin.weight"][live][:, live]} for g in grams],
                        alpha=1.0, counts=counts)["lin.weight"]
    torch.testing.assert_close(merged[:, live], reduced, rtol=1e-6, atol=1e-6)


def test_regmean_ridge_interpolates_from_regmean_to_the_average():
    xs, models, grams, counts = _regmean_tasks()
    average = (models[0]["lin.weight"] + models[1]["lin.weight"]) / 2
    plain = M.regmean(models, grams, alpha=0.9, counts=counts)["lin.weight"]
    torch.testing.assert_close(M.regmean(models, grams, alpha=0.9, counts=counts, ridge=1e-12)["lin.weight"], plain)
    torch.testing.assert_close(M.regmean(models, grams, alpha=0.9, counts=counts, ridge=1e9)["lin.weight"], average)
    # In between: the normal equations (ΣG̃ + εI) W*ᵀ = ΣG̃ Wtᵀ + ε W̄ᵀ, ε relative to the Grams.
    ridge = 0.5
    merged = M.regmean(models, grams, alpha=0.9, counts=counts, ridge=ridge)["lin.weight"]
    shrunk = [(0.9 * g["lin.weight"] + 0.1 * torch.diag(g["lin.weight"].diagonal())) / c["lin.weight"]
              for g, c in zip(grams, counts)]
    epsilon = ridge * sum(shrunk).diagonal().mean()
    lhs = (sum(shrunk) + epsilon * torch.eye(5)) @ merged.T
    rhs = sum(s @ m["lin.weight"].T for s, m in zip(shrunk, models)) + epsilon * average.T
    torch.testing.assert_close(lhs, rhs)
    assert (merged - plain).abs().max() > 1e-3 and (merged - average).abs().max() > 1e-3


def test_regmean_in_float32_is_as_accurate_as_rounding_its_float64_answer():
    # Badly conditioned Grams (input scales over three decades) and experts close to each other,
    # as fine-tuned ones are: products in float32 would err ~10× the rounding of W* itself, were
    # they not of the small differences Wt − W1 only.
    g = torch.Generator().manual_seed(0)
    d_in, d_out, tasks = 384, 96, 4
    scales = 10 ** (-3 * torch.rand(d_in, generator=g, dtype=torch.float64))
    xs = [torch.randn(2 * d_in, d_in, generator=g, dtype=torch.float64) * scales for _ in range(tasks)]
    base = 0.02 * torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    models64 = [{"lin.weight": base + 0.002 * torch.randn(d_out, d_in, generator=g, dtype=torch.float64)}
                for _ in xs]
    grams64 = [{"lin.weight": (x.T @ x).float().double()} for x in xs]  # the same Grams in both precisions
    counts = [{"lin.weight": len(x)} for x in xs]
    exact = M.regmean(models64, grams64, counts=counts)["lin.weight"]
    merged = M.regmean([{k: v.float() for k, v in m.items()} for m in models64],
                       [{k: v.float() for k, v in gm.items()} for gm in grams64], counts=counts)["lin.weight"]
    assert merged.dtype == torch.float32
    x = torch.cat(xs)

    def output_error(w):
        return ((x @ (w.double() - exact).T).norm() / (x @ exact.T).norm()).item()
    assert output_error(merged) < 2 * output_error(exact.float())


def test_regmean_rejects_missing_counts_and_bad_options():
    xs, models, grams, counts = _regmean_tasks()
    with pytest.raises(ValueError, match='counts.*gram_normalization="sum"'):
        M.regmean(models, grams)
    with pytest.raises(ValueError, match="gram_normalization"):
        M.regmean(models, grams, gram_normalization="max")
    with pytest.raises(ValueError, match="ridge"):
        M.regmean(models, grams, counts=counts, ridge=-1.0)
    with pytest.raises(ValueError, match="lin.weight"):
        M.regmean(models, grams, counts=[{}, {}])


# -------------------------------------------------------------------------- registry


def _registry_stats(theta0, thetas):
    fishers = [{k: v for k, v in make_stats(s, theta0).items() if k not in BUFFERS} for s in (1, 2)]
    return {
        "fisher": fishers,
        "gram": [make_grams(1, rows=30), make_grams(2, rows=10)],
        "gram_counts": [gram_counts(30), gram_counts(10)],
        "hessian": [{k: 100 * v for k, v in f.items()} for f in fishers],
        "hessian_pretrained": {k: v for k, v in make_stats(0, theta0).items() if k not in BUFFERS},
    }


def _direct_calls(theta0, thetas, stats, scale):
    """What each registry entry must equal, called with the merge functions' own signatures."""
    dare = M.dare(theta0, thetas, 0.7, 0)
    return {
        "weight_average": M.weight_average(thetas),
        "task_arithmetic": M.task_arithmetic(theta0, thetas, scale),
        "ties": M.ties_merging(theta0, thetas, 0.2, scale, "mean"),
        "dare_ta": M.task_arithmetic(theta0, dare, scale),
        "dare_ties": M.ties_merging(theta0, dare, 0.2, scale, "mean"),
        "fisher": M.fisher_merging(thetas, stats["fisher"]),
        "regmean": M.regmean(thetas, stats["gram"], 0.9, counts=stats["gram_counts"]),
        "gradient_matching": M.gradient_matching(theta0, thetas, stats["hessian"], stats["hessian_pretrained"], 1.0),
        "slerp": M.slerp(thetas[0], thetas[1], 0.5),
    }


@pytest.mark.parametrize("name", list(M.REGISTRY))
def test_every_registry_entry_runs_its_merge_with_its_defaults(name):
    theta0, thetas = make_sd(0), [make_sd(1), make_sd(2)]
    stats = _registry_stats(theta0, thetas)
    method = M.REGISTRY[name]
    assert method.name == name and method.label and method.paper and method.section.startswith("METHODS.md")
    assert set(method.needs) <= {"fisher", "gram", "hessian"}
    scale = 0.35
    merged = method(theta0, thetas, {s: stats[s] for s in stats if s.split("_")[0] in method.needs},
                    **{h: scale for h in method.tuned})
    assert_sd_close(merged, _direct_calls(theta0, thetas, stats, scale)[name])
    assert set(_direct_calls(theta0, thetas, stats, scale)) == set(M.REGISTRY)  # every entry checked


@pytest.mark.parametrize("scale", [0.0, 0.3, 1.0])
def test_registry_task_arithmetic_at_scale_is_task_arithmetic(scale):
    theta0, thetas = make_sd(0), [make_sd(1), make_sd(2), make_sd(3)]
    assert_sd_close(M.REGISTRY["task_arithmetic"](theta0, thetas, {}, scale=scale),
                    M.task_arithmetic(theta0, thetas, scale))


def test_registry_overrides_fixed_values_and_checks_its_arguments():
    theta0, thetas = make_sd(0), [make_sd(1), make_sd(2)]
    stats = _registry_stats(theta0, thetas)
    assert_sd_close(M.REGISTRY["ties"](theta0, thetas, {}, scale=0.5, density=0.6, disjoint="sum"),
                    M.ties_merging(theta0, thetas, 0.6, 0.5, "sum"))
    assert_sd_close(M.REGISTRY["regmean"](theta0, thetas, {"gram": stats["gram"]}, gram_normalization="sum", ridge=0.1),
                    M.regmean(thetas, stats["gram"], 0.9, gram_normalization="sum", ridge=0.1))
    with pytest.raises(ValueError, match="scale"):
        M.REGISTRY["task_arithmetic"](theta0, thetas, {})  # a tuned value must be given
    with pytest.raises(ValueError, match="fisher"):
        M.REGISTRY["fisher"](theta0, thetas, {})
    with pytest.raises(ValueError, match="densty"):
        M.REGISTRY["ties"](theta0, thetas, {}, scale=1.0, densty=0.3)
    with pytest.raises(ValueError, match="2 models"):
        M.REGISTRY["slerp"](theta0, thetas * 2, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        M.REGISTRY["ties"].label = "x"


def _methods_md() -> Path | None:
    env = os.environ.get("DATA_DIR")
    root = Path(env).parent if env else Path(__file__).resolve().parents[2] / "shared"
    path = root / "docs" / "METHODS.md"
    return path if path.exists() else None


@pytest.mark.skipif(_methods_md() is None, reason="../shared/docs/METHODS.md not found")
def test_tuned_grids_are_the_lambda_grid_of_methods_md():
    text = _methods_md().read_text()
    match = re.search(r"λ picked on held-out validation\s+data from \{([^}]*)\}", text)
    first, second, _, last = (x.strip() for x in match.group(1).split(","))
    step = float(second) - float(first)
    documented = [float(first) + i * step for i in range(round((float(last) - float(first)) / step) + 1)]
    assert len(M.LAMBDA_GRID) == len(documented)
    assert all(math.isclose(a, b, abs_tol=1e-9) for a, b in zip(M.LAMBDA_GRID, documented))
    tuned = {name: m.tuned for name, m in M.REGISTRY.items() if m.tuned}
    # METHODS.md §1 tunes λ for Task Arithmetic and TIES (and DARE, which feeds them); the
    # statistics-based merges and averaging have nothing to tune.
    assert tuned == {name: {"scale": M.LAMBDA_GRID} for name in ("task_arithmetic", "ties", "dare_ta", "dare_ties")}
