"""Uncertainty-based gradient matching (Daheim et al., ICLR 2024) at small and at paper scale.

Everything ``notebooks/04_gradient_matching.ipynb`` runs, as plain functions:

    config = notebook_config(GradientMatchingConfig, globals())   # the notebook's parameters
    track = make_track(config)
    models = train_models(track, config)                   # θ0, task models, all-data, without-r
    stats = compute_fishers(track, models, config)         # F̂ and N for θ0 and every task model
    curves = alpha_curves(...); chosen = choose_alpha(...) # TA's α chosen on validation only
    main = main_results(models, stats, evaluator, config, chosen)
    mismatch_table(...), removal_results(...), time_per_example_gradients(...)
    findings(main, curves, mismatch, removal, timing, config)   # the verdicts, as Markdown

The tensor rules (the merge, data removal, gradient mismatch) live in
``lib.merging.gradient_matching``; this module trains, evaluates and tabulates.

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

**Paper scale** (``GradientMatchingConfig(scale="paper")``; the paper's sentiment experiment with
the settings of its public code, UKPLab/iclr2024-model-merging; ``PAPER_SCALE`` sets them on the
fields left at their small-scale defaults, so any of them can still be overridden):

- θ0 = ``FacebookAI/roberta-base`` fine-tuned on **IMDB** with a fresh two-class head
  (RoBERTa's dense-tanh-out_proj classifier, ``lib.paper.glue.initial_head``); task models
  fine-tuned from θ0 (encoder and head) on **Yelp polarity, Rotten Tomatoes, SST-2, Amazon
  polarity** (Amazon's input is title + " " + content). The whole model, token embeddings and
  head included, is merged (``SentimentTrack``; data in ``lib.paper.sentiment`` and
  ``data/sentiment_tasks.yaml``).
- Recipe (``lib.paper.sentiment.SentimentRecipe``; :func:`finetune_recipe`): AdamW, lr 1e-5,
  batch 16, one epoch, 100 linear warm-up steps then linear decay to 0, weight decay 0,
  dropout 0 (trained in eval mode: RoBERTa has no other train/eval difference), gradients
  clipped to norm 1.0, inputs truncated to 384 tokens. No early stopping: the model after the
  epoch is kept. The all-data target and the without-r model get the same recipe on the union
  of their datasets, shuffled together: one epoch of Σt ℓ̄t, each dataset weighted by its size.
- N (``train_examples``, the task file's defaults): IMDB 25,000, Yelp 112,000, RT 8,530,
  SST-2 67,349, Amazon 180,000 training examples, seeded class-stratified subsets; H = N·F̂.
- F̂ over the whole training set (``fisher_examples=None``), labels sampled from the model, as
  the public Fisher script does (it runs batch size 1; the hooks method computes the same exact
  per-example gradients in batches). δ = 1e-12, α = 1.
- Test: the hub's test splits (SST-2: its validation split, its test labels being hidden),
  each capped at ``max_test`` = 5,000 seeded class-stratified examples (RT 1,066 and SST-2 872
  in full); validation: RT's own split, else a seeded 10% of train (``max_validation`` kept).
- Compute: training, Fishers, gradients and inference on ``device`` ("auto": CUDA when there
  is one), forward passes under bf16 autocast there (``autocast``), Fishers and gradients in
  float32; merges on the CPU in float32.

Cost (measured on one H200 with a random RoBERTa-base of the same shape, eager attention): a
training step of 16 inputs under bf16 autocast takes about 45 ms (at 128 and at 384 tokens
alike), an exact per-example squared gradient in float32 (hooks, batches of 32) 11-14 ms, and
inference 0.4 ms per 384-token input; peak GPU memory 16 GiB. With the defaults that is about
61k training steps (45 min: the all-data target 24k of them), 2 × 384k per-example gradients for
the two Fisher estimates (about 2.5 h, the bulk; ``fisher_examples=10000`` cuts it to about
20 min) and a few minutes of evaluation: roughly 3.5 GPU hours in all (an estimate from those
timings, not a measured run).

Deviations from the paper's setup: IMDB and SST-2 have no validation split, so 10% of their
training sets is held out and they train on 22,500 and 60,614 examples (N is what the model was
trained on); the training forward passes run under bf16 autocast on a GPU (the public script
trains in float32; ``autocast="off"`` does too); batches are drawn at random, not grouped; the
removal experiment (``removed_task="amazon"``, the cheapest to retrain without) and the
all-data target are this project's additions, not part of the paper's sentiment table. The
paper publishes no number this notebook is compared against (METHODS.md §7 lists none).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import merging, statistics
from ..functional import additive_attention_mask, eval_mode
from ..merging.gradient_matching import (
    DELTA,
    gradient_mismatch,
    objective_gradient_norm,
    perturb_hessians,
    relative_change,
    relative_damping,
    removal_amplification,
    remove_plain,
    remove_uncertainty_weighted,
)
from ..models import Classifier
from ..paper import glue, sentiment
from . import cache, cost
from .cache import cache_path, cached_tensors, content_hash, load_cached, load_metadata, save_tensors_atomic
from .config import take_unchanged
from .evaluation import predict
from .findings import (
    Claim,
    Estimate,
    difference_of_estimates,
    findings_markdown,
    held,
    mean_accuracy,
    paired_difference,
    verdict,
)
from .selection import Selection, select
from .paper_tracks import autocast_dtype, run_device
from .tracks import PreparedSplit, TextTrack, Track, model_inputs
from .training import (Expert, FinetuneConfig, encode, finetune, head_module, probe_heads, run_device_of,
                       validation_score)

StateDict = dict[str, torch.Tensor]

# How every F̂ is computed (METHODS.md §1: labels sampled from the model). Part of the cache key.
FISHER_LABELS = "sample"
FISHER_METHOD = "hooks"   # exact per-example gradients, the fastest method here (see the timing table)
FISHER_CHUNK = None


# ----------------------------------------------------------------------------- configuration
PAPER_RECIPE = sentiment.SentimentRecipe()
PAPER_MAX_TEST = 5000  # test examples per dataset at paper scale (RT's and SST-2's test sets are smaller: all)

# The paper scale (issue 12; module docstring): what ``scale="paper"`` sets on the fields left at
# their small-scale defaults. The numbers of training examples (the N of H = N·F̂) come from
# data/sentiment_tasks.yaml unless ``train_examples`` is given.
PAPER_SCALE = {
    "base_task": sentiment.PAPER_SENTIMENT_BASE, "tasks": sentiment.PAPER_SENTIMENT_TASKS, "removed_task": "amazon",
    "max_test": PAPER_MAX_TEST, "batch_size": PAPER_RECIPE.batch_size, "lr": PAPER_RECIPE.lr,
    "warmup_steps": PAPER_RECIPE.warmup_steps, "fisher_examples": None, "delta": sentiment.PAPER_DELTA,
    "mismatch_examples": 1000, "timing_examples": 64,
}


@dataclass
class GradientMatchingConfig:
    """Every setting of notebook 04. The fields are its papermill parameters."""

    scale: str = "small"          # "small" (MiniLM-L6, CPU) or "paper" (RoBERTa-base, the paper's datasets; GPU)
    base_task: str = "mr"                                  # θ0's dataset (IMDB in the paper)
    tasks: tuple[str, ...] = ("cr", "sst2", "mpqa")         # the task models' datasets
    data_dir: str = ""                                     # local mirror (e.g. ../shared/data); "" downloads
    models_dir: str = ""          # paper scale: the folder holding FacebookAI/roberta-base ("" downloads)
    output_dir: str = ""                                   # "" = figures/04_gradient_matching
    seed: int = 0
    max_validation: int = 500     # examples per dataset kept for validation (early stopping, choosing α)
    max_test: int = 1000          # examples per dataset kept for test (seeded, class-stratified)
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
    fisher_examples: int | None = 256  # examples per F̂ (H = N·F̂ with N the full training-set size); None: all
    fisher_batch_size: int = 32
    mismatch_examples: int = 128     # examples per task for the gradients of the mismatch
    delta: float = 1e-12             # δ of gradient matching (the public code's value)
    # merges
    alpha_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
    selection_examples: int = 200    # validation examples per dataset for choosing TA's α
    # data removal: the dataset whose influence is subtracted from the all-data model
    removed_task: str = "mpqa"
    # damped full removal rule: δ = this × the mean entry of H0, about 0.6× its median entry, so
    # only the flattest entries are damped; it bounds the rule's factor Hr/K by max Hr/δ
    removal_damping: float = 0.1
    stability_noise: float = 1e-6    # relative noise put on the Hessians to test the removal rules
    # per-example gradient timing
    timing_examples: int = 128       # per dataset, from the examples its Fisher uses
    timing_vmap_chunks: tuple[int, ...] = (8,)
    # paper scale only: the public code's fine-tuning recipe (lib.paper.sentiment.SentimentRecipe),
    # besides lr, batch_size and warmup_steps above, and where the work runs
    train_examples: tuple[int, ...] = ()   # per dataset (base_task, then tasks); (): data/sentiment_tasks.yaml's
    epochs: int = PAPER_RECIPE.epochs
    max_grad_norm: float = PAPER_RECIPE.max_grad_norm
    weight_decay: float = PAPER_RECIPE.weight_decay
    max_length: int = PAPER_RECIPE.max_length   # tokens per input
    device: str = "auto"                         # "auto": CUDA when there is one
    autocast: str = "auto"                       # forward passes: "auto" (bf16 on CUDA), "bf16", "fp16" or "off"
    progress: bool = True

    paper_profile: ClassVar[dict] = PAPER_SCALE

    def __post_init__(self):
        if self.scale not in ("small", "paper"):
            raise ValueError(f"scale={self.scale!r}: choose 'small' (MiniLM-L6 on the CPU) or 'paper' (RoBERTa-base "
                             "on the paper's sentiment datasets).")
        if self.scale == "paper":
            take_unchanged(self, self.paper_profile)
            for name in self.datasets:
                sentiment.sentiment_task_spec(name)  # an unknown dataset fails here, naming the task file
            if self.train_examples and len(self.train_examples) != len(self.datasets):
                raise ValueError(f"train_examples has {len(self.train_examples)} numbers for {len(self.datasets)} "
                                 f"datasets {self.datasets}: give one per dataset (base_task first), or [] for "
                                 "data/sentiment_tasks.yaml's.")
            autocast_dtype(self.autocast, run_device(self.device))  # an unknown setting fails here, not mid-run
        elif self.train_examples:
            raise ValueError("train_examples is a paper-scale setting (scale='paper'); the small scale trains on "
                             "every training example.")
        if self.removed_task not in self.tasks:
            raise ValueError(f"removed_task={self.removed_task!r} is not one of the task datasets {self.tasks}")

    @property
    def datasets(self) -> list[str]:
        return [self.base_task, *self.tasks]

    def training_examples(self) -> dict[str, int]:
        """Paper scale: how many training examples each dataset's model is trained on (asked for;
        the pool left after holding out validation may be smaller, lib.paper.sentiment)."""
        if self.train_examples:
            return dict(zip(self.datasets, map(int, self.train_examples)))
        defaults = sentiment.default_train_examples()
        return {d: defaults[d] for d in self.datasets}

    def recipe(self) -> sentiment.SentimentRecipe:
        """Paper scale: the fine-tuning recipe with this config's settings."""
        return dataclasses.replace(PAPER_RECIPE, lr=self.lr, batch_size=self.batch_size, epochs=self.epochs,
                                   warmup_steps=self.warmup_steps, max_grad_norm=self.max_grad_norm,
                                   weight_decay=self.weight_decay, max_length=self.max_length)

    def finetune_config(self, steps: int | None = None) -> FinetuneConfig:
        steps = self.finetune_steps if steps is None else steps
        return FinetuneConfig(max_steps=steps, batch_size=self.batch_size, lr=self.lr,
                              warmup_steps=self.warmup_steps, eval_every=self.eval_every,
                              patience=self.patience, seed=self.seed)


