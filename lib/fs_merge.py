"""FS-Merge: Foldable SuperNets (Kinderman et al. 2024, "Foldable SuperNets: Scalable Merging of
Transformers with Different Initializations and Tasks"), for N models with different inits.

METHODS.md §4 (the method) and §6 (the experiments it serves, ``lib/experiments/fs_merge.py``).

The SuperNet runs the N frozen models side by side. Around every frozen linear map y = W x + b
it learns an unmerge matrix U (d_in → N·d_in) and a merge matrix M (N·d_out → d_out).

Conventions (column vectors, PyTorch's ``nn.Linear`` orientation W: d_out × d_in):

- U = [U_1; …; U_N] stacks N blocks U_i (d_in × d_in); model i's input is U_i h.
- M = [M_1 … M_N] puts N blocks M_i (d_out × d_out) side by side; the merged output is
  Σ_i M_i y_i.
- Both are "diagonal blocks plus low rank": M = [D_1 … D_N] + A·B (A: d_out × r,
  B: r × N·d_out), U = [E_1; …; E_N] + C·D (C: N·d_in × r, D: r × d_in), D_i and E_i diagonal.

Everything between two linear maps (the residual stream, LayerNorms, nonlinearities,
attention's softmax) runs in the merged width, so each U → W_i → M chain folds into one
linear map of the original shape:

    Σ_i M_i (W_i U_i h + b_i) = (Σ_i M_i W_i U_i) h + Σ_i M_i b_i,
    W = Σ_i M_i W_i U_i,   b = Σ_i M_i b_i.

(METHODS.md writes the same thing for row vectors: W = Σ_i M_iᵀ W_i U_iᵀ.) Where the input is
shared by all models (the image, or the MLP's input) there is no U: U_i = I. At the output
the SuperNet keeps one more unmerge U_out (d_feat → N·d_feat): block t, U_out,t, turns the
merged features z into a reconstruction of model t's features, which task t's head then reads.
Folding keeps these N small d_feat × d_feat matrices (``out_unmerge``): task t's logits are
``head_t(z @ out_unmerge[t].T)``.

Training (:func:`train_supernet`) minimises the MSE between U_out,t z and model t's actual
features on unlabeled inputs of task t only. :class:`Distillation` is the knowledge
distillation baseline with the same loss, data and U_out.

Defaults (:class:`FSMergeConfig`, the paper's): rank r = 12, "first" initialisation (M's
diagonals [I, 0, …], U's all ones, low-rank products zero: training starts exactly at model 1),
AdamW at a one-cycle peak lr of 1e-4, weight decay 1e-3, batch 128, 100 epochs, 100 original
+ 800 augmented unlabeled images per task (:func:`augmented_pool`).

Deviations and choices:

- The small-scale study (``lib/experiments/fs_merge.py``) trains a fixed number of steps
  (300 for MLPs, 200 for the ViT) at a peak lr of 3e-3 instead of 100 epochs at 1e-4, for
  FS-Merge and distillation alike: a deviation of that study (chosen in a pilot on the
  training loss), not of this module, whose defaults stay the paper's.
- The low-rank factors start as A = 0, C = 0 with B, D random, so the product is zero (the
  "first" start is exact) while both factors still receive gradients.
- Distillation's student starts from model 1 and keeps FS-Merge's per-task output maps
  U_out, so that the two methods differ only in what is trained (the SuperNet's M and U vs
  the student's weights).
- Augmentation: random crop (reflect padding 4), horizontal flip and one of grayscale /
  solarize / 3×3 box blur; the paper's exact crop size and blur kernel are not stated in
  METHODS.md, so these are this module's.
- Architectures: :class:`~lib.archs.MLP` and the CLIP-layout :class:`~lib.archs.ViT` only.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .archs import MLP, ViT, activation, multi_head_attention

INITS = ("first", "average")


@dataclass
class FSMergeConfig:
    """Settings of one FS-Merge (or distillation) run; defaults are the paper's."""

    rank: int = 12  # rank r of the low-rank part of every M and U
    init: str = "first"  # "first": start exactly at model 1; "average": M_i = I/N
    lr: float = 1e-4  # peak learning rate of the one-cycle schedule (AdamW)
    weight_decay: float = 1e-3
    epochs: int = 100
    batch_size: int = 128
    num_images: int = 100  # unlabeled original images per task
    augment: int = 800  # augmented images per task added to the originals (0: none)
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class MergeMatrix(nn.Module):
    """M: N·d → d, M = [D_1 … D_N] + A·B; applied to per-model vectors of shape (..., N, d)."""

    def __init__(self, num_models: int, dim: int, rank: int, init: str, generator: torch.Generator | None = None):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; expected one of {INITS}")
        diag = torch.zeros(num_models, dim)
        if init == "first":
            diag[0] = 1.0
        else:
            diag[:] = 1.0 / num_models
        self.diag = nn.Parameter(diag)
        # A = 0 and B random: the low-rank product starts at zero but still gets gradients.
        self.low_a = nn.Parameter(torch.zeros(dim, rank))
        self.low_b = nn.Parameter(torch.randn(rank, num_models, dim, generator=generator) / math.sqrt(num_models * dim))

    def forward(self, ys: torch.Tensor) -> torch.Tensor:
        diagonal = (ys * self.diag).sum(-2)
        low_rank = torch.einsum("...nd,rnd->...r", ys, self.low_b) @ self.low_a.T
        return diagonal + low_rank

    def blocks(self) -> torch.Tensor:
        """The dense M as (d, N, d): ``blocks()[:, i]`` is M_i."""
        return torch.diag_embed(self.diag).permute(1, 0, 2) + torch.einsum("ar,rnc->anc", self.low_a, self.low_b)


