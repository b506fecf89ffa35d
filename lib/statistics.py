"""Data statistics that merges consume: per-example gradients, diagonal Fisher, Gram matrices.

Formulas (METHODS.md §1), each a ``dict[str, Tensor]`` keyed by parameter name (as in
``model.named_parameters()``), on CPU, float32:

- Diagonal Fisher (Fisher merging, Matena & Raffel 2022, NeurIPS; gradient matching, Daheim
  et al. 2024, ICLR): F = (1/N) Σ_n (∇θ log p(ŷ_n|x_n))², ŷ_n ~ p(·|x_n) drawn from the
  model itself (default ``label_mode="sample"``, ``seed=0``; "expected" takes the expectation
  over ŷ exactly, "true" gives the empirical Fisher). :func:`hessian_estimate`: H = N·F.
- Gram matrices (RegMean, Jin et al. 2023, ICLR): G = XᵀX of every linear layer's inputs,
  one row per real (unpadded) token or example, SUMMED over rows; ``return_counts=True`` also
  gives each Gram's row count (a plain ``int``). Normalising by that count (RegMean's
  default, as in the public implementations) happens in ``lib.merging.regmean``
  (``gram_normalization``), not here.

These are computed apart from the merges that use them (callers cache them); nothing here
does I/O.

- :func:`per_example_grads`: ∇θ −log p(y|x) for every example of a batch, by
  ``vmap(grad(...))`` over :func:`lib.functional.functional_forward`.
- :func:`sum_sq_grads`: Σ_b w_b (∇θ −log p(y_b|x_b))², the accumulator behind the Fisher, by
  one of three exact methods: ``"vmap"`` (default), ``"loop"`` (batch-size-1 autograd, the
  reference) or ``"hooks"`` (BackPACK-style, from layer inputs and output gradients of one
  batched backward pass; much faster for Transformers, see :func:`sum_sq_grads`).
- :func:`diagonal_fisher`: the diagonal Fisher above; :func:`hessian_estimate` = N·F.
- :func:`gram_matrices`: XᵀX of every linear (and unfoldable Conv2d) layer's inputs.

Every Fisher, Gram and Hessian returned is checked (:func:`check_statistic`): NaN or ±Inf
entries, or a statistic that is zero in every tensor, raise a ``ValueError`` naming the tensor
and what to check, instead of flowing into a merge (a zero Fisher turns Fisher merging into a
plain average without a word).

The model is put in eval mode (no dropout; BatchNorm uses its running statistics) while a
statistic is computed and each submodule's mode is restored afterwards. Eval mode also
matters for correctness: it makes examples independent of each other within a batch, which
per-example gradients assume.
"""
from __future__ import annotations

import functools
import math
from numbers import Real
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap
from tqdm.auto import tqdm

from .functional import (
    LABEL_KEY,
    attend,
    batch_size,
    detached_params,
    eval_mode,
    example_at_own_length,
    functional_forward,
    model_device,
    model_inputs,
    param_names_of,
    self_attention_input,
    slice_batch,
    to_device,
)

Batch = Mapping[str, Tensor]
LabelTerm = tuple[Tensor, "Tensor | None"]  # (labels [B], example weights [B] or None)


# ----------------------------------------------------------------------------------------
# Per-example gradients
# ----------------------------------------------------------------------------------------

def negative_log_likelihood(outputs: Tensor, labels: Tensor) -> Tensor:
    """−log p(label_b | x_b) of each example, [B], from a model's outputs [B, C]: the softmax's
    over C ≥ 2 classes; for a single output (a regression, GLUE's STS-B) the Gaussian's of unit
    variance centred on it, ½ (label − output)² up to a constant, whose gradient is that of the
    mean squared error the regression trained with."""
    if outputs.shape[-1] == 1:
        return 0.5 * (labels.float() - outputs[..., 0].float()) ** 2
    # gather, not [b, label]: indexing with a vmapped label would need its value.
    return -torch.log_softmax(outputs.float(), dim=-1).gather(-1, labels[..., None]).squeeze(-1)


def _nll_of_one(model: nn.Module, params: dict[str, Tensor], example: dict[str, Tensor], label: Tensor) -> Tensor:
    """−log p(label | example) for ONE example (tensors without the batch dimension)."""
    inputs = {k: v.unsqueeze(0) for k, v in example.items()}
    logits = functional_forward(model, params, inputs)
    return negative_log_likelihood(logits, label.reshape(1))[0]


_VMAP_HINT = (
    "torch.func.vmap could not trace the model (data-dependent control flow). HuggingFace "
    "encoders, for one, do this when given a 2-D attention_mask: pass them a 4-D additive mask "
    "(lib.functional.additive_attention_mask) instead, or use method='hooks' / 'loop'."
)


