"""Permutation and matching merges: Git Re-Basin weight matching and ZipIt!.

METHODS.md §5 (the baselines FS-Merge is compared with in §4 and §6). Both exploit that hidden
units can be reordered without changing a network's function: for a hidden layer with a
permutation matrix P, (P W_l, P b_l) followed by W_{l+1} Pᵀ computes the same function.

**Git Re-Basin** (Ainsworth et al. 2023, "Git Re-Basin: Merging Models modulo Permutation
Symmetries"), weight matching: a *permutation spec* names, for every parameter and every axis,
the permutation acting on that axis (or None). To align model B to model A, each permutation
P_l in turn (random order) is re-solved as a linear assignment

    P_l = argmax_P  Σ_{params touching l} ⟨W_A, P W_B (other permutations held fixed)⟩,

until a full sweep improves nothing (at most ``max_sweeps``, default 100). The aligned models
are then averaged: θ = (θ_A + π(θ_B)) / 2. Specs are given for :class:`~lib.archs.MLP` (one
permutation per hidden layer) and :class:`~lib.archs.ViT` (one residual-stream permutation
shared by all blocks, plus one per block's MLP hidden units).

**ZipIt!** (Stoica et al. 2023, "ZipIt! Merging Models from Different Tasks without
Training"), for two MLPs: at every hidden layer the two models' activations on some inputs
are concatenated (2h features) and paired greedily by correlation, within or across models,
into h merged features. Merging a pair averages it (merge matrix M, h × 2h, entries 1/2) and
unmerging copies the merged feature back to both members (U, 2h × h, entries 1), so layer l
becomes

    W = M_l · blockdiag(W_A, W_B) · U_{l−1},   b = M_l [b_A; b_B],

the same folding as FS-Merge. Defaults: within-model pairs allowed (``allow_within=True``),
every layer zipped (:func:`zipit_merge`; :func:`zipit_partial` stops after ``k``).

Merged models come back with the original architecture and an ``out_unmerge`` (N, d, d)
such that task t's logits are ``head_t(model.features(x) @ out_unmerge[t].T)`` with model
t's own, unchanged head, the convention of :mod:`lib.fs_merge`.

Deviations and simplifications:

- ZipIt! is MLP-only and merges exactly two models (the paper zips ResNets and more models).
- ZipIt!'s correlations come from the original models' activations (not recomputed after
  each zipped layer); no α/β limits on within-model merges (they can be switched off).
- Partial zipping runs the later layers per model on their unmerged inputs.
- Re-Basin's ViT spec does not permute attention's Q/K/V dimensions or heads, only the
  residual stream and the MLP hidden units.
- Re-Basin merges N > 2 models by aligning every model to model 1, then averaging all.
"""
from __future__ import annotations

import copy
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .archs import MLP, activation

# Parameter name → the permutation acting on each axis (None: that axis is not permuted).
PermutationSpec = dict[str, tuple]


def mlp_permutation_spec(num_layers: int) -> PermutationSpec:
    """Spec of an :class:`~lib.archs.MLP` with ``num_layers`` hidden layers: ``hidden{i}`` per layer."""
    spec: PermutationSpec = {}
    for i in range(num_layers):
        spec[f"layers.{i}.weight"] = (f"hidden{i}", f"hidden{i - 1}" if i else None)
        spec[f"layers.{i}.bias"] = (f"hidden{i}",)
    spec["head.weight"] = (None, f"hidden{num_layers - 1}")
    spec["head.bias"] = (None,)
    return spec


