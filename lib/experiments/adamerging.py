"""The AdaMerging and Representation Surgery study: everything ``notebooks/02_adamerging.ipynb`` runs.

    config = AdaMergingConfig(...)                 # the notebook's parameters
    study = run_track("vision", config)            # baselines, AdaMerging runs, Surgery, evaluation
    main_table({"vision": study}), paper_table(...), cost_table(...)
    findings({"vision": study}, config)            # the verdicts, as Markdown

**What is compared.** Notebook 01's rows come from notebook 01's own code (``baselines``): θ0
with the experts' heads, the experts, the multi-task model, weight averaging, Task Arithmetic,
TIES, Fisher and RegMean, their λ chosen on validation by ``selection.select``. Notebook 01's
config is built from this one (``AdaMergingConfig.baselines_config``), so its cached experts,
statistics and predictions are found again. On top of them (METHODS.md §2, §6):

- **AdaMerging** task-wise, task-wise++, layer-wise and layer-wise++ (``lib.merging.adamerge``):
  coefficients start at 0.3, clamped to [0, 1], Adam, entropy of each task's frozen head on
  **unlabeled test inputs**: the paper's protocol, which adapts on the very inputs it reports on.
  Labels are never in the loss. They are read only to *report* the cross-entropy of the
  logits that the step's own forward produced (``LogitRecorder``: no extra forward).
- **The honest variant**: the same layer-wise adaptation on the *validation* inputs, through a
  ``ValidationOnly`` view of the track (reading test raises), evaluated on test.
- **Representation Surgery** (``lib.merging.train_surgery``) on WA, TA, TIES and layer-wise
  AdaMerging: one adapter per task on the frozen merged encoder's features, L1 to that task's
  expert's features on the unlabeled test inputs. Both feature sets are computed once and
  looked up, so Surgery runs the paper's 500 iterations of 2 × 16 per task on every track.
- **Amount of unlabeled data**: layer-wise AdaMerging on 0.1%, 1%, 5% and 100% of each task's
  test inputs (a seeded random subset chosen without labels, at least one example; smaller
  fractions are nested in larger ones).
- **Unseen tasks**: the last ``unseen_tasks`` tasks of a track are held out (by default irony and
  offensive on text, KMNIST and MNIST-M on vision; the paper holds out 2 of its 8); Task Arithmetic
  (λ on the seen tasks' validation data) and layer-wise AdaMerging merge and adapt on the seen
  tasks only; both are evaluated on all tasks; AdaMerging's gain over TA is compared on seen
  and unseen tasks.
- **Cost**: wall time and peak resident memory of every step (Linux VmHWM, reset after each
  step, so a flat curve means nothing accumulates), next to the closed-form merges.

AdaMerging has no hyper-parameter tuned here: the paper fixes them (init 0.3, Adam lr 1e-3,
2 batches of 16 per task). What differs is the number of steps (below).

**Budget (small scale).** Target: the notebook runs cold in under ~45 minutes on 2 CPU cores
once notebook 01 has run (its experts, statistics and predictions cached). Measured before
choosing the defaults (wall time of 4-6 ``adamerge`` steps on the real tracks' test inputs, random
task vectors, 2 batches of 16 per task, *one* thread while another job held both cores): a text
step (8 tasks, MiniLM-L6) took 15-20 s, a vision step (4 tasks, ResNet-20) 0.6 s, and encoding ran
at 37 text examples/s. Notebook 01's committed run (its run.json: 775 s to evaluate ≈ 11 text
models) encoded about 100 text examples/s on 2 free cores, so the contended figures are about
2.7× slow: ≈ 6.3 s per text step and ≈ 0.25 s per vision step on
2 free cores, and ≈ 75 s to encode a text track's test sets (≈ 7,100 examples) once.

- Text, fixed costs: 14 encodings (4 main, 1 honest, 3 fractions, 2 unseen-task models, the
  features of WA, TA and TIES for Surgery, the experts) ≈ 1,050 s; choosing the unseen-task TA's λ
  on the seen tasks' validation subsets (new predictions, ≈ 8,000 examples) ≈ 80 s; warm
  closed-form merges and loading ≈ 200 s: ≈ 1,330 s. Adaptation: 4 main runs + 1 honest + the
  fractions (≈ 1.7 runs: 0.1% and 1% have batches smaller than 16) + the unseen run (0.75: 6 of 8
  tasks) ≈ 7.5 runs × N × 6.3 s ≈ 47·N s.
- Vision: 7.5 runs × 100 steps × 0.25 s ≈ 190 s, plus the paper-budget check (task-wise and
  layer-wise at 500 steps) ≈ 250 s, plus encodings, merges and Surgery ≈ 100 s: ≈ 540 s.
- 2,700 s − 1,330 s − 540 s leaves ≈ 830 s for text adaptation, N ≤ 17. N = 12 (≈ 560 s) keeps a
  margin for the guessed contention factor: total ≈ 2,430 s ≈ 41 minutes.

So the default budgets are **12 steps on text and 100 on vision, against the paper's 500**.
Adam moves a coefficient by about lr per step, so a budget of N steps at the paper's lr could
move it only N/500 as far: with ``scale_lr_to_budget`` (default) the lr is lr × 500/N, the same
total reach (a deviation, stated in the findings). The ``paper_budget_track`` (vision) runs
task-wise and layer-wise again at the paper's budget (500 steps, 2 × 16 per task, lr 1e-3), which
checks both the main conclusion and the scaled small budget. Without notebook 01's cache the
closed-form rows cost what they cost there (its text merges and their selection took ~26 minutes).
Caches written here: each AdaMerging run's coefficients and per-step record, and every evaluated
model's test features (text: ≈ 11 MB per model).
"""
from __future__ import annotations

import dataclasses
import math
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import merging
from ..functional import batchnorm_layers, to_device
from ..heads import head_module
from ..metrics import accuracy, official_metric
from . import baselines as B
from .baselines import EXPERTS, MULTITASK, PRETRAINED, BaselinesConfig, MergeResult, Setup
from .cache import cached_tensors, content_hash
# cost.py's way of reading and resetting the peak resident set (its measured_call does the same
# around one call; StepMeter below needs it between the steps of one call).
from .cost import reset_peak, status_kib, measured_call, release_freed_memory
from .findings import (Claim, Estimate, difference_of_estimates, findings_markdown, held, mean_accuracy,
                       paired_difference, verdict)
from .selection import ValidationOnly
from .tracks import Track
from .training import encode, reestimate_on_training_data, run_device_of

# ----------------------------------------------------------------------------- names and the paper
TASK_WISE = "AdaMerging task-wise"
TASK_WISE_PP = "AdaMerging++ task-wise"
LAYER_WISE = "AdaMerging layer-wise"
LAYER_WISE_PP = "AdaMerging++ layer-wise"
ADAMERGING_ROWS = (TASK_WISE, TASK_WISE_PP, LAYER_WISE, LAYER_WISE_PP)
# The closed-form merges of the main table (lib.merging.REGISTRY names) and those Surgery builds on.
CLOSED_FORM = ("weight_average", "task_arithmetic", "ties", "fisher", "regmean")
TA = merging.REGISTRY["task_arithmetic"].label
SURGERY_BASES = ("Weight averaging", TA, "TIES", LAYER_WISE)
PAPER_STEPS = 500  # the authors' number of adaptation steps (and of Surgery iterations)


def surgery_row(merge: str) -> str:
    return f"{merge} + Surgery"


def honest_row() -> str:
    return f"{LAYER_WISE}, adapted on validation inputs"


def fraction_row(fraction: float) -> str:
    return LAYER_WISE if fraction == 1.0 else f"{LAYER_WISE}, {100 * fraction:g}% of the test inputs"


def budget_row(name: str, steps: int) -> str:
    return f"{name}, {steps} steps"


SEEN_TA = f"{TA} on the seen tasks"
SEEN_ADA = f"{LAYER_WISE} on the seen tasks"

# Published average accuracy (%), CLIP ViT-B/32 on 8 vision tasks (METHODS.md §2 and §7).
PAPER_VIT_B32 = {
    PRETRAINED: 48.0, EXPERTS: 90.5, MULTITASK: 88.9, "Weight averaging": 65.8, "Fisher": 68.3, "RegMean": 71.8,
    TA: 69.1, "TIES": 72.4, TASK_WISE: 71.1, TASK_WISE_PP: 73.7, LAYER_WISE: 80.1, LAYER_WISE_PP: 81.1,
    surgery_row("Weight averaging"): 80.0, surgery_row(TA): 80.9, surgery_row("TIES"): 83.2,
    surgery_row(LAYER_WISE): 86.1,
}
PAPER_LABEL = "paper, CLIP ViT-B/32"


# ----------------------------------------------------------------------------- the configuration
# Notebook 01's fields that notebook 02 does not use (it runs neither DARE nor gradient matching
# nor the seed spread); every other field of BaselinesConfig is a field here too (a test checks).
NOT_SHARED = ("spread_seeds", "dare_drop_rate", "dare_seed", "gradient_matching_scale")

# The paper scale (scale="paper"): notebook 01's paper profile (CLIP on the 8 vision tasks,
# published experts) and the authors' full budget of 500 steps, which makes the separate
# paper-budget check redundant.
# One backward per input batch there: all 8 tasks' 2 × 16 images at once need 126 GiB for
# ViT-L/14 (``make bench-gpu-paper``), one batch's activations at a time far less.
PAPER_SCALE = {**B.PAPER_SCALE, "vision_adamerging_steps": PAPER_STEPS, "paper_budget_track": "",
               "adamerging_per_batch_backward": True}