def per_example_grads(
    model: nn.Module,
    batch: Batch,
    param_names: Iterable[str] | None = None,
    labels: Tensor | None = None,
    chunk_size: int | None = 16,
) -> dict[str, Tensor]:
    """Gradient of each example's NLL −log p(y_b | x_b): ``{name: Tensor[B, *shape]}``.

    ``labels`` default to ``batch["labels"]``. The batch is vmapped ``chunk_size`` examples
    at a time (``None``: all at once); memory grows with ``chunk_size × number of
    parameters``. Results are float32 on the model's device.
    """
    device = model_device(model)
    batch = to_device(batch, device)
    labels = (batch[LABEL_KEY] if labels is None else labels).to(device)
    inputs = model_inputs(batch)
    with eval_mode(model):
        params = detached_params(model, param_names)

        def loss(p, example, label):
            return _nll_of_one(model, p, example, label)

        per_example = vmap(grad(loss), in_dims=(None, 0, 0), chunk_size=chunk_size)
        try:
            # No outer autograd graph is needed: torch.func.grad does its own bookkeeping.
            with torch.no_grad():
                grads = per_example(params, inputs, labels)
        except RuntimeError as err:
            if "vmap" in str(err) and "data-dependent" in str(err):
                raise RuntimeError(_VMAP_HINT) from err
            raise
    return {n: g.float() for n, g in grads.items()}


def per_example_grads_loop(
    model: nn.Module,
    batch: Batch,
    param_names: Iterable[str] | None = None,
    labels: Tensor | None = None,
) -> dict[str, Tensor]:
    """The reference for :func:`per_example_grads`: plain autograd, one example at a time,
    each at its own length (:func:`lib.functional.example_at_own_length`)."""
    device = model_device(model)
    batch = to_device(batch, device)
    labels = (batch[LABEL_KEY] if labels is None else labels).to(device)
    inputs = model_inputs(batch)
    with eval_mode(model):
        params = {n: p.detach().requires_grad_() for n, p in detached_params(model, param_names).items()}
        rows = []
        for b in range(labels.shape[0]):
            example = example_at_own_length(inputs, b)
            g = torch.autograd.grad(_nll_of_one(model, params, example, labels[b]), list(params.values()), allow_unused=True)
            rows.append([torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params.values())])
    return {n: torch.stack([r[i] for r in rows]).float() for i, n in enumerate(params)}


# ----------------------------------------------------------------------------------------
# Sums of squared per-example gradients
# ----------------------------------------------------------------------------------------

def _weighted_sq_sum(per_example: Tensor, weights: Tensor | None) -> Tensor:
    """Σ_b w_b g_b² over the leading (example) dimension."""
    sq = per_example.float().square()
    if weights is None:
        return sq.sum(0)
    return torch.tensordot(weights.float(), sq, dims=1)


def _sum_sq_grads_vmap(model, batch, names, labels, weights, chunk_size):
    total: dict[str, Tensor] = {}
    step = chunk_size or batch_size(batch)
    # Square and reduce chunk by chunk so that at most chunk_size per-example gradients
    # exist at a time.
    for start in range(0, labels.shape[0], step):
        stop = start + step
        grads = per_example_grads(model, slice_batch(batch, start, stop), names, labels[start:stop], chunk_size=None)
        w = None if weights is None else weights[start:stop]
        for n, g in grads.items():
            s = _weighted_sq_sum(g, w)
            total[n] = s if n not in total else total[n] + s
    return total


def per_example_sq_grads_loop(
    model: nn.Module,
    batch: Batch,
    param_names: Iterable[str] | None = None,
    labels: Tensor | None = None,
    weights: Tensor | None = None,
) -> dict[str, Tensor]:
    """Σ_b w_b (∇θ −log p(y_b|x_b))² by plain autograd, one example at a time.

    The reference that the faster methods of :func:`sum_sq_grads` are tested and timed
    against, written as one would by hand: each example at its own length (no padding to
    compute over, :func:`lib.functional.example_at_own_length`), squares accumulated in
    place into one running total.
    """
    device = model_device(model)
    batch = to_device(batch, device)
    labels = (batch[LABEL_KEY] if labels is None else labels).to(device)
    inputs = model_inputs(batch)
    with eval_mode(model):
        params = {n: p.detach().requires_grad_() for n, p in detached_params(model, param_names).items()}
        total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        for b in range(labels.shape[0]):
            example = example_at_own_length(inputs, b)
            g = torch.autograd.grad(_nll_of_one(model, params, example, labels[b]), list(params.values()), allow_unused=True)
            w = 1.0 if weights is None else float(weights[b])
            for n, gi in zip(params, g):
                if gi is not None:
                    total[n].addcmul_(gi, gi, value=w)
    return total


