"""Running a model with substituted parameters: the one shared way to do it.

Everything that evaluates a model at weights other than its own -- per-example gradients,
AdaMerging's θ(λ), Representation Surgery, FS-Merge, distillation -- goes through
:func:`functional_forward`, which wraps ``torch.func.functional_call``. The module is never
modified: the parameters are passed in, so they can be any differentiable function of
other tensors (merging coefficients, low-rank factors) or be vmapped over.

Conventions used across the project:

- a model is an ``nn.Module`` whose ``forward(**inputs)`` returns logits ``[B, C]``;
- a batch is a dict of tensors: the model's inputs plus ``"labels"`` (int64 ``[B]``);
  every key except ``"labels"`` is passed to the model, so text models (``input_ids``,
  ``attention_mask``) and vision models (``pixel_values``) share the same code.

A note on HuggingFace encoders under ``torch.func.vmap``: transformers builds its attention
mask from a 2-D ``attention_mask`` with a data-dependent check (``mask.all()``) that vmap
cannot trace. A model that is to be vmapped should hand the encoder a ready-made 4-D
additive mask (:func:`additive_attention_mask`), which transformers passes through
unchanged, and should use ``attn_implementation="eager"``: on CPU, SDPA has no vmap batching
rule and falls back to a slow per-example loop (correct, but slow).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

LABEL_KEY = "labels"


def model_inputs(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The model's keyword inputs: every entry of the batch except the labels."""
    return {k: v for k, v in batch.items() if k != LABEL_KEY}


def batch_size(batch: Mapping[str, Tensor]) -> int:
    """Number of examples in a batch (the leading dimension of its tensors)."""
    return next(iter(batch.values())).shape[0]


def slice_batch(batch: Mapping[str, Tensor], start: int, stop: int) -> dict[str, Tensor]:
    """Examples ``start:stop`` of every tensor in the batch."""
    return {k: v[start:stop] for k, v in batch.items()}


def example_at_own_length(inputs: Mapping[str, Tensor], b: int) -> dict[str, Tensor]:
    """Example ``b`` of a batch of model inputs, without its batch dimension, with the
    trailing padding cut off: with a 2-D ``attention_mask`` ``[B, L]`` (1 = token), every
    input that has that same ``[B, L]`` prefix keeps positions up to the example's last
    token. Other inputs (and every input when there is no such mask) keep their full shape.

    This is how batch-size-1 code runs text: there is no padding to compute over. For a
    model that honours its attention mask the result equals that of the padded example.
    """
    mask = inputs.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return {k: v[b] for k, v in inputs.items()}
    positions = torch.nonzero(mask[b]).flatten()
    length = int(positions[-1]) + 1 if len(positions) else mask.shape[1]
    return {k: v[b, :length] if v.dim() >= 2 and v.shape[:2] == mask.shape else v[b] for k, v in inputs.items()}


def to_device(batch: Mapping[str, Tensor], device: torch.device | str) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module)."""
    return next(iter(model.parameters()), torch.empty(0)).device


def param_names_of(model: nn.Module, names: Iterable[str] | None = None) -> list[str]:
    """The chosen parameter names, in ``named_parameters()`` order.

    ``names=None`` means every parameter that requires grad. Unknown names are an error,
    so a typo never silently yields an empty statistic.
    """
    all_names = [n for n, _ in model.named_parameters()]
    if names is None:
        return [n for n, p in model.named_parameters() if p.requires_grad]
    wanted = set(names)
    unknown = wanted - set(all_names)
    if unknown:
        raise KeyError(f"not parameters of the model: {sorted(unknown)[:5]}")
    return [n for n in all_names if n in wanted]


def detached_params(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, Tensor]:
    """``{name: tensor}`` of the chosen parameters, detached (views, no copy).

    These are the leaves to differentiate with respect to in ``torch.func`` transforms.
    """
    params = dict(model.named_parameters())
    return {n: params[n].detach() for n in param_names_of(model, names)}


def detached_buffers(model: nn.Module) -> dict[str, Tensor]:
    """``{name: tensor}`` of the model's buffers (BatchNorm running stats, position ids...)."""
    return {n: b.detach() for n, b in model.named_buffers()}