def make_track(config: GradientMatchingConfig) -> TextTrack:
    if config.scale == "paper":
        return SentimentTrack(tasks=config.datasets, data_dir=config.data_dir or None, seed=config.seed,
                              max_validation=config.max_validation, max_test=config.max_test,
                              models_dir=config.models_dir or None, device=config.device, autocast=config.autocast,
                              max_length=config.max_length, train_examples=config.training_examples())
    return TextTrack(tasks=config.datasets, data_dir=config.data_dir or None, seed=config.seed,
                     max_validation=config.max_validation, max_test=config.max_test)


@dataclass
class SentimentTrack(Track):
    """Paper scale: RoBERTa-base on the paper's sentiment datasets (``lib.paper.sentiment``), behind
    the small text track's interface. θ0 is the pretrained RoBERTa read at ``<s>``
    (``lib.paper.glue.RobertaEncoder``), on CPU until used; ``encode`` and the paper-scale
    training and statistics run it on ``device`` under ``autocast``. Nothing is frozen."""

    name: str = "sentiment"
    models_dir: str | None = None
    device: str = "auto"
    autocast: str = "auto"
    max_length: int = PAPER_RECIPE.max_length
    train_examples: dict = field(default_factory=dict)  # dataset -> training examples (else the task file's)
    head_kind: str = "joint"  # one fresh two-class head, trained with θ0 and shared by every model
    max_test: int | None = PAPER_MAX_TEST
    scale: str = field(default="paper", init=False, repr=False)

    frozen_parameters: tuple[str, ...] = ()
    fisher_method: str = "hooks"  # transformers' attention masks defeat vmap (lib.statistics)

    def __post_init__(self):
        super().__post_init__()
        for task in self.tasks:
            sentiment.sentiment_task_spec(task)
        autocast_dtype(self.autocast, run_device(self.device))

    def backbone_id(self) -> str:
        return f"{glue.ROBERTA_REPO}@{self.max_length}"

    def _bundle(self):
        if "bundle" not in self._cache:
            self._cache["bundle"] = glue.load_roberta(self.models_dir)  # (encoder, tokenizer)
        return self._cache["bundle"]

    def _load(self, task):
        return sentiment.load_sentiment_task(task, data_dir=self.data_dir, seed=self.seed,
                                             train_examples=self.train_examples.get(task),
                                             max_validation=self.max_validation, max_test=self.max_test)

    def _prepare(self, task, split) -> PreparedSplit:
        tokenizer = self._bundle()[1]
        ids = glue.tokenize(tokenizer, split, self.max_length)
        collate = partial(glue.collate, pad_token_id=tokenizer.pad_token_id)
        return PreparedSplit(task, ids, split.labels, collate, np.array([len(r) for r in ids]))

    @property
    def pad_token_id(self) -> int:
        return self._bundle()[1].pad_token_id

    def pretrained_encoder(self):
        """θ0 on the CPU (a fresh module each call); ``encode`` runs it on ``run_device``."""
        import copy

        encoder = copy.deepcopy(self._bundle()[0])
        encoder.run_device = run_device(self.device)
        encoder.autocast_dtype = autocast_dtype(self.autocast, encoder.run_device)
        return encoder

    def notes(self, task: str) -> tuple[str, ...]:
        return self._raw_task(task).notes


def training_set_sizes(track, datasets: list[str]) -> dict[str, int]:
    """N_d, the full training-set size of every dataset (the N of H = N·F̂; at paper scale the
    number of examples each model was trained on)."""
    return {d: len(track.split(d, "train")) for d in datasets}


def scale_label(config: GradientMatchingConfig) -> str:
    """How captions and titles name the run's scale."""
    return "paper scale" if config.scale == "paper" else "small scale"


def scale_note(config: GradientMatchingConfig) -> str:
    """The bold note that opens the main table's caption."""
    return ("**Paper scale** (RoBERTa-base, the paper's datasets and recipe)" if config.scale == "paper"
            else "**Small scale** (MiniLM-L6; not the paper's numbers)")


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
    info: dict[str, dict] = field(default_factory=dict)                  # name -> training record
    trained_on: dict[str, tuple[str, ...]] = field(default_factory=dict)  # name -> its datasets


def train_models(track: TextTrack, config: GradientMatchingConfig, progress: bool = True) -> Models:
    """θ0, the task models, the all-data model and the without-``removed_task`` model (cached)."""
    if config.scale == "paper":
        return train_models_paper(track, config, progress)
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
    rest = [t for t in everything if t != config.removed_task]
    without = finetune(track, rest, head0, config.finetune_config(config.joint_steps_per_dataset * len(rest)),
                       progress, init=theta0, train_head=True, shared_head=True)
    runs = {f"θ0 ({base})": (theta0, (base,)),
            **{f"task model: {t}": (e, (t,)) for t, e in experts.items()},
            "all data": (all_data, tuple(everything)),
            f"all data without {config.removed_task}": (without, tuple(rest))}
    return Models(
        theta0=full_state(theta0, base, frozen),
        tasks={t: full_state(e, t, frozen) for t, e in experts.items()},
        all_data=full_state(all_data, base, frozen),
        without=full_state(without, base, frozen),
        removed=config.removed_task,
        info={name: expert.info for name, (expert, _) in runs.items()},
        trained_on={name: datasets for name, (_, datasets) in runs.items()},
    )


