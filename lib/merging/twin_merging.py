"""Twin-Merging: a shared expert plus router-weighted low-rank exclusive knowledge (METHODS.md §3, §6).

Lu et al. 2024, "Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging" (NeurIPS).

    θ_shared = a conventional merge of the experts (the authors: Task Arithmetic, λ = 0.29)
    v_t      = SVD_r(θt − θ_shared)                  per weight matrix, r = rank_ratio·min(m, n)
    w(x)     = softmax(router(f(x; θ_shared)))         f: the shared model's mean-pooled features
    θ(x)     = θ_shared + Σt w_t(x)·v_t                one model per input

For every linear map of an input h this is, exactly and without materialising θ(x),

    θ(x)·h = W_shared·h + Σt w_t(x)·U_t(S_t(V_tᵀ·h))

a static forward plus T thin matrix products, so a batch of inputs from mixed tasks runs in one
forward (``low_rank_forward``). The authors' own paths are here too: one merged model per input,
run at batch size 1 (``per_input_forward``), and one merge per group of inputs with the same
router argmax (``grouped_forward``).

Defaults (the authors' code): rank_ratio = 0.1; router Linear(d, 2d) → BatchNorm → LeakyReLU(0.01)
→ Dropout(0.5) → Linear(2d, 2d) → BatchNorm → LeakyReLU → Dropout(0.5) → Linear(2d, T), trained
with cross-entropy by Adam (HF Trainer's AdamW with weight decay 0), lr 5e-4 decayed linearly to 0,
batch 1024, 50 epochs, keeping the best epoch. The shared expert is the caller's (here λ is chosen
on validation, not fixed at 0.29).

Deviations and conventions:

- Rank: r = max(1, round(rank_ratio·min(m, n))), rounding to the nearest integer with halves up.
  The authors truncate (int(), and can reach r = 0); both give r = 38 for MiniLM's 384-wide
  matrices. A difference that is exactly zero (a tensor the expert left unchanged, such as
  MiniLM's frozen token embeddings) is stored at rank 0: nothing to store, nothing to compute.
- What is factored: every float tensor with two or more dimensions, viewed as a matrix
  (shape[0], rest): linear weights (out, in), embeddings (vocabulary, width) -- the authors
  factor those too, as 2-D tensors -- and conv kernels (out, in·kh·kw), the im2col view, in which
  the low-rank correction is a conv to r channels followed by a 1×1 conv. (The authors' models
  have no convolutions.) Stored as (U·S, Vᵀ): S folded into U, r numbers fewer than (U, S, V).
- 1-D tensors (biases, LayerNorm and BatchNorm affine parameters) are merged densely with the
  same router weights: their exclusive part is the full difference θt − θ_shared. The authors
  instead exclude biases and take them, with the head, from the ground-truth task's fine-tuned
  model, which needs to know each input's task (an oracle the router is meant to replace).
- Buffers (BatchNorm running statistics) are not task vectors and are never factored: their
  exclusive part is the dense difference to the shared model's (averaged) buffers, so with
  router weights that sum to 1 (softmax) each input gets the router-weighted average of the
  experts' buffers, Σt w_t·r_t -- the project's buffer rule with the method's model weights.
- The router learns from a labeled set the caller passes, and its best epoch is chosen on a
  held-out part of that set the caller passes too. The authors train on up to 5,500 training
  examples per task and pick the epoch on the test split.

What the low-rank path supports (exactly, per input): ``nn.Linear``, ``nn.Embedding`` (a gather
of the rows of U·S), ``nn.Conv2d`` with groups = 1 and zero padding, ``nn.LayerNorm`` (per-input
affine γ_shared + Σ w_t Δγ_t, cheap), BatchNorm in eval mode (per-input running statistics
and affine, elementwise) and ``nn.MultiheadAttention`` self-attention (recomputed with per-input
in_proj and out_proj, as CLIP's open_clip towers use it), and open_clip's ViT class and position
embeddings (added per input to ``ln_pre``'s input; its output projection must be shared, as it is
for the published experts). That covers BERT and RoBERTa encoders (their word, position and
token-type embeddings are ``nn.Embedding`` layers), MLPs, the CIFAR ResNets and CLIP's ViTs.
Any other tensor with a non-zero exclusive part, or a supported layer whose weights the model
uses without calling the layer, is an error, never a silent static merge. Every layer must see
the batch on its leading dimension (or 1, broadcast, as BERT's position embeddings do).
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Iterator, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import attend, eval_mode, example_at_own_length, functional_forward, model_inputs, self_attention_input
from ._common import StateDict, _check_models, _check_numbers, _float_keys, _in_order, _passthrough, _work


class UnsupportedLayer(TypeError):
    """The low-rank path cannot apply a model's exclusive part exactly (a layer kind or setting it
    does not handle): use ``per_input_forward`` or ``grouped_forward`` for that model."""


RANK_RATIO = 0.1


class LowRank(NamedTuple):
    """A rank-r matrix U·S·Vᵀ stored as ``us`` = U·S [m, r] and ``vh`` = Vᵀ [r, n]."""
    us: Tensor
    vh: Tensor


Exclusive = Mapping[str, "LowRank | Tensor"]  # one task's exclusive knowledge


# ----------------------------------------------------------------------------- compression


def rank_for(shape: Sequence[int], rank_ratio: float) -> int:
    """r = max(1, round(rank_ratio·min(m, n))) for a tensor viewed as (shape[0], rest); halves round up."""
    m, n = shape[0], math.prod(shape[1:])
    return max(1, math.floor(rank_ratio * min(m, n) + 0.5))


def truncated_svd(matrix: Tensor, rank: int) -> LowRank:
    """The best rank-``rank`` approximation of a 2-D tensor (Eckart-Young), as (U·S, Vᵀ) in the
    working dtype; rank 0 for an all-zero tensor."""
    if not matrix.any():  # an unchanged tensor: rank 0, and no SVD to compute
        return LowRank(matrix.new_zeros(matrix.shape[0], 0), matrix.new_zeros(0, matrix.shape[1]))
    u, s, vh = torch.linalg.svd(_work(matrix), full_matrices=False)
    return LowRank(u[:, :rank] * s[:rank], vh[:rank])


@torch.no_grad()
def compress(shared: StateDict, finetuned: Sequence[StateDict], rank_ratio: float = RANK_RATIO) -> list[dict]:
    """Per task, its exclusive knowledge v_t = SVD_r(θt − θ_shared): a dict over the float keys of
    ``shared`` holding a ``LowRank`` for every tensor of two or more dimensions (viewed as
    (shape[0], rest)) and the dense difference for the others (biases, norms, buffers).
    Non-float keys (counters, position ids) are left out: ``merge`` copies them from ``shared``."""
    _check_numbers("compress", rank_ratio=rank_ratio)
    if not 0.0 < rank_ratio <= 1.0:
        raise ValueError(f"rank_ratio must be in (0, 1], got {rank_ratio}.")
    _check_models(shared, finetuned)
    exclusive = []
    for expert in finetuned:
        part = {}
        for k in _float_keys(shared):
            diff = _work(expert[k]) - _work(shared[k])
            if diff.dim() >= 2:
                us, vh = truncated_svd(diff.reshape(diff.shape[0], -1), rank_for(diff.shape, rank_ratio))
                part[k] = LowRank(us.to(shared[k].dtype), vh.to(shared[k].dtype))
            else:
                part[k] = diff.to(shared[k].dtype)
        exclusive.append(part)
    return exclusive


def dense(part: LowRank | Tensor, shape: Sequence[int]) -> Tensor:
    """An exclusive part as a dense tensor of ``shape``."""
    return (part.us @ part.vh).reshape(shape) if isinstance(part, LowRank) else part


def nbytes(exclusive: Exclusive | Sequence[Exclusive]) -> int:
    """Bytes stored by one task's exclusive knowledge, or by a list of them."""
    parts = [exclusive] if isinstance(exclusive, Mapping) else exclusive
    tensors = [t for part in parts for v in part.values() for t in (v if isinstance(v, LowRank) else (v,))]
    return sum(t.numel() * t.element_size() for t in tensors)


