"""The closed-form baselines study: everything ``notebooks/01_merging_baselines.ipynb`` runs.

    config = BaselinesConfig(...)                          # the notebook's parameters
    result = run_track("vision", config)                   # experts, statistics, merges, evaluation
    result.table, result.outcomes, result.selections
    spread = seed_spread("vision", config)                 # the same over config.spread_seeds
    findings(results, spread)                              # the verdicts, as Markdown

Merges see only the *mergeable* keys: encoder tensors that fine-tuning changed (frozen ones,
e.g. MiniLM's token embeddings, are copied from θ0). Heads are never merged. Every method
comes from ``lib.merging.REGISTRY``; its tuned hyper-parameters are chosen by
``lib.experiments.selection.select`` on the validation split, never on test. BatchNorm running
statistics are averaged by every merge (the registry's buffer rule); the vision table also
reports each merge with them re-estimated on unlabeled training images.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import merging, statistics
from ..models import Classifier
from ..paper.glue import PAPER_TEXT_TASKS
from ..paper.vision_data import PAPER_VISION_TASKS
from ..paper.vision_data import check_source as check_vision_source
from .cache import cached_tensors, content_hash
from .config import settings_for, take_unchanged
from .evaluation import evaluate
from .findings import (Claim, Estimate, findings_markdown, held, mean_accuracy, over_seeds, paired_bootstrap,
                       paired_difference, verdict)
from .selection import Selection, select
from .paper_tracks import CLIP_MICRO_BATCH, CLIP_RECIPE, GLUE_MAX_TEST, GLUE_RECIPE, ClipVisionTrack, GlueTextTrack
from .tracks import TextTrack, Track, VisionTrack, scored_officially
from .training import (Expert, FinetuneConfig, head_module, initial_heads, reestimate_on_training_data, run_device_of,
                       train_experts, train_multitask)

PRETRAINED = "Pretrained (θ0 + expert head)"
EXPERTS = "Individual experts"
MULTITASK = "Multi-task"

# The merges of the baselines table, in the order of the table (names in lib.merging.REGISTRY).
METHODS = ("weight_average", "task_arithmetic", "ties", "dare_ta", "dare_ties", "fisher", "regmean", "gradient_matching")

# Published average accuracies, CLIP ViT-B/32 on 8 tasks (AdaMerging paper, METHODS.md §7).
PAPER_VIT_B32 = {"Pretrained": 48.0, "Weight averaging": 65.8, "Fisher": 68.3, "Task Arithmetic": 69.1,
                 "RegMean": 71.8, "TIES": 72.4, "Individual experts": 90.5}
# Published average normalized scores, RoBERTa-base on the 8 GLUE tasks (Twin-Merging paper, and the
# authors' own re-run of its baselines; METHODS.md §7). Their test sets: the first 1,000 examples.
PAPER_ROBERTA_GLUE = {"Weight averaging": 52.6, "Task Arithmetic": 67.8, "TIES": 64.7}
PAPER_ROBERTA_GLUE_RERUN = {"Task Arithmetic": 58.3, "TIES": 47.4}


# The first small-scale benchmark (before issue "Benchmark v2"): linear-probe heads on θ0's
# features, four vision tasks, shorter budgets. ``BaselinesConfig(benchmark="v1")`` runs it, so
# the two designs can be compared; settings the caller changed are kept.
BENCHMARK_V1 = {"text_heads": "probe", "vision_heads": "probe",
                "vision_tasks": ("mnist", "fashion_mnist", "usps", "gtsrb"),
                "text_max_steps": 250, "vision_max_steps": 200, "multitask_steps_per_task": 60}


# The paper scale (issue 12; METHODS.md §7): CLIP on the papers' eight vision tasks, with the
# published experts and zero-shot heads, and RoBERTa-base on the eight GLUE tasks with the
# published experts and their own heads (lib.experiments.paper_tracks). ``scale="paper"`` takes
# these for the settings the caller left at their small-scale defaults. The text track runs
# when asked for (tracks=["text"] or ["vision", "text"]); notebooks 01 and 05 only so far.
PAPER_SCALE = {"tracks": ("vision",), "vision_tasks": PAPER_VISION_TASKS, "vision_heads": "zero_shot",
               "spread_seeds": (), "max_test": None, "vision_max_steps": CLIP_RECIPE.max_steps,
               "vision_batch_size": CLIP_RECIPE.batch_size, "vision_lr": CLIP_RECIPE.lr,
               "eval_every": CLIP_RECIPE.eval_every, "text_tasks": PAPER_TEXT_TASKS, "text_heads": "joint",
               "text_batch_size": GLUE_RECIPE.batch_size, "text_lr": GLUE_RECIPE.lr}


@dataclass
class TrackSettings:
    """Notebook 01's settings of its tracks, experts and merges, shared by every notebook built on
    them (02 AdaMerging, 05 Twin-Merging): the same names mean the same things, so a notebook's
    ``baselines_config()`` (``settings_for``) finds the experts, merges and predictions notebook 01
    cached. Each notebook's config adds its own fields after these; the fields are papermill
    parameters. ``paper_profile``: what ``scale="paper"`` sets on the fields left at their defaults."""

    paper_profile: ClassVar[dict] = PAPER_SCALE
    paper_tracks: ClassVar[tuple[str, ...]] = ("vision",)  # the tracks this notebook runs at paper scale

    scale: str = "small"
    benchmark: str = "v2"           # "v1": the first design (BENCHMARK_V1), for comparison
    tracks: tuple[str, ...] = ("text", "vision")
    text_tasks: tuple[str, ...] = ("sst2", "subj", "trec", "emotion", "emoji", "hate", "irony", "offensive")
    vision_tasks: tuple[str, ...] = ("mnist", "fashion_mnist", "usps", "gtsrb", "eurosat", "kmnist", "mnist_m")
    data_dir: str = ""              # local mirror (e.g. ../shared/data); "" downloads
    models_dir: str = ""            # folder holding cifar_resnet/resnet20-12fca82f.th; "" downloads
    output_dir: str = ""            # "" = figures/<notebook> for the defaults, else runs/<notebook>/<changes>
    seed: int = 0
    max_validation: int = 500       # examples per task kept for validation (early stopping, selection)
    max_test: int | None = 1000     # examples per task kept for test (seeded, class-stratified subset); None: all
    # each task's head (Track.head_kind): probe, few_shot, joint, or zero_shot (text only); the
    # defaults are notebook 00's calibrated choice (figures/00_benchmark_calibration/findings.md)
    text_heads: str = "zero_shot"
    vision_heads: str = "few_shot"
    head_shots: int = 16            # examples per class of a few_shot head
    batchnorm_examples: int = 1024  # training examples per task that re-estimate a merged ResNet's BatchNorm
    vision_backbone: str = "resnet20"  # or "resnet56"
    # experts; the multi-task model gets multitask_steps_per_task × number of tasks
    text_max_steps: int = 400
    text_batch_size: int = 32
    text_lr: float = 1e-4
    vision_max_steps: int = 500
    vision_batch_size: int = 128
    vision_lr: float = 1e-3
    eval_every: int = 50
    patience: int = 2
    multitask_steps_per_task: int = 200
    # merges (defaults and grids of lib.merging.REGISTRY unless set here)
    # METHODS.md §1's grid 0, 0.05, …, 1 searched coarse-to-fine: 0, 0.1, …, 1, then the two
    # neighbours of the best at step 0.05 (13 evaluations rather than 21; selection.py)
    lambda_grid: tuple[float, ...] = merging.LAMBDA_GRID[::2]
    lambda_refinements: int = 1
    ties_density: float = 0.2
    ties_disjoint: str = "mean"
    selection_examples: int = 100   # validation examples per task for choosing hyper-parameters
    # paper scale (scale="paper"): the CLIP image tower, its experts, and where it runs
    paper_vision_arch: str = "ViT-B-32"  # or "ViT-B-16", "ViT-L-14"
    paper_vision_source: str = ""   # "huggingface": every task from its hub copy (FusionBench's); "": each task's default
    paper_experts: str = "published"  # "published" (the hub's) or "finetune" (METHODS.md §8's recipe, here)
    paper_micro_batch: int = 0      # "finetune": images per forward/backward (0: what fits a 24 GB card, CLIP_MICRO_BATCH)
    device: str = "auto"            # "auto": CUDA when there is one (paper scale)
    autocast: str = "auto"          # paper-scale inference: "auto" (bf16 on CUDA), "bf16", "fp16" or "off"

    def __post_init__(self):
        if self.scale not in ("small", "paper"):
            raise ValueError(f"scale={self.scale!r}: choose 'small' (the default) or 'paper'.")
        for name in self.tracks:
            if name not in ("text", "vision"):
                raise ValueError(f"tracks: unknown track {name!r}; choose from 'text', 'vision'.")
        if self.benchmark not in ("v1", "v2"):
            raise ValueError(f"benchmark={self.benchmark!r}: choose 'v2' (the calibrated default, notebook 00) "
                             "or 'v1' (the first design: probe heads, four vision tasks).")
        check_vision_source(self.paper_vision_source or None, "paper_vision_source")
        if self.paper_micro_batch < 0:
            raise ValueError(f"paper_micro_batch = {self.paper_micro_batch}: pass the images per forward/backward, "
                             "or 0 for the architecture's default (CLIP_MICRO_BATCH).")
        if self.benchmark == "v1":
            take_unchanged(self, BENCHMARK_V1)
        if self.scale == "paper":
            take_unchanged(self, self.paper_profile)
            unsupported = [t for t in self.tracks if t not in self.paper_tracks]
            if unsupported:
                raise ValueError(f"tracks: {type(self).__name__} runs the paper scale on the "
                                 f"{' and '.join(self.paper_tracks)} track{'s' if len(self.paper_tracks) > 1 else ''} "
                                 "only so far (vision: CLIP on the 8 vision tasks); RoBERTa on GLUE (text) runs in "
                                 f"notebooks 01 and 05. Pass tracks={list(self.paper_tracks)}.")

    def baselines_config(self) -> "BaselinesConfig":
        """Notebook 01's config with these settings: the same experts, merges and selection."""
        return settings_for(BaselinesConfig, self, exclude=("output_dir",))


