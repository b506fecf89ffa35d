"""Gradient matching: the tensor rules (lib/merging/gradient_matching.py) and the study's logic
(lib/experiments/gradient_matching.py) on tiny inputs."""
from __future__ import annotations

import copy
import importlib
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lib import merging
from lib import statistics as S
from lib.experiments import gradient_matching as G
from lib.experiments import selection
from lib.experiments.config import notebook_config, notebook_defaults
from lib.experiments.findings import Claim
from lib.experiments.selection import Selection, ValidationOnly
from lib.experiments.tracks import PreparedSplit, _text_collate

# ``lib.merging.gradient_matching`` the attribute is the merge function; the module itself:
R = importlib.import_module("lib.merging.gradient_matching")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "04_gradient_matching.ipynb"

pytestmark = pytest.mark.usefixtures("one_thread")


def rand_state(seed, keys=("encoder.w", "encoder.b", "head.weight", "head.bias"), shape=(3, 4)):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g, dtype=torch.float64) for k in keys}


def rand_hessian(seed, like):
    g = torch.Generator().manual_seed(1000 + seed)
    return {k: torch.rand(v.shape, generator=g, dtype=torch.float64) * 5 + 0.1 for k, v in like.items()}


def assert_states_close(a, b, **kw):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], **kw)


# ----------------------------------------------------------------------------- the notebook's parameters
def test_notebook_parameters_are_exactly_the_config_fields_with_equal_defaults():
    defaults = notebook_defaults(NOTEBOOK)
    assert list(defaults) == [f.name for f in fields(G.GradientMatchingConfig)]
    assert notebook_config(G.GradientMatchingConfig, defaults) == G.GradientMatchingConfig()


def test_config_rejects_an_unknown_scale_and_an_unknown_removed_task():
    with pytest.raises(ValueError, match="small"):
        G.GradientMatchingConfig(scale="huge")
    with pytest.raises(ValueError, match="removed_task"):
        G.GradientMatchingConfig(removed_task="mr")


# ----------------------------------------------------------------------------- the merge
def test_buffers_are_averaged_over_the_task_models_never_task_arithmetic():
    theta0 = rand_state(0, keys=("w", "bn.running_var"))
    tasks = [rand_state(s, keys=("w", "bn.running_var")) for s in (1, 2)]
    hs = [{"w": rand_hessian(s, theta0)["w"]} for s in (1, 2)]
    h0 = {"w": rand_hessian(0, theta0)["w"]}
    merged = merging.gradient_matching(theta0, tasks, hs, h0)
    torch.testing.assert_close(merged["bn.running_var"], (tasks[0]["bn.running_var"] + tasks[1]["bn.running_var"]) / 2)
    ta = theta0["bn.running_var"] + sum(t["bn.running_var"] - theta0["bn.running_var"] for t in tasks)
    assert not torch.allclose(merged["bn.running_var"], ta)
    # named explicitly: "w" becomes a buffer too; a buffer with a Hessian is an error
    named = merging.gradient_matching(theta0, tasks, [{}, {}], {}, buffers=["w", "bn.running_var"])
    torch.testing.assert_close(named["w"], (tasks[0]["w"] + tasks[1]["w"]) / 2)
    with pytest.raises(ValueError, match="buffers"):
        merging.gradient_matching(theta0, tasks, hs, h0, buffers=["w"])


def tiny_models():
    theta0 = rand_state(0, shape=(2, 3))
    tasks = {t: rand_state(i, shape=(2, 3)) for i, t in enumerate(["a", "b"], start=1)}
    models = G.Models(theta0=theta0, tasks=tasks, all_data=rand_state(9, shape=(2, 3)),
                      without=rand_state(8, shape=(2, 3)), removed="b")
    fisher = {n: rand_hessian(i, theta0) for i, n in enumerate(["base", "a", "b"])}
    stats = G.Statistics(fisher=fisher, sizes={"base": 10, "a": 5, "b": 20}, base="base")
    return models, stats


def test_special_case_rows_are_the_merges_methods_md_names():
    models, stats = tiny_models()
    tasks = [models.tasks[t] for t in ("a", "b")]
    # H0 = 0, equal Ht: weight averaging of the task models, θ0 not among them
    assert_states_close(G.gm_weight_averaging(models, ["a", "b"]), merging.weight_average(tasks), rtol=1e-12, atol=1e-12)
    # H0 = 0: Fisher merging of the task models with Ht = Nt·F̂t (the N's matter: 5 vs 20)
    scaled = G.gm_fisher_merging(models, stats, ["a", "b"])
    assert_states_close(scaled, merging.fisher_merging(tasks, [stats.hessian("a"), stats.hessian("b")]),
                        rtol=1e-9, atol=1e-9)
    unscaled = merging.fisher_merging(tasks, [stats.fisher["a"], stats.fisher["b"]])
    assert max(float((scaled[k] - unscaled[k]).abs().max()) for k in scaled) > 1e-2
    # the rows that include θ0 are different merges
    with_theta0 = G.average_with_theta0(models, ["a", "b"])
    assert max(float((with_theta0[k] - merging.weight_average(tasks)[k]).abs().max()) for k in with_theta0) > 1e-2
    # H0 ≫ Ht: Task Arithmetic
    huge = G.Statistics({**stats.fisher, "base": {k: torch.full_like(v, 1e12) for k, v in models.theta0.items()}},
                        stats.sizes, "base")
    assert_states_close(G.gradient_matching(models, huge, ["a", "b"], 1.0), G.task_arithmetic(models, ["a", "b"], 1.0),
                        rtol=1e-8, atol=1e-8)


