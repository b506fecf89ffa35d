"""Uncertainty-based gradient matching (Daheim et al., ICLR 2024) at small scale.

Everything ``notebooks/04_gradient_matching.ipynb`` runs, as plain functions:

    config = GradientMatchingConfig(...)                   # the notebook's parameters
    track = make_track(config)
    models = train_models(track, config)                   # θ0, task models, all-data, without-r
    stats = compute_fishers(track, models, config)         # F̂ and N for θ0 and every task model
    state = gradient_matching(models, stats, tasks, 1.0)   # also task_arithmetic, fisher_merging, averaging
    ev = Evaluator(track); ev.accuracies(state, datasets)  # test accuracy of a full state dict
    alpha_curves(...), mismatch_table(...), removal_table(...), time_per_example_gradients(...)

The paper's main experiment, scaled down (METHODS.md §1 and §6):

- θ0 = MiniLM-L6 fine-tuned on MR (movie reviews, the IMDB analogue), with a two-class head
  that starts from the MR linear probe and is trained with the encoder.
- Task models θt: fine-tuned from θ0 (encoder *and* head) on CR, SST-2 and MPQA, the other
  binary sentiment tasks. All models share one two-class head, merged like every other
  tensor, as in the paper.
- Hessian estimates Ht = Nt·F̂t: F̂t is the mean squared per-example gradient of
  log p(ŷ|x) at θt on t's training data with ŷ sampled from the model (``fisher_examples``
  examples), Nt the size of t's full training set; H0 = N_MR·F̂_MR(θ0). The public code
  (UKPLab/iclr2024-model-merging) computes the same: squared gradients of sampled labels,
  batch size 1, averaged, then scaled by the training-set sizes given on the command line.
- The target θ_{1:T}: the model trained on all the data. The paper's theory defines it as
  the minimiser of ℓ̄_0 + Σt ℓ̄t with ℓ̄_0 the loss θ0 was trained on (here MR), and every
  merge starts from θ0, whose curvature H0 stands in for ℓ̄_0. We therefore fine-tune it from
  θ0 on all four datasets (MR included) with the shared head, which keeps it in the basin the
  quadratic approximations describe (the public code has no script for this model, so its
  initialisation there could not be checked). ``finetune`` visits the datasets round-robin,
  so each weighs equally per step rather than in proportion to its size: a known deviation
  from Σt ℓ̄t (the sizes differ by at most 2.8x).

Full state dicts: keys ``encoder.*`` and ``head.weight`` / ``head.bias`` (the names of
``lib.models.Classifier``); MiniLM's token embeddings are frozen in every fine-tune,
identical in all models and left out of every merge.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import merging, statistics
from . import cost
from .cache import cached_tensors, content_hash
from .evaluation import predict
from ..functional import additive_attention_mask, eval_mode
from ..models import Classifier
from .tracks import TextTrack, model_inputs
from .training import Expert, FinetuneConfig, finetune, head_module, probe_heads

StateDict = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- configuration
@dataclass
class GradientMatchingConfig:
    """Every setting of the study. Fields are the notebook's parameters."""

    base_task: str = "mr"                                  # θ0's dataset (IMDB in the paper)
    tasks: tuple[str, ...] = ("cr", "sst2", "mpqa")         # the task models' datasets
    data_dir: str | None = None
    seed: int = 0
    max_validation: int = 500
    max_test: int = 1000
    # fine-tuning (θ0 and every task model)
    finetune_steps: int = 250
    batch_size: int = 32
    lr: float = 1e-4
    warmup_steps: int = 20
    eval_every: int = 50
    patience: int = 2
    # the all-data and without-one-dataset models: this many steps per dataset, round-robin
    joint_steps_per_dataset: int = 100
    # statistics
    fisher_examples: int = 256       # examples per F̂ (H = N·F̂ with N the full training-set size)
    fisher_batch_size: int = 32
    mismatch_examples: int = 128     # examples per task for the gradients of the mismatch
    delta: float = 1e-12             # δ of gradient matching (the public code's value)
    # merges
    alpha_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
    selection_examples: int = 200    # validation examples per dataset for choosing TA's α
    # data removal: the dataset whose influence is subtracted from the all-data model
    removed_task: str = "mpqa"
    # per-example gradient timing
    timing_examples: int = 128     # per dataset, from the examples its Fisher uses
    timing_vmap_chunks: tuple[int, ...] = (8,)

    @property
    def datasets(self) -> list[str]:
        return [self.base_task, *self.tasks]

    def finetune_config(self, steps: int | None = None) -> FinetuneConfig:
        steps = self.finetune_steps if steps is None else steps
        return FinetuneConfig(max_steps=steps, batch_size=self.batch_size, lr=self.lr,
                              warmup_steps=self.warmup_steps, eval_every=self.eval_every,
                              patience=self.patience, seed=self.seed)