def vit_permutation_spec(depth: int) -> PermutationSpec:
    """Spec of a :class:`~lib.archs.ViT`: ``residual`` for the residual stream, ``mlp{i}`` per block.

    One permutation of the residual stream is shared by everything that reads or writes it
    (embeddings, every block's input and output maps, the LayerNorms, which commute with a
    permutation of their features, and ``proj``'s input). ``proj``'s output and the head are
    not permuted, so the features keep their order.
    """
    res = "residual"
    spec: PermutationSpec = {
        "conv1.weight": (res, None, None, None),
        "class_embedding": (res,),
        "positional_embedding": (None, res),
        "ln_pre.weight": (res,),
        "ln_pre.bias": (res,),
        "ln_post.weight": (res,),
        "ln_post.bias": (res,),
        "proj": (res, None),
        "head.weight": (None, None),
        "head.bias": (None,),
    }
    for i in range(depth):
        p, hidden = f"transformer.resblocks.{i}.", f"mlp{i}"
        spec.update(
            {
                p + "ln_1.weight": (res,),
                p + "ln_1.bias": (res,),
                p + "attn.in_proj_weight": (None, res),
                p + "attn.in_proj_bias": (None,),
                p + "attn.out_proj.weight": (res, None),
                p + "attn.out_proj.bias": (res,),
                p + "ln_2.weight": (res,),
                p + "ln_2.bias": (res,),
                p + "mlp.c_fc.weight": (hidden, res),
                p + "mlp.c_fc.bias": (hidden,),
                p + "mlp.c_proj.weight": (res, hidden),
                p + "mlp.c_proj.bias": (res,),
            }
        )
    return spec


def permutation_spec(state_dict: Mapping[str, torch.Tensor]) -> PermutationSpec:
    """The spec that fits a state dict's keys (MLP or ViT)."""
    if "conv1.weight" in state_dict:
        depth = len({k.split(".")[2] for k in state_dict if k.startswith("transformer.resblocks.")})
        return vit_permutation_spec(depth)
    if "layers.0.weight" in state_dict:
        return mlp_permutation_spec(len({k.split(".")[1] for k in state_dict if k.startswith("layers.")}))
    raise ValueError("no permutation spec for this state dict (expected an MLP or a ViT)")


def _permute(weight: torch.Tensor, axes: tuple, perms: Mapping[str, torch.Tensor], skip_axis: int | None = None) -> torch.Tensor:
    for axis, name in enumerate(axes):
        if name is not None and axis != skip_axis:
            weight = weight.index_select(axis, perms[name].to(weight.device))
    return weight


def apply_permutation(
    state_dict: Mapping[str, torch.Tensor], perms: Mapping[str, torch.Tensor], spec: PermutationSpec | None = None
) -> dict[str, torch.Tensor]:
    """Reorder a state dict's units: along an axis with permutation p, new unit k = old unit p[k].

    Keys the spec does not mention are returned unchanged.
    """
    spec = spec if spec is not None else permutation_spec(state_dict)
    return {k: _permute(v, spec[k], perms) if k in spec else v for k, v in state_dict.items()}


def weight_matching(
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    spec: PermutationSpec | None = None,
    max_sweeps: int = 100,
    seed: int = 0,
    exclude: Sequence[str] = ("head.",),
) -> dict[str, torch.Tensor]:
    """Permutations that align B's units to A's (apply them to B with :func:`apply_permutation`).

    Parameters whose names start with a prefix in ``exclude`` do not enter the matching
    cost (by default the task heads, which differ between tasks), but are still permuted by
    :func:`apply_permutation`.
    """
    spec = spec if spec is not None else permutation_spec(state_a)
    matched = [k for k in spec if not k.startswith(tuple(exclude))]
    # Which (parameter, axis) pairs each permutation acts on, and its size.
    touches: dict[str, list[tuple[str, int]]] = {}
    sizes: dict[str, int] = {}
    for key in spec:
        for axis, name in enumerate(spec[key]):
            if name is not None:
                sizes[name] = state_a[key].shape[axis]
                if key in matched:
                    touches.setdefault(name, []).append((key, axis))
    a = {k: state_a[k].detach().double().cpu() for k in matched}
    b = {k: state_b[k].detach().double().cpu() for k in matched}
    perms = {name: torch.arange(n) for name, n in sizes.items()}
    rng = np.random.default_rng(seed)
    names = sorted(touches)
    for _ in range(max_sweeps):
        improved = False
        for name in rng.permutation(names):
            n = sizes[name]
            # similarity[i, j] = Σ ⟨A's unit i, B's unit j⟩ over the parameters the permutation touches
            similarity = torch.zeros(n, n, dtype=torch.float64)
            for key, axis in touches[name]:
                wa = a[key].movedim(axis, 0).reshape(n, -1)
                wb = _permute(b[key], spec[key], perms, skip_axis=axis).movedim(axis, 0).reshape(n, -1)
                similarity += wa @ wb.T
            _, assignment = linear_sum_assignment(similarity.numpy(), maximize=True)
            assignment = torch.as_tensor(assignment)
            old = similarity[torch.arange(n), perms[name]].sum()
            new = similarity[torch.arange(n), assignment].sum()
            if new > old + 1e-12 * max(1.0, abs(float(old))):
                perms[name] = assignment
                improved = True
        if not improved:
            break
    return perms


