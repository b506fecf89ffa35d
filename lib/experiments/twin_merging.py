"""Twin-Merging at small scale: everything ``notebooks/05_twin_merging.ipynb`` runs (METHODS.md §3, §6).

    config = TwinMergingConfig(...)                    # the notebook's parameters
    result = run_track("text", config)                 # baselines, Twin-Merging, ablation, sweeps, the stream
    result.tables["main"], result.tables["rank"], …    # every table, long or wide
    findings({"text": result, …})                      # the verdicts, as Markdown

The algorithms live in ``lib.merging.twin_merging`` (compression, merge, router, the three
inference paths); this module builds the experiments around them on notebook 01's tracks.

What is built, per track (Lu et al. 2024, as the authors' code runs it, with the deviations
METHODS.md §3 asks for):

- **Experts and baselines** come from notebook 01's code and caches: ``settings_for`` builds its
  config from this one's same-named fields, ``baselines.prepare_track`` loads the experts and
  the multi-task model, ``closed_form_merges`` runs weight averaging, Task Arithmetic, TIES and
  the DARE variants (λ chosen on validation by ``selection.select``), ``evaluate_methods``
  scores them on test.
- **Shared expert**: Task Arithmetic with λ chosen on validation (the authors fix λ = 0.29). In
  the main build it is exactly the Task Arithmetic row of the table.
- **Exclusive parts**: ``twin_merging.compress(shared, experts)`` at rank ratio 10%; the rank
  sweep compresses once at the largest ratio and keeps the leading singular triplets for the
  smaller ones (``truncate``), which is exact because truncated SVDs are nested.
- **Router**: the authors' MLP on the shared model's pooled features (the encoders' own
  output: MiniLM's mean pooling, ResNet's average pooling), trained with ``train_router`` on the
  **validation** split only: per task, a seeded ``router_held_out`` fraction is kept apart to
  choose the best epoch on, and up to ``router_sizes`` examples per task of the rest are the
  labeled set. The authors train on up to 5,500 *training* examples per task and choose the
  epoch on the **test** split; here the test split is never read while building a router
  (``ValidationOnly`` view, as in hyper-parameter selection).
- **Inference**: w = softmax(router(features)); θ(x) = θ_shared + Σt wt·vt per input, run
  exactly and batched by ``low_rank_forward``.

Experiments (rows and claims are computed, never typed):

- main table: normalized score (accuracy / the expert's × 100, averaged over tasks) of θ0 +
  heads, experts, multi-task, the closed-form merges, Twin-Merging, and AdaMerging's rows when
  notebook 02 has written them for the same settings; full test sets;
- ablation (shared only; exclusive only, θ0 + Σ w·v; both), rank ratio vs score and storage,
  router labeled-set size (with router accuracy), number of tasks merged (2, 4, …, T: the first
  k tasks of the list) and unseen tasks (shared expert and router built on the first
  T − ``unseen_tasks`` tasks, evaluated on the others): on a seeded, class-stratified subset of
  ``sweep_test_examples`` test examples per task, the same subset for every row;
- the mixed stream: every task's test inputs once, shuffled together as a deployment sees them;
  its first ``stream_examples`` inputs are served by the static merge, the low-rank path (and
  top-k), the grouped path and per-input materialisation (and top-k), timed side by side at
  ``stream_batch_size``, each with its accuracy on the same inputs.

At paper scale (``scale="paper"``) the same experiments run on CLIP with the published experts
(``tracks=["vision"]``) or on Twin-Merging's main benchmark, RoBERTa-base on the 8 GLUE tasks
(``tracks=["text"]``, ``paper_tracks.GlueTextTrack``). There each input goes through its own
task's two-layer head and outcomes are predictions (STS-B's scalar output, not an argmax), each
task is scored by its official GLUE score, the normalized score is that over the expert's on the
same examples, and every uncertainty is a seeded paired bootstrap over test examples (``Scoring``,
built on notebook 01's ``baselines.score_difference``). The findings set the GLUE rows beside the
published numbers when the run is the paper's setup (8 tasks, the first 1,000 test examples each).

Cached (``lib.experiments.cache``, keys covering data, models, settings and code): the shared
models' features and every Twin variant's test predictions; experts, merges' validation scores
and static models' predictions are notebook 01's caches.

Budget: notebook 05 cold (nothing of its own cached) on 2 threads, after notebook 01 ran with the
same settings, so that its experts, multi-task model and the predictions of its merges (which
the same merges, with the same content hashes, hit again) are cached. Short measurement
(a throwaway script, 1 thread, on a machine shared with another 2-core job, so slower than
a free one): MiniLM static forward 34 ms per tweet; the low-rank path 1.4× / 1.9× / 4.2× the
static forward at rank ratio 0.03 / 0.1 / 0.3 with T = 8; ``compress`` of 8 experts 26 s; one
dense merge 0.2 s; per-input materialisation 0.22 s per input; ResNet-20 static 3.6 ms per
image, low-rank 2.0× at 0.1, compress 0.2 s. The rate used below is notebook 01's committed run
on a free machine: MiniLM ~9 ms per test example (88,000 in 775 s), ResNet-20 ~2 ms. Text track,
T = 8, 7,144 test and 3,874 validation examples:

- experts: cache hits; baselines: 4 tuned merges × 13 λ (coarse-to-fine), validation
  predictions cache hits, so merges and hashes only (TIES 1.6 s, DARE + TIES 6 s each): ~2 min;
- shared features on validation and test (11,018 examples): ~1.7 min; compress at 0.3: ~0.5 min;
- Twin-Merging on the full test sets (1.9 × 7,144 examples): ~2.1 min;
- the sweep subset (8 × 200 = 1,600 examples): features 1× + ablation 1.9× + ranks 0.01…0.3
  (≈ 1.2 + 1.4 + 1.9 + 4.2)× + two smaller routers 2 × 1.9× ≈ 15.4 × 1,600 × 9 ms: ~3.7 min;
- k = 2, 4, 6 tasks (k = 6 is also the unseen build): λ selections 13 × (2 + 4 + 6) × 100
  examples, router features ~5,800, subset features and Twin ~5,300 equivalent: ~29,000 × 9 ms
  ≈ 4.4 min, and 12 more compressions ≈ 0.6 min;
- the stream's 256 inputs: per-input materialisation and its top-k ≈ 2 × 256 × 0.11 s, the other
  paths ≈ 0.5 min: ~1.5 min;

≈ 16.5 min for text, ~3 min for vision (T = 4): ~20 min, inside the ~30-minute budget. With only
the experts cached, notebook 01's text selections (4 × 13 × 800 validation examples, ~6 min) and
test predictions (8 rows × 7,144, ~9 min) come on top: ~35 min. (Arithmetic from the rates
above; the default run has not been timed end to end here.)
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..functional import functional_forward, to_device
from ..heads import head_module
from ..merging import twin_merging as tw
from ..metrics import official_metric
from ..paper.glue import PAPER_TEXT_TASKS
from ..paths import REPO_ROOT
from . import baselines as B
from .baselines import BaselinesConfig, MergeResult, Setup
from .cache import cached_tensors, content_hash
from .config import parameters_of
from .cost import matrix_flops
from .findings import (
    Claim,
    Estimate,
    findings_markdown,
    mean_accuracy,
    paired_bootstrap,
    paired_difference,
    verdict,
)
from .paper_tracks import GLUE_MAX_TEST
from .selection import ValidationOnly
from .tracks import (
    PreparedSplit,
    Track,
    model_inputs,
    scored_officially,
    stratified_indices,
)
from .training import encode, run_device_of

# ----------------------------------------------------------------------------- names and references
# The closed-form merges of the table (names in lib.merging.REGISTRY): the paper's baselines.
BASELINE_METHODS = ("weight_average", "task_arithmetic", "ties", "dare_ta", "dare_ties")
SHARED_METHOD = "Task Arithmetic"  # the registry label of the shared expert's merge

TWIN = "Twin-Merging"
SHARED_ONLY = "Shared expert only"
EXCLUSIVE_ONLY = "Exclusive only (θ0 + Σ w·v)"
ADAMERGING_NOTEBOOK = "02_adamerging"

# Published normalized scores, RoBERTa-base on 8 GLUE tasks (Twin-Merging paper, METHODS.md §7),
# and the authors' own re-run (their test sets: the first 1,000 examples of each GLUE validation split).
PAPER_NORMALIZED = {"Weight averaging": 52.6, "Task Arithmetic": 67.8, "TIES": 64.7, TWIN: 96.1}
PAPER_NORMALIZED_RERUN = {"Task Arithmetic": 58.3, "TIES": 47.4, TWIN: 95.8}

# Thresholds of the claims, fixed before any run (in the units of the numbers they judge).
NEAR_EXPERT = 95.0  # normalized score; the paper reports 96.1
MARGIN = 2.0        # accuracy points: "about the same" means within ±MARGIN at 2 standard errors
SPEEDUP = 10.0      # the low-rank path against per-input materialisation (issue "Twin-Merging")
# Official scores of two exact paths differ by float rounding: STS-B's scalar outputs carry it into
# its correlations. A difference below this many points counts as the same score (GLUE only; an
# accuracy difference on the stream is at least 100 / its inputs, far above it).
ROUNDING = 0.01

# The paths served on the mixed stream.
STATIC = "Static merge (the shared model)"
ROUTER = "Router MLP (on the static features)"
LOW_RANK = "Low-rank, exact per input"
GROUPED = "Grouped by router argmax"
PER_INPUT = "Per-input materialisation"


# Seeds the stream's shuffle apart from the seeded draws of data subsets that share ``seed``.
STREAM_SALT = 5


def _top_k_name(path: str, k: int) -> str:
    return f"{path}, top-{k}"


# ----------------------------------------------------------------------------- configuration
@dataclass
class TwinMergingConfig(B.TrackSettings):
    """Every setting of notebook 05. The fields are its papermill parameters: notebook 01's track,
    expert and merge settings (``TrackSettings``: same names, same defaults, so 05 finds 01's
    cached experts and follows when 01's defaults change), DARE's, then Twin-Merging's. At paper
    scale either track runs: CLIP on the vision tasks, RoBERTa-base on GLUE (``tracks=["text"]``)."""

    paper_tracks: ClassVar[tuple[str, ...]] = ("vision", "text")

    dare_drop_rate: float = BaselinesConfig.dare_drop_rate
    dare_seed: int = BaselinesConfig.dare_seed
    # Twin-Merging
    rank_ratio: float = tw.RANK_RATIO              # r = 10% of min(m, n), the authors'
    rank_ratios: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)  # the rank sweep
    router_sizes: tuple[int, ...] = (10, 100, 1000)  # labeled validation examples per task; the largest is the main router
    router_held_out: float = 0.2                   # fraction of each task's validation split kept to choose the epoch
    router_epochs: int = 50                        # the authors' router training (lib docstring)
    router_lr: float = 5e-4
    router_batch_size: int = 1024
    top_k: int = 2                                 # top-k routing, reported beside full routing
    task_count_step: int = 2                       # numbers of tasks merged: step, 2·step, …, T
    unseen_tasks: int = 2                          # the last this many tasks are left out of the unseen build
    sweep_test_examples: int = 200                 # test examples per task of the sweeps (one seeded subset)
    stream_examples: int = 256                     # inputs of the mixed stream that every path serves
    stream_batch_size: int = 32
    bootstrap_resamples: int = 1000                # draws of the paired bootstrap (GLUE's official scores)
    progress: bool = True

    def __post_init__(self):
        super().__post_init__()
        for ratio in (self.rank_ratio, *self.rank_ratios):
            if not 0.0 < ratio <= 1.0:
                raise ValueError(f"rank ratio {ratio}: pass a fraction in (0, 1].")
        if not self.rank_ratios or not self.router_sizes:
            raise ValueError("rank_ratios and router_sizes need at least one value each.")
        if min(self.router_sizes) < 1:
            raise ValueError(f"router_sizes {self.router_sizes}: pass positive numbers of examples per task.")
        if not 0.0 < self.router_held_out < 1.0:
            raise ValueError(f"router_held_out = {self.router_held_out}: pass a fraction in (0, 1).")
        for name in ("top_k", "task_count_step", "sweep_test_examples", "stream_examples", "stream_batch_size",
                     "router_epochs", "router_batch_size", "bootstrap_resamples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)}: pass a positive integer.")
        if self.unseen_tasks < 0:
            raise ValueError(f"unseen_tasks = {self.unseen_tasks}: pass 0 (no unseen-task experiment) or more.")
        self.baselines_config()  # notebook 01's own checks of the shared settings (tracks, benchmark), now

    def task_counts(self, num_tasks: int) -> list[int]:
        """Numbers of tasks merged: step, 2·step, … below T, then T."""
        return [k for k in range(self.task_count_step, num_tasks, self.task_count_step)] + [num_tasks]

    def seen_for_unseen(self, tasks: Sequence[str]) -> tuple[list[str], list[str]]:
        """(seen, unseen) tasks of the unseen-task experiment: the last ``unseen_tasks`` are unseen."""
        if not 0 < self.unseen_tasks < len(tasks):
            return list(tasks), []
        return list(tasks[: len(tasks) - self.unseen_tasks]), list(tasks[len(tasks) - self.unseen_tasks:])

    @property
    def compressed_ratio(self) -> float:
        """The ratio the main build compresses at: the largest it is evaluated at."""
        return max(self.rank_ratio, *self.rank_ratios)


# ----------------------------------------------------------------------------- small helpers
def truncate(exclusive: Sequence[dict], rank_ratio: float) -> list[dict]:
    """``compress(shared, experts, rank_ratio)`` from parts compressed at a ratio at least as high.

    The leading r singular triplets of a matrix are the first r of any longer truncation, so
    keeping the first r columns of U·S and rows of Vᵀ is exact: one SVD serves the whole sweep.
    """
    out = []
    for part in exclusive:
        kept = {}
        for key, value in part.items():
            if not isinstance(value, tw.LowRank):
                kept[key] = value
                continue
            stored = value.us.shape[1]
            rank = tw.rank_for((value.us.shape[0], value.vh.shape[1]), rank_ratio)
            if 0 < stored < rank:
                raise ValueError(f"{key}: stored at rank {stored}, cannot keep {rank}; compress at a higher ratio.")
            kept[key] = tw.LowRank(value.us[:, :rank].contiguous(), value.vh[:rank].contiguous())
        out.append(kept)
    return out


def _flat(exclusive: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Exclusive parts as one flat dict of tensors (for hashing)."""
    flat = {}
    for t, part in enumerate(exclusive):
        for key, value in part.items():
            if isinstance(value, tw.LowRank):
                flat[f"{t}/{key}/us"], flat[f"{t}/{key}/vh"] = value.us, value.vh
            else:
                flat[f"{t}/{key}"] = value
    return flat


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of a state dict: what storing one model costs."""
    return sum(v.numel() * v.element_size() for v in state.values())


def subset_index(track: Track, task: str, n: int | None) -> np.ndarray:
    """Indices into the task's test split of ``split.subset(n, track.seed)``: the sweep subset."""
    labels = track.split(task, "test").labels
    return np.arange(len(labels)) if n is None or n >= len(labels) else stratified_indices(labels, n, track.seed)


def restricted(track: Track, setup: Setup, tasks: Sequence[str]) -> tuple[Track, Setup]:
    """The track and setup of ``tasks`` only (a build that never sees the others). The track shares
    the original's loaded data; display names are computed for the whole track first."""
    track.display_name(track.tasks[0])  # fill the display-name map with every task before narrowing
    narrow = dataclasses.replace(track, tasks=list(tasks))
    return narrow, Setup(narrow, setup.pretrained, {t: setup.heads[t] for t in tasks},
                         {t: setup.experts[t] for t in tasks}, None, setup.mergeable)


def head_outcome(track: Track, task: str, outputs: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    """Per-example outcomes of a task's head outputs [N, outputs]: correct or not (argmax = label),
    or, on a track scored by official metrics (GLUE), the predictions themselves (STS-B's scalar)."""
    if scored_officially(track):
        return B.outcome(track.task_results(task, outputs.float().numpy(), labels))
    return outputs.argmax(1).numpy() == labels


@dataclass
class Scoring:
    """How one experiment's per-example outcomes ({display name: array}) become scores with
    uncertainties: accuracy with analytic paired SEs (no track, or a track scored by accuracy),
    or each task's official GLUE score of the predictions against ``gold`` (display name -> the
    labels of the examples the experiment scored), with seeded paired-bootstrap SEs
    (``baselines.score_difference``, as notebook 01's verdicts)."""

    track: Track | None = None
    gold: dict[str, np.ndarray] = field(default_factory=dict)
    seed: int = 0
    resamples: int = 1000

    @property
    def official(self) -> bool:
        return self.track is not None and scored_officially(self.track)

    @property
    def measure(self) -> str:
        return "GLUE score" if self.official else "accuracy"

    @property
    def unit(self) -> str:
        return f"average {self.measure}"

    @property
    def column(self) -> str:
        """The column a table's average of it goes in (``baselines.score_column``'s names)."""
        return "score" if self.official else "accuracy"

    def _task_scores(self, outcomes: dict) -> dict[str, float]:
        """Each task's official score (points) of its outcomes on every example scored."""
        score = B.official_score(self.track, self.gold)
        return {t: score(t, np.asarray(x), np.arange(len(x))) for t, x in outcomes.items()}

    def value(self, outcomes: dict) -> float:
        """The average score alone (no SE: cheap on GLUE, where the SE needs a bootstrap)."""
        if not self.official:
            return mean_accuracy(outcomes).value
        return float(np.mean(list(self._task_scores(outcomes).values())))

    def average(self, outcomes: dict) -> Estimate:
        if not self.official:
            return mean_accuracy(outcomes)
        return B.score_average(self.track, outcomes, self.gold, self.seed, self.resamples)

    def difference(self, a: dict, b: dict) -> Estimate:
        if not self.official:
            return paired_difference(a, b)
        return B.score_difference(self.track, a, b, self.gold, self.seed, self.resamples)

    def normalized(self, outcomes: dict, expert: dict) -> Estimate:
        """Normalized score (100 × score / the expert's on the same examples, averaged over tasks)
        with the SE of the paired difference to the expert, the expert's score taken as fixed:
        ``normalized_estimate`` for accuracy, a paired bootstrap of official scores on GLUE."""
        if not self.official:
            return normalized_estimate(outcomes, expert)
        expert = {t: expert[t] for t in outcomes}
        full = self._task_scores(expert)
        if min(full.values()) <= 0:  # an expert with no skill: no scale to normalize by
            return Estimate(float("nan"), float("nan"))
        score = B.official_score(self.track, self.gold)
        relative = lambda t, predicted, rows: 100 * score(t, predicted, rows) / full[t]
        d = paired_bootstrap(relative, outcomes, expert, self.resamples, self.seed)
        return Estimate(100 + d.value, d.se)  # the expert's own normalized score is 100

    def normalized_value(self, outcomes: dict, expert: dict) -> float:
        """The normalized score alone (no SE)."""
        if not self.official:
            return normalized_estimate(outcomes, expert).value
        full, mine = self._task_scores({t: expert[t] for t in outcomes}), self._task_scores(outcomes)
        if min(full.values()) <= 0:
            return float("nan")
        return float(np.mean([100 * mine[t] / full[t] for t in outcomes]))


def _scores(track: Track, task: str, labels: np.ndarray, pred: np.ndarray) -> dict:
    """Accuracy, official metric and per-example outcomes, as ``evaluation.evaluate`` reports them."""
    return {"accuracy": 100 * float((pred == labels).mean()), "correct": pred == labels,
            "official": 100 * official_metric(track.metric(task), labels, pred, track.num_classes(task)),
            "metric": track.metric(task)}


# ----------------------------------------------------------------------------- features and routers
def shared_features(track, encoder: nn.Module, state: dict, state_hash: str, task: str, split: str,
                    n: int | None = None) -> torch.Tensor:
    """The model ``state``'s pooled features of a task's split (its ``n``-example subset), cached:
    what the router reads, and what the model's own head predicts from."""
    data = track.split(task, split).subset(n, track.seed)
    key = {**track.identity([task]), "task": task, "split": split, "n": n, "encoder": state_hash}

    def compute():
        encoder.load_state_dict(state)
        return {"features": encode(encoder, data)}

    return cached_tensors("features/twin", key, compute, code=(encode,))["features"]


def router_split(size: int, held_out: float, seed: int, salt: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded shuffle of a validation split's ``size`` examples: (held-out indices, the labeled
    pool in order). Labeled sets of every size are prefixes of the pool, so they are nested."""
    order = np.random.default_rng([seed, salt]).permutation(size)
    kept = min(size - 1, max(1, math.ceil(held_out * size)))
    return order[:kept], order[kept:]


@dataclass
class RouterFit:
    """One router: how many labeled examples per task it asked for and got, and its training."""

    requested: int
    used: dict[str, int]            # task -> labeled examples it was trained on
    held_out: int                   # held-out examples (all tasks) its epoch was chosen on
    router: nn.Module
    history: list[dict]

    @property
    def best_epoch(self) -> int:
        return max(self.history, key=lambda h: (h["held_out_accuracy"], -h["epoch"]))["epoch"]


def fit_routers(track, encoder: nn.Module, shared: dict, shared_hash: str, tasks: Sequence[str],
                sizes: Sequence[int], config: TwinMergingConfig) -> dict[int, RouterFit]:
    """Routers trained on the shared model's features of the tasks' **validation** splits only,
    one per labeled-set size; each chooses its best epoch on the same held-out part.

    ``track`` is read through a ``ValidationOnly`` view: reading any other split raises.
    """
    view = track if isinstance(track, ValidationOnly) else ValidationOnly(track)
    features = {t: shared_features(view, encoder, shared, shared_hash, t, "validation") for t in tasks}
    parts = {t: router_split(len(features[t]), config.router_held_out, config.seed, i) for i, t in enumerate(tasks)}
    held_x = torch.cat([features[t][parts[t][0]] for t in tasks])
    held_y = torch.cat([torch.full((len(parts[t][0]),), i) for i, t in enumerate(tasks)])
    fits = {}
    for size in sorted(set(sizes)):
        chosen = {t: parts[t][1][:size] for t in tasks}
        x = torch.cat([features[t][chosen[t]] for t in tasks])
        y = torch.cat([torch.full((len(chosen[t]),), i) for i, t in enumerate(tasks)])
        router, history = tw.train_router(x, y, held_x, held_y, num_tasks=len(tasks), epochs=config.router_epochs,
                                          lr=config.router_lr, batch_size=config.router_batch_size, seed=config.seed)
        fits[size] = RouterFit(size, {t: len(chosen[t]) for t in tasks}, len(held_y), router, history)
    return fits


# ----------------------------------------------------------------------------- one Twin-Merging build
@dataclass
class TwinBuild:
    """Twin-Merging of some tasks: the shared expert, their exclusive parts and their routers."""

    tasks: list[str]                # the tasks merged: the only ones its shared expert and router saw
    shared: MergeResult             # Task Arithmetic of their experts, λ chosen on validation
    shared_hash: str
    exclusive: list[dict]           # compress(shared, their experts) at ``compressed_ratio``
    compressed_ratio: float
    routers: dict[int, RouterFit]   # requested labeled examples per task -> router
    _at: dict = field(default_factory=dict, repr=False)

    @property
    def main_size(self) -> int:
        return max(self.routers)

    @property
    def shared_lambda(self) -> float:
        return self.shared.hyperparameters["scale"]

    def exclusive_at(self, ratio: float) -> list[dict]:
        if ratio not in self._at:
            parts = self.exclusive if ratio == self.compressed_ratio else truncate(self.exclusive, ratio)
            self._at[ratio] = (parts, tw.stack(parts), content_hash(_flat(parts)))
        return self._at[ratio][0]

    def stacked_at(self, ratio: float) -> tw.Stacked:
        self.exclusive_at(ratio)
        return self._at[ratio][1]

    def hash_at(self, ratio: float) -> str:
        self.exclusive_at(ratio)
        return self._at[ratio][2]


def shared_expert(track: Track, setup: Setup, tasks: Sequence[str], config: TwinMergingConfig,
                  progress: bool = True) -> MergeResult:
    """Task Arithmetic of ``tasks``' experts, λ chosen on their validation splits only
    (notebook 01's ``closed_form_merges`` on the restricted track)."""
    narrow, setup_k = restricted(track, setup, tasks)
    return B.closed_form_merges(narrow, setup_k, {}, config.baselines_config(), methods=("task_arithmetic",),
                                progress=progress)[SHARED_METHOD]


def build_twin(track: Track, setup: Setup, tasks: Sequence[str], shared: MergeResult, encoder: nn.Module,
               config: TwinMergingConfig, ratio: float, router_sizes: Sequence[int]) -> TwinBuild:
    """Twin-Merging of ``tasks`` around a given shared expert: exclusive parts compressed at
    ``ratio`` and one router per labeled-set size. Nothing of the other tasks is read."""
    experts = [setup.experts[t].encoder for t in tasks]
    exclusive = tw.compress(shared.state, experts, ratio)
    state_hash = content_hash(shared.state)
    routers = fit_routers(track, encoder, shared.state, state_hash, tasks, router_sizes, config)
    return TwinBuild(list(tasks), shared, state_hash, exclusive, ratio, routers)


# ----------------------------------------------------------------------------- evaluating builds
@torch.no_grad()
def low_rank_predictions(encoder: nn.Module, base: dict, stacked: tw.Stacked, weights: torch.Tensor,
                         split: PreparedSplit, head: dict, batch_size: int = 128) -> np.ndarray:
    """Predictions of θ(x) = base + Σt w_t(x)·v_t for every example of a split, through ``head``,
    by the exact low-rank path; ``weights`` [N, T] in the split's order."""
    predict = head_module(head)
    pred = np.empty(len(split), dtype=np.int64)
    device = run_device_of(encoder)  # paper scale: the track's GPU; the CPU otherwise
    encoder, base, stacked = encoder.to(device), to_device(base, device), stacked.to(device)
    for batch in split.batches(batch_size, with_index=True):
        index = batch["index"]
        features = tw.low_rank_forward(encoder, base, stacked, weights[index].to(device),
                                       to_device(model_inputs(batch), device))
        pred[index.numpy()] = predict(features.float().cpu()).argmax(1).numpy()
    return pred


@torch.no_grad()
def low_rank_outputs(encoder: nn.Module, base: dict, stacked: tw.Stacked, weights: torch.Tensor,
                     split: PreparedSplit, head: dict, batch_size: int = 128) -> torch.Tensor:
    """The head's raw outputs [N, outputs] (logits, or a regression's scalar) of θ(x) = base +
    Σt w_t(x)·v_t for every example of a split, by the exact low-rank path: what a track scored by
    official metrics turns into its predictions (``low_rank_predictions`` keeps the argmax only)."""
    predict = head_module(head)
    out = None
    device = run_device_of(encoder)
    encoder, base, stacked = encoder.to(device), to_device(base, device), stacked.to(device)
    for batch in split.batches(batch_size, with_index=True):
        index = batch["index"]
        features = tw.low_rank_forward(encoder, base, stacked, weights[index].to(device),
                                       to_device(model_inputs(batch), device))
        outputs = predict(features.float().cpu())
        out = torch.empty(len(split), outputs.shape[1]) if out is None else out
        out[index] = outputs
    return out



class TwinEvaluator:
    """Per-example test outcomes of Twin-Merging builds and their parts on one track, cached.

    ``n`` is the number of test examples per task (None: the whole test split; the sweeps use
    ``sweep_test_examples``). Outcomes are ``{display name: array}``, as in notebook 01: correct
    or not, or on a track scored by official metrics (GLUE) the predictions, whose scores need
    the labels (``scoring``).
    """

    def __init__(self, track: Track, setup: Setup, encoder: nn.Module):
        self.track, self.setup, self.encoder = track, setup, encoder
        self.pretrained_hash = content_hash(setup.pretrained)
        self.official = scored_officially(track)

    def name(self, task: str) -> str:
        return self.track.display_name(task)

    def labels(self, task: str, n: int | None) -> np.ndarray:
        return self.track.split(task, "test").subset(n, self.track.seed).labels

    def scoring(self, n: int | None, resamples: int = 1000) -> Scoring:
        """How outcomes on ``n`` test examples per task (every task) are scored."""
        gold = {self.name(t): self.labels(t, n) for t in self.track.tasks} if self.official else {}
        return Scoring(self.track, gold, self.track.seed, resamples)

    def features(self, build: TwinBuild, task: str, n: int | None) -> torch.Tensor:
        return shared_features(self.track, self.encoder, build.shared.state, build.shared_hash, task, "test", n)

    def weights(self, build: TwinBuild, task: str, n: int | None, size: int | None = None,
                top_k: int | None = None) -> torch.Tensor:
        router = build.routers[size or build.main_size].router
        return tw.route(router, self.features(build, task, n), top_k)

    def shared_outcomes(self, build: TwinBuild, tasks: Sequence[str], n: int | None) -> dict[str, np.ndarray]:
        """The shared model alone, from the same features the router reads."""
        out = {}
        for task in tasks:
            with torch.no_grad():
                outputs = head_module(self.setup.heads[task])(self.features(build, task, n))
            out[self.name(task)] = head_outcome(self.track, task, outputs, self.labels(task, n))
        return out

    def _variant(self, build: TwinBuild, task: str, n: int | None, ratio: float, size: int | None, base: str,
                 top_k: int | None) -> tuple[PreparedSplit, torch.Tensor, dict, dict, dict]:
        """A Twin variant's (split, router weights, base state, head, cache key) on a task's test split."""
        split = self.track.split(task, "test").subset(n, self.track.seed)
        weights = self.weights(build, task, n, size, top_k)
        base_state = build.shared.state if base == "shared" else self.setup.pretrained
        base_hash = build.shared_hash if base == "shared" else self.pretrained_hash
        head = self.setup.heads[task]
        key = {**self.track.identity([task]), "task": task, "split": "test", "n": n, "base": base_hash,
               "exclusive": build.hash_at(ratio), "weights": content_hash({"w": weights}), "head": content_hash(head)}
        return split, weights, base_state, head, key

    def predictions(self, build: TwinBuild, task: str, n: int | None, *, ratio: float, size: int | None = None,
                    base: str = "shared", top_k: int | None = None) -> np.ndarray:
        """One Twin variant's predictions on a task's test split (or its subset): ``base`` "shared"
        (Twin-Merging) or "pretrained" (θ0 + Σ w·v, the exclusive-only ablation)."""
        split, weights, base_state, head, key = self._variant(build, task, n, ratio, size, base, top_k)

        def compute():
            return {"pred": torch.as_tensor(low_rank_predictions(self.encoder, base_state, build.stacked_at(ratio),
                                                                 weights, split, head))}

        # the lib's code that computes the path (its hooks included) enters the key
        code = (low_rank_predictions, tw.low_rank_forward, tw.stack, tw._Corrections)
        return cached_tensors("predictions/twin", key, compute, code=code)["pred"].numpy()

    def outputs(self, build: TwinBuild, task: str, n: int | None, *, ratio: float, size: int | None = None,
                base: str = "shared", top_k: int | None = None) -> torch.Tensor:
        """As ``predictions``, the head's raw outputs [N, outputs]: a track scored by official
        metrics makes its own predictions of them (STS-B's is the scalar, not an argmax)."""
        split, weights, base_state, head, key = self._variant(build, task, n, ratio, size, base, top_k)

        def compute():
            return {"outputs": low_rank_outputs(self.encoder, base_state, build.stacked_at(ratio), weights, split, head)}

        code = (low_rank_outputs, tw.low_rank_forward, tw.stack, tw._Corrections)
        return cached_tensors("outputs/twin", key, compute, code=code)["outputs"]

    def scores(self, build: TwinBuild, tasks: Sequence[str], n: int | None, **variant) -> dict[str, dict]:
        """``evaluate``-style results (accuracy, official metric, outcomes) per task; on a track
        scored by official metrics its own results (``score``, ``predicted``)."""
        if self.official:
            return {task: self.track.task_results(task, self.outputs(build, task, n, **variant).numpy(),
                                                  self.labels(task, n)) for task in tasks}
        return {task: _scores(self.track, task, self.labels(task, n), self.predictions(build, task, n, **variant))
                for task in tasks}

    def outcomes(self, build: TwinBuild, tasks: Sequence[str], n: int | None, **variant) -> dict[str, np.ndarray]:
        return {self.name(t): B.outcome(r) for t, r in self.scores(build, tasks, n, **variant).items()}


def sliced(outcomes: dict[str, np.ndarray], track: Track, tasks: Sequence[str], n: int | None) -> dict[str, np.ndarray]:
    """Full-test outcomes (keyed by display name) restricted to the sweep subset of ``tasks``."""
    return {track.display_name(t): outcomes[track.display_name(t)][subset_index(track, t, n)] for t in tasks}


def normalized_estimate(correct: dict[str, np.ndarray], expert: dict[str, np.ndarray]) -> Estimate:
    """Normalized score (100 × accuracy / the expert's on the same examples, averaged over tasks)
    with a standard error from the per-example differences to the expert, the expert's accuracy
    taken as fixed: 100 = expert level."""
    values, variances = [], []
    for task, outcome in correct.items():
        x, e = np.asarray(outcome, float), np.asarray(expert[task], float)
        if len(x) != len(e):
            raise ValueError(f"task {task!r}: {len(x)} outcomes against the expert's {len(e)}; use the same examples.")
        if e.mean() == 0:  # an expert that gets nothing right: no scale to normalize by
            return Estimate(float("nan"), float("nan"))
        scale = 100.0 / e.mean()
        values.append(scale * x.mean())
        variances.append(scale ** 2 * (x - e).var(ddof=1) / len(x) if len(x) > 1 else 0.0)
    return Estimate(float(np.mean(values)), math.sqrt(sum(variances)) / len(values))


def _row(name: str, correct: dict, expert: dict, scoring: Scoring | None = None, **extra) -> dict:
    """A table row: normalized score and average accuracy (GLUE: official score) with their standard errors."""
    scoring = scoring or Scoring()
    norm, avg = scoring.normalized(correct, expert), scoring.average(correct)
    return {**extra, "row": name, "normalized": norm.value, "normalized SE": norm.se,
            scoring.unit: avg.value, f"{scoring.measure} SE": avg.se}


# ----------------------------------------------------------------------------- the mixed stream
def mixed_stream(track: Track, tasks: Sequence[str], seed: int) -> pd.DataFrame:
    """Every test input of every task exactly once, shuffled together (seeded): columns
    ``task`` and ``index`` (into that task's test split), in arrival order."""
    rows = pd.DataFrame([(t, i) for t in tasks for i in range(len(track.split(t, "test")))], columns=["task", "index"])
    order = np.random.default_rng([seed, STREAM_SALT]).permutation(len(rows))
    return rows.iloc[order].reset_index(drop=True)


def concat_inputs(parts: Sequence[dict[str, torch.Tensor]], pad_values: dict[str, int] | None = None
                  ) -> dict[str, torch.Tensor]:
    """Batches concatenated along the batch dimension, every other dimension right-padded to the
    widest with ``pad_values[key]``, else zeros (text: BERT's [PAD] token id and a zero attention
    mask, which the model ignores; RoBERTa's pad id is 1, which its position ids skip)."""
    out = {}
    for key in parts[0]:
        tensors = [p[key] for p in parts]
        widest = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
        padded = []
        for t in tensors:
            pad = [amount for d in reversed(range(1, t.dim())) for amount in (0, widest[d - 1] - t.shape[d])]
            padded.append(F.pad(t, pad, value=(pad_values or {}).get(key, 0)) if any(pad) else t)
        out[key] = torch.cat(padded)
    return out


def stream_batch(track: Track, rows: pd.DataFrame) -> dict[str, torch.Tensor]:
    """The model inputs (and labels) of consecutive stream rows, in stream order, padded as the
    track pads its own batches (``track.pad_values``, where it has them)."""
    parts, positions = [], []
    for task, group in rows.groupby("task", sort=False):
        parts.append(track.split(task, "test").batch(group["index"].to_numpy()))
        positions.append(np.flatnonzero((rows["task"] == task).to_numpy()))
    batch = concat_inputs(parts, getattr(track, "pad_values", None))
    order = torch.as_tensor(np.argsort(np.concatenate(positions), kind="stable"))
    return {k: v[order] for k, v in batch.items()}


def stream_gold(track: Track, served: pd.DataFrame) -> dict[str, np.ndarray]:
    """The labels of the served stream's inputs per task (display name), in arrival order."""
    return {track.display_name(t): track.split(t, "test").labels[served["index"][served["task"] == t].to_numpy()]
            for t in dict.fromkeys(served["task"])}


def stream_scoring(track: Track, served: pd.DataFrame, config: TwinMergingConfig) -> Scoring:
    """How the outcomes of the served stream are scored (GLUE: against its inputs' labels)."""
    gold = stream_gold(track, served) if scored_officially(track) else {}
    return Scoring(track, gold, track.seed, config.bootstrap_resamples)


@torch.no_grad()
def _head_outputs(features: torch.Tensor, tasks: Sequence[str], heads: dict) -> dict[str, torch.Tensor]:
    """Each task's inputs through its own head, in arrival order: task -> outputs [n_t, outputs] on the CPU."""
    tasks, out = np.asarray(tasks), {}
    for task in dict.fromkeys(tasks.tolist()):
        rows = torch.as_tensor(np.flatnonzero(tasks == task), device=features.device)
        out[task] = head_module(heads[task]).to(features.device)(features[rows]).float().cpu()
    return out


def _timed(fn: Callable, *args) -> tuple[float, torch.Tensor]:
    """(wall seconds, result) of ``fn(*args)``; on a GPU, the work it queued is waited for."""
    start = time.perf_counter()
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def serve_stream(track: Track, encoder: nn.Module, build: TwinBuild, heads: dict, stream: pd.DataFrame,
                 config: TwinMergingConfig) -> tuple[pd.DataFrame, dict[str, dict[str, np.ndarray]]]:
    """Serve the first ``stream_examples`` inputs of the mixed stream by every path, side by side,
    batch after batch: seconds per input (mean over batches ± SE) and accuracy (GLUE: the average
    official score) on the same inputs.

    Every Twin path also needs the routing pass: the static forward (whose features the router
    reads) and the router MLP; the table lists both, and the paths' times exclude them.
    """
    served = stream.iloc[: config.stream_examples]
    device = run_device_of(encoder)  # every path on the track's device; times synchronised there
    shared, ratio, k = to_device(build.shared.state, device), config.rank_ratio, min(config.top_k, len(build.tasks))
    exclusive = [{key: tw.LowRank(*(t.to(device) for t in v)) if isinstance(v, tw.LowRank) else v.to(device)
                  for key, v in part.items()} for part in build.exclusive_at(ratio)]
    stacked, router = build.stacked_at(ratio).to(device), copy.deepcopy(build.routers[build.main_size].router).to(device)
    encoder = encoder.to(device)
    paths: dict[str, Callable] = {
        LOW_RANK: lambda w, x: tw.low_rank_forward(encoder, shared, stacked, w, x),
        _top_k_name(LOW_RANK, k): lambda w, x: tw.low_rank_forward(encoder, shared, stacked, w, x),
        GROUPED: lambda w, x: tw.grouped_forward(encoder, shared, exclusive, w, x),
        PER_INPUT: lambda w, x: tw.per_input_forward(encoder, shared, exclusive, w, x),
        _top_k_name(PER_INPUT, k): lambda w, x: tw.per_input_forward(encoder, shared, exclusive, w, x),
    }
    uses_top_k = {_top_k_name(LOW_RANK, k), _top_k_name(PER_INPUT, k)}
    seconds = {name: [] for name in (STATIC, ROUTER, *paths)}
    outputs = {name: [] for name in (STATIC, *paths)}  # per batch: task -> head outputs, in arrival order
    sizes = []

    def forward_static(x):
        with torch.no_grad():
            encoder.eval()
            return functional_forward(encoder, shared, x)

    heads = {t: {key: v.to(device) for key, v in h.items()} for t, h in heads.items()}
    warm = to_device(model_inputs(stream_batch(track, served.iloc[:2])), device)  # first calls load kernels: not timed
    w_warm = tw.route(router, forward_static(warm))
    for fn in paths.values():
        fn(w_warm, warm)
    # the matrix work of each path per input, counted on the first batch: what bounds a path's speed-up
    first = served.iloc[: config.stream_batch_size]
    x_first = to_device(model_inputs(stream_batch(track, first)), device)
    features_first = forward_static(x_first)
    w_first, top_first = tw.route(router, features_first), tw.route(router, features_first, k)
    flops = {STATIC: matrix_flops(forward_static, x_first), ROUTER: matrix_flops(tw.route, router, features_first)}
    flops.update({name: matrix_flops(fn, top_first if name in uses_top_k else w_first, x_first)
                  for name, fn in paths.items()})
    for start in range(0, len(served), config.stream_batch_size):
        rows = served.iloc[start:start + config.stream_batch_size]
        batch = stream_batch(track, rows)
        x, tasks = to_device(model_inputs(batch), device), rows["task"].tolist()
        t, features = _timed(forward_static, x)
        seconds[STATIC].append(t)
        outputs[STATIC].append(_head_outputs(features, tasks, heads))
        t, weights = _timed(tw.route, router, features)
        seconds[ROUTER].append(t)
        top = tw.route(router, features, k)
        for name, fn in paths.items():
            t, out = _timed(fn, top if name in uses_top_k else weights, x)
            seconds[name].append(t)
            outputs[name].append(_head_outputs(out, tasks, heads))
        sizes.append(len(rows))
    gold, scoring = stream_gold(track, served), stream_scoring(track, served, config)
    outcomes = {name: {track.display_name(t): head_outcome(track, t, torch.cat([b[t] for b in batches if t in b]),
                                                           gold[track.display_name(t)])
                       for t in dict.fromkeys(served["task"])}
                for name, batches in outputs.items()}
    sizes = np.asarray(sizes, float)
    static = sum(seconds[STATIC]) / sizes.sum()
    rows_out = []
    for name, times in seconds.items():
        per_input = np.asarray(times) / sizes
        mean = float(np.sum(times) / sizes.sum())
        se = float(per_input.std(ddof=1) / math.sqrt(len(per_input))) if len(per_input) > 1 else float("nan")
        row = {"path": name, "inputs": int(sizes.sum()), "ms per input": 1e3 * mean, "SE (ms)": 1e3 * se,
               "× static": mean / static, "MFLOP per input": flops[name] / len(first) / 1e6}
        if name in outcomes:  # the value alone: its SE (on GLUE a bootstrap) is the findings' business
            row[scoring.column] = scoring.value(outcomes[name])
        rows_out.append(row)
    table = pd.DataFrame(rows_out).set_index("path")
    table["× low-rank"] = table["ms per input"] / table.loc[LOW_RANK, "ms per input"]
    table["× low-rank (FLOPs)"] = table["MFLOP per input"] / table.loc[LOW_RANK, "MFLOP per input"]
    return table, outcomes


def speedup(table: pd.DataFrame, slow: str, fast: str) -> Estimate:
    """How many times faster ``fast`` serves an input than ``slow``, ± SE (delta method)."""
    a, sa = table.loc[slow, "ms per input"], table.loc[slow, "SE (ms)"]
    b, sb = table.loc[fast, "ms per input"], table.loc[fast, "SE (ms)"]
    ratio = a / b
    return Estimate(float(ratio), float(ratio * math.hypot(sa / a, sb / b)))


# ----------------------------------------------------------------------------- notebook 02's rows
def expert_settings(track_name: str) -> list[str]:
    """The parameters that decide a track's experts, heads and test sets: two notebooks' rows of
    that track are comparable when these agree."""
    common = ["benchmark", "seed", "max_validation", "max_test", "head_shots", "eval_every", "patience"]
    own = [f"{track_name}_{s}" for s in ("tasks", "heads", "max_steps", "batch_size", "lr")]
    return common + own + (["vision_backbone"] if track_name == "vision" else [])


def adamerging_rows(track: Track, config: TwinMergingConfig, expert_accuracy: pd.Series,
                    folder: Path | None = None) -> tuple[pd.DataFrame, str]:
    """AdaMerging's rows of notebook 02's main table, when it ran on the same experts and test sets.

    Reads ``<track>_main.csv`` in ``folder`` (default ``figures/02_adamerging``; the wide table of
    accuracy per task), keeps the rows named "AdaMerging…" (not their Surgery variants) and
    normalizes them by this run's experts. Returns (long rows, a note); no rows when notebook 02
    has not run, or its ``run.json`` differs from this config in ``expert_settings``.
    """
    if scored_officially(track):  # its tables are accuracies of other tracks: nothing to set beside GLUE scores
        return pd.DataFrame(), f"AdaMerging ({track.name}): notebook 02 does not run GLUE; no AdaMerging rows."
    folder = Path(folder or REPO_ROOT / "figures" / ADAMERGING_NOTEBOOK)
    table, run = folder / f"{track.name}_main.csv", folder / "run.json"
    if not (table.exists() and run.exists()):
        return pd.DataFrame(), f"AdaMerging ({track.name}): notebook 02 has not written its table; its rows are left out."
    theirs, ours = json.loads(run.read_text()).get("parameters", {}), parameters_of(config)
    differing = [k for k in expert_settings(track.name) if k in theirs and k in ours and theirs[k] != ours[k]]
    if differing:
        return pd.DataFrame(), (f"AdaMerging ({track.name}): notebook 02 ran with other experts or test sets "
                                f"({', '.join(differing)}); its rows are left out.")
    wide = pd.read_csv(table, index_col=0)
    tasks = list(expert_accuracy.index)
    rows = wide[wide.index.str.startswith("AdaMerging") & ~wide.index.str.contains("Surgery")]
    if rows.empty or not set(tasks) <= set(wide.columns):
        return pd.DataFrame(), f"AdaMerging ({track.name}): notebook 02's table has no AdaMerging rows for these tasks."
    long = rows[tasks].rename_axis("method").reset_index().melt("method", var_name="task", value_name="accuracy")
    long = long.assign(track=track.name, kind="notebook 02", batchnorm="stored")
    long["normalized"] = 100 * long.accuracy / long.task.map(expert_accuracy)
    where = folder.relative_to(REPO_ROOT) if folder.is_relative_to(REPO_ROOT) else folder
    return long, (f"AdaMerging ({track.name}) rows read from {where}/{table.name}: same experts and test sets, "
                  "accuracy rounded to 0.1, no per-example outcomes (so no paired claims).")


# ----------------------------------------------------------------------------- one track
@dataclass
class TwinTrackResult:
    """Everything one track's run produced. ``tables`` and ``outcomes`` are keyed by experiment:
    "main" (full test), "ablation", "rank", "router", "task_count", "unseen" (the sweep subset)
    and "stream" (its served prefix); outcomes map a row to {task: per-example outcomes} (correct
    or not; GLUE: predictions), which ``scorings`` (by experiment; accuracy where absent) score."""

    name: str
    tables: dict[str, pd.DataFrame]
    outcomes: dict[str, dict]
    notes: list[str] = field(default_factory=list)
    setup: Setup | None = None
    merges: dict[str, MergeResult] = field(default_factory=dict)
    build: TwinBuild | None = None
    shared_lambdas: dict[int, float] = field(default_factory=dict)  # number of tasks -> λ of its shared expert
    scorings: dict[str, Scoring] = field(default_factory=dict)

    def scored(self, key: str) -> Scoring:
        """How experiment ``key``'s outcomes are scored (accuracy unless the run said otherwise)."""
        return self.scorings.get(key) or Scoring()


def main_table(track: Track, setup: Setup, merges: dict[str, MergeResult], build: TwinBuild, evaluator: TwinEvaluator,
               config: TwinMergingConfig, progress: bool) -> tuple[pd.DataFrame, dict, str]:
    """The long table on the full test sets: notebook 01's rows, Twin-Merging, AdaMerging's if present."""
    table, outcomes = B.evaluate_methods(track, setup, merges, progress=progress)
    rows = []
    for task, r in evaluator.scores(build, track.tasks, None, ratio=config.rank_ratio).items():
        outcomes[(TWIN, "stored")] = {**outcomes.get((TWIN, "stored"), {}), track.display_name(task): B.outcome(r)}
        rows.append({"track": track.name, "method": TWIN, "kind": "Twin-Merging", "task": track.display_name(task),
                     "batchnorm": "stored", **{k: v for k, v in r.items() if k not in ("correct", "predicted")}})
    value = B.score_column(table)  # accuracy, or GLUE's official score
    expert = table[table.method == B.EXPERTS].set_index("task")[value]
    twin = pd.DataFrame(rows)
    twin["normalized"] = 100 * twin[value] / twin.task.map(expert)
    ada, note = adamerging_rows(track, config, expert)
    table = pd.concat([table, twin, ada], ignore_index=True)
    return table, {row: per_task for (row, _), per_task in outcomes.items()}, note


def run_track(name: str, config: TwinMergingConfig, progress: bool = True, lap=lambda label: None,
              track: Track | None = None) -> TwinTrackResult:
    """Notebook 01's experts and merges, then Twin-Merging and every experiment of notebook 05 on one
    track. ``name`` ("text" or "vision") picks the training settings; ``track`` replaces the
    config's track of that name (tests pass a synthetic one)."""
    base = config.baselines_config()
    track = track or base.track(name)
    expert_config, multitask_config = base.finetune_configs(name, len(track.tasks))
    setup = B.prepare_track(track, expert_config, multitask_config, progress=progress)
    lap(f"{name}: experts ready")
    merges = B.closed_form_merges(track, setup, {}, base, methods=BASELINE_METHODS, progress=progress)
    lap(f"{name}: merges ready")
    encoder = track.pretrained_encoder()
    evaluator = TwinEvaluator(track, setup, encoder)
    build = build_twin(track, setup, track.tasks, merges[SHARED_METHOD], encoder, config, config.compressed_ratio,
                       config.router_sizes)
    lap(f"{name}: Twin-Merging built")
    table, full, note = main_table(track, setup, merges, build, evaluator, config, progress)
    lap(f"{name}: main table")
    result = TwinTrackResult(track.name, {"main": table}, {"main": full}, [note], setup, merges, build)
    n = config.sweep_test_examples
    sweep = evaluator.scoring(n, config.bootstrap_resamples)
    result.scorings = {"main": evaluator.scoring(None, config.bootstrap_resamples),
                       **{key: sweep for key in ("ablation", "rank", "router", "task_count", "unseen")}}
    references = {row: sliced(full[row], track, track.tasks, n) for row in (B.PRETRAINED, B.EXPERTS, SHARED_METHOD)}
    steps = [("ablation", ablation), ("rank", rank_sweep), ("router", router_sweep)]
    for key, experiment in tqdm(steps, desc=f"{name} sweeps", disable=not progress):
        result.tables[key], result.outcomes[key] = experiment(track, build, evaluator, references, config, sweep)
    lap(f"{name}: ablation, rank and router sweeps")
    builds = smaller_builds(track, setup, build, evaluator, config)
    result.shared_lambdas = {k: b.shared_lambda for k, b in builds.items()}
    for key, experiment in (("task_count", task_count_sweep), ("unseen", unseen_task_results)):
        result.tables[key], result.outcomes[key] = experiment(track, builds, evaluator, references, config, sweep)
    lap(f"{name}: number of tasks and unseen tasks")
    stream = mixed_stream(track, track.tasks, config.seed)
    result.tables["stream"], result.outcomes["stream"] = serve_stream(track, encoder, build, setup.heads, stream, config)
    result.scorings["stream"] = stream_scoring(track, stream.iloc[: config.stream_examples], config)
    lap(f"{name}: mixed stream served")
    result.notes += _notes(track, build, merges, config)
    return result


def ablation(track, build, evaluator, references, config, scoring=None) -> tuple[pd.DataFrame, dict]:
    """Shared expert only; exclusive parts only (θ0 + Σ w·v); both (Twin-Merging); on the subset."""
    n, tasks = config.sweep_test_examples, track.tasks
    outcomes = {
        B.PRETRAINED: references[B.PRETRAINED],
        SHARED_ONLY: evaluator.shared_outcomes(build, tasks, n),
        EXCLUSIVE_ONLY: evaluator.outcomes(build, tasks, n, ratio=config.rank_ratio, base="pretrained"),
        TWIN: evaluator.outcomes(build, tasks, n, ratio=config.rank_ratio),
    }
    parts = {B.PRETRAINED: "neither", SHARED_ONLY: "shared", EXCLUSIVE_ONLY: "exclusive", TWIN: "both"}
    rows = [_row(row, correct, references[B.EXPERTS], scoring, parts=parts[row]) for row, correct in outcomes.items()]
    return pd.DataFrame(rows).set_index("row"), outcomes


def rank_sweep(track, build, evaluator, references, config, scoring=None) -> tuple[pd.DataFrame, dict]:
    """Normalized score and storage at each rank ratio (rank 0 = the shared expert alone)."""
    n, tasks = config.sweep_test_examples, track.tasks
    model = state_bytes(build.shared.state)
    outcomes, rows = {0.0: evaluator.shared_outcomes(build, tasks, n)}, []
    rows.append(_row("rank 0 (shared expert only)", outcomes[0.0], references[B.EXPERTS], scoring, rank_ratio=0.0,
                     exclusive_bytes=0, total_bytes=model))
    for ratio in sorted(set(config.rank_ratios) | {config.rank_ratio}):
        outcomes[ratio] = evaluator.outcomes(build, tasks, n, ratio=ratio)
        stored = tw.nbytes(build.exclusive_at(ratio))
        rows.append(_row(f"rank ratio {ratio:g}", outcomes[ratio], references[B.EXPERTS], scoring, rank_ratio=ratio,
                         exclusive_bytes=stored, total_bytes=model + stored))
    table = pd.DataFrame(rows).set_index("row")
    table["one model bytes"] = model
    table["experts bytes"] = len(tasks) * model
    table["share of the experts' storage"] = table["total_bytes"] / table["experts bytes"]
    return table, outcomes


def router_sweep(track, build, evaluator, references, config, scoring=None) -> tuple[pd.DataFrame, dict]:
    """Router accuracy (full test) and Twin-Merging's score (subset) for each labeled-set size."""
    n, tasks = config.sweep_test_examples, track.tasks
    outcomes, rows = {}, []
    for size, fit in build.routers.items():
        # the router's own accuracy: does it send each test input to its task? (all test inputs)
        routed = {track.display_name(t): (evaluator.weights(build, t, None, size).argmax(1) == i).numpy()
                  for i, t in enumerate(tasks)}
        router_acc = mean_accuracy(routed)
        outcomes[size] = evaluator.outcomes(build, tasks, n, ratio=config.rank_ratio, size=size)
        rows.append(_row(f"{size} per task", outcomes[size], references[B.EXPERTS], scoring, requested=size,
                         used_min=min(fit.used.values()), used_total=sum(fit.used.values()), held_out=fit.held_out,
                         best_epoch=fit.best_epoch, router_accuracy=router_acc.value, router_accuracy_SE=router_acc.se))
    return pd.DataFrame(rows).set_index("row"), outcomes


def smaller_builds(track, setup, build, evaluator, config) -> dict[int, TwinBuild]:
    """Twin-Merging of the first k tasks, for every k of the task-count sweep and for the unseen
    build (the first T − ``unseen_tasks``), each with its own shared expert (λ on their validation
    splits) and a router of the main size; k = T is the main build."""
    tasks = track.tasks
    seen, unseen = config.seen_for_unseen(tasks)
    builds = {len(tasks): build}
    for k in dict.fromkeys(config.task_counts(len(tasks)) + ([len(seen)] if unseen else [])):
        if k not in builds:
            shared = shared_expert(track, setup, tasks[:k], config, progress=False)
            builds[k] = build_twin(track, setup, tasks[:k], shared, evaluator.encoder, config, config.rank_ratio,
                                   [build.main_size])
    return builds


def task_count_sweep(track, builds, evaluator, references, config, scoring=None) -> tuple[pd.DataFrame, dict]:
    """Twin-Merging, its shared expert and θ0 + heads on the first k tasks, for each number k merged."""
    n, rows, outcomes = config.sweep_test_examples, [], {}
    for k in config.task_counts(len(track.tasks)):
        build, first = builds[k], track.tasks[:k]
        names = [track.display_name(t) for t in first]
        experts = {t: references[B.EXPERTS][t] for t in names}
        for row, correct in ((TWIN, evaluator.outcomes(build, first, n, ratio=config.rank_ratio)),
                             (SHARED_ONLY, evaluator.shared_outcomes(build, first, n)),
                             (B.PRETRAINED, {t: references[B.PRETRAINED][t] for t in names})):
            outcomes[(k, row)] = correct
            rows.append(_row(row, correct, experts, scoring, tasks=k, shared_lambda=build.shared_lambda))
    return pd.DataFrame(rows), outcomes


def unseen_task_results(track, builds, evaluator, references, config, scoring=None) -> tuple[pd.DataFrame, dict]:
    """The build that never saw the last ``unseen_tasks`` tasks, evaluated on them (each through its
    own head), beside its shared expert, θ0 + heads, and Task Arithmetic of all tasks (which saw them)."""
    seen, unseen = config.seen_for_unseen(track.tasks)
    if not unseen:
        return pd.DataFrame(), {}
    build, n = builds[len(seen)], config.sweep_test_examples
    names = [track.display_name(t) for t in unseen]
    outcomes = {
        TWIN: evaluator.outcomes(build, unseen, n, ratio=config.rank_ratio),
        SHARED_ONLY: evaluator.shared_outcomes(build, unseen, n),
        B.PRETRAINED: {t: references[B.PRETRAINED][t] for t in names},
        f"{SHARED_METHOD} of all {len(track.tasks)} tasks (saw them)": {t: references[SHARED_METHOD][t] for t in names},
    }
    experts = {t: references[B.EXPERTS][t] for t in names}
    where = {"built on": ", ".join(track.display_name(t) for t in seen), "unseen": ", ".join(names)}
    rows = [_row(row, correct, experts, scoring, **where) for row, correct in outcomes.items()]
    return pd.DataFrame(rows).set_index("row"), outcomes


def _notes(track: Track, build: TwinBuild, merges: dict[str, MergeResult], config: TwinMergingConfig) -> list[str]:
    notes = []
    for label, merge in merges.items():
        if merge.selection and merge.selection.note:
            notes.append(f"{track.name}, {label}: {merge.selection.note}.")
    for size, fit in build.routers.items():
        if min(fit.used.values()) < size:
            notes.append(f"{track.name}: the router asked for {size} labeled examples per task got "
                         f"{min(fit.used.values())}–{max(fit.used.values())} (the validation split, less the "
                         f"{config.router_held_out:.0%} held out to choose the epoch).")
    return notes


# ----------------------------------------------------------------------------- findings
def at_least(estimate: Estimate, threshold: float) -> str:
    """Whether a level reaches ``threshold``: held when even its value less 2 SE does."""
    if estimate.value - 2 * estimate.se >= threshold:
        return "held"
    if estimate.value + 2 * estimate.se < threshold:
        return "did not hold"
    return "inconclusive (within noise of the threshold)"


def within_margin(difference: Estimate, margin: float = MARGIN) -> str:
    """Whether two things are "about the same": held when the difference ± 2 SE lies within ±margin."""
    low, high = difference.value - 2 * difference.se, difference.value + 2 * difference.se
    if -margin <= low and high <= margin:
        return "held"
    if high < -margin or low > margin:
        return "did not hold"
    return "inconclusive (the interval reaches past the margin)"


def _published_glue(result: TwinTrackResult, twin: Estimate) -> str:
    """This GLUE run's normalized scores beside the Twin-Merging paper's and the authors' re-run,
    when the run is their setup: RoBERTa-base's 8 GLUE tasks, the first 1,000 test examples each."""
    track, s, full = result.setup.track, result.scored("main"), result.outcomes["main"]
    if tuple(track.tasks) != PAPER_TEXT_TASKS or track.max_test != GLUE_MAX_TEST:
        return (f"Published (Twin-Merging, RoBERTa-base, 8 GLUE tasks, first 1,000 test examples each): not comparable "
                f"({len(track.tasks)} tasks, test sets of at most {track.max_test}).")
    parts = []
    for row, paper in PAPER_NORMALIZED.items():
        if row not in full:
            continue
        estimate = twin if row == TWIN else s.normalized(full[row], full[B.EXPERTS])
        rerun = PAPER_NORMALIZED_RERUN.get(row)
        parts.append(f"{row} {estimate.plain()} (published {paper:.1f}"
                     + (f", the authors' re-run {rerun:.1f}" if rerun is not None else "") + ")")
    return ("Published (Twin-Merging, RoBERTa-base, 8 GLUE tasks, first 1,000 test examples each), normalized: "
            + "; ".join(parts) + ".")


def _main_claim(result: TwinTrackResult) -> Claim:
    full, s = result.outcomes["main"], result.scored("main")
    norm = s.normalized(full[TWIN], full[B.EXPERTS])
    d0 = s.difference(full[TWIN], full[B.PRETRAINED])
    d_ta = s.difference(full[TWIN], full[SHARED_METHOD])
    others = {row: s.normalized_value(full[row], full[B.EXPERTS]) for row in full if row not in (TWIN, B.EXPERTS)}
    paper = (_published_glue(result, norm) if s.official else
             f"Paper (RoBERTa-base, 8 GLUE tasks): Twin {PAPER_NORMALIZED[TWIN]}, TA {PAPER_NORMALIZED['Task Arithmetic']}, "
             f"TIES {PAPER_NORMALIZED['TIES']}.")
    return Claim(
        f"{result.name} track: Twin-Merging reaches near expert-level normalized score (≥ {NEAR_EXPERT:g})",
        at_least(norm, NEAR_EXPERT),
        f"Twin-Merging {norm.plain()} normalized; Twin − θ0 + heads = {d0} points of {s.unit} "
        f"({verdict(d0)}); Twin − {SHARED_METHOD} (its shared expert) = {d_ta} ({verdict(d_ta)}). Normalized: "
        + ", ".join(f"{row} {value:.1f}" for row, value in others.items()) + f". {paper}",
        "θ0 with the experts' heads (doing nothing)")


def _ablation_claim(result: TwinTrackResult) -> Claim:
    o, s = result.outcomes["ablation"], result.scored("ablation")
    d_shared = s.difference(o[TWIN], o[SHARED_ONLY])
    d_excl = s.difference(o[TWIN], o[EXCLUSIVE_ONLY])
    kinds = {verdict(d_shared), verdict(d_excl)}
    outcome = "held" if kinds == {"better"} else "did not hold" if "worse" in kinds else \
        "inconclusive (a part's contribution is within noise)"
    t = result.tables["ablation"]["normalized"]
    return Claim(
        f"{result.name} track: both the shared expert and the exclusive parts are needed", outcome,
        f"Both − shared only = {d_shared} points ({verdict(d_shared)}); both − exclusive only (θ0 + Σ w·v) = {d_excl} "
        f"({verdict(d_excl)}). Normalized: θ0 + heads {t[B.PRETRAINED]:.1f}, shared only {t[SHARED_ONLY]:.1f}, "
        f"exclusive only {t[EXCLUSIVE_ONLY]:.1f}, both {t[TWIN]:.1f}.",
        "the shared expert alone (and θ0 with the experts' heads)")


def _rank_claim(result: TwinTrackResult, rank_ratio: float) -> Claim:
    o, table, s = result.outcomes["rank"], result.tables["rank"], result.scored("rank")
    highest = max(o)
    low = table[table.rank_ratio == rank_ratio].iloc[0]
    share, experts = low["share of the experts' storage"], round(low["experts bytes"] / low["one model bytes"])
    if highest <= rank_ratio:
        return Claim(f"{result.name} track: a low rank (ratio {rank_ratio:g}) suffices",
                     "undetermined (no higher rank in the sweep)", f"The sweep's highest ratio is {highest:g}.",
                     "the shared expert alone (rank 0)")
    d = s.difference(o[rank_ratio], o[highest])
    d0 = s.difference(o[rank_ratio], o[0.0])
    return Claim(
        f"{result.name} track: a low rank suffices (ratio {rank_ratio:g} within ±{MARGIN:g} points of ratio {highest:g})",
        within_margin(d),
        f"Rank ratio {rank_ratio:g} − {highest:g} = {d} points of {s.unit}; rank {rank_ratio:g} − shared expert "
        f"alone = {d0} ({verdict(d0)}). Storage at {rank_ratio:g}: shared model + exclusive parts = {share:.0%} of the "
        f"{experts} experts'.",
        "the shared expert alone (rank 0)")


def _router_claim(result: TwinTrackResult) -> Claim:
    o, table, s = result.outcomes["router"], result.tables["router"], result.scored("router")
    small, large = min(o), max(o)
    d = s.difference(o[small], o[large])
    accuracy = ", ".join(f"{int(r.requested)} asked ({int(r.used_min)}+ used): {r.router_accuracy:.1f} ± "
                         f"{r.router_accuracy_SE:.1f}%" for _, r in table.iterrows())
    shared = result.outcomes["ablation"][SHARED_ONLY] if "ablation" in result.outcomes else None
    versus = ""
    if shared is not None:
        d0 = s.difference(o[small], shared)
        versus = f" Twin with the smallest router − the shared expert = {d0} ({verdict(d0)})."
    return Claim(
        f"{result.name} track: a small router set suffices ({small} per task within ±{MARGIN:g} points of {large})",
        within_margin(d),
        f"Twin-Merging with a router trained on {small} vs {large} labeled validation examples per task: {d} points."
        f"{versus} Router accuracy on the test inputs: {accuracy}.",
        "the shared expert alone (no router)")


def _unseen_claim(result: TwinTrackResult) -> Claim | None:
    o, s = result.outcomes.get("unseen") or {}, result.scored("unseen")
    if TWIN not in o:
        return None
    d = s.difference(o[TWIN], o[SHARED_ONLY])
    d0 = s.difference(o[SHARED_ONLY], o[B.PRETRAINED])
    unseen = ", ".join(o[TWIN])
    return Claim(
        f"{result.name} track: on unseen tasks ({unseen}) Twin-Merging falls back to about its shared expert "
        f"(within ±{MARGIN:g} points)",
        within_margin(d),
        f"Shared expert and router built on {result.tables['unseen']['built on'].iloc[0]} only. Twin − shared expert on the unseen tasks = "
        f"{d} points; shared expert − θ0 + heads there = {d0} ({verdict(d0)}).",
        "the shared expert built without those tasks")


def _flop_bound(table: pd.DataFrame) -> str:
    """What the matrix work allows: per-input / low-rank in FLOPs, the speed-up the low-rank path
    would show if every product ran at the same rate; and, when the measured ratio exceeds it,
    that the rest is the per-input path's overhead. (A table from before the FLOP count had
    none: nothing is said.)"""
    if "× low-rank (FLOPs)" not in table:
        return ""
    flops, measured = table.loc[PER_INPUT, "× low-rank (FLOPs)"], table.loc[PER_INPUT, "× low-rank"]
    text = (f"In matrix work per input (FLOPs, torch's FlopCounterMode on the first batch) per-input "
            f"materialisation costs {flops:.1f}× the low-rank path: the speed-up the low-rank path would show "
            f"if every product ran at the same rate, and no more than about that is reachable by doing less "
            f"arithmetic. ")
    if measured > flops:
        text += (f"The measured {measured:.1f}× exceeds it: the rest is the per-input path's overhead (a "
                 f"model materialised and run for each input), not its arithmetic. ")
    return text


def _speed_claim(result: TwinTrackResult, top_k: int) -> Claim:
    table, o, s = result.tables["stream"], result.outcomes["stream"], result.scored("stream")
    fast = speedup(table, PER_INPUT, LOW_RANK)
    d = s.difference(o[LOW_RANK], o[PER_INPUT])
    same = verdict(d) == "within noise" or (s.official and abs(d.value) < ROUNDING)
    if fast.value - 2 * fast.se >= SPEEDUP and same:
        outcome = "held"
    elif fast.value + 2 * fast.se < SPEEDUP or not same:
        outcome = "did not hold"
    else:
        outcome = "inconclusive (within noise of 10×)"
    k = _top_k_name(LOW_RANK, top_k) if _top_k_name(LOW_RANK, top_k) in table.index else None
    topk = ""
    if k:
        score = f"{table.loc[k, 'score']:.1f}" if s.official else f"{table.loc[k, 'accuracy']:.1f}%"
        topk = (f" Top-{top_k} routing: {s.measure} {score} on the low-rank path (same cost), "
                f"per-input materialisation {table.loc[_top_k_name(PER_INPUT, top_k), 'ms per input']:.1f} ms.")
    return Claim(
        f"{result.name} track: on the mixed stream the low-rank path serves inputs ≥ {SPEEDUP:g}× faster than "
        "per-input materialisation at the same accuracy",
        outcome,
        f"Per-input / low-rank = {fast.plain()}× ({table.loc[PER_INPUT, 'ms per input']:.1f} vs "
        f"{table.loc[LOW_RANK, 'ms per input']:.1f} ms per input, {int(table.loc[LOW_RANK, 'inputs'])} inputs); {s.measure} "
        f"low-rank − per-input = {d} points. {_flop_bound(table)}The low-rank path costs "
        f"{table.loc[LOW_RANK, '× static']:.2f}× the static "
        f"merge, grouped {table.loc[GROUPED, '× static']:.2f}×; every Twin path also runs the routing pass (the static "
        f"forward and the router MLP, {table.loc[ROUTER, 'ms per input']:.2f} ms).{topk}",
        "the static merge (the shared model, one forward per batch)")


def findings(results: dict[str, TwinTrackResult], config: TwinMergingConfig | None = None) -> str:
    """The verdicts of notebook 05, computed from its results; each with an uncertainty and its trivial baseline."""
    config = config or TwinMergingConfig()
    claims, notes = [], []
    for result in results.values():
        claims += [_main_claim(result), _ablation_claim(result), _rank_claim(result, config.rank_ratio),
                   _router_claim(result)]
        unseen = _unseen_claim(result)
        if unseen is not None:
            claims.append(unseen)
        claims.append(_speed_claim(result, config.top_k))
        notes += [n for n in result.notes if n]
    notes.append("The router is trained on validation examples only and its epoch chosen on a held-out part of the "
                 "validation split; the authors train it on training examples and choose the epoch on the test split.")
    notes.append("The shared expert is Task Arithmetic with λ chosen on validation (the authors fix 0.29); "
                 "1-D tensors and BatchNorm statistics are merged densely with the router's weights "
                 "(lib.merging.twin_merging).")
    for name, result in results.items():
        if result.scored("main").official:
            notes.append(f"{name}: each task scored by its official GLUE score (Matthews, F1 and accuracy, Pearson "
                         "and Spearman of STS-B's scalar output), normalized = score / the expert's × 100 on the same "
                         "examples; standard errors by a seeded paired bootstrap over test examples "
                         f"({result.scored('main').resamples} draws). On the stream, official scores of the two exact "
                         f"paths within {ROUNDING:g} points count as the same (float rounding in STS-B's outputs).")
    preamble = (_paper_preamble(results) if _scale(results) == "paper"
                else "*Small-scale numbers (MiniLM-L6 text track, CIFAR ResNet-20 vision track); not the papers' "
                "numbers.* ") + ("Differences: paired over the same test examples, ± one standard error; a verdict needs 2 SE. "
                f"\"About the same\" means the difference ± 2 SE lies within ±{MARGIN:g} points. The main table uses "
                "the full test sets; the sweeps one seeded subset of them; the speed claim the served prefix of the "
                "mixed stream (times: mean ± SE over its batches).")
    return findings_markdown("Findings: Twin-Merging", claims, preamble, notes)


def _paper_preamble(results: dict[str, TwinTrackResult]) -> str:
    """What the paper-scale run is, per kind of track."""
    kinds = ["RoBERTa-base on GLUE with the published experts and their own heads (official GLUE scores)"
             if r.scored("main").official else "CLIP with the published experts on the papers' vision tasks"
             for r in results.values()]
    return f"*Paper scale: {'; '.join(dict.fromkeys(kinds))}.* "


# ----------------------------------------------------------------------------- summaries
def summary(table: pd.DataFrame) -> pd.DataFrame:
    """The wide main table: rows × tasks (accuracy), average and normalized score."""
    return B.summary(table)


def task_count_table(results: dict[str, TwinTrackResult]) -> pd.DataFrame:
    frames = [r.tables["task_count"].assign(track=name) for name, r in results.items()]
    wide = pd.concat(frames).pivot_table(index=["track", "tasks"], columns="row", values="normalized", sort=False)
    lambdas = pd.concat(frames).groupby(["track", "tasks"], sort=False)["shared_lambda"].first()
    return wide.assign(**{"λ of the shared expert": lambdas}).round(2)


# ----------------------------------------------------------------------------- figures
def _log_x(ax) -> None:
    """A log x axis, where the axis shows some finite point (matplotlib cannot log-scale an empty
    axis, which an experiment whose scores are all undefined leaves)."""
    points = [line.get_xydata() for line in ax.get_lines()]
    if any(np.isfinite(xy).all(axis=1).any() for xy in points if len(xy)):
        ax.set_xscale("log")


def _scale(results: dict[str, TwinTrackResult]) -> str:
    """"small" or "paper" (a run is one or the other; tests' results without a setup are small)."""
    scales = {r.setup.track.scale for r in results.values() if r.setup is not None}
    return "/".join(sorted(scales)) or "small"


def plot_normalized(results: dict[str, TwinTrackResult]):
    """Normalized score of every row of the main table, per track; Twin-Merging highlighted."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items()):
        t = result.tables["main"]
        norm = t.groupby("method", sort=False)["normalized"].mean().drop(B.EXPERTS, errors="ignore")
        colors = ["crimson" if row == TWIN else "#777777" if row in (B.PRETRAINED, B.MULTITASK) else "C0"
                  for row in norm.index]
        ax.barh(norm.index[::-1], norm.values[::-1], color=colors[::-1])
        for y, v in enumerate(norm.values[::-1]):
            ax.text(v + 1, y, f"{v:.1f}", va="center", fontsize=8)
        ax.axvline(100, color="black", lw=0.8, ls="--")
        ax.set_xlim(0, 115)
        ax.set_xlabel("normalized score (% of the experts)")
        ax.set_title(f"{name} track ({t.task.nunique()} tasks), {_scale(results)} scale")
    fig.tight_layout()
    return fig


def plot_ablation(results: dict[str, TwinTrackResult]):
    """Shared only, exclusive only, both; and the unseen tasks: Twin vs its shared expert."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    width = 0.8 / len(results)
    for i, (name, result) in enumerate(results.items()):
        a = result.tables["ablation"]
        x = np.arange(len(a))
        axes[0].bar(x + i * width, a["normalized"], width, yerr=2 * a["normalized SE"], capsize=3, label=name)
        axes[0].set_xticks(x + width * (len(results) - 1) / 2, [r.replace(" (", "\n(") for r in a.index], fontsize=8)
        u = result.tables.get("unseen")
        if u is not None and len(u):
            xu = np.arange(len(u))
            axes[1].bar(xu + i * width, u["normalized"], width, yerr=2 * u["normalized SE"], capsize=3, label=name)
            axes[1].set_xticks(xu + width * (len(results) - 1) / 2, [r.replace(" of", "\nof") for r in u.index], fontsize=8)
    axes[0].set_title(f"ablation (sweep subset, {_scale(results)} scale)")
    axes[1].set_title(f"unseen tasks: built without them ({_scale(results)} scale)")
    for ax in axes:
        ax.axhline(100, color="black", lw=0.8, ls="--")
        ax.set_ylabel("normalized score ± 2 SE")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_rank(results: dict[str, TwinTrackResult]):
    """Normalized score against rank ratio, and against storage with one model and the experts as references."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 3.6 * len(results)), squeeze=False)
    for (ax_r, ax_s), (name, result) in zip(axes, results.items()):
        t = result.tables["rank"]
        swept = t[t.rank_ratio > 0]
        experts = round(t["experts bytes"].iloc[0] / t["one model bytes"].iloc[0])
        ax_r.errorbar(swept.rank_ratio, swept.normalized, yerr=2 * swept["normalized SE"], marker="o", capsize=3)
        _log_x(ax_r)  # before the reference lines, which are finite whatever the scores
        ax_r.axhline(t.normalized.iloc[0], color="grey", ls=":", label="shared expert only (rank 0)")
        ax_r.set_xlabel("rank ratio r / min(m, n)")
        mib = 2 ** 20
        ax_s.errorbar(t.total_bytes / mib, t.normalized, yerr=2 * t["normalized SE"], marker="o", capsize=3)
        _log_x(ax_s)
        ax_s.axvline(t["one model bytes"].iloc[0] / mib, color="grey", ls=":", label="one model")
        ax_s.axvline(t["experts bytes"].iloc[0] / mib, color="black", ls="--", label=f"the {experts} experts")
        ax_s.set_xlabel("storage, shared model + exclusive parts (MiB)")
        for ax in (ax_r, ax_s):
            ax.set_ylabel("normalized score ± 2 SE")
            ax.set_title(f"{name}: rank sweep ({_scale(results)} scale)")
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_task_counts(results: dict[str, TwinTrackResult]):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.6), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items()):
        t = result.tables["task_count"]
        for row, g in t.groupby("row", sort=False):
            ax.errorbar(g.tasks, g.normalized, yerr=2 * g["normalized SE"], marker="o", capsize=3, label=row)
        ax.set_xticks(sorted(t.tasks.unique()))
        ax.set_xlabel("number of tasks merged (the first k)")
        ax.set_ylabel("normalized score ± 2 SE")
        ax.set_title(f"{name}: number of tasks ({_scale(results)} scale)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_router(results: dict[str, TwinTrackResult]):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for name, result in results.items():
        t = result.tables["router"]
        axes[0].errorbar(t.used_min, t.router_accuracy, yerr=2 * t.router_accuracy_SE, marker="o", capsize=3, label=name)
        axes[1].errorbar(t.used_min, t.normalized, yerr=2 * t["normalized SE"], marker="o", capsize=3, label=name)
    axes[0].set_ylabel("router accuracy on test inputs (%) ± 2 SE")
    axes[1].set_ylabel("Twin-Merging normalized score ± 2 SE")
    for ax in axes:
        _log_x(ax)
        ax.set_xlabel("labeled validation examples per task (fewest over tasks)")
        ax.set_title(f"router labeled-set size ({_scale(results)} scale)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_stream(results: dict[str, TwinTrackResult]):
    """Milliseconds per input of every path on the mixed stream, with its accuracy."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 3.8), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items()):
        t = result.tables["stream"]
        column = B.score_column(t)  # accuracy, or GLUE's official score
        ax.barh(t.index[::-1], t["ms per input"][::-1], xerr=2 * t["SE (ms)"][::-1].fillna(0), capsize=3,
                color=["crimson" if p == LOW_RANK else "C0" for p in t.index[::-1]])
        for y, (p, r) in enumerate(list(t.iterrows())[::-1]):
            shown = f"acc. {r[column]:.1f}%" if column == "accuracy" else f"score {r[column]:.1f}"
            label = f"{r['ms per input']:.2f} ms" + (f", {shown}" if pd.notna(r.get(column)) else "")
            right = r["ms per input"] + 2 * (0 if pd.isna(r["SE (ms)"]) else r["SE (ms)"])  # past the error bar
            ax.text(right * 1.15, y, label, va="center", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("ms per input ± 2 SE (log)")
        ax.set_title(f"{name}: mixed stream, {int(t['inputs'].iloc[0])} inputs ({_scale(results)} scale)")
    fig.tight_layout()
    return fig


def combined(results: dict[str, TwinTrackResult], key: str) -> pd.DataFrame:
    """One experiment's table of every track, the track as the first index level."""
    frames = {name: r.tables[key] for name, r in results.items() if key in r.tables and len(r.tables[key])}
    return pd.concat(frames, names=["track"]).round(2) if frames else pd.DataFrame()