@dataclass
class StatisticsSettings(TrackSettings):
    """The settings of the merges that need statistics (Fisher, RegMean), for the notebooks that run them."""

    fisher_examples: int = 256
    fisher_batch_size: int = 16
    paper_fisher_chunk: int = 0     # paper scale, vision: per-example gradients alive at once (0: what fits 24 GB)
    regmean_examples: int = 512
    regmean_alpha: float = 0.9
    regmean_gram: str = "mean"      # Gram = mean over rows (public code) or "sum"
    regmean_ridge: float = 1e-6     # relative; dead ReLU channels make the summed Gram singular

    def __post_init__(self):
        super().__post_init__()
        if self.paper_fisher_chunk < 0:
            raise ValueError(f"paper_fisher_chunk = {self.paper_fisher_chunk}: pass the examples whose per-example "
                             "gradients are vmapped at once, or 0 for the architecture's default (CLIP_FISHER_CHUNK).")


@dataclass
class BaselinesConfig(StatisticsSettings):
    """Every setting of notebook 01. The fields are its papermill parameters."""

    paper_tracks: ClassVar[tuple[str, ...]] = ("vision", "text")
    spread_seeds: tuple[int, ...] = (1, 2)  # further seeds of the vision track, for the seed spread
    dare_drop_rate: float = 0.7
    dare_seed: int = 0
    gradient_matching_scale: float = 1.0
    progress: bool = True

    def track(self, name: str, seed: int | None = None) -> Track:
        seed = self.seed if seed is None else seed
        common = dict(data_dir=self.data_dir or None, seed=seed, max_validation=self.max_validation,
                      max_test=self.max_test, head_kind=getattr(self, f"{name}_heads"), head_shots=self.head_shots,
                      batchnorm_examples=self.batchnorm_examples)
        if self.scale == "paper" and name == "text":
            # the GLUE test sets are Twin-Merging's (the first 1,000 examples) unless max_test caps them
            return GlueTextTrack(tasks=list(self.text_tasks), models_dir=self.models_dir or None,
                                 experts=self.paper_experts, device=self.device, autocast=self.autocast,
                                 **{**common, "max_test": self.max_test or GLUE_MAX_TEST})
        if self.scale == "paper":
            return ClipVisionTrack(tasks=list(self.vision_tasks), models_dir=self.models_dir or None,
                                   arch=self.paper_vision_arch, source=self.paper_vision_source or None,
                                   experts=self.paper_experts, device=self.device,
                                   autocast=self.autocast, fisher_chunk=self.paper_fisher_chunk, **common)
        if name == "text":
            return TextTrack(tasks=list(self.text_tasks), **common)
        return VisionTrack(tasks=list(self.vision_tasks), models_dir=self.models_dir or None,
                           backbone=self.vision_backbone, **common)

    def finetune_configs(self, name: str, num_tasks: int, seed: int | None = None
                         ) -> tuple[FinetuneConfig, FinetuneConfig | None]:
        """(experts, multi-task model) training settings of a track. The paper scale trains no
        multi-task model (the papers quote theirs); its text experts get DARE's GLUE recipe, which
        the track turns into each task's steps (``GlueTextTrack.expert_config``)."""
        common = dict(batch_size=getattr(self, f"{name}_batch_size"), lr=getattr(self, f"{name}_lr"),
                      patience=self.patience, seed=self.seed if seed is None else seed)
        if self.scale == "paper" and name == "text":
            return dataclasses.replace(GLUE_RECIPE, batch_size=common["batch_size"], lr=common["lr"]), None
        if self.scale == "paper":  # the CLIP recipe (weight decay, warm-up, cosine, trained to the end)
            micro = self.paper_micro_batch or CLIP_MICRO_BATCH.get(self.paper_vision_arch)
            recipe = dataclasses.replace(CLIP_RECIPE, max_steps=self.vision_max_steps, eval_every=self.eval_every,
                                         batch_size=common["batch_size"], lr=common["lr"], seed=common["seed"],
                                         micro_batch_size=micro)
            return recipe, None
        experts = FinetuneConfig(max_steps=getattr(self, f"{name}_max_steps"), eval_every=self.eval_every, **common)
        multitask = FinetuneConfig(max_steps=self.multitask_steps_per_task * num_tasks,
                                   eval_every=2 * self.eval_every, **common)
        return experts, multitask

    def hyperparameters(self, method: str) -> dict:
        """This config's fixed settings for a registry method (the rest are registry defaults)."""
        return {
            "ties": {"density": self.ties_density, "disjoint": self.ties_disjoint},
            "dare_ta": {"drop_rate": self.dare_drop_rate, "seed": self.dare_seed},
            "dare_ties": {"drop_rate": self.dare_drop_rate, "seed": self.dare_seed,
                          "density": self.ties_density, "disjoint": self.ties_disjoint},
            "regmean": {"alpha": self.regmean_alpha, "gram_normalization": self.regmean_gram,
                        "ridge": self.regmean_ridge},
            "gradient_matching": {"scale": self.gradient_matching_scale},
        }.get(method, {})