def sum_sq_grads(
    model: nn.Module,
    batch: Batch,
    param_names: Iterable[str] | None = None,
    labels: Tensor | None = None,
    weights: Tensor | None = None,
    method: str = "vmap",
    chunk_size: int | None = 16,
) -> dict[str, Tensor]:
    """Σ_b w_b (∇θ −log p(y_b|x_b))², elementwise: ``{name: Tensor[*shape]}`` (model's device).

    ``weights`` (``[B]``, default all ones) weight the examples; ``labels`` default to
    ``batch["labels"]``. The three methods compute the same exact quantity:

    - ``"vmap"``: :func:`per_example_grads`, ``chunk_size`` examples at a time.
    - ``"loop"``: :func:`per_example_sq_grads_loop`, one example at a time (the reference).
    - ``"hooks"``: one batched forward/backward; for ``nn.Linear``, ``nn.Embedding`` and
      ``nn.LayerNorm`` the per-example gradient is rebuilt from each layer's input and the
      gradient at its output (e.g. Σ_t g_bt x_btᵀ for a Linear weight), squared and summed
      over examples (BackPACK's "sum of squared gradients"). Parameters of any other kind
      (convolutions, BatchNorm, bare ``nn.Parameter``\\ s) fall back to ``"vmap"``, which
      then costs a full vmapped pass; restrict ``param_names`` to avoid that.
    """
    device = model_device(model)
    batch = to_device(batch, device)
    labels = (batch[LABEL_KEY] if labels is None else labels).to(device)
    weights = None if weights is None else weights.to(device)
    names = param_names_of(model, param_names)
    if method == "vmap":
        return _sum_sq_grads_vmap(model, batch, names, labels, weights, chunk_size)
    if method == "loop":
        return per_example_sq_grads_loop(model, batch, names, labels, weights)
    if method == "hooks":
        def given(logits: Tensor, start: int, stop: int) -> list[LabelTerm]:
            return [(labels[start:stop], None if weights is None else weights[start:stop])]

        return _sum_sq_grads_hooks(model, batch, names, given, chunk_size)
    raise ValueError(f"unknown method {method!r}: use 'vmap', 'loop' or 'hooks'")


# --- the "hooks" method -----------------------------------------------------------------
#
# For a layer applied position-wise, y_bt = f(x_bt; θ), the gradient of example b's loss
# is Σ_t (∂y_bt/∂θ)ᵀ g_bt with g_bt = ∂loss_b/∂y_bt. In eval mode examples do not interact,
# so g_bt of the summed loss Σ_b loss_b equals g_bt of loss_b alone: one batched backward
# pass gives every g_bt, and each layer's per-example gradient is a small product of
# tensors already at hand. A module called several times (shared weights) adds up its
# calls' per-example gradients before squaring.

_HOOKABLE = (nn.Linear, nn.Embedding, nn.LayerNorm)


def _hookable(module: nn.Module) -> bool:
    if isinstance(module, nn.Embedding):
        # max_norm renormalises rows in place and scale_grad_by_freq rescales gradients:
        # both break the plain "sum of output gradients" rule, so leave them to vmap.
        return module.max_norm is None and not module.scale_grad_by_freq and not module.sparse
    if isinstance(module, nn.LayerNorm):
        return module.elementwise_affine
    return isinstance(module, nn.Linear)


def _per_example_layer_grads(module: nn.Module, x: Tensor, g: Tensor, linear_weight: bool = True) -> dict[str, Tensor]:
    """Per-example gradients of the parameters of an ``nn.Linear`` or ``nn.LayerNorm`` from
    its input ``x`` and the gradient ``g`` at its output, both ``[B, ...]``:
    ``{"weight": [B, *shape], "bias": [B, *shape]}`` (a Linear's weight only if asked).
    """
    B = g.shape[0]
    out: dict[str, Tensor] = {}
    if isinstance(module, nn.Linear):
        x3, g3 = x.reshape(B, -1, x.shape[-1]).float(), g.reshape(B, -1, g.shape[-1]).float()
        if linear_weight:
            out["weight"] = torch.einsum("bto,bti->boi", g3, x3)
        if module.bias is not None:
            out["bias"] = g3.sum(1)
    elif isinstance(module, nn.LayerNorm):
        x_hat = F.layer_norm(x.float(), module.normalized_shape, eps=module.eps)  # no affine: x̂
        shape = (B, -1, *module.normalized_shape)
        out["weight"] = (g.float() * x_hat).reshape(shape).sum(1)
        if module.bias is not None:
            out["bias"] = g.float().reshape(shape).sum(1)
    return out


