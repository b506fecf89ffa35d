"""AdaMerging and AdaMerging++: merging coefficients learned from unlabeled data (METHODS.md §2).

Yang et al. 2024, "AdaMerging: Adaptive Model Merging for Multi-Task Learning" (ICLR).

    task-wise   θ(λ)  = θ0  + Σt clamp(λt, 0, 1)   · τt            (T coefficients)
    layer-wise  θk(λ) = θ0k + Σt clamp(λt,k, 0, 1) · τt,k          (T × K: one per task per tensor)
    loss        L(λ)  = Σ_{t adapted} mean_x H(softmax(head_t(f(x; θ(λ))))),   H(p) = −Σc pc log pc

on unlabeled inputs x of each task t; heads are never merged (each task reads the merged
encoder through its own frozen head). AdaMerging++ is the same on TIES-processed task vectors
(``ties_task_vectors``).

Defaults (the authors' code, METHODS.md §2): every λ starts at 0.3 and is clamped to [0, 1]
at every forward; Adam, lr 1e-3, betas (0.9, 0.999), no weight decay; 500 steps; each step
draws 2 batches of 16 per task and takes one Adam step on the sum over tasks and batches of
the batch-mean entropies; TIES density 0.2 for ++.

Conventions and deviations:

- **Which keys are merged.** The keys of the τ's decide: a key of θ0 that the τ's lack passes
  through as θ0's own tensor. ``lib.merging.task_vectors`` already leaves out non-floating keys
  (``num_batches_tracked``); ``without_frozen`` drops the tensors no expert changed (MiniLM's
  frozen token embeddings), so they get no coefficient. The learned keys are the τ keys that are
  not buffers, in the order of ``list(pretrained)`` (``learned_keys``); K = their number and
  column k of a (T, K) coefficient tensor belongs to the k-th of them.
- **Buffers.** BatchNorm running statistics follow the project's one buffer rule
  (``_common.py``): a buffer key present in the τ's gets the experts' plain average,
  θ0 + (1/T) Σt τt, never a coefficient. A buffer key absent from the τ's passes through (θ0's).
  The model runs in eval mode, so running statistics are read, never updated (``batchnorm=
  "batch"``: each batch's statistics are used instead, and still nothing is updated).
- **The model runs on the merged parameters** through ``torch.func.functional_call``: one
  module, no copies per task, no ``load_state_dict``. θ(λ) is computed once per step and shared
  by all tasks' forwards (the authors' code rebuilds it for every batch: same value, more work).
  Heads are called with their parameters detached, so no gradient reaches them.
- **Clamping and its gradient.** ``torch.clamp`` passes the gradient where 0 < λ < 1 and gives
  exactly 0 outside (at a bound itself torch 2.14 gives 0 too; older versions passed it). As in
  the authors' code the raw λ is left free: an Adam step can carry it past a bound, after which
  its gradient is 0 and it stays there (Adam's momentum decays to 0); its effective value is
  the bound. Coefficients that get no
  gradient at all (a tensor no adapted task's loss depends on) stay at their start, 0.3.
- **AdaMerging++'s task vectors** are exactly TIES's steps 1-2 per task (``ties_trim_and_elect``):
  τt trimmed to its top-20% entries by |τt| (one ranking over all of task t's non-buffer float
  entries), then zeroed where its sign disagrees with the elected sign s = sign(Σt τ̂t). The
  merge is their λ-weighted SUM: nothing divides by the number of agreeing tasks (the
  authors' "dis-sum"), so with every λ = c it equals ``ties_merging(..., scale=c,
  disjoint="sum")``. Deviations from the authors' trim (k = round(0.2·n) rather than
  n − (n − int(0.2·n)) kept; a sign that sums to exactly 0 gives 0 rather than the majority
  sign; buffers left out of the ranking) are those of ``ties.py``.
- **Batches.** Per step, each task's entry is one input batch or a list of them; each batch
  contributes its own mean entropy and the contributions are summed (the authors' 2 batches of
  16 give 2× the mean over 32 examples; Adam is nearly invariant to that factor).
- **Memory** stays flat over steps: the graph of a step is freed by its backward, and the
  history holds Python floats only. Within a step, one backward over all tasks' batches keeps
  every batch's activations alive at once (8 tasks × 2 × 16 images: 126 GiB for ViT-L/14 on an
  H200, ``make bench-gpu-paper``). ``per_batch_backward=True`` splits the chain rule in two:
  each batch's backward runs at once into g = ∂L/∂θ of a detached θ(λ) (its activations are
  then freed), and one last backward carries g to λ (∂L/∂λt,k = ⟨gk, τt,k⟩). The same gradient
  up to float summation order, one batch's activations at a time, for one θ-sized buffer g.
"""
from __future__ import annotations