def train_models_paper(track: "SentimentTrack", config: GradientMatchingConfig, progress: bool = True) -> Models:
    """Paper scale: the same four kinds of model, each trained by the public code's recipe
    (:func:`finetune_recipe`). θ0 starts from RoBERTa-base with a fresh two-class head; every other
    model from θ0, head included."""
    base, everything = config.base_task, config.datasets
    rest = [t for t in everything if t != config.removed_task]
    encoder = track.pretrained_encoder()
    head = glue.initial_head(encoder.feature_dim, 2, seed=config.seed)
    start = {**{f"encoder.{k}": v.detach().clone() for k, v in encoder.state_dict().items()},
             **{f"head.{k}": v for k, v in head.items()}}
    del encoder
    theta0, info0 = finetune_recipe(track, [base], start, config, progress)
    tasks = {t: finetune_recipe(track, [t], theta0, config, progress) for t in config.tasks}
    all_data = finetune_recipe(track, everything, theta0, config, progress)
    without = finetune_recipe(track, rest, theta0, config, progress)
    runs = {f"θ0 ({base})": (info0, (base,)),
            **{f"task model: {t}": (info, (t,)) for t, (_, info) in tasks.items()},
            "all data": (all_data[1], tuple(everything)),
            f"all data without {config.removed_task}": (without[1], tuple(rest))}
    return Models(theta0=theta0, tasks={t: state for t, (state, _) in tasks.items()}, all_data=all_data[0],
                  without=without[0], removed=config.removed_task,
                  info={name: info for name, (info, _) in runs.items()},
                  trained_on={name: datasets for name, (_, datasets) in runs.items()})


def _recipe_lr_factor(step: int, warmup: int, total: int) -> float:
    """transformers' linear schedule: step/warmup during the warm-up, then linear decay to 0."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _recipe_order(sizes: list[int], batch_size: int, epochs: int, seed: int) -> list[np.ndarray]:
    """The batches of the recipe: every epoch a seeded shuffle of all (dataset, row) pairs of the
    datasets together, cut into batches. Rows [k, 2]: (dataset index, row)."""
    pairs = np.concatenate([np.stack([np.full(n, d), np.arange(n)], 1) for d, n in enumerate(sizes)])
    batches = []
    for epoch in range(epochs):
        order = pairs[np.random.default_rng([seed, epoch]).permutation(len(pairs))]
        batches += [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    return batches


CHECKPOINT_EVERY = 1000  # paper-scale fine-tuning saves a resumable checkpoint this often (steps)


def finetune_recipe(track: "SentimentTrack", datasets: list[str], init: StateDict, config: GradientMatchingConfig,
                    progress: bool = True) -> tuple[StateDict, dict]:
    """Paper scale: fine-tune the full state ``init`` (``encoder.*`` and a two-layer ``head.*``) on
    the union of ``datasets`` by the public code's recipe (``config.recipe()``): AdamW, a linear
    warm-up then decay to 0, gradients clipped to ``max_grad_norm``, dropout 0 (the model stays in
    eval mode), ``epochs`` passes over the examples of all datasets shuffled together; the state
    after the last step is kept. Runs on the track's device, forward passes under its autocast.
    Cached under the data, the recipe, the seed, ``init``'s content and this code; a run
    interrupted mid-way resumes from its last checkpoint (every ``CHECKPOINT_EVERY`` steps).
    Returns (state, record: steps, seconds, the final validation accuracy)."""
    from tqdm.auto import tqdm

    from ..heads import classification_head
    from .training import _save_partial

    recipe = config.recipe()
    spec = {**track.identity(datasets), "kind": "gm-paper-finetune", "datasets": list(datasets),
            "recipe": dataclasses.asdict(recipe), "seed": config.seed, "init": content_hash(init),
            "code": cache.code_hash(finetune_recipe, _recipe_lr_factor, _recipe_order, validation_score, encode)}
    path = cache_path("experts/sentiment", spec)
    cached = load_cached(path)
    if cached is not None:
        return cached, load_metadata(path).get("info", {})
    partial_path = path.with_suffix(".partial.safetensors")

    model = Classifier(track.pretrained_encoder(), classification_head(split_state(init)[1], dropout=recipe.dropout))
    load_into(model.encoder, init, track)
    device = run_device_of(model.encoder)
    dtype = model.encoder.autocast_dtype
    model.to(device).eval()  # dropout 0: RoBERTa's only train/eval difference is dropout
    params = [p.requires_grad_() for p in model.parameters()]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, betas=recipe.adam_betas, eps=recipe.adam_epsilon,
                                  weight_decay=recipe.weight_decay)
    splits = [track.split(d, "train") for d in datasets]
    batches = _recipe_order([len(s) for s in splits], recipe.batch_size, recipe.epochs, config.seed)
    state = {"step": 0, "seconds": 0.0}
    saved = load_cached(partial_path)
    if saved is not None:  # resume where an interrupted run stopped
        state = load_metadata(partial_path)["state"]
        model.load_state_dict({k[6:]: v for k, v in saved.items() if k.startswith("model.")})
        for i, p in enumerate(params):
            optimizer.state[p] = {"step": saved[f"opt.{i}.step"], "exp_avg": saved[f"opt.{i}.exp_avg"].to(device),
                                  "exp_avg_sq": saved[f"opt.{i}.exp_avg_sq"].to(device)}
    label = f"{track.name}:{'+'.join(datasets) if len(datasets) < 3 else f'{len(datasets)} datasets'}"
    bar = tqdm(total=len(batches), initial=state["step"], desc=label, disable=not progress, leave=False)
    started = time.perf_counter() - state["seconds"]
    for step in range(state["step"], len(batches)):
        rows = batches[step]
        inputs = glue.pad_batch([splits[d].inputs[r] for d, r in rows], track.pad_token_id)
        labels = torch.as_tensor(np.array([splits[d].labels[r] for d, r in rows]), dtype=torch.long, device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(**{k: v.to(device) for k, v in inputs.items()})
        loss = nn.functional.cross_entropy(logits.float(), labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{label}: the training loss became {loss.item()} at step {step}. Lower lr "
                                     f"(now {recipe.lr}) or check the data of {datasets}.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * _recipe_lr_factor(step, recipe.warmup_steps, len(batches))
        optimizer.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % CHECKPOINT_EVERY == 0 and step + 1 < len(batches):
            state.update(step=step + 1, seconds=time.perf_counter() - started)
            _save_partial(partial_path, model, {}, params, optimizer, state, spec)
    bar.close()
    for p in params:
        p.requires_grad_(False)
    heads = {d: model.head for d in datasets}
    accuracy = validation_score(model.encoder, heads, track, datasets, config.max_validation, config.seed)
    seconds = time.perf_counter() - started
    out = {**{f"encoder.{k}": v.detach().cpu().clone() for k, v in model.encoder.state_dict().items()},
           **{f"head.{k}": v.detach().cpu().clone() for k, v in model.head.state_dict().items()}}
    info = {"steps": len(batches), "best_step": len(batches), "stopped_early": False,
            "best_validation_accuracy": accuracy, "seconds": seconds, "examples": int(sum(len(s) for s in splits))}
    save_tensors_atomic(out, path, {"spec": spec, "info": info})
    partial_path.unlink(missing_ok=True)
    return out, info


def training_table(models: Models, sizes: dict[str, int]) -> pd.DataFrame:
    """How each model was trained; ``sizes`` = :func:`training_set_sizes`."""
    rows = [{"model": name, "steps": i.get("steps"), "best step": i.get("best_step"),
             "stopped early": i.get("stopped_early"),
             "validation acc.": 100 * i.get("best_validation_accuracy", float("nan")),
             "seconds": i.get("seconds"),
             "training-set sizes": ", ".join(f"{d} {sizes[d]}" for d in models.trained_on.get(name, ()))}
            for name, i in models.info.items()]
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
    the model; exact per-example gradients), for every tensor of ``state``. Cached under every
    setting that changes it, and the source of the code that computes it."""
    spec = {**track.identity([task]), "kind": "gm-fisher", "task": task, "model": content_hash(state),
            "n": config.fisher_examples, "seed": config.seed, "batch_size": config.fisher_batch_size,
            "label_mode": FISHER_LABELS, "method": FISHER_METHOD, "chunk_size": FISHER_CHUNK,
            "keys": sorted(state)}

    def compute():
        model = classifier(track, state)
        data = track.split(task, "train").subset(config.fisher_examples, config.seed)
        return statistics.diagonal_fisher(model, data.batches(config.fisher_batch_size), param_names=list(state),
                                          label_mode=FISHER_LABELS, seed=config.seed, method=FISHER_METHOD,
                                          chunk_size=FISHER_CHUNK, disable=True)

    return cached_tensors("fisher", spec, compute,
                          code=[fisher_of, classifier, load_into, statistics.diagonal_fisher, statistics.sum_sq_grads])