def functional_forward(model: nn.Module, params: Mapping[str, Tensor], inputs: Mapping[str, Tensor]) -> Tensor:
    """``model(**inputs)`` evaluated with ``params`` in place of the model's own tensors.

    ``params`` may cover only some parameters; the others (and all buffers) are the
    module's own. Buffers are passed explicitly so that a vmapped or differentiated call
    sees one consistent set of tensors. The module itself is left untouched.
    """
    tensors = {**detached_buffers(model), **params}
    return functional_call(model, tensors, args=(), kwargs=dict(inputs))


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode (no dropout, BatchNorm uses running stats) and
    restore each submodule's own training flag afterwards, even on error."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer of a model (1-, 2- and 3-d)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode, except that BatchNorm layers normalise with each batch's own statistics and
    leave their running statistics untouched (as test-time adaptation does: a merged network's
    stored statistics no longer describe its activations). Restores every flag afterwards."""
    norms = batchnorm_layers(model)
    tracking = [(m, m.track_running_stats) for m in norms]
    with eval_mode(model):
        for m in norms:
            # training + no tracking: F.batch_norm gets no running buffers, so it uses the
            # batch's statistics and updates nothing (num_batches_tracked included)
            m.train()
            m.track_running_stats = False
        try:
            yield model
        finally:
            for m, flag in tracking:
                m.track_running_stats = flag


def additive_attention_mask(attention_mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """A 2-D padding mask ``[B, L]`` (1 = token, 0 = padding) as the 4-D additive mask
    ``[B, 1, 1, L]`` (0 where attended, the dtype's minimum where masked).

    HuggingFace encoders accept this form as-is, which keeps them traceable by
    ``torch.func.vmap`` (see the module docstring).
    """
    keep = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


# ----------------------------------------------------------------------------- nn.MultiheadAttention
# open_clip's CLIP uses nn.MultiheadAttention, which applies its in_proj and out_proj as
# functions (no hook on out_proj ever fires). Code that must see or change those two maps
# (RegMean's Grams, Twin-Merging's per-input corrections) recomputes the attention from the
# module's input with these two functions; a test checks them against the module's own output.
def self_attention_input(module: nn.MultiheadAttention, args: tuple, kwargs: Mapping) -> tuple[Tensor, Tensor | None]:
    """(x as [N, L, E], the mask as scaled_dot_product_attention reads it) of one call of
    ``module`` (its forward hook's ``args`` and ``kwargs``). Self-attention without padding
    masks only (CLIP's): anything else is an error, not a silent approximation."""
    names = ("query", "key", "value")
    query, key, value = [args[i] if i < len(args) else kwargs.get(n) for i, n in enumerate(names)]
    if not (key is query and value is query) or not module._qkv_same_embed_dim:
        raise ValueError("nn.MultiheadAttention: only self-attention (query, key and value the same tensor, one "
                         "in_proj) is supported here; cross-attention has no single input to take Grams or corrections of.")
    if kwargs.get("key_padding_mask") is not None:
        raise ValueError("nn.MultiheadAttention: calls with key_padding_mask are not supported here; pass the "
                         "padding as attn_mask (CLIP's towers use neither).")
    x = query if module.batch_first else query.transpose(0, 1)
    length = x.shape[1]
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.dtype == torch.bool:
        mask = ~mask  # nn.MultiheadAttention: True = may not attend; scaled_dot_product_attention: True = may
    if kwargs.get("is_causal") and mask is None:
        mask = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
    return x, mask


def attend(module: nn.MultiheadAttention, qkv: Tensor, mask: Tensor | None) -> Tensor:
    """The heads' outputs, concatenated ([N, L, E]): what ``out_proj`` maps, from ``qkv`` =
    in_proj(x) ([N, L, 3E])."""
    n, length, width = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    q, k, v = (t.reshape(n, length, module.num_heads, width // module.num_heads).transpose(1, 2)
               for t in qkv.chunk(3, dim=-1))
    mask = None if mask is None else mask.to(device=qkv.device, dtype=torch.bool if mask.dtype == torch.bool
                                             else qkv.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(n, length, width)
