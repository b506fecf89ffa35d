"""Behaviour of the closed-form merges in lib/merging/ (METHODS.md, section 1)."""
from __future__ import annotations

import math

import pytest
import torch

from lib import merging as M

SHAPES = {"a.weight": (4, 3), "a.bias": (4,), "b.weight": (5, 4)}


def make_sd(seed: int, dtype=torch.float32, shift: float = 0.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {k: (torch.randn(s, generator=g) + shift).to(dtype) for k, s in SHAPES.items()}
    sd["bn.num_batches_tracked"] = torch.tensor(seed, dtype=torch.int64)
    return sd


def make_stats(seed: int, like: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return {k: torch.rand(v.shape, generator=g) + 0.1 for k, v in like.items() if v.is_floating_point()}


def make_grams(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2000 + seed)
    out = {}
    for k in ("a.weight", "b.weight"):
        x = torch.randn(20, SHAPES[k][1], generator=g)
        out[k] = x.T @ x
    return out


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
    assert_sd_close(M.regmean([theta1], [gram], alpha=0.9), theta1, **tol)
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
    theta0, thetas = make_sd(0), [make_sd(1), make_sd(2)]
    fishers = [make_stats(1, thetas[0]), make_stats(2, thetas[0])]
    grams = [make_grams(1), make_grams(2)]
    h0 = make_stats(0, theta0)
    return {
        "weight_average": (M.weight_average, (thetas, [1.0, 2.0])),
        "task_vectors": (M.task_vectors, (theta0, thetas)),
        "task_arithmetic": (M.task_arithmetic, (theta0, thetas, 0.3)),
        "ties_mean": (M.ties_merging, (theta0, thetas, 0.5, 1.0, "mean")),
        "ties_sum": (M.ties_merging, (theta0, thetas, 0.5, 0.3, "sum")),
        "ties_trim_and_elect": (M.ties_trim_and_elect, (theta0, thetas, 0.5)),
        "dare": (M.dare, (theta0, thetas, 0.5, 0)),
        "fisher": (M.fisher_merging, (thetas, fishers)),
        "regmean": (M.regmean, (thetas, grams, 0.9)),
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
    merged = M.regmean(models, grams, alpha=1.0)
    x_all = torch.cat(xs)
    y_all = torch.cat([x @ w.T for x, w in zip(xs, ws)])
    lstsq = torch.linalg.lstsq(x_all, y_all).solution.T
    torch.testing.assert_close(merged["lin.weight"], lstsq)
    torch.testing.assert_close(merged["lin.bias"], (biases[0] + biases[1]) / 2)  # no Gram: averaged


def test_regmean_shrinks_off_diagonals_and_validates_gram_shapes():
    thetas = [make_sd(1), make_sd(2)]
    grams = [make_grams(1), make_grams(2)]
    # alpha = 0 keeps only diag(G): each input column is an independent, diag-weighted mean.
    merged = M.regmean(thetas, grams, alpha=0.0)
    d1, d2 = (torch.diagonal(g["a.weight"]) for g in grams)
    expected = (thetas[0]["a.weight"] * d1 + thetas[1]["a.weight"] * d2) / (d1 + d2)
    torch.testing.assert_close(merged["a.weight"], expected)
    bad = [dict(g) for g in grams]
    bad[1]["b.weight"] = torch.eye(5)
    with pytest.raises(ValueError, match="b.weight"):
        M.regmean(thetas, bad)
    with pytest.raises(ValueError, match="a.bias"):
        M.regmean(thetas, [g | {"a.bias": torch.eye(4)} for g in grams])


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
            return M.regmean([good, second], [grams, grams])
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
    assert M.MERGE_METHODS["ties"] is M.ties_merging
    assert set(M.MERGE_METHODS) >= {"weight_average", "task_arithmetic", "ties", "fisher", "regmean",
                                    "gradient_matching", "slerp"}