class UnmergeMatrix(nn.Module):
    """U: d → N·d, U = [E_1; …; E_N] + C·D; maps (..., d) to per-model vectors (..., N, d)."""

    def __init__(self, num_models: int, dim: int, rank: int, generator: torch.Generator | None = None):
        super().__init__()
        self.diag = nn.Parameter(torch.ones(num_models, dim))  # every model starts from a copy
        self.low_c = nn.Parameter(torch.zeros(num_models, dim, rank))
        self.low_d = nn.Parameter(torch.randn(rank, dim, generator=generator) / math.sqrt(dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.unsqueeze(-2) * self.diag + torch.einsum("...r,nar->...na", h @ self.low_d.T, self.low_c)

    def block(self, h: torch.Tensor, i: int) -> torch.Tensor:
        """U_i h only, without computing the other N−1 blocks."""
        return h * self.diag[i] + (h @ self.low_d.T) @ self.low_c[i].T

    def blocks(self) -> torch.Tensor:
        """The dense U as (N, d, d): ``blocks()[i]`` is U_i."""
        return torch.diag_embed(self.diag) + torch.einsum("nar,rc->nac", self.low_c, self.low_d)


class FoldableLinear(nn.Module):
    """h ↦ M(W_i U_i h + b_i for every model i), with the N frozen (W_i, b_i) stacked.

    ``shared_input=True`` drops U (every model reads the same input, U_i = I).
    """

    def __init__(
        self,
        weights: Sequence[torch.Tensor],
        biases: Sequence[torch.Tensor] | None,
        rank: int,
        init: str,
        shared_input: bool = False,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        n = len(weights)
        self.register_buffer("weight", torch.stack([w.detach() for w in weights]))  # (N, out, in)
        bias = None if biases is None else torch.stack([b.detach() for b in biases])
        self.register_buffer("bias", bias)  # (N, out) or None
        out_dim, in_dim = self.weight.shape[1:]
        self.unmerge = None if shared_input else UnmergeMatrix(n, in_dim, rank, generator)
        self.merge = MergeMatrix(n, out_dim, rank, init, generator)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        xs = h.unsqueeze(-2).expand(*h.shape[:-1], self.weight.shape[0], h.shape[-1]) if self.unmerge is None else self.unmerge(h)
        ys = torch.einsum("...ni,noi->...no", xs, self.weight)
        if self.bias is not None:
            ys = ys + self.bias
        return self.merge(ys)

    def fold(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W, b) with W = Σ_i M_i W_i U_i and b = Σ_i M_i b_i."""
        m = self.merge.blocks()
        wu = self.weight if self.unmerge is None else self.weight @ self.unmerge.blocks()
        weight = torch.einsum("anb,nbc->ac", m, wu)
        bias = None if self.bias is None else torch.einsum("anb,nb->a", m, self.bias)
        return weight, bias


def _layer_norm_from(norm: nn.LayerNorm) -> nn.LayerNorm:
    """A trainable copy of a (frozen) model's LayerNorm."""
    copied = copy.deepcopy(norm)
    copied.requires_grad_(True)
    return copied


class _TaskOutputs(nn.Module):
    """What FS-Merge's SuperNet and the distillation baseline share: per-task features
    (``task_features(x, t)``, defined by each), logits through task t's own head, and the
    feature-reconstruction loss against teacher t."""

    def task_logits(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.teachers[task].head(self.task_features(x, task))

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.task_features(x, task)

    def feature_loss(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return feature_loss(self.task_features(x, task), self.teachers[task], x)


class SuperNet(_TaskOutputs):
    """Common part of the MLP and ViT SuperNets: teachers, U_out, loss and folding.

    Subclasses implement ``merged_features(x)`` (the merged-width features z, before U_out)
    and ``folded_state_dict()`` (the original architecture's parameters, folded).
    """

    def __init__(self, models: Sequence[nn.Module], rank: int, generator: torch.Generator | None):
        super().__init__()
        if len({type(m) for m in models}) != 1:
            raise TypeError("all models must have the same class")
        # The originals provide the targets (each model's own features). They are frozen in
        # place (requires_grad off, eval mode), not copied, to save memory.
        self.teachers = nn.ModuleList(models).requires_grad_(False).eval()
        self.out_unmerge = UnmergeMatrix(len(models), models[0].feature_dim, rank, generator)

    @property
    def num_models(self) -> int:
        return len(self.teachers)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teachers.eval()  # teachers stay in eval mode (no dropout/batch-norm updates)
        return self

    def to_models_device_and_dtype(self) -> None:
        """Put the new parameters (created on the CPU in float32) where the models are."""
        reference = self.teachers[0].head.weight
        self.to(device=reference.device, dtype=reference.dtype)

    def merged_features(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"{type(self).__name__} must define merged_features (see MLPSuperNet, ViTSuperNet)")

    def folded_state_dict(self) -> dict[str, torch.Tensor]:
        raise RuntimeError(f"{type(self).__name__} must define folded_state_dict (see MLPSuperNet, ViTSuperNet)")

    def task_features(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """U_out,t z: the SuperNet's reconstruction of model ``task``'s features."""
        return self.out_unmerge.block(self.merged_features(x), task)

    @torch.no_grad()
    def fold(self) -> tuple[nn.Module, torch.Tensor]:
        """Collapse the SuperNet into one model of the original class, shape and size.

        Returns ``(model, out_unmerge)``: ``model`` is a copy of model 1 (its ``head`` is
        model 1's, kept only so the architecture is unchanged) with every linear map
        replaced by W = Σ_i M_i W_i U_i, b = Σ_i M_i b_i and the LayerNorms by the learned
        ones; ``out_unmerge`` is (N, d_feat, d_feat) with block t = U_out,t. Task t's logits
        are ``heads[t](model.features(x) @ out_unmerge[t].T)`` (see :func:`folded_logits`).
        """
        model = copy.deepcopy(self.teachers[0]).requires_grad_(True)
        model.load_state_dict({**model.state_dict(), **self.folded_state_dict()})
        return model, self.out_unmerge.blocks().detach().clone()


class MLPSuperNet(SuperNet):
    """Foldable SuperNet of N :class:`~lib.archs.MLP` s: per hidden layer U → W_i → M → activation."""

    def __init__(self, models: Sequence[MLP], rank: int = 12, init: str = "first", seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        super().__init__(models, rank, generator)
        self.activation = models[0].activation
        self.layers = nn.ModuleList(
            FoldableLinear(
                [m.layers[i].weight for m in models],
                [m.layers[i].bias for m in models],
                rank,
                init,
                shared_input=(i == 0),  # every model reads the same input vector
                generator=generator,
            )
            for i in range(len(models[0].layers))
        )
        self.to_models_device_and_dtype()

    def merged_features(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for layer in self.layers:
            h = activation(self.activation, layer(h))
        return h

    def folded_state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for i, layer in enumerate(self.layers):
            state[f"layers.{i}.weight"], state[f"layers.{i}.bias"] = layer.fold()
        return state


class FoldableEmbedding(nn.Module):
    """Concatenate the N models' patch + class + position embeddings, then M."""

    def __init__(self, models: Sequence[ViT], rank: int, init: str, generator: torch.Generator | None):
        super().__init__()
        self.patch_size = models[0].conv1.kernel_size
        self.register_buffer("conv_weight", torch.stack([m.conv1.weight.detach() for m in models]))  # (N, w, C, p, p)
        self.register_buffer("class_embedding", torch.stack([m.class_embedding.detach() for m in models]))  # (N, w)
        self.register_buffer("positional_embedding", torch.stack([m.positional_embedding.detach() for m in models]))  # (N, L, w)
        self.merge = MergeMatrix(len(models), self.class_embedding.shape[1], rank, init, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, width = self.class_embedding.shape
        patches = F.conv2d(x, self.conv_weight.flatten(0, 1), stride=self.patch_size)  # (B, N·w, g, g)
        patches = patches.flatten(2).transpose(1, 2).unflatten(-1, (n, width))  # (B, P, N, w)
        cls = self.class_embedding.expand(x.shape[0], 1, n, width)
        tokens = torch.cat([cls, patches], dim=1) + self.positional_embedding.transpose(0, 1)
        return self.merge(tokens)

    def fold(self) -> dict[str, torch.Tensor]:
        # The embedding is linear in each model's parameters, so M folds into each of them.
        m = self.merge.blocks()
        conv = torch.einsum("anb,nbk->ak", m, self.conv_weight.flatten(2))
        return {
            "conv1.weight": conv.reshape(self.conv_weight.shape[1:]),
            "class_embedding": torch.einsum("anb,nb->a", m, self.class_embedding),
            "positional_embedding": torch.einsum("anb,nlb->la", m, self.positional_embedding),
        }


class FoldableBlock(nn.Module):
    """A pre-norm transformer block of the SuperNet, in the merged width.

    Attention: LN → U → each model's Q/K/V → M_Q/M_K/M_V → attention → U_O → each W_O → M_O;
    MLP: LN → U → each c_fc → M → activation → U → each c_proj → M; both added to the residual.
    """

    def __init__(self, blocks: Sequence[nn.Module], rank: int, init: str, activation: str, generator: torch.Generator | None):
        super().__init__()
        self.heads = blocks[0].attn.heads
        self.activation = activation
        self.ln_1 = _layer_norm_from(blocks[0].ln_1)
        self.ln_2 = _layer_norm_from(blocks[0].ln_2)
        width = blocks[0].attn.out_proj.in_features
        qkv = {}
        for j, name in enumerate(("q", "k", "v")):
            rows = slice(j * width, (j + 1) * width)
            qkv[name] = FoldableLinear(
                [b.attn.in_proj_weight[rows] for b in blocks], [b.attn.in_proj_bias[rows] for b in blocks], rank, init, generator=generator
            )
        self.q, self.k, self.v = qkv["q"], qkv["k"], qkv["v"]
        linear = lambda get: FoldableLinear([get(b).weight for b in blocks], [get(b).bias for b in blocks], rank, init, generator=generator)  # noqa: E731
        self.out = linear(lambda b: b.attn.out_proj)
        self.fc = linear(lambda b: b.mlp.c_fc)
        self.proj = linear(lambda b: b.mlp.c_proj)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.ln_1(h)
        h = h + self.out(multi_head_attention(self.q(a), self.k(a), self.v(a), self.heads))
        return h + self.proj(activation(self.activation, self.fc(self.ln_2(h))))

    def fold(self, prefix: str) -> dict[str, torch.Tensor]:
        (wq, bq), (wk, bk), (wv, bv) = self.q.fold(), self.k.fold(), self.v.fold()
        state = {
            f"{prefix}attn.in_proj_weight": torch.cat([wq, wk, wv]),
            f"{prefix}attn.in_proj_bias": torch.cat([bq, bk, bv]),
        }
        for name, layer in (("attn.out_proj", self.out), ("mlp.c_fc", self.fc), ("mlp.c_proj", self.proj)):
            state[f"{prefix}{name}.weight"], state[f"{prefix}{name}.bias"] = layer.fold()
        for name in ("ln_1", "ln_2"):
            for key, value in getattr(self, name).state_dict().items():
                state[f"{prefix}{name}.{key}"] = value
        return state


class ViTSuperNet(SuperNet):
    """Foldable SuperNet of N :class:`~lib.archs.ViT` s (see :class:`FoldableBlock`).

    Embeddings: concatenated, then M. Output: ln_post on the class token → U → each model's
    proj → M → z, and U_out,t z before task t's head.
    """

    def __init__(self, models: Sequence[ViT], rank: int = 12, init: str = "first", seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        super().__init__(models, rank, generator)
        self.embed = FoldableEmbedding(models, rank, init, generator)
        self.ln_pre = _layer_norm_from(models[0].ln_pre)
        self.blocks = nn.ModuleList(
            FoldableBlock([m.transformer.resblocks[i] for m in models], rank, init, models[0].activation, generator)
            for i in range(len(models[0].transformer.resblocks))
        )
        self.ln_post = _layer_norm_from(models[0].ln_post)
        # open_clip applies proj as x @ proj, so W_i = proj_iᵀ (output_dim × width), no bias.
        self.proj = FoldableLinear([m.proj.T for m in models], None, rank, init, generator=generator)
        self.to_models_device_and_dtype()

    def merged_features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_pre(self.embed(x))
        for block in self.blocks:
            h = block(h)
        return self.proj(self.ln_post(h[:, 0]))

    def folded_state_dict(self) -> dict[str, torch.Tensor]:
        state = self.embed.fold()
        for i, block in enumerate(self.blocks):
            state.update(block.fold(f"transformer.resblocks.{i}."))
        for name in ("ln_pre", "ln_post"):
            for key, value in getattr(self, name).state_dict().items():
                state[f"{name}.{key}"] = value
        state["proj"] = self.proj.fold()[0].T
        return state


def build_supernet(models: Sequence[nn.Module], rank: int = 12, init: str = "first", seed: int = 0) -> SuperNet:
    """The SuperNet class that fits the models' architecture (MLP or ViT)."""
    if all(isinstance(m, ViT) for m in models):
        return ViTSuperNet(models, rank, init, seed)
    if all(isinstance(m, MLP) for m in models):
        return MLPSuperNet(models, rank, init, seed)
    raise TypeError(f"no SuperNet for {sorted({type(m).__name__ for m in models})}")


def feature_loss(reconstruction: torch.Tensor, teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MSE between a reconstruction of ``teacher``'s features on ``x`` and the features themselves."""
    with torch.no_grad():
        target = teacher.features(x)
    return F.mse_loss(reconstruction, target)


def folded_logits(model: nn.Module, out_unmerge: torch.Tensor, head: nn.Module, x: torch.Tensor, task: int) -> torch.Tensor:
    """Task ``task``'s logits from a folded model: head_t(U_out,t · features(x))."""
    return head(model.features(x) @ out_unmerge[task].T)


class Distillation(_TaskOutputs):
    """Knowledge-distillation baseline: one student (a trainable copy of model 1) and, per
    task, an output map U_out,t with FS-Merge's parametrisation and identity init.

    The loss, data and U_out are those of the SuperNet; the only difference is that the
    student's weights are free instead of being U → W_i → M combinations of the teachers'.
    The per-task maps are kept (rather than the identity) so that the comparison isolates
    the SuperNet interior. The student's head is frozen (it is unused).
    """

    def __init__(self, models: Sequence[nn.Module], rank: int = 12, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.teachers = nn.ModuleList(models).requires_grad_(False).eval()
        self.student = copy.deepcopy(models[0]).requires_grad_(True)
        self.student.head.requires_grad_(False)
        reference = models[0].head.weight
        self.out_unmerge = UnmergeMatrix(len(models), models[0].feature_dim, rank, generator).to(reference.device, reference.dtype)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teachers.eval()
        return self

    def task_features(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.out_unmerge.block(self.student.features(x), task)

    @torch.no_grad()
    def fold(self) -> tuple[nn.Module, torch.Tensor]:
        """``(student copy, out_unmerge)``, the same interface as :meth:`SuperNet.fold`."""
        return copy.deepcopy(self.student), self.out_unmerge.blocks().detach().clone()


def _batches_forever(loader: Iterable):
    """Iterate a loader again and again (a DataLoader reshuffles on every pass)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("a task's loader yields no batches")


def _inputs(batch) -> torch.Tensor:
    # Labels, if a loader yields them, are ignored: the method only uses unlabeled inputs.
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def train_supernet(
    model: SuperNet | Distillation,
    loaders_per_task: Sequence[Iterable],
    epochs: int | None = None,
    steps: int | None = None,
    lr: float = 1e-4,
    weight_decay: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    autocast: torch.dtype | None = None,
    micro_batches: int = 1,
) -> list[float]:
    """Train a SuperNet (or the distillation baseline) on the feature-reconstruction loss.

    Each step takes one batch from every task's loader (shorter loaders restart), averages
    the tasks' feature losses and takes one AdamW step; the learning rate follows a
    one-cycle schedule peaking at ``lr``. An epoch is as many steps as the longest loader
    has batches. Give exactly one of ``epochs`` and ``steps``. ``seed`` seeds torch's global
    generator, which a DataLoader without its own generator uses to shuffle. ``autocast``
    (e.g. ``torch.bfloat16`` on a GPU) runs the forward passes under ``torch.autocast``; the
    parameters, the optimiser and folding stay in their own dtype. ``micro_batches`` > 1 splits
    each task's batch into that many chunks and runs backward chunk by chunk, each chunk's mean
    loss weighted by its share of the step: the same gradient (up to float rounding) with the
    activations of one chunk of one task alive at a time instead of every task's whole batch.
    Returns the loss of every step.
    """
    from tqdm.auto import tqdm

    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs and steps")
    if micro_batches < 1:
        raise ValueError(f"micro_batches = {micro_batches}: pass 1 (one backward per step) or more.")
    if len(loaders_per_task) != len(model.teachers):
        raise ValueError(f"{len(loaders_per_task)} loaders for {len(model.teachers)} models")
    if steps is None:
        steps = epochs * max(len(loader) for loader in loaders_per_task)
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    streams = [_batches_forever(loader) for loader in loaders_per_task]
    model.train()
    history = []
    bar = tqdm(range(steps), desc="FS-Merge" if isinstance(model, SuperNet) else "distillation", disable=not progress)
    for _ in bar:
        if micro_batches == 1:
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                losses = [model.feature_loss(_inputs(next(stream)).to(device), task) for task, stream in enumerate(streams)]
                loss = torch.stack(losses).float().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        else:
            optimizer.zero_grad(set_to_none=True)
            loss = _accumulated_loss(model, streams, micro_batches, device, autocast)
        optimizer.step()
        schedule.step()
        history.append(loss.item())
        bar.set_postfix(loss=f"{history[-1]:.4g}")
    model.eval()
    return history


def _accumulated_loss(model, streams, micro_batches: int, device, autocast) -> torch.Tensor:
    """One step's mean over tasks of the feature loss, its gradient accumulated chunk by chunk
    (``train_supernet``'s ``micro_batches``); returns the detached loss."""
    total = torch.zeros((), device=device)
    for task, stream in enumerate(streams):
        x = _inputs(next(stream))
        for chunk in x.tensor_split(min(micro_batches, len(x))):
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                part = model.feature_loss(chunk.to(device), task).float() * (len(chunk) / len(x) / len(streams))
            part.backward()
            total += part.detach()
    return total


def fs_merge(models: Sequence[nn.Module], loaders_per_task: Sequence[Iterable], config: FSMergeConfig, progress: bool = True):
    """Build, train and fold a SuperNet: returns ``(model, out_unmerge, loss history)``."""
    supernet = build_supernet(models, config.rank, config.init, config.seed)
    history = train_supernet(
        supernet, loaders_per_task, epochs=config.epochs, lr=config.lr, weight_decay=config.weight_decay, seed=config.seed, progress=progress
    )
    return (*supernet.fold(), history)


def distill(models: Sequence[nn.Module], loaders_per_task: Sequence[Iterable], config: FSMergeConfig, progress: bool = True):
    """The distillation baseline with FS-Merge's loss, data and schedule: ``(model, out_unmerge, history)``."""
    student = Distillation(models, config.rank, config.seed)
    history = train_supernet(
        student, loaders_per_task, epochs=config.epochs, lr=config.lr, weight_decay=config.weight_decay, seed=config.seed, progress=progress
    )
    return (*student.fold(), history)


def augmented_pool(images: torch.Tensor, num_augmented: int, seed: int = 0, padding: int = 4) -> torch.Tensor:
    """The originals plus ``num_augmented`` augmented copies of randomly chosen ones.

    Each copy gets a random crop with ``padding`` (reflect), a random horizontal flip and
    one of grayscale / solarize / 3×3 blur, as in the paper's low-data setting. ``images``
    are (n, C, H, W) in [0, 1], before any normalisation (solarize needs pixel values).
    """
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4, mode="reflect")
    copies = []
    for _ in range(num_augmented):
        i = int(torch.randint(n, (1,), generator=g))
        top, left = (int(v) for v in torch.randint(2 * padding + 1, (2,), generator=g))
        x = padded[i, :, top : top + h, left : left + w]
        if torch.rand(1, generator=g) < 0.5:
            x = x.flip(-1)
        kind = int(torch.randint(3, (1,), generator=g))
        if kind == 0 and c == 3:  # grayscale (ITU-R 601 luma), kept as 3 channels
            x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).expand(3, h, w)
        elif kind == 1:  # solarize: invert the pixels above one half
            x = torch.where(x >= 0.5, 1.0 - x, x)
        else:  # blur: 3×3 box filter per channel
            x = F.avg_pool2d(F.pad(x[None], (1, 1, 1, 1), mode="replicate"), 3, stride=1)[0]
        copies.append(x)
    return torch.cat([images, torch.stack(copies)]) if copies else images.clone()


__all__ = [
    "FSMergeConfig",
    "MergeMatrix",
    "UnmergeMatrix",
    "FoldableLinear",
    "SuperNet",
    "MLPSuperNet",
    "ViTSuperNet",
    "build_supernet",
    "feature_loss",
    "folded_logits",
    "Distillation",
    "train_supernet",
    "fs_merge",
    "distill",
    "augmented_pool",
]
