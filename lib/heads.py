"""Task heads: the linear classifiers that sit on a shared encoder, one per task.

A head's state is ``{"weight": [C, d], "bias": [C]}``, optionally with ``"normalize"`` (a
0-d tensor, 1 = L2-normalize the features before the linear map, as CLIP's zero-shot heads
do). Every kind of head in this project is such a state, so merging, statistics and
evaluation treat them alike.

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


def head_module(state: dict[str, torch.Tensor]) -> TaskHead:
    """A frozen module computing the head whose state is ``state``."""
    unknown = set(state) - {"weight", "bias", "normalize"}
    if unknown or not {"weight", "bias"} <= set(state):
        raise ValueError(f"a head state has keys weight, bias (and optionally normalize); got {sorted(state)}.")
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
