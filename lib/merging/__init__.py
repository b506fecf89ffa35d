"""Closed-form model merges over state dicts (METHODS.md, section 1).

Every function here is pure: it takes state dicts (``dict[str, torch.Tensor]``) and
returns new ones, never modifying its inputs and doing no I/O. Conventions shared by all:

- Every floating-point tensor given is merged; the caller chooses the keys (for example,
  drops the task heads from every dict before calling). Non-floating tensors (BatchNorm's
  ``num_batches_tracked`` and the like) are copied unchanged from the first or pretrained
  model.
- All models must have the same keys, and per key the same shape and dtype; otherwise a
  ``ValueError`` names the key and the models.
- Arithmetic runs in the input dtype, except that float16/bfloat16 inputs are computed
  (and accumulated) in float32; results are returned in the input dtype.

Notation follows METHODS.md: θ0 pretrained, θt fine-tuned on task t, τt = θt − θ0.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Mapping, Sequence

import torch

StateDict = Mapping[str, torch.Tensor]

__all__ = [
    "MERGE_METHODS",
    "TaskVector",
    "dare",
    "fisher_merging",
    "gradient_matching",
    "regmean",
    "slerp",
    "task_arithmetic",
    "task_vectors",
    "ties_merging",
    "ties_trim_and_elect",
    "weight_average",
]

# SLERP falls back to linear interpolation when |cos(angle)| exceeds this (mergekit's value):
# sin(angle) is then too small to divide by safely, and the two paths agree anyway.
SLERP_COLINEAR_THRESHOLD = 0.9995


# ----------------------------------------------------------------------------- helpers


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute in: float32 for half precisions, else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _work(x: torch.Tensor) -> torch.Tensor:
    """``x`` in its working dtype. May return ``x`` itself: never modify the result in place."""
    return x.to(_work_dtype(x.dtype))


def _float_keys(sd: StateDict) -> list[str]:
    return [k for k, v in sd.items() if torch.is_floating_point(v)]


def _check_nonempty(models: Sequence, what: str) -> None:
    if len(models) == 0:
        raise ValueError(f"{what} is empty: pass at least one state dict.")


def _check_same_layout(models: Sequence[StateDict], labels: Sequence[str]) -> None:
    """Raise ValueError unless all models share keys, and per key shape and dtype."""
    ref, ref_label = models[0], labels[0]
    for sd, label in zip(models[1:], labels[1:]):
        missing = [k for k in ref if k not in sd]
        extra = [k for k in sd if k not in ref]
        if missing or extra:
            raise ValueError(
                f"{label} and {ref_label} have different keys (missing from {label}: "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''}; only in {label}: "
                f"{extra[:5]}{' ...' if len(extra) > 5 else ''}). Pass state dicts of the same "
                "architecture restricted to the same keys (e.g. drop the heads from all of them)."
            )
        for k, v in ref.items():
            if sd[k].shape != v.shape:
                raise ValueError(
                    f"key {k!r} has shape {tuple(sd[k].shape)} in {label} but {tuple(v.shape)} "
                    f"in {ref_label}. Only models of the same architecture can be merged."
                )
            if sd[k].dtype != v.dtype:
                raise ValueError(
                    f"key {k!r} has dtype {sd[k].dtype} in {label} but {v.dtype} in {ref_label}. "
                    "Cast all models to one dtype before merging."
                )


def _check_models(pretrained: StateDict | None, finetuned: Sequence[StateDict]) -> None:
    _check_nonempty(finetuned, "finetuned")
    models = ([pretrained] if pretrained is not None else []) + list(finetuned)
    labels = (["pretrained"] if pretrained is not None else []) + [
        f"finetuned[{i}]" for i in range(len(finetuned))
    ]
    _check_same_layout(models, labels)


def _check_stats(stats: StateDict, params: StateDict, label: str, shape_of=None) -> None:
    """Statistics (Fishers, Hessians) must name known float tensors, with the right shape."""
    for k, v in stats.items():
        if k not in params:
            raise ValueError(f"{label} has key {k!r}, which is not among the parameters merged.")
        want = shape_of(params[k]) if shape_of else tuple(params[k].shape)
        if tuple(v.shape) != want:
            raise ValueError(
                f"{label}[{k!r}] has shape {tuple(v.shape)}, expected {want} for parameter "
                f"of shape {tuple(params[k].shape)}."
            )


def _normalized(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} weights for {n} models; pass one weight per model.")
    total = sum(weights)
    if total == 0:
        raise ValueError("weights sum to 0; pass weights with a non-zero sum.")
    return [w / total for w in weights]


def _passthrough(sd: StateDict) -> dict[str, torch.Tensor]:
    """The non-floating tensors of ``sd``, copied (so outputs never alias inputs)."""
    return {k: v.clone() for k, v in sd.items() if not torch.is_floating_point(v)}


def _in_order(result: dict, ref: StateDict) -> dict:
    """``result`` with its keys in the order of ``ref`` (as ``load_state_dict`` users expect)."""
    return {k: result[k] for k in ref}


# ---------------------------------------------------------------------- weight averaging


@torch.no_grad()
def weight_average(
    state_dicts: Sequence[StateDict], weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """θ = Σ wt θt with the weights normalized to sum to 1 (uniform when None)."""
    _check_nonempty(state_dicts, "state_dicts")
    _check_same_layout(state_dicts, [f"state_dicts[{i}]" for i in range(len(state_dicts))])
    w = _normalized(weights, len(state_dicts))
    out = _passthrough(state_dicts[0])
    for k in _float_keys(state_dicts[0]):
        acc = _work(state_dicts[0][k]) * w[0]  # out of place: a fresh tensor to accumulate in
        for wt, sd in zip(w[1:], state_dicts[1:]):
            acc.add_(_work(sd[k]), alpha=wt)
        out[k] = acc.to(state_dicts[0][k].dtype)
    return _in_order(out, state_dicts[0])


# ------------------------------------------------------------------ task vectors, TA


@torch.no_grad()
def task_vectors(pretrained: StateDict, finetuned: Sequence[StateDict]) -> list[dict[str, torch.Tensor]]:
    """τt = θt − θ0 for every floating tensor (non-floating keys are left out)."""
    _check_models(pretrained, finetuned)
    return [
        {k: (_work(ft[k]) - _work(pretrained[k])).to(ft[k].dtype) for k in _float_keys(pretrained)}
        for ft in finetuned
    ]


class TaskVector:
    """A task vector τ with the arithmetic of Ilharco et al.'s ``task_vectors`` code.

    ``TaskVector(pretrained, finetuned)`` or ``TaskVector(vector=...)``; supports ``τ1 + τ2``,
    ``τ1 - τ2``, ``-τ``, ``c * τ`` and ``sum([...])``; ``τ.apply_to(θ0, scale)`` = θ0 + scale·τ.
    """

    def __init__(self, pretrained: StateDict | None = None, finetuned: StateDict | None = None,
                 vector: Mapping[str, torch.Tensor] | None = None):
        if vector is not None:
            self.vector = dict(vector)
        elif pretrained is not None and finetuned is not None:
            self.vector = task_vectors(pretrained, [finetuned])[0]
        else:
            raise ValueError("pass either vector=..., or both pretrained and finetuned.")

    def _combine(self, other: "TaskVector", sign: float) -> "TaskVector":
        if set(other.vector) != set(self.vector):
            diff = sorted(set(other.vector) ^ set(self.vector))
            raise ValueError(f"task vectors have different keys: {diff[:5]}")
        return TaskVector(vector={k: v + sign * other.vector[k] for k, v in self.vector.items()})

    def __add__(self, other):
        if isinstance(other, (int, float)) and other == 0:  # lets sum() start from 0
            return self
        return self._combine(other, 1.0)

    __radd__ = __add__

    def __sub__(self, other):
        return self._combine(other, -1.0)

    def __neg__(self):
        return TaskVector(vector={k: -v for k, v in self.vector.items()})

    def __mul__(self, scalar: float):
        return TaskVector(vector={k: v * scalar for k, v in self.vector.items()})

    __rmul__ = __mul__

    @torch.no_grad()
    def apply_to(self, pretrained: StateDict, scale: float = 1.0) -> dict[str, torch.Tensor]:
        """θ0 + scale·τ; keys of θ0 without a task vector entry are copied unchanged."""
        out = {}
        for k, v in pretrained.items():
            if k in self.vector:
                if self.vector[k].shape != v.shape:
                    raise ValueError(f"key {k!r}: task vector shape {tuple(self.vector[k].shape)} "
                                     f"but pretrained shape {tuple(v.shape)}.")
                out[k] = (_work(v) + scale * _work(self.vector[k])).to(v.dtype)
            else:
                out[k] = v.clone()
        return out


@torch.no_grad()
def task_arithmetic(pretrained: StateDict, finetuned: Sequence[StateDict], scale: float) -> dict[str, torch.Tensor]:
    """Task Arithmetic: θ = θ0 + scale·Σt τt."""
    _check_models(pretrained, finetuned)
    out = _passthrough(pretrained)
    for k in _float_keys(pretrained):
        theta0 = _work(pretrained[k])
        tau_sum = _work(finetuned[0][k]) - theta0
        for ft in finetuned[1:]:
            tau_sum.add_(_work(ft[k])).sub_(theta0)
        out[k] = tau_sum.mul_(scale).add_(theta0).to(pretrained[k].dtype)
    return _in_order(out, pretrained)


# -------------------------------------------------------------------------------- TIES


def _kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a 1-D tensor, consuming (reordering) ``values``.

    On CPU numpy's in-place introselect needs no extra memory; ``torch.kthvalue`` would
    clone the input and allocate an int64 index tensor (3 more copies' worth of float32).
    """
    pos = values.numel() - k  # 0-based position in ascending order
    if values.device.type == "cpu":
        array = values.numpy()
        array.partition(pos)
        return torch.tensor(array[pos].item(), dtype=values.dtype)
    return values.kthvalue(pos + 1).values