def test_every_merge_merges_the_head_like_any_other_tensor():
    models, stats = tiny_models()
    merged = {
        "ta": G.task_arithmetic(models, ["a", "b"], 1.0),
        "gm": G.gradient_matching(models, stats, ["a", "b"], 1.0),
        "fisher": G.fisher_with_theta0(models, stats, ["a", "b"]),
        "average": G.average_with_theta0(models, ["a", "b"]),
    }
    for name, state in merged.items():
        assert set(state) == set(models.theta0), name
        for k in ("head.weight", "head.bias"):
            assert not torch.equal(state[k], models.theta0[k]), (name, k)
    t0, ta, tb = models.theta0["head.weight"], models.tasks["a"]["head.weight"], models.tasks["b"]["head.weight"]
    torch.testing.assert_close(merged["ta"]["head.weight"], ta + tb - t0)
    torch.testing.assert_close(merged["average"]["head.weight"], (t0 + ta + tb) / 3)
    h = {n: stats.hessian(n)["head.weight"] for n in ("base", "a", "b")}
    expected = t0 + ((h["base"] + h["a"]) * (ta - t0) + (h["base"] + h["b"]) * (tb - t0)) / (h["base"] + h["a"] + h["b"])
    torch.testing.assert_close(merged["gm"]["head.weight"], expected)
    assert torch.equal(stats.hessian("b")["head.bias"], 20 * stats.fisher["b"]["head.bias"])


# ----------------------------------------------------------------------------- data removal
def test_uncertainty_weighted_removal_is_plain_subtraction_when_h0_dominates():
    theta0, theta_all, theta_r = rand_state(0), rand_state(1), rand_state(2)
    h0 = {k: torch.full_like(v, 3.0) for k, v in theta0.items()}
    zero = {k: torch.zeros_like(v) for k, v in theta0.items()}
    plain = R.remove_plain(theta_all, theta0, theta_r)
    for k in plain:  # θ_all − (θr − θ0)
        torch.testing.assert_close(plain[k], theta_all[k] - theta_r[k] + theta0[k])
    for correction in (True, False):
        uw = R.remove_uncertainty_weighted(theta_all, theta0, theta_r, h0, [zero, zero], zero, delta=0.0,
                                           hessian_correction=correction)
        assert_states_close(uw, plain)
        # and approximately so when the task Hessians are tiny next to H0
        tiny = {k: 1e-9 * v for k, v in rand_hessian(5, theta0).items()}
        uw = R.remove_uncertainty_weighted(theta_all, theta0, theta_r, h0, [tiny], tiny, hessian_correction=correction)
        assert_states_close(uw, plain, rtol=1e-6, atol=1e-6)


def test_uncertainty_weighted_removal_undoes_a_gradient_matching_merge_exactly():
    theta0 = rand_state(0)
    tasks = [rand_state(s) for s in (1, 2, 3)]
    hs = [rand_hessian(s, theta0) for s in (1, 2, 3)]
    h0 = rand_hessian(0, theta0)
    merged_all = merging.gradient_matching(theta0, tasks, hs, h0, 1.0, delta=1e-12)
    merged_rest = merging.gradient_matching(theta0, tasks[:2], hs[:2], h0, 1.0, delta=1e-12)
    removed = R.remove_uncertainty_weighted(merged_all, theta0, tasks[2], h0, hs[:2], hs[2], delta=1e-12)
    assert_states_close(removed, merged_rest, rtol=1e-9, atol=1e-9)
    # plain subtraction does not, in general
    plain = R.remove_plain(merged_all, theta0, tasks[2])
    assert max(float((plain[k] - merged_rest[k]).abs().max()) for k in plain) > 1e-3


def test_first_order_removal_weights_the_task_vector_between_zero_and_one():
    theta0, theta_all, theta_r = rand_state(0), rand_state(1), rand_state(2)
    h0, h1, hr = rand_hessian(0, theta0), rand_hessian(1, theta0), rand_hessian(2, theta0)
    uw = R.remove_uncertainty_weighted(theta_all, theta0, theta_r, h0, [h1], hr, delta=0.0, hessian_correction=False)
    for k in uw:
        w = (theta_all[k] - uw[k]) / (theta_r[k] - theta0[k])
        torch.testing.assert_close(w, h0[k] / (h0[k] + h1[k]))
        assert (w > 0).all() and (w <= 1).all()