def make_track(config: GradientMatchingConfig) -> TextTrack:
    return TextTrack(tasks=config.datasets, data_dir=config.data_dir or None, seed=config.seed,
                     max_validation=config.max_validation, max_test=config.max_test)


# ----------------------------------------------------------------------------- state dicts
def full_state(expert: Expert, task: str, frozen: tuple[str, ...] = ()) -> StateDict:
    """``encoder.*`` (minus ``frozen``) and ``head.*`` of one model, as one flat state dict."""
    state = {f"encoder.{k}": v for k, v in expert.encoder.items() if k not in frozen}
    state.update({f"head.{k}": v for k, v in expert.heads[task].items()})
    return state


def split_state(state: StateDict) -> tuple[StateDict, StateDict]:
    """(encoder part without the prefix, head part without the prefix)."""
    encoder = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
    return encoder, head


def load_into(encoder: nn.Module, state: StateDict, track: TextTrack) -> nn.Module:
    """Load the encoder part of ``state`` into ``encoder``; only frozen tensors may be absent."""
    enc, _ = split_state(state)
    missing, unexpected = encoder.load_state_dict(enc, strict=False)
    if unexpected or set(missing) - set(track.frozen_parameters):
        raise ValueError(f"state does not fit the encoder (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return encoder


def classifier(track: TextTrack, state: StateDict) -> Classifier:
    """A fresh ``Classifier`` (MiniLM + linear head) holding ``state``."""
    encoder = load_into(track.pretrained_encoder(), state, track)
    return Classifier(encoder, head_module(split_state(state)[1]))


# ----------------------------------------------------------------------------- training
@dataclass
class Models:
    """The fine-tuned models of the study, as full state dicts (see :func:`full_state`)."""

    theta0: StateDict                      # MR model
    tasks: dict[str, StateDict]            # task -> model fine-tuned from θ0 on that task
    all_data: StateDict                    # from θ0 on every dataset (the target θ_{1:T})
    without: StateDict                     # from θ0 on every dataset but ``removed``
    removed: str
    info: dict[str, dict] = field(default_factory=dict)  # name -> training record


def train_models(track: TextTrack, config: GradientMatchingConfig, progress: bool = True) -> Models:
    """θ0, the task models, the all-data model and the without-``removed_task`` model (cached)."""
    base = config.base_task
    frozen = tuple(track.frozen_parameters)
    # θ0's head starts from the MR linear probe on pretrained features
    probe = probe_heads(dataclasses.replace(track, tasks=[base]))
    theta0 = finetune(track, [base], probe, config.finetune_config(), progress, train_head=True)
    head0 = {t: theta0.heads[base] for t in config.datasets}
    experts = {t: finetune(track, [t], head0, config.finetune_config(), progress, init=theta0, train_head=True)
               for t in config.tasks}
    everything = config.datasets
    all_data = finetune(track, everything, head0, config.finetune_config(config.joint_steps_per_dataset * len(everything)),
                        progress, init=theta0, train_head=True, shared_head=True)
    if config.removed_task not in config.tasks:
        raise ValueError(f"removed_task={config.removed_task!r} is not one of the task datasets {config.tasks}")
    rest = [t for t in everything if t != config.removed_task]
    without = finetune(track, rest, head0, config.finetune_config(config.joint_steps_per_dataset * len(rest)),
                       progress, init=theta0, train_head=True, shared_head=True)
    info = {f"θ0 ({base})": theta0.info, **{f"task model: {t}": e.info for t, e in experts.items()},
            "all data": all_data.info, f"all data without {config.removed_task}": without.info}
    return Models(
        theta0=full_state(theta0, base, frozen),
        tasks={t: full_state(e, t, frozen) for t, e in experts.items()},
        all_data=full_state(all_data, base, frozen),
        without=full_state(without, base, frozen),
        removed=config.removed_task,
        info=info,
    )


def training_table(models: Models) -> pd.DataFrame:
    rows = [{"model": name, "steps": i.get("steps"), "best step": i.get("best_step"),
             "stopped early": i.get("stopped_early"),
             "validation acc.": 100 * i.get("best_validation_accuracy", float("nan")),
             "seconds": i.get("seconds")} for name, i in models.info.items()]
    return pd.DataFrame(rows).set_index("model").round(1)


# ----------------------------------------------------------------------------- Hessians
@dataclass
class Statistics:
    """Mean squared-gradient Fishers F̂ and training-set sizes N of θ0 (key ``base``) and of
    every task model (key = its task); ``hessian(name)`` = N·F̂."""

    fisher: dict[str, StateDict]
    sizes: dict[str, int]
    base: str

    def hessian(self, name: str) -> StateDict:
        return statistics.hessian_estimate(self.fisher[name], self.sizes[name])


def fisher_of(track: TextTrack, state: StateDict, task: str, config: GradientMatchingConfig) -> StateDict:
    """F̂ of one model on ``fisher_examples`` of ``task``'s training data (labels sampled from
    the model; the exact "hooks" per-example method), for every tensor of ``state``. Cached."""
    spec = {**track.identity(), "kind": "gm-fisher", "task": task, "model": content_hash(state),
            "n": config.fisher_examples, "seed": config.seed, "keys": len(state)}

    def compute():
        model = classifier(track, state)
        data = track.split(task, "train").subset(config.fisher_examples, config.seed)
        return statistics.diagonal_fisher(model, data.batches(config.fisher_batch_size), param_names=list(state),
                                          seed=config.seed, method="hooks", chunk_size=None, disable=True)

    return cached_tensors("fisher", spec, compute)


def compute_fishers(track: TextTrack, models: Models, config: GradientMatchingConfig) -> Statistics:
    base = config.base_task
    fisher = {base: fisher_of(track, models.theta0, base, config)}
    fisher.update({t: fisher_of(track, s, t, config) for t, s in models.tasks.items()})
    sizes = {t: len(track.split(t, "train")) for t in fisher}
    return Statistics(fisher, sizes, base)


# ----------------------------------------------------------------------------- merges
def task_arithmetic(models: Models, tasks: list[str], alpha: float) -> StateDict:
    """θ0 + α Σt τt."""
    return merging.task_arithmetic(models.theta0, [models.tasks[t] for t in tasks], alpha)


def gradient_matching(models: Models, stats: Statistics, tasks: list[str], alpha: float,
                      delta: float = 1e-12) -> StateDict:
    """θ0 + α Σt (H0 + α Σs Hs + δ)⁻¹ (H0 + Ht + δ) τt (lib.merging.gradient_matching)."""
    return merging.gradient_matching(models.theta0, [models.tasks[t] for t in tasks],
                                     [stats.hessian(t) for t in tasks], stats.hessian(stats.base), alpha, delta)


def fisher_merging(models: Models, stats: Statistics, tasks: list[str]) -> StateDict:
    """Matena & Raffel: Σ F̂i θi / Σ F̂i over θ0 and the task models, equal model weights."""
    return merging.fisher_merging([models.theta0, *(models.tasks[t] for t in tasks)],
                                  [stats.fisher[stats.base], *(stats.fisher[t] for t in tasks)])


def averaging(models: Models, tasks: list[str]) -> StateDict:
    """The plain mean of θ0 and the task models."""
    return merging.weight_average([models.theta0, *(models.tasks[t] for t in tasks)])


# ----------------------------------------------------------------------------- data removal
@torch.no_grad()
def remove_plain(theta_all: StateDict, theta0: StateDict, theta_r: StateDict, alpha: float = 1.0) -> StateDict:
    """Plain task-vector subtraction: θ_all − α τr, τr = θr − θ0."""
    return {k: theta_all[k] - alpha * (theta_r[k] - theta0[k]) for k in theta_all}


@torch.no_grad()
def remove_uncertainty_weighted(theta_all: StateDict, theta0: StateDict, theta_r: StateDict, h0: StateDict,
                                h_rest: list[StateDict], h_r: StateDict, delta: float = 1e-12,
                                hessian_correction: bool = True) -> StateDict:
    """Remove dataset r from a model trained on everything, by the gradient-matching rule.

    Derivation (diagonal H, all α = 1). With ℓ̄_0 ≈ ½‖θ − θ0‖²_{H0} and each task model
    stationary for its own problem, ∇ℓ̄_s(θs) = −H0 τs, the model trained without r solves
    H0(θ − θ0) + Σ_{s≠r} ∇ℓ̄_s(θ) = 0 and θ_all solves the same with r included. Subtracting
    the two conditions and using the Taylor step of the merge, ∇ℓ̄_s(θ) ≈ ∇ℓ̄_s(θ') + Hs(θ − θ'):

        θ_{\\r} = θ0 + (P − Hr)⁻¹ [ P (θ_all − θ0) − (H0 + Hr + δ) τr ],   P = H0 + Σ_s Hs + δ

    (s over every task, r included) — exactly the gradient-matching merge "un-done" for r:
    if θ_all is the gradient-matching merge of all tasks, the result is the gradient-matching
    merge of the others. Equivalently θ_all − (P − Hr)⁻¹ [H0 τr + Hr (θr − θ_all)].

    ``hessian_correction=False`` drops r's Taylor term Hr(θr − θ_all) (i.e. assumes
    ∇ℓ̄_r(θ_all) = ∇ℓ̄_r(θr), the approximation Task Arithmetic makes), leaving an
    uncertainty-weighted task vector: θ_all − (H0 + Σ_{s≠r} Hs + δ)⁻¹ (H0 + δ) τr, whose
    per-entry weight lies in (0, 1].

    Both reduce to plain subtraction θ_all − τr when H0 dominates every Hs.
    """
    out = {}
    for k in theta_all:
        a, t0, tr = theta_all[k].double(), theta0[k].double(), theta_r[k].double()
        H0, Hr = h0[k].double(), h_r[k].double()
        rest = sum((h[k].double() for h in h_rest), torch.zeros_like(H0))
        keep = H0 + rest + delta  # precision of everything that stays: P − Hr
        if hessian_correction:
            step = (H0 * (tr - t0) + Hr * (tr - a) + delta * (tr - t0)) / keep
        else:
            step = (H0 + delta) * (tr - t0) / keep
        out[k] = (a - step).to(theta_all[k].dtype)
    return out


# ----------------------------------------------------------------------------- gradient mismatch
def mean_nll_gradient(track: TextTrack, state: StateDict, task: str, n_examples: int, seed: int = 0,
                      batch_size: int = 64) -> StateDict:
    """ḡ = mean over ``n_examples`` training examples of ``task`` (a fixed seeded subset) of
    ∇θ −log p(y|x) with the data labels, in eval mode, for every tensor of ``state``."""
    model = classifier(track, state)
    params = {n: p for n, p in model.named_parameters() if n in state}
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    data = track.split(task, "train").subset(n_examples, seed)
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    with eval_mode(model):
        for batch in data.batches(batch_size):
            loss = nn.functional.cross_entropy(model(**model_inputs(batch)), batch["labels"], reduction="sum")
            for n, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
                total[n] += g
    return {n: g / len(data) for n, g in total.items()}


def gradient_mismatch(grads_at_merged: dict[str, StateDict], grads_at_task_models: dict[str, StateDict],
                      sizes: dict[str, int], alphas: dict[str, float] | None = None) -> float:
    """The paper's gradient mismatch, ‖Σt αt [∇ℓ̄t(θ_m) − ∇ℓ̄t(θt)]‖₂, over the tasks in
    ``grads_at_task_models``. ℓ̄t is the *summed* training loss of dataset t, so each mean
    gradient ḡ is scaled by Nt (as Ht = Nt·F̂t is). ``grads_at_merged[t]`` = ḡt at the merged
    model θ_m, ``grads_at_task_models[t]`` = ḡt at θt; αt = 1 unless given.

    Daheim et al. write the error of Task Arithmetic as θ_{1:T} − θ_TA =
    −H0⁻¹ Σt αt [∇ℓ̄t(θ_{1:T}) − ∇ℓ̄t(θt)]. Evaluated at θ_m = θ_{1:T} (the all-data model)
    this is exactly their term; at a merged model it measures how far that model is from
    matching every task model's gradient. It is 0 when θ_m = θt for a single task (one task
    vector merged at α = 1 is its own target).
    """
    total = 0.0
    keys = next(iter(grads_at_task_models.values())).keys()
    for k in keys:
        acc = None
        for t, g_t in grads_at_task_models.items():
            a = 1.0 if alphas is None else alphas[t]
            term = (a * sizes[t]) * (grads_at_merged[t][k].double() - g_t[k].double())
            acc = term if acc is None else acc + term
        total += float(acc.square().sum())
    return total ** 0.5


def objective_gradient_norm(grads_at_merged: dict[str, StateDict], sizes: dict[str, int]) -> float:
    """‖Σ_d N_d ḡ_d(θ_m)‖₂ over every dataset d in ``grads_at_merged`` (θ0's included): the
    gradient of the target's own objective ℓ̄_0 + Σt ℓ̄t at θ_m, zero at a stationary target."""
    total = 0.0
    keys = next(iter(grads_at_merged.values())).keys()
    for k in keys:
        acc = sum(sizes[d] * g[k].double() for d, g in grads_at_merged.items())
        total += float(acc.square().sum())
    return total ** 0.5


# ----------------------------------------------------------------------------- evaluation
class Evaluator:
    """Accuracy and predictions of full state dicts on a track's splits. Predictions are
    memoised and cached on disk under the state's content hash (as :func:`lib.experiments.evaluation.evaluate`
    caches encoders'), so a re-run evaluates only models that changed."""

    def __init__(self, track: TextTrack):
        self.track = track
        self.encoder = track.pretrained_encoder()
        self._memo: dict[tuple, np.ndarray] = {}

    @torch.no_grad()
    def predictions(self, state: StateDict, task: str, split: str = "test", max_examples: int | None = None,
                    state_hash: str | None = None) -> np.ndarray:
        state_hash = state_hash or content_hash(state)
        key = (state_hash, task, split, max_examples)
        if key not in self._memo:
            spec = {**self.track.identity(), "kind": "full-state predictions", "task": task, "split": split,
                    "max_examples": max_examples, "state": state_hash}

            def compute():
                load_into(self.encoder, state, self.track)
                data = self.track.split(task, split).subset(max_examples, self.track.seed)
                return {"pred": torch.as_tensor(predict(self.encoder, split_state(state)[1], data))}

            self._memo[key] = cached_tensors("predictions", spec, compute)["pred"].numpy()
        return self._memo[key]

    def labels(self, task: str, split: str = "test", max_examples: int | None = None) -> np.ndarray:
        return self.track.split(task, split).subset(max_examples, self.track.seed).labels

    def accuracies(self, state: StateDict, tasks: list[str], split: str = "test",
                   max_examples: int | None = None) -> dict[str, float]:
        """Accuracy (%) per task."""
        h = content_hash(state)
        return {t: 100 * float((self.predictions(state, t, split, max_examples, h) == self.labels(t, split, max_examples)).mean())
                for t in tasks}

    def agreement(self, a: StateDict, b: StateDict, tasks: list[str], split: str = "test") -> float:
        """% of test examples (pooled over ``tasks``) on which two models predict the same class."""
        ha, hb = content_hash(a), content_hash(b)
        same = np.concatenate([self.predictions(a, t, split, state_hash=ha) == self.predictions(b, t, split, state_hash=hb)
                               for t in tasks])
        return 100 * float(same.mean())


def paired_difference(evaluator: Evaluator, a: StateDict, b: StateDict, tasks: list[str]) -> tuple[float, float]:
    """Average test accuracy of ``a`` minus that of ``b`` (points, averaged over ``tasks``) and
    its standard error from the paired per-example differences (both see the same examples)."""
    diffs, variances = [], []
    for t in tasks:
        y = evaluator.labels(t)
        d = (evaluator.predictions(a, t) == y).astype(float) - (evaluator.predictions(b, t) == y).astype(float)
        diffs.append(d.mean())
        variances.append(d.var(ddof=1) / len(d) if len(d) > 1 else 0.0)
    return 100 * float(np.mean(diffs)), 100 * float(np.sqrt(np.sum(variances))) / len(tasks)


def relative_distance(state: StateDict, target: StateDict, reference: StateDict) -> float:
    """‖state − target‖ / ‖reference − target‖ over all tensors."""
    num = sum(float((state[k].double() - target[k].double()).square().sum()) for k in target)
    den = sum(float((reference[k].double() - target[k].double()).square().sum()) for k in target)
    return (num / den) ** 0.5 if den > 0 else float("nan")


# ----------------------------------------------------------------------------- the experiments
def _mean(d: dict) -> float:
    return float(np.mean(list(d.values())))


def alpha_curves(models: Models, stats: Statistics, evaluator: Evaluator, config: GradientMatchingConfig,
                 progress: bool = True) -> pd.DataFrame:
    """Task Arithmetic and gradient matching over ``alpha_grid``: average validation accuracy
    (``selection_examples`` per dataset, for choosing α) and test accuracy per dataset."""
    from tqdm.auto import tqdm

    tasks = list(config.tasks)
    merges = {"Task Arithmetic": lambda a: task_arithmetic(models, tasks, a),
              "Gradient matching": lambda a: gradient_matching(models, stats, tasks, a, config.delta)}
    rows = []
    for alpha in tqdm(config.alpha_grid, desc="α grid", disable=not progress):
        for method, merge in merges.items():
            state = merge(alpha)
            val = evaluator.accuracies(state, config.datasets, "validation", config.selection_examples)
            test = evaluator.accuracies(state, config.datasets, "test")
            rows.append({"method": method, "alpha": alpha, "validation average": _mean(val), **test,
                         "test average": _mean(test)})
    return pd.DataFrame(rows)


def best_alpha(curves: pd.DataFrame, method: str = "Task Arithmetic") -> float:
    """The α with the best average validation accuracy (the smallest such α on ties)."""
    rows = curves[curves.method == method].sort_values("alpha")
    return float(rows.loc[rows["validation average"].idxmax(), "alpha"])


def accuracy_table(states: dict[str, StateDict], evaluator: Evaluator, datasets: list[str]) -> pd.DataFrame:
    """Test accuracy (%) of each model on every dataset, and the average."""
    table = pd.DataFrame({name: evaluator.accuracies(s, datasets) for name, s in states.items()}).T
    table["Average"] = table.mean(axis=1)
    return table


def mismatch_table(track: TextTrack, models: Models, stats: Statistics, evaluator: Evaluator,
                   config: GradientMatchingConfig, extra: dict[str, StateDict] | None = None,
                   progress: bool = True) -> pd.DataFrame:
    """Gradient mismatch (:func:`gradient_mismatch`), the target objective's gradient norm and
    the test error of merges of θ0 with the first k task models, k = 1..T (the paper's
    Fig. 1: datasets added one at a time), for Task Arithmetic and gradient matching at α = 1;
    ``extra`` (name -> state) are more models over all T tasks (other merges, the target)."""
    from tqdm.auto import tqdm

    n, seed, base = config.mismatch_examples, config.seed, config.base_task
    at_task_model = {t: mean_nll_gradient(track, s, t, n, seed) for t, s in models.tasks.items()}
    tasks = list(config.tasks)
    plan = []
    for k in range(1, len(tasks) + 1):
        subset = tasks[:k]
        plan += [("Task Arithmetic (α = 1)", subset, lambda s=subset: task_arithmetic(models, s, 1.0)),
                 ("Gradient matching (α = 1)", subset,
                  lambda s=subset: gradient_matching(models, stats, s, 1.0, config.delta))]
    plan += [(name, tasks, lambda s=state: s) for name, state in (extra or {}).items()]
    rows = []
    for name, subset, make in tqdm(plan, desc="gradient mismatch", disable=not progress):
        state = make()
        at_merged = {d: mean_nll_gradient(track, state, d, n, seed) for d in [base, *subset]}
        acc = evaluator.accuracies(state, [base, *subset])
        rows.append({"method": name, "datasets merged": 1 + len(subset), "added": "+".join(subset),
                     "gradient mismatch": gradient_mismatch({t: at_merged[t] for t in subset},
                                                            {t: at_task_model[t] for t in subset}, stats.sizes),
                     "target objective gradient": objective_gradient_norm(at_merged, stats.sizes),
                     "test error": 100 - _mean(acc)})
        del at_merged
    return pd.DataFrame(rows)


def removal_table(models: Models, stats: Statistics, evaluator: Evaluator,
                  config: GradientMatchingConfig) -> tuple[pd.DataFrame, dict[str, StateDict]]:
    """Remove ``models.removed`` from the all-data model by plain and uncertainty-weighted
    subtraction; compare with the model trained without it (accuracy on every dataset,
    agreement of test predictions with that model, distance to it relative to θ_all's)."""
    r, base = models.removed, config.base_task
    rest = [t for t in config.tasks if t != r]
    h0, h_rest, h_r = stats.hessian(base), [stats.hessian(t) for t in rest], stats.hessian(r)
    args = (models.all_data, models.theta0, models.tasks[r])
    states = {
        "all data (before removal)": models.all_data,
        f"trained without {r} (target)": models.without,
        f"plain: θ_all − τ_{r}": remove_plain(*args),
        "uncertainty-weighted (full rule)": remove_uncertainty_weighted(*args, h0, h_rest, h_r, config.delta),
        "uncertainty-weighted (first order)": remove_uncertainty_weighted(*args, h0, h_rest, h_r, config.delta,
                                                                          hessian_correction=False),
    }
    table = accuracy_table(states, evaluator, config.datasets)
    target = states[f"trained without {r} (target)"]
    table["agreement with target %"] = [evaluator.agreement(s, target, config.datasets) for s in states.values()]
    table["distance to target / θ_all's"] = [relative_distance(s, target, models.all_data) for s in states.values()]
    return table, states


# ----------------------------------------------------------------------------- per-example gradients
class VmappableClassifier(nn.Module):
    """``Classifier`` with the same parameter names whose encoder gets a 4-D additive mask, so
    that ``torch.func.vmap`` can trace it (see lib.functional). Shares the given modules."""

    def __init__(self, model: Classifier):
        super().__init__()
        self.encoder, self.head = model.encoder, model.head

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder.transformer(input_ids=input_ids,
                                          attention_mask=additive_attention_mask(attention_mask)).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9))