def _linear_weight_sq_sum_(total: Tensor, x: Tensor, g: Tensor, weights: Tensor | None) -> None:
    """Add Σ_b w_b (G_bᵀ X_b)² to ``total`` (out × in) in place, where X_b [T, in] and
    G_b [T, out] are example b's layer inputs and output gradients over its T positions.

    One example at a time into a reused buffer: a batched ``[B, out, in]`` tensor costs
    more (fresh memory to fault in, slower batched matmul on CPU) than it saves. (Squaring
    (Σ_t g_t x_tᵀ)² as Σ_{t,t'} (g_t∘g_t')(x_t∘x_t')ᵀ, one matrix product for all examples,
    avoids the per-example pass over out×in but needs T(T+1)/2 rows per example; measured on
    MiniLM it won only for inputs of at most about 5 tokens, so it is not used.)
    """
    B = g.shape[0]
    x3, g3 = x.reshape(B, -1, x.shape[-1]).float(), g.reshape(B, -1, g.shape[-1]).float()
    # Positions whose output gradient is exactly zero add nothing: padding that the model
    # masks out gets none. Cutting each example after its last position with a gradient
    # skips that work (exactly: the rows cut are zero).
    live = g3.ne(0).any(-1)  # [B, T]
    ends = torch.where(live.any(1), live.shape[1] - live.flip(1).to(torch.int8).argmax(1), 0).tolist()
    buffer = torch.empty_like(total)
    for b, end in enumerate(ends):
        if end == 0:
            continue
        torch.mm(g3[b, :end].T, x3[b, :end], out=buffer)
        total.addcmul_(buffer, buffer, value=1.0 if weights is None else float(weights[b]))