# ----------------------------------------------------------------------------- merging


def _task_weights(weights: Tensor | Sequence[float], num_tasks: int) -> list[float]:
    w = [float(x) for x in (weights.flatten() if torch.is_tensor(weights) else weights)]
    if len(w) != num_tasks:
        raise ValueError(f"got {len(w)} weights for {num_tasks} tasks; pass one weight per task.")
    _check_numbers("merge", weights=w)
    return w


def _check_exclusive(shared: StateDict, exclusive: Sequence[Exclusive]) -> None:
    if len(exclusive) == 0:
        raise ValueError("exclusive is empty: pass compress()'s list, one dict per task.")
    keys = set(_float_keys(shared))
    for t, part in enumerate(exclusive):
        if set(part) != keys:
            raise ValueError(f"exclusive[{t}] does not cover the float keys of shared (missing "
                             f"{sorted(keys - set(part))[:5]}, extra {sorted(set(part) - keys)[:5]}); "
                             "build it with compress(shared, finetuned).")


@torch.no_grad()
def merge(shared: StateDict, exclusive: Sequence[Exclusive], weights: Tensor | Sequence[float]) -> dict[str, Tensor]:
    """θ_shared + Σt weights[t]·v_t as a dense state dict, for a length-T weight vector.

    Tasks with weight exactly 0 are skipped (top-k routing zeroes most of them). Non-float
    tensors are copied from ``shared``; inputs are not modified.
    """
    _check_exclusive(shared, exclusive)
    w = _task_weights(weights, len(exclusive))
    out = _passthrough(shared)
    for k in _float_keys(shared):
        acc = _work(shared[k]).clone()
        for wt, part in zip(w, exclusive):
            if wt == 0.0:
                continue
            v = part[k]
            if isinstance(v, LowRank):  # one GEMM into the (shape[0], rest) view: no dense v_t
                if v.us.shape[1] > 0:  # rank 0 adds nothing (and addmm_ would still sweep acc)
                    acc.view(acc.shape[0], -1).addmm_(_work(v.us), _work(v.vh), alpha=wt)
            else:
                acc.add_(_work(v), alpha=wt)
        out[k] = acc.to(shared[k].dtype)
    return _in_order(out, shared)