@dataclass
class AdaMergingConfig(B.StatisticsSettings):
    """Every setting of notebook 02. The fields are its papermill parameters: notebook 01's track,
    expert and merge settings (``TrackSettings``, ``StatisticsSettings``: same names, same defaults,
    so the experts and merges notebook 01 cached are reused), then AdaMerging's and Surgery's."""

    paper_profile: ClassVar[dict] = PAPER_SCALE

    # AdaMerging (METHODS.md §2): the paper's settings except the number of steps (module docstring)
    text_adamerging_steps: int = 12
    vision_adamerging_steps: int = 100
    adamerging_batch_size: int = 16
    adamerging_batches_per_step: int = 2
    adamerging_lr: float = 1e-3
    adamerging_init: float = 0.3
    adamerging_per_batch_backward: bool = False  # the same gradient, one batch's activations at a time
    scale_lr_to_budget: bool = True  # lr × 500/steps below the paper's 500 steps: the same reach
    paper_budget_track: str = "vision"  # runs task-wise and layer-wise at paper_budget_steps; "" = none
    paper_budget_steps: int = PAPER_STEPS
    data_fractions: tuple[float, ...] = (0.001, 0.01, 0.05, 1.0)
    unseen_tasks: int = 2            # the last tasks of each track, held out of merging and adaptation
    # Representation Surgery (the authors' settings)
    surgery_steps: int = PAPER_STEPS
    surgery_rank: int = merging.surgery.RANK
    surgery_lr: float = 1e-3
    progress: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.paper_budget_track not in ("", *self.tracks):
            raise ValueError(f"paper_budget_track={self.paper_budget_track!r}: name one of tracks {list(self.tracks)}, "
                             "or '' for none.")
        if not self.data_fractions or any(not 0 < f <= 1 for f in self.data_fractions):
            raise ValueError(f"data_fractions={self.data_fractions}: give fractions in (0, 1], e.g. [0.01, 1.0].")
        for name in ("text_adamerging_steps", "vision_adamerging_steps", "adamerging_batch_size",
                     "adamerging_batches_per_step", "paper_budget_steps", "surgery_steps", "surgery_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: pass a positive integer.")
        if self.unseen_tasks < 0:
            raise ValueError(f"unseen_tasks={self.unseen_tasks}: pass 0 (no unseen-task study) or more.")

    def steps_for(self, track: str) -> int:
        return getattr(self, f"{track}_adamerging_steps")

    def lr_for(self, steps: int) -> float:
        """The Adam lr of an N-step run: the paper's lr, times 500/N below 500 steps when
        ``scale_lr_to_budget`` (Adam moves a coefficient by about lr per step)."""
        if self.scale_lr_to_budget and steps < PAPER_STEPS:
            return self.adamerging_lr * PAPER_STEPS / steps
        return self.adamerging_lr


# ----------------------------------------------------------------------------- unlabeled inputs
def _task_seed(task: str) -> int:
    """A stable number for a task name (Python's hash() changes from run to run)."""
    return zlib.crc32(task.encode())


def fraction_of(n: int, fraction: float, seed: int, task: str = "") -> np.ndarray:
    """Indices of a seeded random ``fraction`` of n inputs, at least one, sorted. Chosen from
    the count alone (no labels are looked at); smaller fractions are nested in larger ones."""
    if n < 1:
        raise ValueError("no inputs to take a fraction of")
    k = min(n, max(1, int(round(fraction * n))))
    return np.sort(np.random.default_rng([seed, _task_seed(task)]).permutation(n)[:k])


def input_stream(pools: Mapping[str, np.ndarray], batch_size: int, batches_per_step: int,
                 seed: int) -> Callable[[int], dict[str, list[np.ndarray]]]:
    """``stream(step)`` -> {task: ``batches_per_step`` arrays of indices from that task's pool}.

    An epoch-wise shuffled stream: every pass visits each index of the pool once, and a pool
    smaller than a batch gives batches of the whole pool. A pure function of (step, seed), so
    the adaptation and whatever reports on it draw the same batches."""
    def stream(step: int) -> dict[str, list[np.ndarray]]:
        out = {}
        for task, pool in pools.items():
            size = min(batch_size, len(pool))
            per_epoch = len(pool) // size
            batches = []
            for j in range(step * batches_per_step, (step + 1) * batches_per_step):
                epoch, k = divmod(j, per_epoch)
                order = np.random.default_rng([seed, _task_seed(task), epoch]).permutation(len(pool))
                batches.append(pool[order[k * size:(k + 1) * size]])
            out[task] = batches
        return out
    return stream


def unlabeled(split, indices) -> dict[str, torch.Tensor]:
    """The model inputs of some examples of a split, without their labels (never read here)."""
    return split.collate(split, np.asarray(indices))


# ----------------------------------------------------------------------------- measuring steps
class StepMeter:
    """Wall time and peak resident memory of each step.

    The peak is the process's high-water mark (Linux VmHWM) during the step, minus the resident
    set at the start of the run; the mark is reset after every step, so a step that holds on to
    an earlier step's memory shows as a rising curve. NaN where ``/proc`` is unavailable."""

    def __init__(self):
        release_freed_memory()
        self.base_kib = reset_peak()
        self.started = time.perf_counter()

    def lap(self) -> tuple[float, float]:
        now = time.perf_counter()
        seconds, self.started = now - self.started, now
        if self.base_kib is None:
            return seconds, float("nan")
        peak = (status_kib("VmHWM") - self.base_kib) / 1024
        reset_peak()
        return seconds, peak


class LogitRecorder:
    """Each task's frozen head, wrapped to keep (detached) the logits of the step's forward.

    ``heads[task]`` is what ``adamerge`` calls; ``take()`` returns and clears {task: [logits of
    each batch]}. So the cross-entropy is reported at the very θ(λ) and on the very inputs the
    entropy was measured on, without a second forward. The heads' parameters require no grad:
    the gradient reaches only the features, then the coefficients."""

    def __init__(self, head_states: Mapping[str, dict], device: torch.device = torch.device("cpu")):
        self.modules = {t: head_module(state).to(device) for t, state in head_states.items()}
        self.logits: dict[str, list[torch.Tensor]] = {}
        self.heads = {t: self._recording(t) for t in head_states}

    def _recording(self, task):
        def head(features):
            logits = self.modules[task](features)
            self.logits.setdefault(task, []).append(logits.detach())
            return logits
        return head

    def take(self) -> dict[str, list[torch.Tensor]]:
        logits, self.logits = self.logits, {}
        return logits


# ----------------------------------------------------------------------------- adaptation
@dataclass(frozen=True)
class Variant:
    """One AdaMerging run's recipe."""

    name: str                     # its row in the tables
    layerwise: bool
    steps: int
    lr: float
    plus: bool = False            # AdaMerging++: TIES-trimmed, sign-agreeing task vectors
    split: str = "test"           # whose unlabeled inputs it adapts on
    fraction: float = 1.0         # of each task's inputs in that split
    tasks: tuple[str, ...] = ()   # the tasks merged and adapted on; () = all of the track's
    batchnorm: str = "stored"     # "batch": BatchNorm on each batch's statistics, then re-estimated


@dataclass
class Adapted:
    """What one AdaMerging run learned and what it cost."""

    variant: Variant
    tasks: list[str]              # merged and adapted, in the order of the coefficients' rows
    keys: list[str]               # the tensors of the layer-wise columns
    coefficients: torch.Tensor    # clamped: (T,) task-wise or (T, K) layer-wise
    history: pd.DataFrame         # step, task, entropy, cross_entropy (mean over the step's batches)
    seconds: np.ndarray           # per step
    peak_mib: np.ndarray          # per step
    examples: dict[str, int]      # unlabeled inputs per task it drew from
    state: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)  # θ(λ), a full encoder state


@dataclass
class TrackContext:
    """What every step of one track's study shares."""

    track: Track
    setup: Setup
    config: AdaMergingConfig
    base: BaselinesConfig
    encoder: torch.nn.Module      # a θ0 module, reused: its weights are never used where θ(λ) has a key


def task_vectors_for(ctx: TrackContext, tasks: Sequence[str], plus: bool) -> tuple[dict, list[dict]]:
    """(θ0, τ's) over the mergeable keys: plain, or TIES-processed for AdaMerging++; keys no
    expert of ``tasks`` changed are left out (they would get useless coefficients)."""
    pre = ctx.setup.restrict(ctx.setup.pretrained)
    fts = [ctx.setup.restrict(ctx.setup.experts[t].encoder) for t in tasks]
    taus = (merging.ties_task_vectors(pre, fts, ctx.config.ties_density) if plus
            else merging.task_vectors(pre, fts))
    return pre, merging.without_frozen(taus)


def _adaptation_spec(ctx: TrackContext, variant: Variant, tasks: list[str], report: bool) -> dict:
    c = ctx.config
    recipe = {k: v for k, v in dataclasses.asdict(variant).items() if k != "name"}  # the name is only a label
    if recipe["batchnorm"] == "stored":  # a setting added later enters the key only when not its default
        del recipe["batchnorm"]
    return {**ctx.track.identity(tasks), "variant": recipe,
            "tasks": tasks, "init": c.adamerging_init, "batch_size": c.adamerging_batch_size,
            "batches_per_step": c.adamerging_batches_per_step, "ties_density": c.ties_density, "seed": c.seed,
            "experts": {t: content_hash(ctx.setup.experts[t].encoder) for t in tasks},
            "heads": {t: content_hash(ctx.setup.heads[t]) for t in tasks}, "cross_entropy_reported": report,
            # same gradient, other float rounding; like batchnorm, in the key only when not the default
            **({"per_batch_backward": True} if c.adamerging_per_batch_backward else {})}