def wide_range_problem(n=4000, decades=14, seed=0):
    """Diagonal Hessians H = N·F̂ spanning ``decades`` orders of magnitude, as measured Fishers
    do (MiniLM on MR: self-attention key biases ~1e-20, query weights down to ~1e-13, the head
    ~1e-1), each model's independent of the others'; task vectors of size 0.01."""
    g = torch.Generator().manual_seed(seed)
    hess = lambda: {"w": 1e4 * 10 ** (-decades * torch.rand(n, generator=g, dtype=torch.float64))}
    h0, h1, h2, hr = hess(), hess(), hess(), hess()
    theta0 = {"w": torch.randn(n, generator=g, dtype=torch.float64)}
    theta_r = {"w": theta0["w"] + 0.01 * torch.randn(n, generator=g, dtype=torch.float64)}
    theta_all = {"w": theta0["w"] + 0.01 * torch.randn(n, generator=g, dtype=torch.float64)}
    return (theta_all, theta0, theta_r), h0, [h1, h2], hr


def change(args, h0, h_rest, hr, delta, mode, eps=1e-6, hessian_correction=True):
    """‖Δ output‖ / ‖τr‖ when noise of relative size ε is put on every Hessian."""
    ref = R.remove_uncertainty_weighted(*args, h0, h_rest, hr, delta, hessian_correction)
    g = torch.Generator().manual_seed(1)
    noisy = [R.perturb_hessians(h, eps, g, mode) for h in (h0, *h_rest, hr)]
    out = R.remove_uncertainty_weighted(*args, noisy[0], noisy[1:-1], noisy[-1], delta, hessian_correction)
    tau = {"w": args[2]["w"] - args[1]["w"]}
    return R.relative_change(out, ref, tau)


def test_full_removal_rule_is_ill_conditioned_with_the_public_delta_and_bounded_when_damped():
    args, h0, h_rest, hr = wide_range_problem()
    tiny, damped, eps = R.DELTA, R.relative_damping(h0, 0.1), 1e-6
    # undamped: the factor Hr / (H0 + Σ Hs + δ) on θr − θ_all reaches 1e12, and noise of relative
    # size 1e-6 on every Hessian entry moves the result by more than 1e4 × ‖τr‖ (a gain > 1e10)
    assert float(R.removal_amplification(h0, h_rest, hr, tiny).max()) > 1e10
    assert change(args, h0, h_rest, hr, tiny, "entry") / eps > 1e10
    assert change(args, h0, h_rest, hr, tiny, "tensor") > 1e4
    # damped (δ = 0.1 × mean H0): amplification below 1e3; the same noise moves the result by
    # less than 1e-4 × ‖τr‖ (gain < 1e2), and noise at the tensors' scale by less than 1e-2 × ‖τr‖
    assert float(R.removal_amplification(h0, h_rest, hr, damped).max()) < 1e3
    assert change(args, h0, h_rest, hr, damped, "entry") / eps < 1e2 < G.STABILITY_GAIN
    assert change(args, h0, h_rest, hr, damped, "tensor") < 1e-2
    # the first-order rule's weights lie in (0, 1]: entrywise noise barely moves it, and even noise
    # that swamps the smallest Hessians moves it by at most ‖τr‖
    assert change(args, h0, h_rest, hr, tiny, "entry", hessian_correction=False) / eps < 10
    assert change(args, h0, h_rest, hr, tiny, "tensor", hessian_correction=False) <= 1.0


def two_estimates(n=2000, examples=128, seed=0):
    """Two independent estimates F̂ = mean over ``examples`` of squared heavy-tailed per-example
    gradients (a Gaussian times a log-normal scale, as real per-example gradients are spiky)
    around true curvatures spanning 3 decades; the same removal problem as above."""
    g = torch.Generator().manual_seed(seed)
    curvature = [1e4 * 10 ** (-3 * torch.rand(n, generator=g, dtype=torch.float64)) for _ in range(4)]

    def estimate():
        spiky = lambda: torch.randn(examples, n, generator=g, dtype=torch.float64)
        return [{"w": c * (spiky() * spiky().exp()).square().mean(0)} for c in curvature]

    theta0 = {"w": torch.randn(n, generator=g, dtype=torch.float64)}
    theta_r = {"w": theta0["w"] + 0.01 * torch.randn(n, generator=g, dtype=torch.float64)}
    theta_all = {"w": theta0["w"] + 0.01 * torch.randn(n, generator=g, dtype=torch.float64)}
    return (theta_all, theta0, theta_r), estimate(), estimate()


def test_full_removal_rule_amplifies_estimation_noise_that_the_first_order_rule_does_not():
    # What a second machine changes most is not rounding but the estimate itself (sampled labels,
    # slightly different models). Between two independent Fisher estimates the first-order rule
    # moves by ~0.15‖τr‖, the full rule by 8-18‖τr‖; damping (δ = 0.1 mean H0) only halves that.
    args, a, b = two_estimates()
    tau = {"w": args[2]["w"] - args[1]["w"]}

    def between_estimates(rho, correction):
        outs = [R.remove_uncertainty_weighted(*args, h[0], h[1:3], h[3], R.relative_damping(h[0], rho), correction)
                for h in (a, b)]
        return R.relative_change(outs[0], outs[1], tau)

    first_order, full, damped = between_estimates(0, False), between_estimates(0, True), between_estimates(0.1, True)
    assert first_order < 0.5
    assert full > 20 * first_order and full > 2.0
    assert first_order < damped < full


