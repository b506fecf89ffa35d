"""Uncertainty-based gradient matching, and the tensor rules of its study (METHODS.md §1).

Daheim, Möllenhoff, Ponti, Gurevych & Khan, "Model Merging by Uncertainty-Based Gradient
Matching", ICLR 2024. Diagonal form (as in the public code):

    θ = θ0 + α Σt (H0 + α Σs Hs + δ)⁻¹ ⊙ (H0 + Ht + δ) ⊙ τt,   τt = θt − θ0,

with Ht = Nt·F̂t (Nt the size of task t's training set, F̂t its mean squared-gradient Fisher,
``lib.statistics.hessian_estimate``) and H0 the same for θ0's own training data.

Defaults: α = ``scale`` = 1 (no tuning), δ = ``delta`` = 1e-12 (the public code's value).
Special cases (unit-tested): H0 = 0 with equal Ht gives weight averaging of the task models;
H0 = 0 gives Fisher merging of the task models with the unnormalised Fishers Ht = Nt·F̂t as
weights; H0 ≫ Ht gives Task Arithmetic with λ = α.

Deviations and conventions:

- Float tensors with no Hessian anywhere get Task Arithmetic with the same α (the rule's
  limit when H0 dominates: no data information); a key with a Hessian must have one for
  every task and for θ0.
- Buffers (``buffers=``, by default BatchNorm's running mean / variance) are not task
  vectors: they get their plain average over the fine-tuned models, never Task Arithmetic
  (``lib.merging._common``). They have no Hessian; giving one is an error.
- α = ``scale`` and δ = ``delta`` must be >= 0: α weighs the task likelihoods in the
  precision H0 + α Σs Hs + δ, and a negative one can drive it to 0 (an infinite merge). To
  remove a task, use :func:`remove_uncertainty_weighted` (or Task Arithmetic's negation).

Also here, for the study of notebook 04 (all take and return tensors):

- :func:`remove_plain`, :func:`remove_uncertainty_weighted`: removing one dataset r from a
  model trained on everything. The uncertainty-weighted rule is this project's derivation
  from the paper's argument (the merge "un-done" for r), not a formula of the paper.
- :func:`removal_amplification`, :func:`relative_damping`, :func:`perturb_hessians`: why the
  full removal rule is ill-conditioned with δ = 1e-12 and how damping bounds it.
- :func:`gradient_mismatch`, :func:`objective_gradient_norm`: the paper's gradient mismatch
  and the target objective's gradient norm, from mean gradients.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import torch

from ._common import (
    StateDict,
    _check_finite,
    _check_models,
    _check_numbers,
    _check_stats,
    _float_keys,
    _in_order,
    _passthrough,
    _without,
    _work,
    _work_dtype,
    averaged_buffers,
    buffer_keys,
)

# The public code's δ: only keeps 0/0 away, far below any real curvature (see relative_damping).
DELTA = 1e-12


# ------------------------------------------------------------------- gradient matching
@torch.no_grad()
def gradient_matching(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    hessians: Sequence[StateDict],
    pretrained_hessian: StateDict,
    scale: float = 1.0,
    delta: float = DELTA,
    *,
    buffers: Collection[str] | None = None,
) -> dict[str, torch.Tensor]:
    """θ = θ0 + α Σt (H0 + α Σs Hs + δ)⁻¹ ⊙ (H0 + Ht + δ) ⊙ τt, α = ``scale``.

    ``hessians[t][k]`` and ``pretrained_hessian[k]`` are diagonals (shaped like the
    parameter), e.g. Ht = Nt·F̂t. Float tensors with no Hessian anywhere get Task Arithmetic
    with the same α; buffer keys get their average over ``finetuned``. ``scale`` and ``delta``
    must be >= 0.
    """
    _check_numbers("gradient_matching", scale=scale, delta=delta)
    if scale < 0 or delta < 0:
        raise ValueError(
            f"gradient_matching: scale = {scale}, delta = {delta}; both must be >= 0, since they weigh the "
            "task Hessians and the damping in the precision H0 + scale·ΣHs + delta, which a negative value "
            "can drive to 0. To take a task out, use remove_uncertainty_weighted or task_arithmetic with a "
            "negative scale.")
    _check_models(pretrained, finetuned)
    if len(hessians) != len(finetuned):
        raise ValueError(f"got {len(hessians)} Hessian dicts for {len(finetuned)} fine-tuned models.")
    _check_stats(pretrained_hessian, pretrained, "pretrained_hessian")
    for t, h in enumerate(hessians):
        _check_stats(h, pretrained, f"hessians[{t}]")
    buffer_names = buffer_keys(pretrained, buffers)
    with_hessian = [k for k in buffer_names if k in pretrained_hessian or any(k in h for h in hessians)]
    if with_hessian:
        raise ValueError(f"buffers {with_hessian[:3]} have Hessians; buffers are averaged, not merged by "
                         "the rule: leave them out of the Hessians (or out of buffers=).")
    out = _passthrough(pretrained)
    out.update(averaged_buffers(finetuned, buffer_names))
    for k in _without(_float_keys(pretrained), buffer_names):
        present = [k in h for h in hessians] + [k in pretrained_hessian]
        dtype = _work_dtype(pretrained[k].dtype)
        theta0 = _work(pretrained[k])
        if not any(present):  # Task Arithmetic: θ0 + α Σt τt
            tau_sum = sum((_work(ft[k]) - theta0 for ft in finetuned), torch.zeros_like(theta0))
            out[k] = (theta0 + scale * tau_sum).to(pretrained[k].dtype)
            continue
        if not all(present):
            raise ValueError(f"key {k!r} has Hessians for some models but not all (tasks, then "
                             f"pretrained: {present}); give it one everywhere, or nowhere.")
        h0 = pretrained_hessian[k].to(dtype)
        denom = h0 + delta  # fresh tensor: H0 + α Σs Hs + δ
        for h in hessians:
            denom.add_(h[k].to(dtype), alpha=scale)
        update = torch.zeros_like(theta0)
        for ft, h in zip(finetuned, hessians):
            update.add_((h0 + h[k].to(dtype) + delta).mul_(_work(ft[k]) - theta0))
        out[k] = update.div_(denom).mul_(scale).add_(theta0).to(pretrained[k].dtype)
    return _in_order(out, pretrained)


# ------------------------------------------------------------------- removing one dataset
@torch.no_grad()
def remove_plain(theta_all: StateDict, theta0: StateDict, theta_r: StateDict, alpha: float = 1.0) -> StateDict:
    """Plain task-vector subtraction: θ_all − α τr, τr = θr − θ0."""
    _check_numbers("remove_plain", alpha=alpha)
    for sd, label in ((theta_all, "theta_all"), (theta0, "theta0"), (theta_r, "theta_r")):
        _check_finite(sd, label)
    return {k: theta_all[k] - alpha * (theta_r[k] - theta0[k]) for k in theta_all}


def _kept_precision(h0: torch.Tensor, h_rest: Sequence[torch.Tensor], delta: float) -> torch.Tensor:
    """H0 + Σ_{s≠r} Hs + δ in float64, summed directly: never as P − Hr, whose two large
    terms would cancel where r's curvature dominates."""
    keep = h0.double() + delta
    for h in h_rest:
        keep = keep + h.double()
    return keep