from typing import Callable, Collection, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..functional import batch_statistics, detached_buffers, eval_mode, model_inputs
from ._common import StateDict, _check_numbers, buffer_keys
from .ties import ties_trim_and_elect

INIT = 0.3  # the authors' prior for every coefficient
Batch = Mapping[str, Tensor]


# ------------------------------------------------------------------------ task vectors


@torch.no_grad()
def without_frozen(task_vectors: Sequence[StateDict]) -> list[dict[str, Tensor]]:
    """The τ's without the keys that are exactly zero in every τ (tensors frozen during
    fine-tuning, such as MiniLM's token embeddings): they would only get a useless coefficient."""
    keep = [k for k in task_vectors[0] if any(bool(tau[k].any()) for tau in task_vectors)]
    return [{k: tau[k] for k in keep} for tau in task_vectors]


@torch.no_grad()
def ties_task_vectors(pretrained: StateDict, finetuned: Sequence[StateDict], density: float = 0.2, *,
                      buffers: Collection[str] | None = None) -> list[dict[str, Tensor]]:
    """AdaMerging++'s τ's: per task, TIES-trimmed (top ``density`` by |τt|) and sign-agreeing
    (see the module docstring). Buffer keys are added back as plain differences θt − θ0, so
    ``merged_state`` gives them the experts' average like every other merge does."""
    out = ties_trim_and_elect(pretrained, finetuned, density, buffers=buffers)
    for tau, ft in zip(out, finetuned):
        tau.update({k: ft[k] - pretrained[k] for k in buffer_keys(pretrained, buffers)})
    return [{k: tau[k] for k in pretrained if k in tau} for tau in out]  # θ0's key order


def learned_keys(pretrained: StateDict, task_vectors: Sequence[StateDict],
                 buffers: Collection[str] | None = None) -> list[str]:
    """The keys that get a coefficient: those of the τ's that are not buffers, in θ0's order.
    Column k of layer-wise coefficients (T, K) belongs to the k-th of them."""
    if len(task_vectors) == 0:
        raise ValueError("task_vectors is empty: pass one state dict τt = θt − θ0 per task.")
    unknown = [k for k in task_vectors[0] if k not in pretrained]
    if unknown:
        raise ValueError(f"the task vectors have keys that pretrained lacks: {unknown[:5]}")
    for t, tau in enumerate(task_vectors[1:], 1):
        if set(tau) != set(task_vectors[0]):
            raise ValueError(f"task_vectors[{t}] and task_vectors[0] have different keys: "
                             f"{sorted(set(tau) ^ set(task_vectors[0]))[:5]}")
    skip = set(buffer_keys(pretrained, buffers))
    return [k for k in pretrained if k in task_vectors[0] and k not in skip]


def initial_coefficients(num_tasks: int, num_keys: int | None = None, init: float = INIT) -> Tensor:
    """Every λ at ``init``: shape (T,) task-wise, or (T, K) layer-wise when ``num_keys`` is given."""
    shape = (num_tasks,) if num_keys is None else (num_tasks, num_keys)
    return torch.full(shape, float(init))


# --------------------------------------------------------------------------- the merge