def test_damping_is_invariant_to_scaling_every_hessian_and_never_cancels():
    args, h0, h_rest, hr = wide_range_problem(n=200)
    scale = lambda h: {k: 1e6 * v for k, v in h.items()}
    a = R.remove_uncertainty_weighted(*args, h0, h_rest, hr, R.relative_damping(h0, 0.1, 0.0))
    b = R.remove_uncertainty_weighted(*args, scale(h0), [scale(h) for h in h_rest], scale(hr),
                                      R.relative_damping(scale(h0), 0.1, 0.0))
    assert_states_close(a, b, rtol=1e-9, atol=1e-12)
    # K = H0 + Σ_{s≠r} Hs + δ is summed, not formed as P − Hr: with Hr ≫ the rest no precision is lost
    h = {"w": torch.tensor([1e-3], dtype=torch.float64)}
    big = {"w": torch.tensor([1e12], dtype=torch.float64)}
    amp = R.removal_amplification(h, [h], big, 0.0)
    assert float(amp[0]) == pytest.approx(1e12 / 2e-3, rel=1e-12)


def test_perturbation_modes():
    h = {"w": torch.tensor([1.0, 1e-12, 0.0], dtype=torch.float64)}
    g = torch.Generator().manual_seed(0)
    entry = R.perturb_hessians(h, 1e-6, g, "entry")["w"]
    assert entry[2] == 0 and abs(float(entry[1]) / 1e-12 - 1) < 1e-5  # relative to each entry
    tensor = R.perturb_hessians(h, 1e-6, g, "tensor")["w"]
    assert float(tensor[2]) > 0 and float(tensor[1]) > 1e-10          # relative to the tensor's mean
    with pytest.raises(ValueError, match="mode"):
        R.perturb_hessians(h, 1e-6, g, "other")


# ----------------------------------------------------------------------------- gradient mismatch
def quadratic_problem(d=4, T=3, seed=0):
    """Summed task losses ℓ̄t(θ) = Nt·½(θ − mt)ᵀAt(θ − mt), prior ℓ̄_0 = ½‖θ − θ0‖²_{H0}: task
    models, the target and Task Arithmetic in closed form."""
    g = torch.Generator().manual_seed(seed)
    H0 = torch.diag(torch.rand(d, generator=g, dtype=torch.float64) + 0.5)
    theta0 = torch.randn(d, generator=g, dtype=torch.float64)
    A, m, N = [], [], {}
    for t in range(T):
        B = torch.randn(d, d, generator=g, dtype=torch.float64)
        A.append(B @ B.T / d + 0.1 * torch.eye(d, dtype=torch.float64))
        m.append(torch.randn(d, generator=g, dtype=torch.float64))
        N[f"t{t}"] = 3 + 2 * t
    mean_grad = lambda t, theta: A[t] @ (theta - m[t])
    solve = lambda ts: torch.linalg.solve(H0 + sum(N[f"t{t}"] * A[t] for t in ts),
                                          H0 @ theta0 + sum(N[f"t{t}"] * A[t] @ m[t] for t in ts))
    thetas = [solve([t]) for t in range(T)]
    target = solve(range(T))
    ta = theta0 + sum(th - theta0 for th in thetas)
    return H0, theta0, thetas, target, ta, mean_grad, N


def test_mismatch_at_the_target_is_the_papers_task_arithmetic_error():
    # Daheim et al.: θ_{1:T} − θ_TA = −H0⁻¹ Σt [∇ℓ̄t(θ_{1:T}) − ∇ℓ̄t(θt)]
    H0, theta0, thetas, target, ta, mean_grad, N = quadratic_problem()
    at_target = {f"t{t}": {"w": mean_grad(t, target)} for t in range(3)}
    at_tasks = {f"t{t}": {"w": mean_grad(t, thetas[t])} for t in range(3)}
    mismatch = R.gradient_mismatch(at_target, at_tasks, N)
    assert mismatch == pytest.approx(float((H0 @ (target - ta)).norm()), rel=1e-9)
    assert mismatch > 0.1


def test_mismatch_is_zero_when_the_merge_is_the_single_task_model_and_scales_with_alpha():
    _, _, thetas, _, _, mean_grad, N = quadratic_problem(T=1)
    g = {"t0": {"w": mean_grad(0, thetas[0])}}
    assert R.gradient_mismatch(g, g, N) == 0.0
    other = {"t0": {"w": mean_grad(0, thetas[0] + 0.3)}}
    assert R.gradient_mismatch(other, g, N, alphas={"t0": 2.0}) == pytest.approx(2 * R.gradient_mismatch(other, g, N))


def test_objective_gradient_vanishes_at_the_target_only():
    H0, theta0, thetas, target, ta, mean_grad, N = quadratic_problem()
    sizes = {**N, "base": 1}
    grads = lambda th: {"base": {"w": H0 @ (th - theta0)}, **{f"t{t}": {"w": mean_grad(t, th)} for t in range(3)}}
    assert R.objective_gradient_norm(grads(target), sizes) == pytest.approx(0.0, abs=1e-9)
    assert R.objective_gradient_norm(grads(ta), sizes) > 0.1


# ----------------------------------------------------------------------------- findings (synthetic)
DATASETS = ["mr", "cr"]