def _feature_unmerge(spec: PermutationSpec, perms: Mapping[str, torch.Tensor], feature_dim: int) -> torch.Tensor:
    """The matrix that maps the permuted model's features back to the original order."""
    name = spec["head.weight"][1]
    if name is None:
        return torch.eye(feature_dim)
    perm = perms[name]
    # permuted features z[k] = f[perm[k]], so f = Pᵀ z with P[k, perm[k]] = 1
    return torch.eye(feature_dim)[perm].T.contiguous()


@torch.no_grad()
def rebasin_merge(
    models: Sequence[nn.Module], max_sweeps: int = 100, seed: int = 0
) -> tuple[nn.Module, torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Align every model to model 1 by weight matching, then average.

    Returns ``(model, out_unmerge, perms)``: the average (a copy of model 1's class; its
    head is model 1's, unused), out_unmerge (N, d_feat, d_feat) giving each task's feature
    order (a permutation matrix, the identity for the ViT), and the permutations per model.
    """
    state_a = models[0].state_dict()
    spec = permutation_spec(state_a)
    aligned, all_perms, unmerges = [state_a], [{}], [torch.eye(models[0].feature_dim)]
    for model in models[1:]:
        perms = weight_matching(state_a, model.state_dict(), spec, max_sweeps, seed)
        aligned.append(apply_permutation(model.state_dict(), perms, spec))
        all_perms.append(perms)
        unmerges.append(_feature_unmerge(spec, perms, models[0].feature_dim))
    merged = copy.deepcopy(models[0])
    average = {k: torch.stack([s[k] for s in aligned]).mean(0) for k in state_a if not k.startswith("head.")}
    merged.load_state_dict({**state_a, **average})
    out_unmerge = torch.stack(unmerges).to(state_a["head.weight"])  # the models' device and dtype
    return merged, out_unmerge, all_perms


def feature_correlation(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation between the columns of (n, k) features; a constant column correlates 0."""
    centred = features - features.mean(0)
    standardised = centred / (centred.pow(2).mean(0).sqrt() + eps)
    return standardised.T @ standardised / features.shape[0]


def zip_matrices(correlation: torch.Tensor, num_models: int = 2, allow_within: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ZipIt! pairing of 2h features into h: returns (merge M: h × 2h, unmerge U: 2h × h).

    Repeatedly takes the most correlated pair of still-unpaired features (across models, or
    also within one model if ``allow_within``). Merged features are ordered by their
    smaller member's index, so zipping a model with a permuted copy of itself keeps the
    first model's order.
    """
    if num_models != 2:
        raise RuntimeError("this ZipIt! implementation merges two models")
    total = correlation.shape[0]
    width = total // 2
    score = correlation.double().clone()
    score.fill_diagonal_(-torch.inf)
    if not allow_within:
        score[:width, :width] = -torch.inf
        score[width:, width:] = -torch.inf
    pairs = []
    for _ in range(width):
        i, j = divmod(int(score.argmax()), total)
        pairs.append((min(i, j), max(i, j)))
        score[[i, j], :] = -torch.inf
        score[:, [i, j]] = -torch.inf
    pairs.sort()
    merge = torch.zeros(width, total)
    unmerge = torch.zeros(total, width)
    for k, (i, j) in enumerate(pairs):
        merge[k, [i, j]] = 0.5
        unmerge[[i, j], k] = 1.0
    return merge, unmerge


def _as_batches(inputs: torch.Tensor | Iterable) -> Iterable[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    return (batch[0] if isinstance(batch, (tuple, list)) else batch for batch in inputs)


@torch.no_grad()
def _zip_mlp_layers(models: Sequence[MLP], inputs, num_layers: int, allow_within: bool):
    """Zipped (weight, bias) of the first ``num_layers`` layers and the last layer's unmerge (N, h, h)."""
    per_layer = [[] for _ in models[0].layers]
    for x in _as_batches(inputs):
        x = x.to(models[0].head.weight.device)
        acts = [m.hidden_activations(x) for m in models]
        for layer in range(len(per_layer)):
            per_layer[layer].append(torch.cat([a[layer] for a in acts], dim=1))
    zipped, unmerge = [], None
    for layer in range(num_layers):
        merge, next_unmerge = zip_matrices(feature_correlation(torch.cat(per_layer[layer]).double()), len(models), allow_within)
        weights = [m.layers[layer].weight.double().cpu() for m in models]
        biases = [m.layers[layer].bias.double().cpu() for m in models]
        stacked = torch.block_diag(*weights) if unmerge is not None else torch.cat(weights)
        previous = torch.cat(list(unmerge)) if unmerge is not None else torch.eye(weights[0].shape[1], dtype=torch.float64)
        merge = merge.double()
        zipped.append((merge @ stacked @ previous, merge @ torch.cat(biases)))
        # next_unmerge is (2h, h): split into the per-model blocks U_t (h × h)
        unmerge = next_unmerge.double().unflatten(0, (len(models), -1))
    return zipped, unmerge


def zipit_merge(models: Sequence[MLP], inputs: torch.Tensor | Iterable, allow_within: bool = True) -> tuple[MLP, torch.Tensor]:
    """Zip two MLPs at every hidden layer: ``(model, out_unmerge)``, model of the original architecture.

    ``inputs`` (a tensor or batches) provide the activations whose correlations decide the
    pairing. Task t's logits: ``head_t(model.features(x) @ out_unmerge[t].T)``.
    """
    zipped, unmerge = _zip_mlp_layers(models, inputs, len(models[0].layers), allow_within)
    merged = copy.deepcopy(models[0])
    reference = merged.head.weight
    with torch.no_grad():
        for layer, (weight, bias) in zip(merged.layers, zipped):
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    return merged, unmerge.to(reference.dtype).to(reference.device)


class PartialZip(nn.Module):
    """Two MLPs zipped up to hidden layer k; later layers and the heads run per model.

    features(x, task) = model ``task``'s later layers applied to U_t z_k, where z_k is the
    zipped trunk's output; with k = all layers it equals the full zip's U_t z.
    """

    def __init__(self, models: Sequence[MLP], zipped, unmerge: torch.Tensor):
        super().__init__()
        dtype = models[0].head.weight.dtype
        self.activation = models[0].activation
        self.trunk = nn.ModuleList()
        for weight, bias in zipped:
            linear = nn.Linear(weight.shape[1], weight.shape[0])
            linear.weight.data.copy_(weight)
            linear.bias.data.copy_(bias)
            self.trunk.append(linear.to(dtype))
        self.register_buffer("unmerge", unmerge.to(dtype))
        k = len(zipped)
        self.tails = nn.ModuleList(nn.ModuleList(copy.deepcopy(list(m.layers[k:]))) for m in models)
        self.heads = nn.ModuleList(copy.deepcopy(m.head) for m in models)

    def features(self, x: torch.Tensor, task: int) -> torch.Tensor:
        h = x.flatten(1)
        for layer in self.trunk:
            h = activation(self.activation, layer(h))
        h = h @ self.unmerge[task].T
        for layer in self.tails[task]:
            h = activation(self.activation, layer(h))
        return h

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.heads[task](self.features(x, task))


def zipit_partial(models: Sequence[MLP], inputs: torch.Tensor | Iterable, num_zipped: int, allow_within: bool = True) -> PartialZip:
    """Zip the first ``num_zipped`` hidden layers (≥ 1) and keep the rest unmerged per model."""
    if not 1 <= num_zipped <= len(models[0].layers):
        raise ValueError(f"num_zipped must be in 1..{len(models[0].layers)}")
    zipped, unmerge = _zip_mlp_layers(models, inputs, num_zipped, allow_within)
    return PartialZip(models, zipped, unmerge).to(models[0].head.weight.device)