LOOP = "loop (batch size 1, each example at its own length)"
BOUND = "bound: every matrix product at the machine's peak rate"


def linear_flops(model: nn.Module, tokens: int) -> float:
    """FLOPs of one pass of every ``nn.Linear`` of ``model`` over ``tokens`` positions: 2·in·out each."""
    return 2.0 * tokens * sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def time_sq_grad_methods(model: nn.Module, batches: list[dict], names: list[str], vmap_chunks: tuple[int, ...] = (8,),
                         peak_flops: float | None = None) -> pd.DataFrame:
    """Time Σ_b (∇θ −log p(y_b|x_b))² over ``batches`` for the parameters ``names`` by every
    exact method, side by side, each after one untimed warm-up on two examples:

    - the batch-size-1 loop (:func:`lib.statistics.per_example_sq_grads_loop`: each example at
      its own length, squares added in place), the reference;
    - ``vmap(grad(·))`` in chunks of each of ``vmap_chunks``;
    - hooks, one batched forward/backward per batch.

    Per method: wall and CPU ms per example, the speed-up over the loop, the matrix-product
    rate it sustains, its peak memory (resident-set growth, :func:`lib.experiments.cost.measured_call`;
    the sums it returns included), and its largest deviation from the loop (relative to the loop's largest
    entry). The rate counts the three products every exact method needs per ``nn.Linear``
    and position -- the forward pass, the gradient to the layer's input, and the per-example
    weight gradient -- and nothing else (attention scores, elementwise work): a lower bound
    on the work. With ``peak_flops`` (:func:`lib.experiments.cost.matmul_rate`) a last row gives the time
    that work takes at the peak rate, hence the largest speed-up any exact method could
    show here.
    """
    n = sum(len(b["labels"]) for b in batches)
    tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    work = 3 * linear_flops(model, tokens)
    methods = {LOOP: lambda b: statistics.sum_sq_grads(model, b, names, method="loop")}
    for c in vmap_chunks:
        methods[f"vmap over grad (chunks of {c})"] = \
            lambda b, c=c: statistics.sum_sq_grads(model, b, names, method="vmap", chunk_size=c)
    methods["hooks (one batched backward per batch)"] = \
        lambda b: statistics.sum_sq_grads(model, b, names, method="hooks", chunk_size=None)
    def run_all(fn):
        total = None
        for batch in batches:
            sums = fn(batch)
            total = sums if total is None else {k: total[k] + sums[k] for k in total}
        return total

    results, rows = {}, []
    for label, fn in methods.items():
        fn({k: v[:2] for k, v in batches[0].items()})
        cpu = time.process_time()
        results[label], wall, peak_mib = cost.measured_call(lambda: run_all(fn))
        cpu = time.process_time() - cpu
        rows.append({"method": label, "examples": n, "mean tokens": tokens / n, "wall ms/example": 1000 * wall / n,
                     "CPU ms/example": 1000 * cpu / n, "GFLOP/s": work / wall / 1e9, "peak MiB": peak_mib})
    ref = results[LOOP]
    scale = max(float(v.abs().max()) for v in ref.values())
    for row, r in zip(rows, results.values()):
        row["max |diff| / max |loop|"] = max(float((r[k] - ref[k]).abs().max()) for k in ref) / scale
    if peak_flops is not None:
        rows.append({"method": BOUND, "examples": n, "mean tokens": tokens / n,
                     "wall ms/example": 1000 * work / peak_flops / n, "GFLOP/s": peak_flops / 1e9})
    table = pd.DataFrame(rows).set_index("method")
    table.insert(5, "speed-up vs loop (wall)", table.loc[LOOP, "wall ms/example"] / table["wall ms/example"])
    table.insert(6, "speed-up vs loop (CPU)", table.loc[LOOP, "CPU ms/example"] / table["CPU ms/example"])
    return table


