"""Representation Surgery on top of any merged encoder (METHODS.md §2).

Yang et al. 2024, "Representation Surgery for Multi-Task Model Merging" (ICML).

    z' = z − Up(ReLU(Down(z)))                      per task t, on the merged encoder's features z
    loss_t = mean |z' − z_t|                        (L1, z_t = task t's expert's features, same inputs)

Down: d → r (r = 16), no bias, Kaiming-uniform init (a = √5, ``nn.Linear``'s default, which the
authors' code calls explicitly). Up: r → d, no bias (the authors' code has none), zero init,
so an untrained adapter is the identity. Only the adapters train; the merged and expert
encoders are frozen. Defaults (the authors' code): Adam, lr 1e-3, betas (0.9, 0.999);
500 iterations; each iteration draws 2 batches of 16 unlabeled inputs per task and takes one
Adam step per batch on that task's L1 loss (mean over examples and features, as
``torch.nn.L1Loss``).

Conventions and deviations:

- Each task has its own Adam. The authors use one Adam over all adapters, stepped after each
  task's batch with the other adapters' gradients set to None; Adam skips parameters without
  a gradient, so that is the same update.
- Functions over tensors: the features come from callables ``(task, inputs) -> [B, d]``, run
  under ``no_grad`` (``frozen_features`` builds them from a module and state dicts, in eval
  mode through ``torch.func.functional_call``, so BatchNorm statistics are never updated).
  The adapters are plain state dicts ``{"down.weight": [r, d], "up.weight": [d, r]}``, the keys
  of two bias-free ``nn.Linear``.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..functional import detached_buffers, eval_mode, model_inputs

RANK = 16
Features = Callable[[object, Mapping[str, Tensor]], Tensor]


def init_adapter(dim: int, rank: int = RANK, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """A fresh adapter for d = ``dim`` features: Down Kaiming-uniform, Up zero (the identity)."""
    down = torch.empty(rank, dim)
    nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
    return {"down.weight": down, "up.weight": torch.zeros(dim, rank)}


def apply_surgery(adapter: Mapping[str, Tensor], z: Tensor) -> Tensor:
    """z − Up(ReLU(Down(z))), for features ``z`` [..., d]."""
    return z - F.relu(z @ adapter["down.weight"].T) @ adapter["up.weight"].T


def surgery_loss(adapter: Mapping[str, Tensor], z: Tensor, target: Tensor) -> Tensor:
    """The L1 distance (mean over every entry) between the corrected features and the expert's."""
    return (apply_surgery(adapter, z) - target).abs().mean()


def frozen_features(model: nn.Module, states) -> Features:
    """``(task, inputs) -> features`` of ``model`` at fixed weights, in eval mode, without grad.

    ``states``: one state dict (tensors) for every task, e.g. the merged encoder, or a mapping
    task → state dict, e.g. the experts. Keys a state lacks are the module's own.
    """
    single = all(torch.is_tensor(v) for v in states.values())

    @torch.no_grad()
    def features(task, inputs):
        state = states if single else states[task]
        tensors = {**detached_buffers(model), **{n: p.detach() for n, p in model.named_parameters()}, **state}
        with eval_mode(model):
            return functional_call(model, tensors, args=(), kwargs=model_inputs(inputs))

    return features


class SurgeryResult:
    """``adapters``: task → adapter state dict (detached); ``history``: one dict per iteration with
    "step" and "l1" {task: mean over that iteration's batches of the loss before each update}."""

    def __init__(self, adapters: dict, history: list[dict]):
        self.adapters, self.history = adapters, history

    def __repr__(self):
        return f"SurgeryResult({len(self.adapters)} adapters, {len(self.history)} iterations)"


def train_surgery(merged_features: Features, expert_features: Features, batches, steps: int = 500,
                  lr: float = 1e-3, rank: int = RANK, seed: int = 0, *,
                  progress: Callable[[Iterable], Iterable] | None = None) -> SurgeryResult:
    """Train one adapter per task to pull the merged features toward that task's expert's.

    ``merged_features(task, inputs)`` and ``expert_features(task, inputs)`` give [B, d] features
    (e.g. ``frozen_features``, or look-ups of precomputed ones). ``batches``: per iteration a dict
    task → input batch (or list of batches: one Adam step each), from an iterator or a function
    ``batches(step)``. Adapters are created at a task's first batch, seeded by ``seed`` in the
    order tasks first appear.
    """
    generator = torch.Generator().manual_seed(seed)
    adapters: dict = {}
    optimizers: dict = {}
    draw = batches if callable(batches) else (lambda step, it=iter(batches): next(it))
    history = []
    for step in (range(steps) if progress is None else progress(range(steps))):
        record = {"step": step, "l1": {}}
        for task, task_batches in draw(step).items():
            task_batches = [task_batches] if isinstance(task_batches, Mapping) else list(task_batches)
            losses = []
            for inputs in task_batches:
                with torch.no_grad():  # the encoders are frozen: only the adapter learns
                    z, target = merged_features(task, inputs), expert_features(task, inputs)
                if task not in adapters:
                    adapters[task] = {k: v.requires_grad_() for k, v in init_adapter(z.shape[-1], rank, generator).items()}
                    optimizers[task] = torch.optim.Adam(adapters[task].values(), lr=lr, betas=(0.9, 0.999))
                loss = surgery_loss(adapters[task], z, target)
                optimizers[task].zero_grad(set_to_none=True)
                loss.backward()
                optimizers[task].step()
                losses.append(float(loss.detach()))
            record["l1"][task] = sum(losses) / len(losses)
        history.append(record)
    return SurgeryResult({t: {k: v.detach() for k, v in a.items()} for t, a in adapters.items()}, history)
