"""Task heads: the classifiers that sit on a shared encoder, one per task, never merged.

A head is a state dict, and its keys say which module computes it (:func:`head_module`):

- a **linear** head, ``{"weight": [C, d], "bias": [C]}``, optionally with ``"normalize"`` (a
  0-d tensor, 1 = L2-normalize the features before the linear map, as CLIP's zero-shot heads
  do): every small-scale head and CLIP's zero-shot heads;
- a **two-layer** head, ``{"dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias"}``:
  RoBERTa's sequence-classification head (dense -> tanh -> out_proj), which the GLUE experts
  train with their encoder (``lib.paper.glue``). One output (STS-B) is a regression.

So training, statistics and evaluation build every head the same way, whatever its kind.

Zero-shot head (METHODS.md §7, the CLIP recipe; Radford et al. 2021, Ilharco et al. 2023):

    w_c = T · normalize( mean_j normalize(e(description_{c,j})) ),   b_c = 0,
    logits(x) = W · normalize(f(x))

where ``e`` embeds a class description with the pretrained encoder θ0 and ``T`` is the
temperature (CLIP's logit scale). The head is built once from θ0 and stays frozen while
experts fine-tune the encoder under it, so θ0 itself is a (weak) multi-task model: the
regime in which the merging papers measure.

Deviation: for MiniLM we use T = 20, the scale all-MiniLM-L6-v2 was trained with
(sentence-transformers' MultipleNegativesRankingLoss), where CLIP uses its learned 100.
T does not change θ0's predictions (argmax), only the loss landscape experts train in.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

MINILM_TEMPERATURE = 20.0


class TaskHead(nn.Linear):
    """``nn.Linear`` that can L2-normalize its input first (zero-shot heads)."""

    def __init__(self, in_features: int, out_features: int, normalize: bool = False):
        super().__init__(in_features, out_features)
        self.normalize_input = bool(normalize)
        # A buffer only when used, so plain linear heads keep their two-key state.
        if self.normalize_input:
            self.register_buffer("normalize", torch.tensor(1.0))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.normalize_input:
            features = F.normalize(features, dim=-1)
        return super().forward(features)


class SequenceClassificationHead(nn.Module):
    """RoBERTa's classification head on ``<s>`` features: dropout, dense, tanh, dropout,
    out_proj (the order of transformers' ``RobertaClassificationHead``).

    Dropout acts only in a training step: in train mode *and* with gradients on. The project's
    fine-tuning loop scores validation under ``no_grad`` without leaving train mode, and a
    validation score must not depend on dropout masks."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, num_labels)
        self.p = dropout

    @property
    def weight(self) -> torch.Tensor:
        """The output layer's weight ([outputs, hidden]), where a linear head has its own: code
        that asks a head for its device or its number of outputs reads it."""
        return self.out_proj.weight

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        active = self.training and torch.is_grad_enabled()
        x = torch.tanh(self.dense(F.dropout(features, self.p, active)))
        return self.out_proj(F.dropout(x, self.p, active))


LINEAR_KEYS = ("weight", "bias")  # and optionally "normalize"
CLASSIFIER_KEYS = ("dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias")


def classification_head(state: dict[str, torch.Tensor], dropout: float = 0.1) -> SequenceClassificationHead:
    """The two-layer head whose state is ``state`` (keys ``CLASSIFIER_KEYS``), in eval mode,
    its parameters trainable."""
    if set(state) != set(CLASSIFIER_KEYS):
        raise ValueError(f"a RoBERTa classification head has keys {', '.join(CLASSIFIER_KEYS)}; got {sorted(state)}.")
    num_labels, hidden = state["out_proj.weight"].shape
    head = SequenceClassificationHead(hidden, num_labels, dropout)
    head.load_state_dict(dict(state))
    return head.eval()


def head_module(state: dict[str, torch.Tensor]) -> nn.Module:
    """A frozen module computing the head whose state is ``state``: a two-layer head for
    ``CLASSIFIER_KEYS``, else a linear one (see the module docstring)."""
    if set(state) == set(CLASSIFIER_KEYS):
        return classification_head(state).requires_grad_(False)
    unknown = set(state) - {*LINEAR_KEYS, "normalize"}
    if unknown or not set(LINEAR_KEYS) <= set(state):
        raise ValueError(f"a head state has keys weight, bias (and optionally normalize), or a two-layer head's "
                         f"{', '.join(CLASSIFIER_KEYS)}; got {sorted(state)}.")
    out_features, in_features = state["weight"].shape
    head = TaskHead(in_features, out_features, normalize=bool(state.get("normalize", 0)))
    head.load_state_dict(dict(state))
    return head.requires_grad_(False)


def zero_shot_head(class_embeddings: list[torch.Tensor], temperature: float) -> dict[str, torch.Tensor]:
    """The zero-shot head of classes described by ``class_embeddings[c]`` ([n_c, d], one row
    per description of class c): each class's normalized mean of normalized embeddings, × T."""
    if not class_embeddings or any(e.ndim != 2 or len(e) == 0 for e in class_embeddings):
        raise ValueError("zero_shot_head needs, for every class, a [n_descriptions, d] tensor with n ≥ 1.")
    if not temperature > 0:
        raise ValueError(f"temperature = {temperature}: pass a positive number.")
    prototypes = torch.stack([F.normalize(F.normalize(e.float(), dim=-1).mean(0), dim=0) for e in class_embeddings])
    return {"weight": temperature * prototypes, "bias": torch.zeros(len(class_embeddings)),
            "normalize": torch.tensor(1.0)}


def random_head(in_features: int, num_classes: int, seed: int) -> dict[str, torch.Tensor]:
    """A freshly initialised linear head (PyTorch's default init), seeded: the start of a head
    trained jointly with its expert, as in the GLUE merging papers."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        head = nn.Linear(in_features, num_classes)
    finally:
        torch.random.set_rng_state(generator_state)
    return {k: v.detach().clone() for k, v in head.state_dict().items()}