def merged_state(pretrained: StateDict, task_vectors: Sequence[StateDict], coefficients: Tensor,
                 clamp: bool = True, *, buffers: Collection[str] | None = None) -> dict[str, Tensor]:
    """θ0 + Σt clamp(λt)·τt for every learned key, differentiable with respect to ``coefficients``.

    ``coefficients``: shape (T,) (task-wise) or (T, K) (layer-wise, columns in the order of
    ``learned_keys``). Buffer keys of the τ's get the experts' average θ0 + mean_t τt; keys of θ0
    the τ's lack are θ0's own tensors (not copies: do not modify the result in place).
    Returns every key of θ0, in θ0's order. Inputs are never modified.
    """
    keys = learned_keys(pretrained, task_vectors, buffers)
    T = len(task_vectors)
    if coefficients.shape not in ((T,), (T, len(keys))):
        raise ValueError(f"coefficients have shape {tuple(coefficients.shape)}; expected ({T},) task-wise "
                         f"or ({T}, {len(keys)}) layer-wise for {T} task vectors over {len(keys)} learned keys.")
    lam = coefficients.clamp(0.0, 1.0) if clamp else coefficients
    if lam.dim() == 1:
        lam = lam[:, None].expand(T, len(keys))  # one coefficient per task, shared by every key
    out = dict(pretrained)
    for j, k in enumerate(keys):
        theta = pretrained[k]
        for t, tau in enumerate(task_vectors):
            theta = theta + lam[t, j].to(tau[k].dtype) * tau[k]  # out of place: the graph keeps τ, not θ
        out[k] = theta
    with torch.no_grad():
        for k in buffer_keys(pretrained, buffers):
            if k in task_vectors[0]:
                out[k] = pretrained[k] + sum(tau[k] for tau in task_vectors) / T
    return out


# ------------------------------------------------------------------------ the objective


def entropy(logits: Tensor) -> Tensor:
    """Shannon entropy (nats) of softmax(logits), per row."""
    log_p = F.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def _detached(module: nn.Module) -> dict[str, Tensor]:
    """All of a module's parameters and buffers, detached (views, no copies)."""
    return {**detached_buffers(module), **{n: p.detach() for n, p in module.named_parameters()}}