def adapt(ctx: TrackContext, variant: Variant, data=None, report_labels: bool = True) -> Adapted:
    """Run (or load from the cache) one AdaMerging variant.

    ``data`` is what the inputs are read through: the track, or ``ValidationOnly(track)`` for the
    honest variant (reading test through it raises). Inputs are read without labels; with
    ``report_labels`` the labels of the same examples are read afterwards, only to report the
    cross-entropy of the logits the step produced."""
    data = ctx.track if data is None else data
    tasks = list(variant.tasks or ctx.track.tasks)
    splits = {t: data.split(t, variant.split) for t in tasks}
    pools = {t: fraction_of(len(s), variant.fraction, ctx.config.seed, t) for t, s in splits.items()}
    pre, taus = task_vectors_for(ctx, tasks, variant.plus)
    keys = merging.learned_keys(pre, taus)

    def compute():
        return _run_adamerging(ctx, variant, tasks, splits, pools, pre, taus, report_labels)

    code = (_run_adamerging, _mean_over_batches, input_stream, fraction_of, merging.adamerge, merging.merged_state,
            merging.entropy_objective, merging.entropy_backward_per_batch, merging.ties_task_vectors, LogitRecorder)
    stored = cached_tensors(f"adamerging/{ctx.track.name}", _adaptation_spec(ctx, variant, tasks, report_labels),
                            compute, code=code)
    coefficients = stored["coefficients"]
    with torch.no_grad():
        state = ctx.setup.complete(merging.merged_state(pre, taus, coefficients))
    if variant.batchnorm == "batch":  # adapted on batch statistics: evaluated with statistics that fit it
        state = reestimate_on_training_data(ctx.encoder, state, ctx.track, tasks)
    steps = len(stored["seconds"])
    history = pd.DataFrame({"step": np.repeat(np.arange(steps), len(tasks)), "task": tasks * steps,
                            "entropy": stored["entropy"].reshape(-1).numpy(),
                            "cross_entropy": stored["cross_entropy"].reshape(-1).numpy()})
    return Adapted(variant, tasks, keys, coefficients, history, stored["seconds"].numpy(),
                   stored["peak_mib"].numpy(), {t: len(p) for t, p in pools.items()}, state)



def _mean_over_batches(values) -> float:
    """The mean of per-batch means (0-d tensors), as the loss weighs the step's batches."""
    return float(np.mean([float(v) for v in values]))