def time_per_example_gradients(track: TextTrack, models: Models, config: GradientMatchingConfig) -> pd.DataFrame:
    """:func:`time_sq_grad_methods` on the work of :func:`compute_fishers`: for every dataset,
    the model whose Fisher the study takes there (θ0 on the base dataset, each task model on
    its own), ``timing_examples`` of the examples its Fisher uses, in the Fisher's batches
    (sorted by length, ``fisher_batch_size``), every tensor of the state; labels are the data's.
    Rows are (dataset, method), then ("all", method) for the time summed over the datasets.
    The peak matrix-product rate is measured once, in this run (``attrs["peak GFLOP/s"]``)."""
    peak = cost.matmul_rate()
    tables = {}
    for dataset in config.datasets:
        state = models.theta0 if dataset == config.base_task else models.tasks[dataset]
        data = (track.split(dataset, "train").subset(config.fisher_examples, config.seed)
                .subset(config.timing_examples, config.seed))
        tables[dataset] = time_sq_grad_methods(VmappableClassifier(classifier(track, state)),
                                               list(data.batches(config.fisher_batch_size)), list(state),
                                               config.timing_vmap_chunks, peak)
    per_dataset = pd.concat(tables, names=["dataset"])
    # All datasets together: total time over all examples, so longer inputs weigh more.
    n = per_dataset["examples"].groupby("method", sort=False).sum()
    weighted = per_dataset[["mean tokens", "wall ms/example", "CPU ms/example"]].mul(per_dataset["examples"], axis=0)
    total = weighted.groupby("method", sort=False).sum(min_count=1).div(n, axis=0)
    total.insert(0, "examples", n)
    total["speed-up vs loop (wall)"] = total.loc[LOOP, "wall ms/example"] / total["wall ms/example"]
    total["speed-up vs loop (CPU)"] = total.loc[LOOP, "CPU ms/example"] / total["CPU ms/example"]
    total["peak MiB"] = per_dataset["peak MiB"].groupby("method", sort=False).max()
    total["max |diff| / max |loop|"] = per_dataset["max |diff| / max |loop|"].groupby("method", sort=False).max()
    table = pd.concat([per_dataset, pd.concat({"all": total}, names=["dataset"])])
    table.attrs.update(threads=torch.get_num_threads(), parameters=sum(v.numel() for v in models.theta0.values()),
                       **{"peak GFLOP/s": peak / 1e9})
    return table