@dataclass
class Setup:
    """θ0, its task heads, the experts and the multi-task model of one track."""

    track: Track
    pretrained: dict[str, torch.Tensor]
    heads: dict[str, dict[str, torch.Tensor]]
    experts: dict[str, Expert]
    multitask: Expert | None
    mergeable: list[str] = field(default_factory=list)

    def finetuned(self) -> list[dict[str, torch.Tensor]]:
        return [self.experts[t].encoder for t in self.track.tasks]

    def restrict(self, state: dict) -> dict:
        return {k: state[k] for k in self.mergeable}

    def complete(self, merged: dict) -> dict:
        """A full encoder state: merged tensors over θ0's (frozen and non-float ones)."""
        return {**self.pretrained, **merged}


def prepare_track(track: Track, config: FinetuneConfig, multitask_config: FinetuneConfig | None, progress=True) -> Setup:
    """θ0, heads, experts and (unless ``multitask_config`` is None) the multi-task model."""
    pretrained = {k: v.clone() for k, v in track.pretrained_encoder().state_dict().items()}
    start_heads = initial_heads(track)
    if track.uses_published_experts:  # paper scale: the experts the field uses
        experts = track.published_experts(start_heads)
    else:
        experts = train_experts(track, start_heads, config, progress)
    multitask = None if multitask_config is None else train_multitask(track, start_heads, multitask_config, progress)
    mergeable = [k for k, v in pretrained.items() if v.is_floating_point()
                 and any(not torch.equal(e.encoder[k], v) for e in experts.values())]
    # Every model is evaluated through each task's expert head: the frozen start head, or the head
    # trained with the expert (head_kind "joint", as in the GLUE merging papers).
    heads = {t: experts[t].heads[t] for t in track.tasks}
    return Setup(track, pretrained, heads, experts, multitask, mergeable)


# ----------------------------------------------------------------------------- statistics
def _classifier(track: Track, encoder_state: dict, head_state: dict) -> Classifier:
    """Encoder + head on the device the track runs on (statistics follow the model's device)."""
    encoder = track.pretrained_encoder()
    encoder.load_state_dict(encoder_state)
    return Classifier(encoder, head_module(head_state)).to(run_device_of(encoder))


def _encoder_stats(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("encoder."): v for k, v in stats.items() if k.startswith("encoder.")}


def _fisher(track: Track, encoder_state: dict, head_state: dict, split, names, config: BaselinesConfig, n: int):
    model = _classifier(track, encoder_state, head_state)
    data = split.subset(n, config.seed)
    return _encoder_stats(statistics.diagonal_fisher(
        model, data.batches(config.fisher_batch_size), param_names=names, seed=config.seed,
        method=track.fisher_method, chunk_size=track.fisher_chunk, label_mode="sample", disable=True))


COUNT_PREFIX = "rows:"