@torch.no_grad()
def remove_uncertainty_weighted(theta_all: StateDict, theta0: StateDict, theta_r: StateDict, h0: StateDict,
                                h_rest: Sequence[StateDict], h_r: StateDict, delta: float = DELTA,
                                hessian_correction: bool = True) -> StateDict:
    """Remove dataset r from a model trained on everything, by the gradient-matching rule.

    Derivation (diagonal H, all α = 1). With ℓ̄_0 ≈ ½‖θ − θ0‖²_{H0} and each task model
    stationary for its own problem, ∇ℓ̄_s(θs) = −H0 τs, the model trained without r solves
    H0(θ − θ0) + Σ_{s≠r} ∇ℓ̄_s(θ) = 0 and θ_all solves the same with r included. Subtracting
    the two conditions and using the Taylor step of the merge, ∇ℓ̄_s(θ) ≈ ∇ℓ̄_s(θ') + Hs(θ − θ'):

        θ_{\\r} = θ_all − K⁻¹ [ (H0 + δ) τr + Hr (θr − θ_all) ],   K = H0 + Σ_{s≠r} Hs + δ

    — the gradient-matching merge "un-done" for r: if θ_all is the gradient-matching merge of
    all tasks, the result is the gradient-matching merge of the others.

    ``hessian_correction=False`` drops r's Taylor term Hr(θr − θ_all) (assumes
    ∇ℓ̄_r(θ_all) = ∇ℓ̄_r(θr), as Task Arithmetic does): θ_all − K⁻¹ (H0 + δ) τr, a task
    vector weighted per entry by a factor in (0, 1].

    Conditioning: the full rule multiplies θr − θ_all by Hr/K (:func:`removal_amplification`),
    which is unbounded where the kept curvature K is small, so errors in the Hessians pass
    into the result amplified. Rounding matters only where K falls to δ = 1e-12 (Hessians
    spanning many decades); the error of the *estimates* F̂ (a few hundred examples, spiky
    per-example gradients) matters always: two independent estimates move the full rule's
    result far more than the first-order rule's (tests/test_gradient_matching.py). A damped δ
    (:func:`relative_damping`) bounds the factor by max Hr/δ. Both forms become plain
    subtraction θ_all − τr when H0 (or δ) dominates every Hs.
    """
    _check_numbers("remove_uncertainty_weighted", delta=delta)
    named = [(theta_all, "theta_all"), (theta0, "theta0"), (theta_r, "theta_r"), (h0, "h0"), (h_r, "h_r")]
    for sd, label in named + [(h, f"h_rest[{i}]") for i, h in enumerate(h_rest)]:
        _check_finite(sd, label)
    out = {}
    for k in theta_all:
        a, t0, tr = theta_all[k].double(), theta0[k].double(), theta_r[k].double()
        keep = _kept_precision(h0[k], [h[k] for h in h_rest], delta)
        step = (h0[k].double() + delta) * (tr - t0)
        if hessian_correction:
            step = step + h_r[k].double() * (tr - a)
        out[k] = (a - step / keep).to(theta_all[k].dtype)
    return out