# ----------------------------------------------------------------------------- router


def router_mlp(feature_dim: int, num_tasks: int, dropout: float = 0.5) -> nn.Sequential:
    """The authors' router: d → 2d → 2d → T with BatchNorm, LeakyReLU (slope 0.01) and dropout."""
    h = 2 * feature_dim
    return nn.Sequential(
        nn.Linear(feature_dim, h), nn.BatchNorm1d(h), nn.LeakyReLU(), nn.Dropout(dropout),
        nn.Linear(h, h), nn.BatchNorm1d(h), nn.LeakyReLU(), nn.Dropout(dropout),
        nn.Linear(h, num_tasks),
    )


@torch.no_grad()
def _accuracy(router: nn.Module, features: Tensor, tasks: Tensor) -> float:
    with eval_mode(router):
        return float((router(features).argmax(1) == tasks).float().mean())


def train_router(features: Tensor, tasks: Tensor, held_out_features: Tensor, held_out_tasks: Tensor, *,
                 num_tasks: int | None = None, epochs: int = 50, lr: float = 5e-4, batch_size: int = 1024,
                 seed: int = 0) -> tuple[nn.Sequential, list[dict]]:
    """Train the router with cross-entropy on (features [N, d], task ids [N]) pairs.

    Adam at ``lr``, decayed linearly to 0 over all steps (the authors' Trainer defaults). After
    every epoch the router is scored on the held-out pairs, a part of the labeled set the caller
    kept apart (never test data); the state of the best epoch (the earliest on ties) is returned,
    in eval mode, with the history: one dict per epoch with "epoch", "train_loss" (mean over the
    epoch's batches) and "held_out_accuracy". Seeded, and the global RNG is left untouched.
    """
    if len(features) != len(tasks) or len(held_out_features) != len(held_out_tasks):
        raise ValueError("features and task ids must have the same length (train and held-out each).")
    if len(held_out_tasks) == 0:
        raise ValueError("held_out is empty: keep part of the labeled set apart to choose the epoch on.")
    num_tasks = num_tasks or int(torch.cat([tasks, held_out_tasks]).max()) + 1
    features, held_out_features = features.float(), held_out_features.float()
    steps_per_epoch = math.ceil(len(features) / batch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        router = router_mlp(features.shape[1], num_tasks)
        optimizer = torch.optim.Adam(router.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: max(0.0, 1.0 - step / (epochs * steps_per_epoch)))
        best, best_state, history = -1.0, None, []
        for epoch in range(1, epochs + 1):
            router.train()
            order, losses = torch.randperm(len(features)), []
            for start in range(0, len(features), batch_size):
                idx = order[start:start + batch_size]
                if len(idx) < 2:  # BatchNorm cannot train on a single example
                    continue
                loss = F.cross_entropy(router(features[idx]), tasks[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
            accuracy = _accuracy(router, held_out_features, held_out_tasks)
            history.append({"epoch": epoch, "train_loss": sum(losses) / max(len(losses), 1),
                            "held_out_accuracy": accuracy})
            if accuracy > best:
                best, best_state = accuracy, copy.deepcopy(router.state_dict())
    router.load_state_dict(best_state)
    return router.eval(), history


@torch.no_grad()
def route(router: nn.Module, features: Tensor, top_k: int | None = None) -> Tensor:
    """Router weights w = softmax(router(features)), [N, T]. With ``top_k``, each row keeps only
    its k largest weights, renormalised to sum to 1 (the others become exactly 0)."""
    with eval_mode(router):
        w = torch.softmax(router(features.float()), dim=1)
    return w if top_k is None else keep_top_k(w, top_k)


def keep_top_k(weights: Tensor, k: int) -> Tensor:
    """Each row's k largest weights, renormalised to sum to 1; the others exactly 0."""
    if not 1 <= k <= weights.shape[1]:
        raise ValueError(f"top_k must be between 1 and the number of tasks ({weights.shape[1]}), got {k}.")
    values, idx = weights.topk(k, dim=1)
    return torch.zeros_like(weights).scatter_(1, idx, values / values.sum(1, keepdim=True))


# ----------------------------------------------------------------------------- inference


def _checked_batch_weights(weights: Tensor, inputs: Mapping[str, Tensor], num_tasks: int) -> Tensor:
    b = next(iter(inputs.values())).shape[0]
    if weights.dim() != 2 or weights.shape != (b, num_tasks):
        raise ValueError(f"weights must be [batch, tasks] = [{b}, {num_tasks}], got {tuple(weights.shape)}.")
    return weights


@torch.no_grad()
def per_input_forward(model: nn.Module, shared: StateDict, exclusive: Sequence[Exclusive], weights: Tensor,
                      inputs: Mapping[str, Tensor]) -> Tensor:
    """The authors' path: for each input, merge θ(x) = θ_shared + Σt w_t·v_t densely and run the
    model on that input alone (batch size 1, padding cut off), in eval mode."""
    inputs = model_inputs(inputs)
    weights = _checked_batch_weights(weights, inputs, len(exclusive))
    outputs = []
    with eval_mode(model):
        for b in range(len(weights)):
            one = {k: v[None] for k, v in example_at_own_length(inputs, b).items()}
            outputs.append(functional_forward(model, merge(shared, exclusive, weights[b]), one))
    return torch.cat(outputs)


@torch.no_grad()
def grouped_forward(model: nn.Module, shared: StateDict, exclusive: Sequence[Exclusive], weights: Tensor,
                    inputs: Mapping[str, Tensor]) -> Tensor:
    """The authors' batched variant: inputs grouped by their router argmax, one merge per group
    with the group's mean weights, one batched forward per group; outputs in input order.
    Exact for an input only when its group's inputs share its weights (e.g. one input per group)."""
    inputs = model_inputs(inputs)
    weights = _checked_batch_weights(weights, inputs, len(exclusive))
    groups = weights.argmax(1)
    outputs = [None] * len(weights)
    with eval_mode(model):
        for g in groups.unique().tolist():
            idx = torch.nonzero(groups == g).flatten()
            merged = merge(shared, exclusive, weights[idx].mean(0))
            out = functional_forward(model, merged, {k: v[idx] for k, v in inputs.items()})
            for i, row in zip(idx.tolist(), out):
                outputs[i] = row
    return torch.stack(outputs)


@dataclass(frozen=True)
class Stacked:
    """The exclusive parts of all tasks side by side, as the low-rank path reads them.

    ``factors[k]`` = (U·S of all tasks [m, R], Vᵀ of all tasks [R, n], the task of each of the R
    columns); ``dense[k]`` = the dense parts [T, *shape]. Keys whose parts are zero for every
    task (rank 0, or all-zero differences) are left out: they cost nothing at inference.
    """
    factors: dict[str, tuple[Tensor, Tensor, Tensor]]
    dense: dict[str, Tensor]
    num_tasks: int

    def to(self, device: torch.device | str) -> "Stacked":
        """The same parts on ``device`` (a GPU serving the low-rank path)."""
        return Stacked({k: tuple(t.to(device) for t in v) for k, v in self.factors.items()},
                       {k: v.to(device) for k, v in self.dense.items()}, self.num_tasks)


@torch.no_grad()
def stack(exclusive: Sequence[Exclusive]) -> Stacked:
    """Concatenate every task's factors once, so each forward does T tasks in two matrix products."""
    factors, dense_parts = {}, {}
    for k, first in exclusive[0].items():
        parts = [part[k] for part in exclusive]
        if isinstance(first, LowRank):
            if sum(p.us.shape[1] for p in parts) > 0:
                task_of = torch.cat([torch.full((p.us.shape[1],), t) for t, p in enumerate(parts)])
                factors[k] = (torch.cat([p.us for p in parts], 1), torch.cat([p.vh for p in parts], 0), task_of)
        elif any(bool(p.any()) for p in parts):
            dense_parts[k] = torch.stack(parts)
    return Stacked(factors, dense_parts, len(exclusive))


def _per_input(v: Tensor, ndim: int, trailing: int = 1) -> Tensor:
    """A per-input tensor [B, *F] (F its last ``trailing`` dims) viewed to broadcast against a
    ``ndim``-dimensional activation [B, ..., *F]."""
    return v.view(v.shape[0], *([1] * (ndim - 1 - trailing)), *v.shape[1:])


def _channels(v: Tensor, ndim: int) -> Tensor:
    """A per-input, per-channel tensor [B, C] viewed against a channels-first activation [B, C, ...]."""
    return v.view(*v.shape, *([1] * (ndim - 2)))


class _Corrections:
    """Forward hooks that add Σt w_t(x)·(exclusive part t) to each supported layer's output."""

    def __init__(self, shared: StateDict, stacked: Stacked, weights: Tensor):
        self.shared, self.s, self.w = shared, stacked, weights

    def delta(self, key: str) -> Tensor | None:
        """Σt w_t·Δ_t of a dense key, per input [B, *shape], or None if it has no exclusive part."""
        d = self.s.dense.get(key)
        return None if d is None else (self.w @ d.flatten(1)).view(len(self.w), *d.shape[1:])

    def delta_any(self, key: str) -> Tensor | None:
        """Σt w_t·Δ_t per input [B, *shape] of a dense or a factored key (a factored one made dense:
        for small tensors read directly, such as position embeddings)."""
        if key not in self.s.factors:
            return self.delta(key)
        us, vh, cols = self.s.factors[key]
        return (us * self.w[:, cols][:, None, :]) @ vh  # [B, m, R] @ [R, n]

    def scaled(self, z: Tensor, cols: Tensor, channels_first: bool = False) -> Tensor:
        """z with each of its R columns (last dim, or dim 1) scaled by its task's weight, per input."""
        w = self.w[:, cols]
        return z * (_channels(w, z.dim()) if channels_first else _per_input(w, z.dim()))

    def linear(self, m: nn.Linear, p: str, x: Tensor, y: Tensor) -> Tensor:
        return self._linear_map(p + "weight", p + "bias", x, y)

    def _linear_map(self, weight: str, bias: str, x: Tensor, y: Tensor) -> Tensor:
        if weight in self.s.factors:
            us, vh, cols = self.s.factors[weight]
            y = y + F.linear(self.scaled(F.linear(x, vh), cols), us)   # U(S(Vᵀh)) per task, weighted
        db = self.delta(bias)
        return y if db is None else y + _per_input(db, y.dim())

    def attention(self, m: nn.MultiheadAttention, p: str, args: tuple, kwargs: dict) -> tuple[Tensor, None]:
        """Self-attention recomputed with per-input in_proj and out_proj (the module applies both
        as functions, so no hook on them could): replaces the module's output."""
        if kwargs.get("need_weights", True) or kwargs.get("average_attn_weights") is False:
            raise UnsupportedLayer(f"{p}: nn.MultiheadAttention is supported when called with need_weights=False.")
        x, mask = self_attention_input(m, args, kwargs)
        qkv = self._linear_map(p + "in_proj_weight", p + "in_proj_bias", x, F.linear(x, m.in_proj_weight, m.in_proj_bias))
        heads = attend(m, qkv, mask)
        out = self._linear_map(p + "out_proj.weight", p + "out_proj.bias", heads,
                               F.linear(heads, m.out_proj.weight, m.out_proj.bias))
        return (out if m.batch_first else out.transpose(0, 1)), None

    def embedding(self, m: nn.Embedding, p: str, ids: Tensor, y: Tensor) -> Tensor:
        if m.max_norm is not None:
            raise UnsupportedLayer(f"{p}: nn.Embedding with max_norm renormalises rows; not supported.")
        us, vh, cols = self.s.factors[p + "weight"]
        return y + self.scaled(F.embedding(ids, us), cols) @ vh  # rows of U·S gathered, then Vᵀ

    def conv2d(self, m: nn.Conv2d, p: str, x: Tensor, y: Tensor) -> Tensor:
        if m.groups != 1 or m.padding_mode != "zeros":
            raise UnsupportedLayer(f"{p}: only nn.Conv2d with groups=1 and zero padding is supported.")
        if p + "weight" in self.s.factors:
            us, vh, cols = self.s.factors[p + "weight"]
            z = F.conv2d(x, vh.view(len(cols), *m.weight.shape[1:]), None, m.stride, m.padding, m.dilation)
            y = y + F.conv2d(self.scaled(z, cols, channels_first=True), us[:, :, None, None])  # then a 1×1 conv
        db = self.delta(p + "bias")
        return y if db is None else y + _channels(db, y.dim())

    def layer_norm(self, m: nn.LayerNorm, p: str, x: Tensor, y: Tensor) -> Tensor:
        dg, db = self.delta(p + "weight"), self.delta(p + "bias")
        trailing = len(m.normalized_shape)
        if dg is not None:  # per-input γ: add x̂·Σ w_t Δγ_t
            y = y + F.layer_norm(x, m.normalized_shape, None, None, m.eps) * _per_input(dg, x.dim(), trailing)
        return y if db is None else y + _per_input(db, y.dim(), trailing)

    def batch_norm(self, m: nn.modules.batchnorm._BatchNorm, p: str, x: Tensor, y: Tensor) -> Tensor:
        if m.training or m.running_mean is None:
            raise UnsupportedLayer(f"{p}: BatchNorm is supported in eval mode with running statistics only.")

        def per_input(name: str, default: Tensor) -> Tensor:  # shared + Σ w_t Δ_t, [B, C]
            base = self.shared.get(p + name, default)
            d = self.delta(p + name)
            return _channels(base.expand(len(self.w), -1) if d is None else base + d, x.dim())

        ones, zeros = torch.ones_like(m.running_var), torch.zeros_like(m.running_mean)
        mean, var = per_input("running_mean", zeros), per_input("running_var", ones)
        gamma, beta = per_input("weight", ones), per_input("bias", zeros)
        return (x - mean) * torch.rsqrt(var + m.eps) * gamma + beta  # replaces the static output

    def vision_embeddings(self, m: nn.Module, p: str, x: Tensor) -> Tensor:
        """open_clip's ViT adds its class and position embeddings (bare parameters, no layer)
        just before ``ln_pre``: add their per-input parts to ``ln_pre``'s input."""
        d_pos, d_cls = self.delta_any(p + "positional_embedding"), self.delta_any(p + "class_embedding")
        if d_pos is not None:
            x = x + d_pos.to(x.dtype)
        if d_cls is not None:
            x = torch.cat([x[:, :1] + d_cls[:, None].to(x.dtype), x[:, 1:]], dim=1)
        return x

    HANDLERS = ((nn.MultiheadAttention, "attention"), (nn.Linear, "linear"), (nn.Embedding, "embedding"),
                (nn.Conv2d, "conv2d"), (nn.LayerNorm, "layer_norm"), (nn.modules.batchnorm._BatchNorm, "batch_norm"))

    @contextlib.contextmanager
    def hooked(self, model: nn.Module) -> Iterator[None]:
        """Hook every module owning a key with an exclusive part; check afterwards that each ran."""
        pending, layers, embeddings = set(self.s.factors) | set(self.s.dense), [], []
        for name, module in model.named_modules():
            p = f"{name}." if name else ""
            if _is_open_clip_vit(module):  # its class and position embeddings, via ln_pre's input
                own = {p + "class_embedding", p + "positional_embedding"}
                if own & pending:
                    pending -= own
                    embeddings.append((name, p, module))
            kind = next((h for cls, h in self.HANDLERS if isinstance(module, cls)), None)
            # attention handles its out_proj too (a Linear the module never calls)
            tensors = [*module.named_parameters(recurse=kind == "attention"), *module.named_buffers(recurse=False)]
            own = {p + n for n, _ in tensors}
            if own & pending and kind is not None:
                pending -= own
                layers.append((name, p, module, getattr(self, kind)))
        if pending:
            raise UnsupportedLayer(f"the low-rank path cannot apply the exclusive parts of {sorted(pending)[:5]}: "
                                      "they belong to no nn.Linear, nn.Embedding, nn.Conv2d, nn.LayerNorm or "
                                      "BatchNorm layer. Use per_input_forward or grouped_forward for this model.")
        fired = set()

        def hook_for(name: str, p: str, handler):
            def hook(module, args, kwargs, y):
                x = args[0] if args else next(iter(kwargs.values()))
                if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
                    x = x.transpose(0, 1)  # sequence first: the batch is its second dimension
                if x.shape[0] not in (1, len(self.w)):
                    raise ValueError(f"{name}: input batch {x.shape[0]} but {len(self.w)} weight rows; "
                                     "every layer must see the batch on its leading dimension.")
                fired.add(name)
                if isinstance(module, nn.MultiheadAttention):
                    return handler(module, p, args, kwargs)
                return handler(module, p, x, y)
            return hook

        def embeddings_hook(name: str, p: str, vit: nn.Module):
            def hook(module, args):
                fired.add(name)
                return (self.vision_embeddings(vit, p, args[0]),)
            return hook

        handles = [m.register_forward_hook(hook_for(name, p, h), with_kwargs=True) for name, p, m, h in layers]
        handles += [vit.ln_pre.register_forward_pre_hook(embeddings_hook(name, p, vit)) for name, p, vit in embeddings]
        layers += [(name,) for name, _, _ in embeddings]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        missed = [name for name, *_ in layers if name not in fired]
        if missed:
            raise RuntimeError(f"layers {missed[:5]} hold exclusive parts but were not called during the forward "
                               "(unused, or their weights are read directly, as nn.MultiheadAttention does with "
                               "out_proj): their exclusive parts were not applied.")


def _is_open_clip_vit(module: nn.Module) -> bool:
    """open_clip's ``VisionTransformer`` (CLIP's image tower), recognised by what the
    embeddings handler relies on: class and position embeddings added just before ``ln_pre``."""
    return (type(module).__name__ == "VisionTransformer" and type(module).__module__.startswith("open_clip")
            and all(hasattr(module, a) for a in ("class_embedding", "positional_embedding", "ln_pre")))


@torch.no_grad()
def low_rank_forward(model: nn.Module, shared: StateDict, exclusive: Sequence[Exclusive] | Stacked,
                     weights: Tensor, inputs: Mapping[str, Tensor]) -> Tensor:
    """θ(x) for every input of a mixed batch in one forward, without materialising any weights:
    the model runs on θ_shared (``functional_call``) and forward hooks add, per input b,
    Σt weights[b, t]·(exclusive part t) to each layer: Σt w_t·U_t(S_t(V_tᵀh)) for linear maps.
    Exact (to float rounding) against ``per_input_forward``. ``exclusive``: ``compress``'s list,
    or ``stack`` of it to concatenate the factors once for many batches. Runs in eval mode.
    Top-k weights (``route(..., top_k=k)``) give the same result as materialising with them, at
    the same cost: every task's factors are still multiplied, the zero weights scale them away.
    (Running each task's factors on its routed inputs only was tried: it cuts the FLOPs to about
    k/T but not the time on a CPU, as T thin products of r columns run far below the rate of one
    product of T·r columns. Top-k pays off on the materialising paths, which merge k tasks.)"""
    stacked = exclusive if isinstance(exclusive, Stacked) else stack(exclusive)
    inputs = model_inputs(inputs)
    weights = _checked_batch_weights(weights, inputs, stacked.num_tasks)
    dtype = shared[_float_keys(shared)[0]].dtype
    corrections = _Corrections(shared, stacked, weights.to(dtype))
    with eval_mode(model), corrections.hooked(model):
        return functional_forward(model, shared, inputs)