def compute_statistics(track: Track, setup: Setup, config: BaselinesConfig, progress=True) -> dict:
    """Diagonal Fishers (labels sampled from the model), Hessian estimates N_t·F_t and RegMean
    Gram matrices (with their row counts) for every expert, plus θ0's Fisher for gradient
    matching. All cached under keys that cover the data, the models, every setting and the code."""
    # Fisher/Hessian of parameters only: BatchNorm running statistics are buffers, which every
    # merge averages (lib.merging's buffer rule).
    parameters = {n for n, _ in track.pretrained_encoder().named_parameters()}
    names = [f"encoder.{k}" for k in setup.mergeable if k in parameters]
    fisher_settings = {"method": track.fisher_method, "label_mode": "sample", "batch_size": config.fisher_batch_size,
                       "n": config.fisher_examples, "seed": config.seed, "names": _names_hash(names),
                       "chunk": track.fisher_chunk}  # the chunk changes only the order of a float sum
    fisher_code = (_fisher, statistics.diagonal_fisher, statistics.sum_sq_grads)
    fishers, grams, counts, sizes = {}, {}, {}, {}
    for task in tqdm(track.tasks, desc=f"{track.name} statistics", disable=not progress):
        expert = setup.experts[task]
        train = track.split(task, "train")
        sizes[task] = len(train)
        key = {**track.identity([task]), "task": task, "expert": content_hash(expert.encoder),
               "head": content_hash(expert.heads[task])}

        def fisher(split=train, expert=expert, task=task):
            return _fisher(track, expert.encoder, expert.heads[task], split, names, config, config.fisher_examples)

        def gram(split=train, expert=expert, task=task):
            model = _classifier(track, expert.encoder, expert.heads[task])
            data = split.subset(config.regmean_examples, config.seed)
            g, c = statistics.gram_matrices(model, data.batches(64), return_counts=True, disable=True)
            # row counts travel with the Grams, as 0-d tensors under a prefix no weight has
            return {**g, **{f"{COUNT_PREFIX}{k}": torch.tensor(v) for k, v in c.items()}}

        fishers[task] = cached_tensors("fisher", {**key, **fisher_settings}, fisher, code=fisher_code)
        cached = cached_tensors("gram", {**key, "n": config.regmean_examples, "seed": config.seed}, gram,
                                code=(statistics.gram_matrices,))
        grams[task] = _encoder_stats({k: v for k, v in cached.items() if not k.startswith(COUNT_PREFIX)})
        counts[task] = _encoder_stats({k.removeprefix(COUNT_PREFIX): int(v) for k, v in cached.items()
                                       if k.startswith(COUNT_PREFIX)})

    # θ0's own Fisher, on the pooled task data through each task's head (its pre-training data is
    # not available): H0 = N0·F0 with N0 the mean task training-set size, i.e. θ0 weighs like one task.
    def fisher0():
        per_task = config.fisher_examples // len(track.tasks) + 1
        parts = [_fisher(track, setup.pretrained, setup.heads[t], track.split(t, "train"), names, config, per_task)
                 for t in track.tasks]
        return {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}

    key0 = {**track.identity(track.tasks), "task": "pretrained-pooled",
            "heads": {t: content_hash(setup.heads[t]) for t in track.tasks}}
    fisher_pretrained = cached_tensors("fisher", {**key0, **fisher_settings}, fisher0, code=fisher_code)
    n0 = float(np.mean(list(sizes.values())))
    return {
        "fisher": fishers, "gram": grams, "gram_counts": counts, "train_sizes": sizes,
        "hessian": {t: statistics.hessian_estimate(fishers[t], sizes[t]) for t in track.tasks},
        "hessian_pretrained": statistics.hessian_estimate(fisher_pretrained, n0),
    }