def removal_amplification(h0: StateDict, h_rest: Sequence[StateDict], h_r: StateDict,
                          delta: float = DELTA) -> torch.Tensor:
    """Hr / (H0 + Σ_{s≠r} Hs + δ) for every entry, flattened (float64): the factor by which the
    full removal rule multiplies θr − θ_all, hence any error in those weights. The first-order
    rule's factor, (H0 + δ)/K, is at most 1."""
    return torch.cat([(h_r[k].double() / _kept_precision(h0[k], [h[k] for h in h_rest], delta)).flatten()
                      for k in h_r])


def relative_damping(hessian: StateDict, relative: float, absolute: float = DELTA) -> float:
    """δ = ``absolute`` + ``relative`` × the mean entry of ``hessian`` over all its tensors.

    A floor relative to the Hessians' scale (as METHODS.md §1 asks of Fisher merging's
    denominator): the rule's output is then unchanged when every Hessian is scaled by the
    same factor, and every entry counts as having at least ``relative`` of the average
    curvature. The mean is global, not per tensor, because whole tensors can be pure rounding
    noise (a self-attention key bias has an identically zero gradient).
    """
    total = sum(float(v.double().sum()) for v in hessian.values())
    count = sum(v.numel() for v in hessian.values())
    return absolute + relative * total / max(count, 1)