def _embedding_sq_sum_(total: Tensor, module: nn.Embedding, ids: Tensor, g: Tensor, weights: Tensor | None) -> None:
    """Add Σ_b w_b (per-example gradient of the embedding table)² to ``total`` in place,
    touching only the rows in use (a dense per-example table would be mostly zeros)."""
    B, V = g.shape[0], module.num_embeddings
    ids = ids.reshape(B, -1)
    g = g.reshape(B, ids.shape[1], -1).float()
    example = torch.arange(B, device=ids.device)[:, None].expand_as(ids)
    keep = torch.ones_like(ids, dtype=torch.bool) if module.padding_idx is None else ids != module.padding_idx
    # One row per (example, token id): the sum of g over that example's positions with the id.
    keys, where = torch.unique((example * V + ids)[keep], return_inverse=True)
    rows = torch.zeros(keys.shape[0], g.shape[-1], device=g.device).index_add_(0, where, g[keep])
    sq = rows.square_()
    if weights is not None:
        sq = sq * weights.float()[keys // V, None]
    total.index_add_(0, keys % V, sq)


def _sum_sq_grads_hooks(model, batch, names, label_terms, chunk_size):
    """The "hooks" method: ``{name: Σ_b w_b g_b²}`` for ``names``, in that order.

    ``label_terms(logits, start, stop)`` gives, from a chunk's logits (detached), a list of
    (labels, weights) for examples ``start:stop``; each term adds Σ_b w_b g_b² with g_b the
    gradient of −log p(labels_b | x_b), all from the one forward pass (a Fisher that samples
    its labels from the model needs no forward pass of its own). Parameters no hook covers
    are left to vmap, with the same labels and weights.

    Layers must be batch-first (the leading dimension of a layer's input and output is
    the example, or 1 for an input shared by the whole batch), and their inputs and
    outputs must not be modified in place afterwards (checked).
    """
    wanted = set(names)
    # A tensor reachable under several names (tied weights) gets gradient from several
    # modules; leave it to vmap rather than track every owner.
    aliases: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    tied = {n for group in aliases.values() if len(group) > 1 for n in group}
    owners: dict[nn.Module, dict[str, str]] = {}  # module -> {local name: full name}
    for mod_name, module in model.named_modules():
        if not (isinstance(module, _HOOKABLE) and _hookable(module)):
            continue
        local = {pn: f"{mod_name}.{pn}" if mod_name else pn for pn, _ in module.named_parameters(recurse=False)}
        if any(full in wanted for full in local.values()) and not tied & set(local.values()):
            owners[module] = local
    covered = {full for local in owners.values() for full in local.values()}
    rest = [n for n in names if n not in covered]

    n_examples = batch_size(batch)
    step = chunk_size or n_examples
    used: dict[int, list[LabelTerm]] = {}  # term index -> its (labels, weights) chunk by chunk
    with eval_mode(model):
        # Parameters we differentiate must require grad so that the hooked outputs are
        # part of the graph; fresh leaves keep the module untouched.
        params = {n: p.detach().requires_grad_() for n, p in detached_params(model, covered).items()}
        total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        for start in range(0, n_examples, step):
            chunk = slice_batch(batch, start, start + step)
            B = batch_size(chunk)
            calls: list[tuple[nn.Module, Tensor, Tensor]] = []
            versions: list[tuple[int, int]] = []

            def save(module, args, output):
                x = args[0].detach()
                if output.shape[0] != B:
                    if output.shape[0] != 1:
                        raise ValueError(f"{type(module).__name__} output {tuple(output.shape)} has no batch dimension of {B}")
                    # An input shared by the whole batch (BERT's position ids are [1, L]):
                    # give each example its own copy, so that the gradient reaching it is
                    # per example. The values downstream are unchanged (same broadcast).
                    x = x.expand(B, *x.shape[1:])
                    output = output.expand(B, *output.shape[1:])
                calls.append((module, x, output))
                versions.append((x._version, output._version))
                return output

            handles = [m.register_forward_hook(save) for m in owners]
            try:
                logits = functional_forward(model, params, model_inputs(chunk))
            finally:
                for h in handles:
                    h.remove()
            if any((x._version, o._version) != v for (_, x, o), v in zip(calls, versions)):
                # e.g. ReLU(inplace=True) after a Linear: the saved input or output no longer
                # holds the values the layer saw, and a gradient taken at it would be wrong.
                raise RuntimeError("a layer's input or output is modified in place: use method='vmap'")
            uses: dict[nn.Module, int] = {}
            for module, _, _ in calls:
                uses[module] = uses.get(module, 0) + 1
            if any(n > 1 for m, n in uses.items() if isinstance(m, nn.Embedding)):
                # The row-wise embedding rule squares each call on its own.
                raise RuntimeError("an nn.Embedding called twice in one forward: use method='vmap'")
            terms = label_terms(logits.detach(), start, start + B)
            # An output outside the graph (computed under no_grad) gets no gradient at all.
            in_graph = [o for _, _, o in calls if o.requires_grad]
            for i, (labels, w) in enumerate(terms):
                used.setdefault(i, []).append((labels, w))
                loss = negative_log_likelihood(logits, labels).sum()
                more = i + 1 < len(terms)  # keep the graph for the next term's backward pass
                found = iter(torch.autograd.grad(loss, in_graph, allow_unused=True, retain_graph=more) if in_graph else [])
                gs = [next(found) if o.requires_grad else None for _, _, o in calls]
                _add_layer_sq_sums_(total, owners, uses, calls, gs, w)
    sums = {n: total[n] for n in covered if n in wanted}
    # Parameters no hook covers: vmap, once per label term, over the whole batch.
    rest_terms = used.values() if rest else []
    for parts in rest_terms:
        labels = torch.cat([y for y, _ in parts])
        weights = None if parts[0][1] is None else torch.cat([w for _, w in parts])
        for n, s in _sum_sq_grads_vmap(model, batch, rest, labels, weights, chunk_size).items():
            sums[n] = s if n not in sums else sums[n] + s
    return {n: sums[n] for n in names}


def _add_layer_sq_sums_(total, owners, uses, calls, gs, weights) -> None:
    """Add Σ_b w_b g_b² of every hooked parameter to ``total``, from each call's (module,
    input, output) and the gradient ``gs`` at that output (None: no gradient reached it)."""
    shared: dict[str, Tensor] = {}  # per-example gradients of modules called more than once
    for (module, x, o), g in zip(calls, gs):
        g = torch.zeros_like(o) if g is None else g
        full_name = owners[module]
        if isinstance(module, nn.Embedding):
            _embedding_sq_sum_(total[full_name["weight"]], module, x, g, weights)
            continue
        once = uses[module] == 1
        if once and isinstance(module, nn.Linear):
            # The bulk of the work: squared into the total example by example.
            _linear_weight_sq_sum_(total[full_name["weight"]], x, g, weights)
        for local, pe in _per_example_layer_grads(module, x, g, linear_weight=not once).items():
            if once:
                total[full_name[local]] += _weighted_sq_sum(pe, weights)
            else:  # a shared module's calls add up before squaring
                shared[full_name[local]] = pe + shared.get(full_name[local], 0)
    for full, pe in shared.items():
        total[full] += _weighted_sq_sum(pe, weights)


# ----------------------------------------------------------------------------------------
# Fisher and Hessian estimates
# ----------------------------------------------------------------------------------------

# What to check when a statistic is non-finite or zero everywhere.
_FISHER_ADVICE = {
    "nonfinite": "the model's outputs or gradients overflowed: check its weights for NaN/Inf (a diverged "
                 "fine-tuning run, a damaged file) and that the inputs are finite.",
    "zero": "no gradient reached these parameters: check that param_names names parameters the loss "
            "depends on (not frozen or unused ones), that the batches hold real examples, and that the "
            "model's predictions are not saturated (every probability 0 or 1 gives zero gradients).",
}
_GRAM_ADVICE = {
    "nonfinite": "the layer inputs overflowed: check the model's weights and the batches' inputs for NaN/Inf.",
    "zero": "every input to these layers was zero: check the batches (all-zero or all-padding inputs, an "
            "attention_mask of zeros) and linear_names.",
}


def check_statistic(stat: Mapping[str, Tensor], what: str, advice: Mapping[str, str]) -> None:
    """Raise ValueError if a tensor of ``stat`` has NaN/±Inf entries, or if every tensor is all zero.

    A single zero tensor is allowed: some parameters get no gradient by construction (a
    self-attention key bias) and some layers see only zeros (a dead ReLU's successor). A
    statistic that is zero everywhere, though, carries no information, and the merges would
    quietly fall back to averaging."""
    for name, t in stat.items():
        if not bool(torch.isfinite(t).all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise ValueError(f"the {what} of {name!r} has {nan} NaN and {inf} Inf entries (of {t.numel():,}): "
                             f"{advice['nonfinite']}")
    if stat and not any(bool(t.any()) for t in stat.values()):
        names = list(stat)
        raise ValueError(f"the {what} is zero in all {len(names)} tensors ({', '.join(names[:3])}"
                         f"{', ...' if len(names) > 3 else ''}): {advice['zero']}")


def _checked(compute: Callable, what: str, advice: Mapping[str, str]) -> Callable:
    """``compute`` with its result passed through :func:`check_statistic`.

    Applied after the definition (``f = _checked(f, ...)``), not as a decorator: callers key
    cached statistics by the source of ``diagonal_fisher`` and ``gram_matrices``
    (``lib.experiments.cache.code_hash``, which unwraps), and a check that changes no result
    must not invalidate every cached statistic."""

    @functools.wraps(compute)
    def checked(*args, **kwargs):
        result = compute(*args, **kwargs)
        check_statistic(result[0] if isinstance(result, tuple) else result, what, advice)
        return result

    return checked


def _batches_upto(batches: Iterable[Batch], max_examples: int | None):
    """Yield batches, cutting the last one so that at most ``max_examples`` are seen."""
    seen = 0
    for batch in batches:
        if max_examples is not None:
            if seen >= max_examples:
                return
            batch = slice_batch(batch, 0, max_examples - seen)
        seen += batch_size(batch)
        yield batch


def _label_terms(label_mode: str, logits: Tensor | None, labels: Tensor, generator: torch.Generator) -> list[LabelTerm]:
    """The (labels, weights) whose squared gradients make up the Fisher of one batch."""
    if label_mode == "true":
        return [(labels, None)]
    if logits.shape[-1] == 1:  # a regression: the model's distribution is N(output, 1)
        outputs = logits.detach().float()[:, 0]
        if not bool(torch.isfinite(outputs).all()):
            raise ValueError(f"the model's outputs are NaN or Inf for {int((~torch.isfinite(outputs)).sum())} of "
                             f"{len(outputs)} examples, so no Fisher can be computed. Check the model's weights.")
        if label_mode == "sample":  # drawn on CPU, as the class labels below
            noise = torch.randn(len(outputs), generator=generator).to(outputs.device)
            return [(outputs + noise, None)]
        # "expected": E_y[(y − output)²] = 1, so the squared gradient at a residual of exactly 1
        # is the Fisher, without sampling noise
        return [(outputs - 1, None)]
    probs = torch.softmax(logits.detach().float(), dim=-1)
    if not bool(torch.isfinite(probs).all()):  # else multinomial fails with a message naming nothing
        raise ValueError(f"the model's outputs are NaN or Inf for {int((~torch.isfinite(probs)).any(-1).sum())} of "
                         f"{len(probs)} examples, so no Fisher can be computed. Check the model's weights for "
                         "NaN/Inf (a diverged fine-tuning run, a damaged file) and that the inputs are finite.")
    if label_mode == "sample":
        # Drawn on CPU so that the draws do not depend on the device; drawing a batch in
        # chunks gives the same labels as drawing it at once.
        return [(torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(probs.device), None)]
    B, C = probs.shape
    return [(torch.full((B,), c, device=probs.device), probs[:, c]) for c in range(C)]


def diagonal_fisher(
    model: nn.Module,
    batches: Iterable[Batch],
    param_names: Iterable[str] | None = None,
    max_examples: int | None = None,
    label_mode: str = "sample",
    seed: int = 0,
    method: str = "vmap",
    chunk_size: int | None = 16,
    disable: bool = False,
) -> dict[str, Tensor]:
    """Diagonal Fisher F = mean over examples of (∇θ log p(ŷ|x))², ``{name: Tensor}`` on CPU.

    ``label_mode`` picks ŷ:

    - ``"sample"`` (default; Fisher merging, Matena & Raffel 2022): one ŷ per example drawn
      from the model's own predictive distribution p(·|x), with a ``torch.Generator``
      seeded by ``seed`` (on CPU, so the draws do not depend on the device). An unbiased
      estimate of the true Fisher E_x E_{y~p(·|x)}[g²].
    - ``"expected"``: the expectation over y ~ p(·|x) taken exactly, Σ_c p_c(x) g_c²: the
      same Fisher without sampling noise, at C times the cost (C = number of classes).
    - ``"true"``: ŷ = the data labels, the "empirical Fisher" (a different quantity; it
      equals the Fisher only where the model is well calibrated).

    ``max_examples`` caps the number of examples used; ``method`` and ``chunk_size`` are
    those of :func:`sum_sq_grads` (all methods are exact, ``"hooks"`` is the fastest for
    Transformers, and draws its labels from the logits of its own forward pass instead of
    running one more).
    """
    if label_mode not in ("sample", "expected", "true"):
        raise ValueError(f"label_mode must be 'sample', 'expected' or 'true', not {label_mode!r}")
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    total: dict[str, Tensor] = {}
    n = 0
    bar = tqdm(total=max_examples, desc=f"Fisher ({label_mode})", unit="ex", disable=disable)
    names = param_names_of(model, param_names)

    def add(sums: Mapping[str, Tensor]) -> None:
        for name, s in sums.items():
            total[name] = s if name not in total else total[name] + s

    with eval_mode(model):
        for batch in _batches_upto(batches, max_examples):
            batch = to_device(batch, device)
            if method == "hooks":
                # The labels are drawn from the logits of the hooks' own forward pass.
                def terms_of(logits, start, stop):
                    return _label_terms(label_mode, logits, batch[LABEL_KEY][start:stop], generator)

                add(_sum_sq_grads_hooks(model, batch, names, terms_of, chunk_size))
            else:
                with torch.no_grad():
                    logits = model(**model_inputs(batch)) if label_mode != "true" else None
                for labels, weights in _label_terms(label_mode, logits, batch[LABEL_KEY], generator):
                    add(sum_sq_grads(model, batch, names, labels, weights, method, chunk_size))
            n += batch_size(batch)
            bar.update(batch_size(batch))
    bar.close()
    if n == 0:
        raise ValueError("no examples: the Fisher of an empty data set is undefined")
    return {name: (s / n).float().cpu() for name, s in total.items()}


diagonal_fisher = _checked(diagonal_fisher, "Fisher", _FISHER_ADVICE)


def hessian_estimate(fisher: Mapping[str, Tensor], num_examples: int) -> dict[str, Tensor]:
    """H = N · F: the Hessian of the summed training loss over N examples, estimated from
    the mean squared-gradient Fisher F (Daheim et al. 2024: H_t = N_t · F̂_t)."""
    if not (isinstance(num_examples, Real) and 0 < num_examples < math.inf):
        raise ValueError(f"hessian_estimate: num_examples = {num_examples}; pass the (positive) size of the "
                         "training set the Fisher stands for.")
    hessian = {name: num_examples * f for name, f in fisher.items()}
    check_statistic(hessian, "Hessian", _FISHER_ADVICE)
    return hessian


# ----------------------------------------------------------------------------------------
# Gram matrices for RegMean
# ----------------------------------------------------------------------------------------

def _has_gram(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):  # zero padding and no groups: unfold is exact then
        return module.groups == 1 and module.padding_mode == "zeros" and isinstance(module.padding, tuple)
    return isinstance(module, nn.Linear)


def _gram_width(module: nn.Module) -> int:
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim
    if isinstance(module, nn.Conv2d):
        return module.in_channels * module.kernel_size[0] * module.kernel_size[1]
    return module.in_features


def _attention_inputs(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor]:
    """The rows that ``nn.MultiheadAttention`` feeds its two linear maps: the input x of
    ``in_proj_weight`` and the concatenated heads' outputs that ``out_proj.weight`` maps."""
    x, mask = self_attention_input(module, args, kwargs)
    x = x.detach().float()
    bias = None if module.in_proj_bias is None else module.in_proj_bias.float()
    attended = attend(module, F.linear(x, module.in_proj_weight.float(), bias), mask)
    return x.reshape(-1, x.shape[-1]), attended.reshape(-1, x.shape[-1])


def gram_matrices(
    model: nn.Module,
    batches: Iterable[Batch],
    linear_names: Iterable[str] | None = None,
    max_examples: int | None = None,
    return_counts: bool = False,
    disable: bool = False,
):
    """G = XᵀX of the inputs X (rows = positions) of every ``nn.Linear``: ``{weight name:
    Tensor[in, in]}`` on CPU, float32 -- RegMean's Gram matrices (Jin et al. 2023).

    An ``nn.Conv2d`` (no groups, zero padding) is the linear map ``W.flatten(1)`` over its
    unfolded input patches, so its Gram is ``[in·kh·kw, in·kh·kw]`` over every (example,
    output position) row; merge ``W.flatten(1)`` and reshape back.

    Keys are the layers' weight names (e.g. ``encoder.layer.0.attention.self.query.weight``),
    as ``lib.merging.regmean`` expects; ``linear_names`` restricts to those weights.
    ``nn.MultiheadAttention`` (open_clip's CLIP) applies its two maps as functions; their Grams
    are computed from the module's input: ``in_proj_weight`` over x, ``out_proj.weight`` over
    the heads' outputs, recomputed (self-attention; no padding masks there).

    G is the SUM over every counted row, not the mean: for token inputs ``[B, L, d]`` each
    position is a row, and positions where the batch's ``attention_mask`` is 0 are left
    out (padding must not shape the merge). With ``return_counts=True`` the result is
    ``(grams, counts)``, ``counts[name]`` being the number of rows summed (a plain ``int``),
    so that ``G / count`` is the mean if tasks with different amounts of data should weigh
    the same: pass them to ``lib.merging.regmean(..., counts=counts)``, whose default
    ``gram_normalization="mean"`` does that division.
    """
    attentions = {mn: m for mn, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    linears = {f"{mn}.weight" if mn else "weight": m for mn, m in model.named_modules() if _has_gram(m)
               and not any(mn == f"{a}.out_proj" for a in attentions)}
    for name, module in attentions.items():
        linears[f"{name}.in_proj_weight"] = linears[f"{name}.out_proj.weight"] = module
    if linear_names is not None:
        chosen = set(linear_names)
        if chosen - set(linears):
            raise KeyError(f"not weights of nn.Linear / nn.Conv2d layers: {sorted(chosen - set(linears))[:5]}")
        linears = {n: m for n, m in linears.items() if n in chosen}
    device = model_device(model)
    grams = {n: torch.zeros(_gram_width(m), _gram_width(m), device=device) for n, m in linears.items()}
    attentions = {a: m for a, m in attentions.items() if {f"{a}.in_proj_weight", f"{a}.out_proj.weight"} & set(linears)}
    counts = {n: 0 for n in linears}
    mask: list[Tensor | None] = [None]  # the current batch's padding mask, read by the hooks

    def hook_for(name):
        def accumulate(module, args):
            x = args[0].detach().float()
            m = mask[0]
            if isinstance(module, nn.Conv2d):
                # a convolution is a linear map over unfolded patches: rows = (example, position)
                x = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
                x = x.transpose(1, 2).reshape(-1, x.shape[1])
            elif x.dim() > 2 and m is not None:
                if x.shape[:2] != m.shape:
                    raise ValueError(f"{name}: input {tuple(x.shape)} does not line up with attention_mask {tuple(m.shape)}")
                x = x[m.bool()]  # [number of real tokens, ..., in]
            x = x.reshape(-1, x.shape[-1])
            grams[name] += x.T @ x
            counts[name] += x.shape[0]

        return accumulate

    def attention_hook(name):
        def accumulate(module, args, kwargs):
            for key, rows in zip(("in_proj_weight", "out_proj.weight"), _attention_inputs(module, args, kwargs)):
                if f"{name}.{key}" in grams:  # linear_names may keep one of the two
                    grams[f"{name}.{key}"] += rows.T @ rows
                    counts[f"{name}.{key}"] += rows.shape[0]

        return accumulate

    handles = []
    bar = tqdm(total=max_examples, desc="Gram matrices", unit="ex", disable=disable)
    try:
        with eval_mode(model), torch.no_grad():
            handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in linears.items()
                       if not isinstance(m, nn.MultiheadAttention)]
            handles += [m.register_forward_pre_hook(attention_hook(n), with_kwargs=True) for n, m in attentions.items()]
            for batch in _batches_upto(batches, max_examples):
                batch = to_device(batch, device)
                mask[0] = batch.get("attention_mask")
                model(**model_inputs(batch))
                bar.update(batch_size(batch))
    finally:
        for h in handles:
            h.remove()
        bar.close()
    grams = {n: g.cpu() for n, g in grams.items()}
    return (grams, counts) if return_counts else grams


gram_matrices = _checked(gram_matrices, "Gram matrix", _GRAM_ADVICE)