def fisher_on_device(track: "SentimentTrack", state: StateDict, task: str, config: GradientMatchingConfig) -> StateDict:
    """Paper scale: :func:`fisher_of`'s F̂ (``fisher_examples`` of ``task``'s training examples,
    None: all of them, as the public Fisher script), computed on the track's device in float32."""
    spec = {**track.identity([task]), "kind": "gm-paper-fisher", "task": task, "model": content_hash(state),
            "n": config.fisher_examples, "seed": config.seed, "batch_size": config.fisher_batch_size,
            "label_mode": FISHER_LABELS, "method": FISHER_METHOD, "chunk_size": FISHER_CHUNK, "keys": sorted(state)}

    def compute():
        model = classifier(track, state)
        model.to(run_device_of(model.encoder))
        data = track.split(task, "train").subset(config.fisher_examples, config.seed)
        return statistics.diagonal_fisher(model, data.batches(config.fisher_batch_size), param_names=list(state),
                                          label_mode=FISHER_LABELS, seed=config.seed, method=FISHER_METHOD,
                                          chunk_size=FISHER_CHUNK, disable=not config.progress)

    return cached_tensors("fisher", spec, compute, code=[fisher_on_device, classifier, load_into,
                                                         statistics.diagonal_fisher, statistics.sum_sq_grads])


def compute_fishers(track: TextTrack, models: Models, config: GradientMatchingConfig) -> Statistics:
    base = config.base_task
    fisher_of_ = fisher_on_device if config.scale == "paper" else fisher_of
    fisher = {base: fisher_of_(track, models.theta0, base, config)}
    fisher.update({t: fisher_of_(track, s, t, config) for t, s in models.tasks.items()})
    return Statistics(fisher, training_set_sizes(track, list(fisher)), base)


def second_fisher_estimate(track: TextTrack, models: Models, config: GradientMatchingConfig) -> Statistics:
    """Every F̂ again with seed + 1 (other examples, other sampled labels): what a result owes
    to the particular estimate (used by :func:`stability_table`)."""
    return compute_fishers(track, models, dataclasses.replace(config, seed=config.seed + 1))


# ----------------------------------------------------------------------------- merges
def task_arithmetic(models: Models, tasks: list[str], alpha: float) -> StateDict:
    """θ0 + α Σt τt."""
    return merging.task_arithmetic(models.theta0, [models.tasks[t] for t in tasks], alpha)


def gradient_matching(models: Models, stats: Statistics, tasks: list[str], alpha: float,
                      delta: float = DELTA) -> StateDict:
    """θ0 + α Σt (H0 + α Σs Hs + δ)⁻¹ (H0 + Ht + δ) τt with Ht = Nt·F̂t, H0 = N0·F̂0."""
    return merging.gradient_matching(models.theta0, [models.tasks[t] for t in tasks],
                                   [stats.hessian(t) for t in tasks], stats.hessian(stats.base), alpha, delta)


def _zeros(state: StateDict) -> StateDict:
    return {k: torch.zeros_like(v) for k, v in state.items()}


def gm_weight_averaging(models: Models, tasks: list[str]) -> StateDict:
    """The gradient-matching rule with H0 = 0 and equal Ht (= 1): the plain mean of the task
    models (METHODS.md §1's special case; θ0 is not among the models averaged)."""
    ones = {k: torch.ones_like(v) for k, v in models.theta0.items()}
    return merging.gradient_matching(models.theta0, [models.tasks[t] for t in tasks], [ones] * len(tasks),
                                   _zeros(models.theta0), 1.0, 0.0)


def gm_fisher_merging(models: Models, stats: Statistics, tasks: list[str], delta: float = DELTA) -> StateDict:
    """The gradient-matching rule with H0 = 0: Fisher merging of the task models weighted by
    Ht = Nt·F̂t (METHODS.md §1's special case). Where every Ht is 0 it gives Task Arithmetic
    (δτt/δ), where Fisher merging gives the average: entries no data informs."""
    return merging.gradient_matching(models.theta0, [models.tasks[t] for t in tasks], [stats.hessian(t) for t in tasks],
                                   _zeros(models.theta0), 1.0, delta)


def fisher_with_theta0(models: Models, stats: Statistics, tasks: list[str]) -> StateDict:
    """Matena & Raffel over θ0 *and* the task models, unscaled F̂ (no N), equal model weights.
    Not a special case of gradient matching: θ0 enters as a model and the Fishers lack N."""
    return merging.fisher_merging([models.theta0, *(models.tasks[t] for t in tasks)],
                                  [stats.fisher[stats.base], *(stats.fisher[t] for t in tasks)])


def average_with_theta0(models: Models, tasks: list[str]) -> StateDict:
    """The plain mean of θ0 and the task models (not a special case of gradient matching)."""
    return merging.weight_average([models.theta0, *(models.tasks[t] for t in tasks)])


# ----------------------------------------------------------------------------- gradient mismatch
def mean_nll_gradient(track: TextTrack, state: StateDict, task: str, n_examples: int, seed: int = 0,
                      batch_size: int = 64) -> StateDict:
    """ḡ = mean over ``n_examples`` training examples of ``task`` (a fixed seeded subset) of
    ∇θ −log p(y|x) with the data labels, in eval mode, for every tensor of ``state``."""
    model = classifier(track, state)
    device = run_device_of(model.encoder)  # paper scale: the track's device (float32); the CPU otherwise
    model.to(device)
    params = {n: p for n, p in model.named_parameters() if n in state}
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    data = track.split(task, "train").subset(n_examples, seed)
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    with eval_mode(model):
        for batch in data.batches(batch_size):
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = nn.functional.cross_entropy(model(**model_inputs(batch)), batch["labels"], reduction="sum")
            for n, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
                total[n] += g
    return {n: (g / len(data)).cpu() for n, g in total.items()}


# ----------------------------------------------------------------------------- evaluation
class Evaluator:
    """Accuracy and predictions of full state dicts on a track's splits. Predictions are
    memoised and cached on disk under the state's content hash, so a re-run evaluates only
    models that changed. ``data`` (e.g. a validation-only view from ``selection.select``)
    replaces the track as the source of examples."""

    def __init__(self, track: TextTrack):
        self.track = track
        self.encoder = track.pretrained_encoder()
        self._memo: dict[tuple, np.ndarray] = {}

    def _split(self, task: str, split: str, max_examples: int | None, data=None):
        return (self.track if data is None else data).split(task, split).subset(max_examples, self.track.seed)

    @torch.no_grad()
    def predictions(self, state: StateDict, task: str, split: str = "test", max_examples: int | None = None,
                    state_hash: str | None = None, data=None) -> np.ndarray:
        state_hash = state_hash or content_hash(state)
        key = (state_hash, task, split, max_examples)
        if key not in self._memo:
            examples = self._split(task, split, max_examples, data)  # a view refuses other splits here
            spec = {**self.track.identity([task]), "kind": "full-state predictions", "task": task, "split": split,
                    "max_examples": max_examples, "state": state_hash}

            def compute():
                load_into(self.encoder, state, self.track)
                return {"pred": torch.as_tensor(predict(self.encoder, split_state(state)[1], examples))}

            self._memo[key] = cached_tensors("predictions", spec, compute,
                                             code=[predict, encode, load_into, split_state])["pred"].numpy()
        return self._memo[key]

    def labels(self, task: str, split: str = "test", max_examples: int | None = None, data=None) -> np.ndarray:
        return self._split(task, split, max_examples, data).labels

    def correct(self, state: StateDict, tasks: list[str], split: str = "test", max_examples: int | None = None,
                data=None) -> dict[str, np.ndarray]:
        """Per task, whether each example is predicted right (for paired standard errors)."""
        h = content_hash(state)
        return {t: self.predictions(state, t, split, max_examples, h, data) == self.labels(t, split, max_examples, data)
                for t in tasks}

    def accuracies(self, state: StateDict, tasks: list[str], split: str = "test",
                   max_examples: int | None = None, data=None) -> dict[str, float]:
        """Accuracy (%) per task."""
        return {t: 100 * float(c.mean()) for t, c in self.correct(state, tasks, split, max_examples, data).items()}

    def same_predictions(self, a: StateDict, b: StateDict, tasks: list[str], split: str = "test") -> dict[str, np.ndarray]:
        """Per task, whether two models predict the same class on each example."""
        ha, hb = content_hash(a), content_hash(b)
        return {t: self.predictions(a, t, split, state_hash=ha) == self.predictions(b, t, split, state_hash=hb)
                for t in tasks}

    def agreement(self, a: StateDict, b: StateDict, tasks: list[str], split: str = "test") -> float:
        """% of test examples (pooled over ``tasks``) on which two models predict the same class."""
        return 100 * float(np.concatenate(list(self.same_predictions(a, b, tasks, split).values())).mean())