@torch.no_grad()
def _ties_thresholds(pretrained: StateDict, finetuned: Sequence[StateDict], density: float) -> list[float]:
    """Per task, the magnitude of its top-``density`` entry over all float tensors jointly."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}.")
    keys = _float_keys(pretrained)
    n = sum(pretrained[k].numel() for k in keys)
    n_keep = round(density * n)
    if density > 0:
        n_keep = max(n_keep, 1)
    if n_keep >= n:
        return [0.0] * len(finetuned)  # |τ| >= 0 keeps every entry
    if n_keep == 0:
        return [float("inf")] * len(finetuned)  # |τ| >= inf keeps none (τ is finite)
    work = _work_dtype(pretrained[keys[0]].dtype) if keys else torch.float32
    # One flat buffer, reused across tasks: the only full-size copy this needs.
    buffer = torch.empty(n, dtype=work, device=pretrained[keys[0]].device)
    thresholds = []
    for ft in finetuned:
        offset = 0
        for k in keys:
            size = pretrained[k].numel()
            torch.sub(_work(ft[k]).reshape(-1), _work(pretrained[k]).reshape(-1),
                      out=buffer[offset:offset + size])
            offset += size
        buffer.abs_()
        thresholds.append(_kth_largest(buffer, n_keep).item())
    return thresholds


def _trimmed(pretrained: StateDict, ft: StateDict, key: str, threshold: float) -> torch.Tensor:
    """τ̂ for one tensor: τ where |τ| >= threshold, else 0 (working dtype, fresh tensor)."""
    tau = _work(ft[key]) - _work(pretrained[key])
    return tau.masked_fill_(tau.abs() < threshold, 0)


def _elected_sign(pretrained, finetuned, key, thresholds) -> torch.Tensor:
    """s = sign(Σt τ̂t) for one tensor."""
    total = _trimmed(pretrained, finetuned[0], key, thresholds[0])
    for ft, thr in zip(finetuned[1:], thresholds[1:]):
        total.add_(_trimmed(pretrained, ft, key, thr))
    return total.sign_()


@torch.no_grad()
def ties_trim_and_elect(
    pretrained: StateDict, finetuned: Sequence[StateDict], density: float = 0.2
) -> list[dict[str, torch.Tensor]]:
    """TIES steps 1-2 per task: τt trimmed to its top-``density`` entries (ranked by |τt|
    over all float tensors jointly) and zeroed where its sign disagrees with the elected
    sign s = sign(Σt τ̂t). These are the task vectors AdaMerging++ combines.

    Returned in the input dtype; non-floating keys are left out, as in ``task_vectors``.
    """
    _check_models(pretrained, finetuned)
    thresholds = _ties_thresholds(pretrained, finetuned, density)
    out = [{} for _ in finetuned]
    for k in _float_keys(pretrained):
        sign = _elected_sign(pretrained, finetuned, k, thresholds)
        for t, (ft, thr) in enumerate(zip(finetuned, thresholds)):
            tau = _trimmed(pretrained, ft, k, thr)
            out[t][k] = tau.masked_fill_(tau * sign <= 0, 0).to(pretrained[k].dtype)
    return out


@torch.no_grad()
def ties_merging(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    density: float = 0.2,
    scale: float = 1.0,
    disjoint: str = "mean",
) -> dict[str, torch.Tensor]:
    """TIES-Merging: θ = θ0 + scale·τ_merged (trim, elect sign, disjoint merge).

    Trim keeps, per task, the round(density·n) entries of largest |τt| among all n float
    entries given, ranked jointly across tensors (at least one when density > 0; entries
    tied with the cut-off are all kept). The ranking holds one flat |τt| buffer at a time.
    ``disjoint="mean"`` (the paper) averages, per entry, the trimmed τt whose sign equals the
    elected sign; ``"sum"`` (AdaMerging's code) adds them. Entries where no task agrees are 0.
    Where Σt τ̂t is exactly 0 the elected sign is 0 and the entry gets 0 (the reference code
    breaks such ties by the majority sign; for real weights this has probability ~0).
    """
    if disjoint not in ("mean", "sum"):
        raise ValueError(f'disjoint must be "mean" or "sum", got {disjoint!r}.')
    _check_models(pretrained, finetuned)
    thresholds = _ties_thresholds(pretrained, finetuned, density)
    out = _passthrough(pretrained)
    for k in _float_keys(pretrained):
        # One pass over the tasks, keeping the sums (and counts) of the positive and of the
        # negative τ̂t entries: the elected sign is that of their total, and the agreeing
        # entries are exactly the positive (or negative) ones. Memory stays a few copies of
        # one tensor rather than T copies.
        theta0 = _work(pretrained[k])
        pos_sum, neg_sum = torch.zeros_like(theta0), torch.zeros_like(theta0)
        if disjoint == "mean":
            pos_count, neg_count = torch.zeros_like(theta0), torch.zeros_like(theta0)
        for ft, thr in zip(finetuned, thresholds):
            tau = _trimmed(pretrained, ft, k, thr)
            pos_sum.add_(tau.clamp(min=0))
            neg_sum.add_(tau.clamp(max=0))
            if disjoint == "mean":
                pos_count.add_(tau > 0)
                neg_count.add_(tau < 0)
        sign = (pos_sum + neg_sum).sign_()  # the elected sign, from the sums (not the means)
        if disjoint == "mean":
            pos_sum.div_(pos_count.clamp_(min=1))
            neg_sum.div_(neg_count.clamp_(min=1))
            del pos_count, neg_count
        merged = torch.where(sign > 0, pos_sum, torch.where(sign < 0, neg_sum, 0.0))
        out[k] = merged.mul_(scale).add_(theta0).to(pretrained[k].dtype)
    return _in_order(out, pretrained)


# -------------------------------------------------------------------------------- DARE


def _key_seed(seed: int, task: int, key: str) -> int:
    """A seed for one (task, tensor): masks do not depend on which other keys are passed."""
    digest = hashlib.sha256(f"{seed}:{task}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@torch.no_grad()
def dare(
    pretrained: StateDict, finetuned: Sequence[StateDict], drop_rate: float, seed: int
) -> list[dict[str, torch.Tensor]]:
    """DARE: each fine-tuned model as θ0 + m ⊙ τt / (1 − p), m ~ Bernoulli(1 − p) per entry.

    Returns the sparsified fine-tuned state dicts (E[τ̃] = τ), to be merged by
    ``task_arithmetic`` or ``ties_merging``. Deterministic given ``seed``: each (task, key)
    draws from its own generator, so a tensor's mask does not depend on which other keys
    are passed. Non-floating tensors are copied from each fine-tuned model.
    """
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}.")
    _check_models(pretrained, finetuned)
    out = []
    for t, ft in enumerate(finetuned):
        sparse = _passthrough(ft)
        for k in _float_keys(pretrained):
            theta0 = _work(pretrained[k])
            generator = torch.Generator(device=theta0.device).manual_seed(_key_seed(seed, t, k))
            keep = torch.rand(theta0.shape, generator=generator, device=theta0.device) >= drop_rate
            tau = _work(ft[k]) - theta0
            tau.masked_fill_(~keep, 0).div_(1.0 - drop_rate)
            sparse[k] = tau.add_(theta0).to(ft[k].dtype)
        out.append(_in_order(sparse, ft))
    return out


# ---------------------------------------------------------------------- Fisher merging


@torch.no_grad()
def fisher_merging(
    state_dicts: Sequence[StateDict],
    fishers: Sequence[StateDict],
    weights: Sequence[float] | None = None,
    eps: float = 1e-10,
) -> dict[str, torch.Tensor]:
    """Fisher merging: θ = Σ wt Ft ⊙ θt / (Σ wt Ft + eps), per entry.

    Where the weighted Fisher sum is exactly 0 (no model has information about an entry)
    the entry is the plain weighted average instead of ~0/eps. Float tensors with no Fisher
    in any model are weighted-averaged; a key must have a Fisher in all models or in none.
    Weights are normalized to sum to 1 (uniform when None).
    """
    _check_nonempty(state_dicts, "state_dicts")
    _check_same_layout(state_dicts, [f"state_dicts[{i}]" for i in range(len(state_dicts))])
    if len(fishers) != len(state_dicts):
        raise ValueError(f"got {len(fishers)} Fisher dicts for {len(state_dicts)} models.")
    w = _normalized(weights, len(state_dicts))
    ref = state_dicts[0]
    for t, f in enumerate(fishers):
        _check_stats(f, ref, f"fishers[{t}]")
    out = weight_average(state_dicts, w)  # also the answer for keys without Fishers
    for k in _float_keys(ref):
        present = [k in f for f in fishers]
        if not any(present):
            continue
        if not all(present):
            raise ValueError(f"key {k!r} has a Fisher in models {[i for i, p in enumerate(present) if p]} "
                             "but not in the others; give every model a Fisher for it, or none.")
        dtype = _work_dtype(ref[k].dtype)
        num = torch.zeros(ref[k].shape, dtype=dtype, device=ref[k].device)
        den = torch.zeros_like(num)
        for wt, sd, f in zip(w, state_dicts, fishers):
            wf = f[k].to(dtype) * wt
            den.add_(wf)
            num.add_(wf.mul_(_work(sd[k])))
        merged = num.div_(den + eps)
        average = _work(out[k])
        out[k] = torch.where(den == 0, average, merged).to(ref[k].dtype)
    return out


# ----------------------------------------------------------------------------- RegMean


@torch.no_grad()
def regmean(
    state_dicts: Sequence[StateDict],
    grams: Sequence[StateDict],
    alpha: float = 0.9,
) -> dict[str, torch.Tensor]:
    """RegMean: for each linear weight W (out×in) with input Gram matrices Gt (in×in),
    W*ᵀ = (Σt G̃t)⁻¹ Σt G̃t Wtᵀ with G̃ = alpha·G + (1 − alpha)·diag(G).

    ``grams[t][name]`` is the Gram of the inputs to weight ``name`` in model t. Solved with
    ``torch.linalg.solve`` in float64 (Grams of activations are badly conditioned). Float
    tensors without a Gram (embeddings, LayerNorm, biases) are averaged; a key must have a
    Gram in all models or in none.
    """
    _check_nonempty(state_dicts, "state_dicts")
    _check_same_layout(state_dicts, [f"state_dicts[{i}]" for i in range(len(state_dicts))])
    if len(grams) != len(state_dicts):
        raise ValueError(f"got {len(grams)} Gram dicts for {len(state_dicts)} models.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    ref = state_dicts[0]
    for t, g in enumerate(grams):
        for k in g:
            if k in ref and ref[k].dim() != 2:
                raise ValueError(f"grams[{t}] has key {k!r}, but {k!r} is not a 2-D (out×in) weight.")
        _check_stats(g, ref, f"grams[{t}]", shape_of=lambda w: (w.shape[1], w.shape[1]))
    out = weight_average(state_dicts)
    for k in _float_keys(ref):
        present = [k in g for g in grams]
        if not any(present):
            continue
        if not all(present):
            raise ValueError(f"key {k!r} has a Gram in models {[i for i, p in enumerate(present) if p]} "
                             "but not in the others; give every model a Gram for it, or none.")
        lhs = torch.zeros(ref[k].shape[1], ref[k].shape[1], dtype=torch.float64, device=ref[k].device)
        rhs = torch.zeros(ref[k].shape[1], ref[k].shape[0], dtype=torch.float64, device=ref[k].device)
        for sd, g in zip(state_dicts, grams):
            gram = g[k].to(torch.float64)
            shrunk = alpha * gram + (1.0 - alpha) * torch.diag(torch.diagonal(gram))
            lhs.add_(shrunk)
            rhs.add_(shrunk @ sd[k].to(torch.float64).T)
        try:
            solution = torch.linalg.solve(lhs, rhs)
        except torch.linalg.LinAlgError as err:
            raise ValueError(
                f"RegMean: the summed Gram of {k!r} is singular ({err}). Use alpha < 1, more "
                "examples per task, or leave this key out of grams so it is averaged."
            ) from None
        out[k] = solution.T.to(ref[k].dtype).contiguous()
    return out


# ------------------------------------------------------------------- gradient matching


@torch.no_grad()
def gradient_matching(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    hessians: Sequence[StateDict],
    pretrained_hessian: StateDict,
    scale: float = 1.0,
    delta: float = 1e-12,
) -> dict[str, torch.Tensor]:
    """Uncertainty-based gradient matching (Daheim et al. 2024), diagonal form:
    θ = θ0 + α Σt (H0 + α Σs Hs + δ)⁻¹ ⊙ (H0 + Ht + δ) ⊙ τt, α = ``scale``.

    ``hessians[t][k]`` and ``pretrained_hessian[k]`` are diagonals (shaped like the
    parameter), e.g. Ht = Nt·F̂t. Float tensors with no Hessian anywhere get Task Arithmetic
    with the same α (the rule's limit when H0 dominates, i.e. no data information); a key
    with Hessians must have one for every task and for θ0.
    """
    _check_models(pretrained, finetuned)
    if len(hessians) != len(finetuned):
        raise ValueError(f"got {len(hessians)} Hessian dicts for {len(finetuned)} fine-tuned models.")
    _check_stats(pretrained_hessian, pretrained, "pretrained_hessian")
    for t, h in enumerate(hessians):
        _check_stats(h, pretrained, f"hessians[{t}]")
    out = _passthrough(pretrained)
    for k in _float_keys(pretrained):
        present = [k in h for h in hessians] + [k in pretrained_hessian]
        if not any(present):
            out[k] = task_arithmetic({k: pretrained[k]}, [{k: ft[k]} for ft in finetuned], scale)[k]
            continue
        if not all(present):
            raise ValueError(f"key {k!r} has Hessians for some models but not all (tasks, then "
                             f"pretrained: {present}); give it one everywhere, or nowhere.")
        dtype = _work_dtype(pretrained[k].dtype)
        theta0 = _work(pretrained[k])
        h0 = pretrained_hessian[k].to(dtype)
        denom = h0 + delta  # fresh tensor: H0 + α Σs Hs + δ
        for h in hessians:
            denom.add_(h[k].to(dtype), alpha=scale)
        update = torch.zeros_like(theta0)
        for ft, h in zip(finetuned, hessians):
            update.add_((h0 + h[k].to(dtype) + delta).mul_(_work(ft[k]) - theta0))
        out[k] = update.div_(denom).mul_(scale).add_(theta0).to(pretrained[k].dtype)
    return _in_order(out, pretrained)


# ------------------------------------------------------------------------------- SLERP


@torch.no_grad()
def slerp(state_dict_a: StateDict, state_dict_b: StateDict, t: float = 0.5, eps: float = 1e-8) -> dict[str, torch.Tensor]:
    """Spherical interpolation per tensor (flattened), as in mergekit:
    θ = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b, with Ω the angle between a and b.

    Falls back to linear interpolation (1−t)·a + t·b where |cos Ω| > 0.9995
    (``SLERP_COLINEAR_THRESHOLD``) or either tensor has norm below ``eps``.
    """
    _check_same_layout([state_dict_a, state_dict_b], ["state_dict_a", "state_dict_b"])
    out = _passthrough(state_dict_a)
    for k in _float_keys(state_dict_a):
        a, b = _work(state_dict_a[k]), _work(state_dict_b[k])
        norm_a, norm_b = a.norm(), b.norm()
        cos = (a.flatten() @ b.flatten()) / (norm_a * norm_b).clamp(min=eps)
        if min(norm_a, norm_b) < eps or cos.abs() > SLERP_COLINEAR_THRESHOLD:
            merged = torch.lerp(a, b, t)
        else:
            omega = torch.arccos(cos.clamp(-1.0, 1.0))
            sin_omega = torch.sin(omega)
            merged = (torch.sin((1 - t) * omega) / sin_omega) * a + (torch.sin(t * omega) / sin_omega) * b
        out[k] = merged.to(state_dict_a[k].dtype)
    return _in_order(out, state_dict_a)


# ------------------------------------------------------------------------------ registry

# Name → merge function, like mergekit's method registry. Signatures differ (see each
# docstring). ``dare`` is not here: it returns sparsified models for another merge to use.
MERGE_METHODS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "weight_average": weight_average,
    "task_arithmetic": task_arithmetic,
    "ties": ties_merging,
    "fisher": fisher_merging,
    "regmean": regmean,
    "gradient_matching": gradient_matching,
    "slerp": slerp,
}