def _names_hash(names) -> str:
    return hashlib.sha256("|".join(names).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- merging
@dataclass
class MergeResult:
    state: dict[str, torch.Tensor]  # full encoder state
    hyperparameters: dict = field(default_factory=dict)
    selection: Selection | None = None
    seconds: float = 0.0


def _as_matrices(state: dict, grams: dict) -> dict:
    """RegMean sees conv kernels as linear maps over unfolded patches: (out, in·k·k)."""
    return {k: (v.flatten(1) if k in grams and v.dim() == 4 else v) for k, v in state.items()}


def _merge(method: str, pre: dict, fts: list, stats: dict, setup: Setup, **hyper) -> dict:
    """One registry merge over the mergeable keys; statistics restricted to those keys."""
    entry = merging.REGISTRY[method]
    tasks = setup.track.tasks
    keep = lambda d: {k: v for k, v in d.items() if k in pre}  # noqa: E731
    # Only what the method reads, so a merge that needs no statistics runs without them.
    merge_stats = {name: [keep(stats[name][t]) for t in tasks] for name in entry.needs}
    if "gram" in entry.needs:
        merge_stats["gram_counts"] = [stats["gram_counts"][t] for t in tasks]
    if "hessian" in entry.needs:
        merge_stats["hessian_pretrained"] = keep(stats["hessian_pretrained"])
    if method != "regmean":
        return entry(pre, fts, merge_stats, **hyper)
    grams = merge_stats["gram"][0]
    flat = entry(_as_matrices(pre, grams), [_as_matrices(f, grams) for f in fts], merge_stats, **hyper)
    return {k: v.reshape(pre[k].shape) for k, v in flat.items()}


def _validation_average(setup: Setup, encoder, state: dict, data, config: BaselinesConfig) -> float:
    """Mean validation score over tasks: accuracy, or a GLUE task's official score (``score``)."""
    res = evaluate(data, encoder, setup.complete(state), setup.heads, split="validation",
                   max_examples=config.selection_examples)
    return float(np.mean([r.get("score", r["accuracy"]) for r in res.values()]))


def closed_form_merges(track: Track, setup: Setup, stats: dict, config: BaselinesConfig,
                       methods=METHODS, progress=True) -> dict[str, MergeResult]:
    """Every method of ``methods``, its tuned hyper-parameters chosen on validation."""
    pre = setup.restrict(setup.pretrained)
    fts = [setup.restrict(s) for s in setup.finetuned()]
    encoder = track.pretrained_encoder()
    results: dict[str, MergeResult] = {}
    bar = tqdm(methods, desc=f"{track.name} merges", disable=not progress)
    for method in bar:
        entry = merging.REGISTRY[method]
        bar.set_postfix_str(entry.label)
        fixed = config.hyperparameters(method)
        chosen, selection = {}, None
        for name, grid in entry.tuned.items():  # one tuned hyper-parameter per method here
            grid = config.lambda_grid if name == "scale" else grid

            def score(value, data, name=name):
                state = _merge(method, pre, fts, stats, setup, **fixed, **chosen, **{name: value})
                return _validation_average(setup, encoder, state, data, config)

            selection = select(name, grid, score, track, bounds=(0.0, None),
                               refinements=config.lambda_refinements if name == "scale" else 0)
            chosen[name] = selection.best
        start = time.perf_counter()
        merged = _merge(method, pre, fts, stats, setup, **fixed, **chosen)
        results[entry.label] = MergeResult(setup.complete(merged), {**fixed, **chosen}, selection,
                                           time.perf_counter() - start)
    return results


# ----------------------------------------------------------------------------- the table
@dataclass
class TrackResult:
    """Everything one track's run produced."""

    name: str
    seed: int
    setup: Setup
    merges: dict[str, MergeResult]
    table: pd.DataFrame                                  # long: method × task × batchnorm
    outcomes: dict[tuple[str, str], dict[str, np.ndarray]]  # (row, batchnorm) -> task -> correct? (GLUE: predictions)

    def correct(self, row: str, batchnorm: str = "stored") -> dict[str, np.ndarray]:
        """Per task, the row's per-example outcomes: correct or not, or (a track scored by official
        metrics, GLUE) the predictions themselves."""
        return self.outcomes[(row, batchnorm)]

    def _bootstrap_score(self):
        """A GLUE task's score (points) of predictions at some rows of its test examples."""
        return official_score(self.setup.track, self._gold())

    def _gold(self) -> dict[str, np.ndarray]:
        """The test labels official scores need (accuracy needs none, so none are read for it)."""
        return gold_test_labels(self.setup.track) if scored_officially(self.setup.track) else {}

    def difference(self, a: str, b: str, a_batchnorm: str = "stored", b_batchnorm: str = "stored") -> Estimate:
        """Average score of row ``a`` minus row ``b`` (points) with its SE, paired over the same test
        examples: analytic for accuracy, a seeded paired bootstrap for GLUE's official scores."""
        return score_difference(self.setup.track, self.correct(a, a_batchnorm), self.correct(b, b_batchnorm),
                                self._gold(), seed=self.seed)

    def average(self, row: str) -> Estimate:
        """Average score of ``row`` (points) with its SE over the test examples."""
        return score_average(self.setup.track, self.correct(row), self._gold(), seed=self.seed)


# Per-example outcomes and their scores. An outcome is "correct or not" on a track scored by
# accuracy, and the prediction itself on a track scored by official metrics (GLUE), whose scores
# need the gold labels of the examples scored: ``gold`` maps a task's display name to them.
def outcome(result: dict) -> np.ndarray:
    """The per-example outcome of one task's ``evaluate``-style result: its predictions when the
    track is scored by official metrics (the result has ``score``), else correct or not."""
    return result["predicted"] if "score" in result else result["correct"]


def gold_test_labels(track: Track) -> dict[str, np.ndarray]:
    """Every task's test labels, keyed by display name (as outcomes are)."""
    return {track.display_name(t): track.split(t, "test").labels for t in track.tasks}


def official_score(track: Track, gold: dict[str, np.ndarray]):
    """``score(name, predicted, rows)``: a task's official score (points) of the predictions at
    ``rows`` against ``gold[name]`` at the same rows, what ``paired_bootstrap`` resamples."""
    task_of = {track.display_name(t): t for t in track.tasks}  # outcomes are keyed by display name
    return lambda name, predicted, rows: track.score(task_of[name], predicted[rows], gold[name][rows])


def score_difference(track: Track, a: dict, b: dict, gold: dict[str, np.ndarray], seed: int = 0,
                     resamples: int = 1000) -> Estimate:
    """Average score of outcomes ``a`` minus ``b`` (points), paired over the same examples: the
    analytic paired SE for accuracy, a seeded paired bootstrap for official scores."""
    if not scored_officially(track):
        return paired_difference(a, b)
    return paired_bootstrap(official_score(track, gold), a, b, resamples=resamples, seed=seed)


def score_average(track: Track, a: dict, gold: dict[str, np.ndarray], seed: int = 0, resamples: int = 1000) -> Estimate:
    """Average score of outcomes ``a`` (points) with its SE over the examples (as ``score_difference``)."""
    if not scored_officially(track):
        return mean_accuracy(a)
    return paired_bootstrap(official_score(track, gold), a, resamples=resamples, seed=seed)


def evaluate_methods(track: Track, setup: Setup, merged: dict[str, MergeResult], reestimate_bn: bool = False,
                     progress=True, split: str = "test") -> tuple[pd.DataFrame, dict]:
    """Long table (one row per method, task and BatchNorm variant: accuracy, official metric,
    normalized score) and the per-example outcomes behind it, on ``split`` (the multi-task row
    only when the setup has a multi-task model)."""
    encoder = track.pretrained_encoder()
    rows, outcomes = [], {}

    def add(method, kind, results, bn="stored"):
        for task, r in results.items():
            task = track.display_name(task)  # a user's task by its name, not its path
            # GLUE (official scores): the predictions, which a bootstrap resamples; else correct or not
            outcomes.setdefault((method, bn), {})[task] = outcome(r)
            rows.append({"track": track.name, "method": method, "kind": kind, "task": task, "batchnorm": bn,
                         **{k: v for k, v in r.items() if k not in ("correct", "predicted")}})

    add(PRETRAINED, "reference", evaluate(track, encoder, setup.pretrained, setup.heads, split=split))
    for task in track.tasks:
        add(EXPERTS, "reference", evaluate(track, encoder, setup.experts[task].encoder, setup.heads, tasks=[task],
                                           split=split))
    if setup.multitask is not None:
        add(MULTITASK, "reference", evaluate(track, encoder, setup.multitask.encoder, setup.multitask.heads,
                                             split=split))
    for name, result in tqdm(merged.items(), desc=f"{track.name} evaluation", disable=not progress):
        add(name, "merge", evaluate(track, encoder, result.state, setup.heads, split=split))
        if reestimate_bn:
            state = reestimate_on_training_data(encoder, result.state, track, track.tasks)
            add(name, "merge", evaluate(track, encoder, state, setup.heads, split=split), bn="re-estimated")
    table = pd.DataFrame(rows)
    value = score_column(table)
    expert = table[table.method == EXPERTS].set_index("task")[value]
    table["normalized"] = 100 * table[value] / table["task"].map(expert)
    return table, outcomes


def score_label(table: pd.DataFrame) -> str:
    """How a table's per-task numbers read in a caption."""
    return "official GLUE score ×100" if score_column(table) == "score" else "accuracy %"


def score_column(table: pd.DataFrame) -> str:
    """What a table's averages and normalized scores are of: accuracy, or (a GLUE table, which
    has the column ``score``) each task's official score, as the GLUE papers report."""
    return "score" if "score" in table.columns else "accuracy"


def run_track(name: str, config: BaselinesConfig, seed: int | None = None, progress: bool = True,
              lap=lambda label: None) -> TrackResult:
    """Experts, statistics, merges and evaluation of one track at one seed. The multi-task
    reference (the costliest model to train) is trained at ``config.seed`` only: the seed spread
    is about the merges."""
    seed = config.seed if seed is None else seed
    track = config.track(name, seed)
    expert_config, multitask_config = config.finetune_configs(name, len(track.tasks), seed)
    setup = prepare_track(track, expert_config, multitask_config if seed == config.seed else None, progress=progress)
    lap(f"{name} seed {seed}: experts ready")
    stats = compute_statistics(track, setup, config, progress=progress)
    lap(f"{name} seed {seed}: statistics ready")
    merged = closed_form_merges(track, setup, stats, config, progress=progress)
    lap(f"{name} seed {seed}: merges ready")
    table, outcomes = evaluate_methods(track, setup, merged, reestimate_bn=track.has_batchnorm,
                                       progress=progress)
    lap(f"{name} seed {seed}: evaluated")
    return TrackResult(name, seed, setup, merged, table, outcomes)


def row_labels(table: pd.DataFrame) -> pd.Series:
    return table.method + np.where(table.batchnorm == "re-estimated", " (BN re-estimated)", "")


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Wide table: methods × tasks (accuracy; GLUE: official score), plus their average and the
    normalised score."""
    key = row_labels(table)
    wide = table.assign(row=key).pivot_table(index="row", columns="task", values=score_column(table), sort=False)
    wide["Average"] = wide.mean(axis=1)
    wide["Normalized"] = table.assign(row=key).groupby("row", sort=False)["normalized"].mean()
    return wide.round(1)


def training_table(results: dict[str, TrackResult]) -> pd.DataFrame:
    rows = []
    for name, result in results.items():
        multitask = [("multi-task", result.setup.multitask)] if result.setup.multitask is not None else []
        for task, expert in [*result.setup.experts.items(), *multitask]:
            info = expert.info
            model = result.setup.track.display_name(task) if task in result.setup.experts else task
            rows.append({"track": name, "model": model, "steps": info.get("steps"), "best step": info.get("best_step"),
                         "stopped early": info.get("stopped_early"),
                         "validation acc.": 100 * info.get("best_validation_accuracy", float("nan")),
                         "seconds": info.get("seconds"),
                         **({"source": info["source"]} if "source" in info else {})})  # published experts
    return pd.DataFrame(rows).set_index(["track", "model"]).round(1)


def hyperparameter_table(results: dict[str, TrackResult]) -> pd.DataFrame:
    """Chosen hyper-parameters, where the selection's optimum lay, and each merge's time."""
    rows = []
    for name, result in results.items():
        for method, r in result.merges.items():
            rows.append({"track": name, "method": method,
                         "hyper-parameters": ", ".join(f"{k}={v}" for k, v in r.hyperparameters.items()),
                         "chosen on validation": (f"{r.selection.parameter}={r.selection.best:g}" if r.selection else "-"),
                         "selection note": (r.selection.note if r.selection else "") or "-",
                         "merge seconds": round(r.seconds, 2)})
    return pd.DataFrame(rows).set_index(["track", "method"])


def selection_curves(results: dict[str, TrackResult]) -> pd.DataFrame:
    """Validation score of every grid value tried, per track and method (long)."""
    rows = [{"track": name, "method": method, "parameter": r.selection.parameter, "value": v, "validation score": s}
            for name, result in results.items() for method, r in result.merges.items() if r.selection
            for v, s in r.selection.scores]
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- seeds
def seed_spread(results: dict[str, TrackResult], config: BaselinesConfig, lap=lambda label: None) -> pd.DataFrame | None:
    """The vision track rerun at ``config.spread_seeds`` beside its main run (``seed_table``), or
    None without spread seeds (the paper scale's published experts have no seed)."""
    if "vision" not in results or not config.spread_seeds:
        return None
    reruns = [run_track("vision", config, seed=s, progress=config.progress, lap=lap) for s in config.spread_seeds]
    return seed_table([results["vision"], *reruns])


def seed_table(results_by_seed: list[TrackResult]) -> pd.DataFrame:
    """Average accuracy and normalized score of every row at every seed (long)."""
    rows = []
    for result in results_by_seed:
        t = result.table.assign(row=row_labels(result.table))
        for row, group in t.groupby("row", sort=False):
            rows.append({"track": result.name, "seed": result.seed, "row": row,
                         "average accuracy": group["accuracy"].mean(), "normalized": group["normalized"].mean()})
    return pd.DataFrame(rows)


def seed_summary(seeds: pd.DataFrame) -> pd.DataFrame:
    """Mean ± standard deviation over seeds of each row's average accuracy and normalized score."""
    g = seeds.groupby(["track", "row"], sort=False)
    out = pd.DataFrame({"seeds": g.size(), "average accuracy": g["average accuracy"].mean(),
                        "± sd": g["average accuracy"].std(ddof=1), "normalized": g["normalized"].mean(),
                        "± sd ": g["normalized"].std(ddof=1)})
    return out.round(2)


def seed_difference(seeds: pd.DataFrame, track: str, a: str, b: str) -> Estimate:
    """Mean over seeds of (a − b) in average accuracy, with its standard error over seeds."""
    t = seeds[seeds.track == track].pivot_table(index="seed", columns="row", values="average accuracy")
    return over_seeds((t[a] - t[b]).dropna().tolist())


# ----------------------------------------------------------------------------- findings
def comparison_table(result: TrackResult) -> pd.DataFrame:
    """Every row of the table against doing nothing (θ0 with the experts' heads): the paired
    difference in average accuracy over the same test examples, its SE and the verdict."""
    rows = []
    for row, bn in result.outcomes:
        if row == PRETRAINED or row == EXPERTS:
            continue
        d = result.difference(row, PRETRAINED, a_batchnorm=bn)
        label = row + (" (BN re-estimated)" if bn == "re-estimated" else "")
        rows.append({"track": result.name, "row": label, "minus θ0 (points)": round(d.value, 2),
                     "SE": round(d.se, 2), "verdict vs θ0": verdict(d)})
    return pd.DataFrame(rows).set_index(["track", "row"])


def _normalized(result: TrackResult, bn: str = "stored") -> pd.Series:
    t = result.table[result.table.batchnorm == bn]
    return t.groupby("method", sort=False)["normalized"].mean()


def published_comparison(result: TrackResult) -> str:
    """Each row's average accuracy (± SE over the test examples) beside the AdaMerging paper's
    (CLIP ViT-B/32 on its 8 tasks), or on GLUE each merge's normalized score beside Twin-Merging's
    (RoBERTa-base on its 8 tasks): only comparable when this run is that setup."""
    track = result.setup.track
    if scored_officially(track):
        return _published_glue_comparison(result)
    arch = getattr(track, "arch", None)  # the paper-scale vision track's CLIP model
    if arch != "ViT-B-32" or tuple(track.tasks) != PAPER_VISION_TASKS:
        return (f"not comparable ({arch or track.backbone_id()} on {len(track.tasks)} tasks; the published "
                "numbers are ViT-B/32 on the 8 tasks)")
    published = {PRETRAINED: PAPER_VIT_B32["Pretrained"], EXPERTS: PAPER_VIT_B32["Individual experts"],
                 **{m: v for m, v in PAPER_VIT_B32.items() if m in result.merges}}
    parts = []
    for row, paper in published.items():
        estimate = result.average(row)
        parts.append(f"{row} {estimate.value:.1f} ± {estimate.se:.1f} (published {paper:.1f})")
    return "; ".join(parts)


def _published_glue_comparison(result: TrackResult) -> str:
    """Normalized scores (official score / the expert's, × 100, averaged over tasks) beside
    Twin-Merging's. The SE is a bootstrap over test examples that holds the experts' scores fixed."""
    track = result.setup.track
    if tuple(track.tasks) != PAPER_TEXT_TASKS:
        return (f"not comparable ({len(track.tasks)} GLUE tasks; the published numbers are RoBERTa-base on the 8 "
                "tasks)")
    table = result.table[(result.table.method == EXPERTS) & (result.table.batchnorm == "stored")]
    expert = table.set_index("task")["score"]
    score = result._bootstrap_score()
    normalized = lambda task, predicted, rows: 100 * score(task, predicted, rows) / expert[task]  # noqa: E731
    parts = []
    for row, paper in PAPER_ROBERTA_GLUE.items():
        if row not in result.merges:
            continue
        estimate = paired_bootstrap(normalized, result.correct(row), seed=result.seed)
        rerun = PAPER_ROBERTA_GLUE_RERUN.get(row)
        parts.append(f"{row} {estimate.value:.1f} ± {estimate.se:.1f} normalized (published {paper:.1f}"
                     + (f"; the authors' re-run {rerun:.1f}" if rerun is not None else "") + ")")
    note = "" if track.max_test == GLUE_MAX_TEST else f" (test sets capped at {track.max_test}, not Twin-Merging's 1,000)"
    return "; ".join(parts) + note


def findings(results: dict[str, TrackResult], seeds: pd.DataFrame | None = None) -> str:
    """The verdicts of notebook 01, computed from its results. Differences are paired over the
    same test examples (SE from the per-example outcomes) and, where several seeds ran, over seeds."""
    claims, notes = [], []
    paper_ta = 100 * PAPER_VIT_B32["Task Arithmetic"] / PAPER_VIT_B32["Individual experts"]
    paper_ties = 100 * PAPER_VIT_B32["TIES"] / PAPER_VIT_B32["Individual experts"]
    paper_zero = 100 * PAPER_VIT_B32["Pretrained"] / PAPER_VIT_B32["Individual experts"]
    for name, result in results.items():
        norm = _normalized(result)
        merges = list(result.merges)
        best = max(merges, key=lambda m: norm[m])  # descriptive only: the verdict uses TA, fixed beforehand
        d_ta = result.difference("Task Arithmetic", PRETRAINED)
        glue = scored_officially(result.setup.track)
        unit = "average GLUE score (official metrics; SE by paired bootstrap)" if glue else "average accuracy"
        published = (f"Published (RoBERTa-base, 8 GLUE tasks, Twin-Merging): Task Arithmetic "
                     f"{PAPER_ROBERTA_GLUE['Task Arithmetic']:.1f}%, TIES {PAPER_ROBERTA_GLUE['TIES']:.1f}% normalized"
                     if glue else f"Published (CLIP ViT-B/32, 8 tasks): θ0 {paper_zero:.0f}%, Task Arithmetic "
                     f"{paper_ta:.0f}%, TIES {paper_ties:.0f}% normalized")
        claims.append(Claim(
            f"{name} track: merging recovers what θ0 lacks (Task Arithmetic, λ on validation, vs θ0)", held(d_ta),
            f"Task Arithmetic − θ0 = {d_ta} points of {unit}; normalized: θ0 with the experts' heads "
            f"{norm[PRETRAINED]:.1f}%, Task Arithmetic {norm['Task Arithmetic']:.1f}%, TIES {norm['TIES']:.1f}%, "
            f"highest merge on test {best} {norm[best]:.1f}%"
            + (f", multi-task {norm[MULTITASK]:.1f}%" if MULTITASK in norm else "") + f". {published}. "
            f"Headroom above the highest merge: {100 - norm[best]:.1f} points.",
            "θ0 with the experts' heads (doing nothing)"))
        # the paper's ordering, pair by pair, with uncertainties
        ordered = [m for m in ("Weight averaging", "Fisher", "Task Arithmetic", "RegMean", "TIES") if m in result.merges]
        seeded = seeds is not None and len(seeds) and seeds[seeds.track == name].seed.nunique() > 1
        pairs, verdicts = [], []
        for lower, higher in zip(ordered, ordered[1:]):
            d = result.difference(higher, lower)
            verdicts.append(verdict(d))
            over = ""
            if seeded:  # the verdict must also survive a change of seed
                s = seed_difference(seeds, name, higher, lower)
                verdicts[-1] = verdicts[-1] if verdict(s) == verdicts[-1] else "within noise"
                over = f"; over seeds {s}, {verdict(s)}"
            pairs.append(f"{higher} − {lower} = {d} ({verdict(d)}{over})")
        outcome = ("held" if all(v == "better" for v in verdicts) else "did not hold" if "worse" in verdicts
                   else "not contradicted (some steps within noise)")
        claims.append(Claim(
            f"{name} track: the paper's ordering WA < Fisher < TA < RegMean < TIES", outcome,
            "; ".join(pairs) + ".", "θ0 (see the first claim) — each step is a paired difference on the same test examples"))
        if (result.table.batchnorm == "re-estimated").any():
            changes = {m: result.difference(m, m, a_batchnorm="re-estimated") for m in merges}
            kinds = {verdict(d) for d in changes.values()}
            outcome = "held" if kinds == {"better"} else "did not hold" if kinds == {"worse"} else "mixed"
            claims.append(Claim(
                f"{name} track: re-estimating BatchNorm statistics helps merges", outcome,
                "Re-estimated minus averaged running statistics, average accuracy: "
                + ", ".join(f"{m} {d} ({verdict(d)})" for m, d in changes.items()) + ".",
                "the same merge with the experts' averaged running statistics"))
        for method, r in result.merges.items():
            if r.selection and r.selection.note:
                notes.append(f"{name}, {method}: {r.selection.note}.")
        if result.setup.track.scale == "paper":
            what = "normalized scores" if scored_officially(result.setup.track) else "average accuracies"
            notes.append(f"{name} track against the published {what}: {published_comparison(result)}.")
    if seeds is not None and len(seeds) and seeds.seed.nunique() > 1:
        for name in seeds.track.unique():
            n = seeds[seeds.track == name].seed.nunique()
            result = results.get(name)
            if result is None:
                continue
            d = seed_difference(seeds, name, "TIES", "Task Arithmetic")
            d0 = seed_difference(seeds, name, "Task Arithmetic", PRETRAINED)
            claims.append(Claim(
                f"{name} track over {n} seeds: TIES beats Task Arithmetic (the papers' claim)", held(d),
                f"TIES − Task Arithmetic: {d} points of average accuracy (mean ± SE over seeds); Task Arithmetic − θ0: "
                f"{d0}. A difference 'within noise' here does not survive a change of seed (or of machine).",
                "θ0 with the experts' heads, per seed"))
    scales = {r.setup.track.scale for r in results.values()}
    preamble = ("*Small-scale numbers (MiniLM-L6 text track, CIFAR ResNet-20 vision track); not the papers' numbers.* "
                if scales == {"small"} else "*Paper scale: the papers' models, tasks and published experts.* ")
    preamble += "Differences: paired over the same test examples, ± one standard error; a verdict needs 2 SE."
    return findings_markdown("Findings: closed-form baselines", claims, preamble, notes)


# ----------------------------------------------------------------------------- figures
def plot_normalized(results: dict[str, TrackResult], seeds: pd.DataFrame | None = None):
    """Normalized score of every row, per track; vision: BN re-estimated marks and seed error bars."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items()):
        merged = list(result.merges)
        order = [PRETRAINED, *merged, MULTITASK]
        avg = _normalized(result).reindex(order)
        colors = ["#999999"] + sns.color_palette("viridis", len(merged)) + ["#444444"]
        xerr = None
        if seeds is not None and name in set(seeds.track):
            sd = seeds[seeds.track == name].groupby("row")["normalized"].std(ddof=1)
            xerr = sd.reindex(order).fillna(0).values[::-1]
        ax.barh(avg.index[::-1], avg.values[::-1], color=colors[::-1], xerr=xerr, capsize=3)
        if (result.table.batchnorm == "re-estimated").any():
            bn = _normalized(result, "re-estimated").reindex(order)
            ax.scatter(bn.values[::-1], range(len(order)), marker="|", s=200, color="crimson",
                       label="BN re-estimated", zorder=3)
            ax.legend(loc="lower right")
        ax.axvline(100, color="black", lw=0.8, ls="--")
        for y, v in enumerate(avg.values[::-1]):
            ax.text(v + 1, y, f"{v:.1f}", va="center", fontsize=8)
        ax.set_xlabel("normalized score (% of the individual experts)" + (" ± sd over seeds" if xerr is not None else ""))
        ax.set_title(f"{name} track ({len(result.setup.track.tasks)} tasks), small scale")
        ax.set_xlim(0, 115)
    fig.tight_layout()
    return fig


def plot_per_task(results: dict[str, TrackResult]):
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 4.5), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items()):
        t = result.table[(result.table.batchnorm == "stored") & (result.table.method != EXPERTS)]
        heat = t.pivot_table(index="method", columns="task", values="normalized", sort=False)
        sns.heatmap(heat, annot=True, fmt=".0f", cmap="RdYlGn", vmin=30, vmax=100, ax=ax, cbar=False)
        ax.set_title(f"{name}: normalized score per task (small scale)")
        ax.set_xlabel("")
        ax.set_ylabel("")
    fig.tight_layout()
    return fig


def plot_selection(curves: pd.DataFrame):
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(curves.track))
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        for method, c in curves[curves.track == name].groupby("method", sort=False):
            ax.plot(c["value"], c["validation score"], marker=".", label=method)
        ax.set_xlabel("λ")
        ax.set_ylabel("validation score, avg over tasks\n(accuracy; GLUE: official score)")
        ax.set_title(f"{name}: choosing λ on validation")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