def relative_distance(state: StateDict, target: StateDict, reference: StateDict) -> float:
    """‖state − target‖ / ‖reference − target‖ over all tensors."""
    num = sum(float((state[k].double() - target[k].double()).square().sum()) for k in target)
    den = sum(float((reference[k].double() - target[k].double()).square().sum()) for k in target)
    return (num / den) ** 0.5 if den > 0 else float("nan")


def _mean(d: dict) -> float:
    return float(np.mean(list(d.values())))


# ----------------------------------------------------------------------------- α: curves and choice
TA, GM = "Task Arithmetic", "Gradient matching"


@dataclass
class AlphaCurves:
    """Task Arithmetic and gradient matching over the α grid: ``table`` (validation average,
    test accuracy per dataset, test average) and the per-example test outcomes
    ``correct[(method, α)][dataset]`` for paired standard errors."""

    table: pd.DataFrame
    correct: dict[tuple[str, float], dict[str, np.ndarray]]


def alpha_curves(models: Models, stats: Statistics, evaluator: Evaluator, config: GradientMatchingConfig,
                 progress: bool = True) -> AlphaCurves:
    """Both rules over ``alpha_grid``: validation average (``selection_examples`` per dataset, the
    numbers α is chosen from) and test accuracy (shown for robustness only, never for choosing)."""
    from tqdm.auto import tqdm

    tasks = list(config.tasks)
    merges = {TA: lambda a: task_arithmetic(models, tasks, a),
              GM: lambda a: gradient_matching(models, stats, tasks, a, config.delta)}
    rows, correct = [], {}
    for alpha in tqdm(config.alpha_grid, desc="α grid", disable=not progress):
        for method, merge in merges.items():
            state = merge(alpha)
            val = evaluator.accuracies(state, config.datasets, "validation", config.selection_examples)
            correct[(method, float(alpha))] = evaluator.correct(state, config.datasets)
            test = {d: 100 * float(c.mean()) for d, c in correct[(method, float(alpha))].items()}
            rows.append({"method": method, "alpha": alpha, "validation average": _mean(val), **test,
                         "test average": _mean(test)})
    return AlphaCurves(pd.DataFrame(rows), correct)


def choose_alpha(models: Models, evaluator: Evaluator, config: GradientMatchingConfig) -> Selection:
    """Task Arithmetic's α: the best average validation accuracy over ``alpha_grid``
    (``selection_examples`` per dataset), through :func:`lib.experiments.selection.select`,
    which serves validation data only and extends the grid when the best α is on its edge."""
    tasks = list(config.tasks)

    def score(alpha, data):
        state = task_arithmetic(models, tasks, alpha)
        return _mean(evaluator.accuracies(state, config.datasets, "validation", config.selection_examples, data=data))

    return select("alpha", list(config.alpha_grid), score, evaluator.track, bounds=(0.0, None))


# ----------------------------------------------------------------------------- the main table
THETA0 = "θ0"
TARGET = "all data (target θ_1:T)"
TA1 = "Task Arithmetic (α = 1) = gradient matching as H0 ≫ Ht"
TA_TUNED = "Task Arithmetic (α chosen on validation)"
GM1 = "gradient matching (α = 1)"
GM_AVERAGE = "gradient matching with H0 = 0, equal Ht = weight averaging of the task models"
GM_FISHER = "gradient matching with H0 = 0 = Fisher merging of the task models (Ht = Nt·F̂t)"
AVERAGE_WITH_THETA0 = "weight averaging of θ0 and the task models (not a special case)"
FISHER_WITH_THETA0 = "Fisher merging of θ0 and the task models, unscaled F̂ (not a special case)"


def task_label(task: str) -> str:
    return f"task model: {task}"


@dataclass
class MainResult:
    """The main table: test accuracy (%) per dataset and average (``table``), per-example test
    outcomes per row (``correct[label][dataset]``), the states, and TA's α selection."""

    table: pd.DataFrame
    correct: dict[str, dict[str, np.ndarray]]
    states: dict[str, StateDict]
    selection: Selection


def main_states(models: Models, stats: Statistics, config: GradientMatchingConfig, alpha: float) -> dict[str, StateDict]:
    """Every model of the main table, by row label (``alpha``: TA's α chosen on validation)."""
    tasks = list(config.tasks)
    return {THETA0: models.theta0,
            **{task_label(t): models.tasks[t] for t in tasks},
            TARGET: models.all_data,
            TA1: task_arithmetic(models, tasks, 1.0),
            TA_TUNED: task_arithmetic(models, tasks, alpha),
            GM1: gradient_matching(models, stats, tasks, 1.0, config.delta),
            GM_AVERAGE: gm_weight_averaging(models, tasks),
            GM_FISHER: gm_fisher_merging(models, stats, tasks, config.delta),
            AVERAGE_WITH_THETA0: average_with_theta0(models, tasks),
            FISHER_WITH_THETA0: fisher_with_theta0(models, stats, tasks)}


def accuracy_table(correct: dict[str, dict[str, np.ndarray]]) -> pd.DataFrame:
    """Test accuracy (%) of each row on every dataset, and the average over datasets."""
    table = pd.DataFrame({name: {d: 100 * float(np.mean(c)) for d, c in per.items()} for name, per in correct.items()}).T
    table["Average"] = table.mean(axis=1)
    return table


def main_results(models: Models, stats: Statistics, evaluator: Evaluator, config: GradientMatchingConfig,
                 selection: Selection) -> MainResult:
    states = main_states(models, stats, config, selection.best)
    correct = {name: evaluator.correct(s, config.datasets) for name, s in states.items()}
    return MainResult(accuracy_table(correct), correct, states, selection)


def mismatch_extras(main: MainResult) -> dict[str, StateDict]:
    """The models over all tasks added to the mismatch figure besides TA and GM at α = 1."""
    return {name: main.states[name] for name in (GM_AVERAGE, GM_FISHER, TA_TUNED, TARGET)}


# ----------------------------------------------------------------------------- mismatch vs error
MISMATCH_TA, MISMATCH_GM = "Task Arithmetic (α = 1)", "Gradient matching (α = 1)"


def mismatch_table(track: TextTrack, models: Models, stats: Statistics, evaluator: Evaluator,
                   config: GradientMatchingConfig, extra: dict[str, StateDict] | None = None,
                   progress: bool = True) -> pd.DataFrame:
    """Gradient mismatch (:func:`lib.merging.gradient_matching.gradient_mismatch`), the target
    objective's gradient norm and the test error of merges of θ0 with the first k task models,
    k = 1..T (the paper's Fig. 1: datasets added one at a time), for Task Arithmetic and
    gradient matching at α = 1; ``extra`` (name -> state) are more models over all T tasks."""
    from tqdm.auto import tqdm

    n, seed, base = config.mismatch_examples, config.seed, config.base_task
    at_task_model = {t: mean_nll_gradient(track, s, t, n, seed) for t, s in models.tasks.items()}
    tasks = list(config.tasks)
    plan = []
    for k in range(1, len(tasks) + 1):
        subset = tasks[:k]
        plan += [(MISMATCH_TA, subset, lambda s=subset: task_arithmetic(models, s, 1.0)),
                 (MISMATCH_GM, subset, lambda s=subset: gradient_matching(models, stats, s, 1.0, config.delta))]
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


# ----------------------------------------------------------------------------- data removal
DO_NOTHING = "all data θ_all, nothing removed (do nothing)"
RETRAINED = "retrained without the dataset (target)"
PLAIN = "plain: θ_all − τr"
FIRST_ORDER = "uncertainty-weighted, first order"
FULL = "uncertainty-weighted, full rule, δ = 1e-12 (public code's δ)"
FULL_DAMPED = "uncertainty-weighted, full rule, damped δ"
REMOVAL_RULES = (PLAIN, FIRST_ORDER, FULL, FULL_DAMPED)

# Rounding: noise of relative size ε on every Hessian entry (the error of a sum of squares) may
# move a rule's output by at most this many ε, in units of ‖τr‖ (the vector being removed).
STABILITY_GAIN = 1e3
# Estimation: a second Fisher estimate (another seed: other examples, other sampled labels) must
# leave at least this % of test predictions unchanged. The Hessians are estimates from a few
# hundred examples; a result that a fresh estimate overturns is not a reproducible result.
REPRODUCIBLE_AGREEMENT = 95.0