def outcomes(p, n=400, seed=0):
    """Per-dataset 0/1 outcomes with success rate ``p`` (exactly round(p·n) ones, shuffled)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, d in enumerate(DATASETS):
        x = np.zeros(n, bool)
        x[: round(p * n)] = True
        out[d] = rng.permutation(x) if i else x
    return out


def nested(p_low, p_high, n=400):
    """Two outcome sets where the better one is right wherever the worse one is (paired)."""
    low, high = {}, {}
    for d in DATASETS:
        low[d] = np.arange(n) < round(p_low * n)
        high[d] = np.arange(n) < round(p_high * n)
    return low, high


def removal_result(p, reproducible=True):
    """A RemovalResult whose rows agree with the retrained model at the rates ``p`` (row -> rate)."""
    agreement = {row: np.arange(1000) < round(rate * 1000) for row, rate in p.items()}
    agreement = {row: {d: a for d in DATASETS} for row, a in agreement.items()}
    common = {"amplification median": np.nan, "amplification 99.9%": np.nan, "amplification max": np.nan,
              "change / ‖τr‖ (tensor noise)": 0.1, "stable": True, "change / ‖τr‖ (second Fisher estimate)": 0.2,
              "same predictions % (second Fisher estimate)": 98.0, "reproducible": True}
    stability = pd.DataFrame([
        {**common, "rule": G.FIRST_ORDER, "δ": 1e-12, "gain (entry noise)": 1.0},
        {**common, "rule": G.FULL, "δ": 1e-12, "amplification median": 1.0, "amplification 99.9%": 12.0,
         "amplification max": 500.0, "gain (entry noise)": 3.0, "change / ‖τr‖ (second Fisher estimate)": 1.4,
         "same predictions % (second Fisher estimate)": 99.0 if reproducible else 55.0, "reproducible": reproducible},
        {**common, "rule": G.FULL_DAMPED, "δ": 0.1, "amplification median": 0.5, "amplification 99.9%": 8.0,
         "amplification max": 175.0, "gain (entry noise)": 2.0},
    ]).set_index("rule")
    return G.RemovalResult("cr", pd.DataFrame(), agreement, stability, {G.FULL: 1e-12, G.FULL_DAMPED: 0.1}, {})


def test_removal_claim_names_doing_nothing_and_fails_when_doing_nothing_agrees_more():
    # the numbers: θ_all 91.9% agreement, the best rule 84.7%
    result = removal_result({G.DO_NOTHING: 0.919, G.PLAIN: 0.703, G.FIRST_ORDER: 0.847, G.FULL: 0.543,
                             G.FULL_DAMPED: 0.80})
    first, versus_plain, stability = G.removal_claims(result)
    assert "doing nothing" in first.baseline and "91.9" in first.baseline
    assert first.outcome == "did not hold"
    assert "doing nothing" in versus_plain.baseline
    assert stability.outcome == "held"
    # the same rules, now all closer to the target than θ_all is
    result = removal_result({G.DO_NOTHING: 0.60, G.PLAIN: 0.70, G.FIRST_ORDER: 0.85, G.FULL: 0.80, G.FULL_DAMPED: 0.80})
    assert G.removal_claims(result)[0].outcome == "held"
    # only some beat doing nothing: the claim says which
    result = removal_result({G.DO_NOTHING: 0.80, G.PLAIN: 0.70, G.FIRST_ORDER: 0.90, G.FULL: 0.50, G.FULL_DAMPED: 0.80})
    assert G.removal_claims(result)[0].outcome == f"held only for {G.FIRST_ORDER}"


def test_a_rule_a_second_fisher_estimate_overturns_wins_nothing():
    rates = {G.DO_NOTHING: 0.60, G.PLAIN: 0.70, G.FIRST_ORDER: 0.85, G.FULL: 0.90, G.FULL_DAMPED: 0.80}
    first, _, stability = G.removal_claims(removal_result(rates, reproducible=False))
    assert first.outcome == f"held only for {G.PLAIN}, {G.FIRST_ORDER}, {G.FULL_DAMPED}"
    assert "not reproducible" in first.evidence
    assert stability.outcome == "did not hold" and "55" in stability.evidence


def main_result(rates, alpha=0.5):
    correct = {name: outcomes(p, seed=i) for i, (name, p) in enumerate(rates.items())}
    selection = Selection("alpha", alpha, 80.0, [(alpha, 80.0)])
    return G.MainResult(G.accuracy_table(correct), correct, {}, selection)


MAIN_ROWS = (G.THETA0, G.TARGET, G.TA1, G.TA_TUNED, G.GM1, G.GM_AVERAGE, G.GM_FISHER, G.AVERAGE_WITH_THETA0,
             G.FISHER_WITH_THETA0)


def test_alpha_claim_compares_with_both_task_arithmetics_and_names_theta0():
    rates = dict(zip(MAIN_ROWS, (0.6, 0.9, 0.7, 0.8, 0.8, 0.75, 0.78, 0.74, 0.76)))
    main = main_result(rates)
    low, high = nested(0.7, 0.8)
    main.correct[G.TA1], main.correct[G.GM1], main.correct[G.TA_TUNED] = low, high, high
    claim = G.alpha_claim(main)
    assert isinstance(claim, Claim) and claim.outcome == "held" and "θ0" in claim.baseline
    main.correct[G.TA1] = high  # no better than TA at α = 1 any more
    assert G.alpha_claim(main).outcome == "held only partly"
    main.correct[G.TA_TUNED] = nested(0.8, 0.9)[1]  # and worse than tuned TA
    assert G.alpha_claim(main).outcome == "did not hold"


def test_robustness_claim_uses_paired_spreads_over_alpha():
    grid = (0.0, 0.5, 1.0, 2.0)
    rows, correct = [], {}
    ta_rates = {0.0: 0.6, 0.5: 0.85, 1.0: 0.75, 2.0: 0.55}
    gm_rates = {0.0: 0.6, 0.5: 0.84, 1.0: 0.85, 2.0: 0.83}
    for method, rates in ((G.TA, ta_rates), (G.GM, gm_rates)):
        for a in grid:
            correct[(method, a)] = {d: np.arange(400) < round(rates[a] * 400) for d in DATASETS}
            rows.append({"method": method, "alpha": a, "test average": 100 * rates[a]})
    claim = G.robustness_claim(G.AlphaCurves(pd.DataFrame(rows), correct))
    assert claim.outcome == "held" and "θ0" in claim.baseline and "60.0" in claim.baseline
    # swap the methods: now gradient matching is the fragile one
    swapped = {((G.GM if m == G.TA else G.TA), a): c for (m, a), c in correct.items()}
    table = pd.DataFrame(rows).replace({"method": {G.TA: G.GM, G.GM: G.TA}})
    assert G.robustness_claim(G.AlphaCurves(table, swapped)).outcome == "did not hold"


def test_special_cases_and_mismatch_claims_read_rows_by_role():
    main = main_result(dict(zip(MAIN_ROWS, (0.6, 0.9, 0.7, 0.8, 0.8, 0.75, 0.78, 0.74, 0.76))))
    low, high = nested(0.7, 0.8)
    main.correct[G.TA1], main.correct[G.GM1] = low, high
    special = G.special_cases_claim(main)
    assert G.GM_AVERAGE in special.evidence and G.FISHER_WITH_THETA0 in special.evidence and "θ0" in special.baseline
    mismatch = pd.DataFrame([
        {"method": G.MISMATCH_TA, "datasets merged": 3, "gradient mismatch": 4.0, "target objective gradient": 1.0, "test error": 20.0},
        {"method": G.MISMATCH_GM, "datasets merged": 3, "gradient mismatch": 2.0, "target objective gradient": 1.0, "test error": 19.0},
        {"method": G.TARGET, "datasets merged": 3, "gradient mismatch": 3.0, "target objective gradient": 0.5, "test error": 10.0},
    ])
    assert G.mismatch_claim(mismatch, main).outcome == "held"
    mismatch.loc[1, "gradient mismatch"] = 5.0
    assert G.mismatch_claim(mismatch, main).outcome == "held only partly"


def test_findings_is_markdown_with_every_claim():
    main = main_result(dict(zip(MAIN_ROWS, (0.6, 0.9, 0.7, 0.8, 0.8, 0.75, 0.78, 0.74, 0.76))))
    rows, correct = [], {}
    for method in (G.TA, G.GM):
        for a in (0.0, 0.5, 1.0):
            correct[(method, a)] = outcomes(0.7 + 0.1 * a, seed=int(10 * a))
            rows.append({"method": method, "alpha": a, "test average": 70 + 10 * a})
    mismatch = pd.DataFrame([
        {"method": m, "datasets merged": 3, "gradient mismatch": v, "target objective gradient": v / 2, "test error": e}
        for m, v, e in ((G.MISMATCH_TA, 4.0, 20.0), (G.MISMATCH_GM, 2.0, 19.0))])
    removal = removal_result({G.DO_NOTHING: 0.919, G.PLAIN: 0.703, G.FIRST_ORDER: 0.847, G.FULL: 0.543,
                              G.FULL_DAMPED: 0.80})
    text = G.findings(main, G.AlphaCurves(pd.DataFrame(rows), correct), mismatch, removal, None,
                      G.GradientMatchingConfig(tasks=("cr",), removed_task="cr"))
    assert text.startswith("# ") and text.count("\n- **") == 7, text
    assert "Trivial baseline: doing nothing" in text


# ----------------------------------------------------------------------------- plumbing
def test_full_state_has_encoder_and_head_keys_and_leaves_frozen_tensors_out():
    expert = G.Expert(encoder={"x.weight": torch.ones(2), "emb.weight": torch.zeros(3)},
                      heads={"mr": {"weight": torch.ones(2, 2), "bias": torch.zeros(2)}})
    state = G.full_state(expert, "mr", frozen=("emb.weight",))
    assert set(state) == {"encoder.x.weight", "head.weight", "head.bias"}
    enc, head = G.split_state(state)
    assert set(enc) == {"x.weight"} and set(head) == {"weight", "bias"}


def test_relative_distance():
    a = {"w": torch.tensor([3.0, 4.0])}
    target = {"w": torch.zeros(2)}
    assert G.relative_distance(a, target, {"w": torch.tensor([0.0, 10.0])}) == pytest.approx(0.5)


def test_training_table_takes_sizes_from_the_models_datasets():
    models, _ = tiny_models()
    models.info = {"θ0 (mr)": {"steps": 3}, "all data without cr": {"steps": 5}}
    models.trained_on = {"θ0 (mr)": ("mr",), "all data without cr": ("mr", "sst2")}
    table = G.training_table(models, {"mr": 10, "cr": 20, "sst2": 30})
    assert table.loc["θ0 (mr)", "training-set sizes"] == "mr 10"
    assert table.loc["all data without cr", "training-set sizes"] == "mr 10, sst2 30"


def test_fisher_statistics_hessian_is_n_times_fisher():
    _, stats = tiny_models()
    h = stats.hessian("a")
    assert all(torch.equal(h[k], 5 * stats.fisher["a"][k]) for k in h)
    assert S.hessian_estimate(stats.fisher["a"], 5).keys() == h.keys()


# ----------------------------------------------------------------------------- on a tiny BERT "track"
class TinyTrack:
    """Just enough of a TextTrack: a tiny random MiniLM-shaped encoder and random token data."""

    frozen_parameters = ("transformer.embeddings.word_embeddings.weight",)
    seed = 0
    name = "toy"

    def __init__(self):
        import transformers

        from lib.models import load_text_encoder

        config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, vocab_size=50, max_position_embeddings=32)
        torch.manual_seed(0)
        self.encoder, _ = load_text_encoder(config=config)
        rng = np.random.default_rng(0)
        self.splits = {}
        for split, n in (("train", 12), ("validation", 8), ("test", 10)):
            ids = [[101 % 50, *rng.integers(1, 50, rng.integers(2, 9)).tolist()] for _ in range(n)]
            self.splits[split] = PreparedSplit("toy", ids, rng.integers(0, 2, n), _text_collate,
                                               np.array([len(r) for r in ids]))

    def pretrained_encoder(self):
        return copy.deepcopy(self.encoder)

    def identity(self, tasks=()):
        return {"track": "toy-test", "tasks": list(tasks)}

    def split(self, task, split):
        return self.splits[split]


@pytest.fixture(scope="module")
def toy():
    track = TinyTrack()
    torch.manual_seed(1)
    head = torch.nn.Linear(16, 2)
    expert = G.Expert(encoder={k: v.clone() for k, v in track.encoder.state_dict().items()},
                      heads={"toy": {k: v.detach().clone() for k, v in head.state_dict().items()}})
    return track, G.full_state(expert, "toy", track.frozen_parameters)


def test_fisher_cache_key_holds_every_setting(toy, monkeypatch):
    track, state = toy
    specs = []
    monkeypatch.setattr(G, "cached_tensors", lambda kind, spec, compute, code=(): specs.append((spec, code)) or {})
    base = G.GradientMatchingConfig(base_task="toy", tasks=("other",), removed_task="other", fisher_examples=8)
    G.fisher_of(track, state, "toy", base)
    G.fisher_of(track, state, "toy", G.GradientMatchingConfig(**{**base.__dict__, "fisher_batch_size": 4}))
    (spec, code), (spec_b, _) = specs
    assert {"label_mode", "method", "batch_size", "n", "seed", "model", "task"} <= set(spec)
    assert spec != spec_b
    assert S.diagonal_fisher in code and G.fisher_of in code


def test_choose_alpha_reads_validation_only(toy):
    track, state = toy
    other = {k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}
    models = G.Models(theta0=state, tasks={"other": other}, all_data=state, without=state, removed="other")
    config = G.GradientMatchingConfig(base_task="toy", tasks=("other",), removed_task="other",
                                      alpha_grid=(0.0, 0.5, 1.0), selection_examples=8)
    ev = G.Evaluator(track)
    chosen = G.choose_alpha(models, ev, config)
    assert chosen.best in {v for v, _ in chosen.scores}
    assert all(key[2] == "validation" for key in ev._memo)
    with pytest.raises(selection.TestSplitAccessed):
        ev.accuracies(state, ["toy"], "test", data=ValidationOnly(track))


def test_removal_results_include_doing_nothing_and_the_stability_of_both_full_rules(toy):
    track, state = toy
    g = torch.Generator().manual_seed(3)
    shift = lambda s: {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in s.items()}
    models = G.Models(theta0=state, tasks={"a": shift(state), "b": shift(state)}, all_data=shift(state),
                      without=shift(state), removed="b")
    fisher = {n: {k: torch.rand(v.shape, generator=g) for k, v in state.items()} for n in ("toy", "a", "b")}
    stats = G.Statistics(fisher, {"toy": 10, "a": 10, "b": 10}, "toy")
    config = G.GradientMatchingConfig(base_task="toy", tasks=("a", "b"), removed_task="b")
    ev = G.Evaluator(track)  # the toy track serves the same examples under every task name
    again = G.Statistics({n: {k: v * (1 + torch.rand(v.shape, generator=g)) for k, v in f.items()}
                          for n, f in fisher.items()}, stats.sizes, "toy")
    result = G.removal_results(models, stats, ev, config, resampled=again)
    assert list(result.table.index) == [G.DO_NOTHING, G.RETRAINED, *G.REMOVAL_RULES]
    assert result.table.loc[G.RETRAINED, "agreement with target %"] == 100.0
    assert list(result.stability.index) == [G.FIRST_ORDER, G.FULL, G.FULL_DAMPED]
    assert result.deltas[G.FULL_DAMPED] > result.deltas[G.FULL]
    assert result.stability.loc[G.FULL, "change / ‖τr‖ (second Fisher estimate)"] > 0
    assert {"gain (entry noise)", "same predictions % (second Fisher estimate)", "reproducible"} <= set(
        result.stability.columns)
    assert np.isnan(result.stability.loc[G.FIRST_ORDER, "amplification max"])


def test_mean_nll_gradient_matches_plain_autograd(toy):
    track, state = toy
    grads = G.mean_nll_gradient(track, state, "toy", n_examples=12, batch_size=5)
    assert set(grads) == set(state)
    model = G.classifier(track, state)
    data = track.split("toy", "train")
    batch = data.batch(np.arange(12))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]),
                                             batch["labels"])
    loss.backward()
    params = dict(model.named_parameters())
    for k, g in grads.items():
        torch.testing.assert_close(g, params[k].grad, rtol=1e-4, atol=1e-6)


def test_vmappable_classifier_and_the_timed_methods_agree(toy):
    track, state = toy
    model = G.classifier(track, state)
    wrapped = G.VmappableClassifier(model)
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in model.named_parameters()]
    batch = track.split("toy", "train").batch(np.arange(6))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model.eval()
    torch.testing.assert_close(wrapped(**inputs), model(**inputs))
    batches = list(track.split("toy", "train").subset(8, 0).batches(3))
    table = G.time_sq_grad_methods(wrapped, batches, list(state), vmap_chunks=(2,), peak_flops=1e9)
    assert list(table.index) == [G.LOOP, "vmap over grad (chunks of 2)", "hooks (one batched backward per batch)", G.BOUND]
    assert table["examples"].eq(8).all()
    assert table["max |diff| / max |loop|"].iloc[:3].max() < 1e-4
    assert table.loc[G.LOOP, "speed-up vs loop (wall)"] == pytest.approx(1.0)
    # the bound: three products per Linear and position at 1 GFLOP/s
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert table.loc[G.BOUND, "wall ms/example"] == pytest.approx(1000 * 3 * G.linear_flops(wrapped, tokens) / 1e9 / 8)


def test_per_example_gradient_timing_covers_every_dataset_and_sums_them(toy):
    track, state = toy
    models = G.Models(theta0=state, tasks={"other": state}, all_data=state, without=state, removed="other")
    config = G.GradientMatchingConfig(base_task="toy", tasks=("other",), removed_task="other", fisher_examples=8,
                                      fisher_batch_size=4, timing_examples=6, timing_vmap_chunks=(3,))
    table = G.time_per_example_gradients(track, models, config)
    assert list(table.index.get_level_values("dataset").unique()) == ["toy", "other", "all"]
    per = table.loc["toy"]
    assert per["examples"].eq(6).all() and table.loc["all", "examples"].eq(12).all()
    both = table.xs(G.LOOP, level="method")["wall ms/example"]
    assert both["all"] == pytest.approx((both["toy"] + both["other"]) / 2)
    assert table.loc[("all", G.LOOP), "speed-up vs loop (wall)"] == pytest.approx(1.0)
    assert table.attrs["peak GFLOP/s"] > 0
    claim = G.timing_claim(table, ["toy", "other"], target=1e6)
    assert claim.outcome == "not met" and "loop" in claim.baseline


def test_evaluator_accuracy_agreement_and_memo(toy):
    track, state = toy
    ev = G.Evaluator(track)
    acc = ev.accuracies(state, ["toy"])
    model = G.classifier(track, state).eval()
    data = track.split("toy", "test")
    with torch.no_grad():
        batch = data.batch(np.arange(len(data)))
        pred = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).argmax(1).numpy()
    assert acc["toy"] == pytest.approx(100 * (pred == data.labels).mean())
    assert ev.agreement(state, state, ["toy"]) == 100.0
    flipped = dict(state, **{"head.weight": -state["head.weight"], "head.bias": -state["head.bias"]})
    assert ev.agreement(state, flipped, ["toy"]) < 100.0
    assert len(ev._memo) == 2


def test_a_shared_head_model_trains_saves_and_reloads(toy):
    # the all-data model: several datasets through one head (train_head=True, shared_head=True)
    from lib.experiments.training import FinetuneConfig, finetune

    track, state = toy
    _, head = G.split_state(state)
    config = FinetuneConfig(max_steps=2, batch_size=4, warmup_steps=1, eval_every=1, max_eval_examples=8)
    init = G.Expert(encoder=track.encoder.state_dict(), heads={})
    first = finetune(track, ["a", "b"], {"a": head, "b": head}, config, False, init=init, train_head=True, shared_head=True)
    again = finetune(track, ["a", "b"], {"a": head, "b": head}, config, False, init=init, train_head=True, shared_head=True)
    for expert in (first, again):
        assert all(torch.equal(expert.heads["a"][k], expert.heads["b"][k]) for k in ("weight", "bias"))
        assert not torch.equal(expert.heads["a"]["weight"], head["weight"])  # the head was trained
    assert all(torch.equal(first.encoder[k], again.encoder[k]) for k in first.encoder)