def _frozen(head: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``head`` called with detached parameters: gradients flow to its input, never into it."""
    if not isinstance(head, nn.Module):
        return head
    tensors = _detached(head)
    return lambda z: functional_call(head, tensors, (z,))


def encoder_forward(model: nn.Module, params: Mapping[str, Tensor], inputs: Batch) -> Tensor:
    """``model(**inputs)`` with ``params`` substituted; the model's other parameters and buffers
    are passed detached, so nothing accumulates in its ``.grad``."""
    tensors = {**_detached(model), **params}
    return functional_call(model, tensors, args=(), kwargs=model_inputs(inputs))


def _batch_entropies(model: nn.Module, heads: Mapping, params: Mapping[str, Tensor], task_batches: Mapping):
    """(task, mean entropy of one batch) for every batch of every task, computed lazily, so a
    caller can run each one's backward before the next forward."""
    for task, batches in task_batches.items():
        head = _frozen(heads[task])
        for b in [batches] if isinstance(batches, Mapping) else list(batches):
            yield task, entropy(head(encoder_forward(model, params, b))).mean()


def entropy_objective(model: nn.Module, heads: Mapping, params: Mapping[str, Tensor],
                      task_batches: Mapping) -> tuple[Tensor, dict]:
    """(Σt Σ_batches mean entropy, {task: its detached tensor}) of the encoder at ``params``.
    ``task_batches[t]`` is one input batch or a list of them; ``heads[t]`` maps features to logits."""
    total, per_task = 0.0, {}
    for task, h in _batch_entropies(model, heads, params, task_batches):
        per_task[task] = per_task.get(task, 0.0) + h.detach()
        total = total + h
    return total, per_task


def entropy_backward_per_batch(model: nn.Module, heads: Mapping, params: Mapping[str, Tensor],
                               task_batches: Mapping) -> tuple[Tensor, dict]:
    """``entropy_objective``'s value, with its gradient already propagated to whatever
    ``params`` depend on, one batch at a time (module docstring, Memory): each batch's backward
    goes into g = ∂L/∂θ of a detached copy of the differentiable ``params``, then one backward
    carries g through ``params`` to their leaves. Returns (detached loss, per task)."""
    learned = [k for k, v in params.items() if v.requires_grad]
    leaves = {k: params[k].detach().requires_grad_() for k in learned}
    at = {**params, **leaves}
    total, per_task = 0.0, {}
    for task, h in _batch_entropies(model, heads, at, task_batches):
        h.backward()  # this batch's activations are freed here
        per_task[task] = per_task.get(task, 0.0) + h.detach()
        total = total + h.detach()
    reached = [k for k in learned if leaves[k].grad is not None]  # tensors the adapted tasks use
    if reached:
        torch.autograd.backward([params[k] for k in reached], [leaves[k].grad for k in reached])
    return total, per_task


# ------------------------------------------------------------------------ the adaptation


class AdaMergingResult:
    """What ``adamerge`` learned: ``coefficients`` (clamped, detached; (T,) or (T, K)), ``keys``
    (the learned keys, one per column of layer-wise coefficients) and ``history`` (one dict per
    step: "step", "loss", "entropy" {task: float}, and whatever the callback returned)."""

    def __init__(self, coefficients: Tensor, keys: list[str], history: list[dict]):
        self.coefficients, self.keys, self.history = coefficients, keys, history

    def __repr__(self):
        return f"AdaMergingResult(coefficients of shape {tuple(self.coefficients.shape)}, {len(self.history)} steps)"


BATCHNORM_MODES = ("stored", "batch")


def adamerge(model: nn.Module, pretrained: StateDict, task_vectors: Sequence[StateDict], heads,
             batches, steps: int = 500, lr: float = 1e-3, init: float = INIT, layerwise: bool = True, *,
             buffers: Collection[str] | None = None, callback: Callable | None = None,
             progress: Callable[[Iterable], Iterable] | None = None, batchnorm: str = "stored",
             per_batch_backward: bool = False) -> AdaMergingResult:
    """Learn AdaMerging's coefficients by entropy minimisation (module docstring).

    ``model``: an encoder of θ0's architecture (its own weights are never used where θ(λ) has a
    key, and never modified). ``heads``: task → head callable (a list means tasks 0..n−1).
    ``batches``: per step a dict task → input batch (or list of batches), from an iterator or a
    function ``batches(step)``; labels, if present, are ignored. Only the tasks in the dict are
    adapted on, so adapting on some tasks while merging all T τ's is the same call.
    ``callback(step, params, coefficients)`` runs after each step's forward, with the detached
    θ(λ) at which that step's entropy was measured; a dict it returns (of floats) joins that
    step's history entry, e.g. cross-entropy on labeled data or peak memory.
    ``progress``: wraps the step range, e.g. ``tqdm``. For AdaMerging++ pass ``ties_task_vectors``.
    ``batchnorm``: "stored" (the authors' setting: eval mode, BatchNorm reads the merged running
    statistics) or "batch" (BatchNorm normalises each task's batch with its own statistics,
    ``lib.functional.batch_statistics``; evaluate the result with re-estimated statistics). On a
    BatchNorm network "stored" lets the entropy fall by inflating activations against stale
    statistics (notebook 02's collapse check); models with LayerNorm only (the paper's ViTs) run
    the same either way. ``per_batch_backward``: one backward per input batch (module docstring,
    Memory): the same gradient with one batch's activations alive at a time, for GPUs too small
    for all tasks' batches at once.
    """
    _check_numbers("adamerge", lr=lr, init=init)
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"batchnorm = {batchnorm!r}: choose 'stored' (running statistics, the authors') or 'batch'.")
    heads = dict(enumerate(heads)) if isinstance(heads, (list, tuple)) else dict(heads)
    keys = learned_keys(pretrained, task_vectors, buffers)
    device = pretrained[keys[0]].device if keys else torch.device("cpu")  # the coefficients live with θ
    raw = initial_coefficients(len(task_vectors), len(keys) if layerwise else None, init).to(device).requires_grad_()
    optimizer = torch.optim.Adam([raw], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    draw = batches if callable(batches) else (lambda step, it=iter(batches): next(it))
    history = []
    steps_range = range(steps) if progress is None else progress(range(steps))
    # BatchNorm reads its running statistics ("stored") or each batch's ("batch"); never updates them
    with (eval_mode if batchnorm == "stored" else batch_statistics)(model):
        for step in steps_range:
            params = merged_state(pretrained, task_vectors, raw, buffers=buffers)
            optimizer.zero_grad(set_to_none=True)
            if per_batch_backward:
                loss, per_task = entropy_backward_per_batch(model, heads, params, draw(step))
            else:
                loss, per_task = entropy_objective(model, heads, params, draw(step))
                loss.backward()  # frees this step's graph
            record = {"step": step, "loss": float(loss.detach()),
                      "entropy": {task: float(h) for task, h in per_task.items()}}
            if callback is not None:
                with torch.no_grad():
                    extra = callback(step, {k: v.detach() for k, v in params.items()}, raw.detach().clamp(0, 1))
                record.update(extra or {})
            del params, loss, per_task
            optimizer.step()
            history.append(record)
    return AdaMergingResult(raw.detach().clamp(0.0, 1.0).cpu(), keys, history)