@dataclass
class RemovalResult:
    """The data-removal experiment: ``table`` (test accuracy per dataset, agreement with the
    retrained target, distance to it), ``agreement[row][dataset]`` (per-example: same
    prediction as the target), ``stability`` (per uncertainty-weighted rule) and the δs."""

    removed: str
    table: pd.DataFrame
    agreement: dict[str, dict[str, np.ndarray]]
    stability: pd.DataFrame
    deltas: dict[str, float]
    states: dict[str, StateDict]


def _removal_hessians(models: Models, stats: Statistics, config: GradientMatchingConfig):
    """(H0, [Hs for the kept tasks], Hr)."""
    rest = [t for t in config.tasks if t != models.removed]
    return stats.hessian(config.base_task), [stats.hessian(t) for t in rest], stats.hessian(models.removed)


def weighted_removals(models: Models, stats: Statistics, config: GradientMatchingConfig) -> tuple[dict[str, StateDict], dict]:
    """The uncertainty-weighted rules by row label, and the δ of each."""
    h0, h_rest, h_r = _removal_hessians(models, stats, config)
    args = (models.all_data, models.theta0, models.tasks[models.removed])
    deltas = {FIRST_ORDER: config.delta, FULL: config.delta,
              FULL_DAMPED: relative_damping(h0, config.removal_damping, config.delta)}
    return {label: remove_uncertainty_weighted(*args, h0, h_rest, h_r, delta, hessian_correction=label != FIRST_ORDER)
            for label, delta in deltas.items()}, deltas


def removal_states(models: Models, stats: Statistics, config: GradientMatchingConfig) -> tuple[dict[str, StateDict], dict]:
    """Every model of the removal table by row label (doing nothing first), and the δs."""
    weighted, deltas = weighted_removals(models, stats, config)
    states = {DO_NOTHING: models.all_data, RETRAINED: models.without,
              PLAIN: remove_plain(models.all_data, models.theta0, models.tasks[models.removed]), **weighted}
    return states, deltas


def stability_table(models: Models, stats: Statistics, config: GradientMatchingConfig,
                    resampled: Statistics | None = None, evaluator: Evaluator | None = None,
                    seed: int = 0) -> pd.DataFrame:
    """How each uncertainty-weighted removal rule reacts to noise in its Hessians.

    Per rule: δ; for the full rule, quantiles of the amplification Hr/(H0 + Σ_{s≠r} Hs + δ)
    (the factor it multiplies θr − θ_all by; the first-order rule has no such term). Rounding,
    with ε = ``stability_noise`` (:func:`lib.merging.gradient_matching.perturb_hessians`): the
    gain ‖Δ output‖/(ε‖τr‖) under entrywise noise, and ‖Δ output‖/‖τr‖ under noise at each
    tensor's scale (which swamps entries far below their tensor's mean, as rounding does where
    gradients cancel). Estimation, with ``resampled`` (the Fishers again with another seed):
    ‖Δ output‖/‖τr‖ and, with an ``evaluator``, the % of test predictions unchanged and the
    average test accuracy. ``stable``: gain ≤ ``STABILITY_GAIN``; ``reproducible``: at least
    ``REPRODUCIBLE_AGREEMENT`` % of predictions unchanged.
    """
    h0, h_rest, h_r = _removal_hessians(models, stats, config)
    args = (models.all_data, models.theta0, models.tasks[models.removed])
    tau_r = {k: models.tasks[models.removed][k] - models.theta0[k] for k in models.theta0}
    states, deltas = weighted_removals(models, stats, config)
    again = weighted_removals(models, resampled, config)[0] if resampled is not None else {}
    eps, rows = config.stability_noise, []
    for label, reference in states.items():
        delta, full = deltas[label], label != FIRST_ORDER
        row = {"rule": label, "δ": delta}
        amp = removal_amplification(h0, h_rest, h_r, delta).numpy() if full else np.full(1, np.nan)
        row.update({"amplification median": float(np.median(amp)), "amplification 99.9%": float(np.quantile(amp, 0.999)),
                    "amplification max": float(amp.max())})
        for mode in ("entry", "tensor"):
            g = torch.Generator().manual_seed(seed)
            noisy = [perturb_hessians(h, eps, g, mode) for h in (h0, *h_rest, h_r)]
            out = remove_uncertainty_weighted(*args, noisy[0], noisy[1:-1], noisy[-1], delta, hessian_correction=full)
            moved = relative_change(out, reference, tau_r)
            if mode == "entry":
                row["gain (entry noise)"] = moved / eps
            else:
                row["change / ‖τr‖ (tensor noise)"] = moved
        row["stable"] = row["gain (entry noise)"] <= STABILITY_GAIN
        if label in again:
            row["change / ‖τr‖ (second Fisher estimate)"] = relative_change(again[label], reference, tau_r)
            if evaluator is not None:
                row["same predictions % (second Fisher estimate)"] = evaluator.agreement(again[label], reference,
                                                                                        config.datasets)
                row["average accuracy % (second Fisher estimate)"] = _mean(evaluator.accuracies(again[label],
                                                                                              config.datasets))
                row["reproducible"] = row["same predictions % (second Fisher estimate)"] >= REPRODUCIBLE_AGREEMENT
        rows.append(row)
    return pd.DataFrame(rows).set_index("rule")


def removal_results(models: Models, stats: Statistics, evaluator: Evaluator, config: GradientMatchingConfig,
                    resampled: Statistics | None = None) -> RemovalResult:
    """Remove ``models.removed`` from the all-data model by every rule; compare each with the
    model trained without it, and with doing nothing (θ_all itself). ``resampled``: a second
    Fisher estimate (:func:`compute_fishers` with another seed) for the stability table."""
    states, deltas = removal_states(models, stats, config)
    correct = {name: evaluator.correct(s, config.datasets) for name, s in states.items()}
    table = accuracy_table(correct)
    agreement = {name: evaluator.same_predictions(s, models.without, config.datasets) for name, s in states.items()}
    table["agreement with target %"] = [mean_accuracy(a).value for a in agreement.values()]  # mean over datasets
    table["distance to target / θ_all's"] = [relative_distance(s, models.without, models.all_data) for s in states.values()]
    stability = stability_table(models, stats, config, resampled, evaluator)
    return RemovalResult(models.removed, table, agreement, stability, deltas, states)


# ----------------------------------------------------------------------------- findings
def _overall(verdicts: list[str]) -> str:
    """One outcome from several sub-claims' held / not-held."""
    if all(verdicts):
        return "held"
    return "held only partly" if any(verdicts) else "did not hold"


def alpha_claim(main: MainResult) -> Claim:
    """Gradient matching at α = 1 against Task Arithmetic at α = 1 and at its validation-chosen α."""
    c, avg = main.correct, main.table["Average"]
    d_ta1, d_tuned = paired_difference(c[GM1], c[TA1]), paired_difference(c[GM1], c[TA_TUNED])
    d_theta0, d_target = paired_difference(c[GM1], c[THETA0]), paired_difference(c[GM1], c[TARGET])
    outcome = _overall([verdict(d_ta1) == "better", verdict(d_tuned) != "worse"])
    return Claim(
        "Gradient matching works at α = 1 without tuning", outcome,
        f"Average test accuracy: gradient matching (α = 1) {avg[GM1]:.1f}%, Task Arithmetic at α = 1 {avg[TA1]:.1f}% and "
        f"at its validation-chosen α = {main.selection.best:g} {avg[TA_TUNED]:.1f}%, the all-data target {avg[TARGET]:.1f}%. "
        f"Gradient matching minus TA(α = 1): {d_ta1} points ({verdict(d_ta1)}); minus tuned TA: {d_tuned} "
        f"({verdict(d_tuned)}); minus the target: {d_target}. Held = better than TA at α = 1 and not worse than tuned TA "
        f"(two paired standard errors).",
        f"θ0 (doing nothing) {avg[THETA0]:.1f}%; gradient matching minus θ0: {d_theta0} ({verdict(d_theta0)})")


def _range_over_alpha(curves: AlphaCurves, method: str, lo: float) -> tuple[Estimate, float, float]:
    """(best minus worst test average over α ≥ lo, paired; the best α; the worst α)."""
    rows = curves.table[(curves.table.method == method) & (curves.table.alpha >= lo)]
    best = float(rows.loc[rows["test average"].idxmax(), "alpha"])
    worst = float(rows.loc[rows["test average"].idxmin(), "alpha"])
    return paired_difference(curves.correct[(method, best)], curves.correct[(method, worst)]), best, worst