def perturb_hessians(hessian: StateDict, relative: float, generator: torch.Generator,
                     mode: str = "entry") -> StateDict:
    """``hessian`` with noise of float-rounding size, kept non-negative.

    - ``"entry"``: each entry times (1 + ``relative``·ξ), ξ ~ N(0, 1): the error of a sum of
      squares, whose terms are all positive.
    - ``"tensor"``: each entry plus ``relative``·|ξ|·(its tensor's mean entry): the error of a
      reduction is relative to the size of its terms, not of its result, so entries far below
      their tensor's typical size (cancelling gradients) are where rounding is largest.
    """
    if mode not in ("entry", "tensor"):
        raise ValueError(f"mode must be 'entry' or 'tensor', not {mode!r}")
    out = {}
    for k, h in hessian.items():
        noise = torch.randn(h.shape, generator=generator, dtype=torch.float64)
        h64 = h.double()
        if mode == "entry":
            out[k] = (h64 * (1 + relative * noise)).clamp_min(0).to(h.dtype)
        else:
            out[k] = (h64 + relative * noise.abs() * h64.mean()).to(h.dtype)
    return out


def relative_change(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                    scale: Mapping[str, torch.Tensor]) -> float:
    """‖state − reference‖ / ‖scale‖ over all tensors (e.g. scale = τr, the vector removed)."""
    num = sum(float((state[k].double() - reference[k].double()).square().sum()) for k in reference)
    den = sum(float(scale[k].double().square().sum()) for k in reference)
    return (num / den) ** 0.5 if den > 0 else float("nan")


# ------------------------------------------------------------------- gradient mismatch
def gradient_mismatch(grads_at_merged: Mapping[str, StateDict], grads_at_task_models: Mapping[str, StateDict],
                      sizes: Mapping[str, int], alphas: Mapping[str, float] | None = None) -> float:
    """The paper's gradient mismatch, ‖Σt αt [∇ℓ̄t(θ_m) − ∇ℓ̄t(θt)]‖₂, over the tasks in
    ``grads_at_task_models``. ℓ̄t is the *summed* training loss of dataset t, so each mean
    gradient ḡ is scaled by Nt (as Ht = Nt·F̂t is). ``grads_at_merged[t]`` = ḡt at the merged
    model θ_m, ``grads_at_task_models[t]`` = ḡt at θt; αt = 1 unless given.

    Daheim et al. write the error of Task Arithmetic as θ_{1:T} − θ_TA =
    −H0⁻¹ Σt αt [∇ℓ̄t(θ_{1:T}) − ∇ℓ̄t(θt)]. Evaluated at θ_m = θ_{1:T} (the all-data model)
    this is exactly their term; at a merged model it measures how far that model is from
    matching every task model's gradient. It is 0 when θ_m = θt for a single task.
    """
    total = 0.0
    keys = next(iter(grads_at_task_models.values())).keys()
    for k in keys:
        acc = None
        for t, g_t in grads_at_task_models.items():
            a = 1.0 if alphas is None else alphas[t]
            term = (a * sizes[t]) * (grads_at_merged[t][k].double() - g_t[k].double())
            acc = term if acc is None else acc + term
        total += float(acc.square().sum())
    return total ** 0.5


def objective_gradient_norm(grads_at_merged: Mapping[str, StateDict], sizes: Mapping[str, int]) -> float:
    """‖Σ_d N_d ḡ_d(θ_m)‖₂ over every dataset d in ``grads_at_merged`` (θ0's included): the
    gradient of the target's own objective ℓ̄_0 + Σt ℓ̄t at θ_m, zero at a stationary target."""
    total = 0.0
    keys = next(iter(grads_at_merged.values())).keys()
    for k in keys:
        acc = sum(sizes[d] * g[k].double() for d, g in grads_at_merged.items())
        total += float(acc.square().sum())
    return total ** 0.5