@torch.no_grad()
def theta0_sharing_encoder(encoder: torch.nn.Module, pre: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """θ0 on the encoder's device, as the encoder's own tensors wherever they hold θ0's values, else
    as copies. The encoder goes to the device anyway, and a second copy of θ0 would cost 1.1 GiB
    on ViT-L/14 (``make bench-gpu-memory``); values are compared, so a changed encoder is not used."""
    own = encoder.state_dict()
    device = run_device_of(encoder)

    def same(key: str, value: torch.Tensor) -> bool:
        mine = own.get(key)
        return (mine is not None and mine.dtype == value.dtype and mine.shape == value.shape
                and torch.equal(mine, value.to(mine.device)))

    return {k: own[k] if same(k, v) else v.to(device) for k, v in pre.items()}


def _run_adamerging(ctx, variant, tasks, splits, pools, pre, taus, report_labels) -> dict[str, torch.Tensor]:
    """One ``adamerge`` run with the per-step report: entropy and (labels read only here)
    cross-entropy of the recorded logits, wall time and peak memory."""
    c = ctx.config
    stream = input_stream(pools, c.adamerging_batch_size, c.adamerging_batches_per_step, c.seed)
    # Paper scale: everything the steps touch on the track's device (the CPU at small scale)
    device = run_device_of(ctx.encoder)
    encoder = ctx.encoder.to(device)
    pre, taus = theta0_sharing_encoder(encoder, pre), [to_device(tau, device) for tau in taus]
    recorder = LogitRecorder({t: ctx.setup.heads[t] for t in tasks}, device)
    entropies, cross_entropies, seconds, peaks = [], [], [], []

    def batches(step):
        return {t: [to_device(unlabeled(splits[t], idx), device) for idx in index_batches]
                for t, index_batches in stream(step).items()}

    def report(step, params, coefficients):
        logits, drawn = recorder.take(), stream(step)
        entropies.append([_mean_over_batches(merging.entropy(z).mean() for z in logits[t]) for t in tasks])
        if report_labels:  # the only place labels are read: after the step's loss and gradient exist
            cross_entropies.append([_mean_over_batches(F.cross_entropy(z, torch.as_tensor(splits[t].labels[idx],
                                                                                          device=z.device))
                                                       for z, idx in zip(logits[t], drawn[t])) for t in tasks])
        else:
            cross_entropies.append([math.nan] * len(tasks))
        s, peak = meter.lap()
        seconds.append(s)
        peaks.append(peak)

    bar = (lambda r: tqdm(r, desc=f"{ctx.track.name}: {variant.name}", leave=False)) if c.progress else None
    meter = StepMeter()
    with torch.autocast(device.type, dtype=getattr(encoder, "autocast_dtype", None),
                        enabled=getattr(encoder, "autocast_dtype", None) is not None):
        result = merging.adamerge(encoder, pre, taus, recorder.heads, batches, steps=variant.steps, lr=variant.lr,
                                  init=c.adamerging_init, layerwise=variant.layerwise, callback=report, progress=bar,
                                  per_batch_backward=c.adamerging_per_batch_backward,
                                  **({"batchnorm": variant.batchnorm} if variant.batchnorm != "stored" else {}))
    encoder.cpu()
    return {"coefficients": result.coefficients, "entropy": torch.tensor(entropies),
            "cross_entropy": torch.tensor(cross_entropies), "seconds": torch.tensor(seconds),
            "peak_mib": torch.tensor(peaks)}


def adapt_on_validation(ctx: TrackContext) -> Adapted:
    """The honest variant: layer-wise AdaMerging on the validation inputs, read through a view of
    the track that raises on any other split, so the adaptation cannot see the test split."""
    steps = ctx.config.steps_for(ctx.track.name)
    variant = Variant(honest_row(), True, steps, ctx.config.lr_for(steps), split="validation")
    return adapt(ctx, variant, data=ValidationOnly(ctx.track))


def main_variants(config: AdaMergingConfig, track: str, steps: int | None = None) -> list[Variant]:
    """Task-wise, task-wise++, layer-wise and layer-wise++ at the track's budget (or ``steps``)."""
    steps = config.steps_for(track) if steps is None else steps
    lr = config.lr_for(steps)
    return [Variant(TASK_WISE, False, steps, lr), Variant(TASK_WISE_PP, False, steps, lr, plus=True),
            Variant(LAYER_WISE, True, steps, lr), Variant(LAYER_WISE_PP, True, steps, lr, plus=True)]


# ----------------------------------------------------------------------------- features and evaluation
def encoder_features(ctx: TrackContext, state: dict, tasks: Sequence[str],
                     split: str = "test") -> dict[str, torch.Tensor]:
    """The encoder's features at ``state`` on each task's ``split`` (cached by the state's content)."""
    state_hash, loaded = content_hash(state), False
    out = {}
    for task in tasks:
        data = ctx.track.split(task, split)
        key = {**ctx.track.identity([task]), "task": task, "split": split, "encoder": state_hash}

        def compute(data=data):
            nonlocal loaded
            if not loaded:
                ctx.encoder.load_state_dict(state)
                loaded = True
            return {"features": encode(ctx.encoder, data)}

        out[task] = cached_tensors(f"features/{ctx.track.name}", key, compute, code=(encode,))["features"]
    if loaded:  # put θ0 back: adaptation reads the module's own tensors for keys θ(λ) lacks
        ctx.encoder.load_state_dict(ctx.setup.pretrained)
    return out


def expert_features(ctx: TrackContext) -> dict[str, torch.Tensor]:
    """Each expert's features on its own task's test inputs (Surgery's targets)."""
    return {t: encoder_features(ctx, ctx.setup.experts[t].encoder, [t])[t] for t in ctx.track.tasks}


def results_from_features(ctx: TrackContext, features: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    """Per task: accuracy, official metric and per-example outcomes of features read by the task's head
    (the same result as ``evaluation.evaluate``, from features already computed)."""
    results = {}
    for task, z in features.items():
        labels = ctx.track.split(task, "test").labels
        with torch.no_grad():
            pred = head_module(ctx.setup.heads[task])(z).argmax(1).numpy()
        n_classes = ctx.track.num_classes(task)
        results[task] = {"accuracy": 100 * accuracy(labels, pred), "correct": pred == labels,
                         "official": 100 * official_metric(ctx.track.metric(task), labels, pred, n_classes),
                         "metric": ctx.track.metric(task)}
    return results


# ----------------------------------------------------------------------------- collapse
# Entropy minimisation has a trivial solution: predict one class, confidently. The rows below
# measure how close each model comes to it (on the unlabeled test inputs it adapted on).
COLLAPSE_ROWS = (PRETRAINED, TA, TASK_WISE, LAYER_WISE)
BN_REESTIMATED = f"{LAYER_WISE}, BatchNorm re-estimated"
BATCH_STATISTICS = f"{LAYER_WISE}, adapted on batch statistics"


def has_batchnorm(model: torch.nn.Module) -> bool:
    return bool(batchnorm_layers(model))


def prediction_profile(features: torch.Tensor, head: dict) -> dict[str, float]:
    """How concentrated a head's predictions are: the share (%) of the inputs given the most
    predicted class, the mean feature norm, and the mean largest |logit|."""
    with torch.no_grad():
        logits = head_module(head)(features)
    pred = logits.argmax(1)
    return {"top-class share": 100 * float(torch.bincount(pred).max()) / len(pred), "inputs": len(pred),
            "feature norm": float(features.norm(dim=1).mean()), "max |logit|": float(logits.abs().amax(1).mean())}


@dataclass
class Collapse:
    """Per row and task, ``prediction_profile``; on a BatchNorm track, layer-wise AdaMerging's
    weights re-evaluated with BatchNorm statistics re-estimated on unlabeled training inputs."""

    profiles: dict[str, dict[str, dict[str, float]]]   # row -> task -> profile
    reestimated: dict[str, np.ndarray] | None          # task -> correct, or None (no BatchNorm)

    def share(self, row: str) -> Estimate:
        """Task-averaged top-class share (%) and its standard error (a proportion per task)."""
        p = np.array([v["top-class share"] / 100 for v in self.profiles[row].values()])
        n = np.array([v["inputs"] for v in self.profiles[row].values()])
        return Estimate(100 * float(p.mean()), 100 * math.sqrt(float((p * (1 - p) / n).sum())) / len(p))

    def mean(self, row: str, key: str) -> float:
        return float(np.mean([v[key] for v in self.profiles[row].values()]))


def collapse_study(ctx: TrackContext, evaluated: "Evaluated", merges: Mapping[str, MergeResult]) -> Collapse:
    """The profiles of θ0, Task Arithmetic and AdaMerging (features already computed, or cached),
    and on a BatchNorm track the BatchNorm-re-estimated evaluation of layer-wise AdaMerging and the
    run adapted on batch statistics."""
    tasks = ctx.track.tasks
    states = {PRETRAINED: ctx.setup.pretrained, TA: merges[TA].state}
    profiles = {}
    for row in (*COLLAPSE_ROWS, *([BATCH_STATISTICS] if BATCH_STATISTICS in evaluated.states else [])):
        features = evaluated.features.get(row) or encoder_features(ctx, states.get(row) or evaluated.states[row], tasks)
        profiles[row] = {ctx.track.display_name(t): prediction_profile(features[t], ctx.setup.heads[t]) for t in tasks}
    reestimated = None
    if has_batchnorm(ctx.encoder):
        adapted_state = evaluated.states[LAYER_WISE]
        state = reestimate_on_training_data(ctx.encoder, adapted_state, ctx.track, tasks)
        features = encoder_features(ctx, state, tasks)
        profiles[BN_REESTIMATED] = {ctx.track.display_name(t): prediction_profile(features[t], ctx.setup.heads[t])
                                    for t in tasks}
        reestimated = evaluated.from_features(BN_REESTIMATED, features)
    return Collapse(profiles, reestimated)


# ----------------------------------------------------------------------------- Surgery
@dataclass
class SurgeryRun:
    merge: str
    history: pd.DataFrame                # step, task, l1
    seconds: float
    peak_mib: float
    features: dict[str, torch.Tensor]    # the corrected test features, per task


def surgery(ctx: TrackContext, merge: str, merged: Mapping[str, torch.Tensor],
            targets: Mapping[str, torch.Tensor]) -> SurgeryRun:
    """Representation Surgery on a frozen merge: one adapter per task, trained with L1 to the
    expert's features on the task's unlabeled test inputs (looked up, precomputed)."""
    c = ctx.config
    pools = {t: np.arange(len(merged[t])) for t in merged}
    stream = input_stream(pools, c.adamerging_batch_size, c.adamerging_batches_per_step, c.seed)

    def batches(step):
        return {t: [{"index": torch.as_tensor(i)} for i in b] for t, b in stream(step).items()}

    def look_up(features):
        return lambda task, inputs: features[task][inputs["index"]]

    bar = (lambda r: tqdm(r, desc=f"{ctx.track.name}: Surgery on {merge}", leave=False)) if c.progress else None
    result, seconds, peak = measured_call(lambda: merging.train_surgery(
        look_up(merged), look_up(targets), batches, steps=c.surgery_steps, lr=c.surgery_lr, rank=c.surgery_rank,
        seed=c.seed, progress=bar))
    history = pd.DataFrame([{"step": h["step"], "task": t, "l1": v}
                            for h in result.history for t, v in h["l1"].items()])
    with torch.no_grad():
        corrected = {t: merging.apply_surgery(result.adapters[t], merged[t]) for t in merged}
    return SurgeryRun(merge, history, seconds, peak, corrected)


# ----------------------------------------------------------------------------- unseen tasks
@dataclass
class Unseen:
    seen: list[str]
    unseen: list[str]
    outcomes: dict[str, dict[str, np.ndarray]]  # SEEN_TA / SEEN_ADA -> task (display name) -> correct
    ta: MergeResult
    adapted: Adapted


def sub_track(track: Track, tasks: Sequence[str]) -> Track:
    """The same track restricted to ``tasks``; it shares the loaded data (the cache dict)."""
    return dataclasses.replace(track, tasks=list(tasks))


def unseen_tasks_study(ctx: TrackContext, evaluate: Callable[[str, dict], dict]) -> Unseen | None:
    """Task Arithmetic and layer-wise AdaMerging over the seen tasks' experts only, each evaluated
    on every task; None when the track has too few tasks to hold ``unseen_tasks`` out."""
    k = ctx.config.unseen_tasks
    tasks = list(ctx.track.tasks)
    if k < 1 or len(tasks) - k < 1:
        return None
    seen, unseen = tasks[:-k], tasks[-k:]
    seen_track = sub_track(ctx.track, seen)
    seen_setup = Setup(seen_track, ctx.setup.pretrained, {t: ctx.setup.heads[t] for t in seen},
                       {t: ctx.setup.experts[t] for t in seen}, None, ctx.setup.mergeable)
    ta = B.closed_form_merges(seen_track, seen_setup, {}, ctx.base, methods=("task_arithmetic",),
                              progress=False)[TA]  # λ chosen on the seen tasks' validation data
    steps = ctx.config.steps_for(ctx.track.name)
    adapted = adapt(ctx, Variant(SEEN_ADA, True, steps, ctx.config.lr_for(steps), tasks=tuple(seen)))
    outcomes = {SEEN_TA: evaluate(SEEN_TA, ta.state), SEEN_ADA: evaluate(SEEN_ADA, adapted.state)}
    return Unseen(seen, unseen, outcomes, ta, adapted)


# ----------------------------------------------------------------------------- one track
@dataclass
class TrackStudy:
    """Everything one track's run produced."""

    name: str
    track: Track
    setup: Setup
    merges: dict[str, MergeResult]
    table: pd.DataFrame                         # long: row × task on test (accuracy, normalized, kind)
    outcomes: dict[str, dict[str, np.ndarray]]  # row -> task -> per-example correct
    adapted: dict[str, Adapted]                 # every AdaMerging run, by row
    surgery: dict[str, SurgeryRun]              # by the merge it builds on
    fractions: dict[float, str]                 # fraction -> its row
    unseen: Unseen | None
    costs: pd.DataFrame
    budget: dict[str, str] = field(default_factory=dict)  # TASK_WISE / LAYER_WISE -> its paper-budget row
    collapse: "Collapse | None" = None          # how concentrated each row's predictions are

    def correct(self, row: str) -> dict[str, np.ndarray]:
        return self.outcomes[row]


class Evaluated:
    """The rows this notebook adds to notebook 01's table: their per-task results, per-example
    outcomes, and the test features each model produced (Surgery reuses them)."""

    def __init__(self, ctx: TrackContext, outcomes: dict[str, dict[str, np.ndarray]]):
        self.ctx, self.outcomes = ctx, outcomes
        self.rows: list[dict] = []
        self.features: dict[str, dict[str, torch.Tensor]] = {}
        self.states: dict[str, dict[str, torch.Tensor]] = {}

    def model(self, row: str, state: dict, kind: str | None = None) -> dict[str, np.ndarray]:
        """Evaluate an encoder state on every task's test split; with ``kind``, as a row of the tables."""
        self.states[row] = state
        self.features[row] = encoder_features(self.ctx, state, self.ctx.track.tasks)
        return self.from_features(row, self.features[row], kind)

    def from_features(self, row: str, features: Mapping[str, torch.Tensor],
                      kind: str | None = None) -> dict[str, np.ndarray]:
        """Score features through each task's head; with ``kind``, record them as a row of the tables."""
        track = self.ctx.track
        results = results_from_features(self.ctx, features)
        correct = {track.display_name(t): r["correct"] for t, r in results.items()}
        if kind is not None:
            self.outcomes[row] = correct
            self.rows += [{"track": track.name, "method": row, "kind": kind, "task": track.display_name(t),
                           "batchnorm": "stored", **{k: v for k, v in r.items() if k != "correct"}}
                          for t, r in results.items()]
        return correct

    def table(self, notebook_01: pd.DataFrame) -> pd.DataFrame:
        """Notebook 01's long table (stored BatchNorm statistics) with these rows, normalized by the experts."""
        table = pd.concat([notebook_01[notebook_01.batchnorm == "stored"], pd.DataFrame(self.rows)], ignore_index=True)
        expert = table[table.method == EXPERTS].set_index("task")["accuracy"]
        return table.assign(normalized=100 * table["accuracy"] / table["task"].map(expert))


def adamerging_runs(ctx: TrackContext,
                    evaluated: Evaluated) -> tuple[dict[str, Adapted], dict[float, str], dict[str, str]]:
    """Every AdaMerging run of a track, each evaluated: the four main variants, the honest
    variant, the data fractions and (on the paper-budget track) task-wise and layer-wise at the
    paper's budget. Returns (runs by row, fraction -> row, method -> its paper-budget row)."""
    config, name = ctx.config, ctx.track.name
    adapted: dict[str, Adapted] = {}

    def run(variant: Variant, kind: str):
        adapted[variant.name] = adapt(ctx, variant)
        evaluated.model(variant.name, adapted[variant.name].state, kind)

    for variant in main_variants(config, name):
        run(variant, "adamerging")
    steps = config.steps_for(name)
    adapted[honest_row()] = adapt_on_validation(ctx)
    evaluated.model(honest_row(), adapted[honest_row()].state, "honest")
    fractions = {}
    for fraction in config.data_fractions:
        fractions[fraction] = fraction_row(fraction)
        if fractions[fraction] not in adapted:  # 100% is the main layer-wise run
            run(Variant(fractions[fraction], True, steps, config.lr_for(steps), fraction=fraction), "fraction")
    if has_batchnorm(ctx.encoder):  # the fix the collapse check points to (Collapse, BATCH_STATISTICS)
        run(Variant(BATCH_STATISTICS, True, steps, config.lr_for(steps), batchnorm="batch"), "batch statistics")
    budget = {}
    if name == config.paper_budget_track:
        for variant in main_variants(config, name, steps=config.paper_budget_steps)[::2]:  # task-wise, layer-wise
            budget[variant.name] = budget_row(variant.name, variant.steps)
            run(dataclasses.replace(variant, name=budget[variant.name]), "paper budget")
    return adapted, fractions, budget


def surgery_runs(ctx: TrackContext, evaluated: Evaluated, merges: Mapping[str, MergeResult]) -> dict[str, SurgeryRun]:
    """Surgery on each of ``SURGERY_BASES``, each evaluated as a row; the merges' test features
    are reused where the merge was already evaluated here, else computed (cached)."""
    targets = expert_features(ctx)
    runs = {}
    for merge in SURGERY_BASES:
        merged = evaluated.features.get(merge)
        if merged is None:  # a closed-form merge: notebook 01 cached its predictions, not its features
            merged = encoder_features(ctx, merges[merge].state, ctx.track.tasks)
        runs[merge] = surgery(ctx, merge, merged, targets)
        evaluated.from_features(surgery_row(merge), runs[merge].features, "surgery")
    return runs


def run_track(name: str, config: AdaMergingConfig, lap=lambda label: None, track: Track | None = None) -> TrackStudy:
    """Notebook 01's rows, then every AdaMerging run, Surgery, the data fractions, the unseen-task
    study and the paper-budget check of one track. ``track``: a track to use instead of the
    config's (tests pass smaller ones)."""
    base = config.baselines_config()
    track = base.track(name) if track is None else track
    expert_config, multitask_config = base.finetune_configs(name, len(track.tasks))
    setup = B.prepare_track(track, expert_config, multitask_config, progress=config.progress)
    stats = B.compute_statistics(track, setup, base, progress=config.progress)
    merges = B.closed_form_merges(track, setup, stats, base, methods=CLOSED_FORM, progress=config.progress)
    table, outcomes = B.evaluate_methods(track, setup, merges, progress=config.progress)
    lap(f"{name}: notebook 01's rows ready")
    ctx = TrackContext(track, setup, config, base, track.pretrained_encoder())
    evaluated = Evaluated(ctx, {row: o for (row, bn), o in outcomes.items() if bn == "stored"})
    adapted, fractions, budget = adamerging_runs(ctx, evaluated)
    lap(f"{name}: AdaMerging runs ready")
    runs = surgery_runs(ctx, evaluated, merges)
    lap(f"{name}: Surgery ready")
    unseen = unseen_tasks_study(ctx, evaluated.model)
    lap(f"{name}: unseen tasks ready")
    collapse = collapse_study(ctx, evaluated, merges)
    costs = _costs(ctx, stats, merges, adapted, runs)
    return TrackStudy(name, track, setup, merges, evaluated.table(table), evaluated.outcomes, adapted, runs, fractions,
                      unseen, costs, budget, collapse)


def _costs(ctx: TrackContext, stats: dict, merges: dict[str, MergeResult], adapted: dict[str, Adapted],
           runs: dict[str, SurgeryRun]) -> pd.DataFrame:
    """Time and peak memory of every method: each closed-form merge re-run once with its chosen
    hyper-parameters; AdaMerging per step (as measured when the run was computed; a cached run
    keeps its measurement); Surgery over all its iterations."""
    names = {merging.REGISTRY[m].label: m for m in CLOSED_FORM}
    pre = ctx.setup.restrict(ctx.setup.pretrained)
    fts = [ctx.setup.restrict(s) for s in ctx.setup.finetuned()]
    rows = []
    for label, result in merges.items():
        _, seconds, peak = measured_call(lambda: B._merge(names[label], pre, fts, stats, ctx.setup,
                                                          **result.hyperparameters))
        rows.append({"method": label, "kind": "closed form", "steps": 1, "seconds per step": seconds,
                     "total seconds": seconds, "peak MiB": peak})
    for row, a in adapted.items():
        rows.append({"method": row, "kind": "AdaMerging", "steps": len(a.seconds),
                     "seconds per step": float(np.median(a.seconds)), "total seconds": float(a.seconds.sum()),
                     "peak MiB": float(np.max(a.peak_mib))})
    for merge, run in runs.items():
        rows.append({"method": surgery_row(merge), "kind": "Surgery", "steps": ctx.config.surgery_steps,
                     "seconds per step": run.seconds / ctx.config.surgery_steps, "total seconds": run.seconds,
                     "peak MiB": run.peak_mib})
    return pd.DataFrame(rows).assign(track=ctx.track.name)


# ----------------------------------------------------------------------------- correlation
@dataclass(frozen=True)
class Correlation:
    """Pearson's r with a 95% confidence interval from Fisher's z (tanh(atanh(r) ± 1.96/√(n−3)))."""

    r: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        if not math.isfinite(self.r):
            return f"r undefined (n = {self.n})"
        return f"r = {self.r:.2f} (95% CI {self.low:.2f} to {self.high:.2f}, n = {self.n})"


Z95 = 1.959964


def _interval(z: float, se: float, n: int) -> Correlation:
    if not math.isfinite(se):
        return Correlation(math.tanh(z) if math.isfinite(z) else math.nan, math.nan, math.nan, n)
    return Correlation(math.tanh(z), math.tanh(z - Z95 * se), math.tanh(z + Z95 * se), n)


def correlation(x: Sequence[float], y: Sequence[float]) -> Correlation:
    """Pearson's r of paired values and its Fisher-z interval (needs n ≥ 4 and both varying)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = len(x)
    if n != len(y):
        raise ValueError(f"{n} values against {len(y)}: pass pairs")
    if n < 4 or x.std() == 0 or y.std() == 0:
        return Correlation(math.nan, math.nan, math.nan, n)
    r = float(np.clip(np.corrcoef(x, y)[0, 1], -1.0, 1.0))
    z = math.atanh(min(max(r, -1 + 1e-12), 1 - 1e-12))
    return _interval(z, 1 / math.sqrt(n - 3), n)


def pooled_correlation(groups: Sequence[tuple[Sequence[float], Sequence[float]]]) -> Correlation:
    """One correlation from several groups (tasks): their Fisher z's averaged with weights n−3,
    SE 1/√Σ(n−3). Correlations within groups only: no between-group difference inflates it."""
    zs, weights, n = [], [], 0
    for x, y in groups:
        c = correlation(x, y)
        if math.isfinite(c.r):
            zs.append(math.atanh(min(max(c.r, -1 + 1e-12), 1 - 1e-12)))
            weights.append(c.n - 3)
            n += c.n
    if not weights:
        return Correlation(math.nan, math.nan, math.nan, n)
    w = np.asarray(weights, dtype=float)
    return _interval(float(np.dot(w, zs) / w.sum()), 1 / math.sqrt(w.sum()), n)


def entropy_correlations(adapted: Adapted) -> tuple[dict[str, Correlation], Correlation]:
    """Per task and pooled: the step's mean entropy against its mean cross-entropy (same batches, same θ)."""
    h = adapted.history.dropna(subset=["cross_entropy"])
    per_task = {t: correlation(g.entropy, g.cross_entropy) for t, g in h.groupby("task", sort=False)}
    pooled = pooled_correlation([(g.entropy, g.cross_entropy) for _, g in h.groupby("task", sort=False)])
    return per_task, pooled


# ----------------------------------------------------------------------------- tables
MAIN_KINDS = ("reference", "merge", "adamerging", "surgery")


def main_table(study: TrackStudy) -> pd.DataFrame:
    """Accuracy per task, average and normalized score of the main rows (notebook 01's rows,
    AdaMerging and Surgery), in the paper's order."""
    t = study.table[study.table.kind.isin(MAIN_KINDS)]
    return B.summary(t)


def paper_table(studies: Mapping[str, TrackStudy]) -> pd.DataFrame:
    """Each main row's average accuracy next to the paper's (CLIP ViT-B/32, 8 tasks), with
    normalized scores (% of the experts) so that the two scales can be read side by side."""
    out = pd.DataFrame({f"{PAPER_LABEL}: average %": pd.Series(PAPER_VIT_B32),
                        f"{PAPER_LABEL}: normalized": pd.Series(PAPER_VIT_B32) / PAPER_VIT_B32[EXPERTS] * 100})
    for name, study in studies.items():
        wide = main_table(study)
        out[f"{name}, {study.track.scale} scale: average %"] = wide["Average"]
        out[f"{name}, {study.track.scale} scale: normalized"] = wide["Normalized"]
    return out.round(1)


def _estimate_row(track, label, d: Estimate, baseline: str) -> dict:
    return {"track": track, "row": label, "difference (points)": round(d.value, 2), "SE": round(d.se, 2),
            "verdict": verdict(d), "against": baseline}


def versus_table(studies: Mapping[str, TrackStudy]) -> pd.DataFrame:
    """Each learned row against the merge it builds on, paired over the same test examples."""
    rows = []
    for name, s in studies.items():
        for row in ADAMERGING_ROWS:
            rows.append(_estimate_row(name, row, paired_difference(s.correct(row), s.correct(TA)), TA))
            rows.append(_estimate_row(name, row, paired_difference(s.correct(row), s.correct(PRETRAINED)), PRETRAINED))
        for merge in SURGERY_BASES:
            rows.append(_estimate_row(name, surgery_row(merge), paired_difference(
                s.correct(surgery_row(merge)), s.correct(merge)), merge))
    return pd.DataFrame(rows).set_index(["track", "row", "against"])


def fraction_table(studies: Mapping[str, TrackStudy]) -> pd.DataFrame:
    """Layer-wise AdaMerging on a fraction of each task's test inputs: average accuracy ± SE,
    and its paired difference to Task Arithmetic and to 100% of the inputs."""
    rows = []
    for name, s in studies.items():
        full = s.correct(s.fractions[max(s.fractions)])
        for fraction, row in sorted(s.fractions.items()):
            examples = s.adapted[row].examples.values()
            rows.append({"track": name, "fraction": fraction, "inputs per task": f"{min(examples)}–{max(examples)}",
                         "average accuracy": mean_accuracy(s.correct(row)).plain(),
                         "minus Task Arithmetic": str(paired_difference(s.correct(row), s.correct(TA))),
                         "minus the largest fraction": str(paired_difference(s.correct(row), full))})
    return pd.DataFrame(rows).set_index(["track", "fraction"])


def honest_table(studies: Mapping[str, TrackStudy]) -> pd.DataFrame:
    rows = []
    for name, s in studies.items():
        d = paired_difference(s.correct(LAYER_WISE), s.correct(honest_row()))
        rows.append({"track": name, "adapted on test inputs (paper)": mean_accuracy(s.correct(LAYER_WISE)).plain(),
                     "adapted on validation inputs": mean_accuracy(s.correct(honest_row())).plain(),
                     "test − validation (points)": str(d), "verdict": verdict(d)})
    return pd.DataFrame(rows).set_index("track")


def unseen_gains(s: TrackStudy) -> dict[str, Estimate]:
    """AdaMerging's gain over Task Arithmetic (both over the seen experts) on the seen and the unseen tasks."""
    u = s.unseen
    out = {}
    for group, tasks in (("seen", u.seen), ("unseen", u.unseen)):
        names = [s.track.display_name(t) for t in tasks]
        out[group] = paired_difference({t: u.outcomes[SEEN_ADA][t] for t in names},
                                       {t: u.outcomes[SEEN_TA][t] for t in names})
    return out


def unseen_table(studies: Mapping[str, TrackStudy]) -> pd.DataFrame:
    rows = []
    for name, s in studies.items():
        if s.unseen is None:
            continue
        gains = unseen_gains(s)
        for group, tasks in (("seen", s.unseen.seen), ("unseen", s.unseen.unseen)):
            names = [s.track.display_name(t) for t in tasks]
            rows.append({"track": name, "tasks": group, "which": ", ".join(names),
                         SEEN_TA: mean_accuracy({t: s.unseen.outcomes[SEEN_TA][t] for t in names}).plain(),
                         SEEN_ADA: mean_accuracy({t: s.unseen.outcomes[SEEN_ADA][t] for t in names}).plain(),
                         "gain (points)": str(gains[group])})
    return pd.DataFrame(rows).set_index(["track", "tasks"]) if rows else pd.DataFrame()


def entropy_table(studies: Mapping[str, TrackStudy]) -> pd.DataFrame:
    rows = []
    for name, s in studies.items():
        per_task, pooled = entropy_correlations(s.adapted[LAYER_WISE])
        for task, c in [*per_task.items(), ("all tasks (pooled within tasks)", pooled)]:
            rows.append({"track": name, "task": s.track.display_name(task), "r": round(c.r, 3),
                         "95% CI": f"{c.low:.2f} to {c.high:.2f}", "steps": c.n})
    return pd.DataFrame(rows).set_index(["track", "task"])


def collapse_table(studies: Mapping[str, TrackStudy]) -> pd.DataFrame:
    """Per track and row: top-class share of the test predictions (± SE), mean feature norm, mean
    largest |logit| and average accuracy."""
    rows = []
    for name, s in studies.items():
        if s.collapse is None:
            continue
        for row in s.collapse.profiles:
            correct = s.collapse.reestimated if row == BN_REESTIMATED else s.correct(row)
            share = s.collapse.share(row)
            rows.append({"track": name, "row": row, "top-class share %": share.value, "SE": share.se,
                         "feature norm": s.collapse.mean(row, "feature norm"),
                         "max |logit|": s.collapse.mean(row, "max |logit|"),
                         "accuracy %": mean_accuracy(correct).value})
    return pd.DataFrame(rows).set_index(["track", "row"])


def budget_table(studies: Mapping[str, TrackStudy], config: AdaMergingConfig) -> pd.DataFrame:
    """Task-wise and layer-wise at the small budget and at the paper's, on the paper-budget track."""
    rows = []
    for name, s in studies.items():
        for method, row in s.budget.items():
            for label, r in (("small budget", method), ("paper budget", row)):
                v = s.adapted[r].variant
                rows.append({"track": name, "method": method, "budget": label, "steps": v.steps, "lr": v.lr,
                             "average accuracy": mean_accuracy(s.correct(r)).plain()})
    return pd.DataFrame(rows).set_index(["track", "method", "budget"]) if rows else pd.DataFrame()


def cost_table(studies: Mapping[str, TrackStudy]) -> pd.DataFrame:
    t = pd.concat([s.costs for s in studies.values()], ignore_index=True)
    return t.set_index(["track", "method"]).round(3)


def coefficients_long(studies: Mapping[str, TrackStudy], row: str = LAYER_WISE) -> pd.DataFrame:
    rows = []
    for name, s in studies.items():
        a = s.adapted[row]
        for i, task in enumerate(a.tasks):
            for k, key in enumerate(a.keys):
                rows.append({"track": name, "task": s.track.display_name(task), "tensor": key,
                             "coefficient": float(a.coefficients[i, k])})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- findings
def _moved(a: Adapted, init: float) -> float:
    """Mean distance of the learned coefficients from their start."""
    return float((a.coefficients - init).abs().mean())


PAPER_BATCHES = (2, 16)  # the authors' batches per task and step, and their size


def _budget_words(config: AdaMergingConfig, name: str) -> str:
    """One track's adaptation budget, and how it falls short of the paper's (500 steps of 2×16 per task)."""
    steps, batches = config.steps_for(name), (config.adamerging_batches_per_step, config.adamerging_batch_size)
    words = f"{steps} steps of {batches[0]}×{batches[1]} per task, lr {config.lr_for(steps):.3g}"
    short = []
    if steps < PAPER_STEPS:
        scaled = f" (lr scaled by {PAPER_STEPS}/{steps} for the same reach)" if config.scale_lr_to_budget else ""
        short.append(f"smaller than the paper's {PAPER_STEPS} steps{scaled}")
    if batches[0] * batches[1] < PAPER_BATCHES[0] * PAPER_BATCHES[1]:
        short.append(f"fewer inputs per step than the paper's {PAPER_BATCHES[0]}×{PAPER_BATCHES[1]}")
    return words + (" — " + "; ".join(short) if short else " (the paper's budget)")


def _layerwise_claim(name: str, s: TrackStudy, config: AdaMergingConfig) -> list[Claim]:
    baseline = ("Task Arithmetic with λ chosen on validation (both AdaMerging variants start from TA at "
                f"λ = {config.adamerging_init:g})")
    d = paired_difference(s.correct(LAYER_WISE), s.correct(TASK_WISE))
    lw_ta = paired_difference(s.correct(LAYER_WISE), s.correct(TA))
    tw_ta = paired_difference(s.correct(TASK_WISE), s.correct(TA))
    moved_lw = _moved(s.adapted[LAYER_WISE], config.adamerging_init)
    moved_tw = _moved(s.adapted[TASK_WISE], config.adamerging_init)
    evidence = (f"Layer-wise − task-wise = {d} points of average accuracy; layer-wise − TA = {lw_ta}, "
                f"task-wise − TA = {tw_ta}. Mean |λ − 0.3| after adaptation: layer-wise {moved_lw:.3f}, task-wise "
                f"{moved_tw:.3f}. Budget: {_budget_words(config, name)}. Paper (CLIP ViT-B/32): layer-wise "
                f"{PAPER_VIT_B32[LAYER_WISE]} vs task-wise {PAPER_VIT_B32[TASK_WISE]}.")
    if held(d) != "held":
        evidence += (" The data suggest: " + (
            "the coefficients barely left their start, so this budget is too small to tell the two apart."
            if max(moved_lw, moved_tw) < 0.05 else
            "with these experts one coefficient per task already captures what entropy minimisation can find; "
            "per-tensor freedom does not add (or overfits the entropy)."))
    claims = [Claim(f"{name} track: layer-wise ≫ task-wise", held(d), evidence, baseline)]
    if s.budget:
        task_wise, layer_wise = s.budget[TASK_WISE], s.budget[LAYER_WISE]  # both at the paper's budget
        dp = paired_difference(s.correct(layer_wise), s.correct(task_wise))
        paper = s.adapted[layer_wise].variant
        which = "the paper's budget" if paper.steps == PAPER_STEPS else "the paper-budget setting"
        drift = paired_difference(s.correct(layer_wise), s.correct(LAYER_WISE))
        claims.append(Claim(
            f"{name} track at {which} ({paper.steps} steps, "
            f"{config.adamerging_batches_per_step}×{config.adamerging_batch_size} per task, lr "
            f"{paper.lr:.3g}): layer-wise ≫ task-wise", held(dp),
            f"Layer-wise − task-wise = {dp}; layer-wise at {paper.steps} steps − at the small budget's "
            f"{config.steps_for(name)} = {drift} ({verdict(drift)}), which measures what the smaller budget "
            "(and its scaled lr) changes.",
            baseline))
    return claims


def _plus_claim(name: str, s: TrackStudy) -> Claim:
    d_lw = paired_difference(s.correct(LAYER_WISE_PP), s.correct(LAYER_WISE))
    d_tw = paired_difference(s.correct(TASK_WISE_PP), s.correct(TASK_WISE))
    verdicts = {verdict(d_lw), verdict(d_tw)}
    outcome = ("held" if verdicts == {"better"} else "did not hold" if "worse" in verdicts
               else "not contradicted (within noise)")
    evidence = (f"Layer-wise++ − layer-wise = {d_lw} ({verdict(d_lw)}); task-wise++ − task-wise = {d_tw} "
                f"({verdict(d_tw)}). Paper: +1.0 (layer-wise), +2.6 (task-wise).")
    if outcome == "did not hold":
        evidence += (" The data suggest that trimming each task vector to its largest entries removes more "
                     "than the interference it avoids at this scale (compare TIES with TA in the main table).")
    return Claim(f"{name} track: AdaMerging++ ≥ AdaMerging", outcome, evidence,
                 "the same AdaMerging on the plain task vectors")


def _fraction_claim(name: str, s: TrackStudy) -> Claim:
    full_row = s.fractions[max(s.fractions)]
    full = s.correct(full_row)
    parts, enough = [], None
    for fraction, row in sorted(s.fractions.items()):
        if row == full_row:
            continue
        vs_full, vs_ta = paired_difference(s.correct(row), full), paired_difference(s.correct(row), s.correct(TA))
        examples = min(s.adapted[row].examples.values())
        parts.append(f"{100 * fraction:g}% (≥ {examples} inputs per task): − TA {vs_ta}, "
                     f"− {100 * max(s.fractions):g}% {vs_full}")
        if enough is None and fraction <= 0.05 and verdict(vs_full) != "worse" and verdict(vs_ta) == "better":
            enough = fraction
    full_gain = paired_difference(full, s.correct(TA))
    if enough is not None:
        outcome = f"held (from {100 * enough:g}% of the test inputs)"
    elif verdict(full_gain) != "better":
        outcome = "inconclusive (no gain over TA to keep)"
    else:
        outcome = "did not hold"
    evidence = (("; ".join(parts) or "no smaller fraction was run")
                + f". With {100 * max(s.fractions):g}%: − TA {full_gain}.")
    if outcome == "did not hold":
        evidence += " The data suggest that the gain needs more unlabeled inputs than 5% of each test set here."
    elif outcome.startswith("inconclusive"):
        evidence += " The data suggest that AdaMerging gains nothing over TA here even with all the inputs."
    return Claim(f"{name} track: a small fraction (≤ 5%) of the unlabeled test inputs suffices", outcome, evidence,
                 "Task Arithmetic (uses no unlabeled inputs) and layer-wise AdaMerging on all of them")


def _entropy_claim(name: str, s: TrackStudy) -> Claim:
    per_task, pooled = entropy_correlations(s.adapted[LAYER_WISE])
    if not math.isfinite(pooled.low):
        outcome = "undetermined (too few steps)"
    else:
        outcome = "held" if pooled.low > 0 else "did not hold" if pooled.high < 0 else "inconclusive (CI includes 0)"
    listed = ", ".join(f"{s.track.display_name(t)} {c.r:.2f}" for t, c in per_task.items())
    evidence = (f"Per step and task of layer-wise AdaMerging, the batch's mean entropy against its mean cross-entropy "
                f"(labels read only for this report): pooled within tasks {pooled}; per task r: {listed}. Successive "
                "steps are not independent, so the interval is optimistic.")
    if outcome in ("did not hold",) or outcome.startswith("inconclusive"):
        evidence += (" The data suggest that the heads' confidence does not follow their error here: lowering the "
                     "entropy need not lower the loss.")
    return Claim(f"{name} track: entropy tracks cross-entropy", outcome, evidence,
                 "no relation (r = 0)")


COLLAPSE_MARGIN = 10.0  # points of top-class share above Task Arithmetic's that count as collapsing


def collapse_verdict(collapse: Collapse, z: float = 2.0) -> tuple[bool, Estimate]:
    """(collapsed?, layer-wise AdaMerging's top-class share − Task Arithmetic's): collapsed when
    the difference exceeds ``COLLAPSE_MARGIN`` points by more than ``z`` standard errors."""
    d = difference_of_estimates(collapse.share(LAYER_WISE), collapse.share(TA))
    return d.value - z * d.se > COLLAPSE_MARGIN, d


def _collapse_claim(name: str, s: TrackStudy) -> Claim:
    c = s.collapse
    collapsed, d = collapse_verdict(c)
    growth = c.mean(LAYER_WISE, "feature norm") / c.mean(TA, "feature norm")
    evidence = (f"Share of the test inputs given each task's most predicted class: layer-wise AdaMerging "
                f"{c.share(LAYER_WISE).plain()}%, task-wise {c.share(TASK_WISE).plain()}%, Task Arithmetic "
                f"{c.share(TA).plain()}%, θ0 {c.share(PRETRAINED).plain()}% (layer-wise − TA = {d}); mean feature "
                f"norm layer-wise / TA = {growth:.2f}×, mean largest |logit| {c.mean(LAYER_WISE, 'max |logit|'):.1f} vs "
                f"{c.mean(TA, 'max |logit|'):.1f}.")
    if c.reestimated is not None:
        gain = paired_difference(c.reestimated, s.correct(LAYER_WISE))
        evidence += (f" The same adapted weights with BatchNorm statistics re-estimated on unlabeled training "
                     f"inputs: top-class share {c.share(BN_REESTIMATED).plain()}%, accuracy − stored statistics = "
                     f"{gain} ({verdict(gain)}).")
        if BATCH_STATISTICS in c.profiles:
            fixed = paired_difference(s.correct(BATCH_STATISTICS), s.correct(TA))
            evidence += (f" Adapted on each batch's own statistics instead (then evaluated with re-estimated "
                         f"ones): top-class share {c.share(BATCH_STATISTICS).plain()}%, accuracy − Task Arithmetic = "
                         f"{fixed} ({verdict(fixed)}).")
        if collapsed and verdict(gain) == "better":
            evidence += (" The data suggest: the entropy fell by inflating the activations against the stored "
                         "(merged) BatchNorm statistics, which eval-mode BatchNorm does not correct, rather than by "
                         "separating the classes. The paper's CLIP ViTs have LayerNorm only, so this failure cannot "
                         "occur there.")
    outcome = "did not hold: it collapsed" if collapsed else "held"
    return Claim(f"{name} track: AdaMerging keeps its predictions spread over the classes (its top-class share "
                 f"within {COLLAPSE_MARGIN:.0f} points of Task Arithmetic's)", outcome, evidence,
                 "Task Arithmetic's predictions (the merge AdaMerging starts from, not adapted)")


def _surgery_claim(name: str, s: TrackStudy, config: AdaMergingConfig) -> Claim:
    diffs = {m: paired_difference(s.correct(surgery_row(m)), s.correct(m)) for m in SURGERY_BASES}
    kinds = {verdict(d) for d in diffs.values()}
    outcome = ("held" if kinds == {"better"} else "did not hold" if "worse" in kinds
               else "partly (some within noise)")
    evidence = ("Surgery − the merge: " + ", ".join(f"{m} {d} ({verdict(d)})" for m, d in diffs.items())
                + f". Trained on the unlabeled test inputs it is evaluated on (the paper's protocol), each for "
                f"{config.surgery_steps} iterations of {config.adamerging_batches_per_step}×"
                f"{config.adamerging_batch_size} per task (paper: {PAPER_STEPS}).")
    if outcome != "held":
        evidence += (" The data suggest that where the merge already keeps the experts' features, the L1 "
                     "correction has little to remove.")
    return Claim(f"{name} track: Surgery adds on top of every merge", outcome, evidence, "the merge it builds on")


def _unseen_claim(name: str, s: TrackStudy) -> Claim:
    gains = unseen_gains(s)
    d = difference_of_estimates(gains["seen"], gains["unseen"])
    seen = ", ".join(s.track.display_name(t) for t in s.unseen.seen)
    unseen = ", ".join(s.track.display_name(t) for t in s.unseen.unseen)
    evidence = (f"AdaMerging − TA (both over the experts of {seen}): on those seen tasks {gains['seen']}, on the "
                f"held-out {unseen} {gains['unseen']}; seen − unseen = {d}.")
    if held(d) != "held":
        evidence += (" The data suggest that adaptation on the seen tasks " +
                     ("does not hurt the held-out tasks more than it helps the seen ones."
                      if verdict(gains["seen"]) != "better" else "carries over to the held-out tasks."))
    return Claim(f"{name} track: unseen tasks gain less than seen ones", held(d), evidence,
                 "Task Arithmetic over the seen tasks' experts (λ on their validation data)")


def _honest_claim(name: str, s: TrackStudy) -> Claim:
    d = paired_difference(s.correct(LAYER_WISE), s.correct(honest_row()))
    return Claim(f"{name} track: adapting on the test inputs themselves (the paper's protocol) beats adapting on "
                 "validation inputs", held(d),
                 f"Layer-wise AdaMerging adapted on test − on validation inputs, both evaluated on test: {d}. A "
                 "positive difference is what the paper's protocol gains from seeing the inputs it reports on.",
                 "the same adaptation on the validation inputs")


def findings(studies: Mapping[str, TrackStudy], config: AdaMergingConfig) -> str:
    """The verdicts of notebook 02, computed from its results. Differences are paired over the
    same test examples, ± one standard error; correlations carry a 95% interval."""
    claims, notes = [], []
    for name, s in studies.items():
        claims += _layerwise_claim(name, s, config)
        claims.append(_plus_claim(name, s))
        claims.append(_fraction_claim(name, s))
        claims.append(_entropy_claim(name, s))
        if s.collapse is not None:
            claims.append(_collapse_claim(name, s))
        claims.append(_surgery_claim(name, s, config))
        if s.unseen is not None:
            claims.append(_unseen_claim(name, s))
        claims.append(_honest_claim(name, s))
        notes.append(f"{name}: AdaMerging budget {_budget_words(config, name)}.")
        for label, r in s.merges.items():
            if r.selection and r.selection.note:
                notes.append(f"{name}, {label}: {r.selection.note}.")
    paper_scale = any(s.track.scale == "paper" for s in studies.values())
    preamble = ("*Paper scale: CLIP with the published experts on the papers' tasks.* " if paper_scale else
                "*Small-scale numbers (MiniLM-L6 text track, CIFAR ResNet-20 vision track); not the papers' numbers "
                "(CLIP ViT-B/32).* ") + ("Differences: paired over the same test examples, ± one standard error; a verdict "
                f"needs 2 SE. AdaMerging and Surgery adapt on the unlabeled test inputs (the paper's protocol) except "
                f"where 'validation' is said. Budgets smaller than the paper's ({PAPER_STEPS} steps) are stated per "
                "claim.")
    return findings_markdown("Findings: AdaMerging and Representation Surgery", claims, preamble, notes)


# ----------------------------------------------------------------------------- figures
def _scales(studies: Mapping[str, TrackStudy]) -> str:
    return "/".join(sorted({s.track.scale for s in studies.values()})) or "small"


def plot_main(studies: Mapping[str, TrackStudy]):
    """Normalized score of every main row per track, the paper's normalized score marked."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(studies), figsize=(7 * len(studies), 6), squeeze=False)
    for ax, (name, s) in zip(axes[0], studies.items()):
        wide = main_table(s)
        rows = list(wide.index)[::-1]
        colors = ["#bbbbbb" if r in (PRETRAINED, EXPERTS, MULTITASK) else "#4c72b0" if r.startswith("AdaMerging")
                  else "#dd8452" if r.endswith("Surgery") else "#55a868" for r in rows]
        ax.barh(rows, wide.loc[rows, "Normalized"], color=colors)
        paper = [100 * PAPER_VIT_B32[r] / PAPER_VIT_B32[EXPERTS] if r in PAPER_VIT_B32 else np.nan for r in rows]
        ax.scatter(paper, range(len(rows)), marker="D", color="black", zorder=3, label=f"{PAPER_LABEL} (normalized)")
        ax.axvline(100, color="black", lw=0.8, ls="--")
        ax.set_xlabel("normalized score (% of the individual experts)")
        ax.set_title(f"{name} track, {s.track.scale} scale")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def plot_entropy(studies: Mapping[str, TrackStudy]):
    """Entropy and cross-entropy over the steps of layer-wise AdaMerging, per task."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(studies), figsize=(7 * len(studies), 7), squeeze=False)
    for col, (name, s) in enumerate(studies.items()):
        h = s.adapted[LAYER_WISE].history
        for task, g in h.groupby("task", sort=False):
            line, = axes[0, col].plot(g.step, g.entropy, label=s.track.display_name(task))
            axes[0, col].plot(g.step, g.cross_entropy, ls="--", color=line.get_color())
            axes[1, col].scatter(g.entropy, g.cross_entropy, s=10, color=line.get_color())
        axes[0, col].set_title(f"{name}: entropy (solid) and cross-entropy (dashed)")
        axes[0, col].set_xlabel("step")
        axes[0, col].legend(fontsize=7, ncol=2)
        _, pooled = entropy_correlations(s.adapted[LAYER_WISE])
        axes[1, col].set_title(f"{name}: per step and task, {pooled}", fontsize=9)
        axes[1, col].set_xlabel("mean entropy of the step's batches")
        axes[1, col].set_ylabel("mean cross-entropy (labels: report only)")
    fig.tight_layout()
    return fig


def plot_coefficients(studies: Mapping[str, TrackStudy]):
    """Heat map of the learned layer-wise coefficients (tasks × tensors)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    height = sum(1.5 + 0.4 * len(s.adapted[LAYER_WISE].tasks) for s in studies.values())
    fig, axes = plt.subplots(len(studies), 1, figsize=(16, height), squeeze=False)
    for ax, (name, s) in zip(axes[:, 0], studies.items()):
        a = s.adapted[LAYER_WISE]
        heat = pd.DataFrame(a.coefficients.numpy(), index=[s.track.display_name(t) for t in a.tasks], columns=a.keys)
        sns.heatmap(heat, cmap="viridis", vmin=0, vmax=1, ax=ax, cbar_kws={"label": "λ"}, xticklabels=False)
        ax.set_xlabel(f"{len(a.keys)} parameter tensors, input to output (every λ starts at the same value)")
        ax.set_title(f"{name}: learned layer-wise coefficients ({s.track.scale} scale)")
    fig.tight_layout()
    return fig


def plot_fractions(studies: Mapping[str, TrackStudy]):
    """Average accuracy of layer-wise AdaMerging against the fraction of test inputs it adapts on."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(studies), figsize=(5.5 * len(studies), 3.8), squeeze=False)
    for ax, (name, s) in zip(axes[0], studies.items()):
        fractions = sorted(s.fractions)
        est = [mean_accuracy(s.correct(s.fractions[f])) for f in fractions]
        ax.errorbar([100 * f for f in fractions], [e.value for e in est], yerr=[e.se for e in est], marker="o",
                    capsize=3, label=LAYER_WISE)
        for row, style in ((TA, "--"), (PRETRAINED, ":")):
            ax.axhline(mean_accuracy(s.correct(row)).value, ls=style, color="gray", label=row)
        ax.set_xscale("log")
        ax.set_xlabel("% of each task's test inputs (unlabeled)")
        ax.set_ylabel("average accuracy % (± SE)")
        ax.set_title(f"{name}: amount of unlabeled data")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_cost(studies: Mapping[str, TrackStudy]):
    """Peak memory and wall time of every AdaMerging step, per run: flat curves mean nothing accumulates."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(studies), figsize=(7 * len(studies), 6.5), squeeze=False)
    for col, (name, s) in enumerate(studies.items()):
        for row, a in s.adapted.items():
            axes[0, col].plot(a.peak_mib, label=row, lw=1)
            axes[1, col].plot(a.seconds, label=row, lw=1)
        axes[0, col].set_ylabel("peak MiB above the run's start")
        axes[1, col].set_ylabel("seconds")
        axes[1, col].set_xlabel("step")
        axes[0, col].set_title(f"{name}: peak resident memory per step")
        axes[1, col].set_title(f"{name}: wall time per step")
        axes[0, col].legend(fontsize=6)
        for ax in axes[:, col]:
            ax.set_ylim(bottom=0)
    fig.tight_layout()
    return fig


def plot_unseen(studies: Mapping[str, TrackStudy]):
    """AdaMerging's gain over Task Arithmetic on seen and on held-out tasks."""
    import matplotlib.pyplot as plt

    with_unseen = {n: s for n, s in studies.items() if s.unseen is not None}
    fig, ax = plt.subplots(figsize=(2.5 + 2.5 * max(1, len(with_unseen)), 3.6))
    labels, values, errors = [], [], []
    for name, s in with_unseen.items():
        for group, d in unseen_gains(s).items():
            labels.append(f"{name}\n{group}")
            values.append(d.value)
            errors.append(d.se)
    ax.bar(labels, values, yerr=errors, capsize=4, color=["#4c72b0", "#c44e52"] * len(with_unseen))
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("AdaMerging − Task Arithmetic (points, ± SE)")
    ax.set_title(f"Seen vs unseen tasks ({_scales(with_unseen)} scale)")
    fig.tight_layout()
    return fig