def robustness_claim(curves: AlphaCurves, lo: float = 0.5) -> Claim:
    """Gradient matching's accuracy varies less with α (α ≥ ``lo``) than Task Arithmetic's."""
    s_ta, *_ = _range_over_alpha(curves, TA, lo)
    s_gm, *_ = _range_over_alpha(curves, GM, lo)
    d = difference_of_estimates(s_ta, s_gm)
    alphas = sorted(a for a in curves.table.alpha.unique() if a >= lo)
    theta0 = curves.table[(curves.table.method == TA) & (curves.table.alpha == 0)]["test average"]
    return Claim(
        "Gradient matching is robust to α", held(d),
        f"Over α ∈ [{alphas[0]:g}, {alphas[-1]:g}] the average test accuracy of gradient matching spans "
        f"{s_gm.plain()} points (best minus worst α, paired), Task Arithmetic's {s_ta.plain()}; difference of the spans "
        f"{d} (SEs combined as independent, which overstates the noise).",
        f"α = 0, which is θ0 for both rules ({theta0.iloc[0]:.1f}%)" if len(theta0) else "θ0 (α = 0)")


def mismatch_claim(mismatch: pd.DataFrame, main: MainResult) -> Claim:
    """Gradient matching has less gradient mismatch than Task Arithmetic and less test error."""
    m = mismatch
    full = m["datasets merged"].max()
    at = lambda method, k, col: float(m[(m.method == method) & (m["datasets merged"] == k)][col].iloc[0])
    pairs = [(k, at(MISMATCH_GM, k, "gradient mismatch"), at(MISMATCH_TA, k, "gradient mismatch"))
             for k in sorted(m[m.method == MISMATCH_GM]["datasets merged"].unique()) if k > 2]
    lower = all(g < t for _, g, t in pairs)
    d = paired_difference(main.correct[GM1], main.correct[TA1])
    rho = m["gradient mismatch"].corr(m["test error"], method="spearman")
    rho_obj = m["target objective gradient"].corr(m["test error"], method="spearman")
    target = m[m.method == TARGET]["gradient mismatch"]
    return Claim(
        "Less gradient mismatch, less test error", _overall([lower, verdict(d) == "better"]),
        " ".join(f"With {k} datasets merged, gradient matching's mismatch is {g:.3g} vs Task Arithmetic's {t:.3g}."
                 for k, g, t in pairs)
        + f" Accuracy over all {full} datasets, gradient matching minus Task Arithmetic (α = 1): {d} points ({verdict(d)})."
        + f" Across all {len(m)} merged models the Spearman correlation between mismatch and test error is {rho:+.2f}"
        + f" ({rho_obj:+.2f} for the target objective's gradient norm; descriptive, no test)."
        + (f" The all-data target's own mismatch is {target.iloc[0]:.3g}." if len(target) else ""),
        "Task Arithmetic at α = 1, the same rule with the Hessians left out (one task vector: both return the task "
        "model, mismatch 0)")


def special_cases_claim(main: MainResult) -> Claim:
    """METHODS.md §1's special cases, computed through the rule, against the full rule."""
    c, avg = main.correct, main.table["Average"]
    parts = [f"{name}: {mean_accuracy(c[name]).plain()}% (minus gradient matching: "
             f"{paired_difference(c[name], c[GM1])})" for name in (GM_AVERAGE, GM_FISHER, TA1)]
    return Claim(
        "Weight averaging, Fisher merging and Task Arithmetic are special cases of gradient matching",
        "holds by algebra (unit-tested: tests/test_merging.py, tests/test_gradient_matching.py)",
        "Computed through the rule: " + "; ".join(parts) + f". Full rule (α = 1): {mean_accuracy(c[GM1]).plain()}%. "
        f"Not special cases (θ0 enters as a model, F̂ without N): {AVERAGE_WITH_THETA0} {avg[AVERAGE_WITH_THETA0]:.1f}%, "
        f"{FISHER_WITH_THETA0} {avg[FISHER_WITH_THETA0]:.1f}%.",
        f"θ0 (doing nothing) {mean_accuracy(c[THETA0]).plain()}%")


def _reliable(stability: pd.DataFrame, rule: str) -> bool:
    """Stable under rounding and, where it was checked, reproducible with a second Fisher estimate."""
    if rule not in stability.index:
        return True  # plain subtraction uses no Hessian
    row = stability.loc[rule]
    return bool(row["stable"]) and bool(row.get("reproducible", True))


def removal_claims(removal: RemovalResult) -> list[Claim]:
    """Does subtracting dataset r bring θ_all closer to the retrained model than doing nothing
    (θ_all itself), and does uncertainty weighting beat plain subtraction? Paired on the
    per-example agreement with the retrained model. Then: is the full rule reproducible?"""
    r, a, s = removal.removed, removal.agreement, removal.stability
    candidates = [x for x in REMOVAL_RULES if x in a]
    base = mean_accuracy(a[DO_NOTHING])
    baseline = f"doing nothing (θ_all unchanged) agrees on {base.plain()}%"
    flag = lambda x: "" if _reliable(s, x) else ", not reproducible: see the last claim"
    vs_nothing = {x: paired_difference(a[x], a[DO_NOTHING]) for x in candidates}
    better = [x for x in candidates if verdict(vs_nothing[x]) == "better" and _reliable(s, x)]
    outcome = ("held" if len(better) == len(candidates) else "did not hold" if not better
               else "held only for " + ", ".join(better))
    claims = [Claim(
        f"Subtracting {r} brings the all-data model closer to the model retrained without it than doing nothing",
        outcome,
        "Agreement with the retrained model's test predictions (mean over datasets), and its paired difference to "
        "doing nothing: " + "; ".join(f"{x}: {mean_accuracy(a[x]).plain()}%, {vs_nothing[x]} ({verdict(vs_nothing[x])}"
                                      f"{flag(x)})" for x in candidates) + ".",
        baseline)]
    weighted = [x for x in (FIRST_ORDER, FULL_DAMPED) if x in a]
    if PLAIN in a and weighted:
        vs_plain = {x: paired_difference(a[x], a[PLAIN]) for x in weighted}
        claims.append(Claim(
            "Uncertainty weighting removes a dataset better than plain subtraction",
            _overall([verdict(d) == "better" and _reliable(s, x) for x, d in vs_plain.items()]),
            "Agreement with the retrained model minus plain subtraction's: "
            + "; ".join(f"{x} {d} ({verdict(d)}{flag(x)})" for x, d in vs_plain.items())
            + ". Neither counts as a removal method unless it also beats doing nothing (claim above).",
            baseline))
    if FULL in s.index:
        def describe(x):
            row = s.loc[x]
            parts = [f"δ = {row['δ']:.3g}"]
            if np.isfinite(row["amplification max"]):
                parts.append(f"amplification Hr/(H0 + Σ_{{s≠r}} Hs + δ) up to {row['amplification max']:.3g} "
                             f"(99.9% of entries ≤ {row['amplification 99.9%']:.3g})")
            parts.append(f"rounding gain {row['gain (entry noise)']:.3g}")
            parts += [f"{c} {row[c]:.3g}" for c in s.columns if "second Fisher estimate" in c and pd.notna(row[c])]
            return f"{x}: " + ", ".join(parts)

        claims.append(Claim(
            "The full removal rule gives a reproducible result",
            "held" if _reliable(s, FULL) else "did not hold",
            "Rounding: noise of relative size ε on every Hessian entry moves the result by gain × ε × ‖τr‖ (stable: gain "
            f"≤ {STABILITY_GAIN:g}). Estimation: the Fishers computed again with another seed (other examples, other "
            f"sampled labels); reproducible: ≥ {REPRODUCIBLE_AGREEMENT:g}% of test predictions unchanged. "
            + "; ".join(describe(x) for x in s.index) + ". A rule that is not reproducible has no accuracy to report.",
            "the first-order rule, whose per-entry weights lie in (0, 1] and cannot amplify"))
    return claims


LOOP = "loop (batch size 1, each example at its own length)"
BOUND = "bound: every matrix product at the machine's peak rate"


def timing_claim(t: pd.DataFrame, datasets: list[str], target: float = 5.0) -> Claim:
    """The fastest exact per-example method against the batch-size-1 loop, and the machine's bound."""
    methods = [m for m in t.loc["all"].index if m not in (LOOP, BOUND)]
    best = max(methods, key=lambda m: t.loc[("all", m), "speed-up vs loop (wall)"])
    speedup = t.xs(best, level="method")["speed-up vs loop (wall)"]
    bound = t.xs(BOUND, level="method")["speed-up vs loop (wall)"]
    loop_ms = t.xs(LOOP, level="method")["wall ms/example"]
    tokens = t.xs(LOOP, level="method")["mean tokens"]
    impossible = [d for d in datasets if bound[d] < target]
    evidence = (
        f"With {t.attrs.get('threads', '?')} torch thread(s) the fastest exact method, {best}, is {speedup['all']:.1f}× "
        f"faster than the batch-size-1 loop over all datasets ({t.loc[('all', best), 'wall ms/example']:.1f} against "
        f"{loop_ms['all']:.1f} ms per example); per dataset "
        + ", ".join(f"{d} {speedup[d]:.1f}× ({tokens[d]:.0f} tokens)" for d in datasets) + ". "
        + "; ".join(f"{m}: {t.loc[('all', m), 'speed-up vs loop (wall)']:.1f}×" for m in methods if m != best)
        + f". Every method agrees with the loop to {t['max |diff| / max |loop|'].max():.0e} of its largest entry. "
        "A single timing per method: no uncertainty is estimated.")
    if impossible:
        d0 = impossible[0]
        evidence += (
            f" The target cannot be met on {', '.join(impossible)}: even with every matrix product at this machine's "
            f"measured peak ({t.attrs.get('peak GFLOP/s', float('nan')):.0f} GFLOP/s) and nothing else costing time, an "
            "exact method would be at most " + ", ".join(f"{bound[d]:.1f}× ({d})" for d in impossible)
            + f" faster than the loop. At {tokens[d0]:.0f} tokens ({d0}) the loop already runs its matrix products at "
            f"{t.loc[(d0, LOOP), 'GFLOP/s']:.0f} GFLOP/s, and each example's out×in gradient of every layer must still "
            "be formed and squared one example at a time, which batching does not shrink.")
    evidence += " ".join(f" On {d} ({tokens[d]:.0f} tokens) the bound is {bound[d]:.1f}× and {best} reaches "
                         f"{speedup[d]:.1f}×." for d in datasets if d not in impossible)
    return Claim(f"Per-example squared gradients {target:g}× faster than the loop",
                 "met" if speedup["all"] >= target else "not met", evidence, "the batch-size-1 autograd loop")


def findings(main: MainResult, curves: AlphaCurves, mismatch: pd.DataFrame, removal: RemovalResult,
             timing: pd.DataFrame | None, config: GradientMatchingConfig) -> str:
    """``findings.md`` of notebook 04: every verdict, computed from the run's results."""
    claims = [alpha_claim(main), robustness_claim(curves), mismatch_claim(mismatch, main), special_cases_claim(main),
              *removal_claims(removal)]
    if timing is not None:
        claims.append(timing_claim(timing, config.datasets))
    notes = [f"Task Arithmetic's α: {main.selection.note}."] if main.selection.note else []
    notes.append(f"Damped removal rule: δ = {config.removal_damping:g} × the mean entry of H0 "
                 f"= {removal.deltas[FULL_DAMPED]:.3g} (the public code's δ is {config.delta:g}).")
    scale = (f"*Small scale (MiniLM-L6, {len(config.datasets)} datasets, ≤{config.max_test} test examples each); "
             "not the paper's numbers.*" if config.scale != "paper" else
             f"*Paper scale (RoBERTa-base; θ0 fine-tuned on {config.base_task}, task models on "
             f"{', '.join(config.tasks)}; the public code's recipe; ≤{config.max_test} test examples per dataset). The "
             "paper publishes no table for this setup to compare with.*")
    preamble = (f"{scale} Differences are in points with a paired standard error over the same test "
                "examples; a verdict needs two standard errors.")
    return findings_markdown("Gradient matching (Daheim et al., ICLR 2024) — findings", claims, preamble, notes)


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


class VmappableRobertaClassifier(VmappableClassifier):
    """Paper scale: :class:`VmappableClassifier` for RoBERTa read at ``<s>`` with its two-layer
    head (``lib.paper.glue.RobertaEncoder``), the same parameter names as the ``Classifier``."""

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder.roberta(input_ids=input_ids,
                                      attention_mask=additive_attention_mask(attention_mask)).last_hidden_state
        return self.head(hidden[:, 0])


def vmappable(model: Classifier) -> nn.Module:
    """The vmap-traceable form of a study model: RoBERTa's (paper scale) or MiniLM's."""
    return VmappableRobertaClassifier(model) if isinstance(model.encoder, glue.RobertaEncoder) else VmappableClassifier(model)


def device_matmul_rate(device: torch.device, size: int = 4096, seconds: float = 1.0) -> float:
    """:func:`lib.experiments.cost.matmul_rate` on ``device``: the sustained float32 rate of
    ``size``-square products there (CUDA: synchronised), FLOP/s."""
    if device.type == "cpu":
        return cost.matmul_rate()
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)
    for _ in range(3):
        torch.mm(a, b, out=out)
    torch.cuda.synchronize(device)
    reps, start = 0, time.perf_counter()
    while reps < 5 or time.perf_counter() - start < seconds:
        torch.mm(a, b, out=out)
        reps += 1
        if reps % 10 == 0:
            torch.cuda.synchronize(device)
    torch.cuda.synchronize(device)
    return 2 * size**3 * reps / (time.perf_counter() - start)


def linear_flops(model: nn.Module, tokens: int) -> float:
    """FLOPs of one pass of every ``nn.Linear`` of ``model`` over ``tokens`` positions: 2·in·out each."""
    return 2.0 * tokens * sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def time_sq_grad_methods(model: nn.Module, batches: list[dict], names: list[str], vmap_chunks: tuple[int, ...] = (8,),
                         peak_flops: float | None = None, device: torch.device | None = None) -> pd.DataFrame:
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

    ``device`` (paper scale: the model's CUDA device) synchronises the timings there and reports
    the peak GPU memory allocated instead of the resident set's growth.
    """
    cuda = device is not None and device.type == "cuda"
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

    def timed(fn):
        if not cuda:
            return cost.measured_call(lambda: run_all(fn))
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes, start = torch.cuda.memory_allocated(device), time.perf_counter()
        result = run_all(fn)
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
        return result, wall, (torch.cuda.max_memory_allocated(device) - start_bytes) / 2**20

    results, rows = {}, []
    for label, fn in methods.items():
        fn({k: v[:2] for k, v in batches[0].items()})
        cpu = time.process_time()
        results[label], wall, peak_mib = timed(fn)
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
    device = run_device(config.device) if config.scale == "paper" else torch.device("cpu")
    peak = device_matmul_rate(device)
    tables = {}
    for dataset in config.datasets:
        state = models.theta0 if dataset == config.base_task else models.tasks[dataset]
        data = (track.split(dataset, "train").subset(config.fisher_examples, config.seed)
                .subset(config.timing_examples, config.seed))
        tables[dataset] = time_sq_grad_methods(vmappable(classifier(track, state)).to(device),
                                               list(data.batches(config.fisher_batch_size)), list(state),
                                               config.timing_vmap_chunks, peak, device)
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
                       device=str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
                       **{"peak GFLOP/s": peak / 1e9})
    return table


def timing_display(timing: pd.DataFrame) -> pd.DataFrame:
    """The timing table for reading: dataset and method as columns, deviations as text (a
    Markdown writer would round a number like 2e-06 to 0.0)."""
    shown = timing.reset_index().set_index("dataset")
    shown["max |diff| / max |loop|"] = shown["max |diff| / max |loop|"].map(
        lambda x: "" if pd.isna(x) else f"{x:.1e}".replace("e", "×10^"))
    return shown


def timing_caption(timing: pd.DataFrame, config: GradientMatchingConfig) -> str:
    a = timing.attrs
    if config.scale == "paper":
        return (f"Per-example squared gradients Σ_b g_b² for {a['parameters'] / 1e6:.1f}M parameters (RoBERTa-base + "
                f"head, paper scale), {config.timing_examples} training examples per dataset in batches of "
                f"{config.fisher_batch_size}, on {a.get('device', '?')}, measured side by side in one run"
                + ("" if a.get("device", "cpu") == "cpu" else " (peak MiB: GPU memory allocated)")
                + f"; peak float32 matrix-product rate there {a['peak GFLOP/s']:.0f} GFLOP/s. Rows 'all': time summed "
                "over the datasets.")
    return (f"Per-example squared gradients Σ_b g_b² for {a['parameters'] / 1e6:.1f}M parameters (MiniLM-L6 + head), "
            f"{config.timing_examples} training examples per dataset in batches of {config.fisher_batch_size}, "
            f"{a['threads']} torch thread(s), measured side by side in one run; peak float32 matrix-product rate of this "
            f"machine {a['peak GFLOP/s']:.0f} GFLOP/s. Rows 'all': time summed over the datasets.")


def stability_display(stability: pd.DataFrame) -> pd.DataFrame:
    """The stability table for reading: numbers as text with three significant digits (a
    Markdown writer would print δ = 1e-12 or a gain of 2e-6 as 0.0)."""
    return stability.map(lambda x: x if isinstance(x, (bool, np.bool_, str)) else f"{x:.3g}")
