"""The FS-Merge study (METHODS.md §4–§6): experts from different initialisations, every merge,
evaluated, and the paper's claims checked with uncertainties.

Everything ``notebooks/03_fs_merge.ipynb`` runs, as plain functions around :class:`FSStudy`:

    config = notebook_config(FSStudyConfig, globals())                  # the notebook's parameters
    study = FSStudy(config)
    main = pd.DataFrame(study.main_comparison())                         # every method, every setting
    sweep = pd.DataFrame(study.image_count_sweep())                      # accuracy vs unlabeled images
    control = pd.DataFrame(study.control())                              # same-initialisation control
    findings(config, main, sweep, ablation, control)                     # the claims, as Markdown

**Data.** Each task (MNIST, Fashion-MNIST, USPS, GTSRB, CIFAR-10, ``lib.data``) is resized to
``image_size`` × ``image_size`` (32: CIFAR-10's and the mirror's GTSRB size; MNIST and
Fashion-MNIST 28 → 32, USPS 16 → 32) and given **three channels** (grayscale repeated), so one
architecture, one input layer and one augmentation pipeline serve all five tasks (FS-Merge's
grayscale augmentation only means something for RGB). Pixels are normalised with mean = std
= 0.5 per channel. Experts train on a seeded, class-stratified subset of ``train_per_task``
training images; every accuracy is on a seeded, class-stratified subset of ``test_per_task``
test images (the mirror's CIFAR-10 and GTSRB are themselves subsets: small-scale numbers).

**Experts** (``init="different"``, the paper's setting) are trained from scratch, each from its
own random initialisation: the seed is a hash of (study seed, architecture, task), so no two
experts share an initialisation, and each task gets its own head (heads are never merged).
The **same-initialisation control** (``init="same"``) first trains one shared model on a pooled
warm-up of the *other* tasks (by default every task not in the setting, so the shared model
does not already solve the tasks being merged: it plays the role of a pre-trained model),
then fine-tunes one expert per task from it (a fresh head, everything trainable, a lower
learning rate).

**Caches.** Scratch experts, shared inits and fine-tuned experts are cached as safetensors
keyed by every setting that changes them (architecture, training settings, seeds, a SHA-256
of the training images; :func:`scratch_expert_spec`, :func:`shared_init_spec`,
:func:`finetuned_expert_spec`), ``FS_STUDY_VERSION`` and a hash of the source of the code that
produces them (:func:`expert_code`), so editing that code retrains instead of serving stale
experts. Merges are not cached: they are cheap, and the cost table measures them every run.

**Unlabeled data for the data-driven merges.** Per task, the first ``num_images`` of a seeded
permutation of the training split (so a smaller pool is a subset of a larger one), plus
``augment`` augmented copies per original from :func:`lib.fs_merge.augmented_pool`. FS-Merge,
distillation, RegMean's Gram matrices and ZipIt!'s correlations all see the same pool. Labels
are never used.

**Methods** (names are the constants below): the ensemble (all experts kept, task t answered by
expert t: the upper reference), model 1 alone (doing nothing: where FS-Merge's "first" init
starts), weight averaging, SLERP (two models), RegMean (``lib.merging.regmean`` with each Gram
divided by its row count and a relative ridge ``regmean_ridge``: a ReLU dead on every pool
image leaves a zero row and column in the summed Gram; the ridge sends the weights that read
it to the average instead of making the solve singular), Git Re-Basin weight matching then
averaging, ZipIt! (two MLPs), distillation (student initialised from model 1, FS-Merge's
feature loss, data, schedule and per-task output maps) and FS-Merge. Every merged model has
the original architecture and size; task t is read with expert t's own head after the merge's
per-task output map (``folded_logits``; the identity for averaging, SLERP and RegMean).

**Training budget (the study's deviation from the paper).** FS-Merge and distillation run a
fixed number of optimisation steps (``fs_steps_mlp`` / ``fs_steps_vit``), whatever the pool
size, so runs with different amounts of data cost the same; the paper trains 100 epochs (more
steps for more data) at lr 1e-4 for both. With a few hundred steps on CPU, lr 1e-4 leaves both
far from converged, so both use a peak lr of 3e-3 (``fs_lr``, ``kd_lr``; one lr for both, as in
the paper). In a pilot with {1e-3, 3e-3, 1e-2} on the first MLP and ViT pairs, 3e-3 was
distillation's best by final *training* feature loss (no labels involved); FS-Merge's loss was
lower still at 1e-2 on the different-init pairs, but at 1e-2 it diverged on the same-init MLP
pair (all ReLUs dead). The ablation runs both methods at ``ablation_lrs``.

**Verdicts** (:func:`findings`) are computed from the result rows, never typed: every claim
names its trivial baseline (model 1 alone, i.e. doing nothing, and the ensemble of experts)
and every difference carries a standard error: paired over the same test examples within one
seed (rows keep each model's per-example outcomes, ``correct``), over seeds when the rows hold
several. A difference counts only beyond 2 SE.

**Cost.** Each merge's wall time and peak resident memory (:func:`lib.experiments.cost.measured_call`)
cover the merge itself (statistics, training, folding), not building the shared data pool.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import merging
from ..archs import MLP, ViT
from ..data import load_vision_task, prepare_images, subsample_indices
from ..fs_merge import Distillation, augmented_pool, build_supernet, folded_logits, train_supernet
from ..permutation import rebasin_merge, zipit_merge
from ..statistics import gram_matrices
from .cache import cache_path, cached_tensors, code_hash, content_hash, load_metadata
from .config import take_unchanged
from .cost import measured_call
from .findings import Z, Claim, Estimate, findings_markdown, over_seeds, verdict

# Bump when a change that the code hashes below cannot see (data loading, lib.data) changes
# what a cached expert would contain. 2: keys now carry the producing code's hash.
FS_STUDY_VERSION = 2

ARCHS = ("mlp", "vit")
INIT_SETTINGS = ("different", "same")

ENSEMBLE = "Ensemble (experts kept)"
MODEL_1 = "Model 1 alone"
AVERAGE = "Weight averaging"
SLERP = "SLERP"
REGMEAN = "RegMean"
REBASIN = "Git Re-Basin"
ZIPIT = "ZipIt!"
DISTILLATION = "Distillation"
FS_MERGE = "FS-Merge"
METHODS = (ENSEMBLE, MODEL_1, AVERAGE, SLERP, REGMEAN, REBASIN, ZIPIT, DISTILLATION, FS_MERGE)
CLOSED_FORM = (AVERAGE, SLERP, REGMEAN, REBASIN, ZIPIT)  # no training: the merges the paper says collapse
TRAINED = (DISTILLATION, FS_MERGE)  # trained on the pool: depend on rank, init, steps
DATA_DRIVEN = (REGMEAN, ZIPIT, *TRAINED)  # depend on the pool
DEFAULT_VARIANT = "default"  # the ablation rows run at the config's settings

# The default same-init warm-up pool: the five image tasks the study was designed with (the mirror
# has since gained EuroSAT, KMNIST and MNIST-M; pinning the pool keeps notebook 03's results).
WARMUP_POOL = ("mnist", "fashion_mnist", "usps", "gtsrb", "cifar10")


@dataclass
class FSStudyConfig:
    """Every setting of the FS-Merge study. Fields are the notebook's parameters, one for one."""

    # paths and the run
    data_dir: str = ""  # local data mirror (e.g. ../shared/data); "" downloads
    models_dir: str = ""  # model folder (paper scale: open_clip weights, published experts); unused at small scale
    output_dir: str = ""  # where tables and figures go; "" is figures/03_fs_merge
    progress: bool = True
    scale: str = "small"  # "paper": CLIP ViT-B-16 experts from different open_clip pretrainings (PAPER_SCALE)
    seed: int = 0
    # settings: which experts are merged (model 1 = the first task of each list)
    mlp_pairs: list = field(default_factory=lambda: [["mnist", "fashion_mnist"], ["gtsrb", "cifar10"]])
    vit_pairs: list = field(default_factory=lambda: [["fashion_mnist", "cifar10"]])
    four_model_tasks: list = field(default_factory=lambda: ["mnist", "fashion_mnist", "usps", "cifar10"])  # MLPs; [] skips
    # data
    image_size: int = 32
    train_per_task: int = 8000  # images an expert trains on (seeded, class-stratified)
    test_per_task: int = 1000  # test images per task every accuracy is measured on
    # architectures
    mlp_hidden: list = field(default_factory=lambda: [256, 256])
    vit_patch: int = 8
    vit_width: int = 64
    vit_depth: int = 4
    vit_heads: int = 4
    vit_mlp_ratio: float = 2.0
    # experts from scratch
    mlp_epochs: int = 5
    vit_epochs: int = 8
    expert_lr: float = 1e-3
    expert_weight_decay: float = 0.01
    expert_batch_size: int = 128
    # same-initialisation control: warm-up on pooled other tasks, then fine-tune
    warmup_tasks: list = field(default_factory=list)  # [] = every WARMUP_POOL task not in the setting
    warmup_per_task: int = 2000
    warmup_epochs: int = 3
    finetune_epochs: int = 3
    finetune_lr: float = 3e-4
    # unlabeled data for the data-driven merges
    num_images: int = 64  # originals per task in the main comparison
    augment: int = 8  # augmented copies per original (the paper: 100 + 800)
    image_counts: list = field(default_factory=lambda: [16, 64, 256, 1024])
    # FS-Merge and distillation
    fs_steps_mlp: int = 300
    fs_steps_vit: int = 200
    fs_batch_size: int = 128
    fs_micro_batches: int = 1  # backward in this many chunks per task (same gradient, less memory)
    fs_lr: float = 3e-3  # FS-Merge's peak lr (one-cycle, AdamW); the paper: 1e-4 over 100 epochs
    kd_lr: float = 3e-3  # distillation's peak lr (the paper: the same as FS-Merge's)
    fs_weight_decay: float = 1e-3
    rank: int = 12
    fs_init: str = "first"
    ranks: list = field(default_factory=lambda: [0, 4, 12, 32])  # rank 0 keeps the diagonal blocks only
    ablation_lrs: list = field(default_factory=lambda: [1e-3, 1e-2])  # both methods, besides the default
    # other baselines
    regmean_alpha: float = 0.7  # the authors' reg_coef for RegMean
    regmean_ridge: float = 1e-6  # relative ridge ε = ridge·mean diag ΣG̃ toward the average (lib.merging.regmean)
    rebasin_sweeps: int = 100
    # which parts of the notebook run for which architecture (the first pair of that architecture)
    sweep_archs: list = field(default_factory=lambda: ["mlp", "vit"])
    ablation_archs: list = field(default_factory=lambda: ["mlp"])
    control_archs: list = field(default_factory=lambda: ["mlp", "vit"])
    # FS-Merge and distillation by epochs, as the paper (0: the fixed step budgets fs_steps_mlp / fs_steps_vit)
    fs_epochs: int = 0
    # paper scale only (lib/experiments/fs_merge_paper.py): CLIP experts, each task's from its own pretraining
    paper_arch: str = "ViT-B-16"
    paper_pretrained: list = field(default_factory=lambda: [list(p) for p in PAPER_PRETRAINED])  # [task, open_clip tag]
    paper_control_pretrained: str = "openai"  # the same-init control: every expert from this tag
    paper_control_experts: str = "finetune"  # or "published" (FusionBench's tanganke experts, tag openai only)
    paper_expert_steps: int = 2000  # fine-tuning steps per expert (METHODS.md §8 recipe, CLIP_RECIPE)
    device: str = "auto"  # paper scale: "auto" is CUDA when there is one; the small scale runs on the CPU
    autocast: str = "auto"  # paper scale: bf16 on CUDA for "auto"; "bf16", "fp16" or "off"

    def __post_init__(self):
        if self.scale not in ("small", "paper"):
            raise ValueError(f"scale={self.scale!r}: choose 'small' (the default) or 'paper'.")
        if self.scale == "paper":
            take_unchanged(self, PAPER_SCALE)
            if self.mlp_pairs or self.four_model_tasks or {*self.sweep_archs, *self.ablation_archs, *self.control_archs} - {"vit"}:
                raise ValueError("scale='paper' merges CLIP ViTs only (the paper's ViT-B-16 experiment): leave mlp_pairs "
                                 "and four_model_tasks empty and sweep_archs / ablation_archs / control_archs at ['vit'].")
            if self.paper_control_experts not in ("finetune", "published"):
                raise ValueError(f"paper_control_experts = {self.paper_control_experts!r}: choose 'finetune' (the "
                                 "recipe, here) or 'published' (FusionBench's experts of the openai tag).")

    @property
    def pretrained_of(self) -> dict[str, str]:
        """Paper scale: each task's open_clip pretrained tag (``paper_pretrained`` as a dict)."""
        return {str(task): str(tag) for task, tag in self.paper_pretrained}


# Paper scale (METHODS.md §4, §8; Kinderman et al.'s ViT-B-16 experiment). Each task's expert is
# fine-tuned from its own public open_clip ViT-B-16 pretraining: our substitute for the authors'
# own pretrainings, which are not public (their code used `openai` for Cars and private ones for
# the other tasks). The four tags share QuickGELU (the SuperNet runs one nonlinearity in the merged
# width); `laion400m_e32`, `laion2b_s34b_b88k` and `datacomp_xl_s13b_b90k` are GELU tags, usable
# together in a mapping of their own.
PAPER_PRETRAINED = (("stanford_cars", "openai"), ("dtd", "metaclip_400m"), ("eurosat", "metaclip_fullcc"), ("gtsrb", "dfn2b"),
                    ("svhn", "openai"), ("mnist", "metaclip_fullcc"), ("resisc45", "dfn2b"), ("sun397", "metaclip_400m"))
PAPER_PAIRS = (("stanford_cars", "dtd"), ("eurosat", "gtsrb"), ("svhn", "mnist"))  # model 1 first; the authors' example: Cars + CIFAR-10
PAPER_SCALE = {
    "mlp_pairs": [], "four_model_tasks": [], "vit_pairs": [list(p) for p in PAPER_PAIRS],
    "sweep_archs": ["vit"], "ablation_archs": ["vit"], "control_archs": ["vit"],
    "test_per_task": None,  # the full canonical test splits
    "expert_lr": 1e-5, "expert_weight_decay": 0.1, "expert_batch_size": 128,  # METHODS.md §8 (CLIP_RECIPE)
    "num_images": 100, "augment": 8, "image_counts": [16, 50, 100, 400],  # 100 + 800 augmented per task
    "fs_epochs": 100, "fs_batch_size": 128, "fs_lr": 1e-4, "kd_lr": 1e-4, "fs_weight_decay": 1e-3,
    "fs_micro_batches": 8,  # batch 128 backward in chunks of 16: one backward took ~97 GiB on ViT-B-16
    "rank": 12, "fs_init": "first", "ranks": [0, 4, 12, 32], "ablation_lrs": [1e-5, 1e-3], "regmean_alpha": 0.7,
}


def expert_seed(seed: int, *parts) -> int:
    """A 31-bit seed that differs for every (study seed, parts...): no two experts share one."""
    digest = hashlib.sha256("/".join(map(str, (seed, *parts))).encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


# ----------------------------------------------------------------------------------- data


@dataclass(eq=False)
class TaskData:
    """One task's images: the experts' training subset, the unlabeled source and the test set."""

    name: str
    num_classes: int
    train_images: np.ndarray  # uint8 [N, H, W, C]: what the experts train on
    train_labels: np.ndarray
    source_images: np.ndarray  # uint8: the whole training split, where unlabeled pools come from
    test_x: torch.Tensor  # prepared [n, 3, size, size]
    test_y: torch.Tensor
    fingerprint: str  # SHA-256 of the training subset (images and labels)
    notes: tuple = ()

    @property
    def chance(self) -> float:
        return 100.0 / self.num_classes


def prepare(images: np.ndarray, size: int, unit: bool = False, chunk: int = 4096) -> torch.Tensor:
    """uint8 images → float [N, 3, size, size]: normalised (mean = std = 0.5), or in [0, 1] if ``unit``."""
    mean, std = ((0.0,) * 3, (1.0,) * 3) if unit else ((0.5,) * 3, (0.5,) * 3)
    parts = [prepare_images(images[i : i + chunk], size, 3, mean, std) for i in range(0, len(images), chunk)]
    return torch.cat(parts) if parts else torch.zeros(0, 3, size, size)


def normalise(unit_images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images → the experts' input normalisation."""
    return (unit_images - 0.5) / 0.5


def load_task(name: str, config: FSStudyConfig, data_dir=None) -> TaskData:
    task = load_vision_task(name, data_dir or None, seed=config.seed)
    train = task.train.take(subsample_indices(task.train.labels, config.train_per_task, config.seed))
    test = task.test.take(subsample_indices(task.test.labels, config.test_per_task, config.seed))
    digest = hashlib.sha256(np.ascontiguousarray(train.images).tobytes())
    digest.update(np.ascontiguousarray(train.labels).tobytes())
    return TaskData(
        name=name,
        num_classes=task.num_classes,
        train_images=train.images,
        train_labels=train.labels,
        source_images=task.train.images,
        test_x=prepare(test.images, config.image_size),
        test_y=torch.as_tensor(test.labels),
        fingerprint=digest.hexdigest()[:20],
        notes=task.notes,
    )


def unlabeled_pool(task: TaskData, num_images: int, augment: int, config: FSStudyConfig) -> torch.Tensor:
    """``num_images`` unlabeled training images of ``task`` plus ``augment`` copies of each, normalised.

    The originals are the first ``num_images`` of a seeded permutation of the whole training
    split (a smaller pool's originals are a subset of a larger one's); the copies come from
    :func:`~lib.fs_merge.augmented_pool` (crop, flip, grayscale / solarize / blur).
    """
    order = np.random.default_rng(expert_seed(config.seed, "pool order", task.name)).permutation(len(task.source_images))
    originals = prepare(task.source_images[np.sort(order[:num_images])], config.image_size, unit=True)
    pooled = augmented_pool(originals, num_images * augment, seed=expert_seed(config.seed, "augment", task.name, num_images))
    return normalise(pooled)


def pool_loader(pool: torch.Tensor, batch_size: int) -> torch.utils.data.DataLoader:
    """Shuffled batches of a pool; the shuffling follows torch's global generator (seeded by training)."""
    dataset = torch.utils.data.TensorDataset(pool)
    return torch.utils.data.DataLoader(dataset, batch_size=min(batch_size, len(pool)), shuffle=True)


# ------------------------------------------------------------------------------ experts


def arch_spec(arch: str, config: FSStudyConfig) -> dict:
    if arch == "mlp":
        return {"arch": "mlp", "in_dim": 3 * config.image_size**2, "hidden": list(config.mlp_hidden), "activation": "relu"}
    if arch == "vit":
        return {
            "arch": "vit", "image_size": config.image_size, "patch_size": config.vit_patch, "width": config.vit_width,
            "depth": config.vit_depth, "heads": config.vit_heads, "mlp_ratio": config.vit_mlp_ratio,
            "output_dim": config.vit_width, "activation": "gelu",
        }
    raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHS}")


def make_model(arch: str, num_classes: int, config: FSStudyConfig) -> nn.Module:
    spec = arch_spec(arch, config)
    if arch == "mlp":
        return MLP(spec["in_dim"], spec["hidden"], num_classes, activation=spec["activation"])
    return ViT(spec["image_size"], spec["patch_size"], 3, spec["width"], spec["depth"], spec["heads"], spec["mlp_ratio"],
               spec["output_dim"], num_classes, activation=spec["activation"])


@dataclass(eq=False)
class Expert:
    arch: str
    task: str
    model: nn.Module  # frozen, eval mode
    info: dict = field(default_factory=dict)  # seconds, steps, init seed, cached (loaded, not trained)


def _lr_lambda(total: int):
    warmup = max(1, total // 20)
    return lambda step: (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def fit(model: nn.Module, heads: Sequence[nn.Module], data: Sequence[tuple[torch.Tensor, torch.Tensor]], epochs: int,
        lr: float, weight_decay: float, batch_size: int, seed: int, desc: str = "training", progress: bool = True) -> dict:
    """Cross-entropy training of ``head_t(model.features(x))`` on each task's (x, y), round robin.

    An epoch is one pass over the largest task (smaller ones restart); AdamW with a 5% linear
    warm-up then cosine decay. Batches are drawn from per-task generators seeded by ``seed``.
    """
    params = list({id(p): p for p in [*model.parameters(), *(p for h in heads for p in h.parameters())]}.values())
    steps_per_epoch = max(math.ceil(len(y) / batch_size) for _, y in data)
    total = epochs * steps_per_epoch * len(data)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total))
    generators = [torch.Generator().manual_seed(seed * 131 + t) for t in range(len(data))]
    orders = [torch.zeros(0, dtype=torch.long) for _ in data]
    model.train()
    started, loss = time.perf_counter(), torch.tensor(float("nan"))
    for step in tqdm(range(total), desc=desc, disable=not progress, leave=False):
        t = step % len(data)
        x, y = data[t]
        if len(orders[t]) < batch_size:  # start another pass over this task
            orders[t] = torch.cat([orders[t], torch.randperm(len(y), generator=generators[t])])
        idx, orders[t] = orders[t][:batch_size], orders[t][batch_size:]
        loss = F.cross_entropy(heads[t](model.features(x[idx])), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return {"steps": total, "train_seconds": round(time.perf_counter() - started, 2), "final_loss": loss.item()}


def _frozen(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


# -------------------------------------------------------------------------- expert caches


def data_spec(config: FSStudyConfig, fingerprints: Mapping[str, str]) -> dict:
    """What an expert's training data depends on: the training subsets' SHA-256 and their preparation."""
    return {"tasks": dict(fingerprints), "image_size": config.image_size, "channels": 3, "normalisation": [0.5, 0.5],
            "train_per_task": config.train_per_task, "split_seed": config.seed}


def _expert_training(config: FSStudyConfig, epochs: int, lr: float) -> dict:
    return {"epochs": epochs, "lr": lr, "weight_decay": config.expert_weight_decay, "batch_size": config.expert_batch_size}


def scratch_expert_spec(config: FSStudyConfig, arch: str, task: str, fingerprint: str, num_classes: int) -> dict:
    """The cache key of a from-scratch expert: every setting that changes its weights."""
    epochs = config.mlp_epochs if arch == "mlp" else config.vit_epochs
    return {"what": "fs_study scratch expert", "version": FS_STUDY_VERSION, "arch": arch_spec(arch, config),
            "num_classes": num_classes, "data": data_spec(config, {task: fingerprint}),
            "init_seed": expert_seed(config.seed, arch, task, "scratch"),
            "train": _expert_training(config, epochs, config.expert_lr)}


def shared_init_spec(config: FSStudyConfig, arch: str, fingerprints: Mapping[str, str]) -> dict:
    """The cache key of the same-init control's shared model; ``fingerprints`` in warm-up order."""
    warmup = list(fingerprints)
    return {"what": "fs_study shared init", "version": FS_STUDY_VERSION, "arch": arch_spec(arch, config),
            "data": data_spec(config, fingerprints), "warmup_order": warmup,  # the key sorts dicts; order matters
            "init_seed": expert_seed(config.seed, arch, "+".join(warmup), "shared"), "per_task": config.warmup_per_task,
            "train": _expert_training(config, config.warmup_epochs, config.expert_lr)}


def finetuned_expert_spec(config: FSStudyConfig, arch: str, task: str, fingerprint: str, num_classes: int,
                          shared: str) -> dict:
    """The cache key of an expert fine-tuned from the shared model whose content hash is ``shared``."""
    return {"what": "fs_study fine-tuned expert", "version": FS_STUDY_VERSION, "arch": arch_spec(arch, config),
            "num_classes": num_classes, "data": data_spec(config, {task: fingerprint}), "shared": shared,
            "head_seed": expert_seed(config.seed, arch, task, "finetuned head"),
            "train": _expert_training(config, config.finetune_epochs, config.finetune_lr)}


def expert_code(arch: str, kind: str) -> tuple[Callable, ...]:
    """The functions whose source produces a cached ``kind`` ("scratch", "shared", "finetuned") of ``arch``."""
    common = (fit, _lr_lambda, make_model, arch_spec, prepare, MLP if arch == "mlp" else ViT)
    producer = {"scratch": FSStudy.expert, "shared": FSStudy.shared_init, "finetuned": FSStudy.finetuned_expert}[kind]
    return (*common, producer, *((subsample_indices, _trunk) if kind == "shared" else ()))


# ------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def correct_predictions(logits: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                        batch_size: int = 1000) -> np.ndarray:
    """Per-example top-1 outcomes (bool) of a logits function on (x, y): what paired errors need."""
    parts = [(logits(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).numpy() for i in range(0, len(y), batch_size)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)


def accuracy(logits: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy (%) of a logits function on (x, y)."""
    correct = correct_predictions(logits, x, y)
    return 100.0 * float(correct.mean()) if len(correct) else 0.0


# ------------------------------------------------------------------------------ merging


@dataclass
class Setting:
    """Experts to merge: one architecture, tasks in order (model 1 first), one kind of init."""

    arch: str
    tasks: tuple
    init: str  # "different" (from scratch, own seeds) or "same" (fine-tuned from a shared model)
    experts: list
    results: dict = field(default_factory=dict, repr=False)  # memo: run key → rows

    @property
    def pair(self) -> str:
        """The tasks and architecture, whatever the init: what the control is matched on."""
        return f"{self.arch.upper()}: {' + '.join(self.tasks)}"

    @property
    def name(self) -> str:
        return self.pair + (" (same init)" if self.init == "same" else "")

    @property
    def models(self) -> list[nn.Module]:
        return [e.model for e in self.experts]

    @property
    def heads(self) -> list[nn.Module]:
        return [e.model.head for e in self.experts]


def methods_for(setting: Setting) -> list[str]:
    """The methods that apply: SLERP needs two models, this ZipIt! two MLPs."""
    n = len(setting.tasks)
    return [m for m in METHODS if not (m == SLERP and n != 2) and not (m == ZIPIT and (n != 2 or setting.arch != "mlp"))]


def _trunk(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}


def _with_trunk(models: Sequence[nn.Module], trunk: dict[str, torch.Tensor]) -> nn.Module:
    merged = copy.deepcopy(models[0])
    merged.load_state_dict({**models[0].state_dict(), **trunk})
    return _frozen(merged)


def _identity_maps(models: Sequence[nn.Module]) -> torch.Tensor:
    d = models[0].feature_dim
    return torch.eye(d).expand(len(models), d, d).clone()


def _as_matrices(state: dict) -> dict:
    """Every weight RegMean merges as an (out × in) matrix: conv1 flattened, ViT's proj transposed."""
    out = dict(state)
    if "conv1.weight" in out:
        out["conv1.weight"] = out["conv1.weight"].flatten(1)
    if "proj" in out:
        out["proj"] = out["proj"].T.contiguous()
    return out


def _from_matrices(state: dict, reference: dict) -> dict:
    out = dict(state)
    if "conv1.weight" in out:
        out["conv1.weight"] = out["conv1.weight"].reshape(reference["conv1.weight"].shape)
    if "proj" in out:
        out["proj"] = out["proj"].T.contiguous()
    return out


@torch.no_grad()
def regmean_grams(model: nn.Module, pool: torch.Tensor, batch_size: int = 256) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Gram matrices of the inputs of every linear map of the trunk (keys as in :func:`_as_matrices`)
    and the number of rows summed into each: ``(grams, counts)``.

    ``lib.statistics.gram_matrices`` covers ``nn.Linear`` and ``conv1``; the ViT's Q/K/V
    (``in_proj_weight``, a parameter read by ``F.linear``) and ``proj`` (``x @ proj``) get
    theirs from hooks on the LayerNorm that feeds each (``ln_1``; ``ln_post`` on the class token).
    """
    names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n != "head"]
    extra: dict[str, torch.Tensor] = {}
    extra_counts: dict[str, int] = {}
    handles = []

    def hook(key):
        def accumulate(module, args, output):
            x = output.detach().float().reshape(-1, output.shape[-1])
            extra[key] = extra.get(key, 0) + x.T @ x
            extra_counts[key] = extra_counts.get(key, 0) + x.shape[0]
        return accumulate

    if isinstance(model, ViT):
        for i, block in enumerate(model.transformer.resblocks):
            handles.append(block.ln_1.register_forward_hook(hook(f"transformer.resblocks.{i}.attn.in_proj_weight")))
        handles.append(model.ln_post.register_forward_hook(hook("proj")))
    try:
        batches = [{"x": pool[i : i + batch_size]} for i in range(0, len(pool), batch_size)]
        grams, counts = gram_matrices(model, batches, linear_names=names, return_counts=True, disable=True)
    finally:
        for h in handles:
            h.remove()
    return {**grams, **{k: v.cpu() for k, v in extra.items()}}, {**counts, **extra_counts}


def _regmean(models, pools, config: FSStudyConfig):
    # on the CPU, where gram_matrices leaves the Grams (paper scale: the models are on the GPU)
    states = [_as_matrices({k: v.cpu() for k, v in _trunk(m).items()}) for m in models]
    statistics = [regmean_grams(m, p) for m, p in zip(models, pools)]
    # ridge: a ReLU dead on every pool image in every model leaves a zero row and column in the
    # summed Gram; the relative ridge sends the weights reading it to the average (they change
    # no output) instead of a singular solve.
    merged = merging.regmean(states, [g for g, _ in statistics], config.regmean_alpha, counts=[c for _, c in statistics],
                             gram_normalization="mean", ridge=config.regmean_ridge)
    return _with_trunk(models, _from_matrices(merged, _trunk(models[0]))), _identity_maps(models)


def _autocast_of(config: FSStudyConfig, module: nn.Module) -> torch.dtype | None:
    """Paper scale: the autocast dtype of the device the models are on (bf16 on CUDA for "auto");
    the small scale trains in float32."""
    if config.scale != "paper":
        return None
    from .paper_tracks import autocast_dtype

    return autocast_dtype(config.autocast, next(module.parameters()).device)


def _train_and_fold(module, pools, steps, lr, config, progress):
    loaders = [pool_loader(p, config.fs_batch_size) for p in pools]
    history = []
    if steps > 0:
        history = train_supernet(module, loaders, steps=steps, lr=lr, weight_decay=config.fs_weight_decay,
                                 seed=config.seed, progress=progress, autocast=_autocast_of(config, module),
                                 micro_batches=config.fs_micro_batches)
    model, out_unmerge = module.fold()
    return _frozen(model), out_unmerge, history


def merge(method: str, models: Sequence[nn.Module], pools: Sequence[torch.Tensor] | None, config: FSStudyConfig,
          rank: int | None = None, fs_init: str | None = None, steps: int = 0, lr: float | None = None,
          progress: bool = True):
    """Run one merge: ``(model, out_unmerge, info)``; task t's logits are
    ``folded_logits(model, out_unmerge, head_t, x, t)``. ``pools``: each task's unlabeled pool
    (data-driven methods only); ``steps`` and ``lr`` (default: ``fs_lr`` / ``kd_lr``) train
    FS-Merge and distillation. The ensemble is not a merge (see :meth:`FSStudy.run`)."""
    rank = config.rank if rank is None else rank
    fs_init = config.fs_init if fs_init is None else fs_init
    info: dict = {}
    if method == MODEL_1:
        model, maps = _frozen(copy.deepcopy(models[0])), _identity_maps(models)
    elif method == AVERAGE:
        model, maps = _with_trunk(models, merging.weight_average([_trunk(m) for m in models])), _identity_maps(models)
    elif method == SLERP:
        if len(models) != 2:
            raise ValueError("SLERP merges two models")
        model, maps = _with_trunk(models, merging.slerp(_trunk(models[0]), _trunk(models[1]), 0.5)), _identity_maps(models)
    elif method == REGMEAN:
        model, maps = _regmean(models, pools, config)
    elif method == REBASIN:
        model, maps, _ = rebasin_merge(models, max_sweeps=config.rebasin_sweeps, seed=config.seed)
        model = _frozen(model)
    elif method == ZIPIT:
        model, maps = zipit_merge(models, [p for p in pools])
        model = _frozen(model)
    elif method == FS_MERGE:
        supernet = build_supernet(models, rank=rank, init=fs_init, seed=config.seed)
        model, maps, history = _train_and_fold(supernet, pools, steps, config.fs_lr if lr is None else lr, config, progress)
        info = {"final_loss": history[-1] if history else float("nan"),
                "trainable_parameters": sum(p.numel() for p in supernet.parameters() if p.requires_grad)}
    elif method == DISTILLATION:
        student = Distillation(models, rank=rank, seed=config.seed)
        model, maps, history = _train_and_fold(student, pools, steps, config.kd_lr if lr is None else lr, config, progress)
        info = {"final_loss": history[-1] if history else float("nan"),
                "trainable_parameters": sum(p.numel() for p in student.parameters() if p.requires_grad)}
    else:
        raise ValueError(f"unknown merge {method!r}; expected one of {METHODS[1:]}")
    return model, maps, info


_WARMED_UP = False


def warm_up() -> None:
    """Run every code path a merge uses once on tiny inputs, so that one-time costs (loading
    LAPACK's code, autograd's and the optimiser's first call) are not charged to whichever
    method happens to be measured first. Idempotent."""
    global _WARMED_UP
    if _WARMED_UP:
        return
    config = FSStudyConfig(mlp_hidden=[4], image_size=4, rank=1, fs_batch_size=4, rebasin_sweeps=2)
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        models = [_frozen(make_model("mlp", 2, config)) for _ in range(2)]
        pools = [torch.randn(8, 3, 4, 4, generator=generator) for _ in models]
        for method in (AVERAGE, SLERP, REGMEAN, REBASIN, ZIPIT, DISTILLATION, FS_MERGE):
            merge(method, models, pools, config, steps=2, progress=False)
    _WARMED_UP = True


# -------------------------------------------------------------------------------- study


class FSStudy:
    """Data, experts and memoised merge results of one notebook run."""

    def __init__(self, config: FSStudyConfig):
        self.config = config
        self.progress = config.progress
        self._tasks: dict[str, TaskData] = {}
        self._experts: dict[tuple, Expert] = {}
        self._pools: dict[tuple, torch.Tensor] = {}
        self._settings: dict[tuple, Setting] = {}
        self.expert_seconds = 0.0  # time spent training (not loading) experts in this process

    # -- data
    def task(self, name: str) -> TaskData:
        if name not in self._tasks:
            self._tasks[name] = load_task(name, self.config, self.config.data_dir or None)
        return self._tasks[name]

    def _train_tensors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        task = self.task(name)
        return prepare(task.train_images, self.config.image_size), torch.as_tensor(task.train_labels)

    def pool(self, task: str, num_images: int, augment: int) -> torch.Tensor:
        key = (task, num_images, augment)
        if key not in self._pools:
            self._pools[key] = unlabeled_pool(self.task(task), num_images, augment, self.config)
        return self._pools[key]

    # -- experts
    def _cached_model(self, kind: str, spec: dict, train: Callable[[], tuple[dict, dict]], code: Sequence[Callable]):
        """Load ``kind/<hash(spec, code)>`` or train, save and return ``(tensors, info)``."""
        path = cache_path(kind, {**spec, "code": code_hash(*code)})  # where cached_tensors(code=...) looks
        trained = []  # "cached" means compute did not run (a damaged file is retrained, hence not path.exists())

        def compute():
            started = time.perf_counter()
            tensors, info = train()
            trained.append(True)
            self.expert_seconds += time.perf_counter() - started
            return tensors, {"info": info}

        tensors = cached_tensors(kind, spec, compute, code=code)
        info = dict(load_metadata(path).get("info", {}))
        info["cached"] = not trained
        return tensors, info

    def expert(self, arch: str, task: str) -> Expert:
        """The from-scratch expert of ``task`` (trained once, then loaded from the cache)."""
        key = (arch, task, "scratch")
        if key in self._experts:
            return self._experts[key]
        c, data = self.config, self.task(task)
        spec = scratch_expert_spec(c, arch, task, data.fingerprint, data.num_classes)
        seed, epochs = spec["init_seed"], spec["train"]["epochs"]

        def train():
            torch.manual_seed(seed)
            model = make_model(arch, data.num_classes, c)
            x, y = self._train_tensors(task)
            info = fit(model, [model.head], [(x, y)], epochs, c.expert_lr, c.expert_weight_decay, c.expert_batch_size,
                       seed, desc=f"{arch} expert: {task}", progress=self.progress)
            return model.state_dict(), {**info, "init_seed": seed}

        tensors, info = self._cached_model(f"fs_study/experts/{arch}", spec, train, expert_code(arch, "scratch"))
        model = make_model(arch, data.num_classes, c)
        model.load_state_dict(tensors)
        expert = Expert(arch, task, _frozen(model), info)
        self._experts[key] = expert
        return expert

    def warmup_tasks(self, tasks: Sequence[str]) -> list[str]:
        chosen = list(self.config.warmup_tasks) or [t for t in WARMUP_POOL if t not in tasks]
        if not chosen:
            raise ValueError("the same-init warm-up needs at least one task")
        return chosen

    def shared_init(self, arch: str, warmup: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict]:
        """The shared model of the same-init control: trained on a pooled warm-up of ``warmup`` tasks
        (``warmup_per_task`` images each, one head per task). Returns (trunk state, info)."""
        c = self.config
        warmup = list(warmup)
        spec = shared_init_spec(c, arch, {t: self.task(t).fingerprint for t in warmup})
        seed = spec["init_seed"]

        def train():
            torch.manual_seed(seed)
            model = make_model(arch, 1, c)
            heads = nn.ModuleList(nn.Linear(model.feature_dim, self.task(t).num_classes) for t in warmup)
            data = []
            for t in warmup:
                task = self.task(t)
                keep = subsample_indices(task.train_labels, c.warmup_per_task, c.seed)
                data.append((prepare(task.train_images[keep], c.image_size), torch.as_tensor(task.train_labels[keep])))
            info = fit(model, list(heads), data, c.warmup_epochs, c.expert_lr, c.expert_weight_decay, c.expert_batch_size,
                       seed, desc=f"{arch} shared warm-up", progress=self.progress)
            return _trunk(model), {**info, "init_seed": seed, "warmup_tasks": warmup}

        return self._cached_model(f"fs_study/shared/{arch}", spec, train, expert_code(arch, "shared"))

    def finetuned_expert(self, arch: str, task: str, warmup: Sequence[str]) -> Expert:
        """Expert of ``task`` fine-tuned from the shared model (fresh head, everything trained)."""
        key = (arch, task, "same", tuple(warmup))
        if key in self._experts:
            return self._experts[key]
        c, data = self.config, self.task(task)
        shared, shared_info = self.shared_init(arch, warmup)
        spec = finetuned_expert_spec(c, arch, task, data.fingerprint, data.num_classes, content_hash(shared))
        head_seed = spec["head_seed"]

        def train():
            torch.manual_seed(head_seed)
            model = make_model(arch, data.num_classes, c)
            model.load_state_dict({**model.state_dict(), **shared})
            x, y = self._train_tensors(task)
            info = fit(model, [model.head], [(x, y)], c.finetune_epochs, c.finetune_lr, c.expert_weight_decay,
                       c.expert_batch_size, head_seed, desc=f"{arch} fine-tune: {task}", progress=self.progress)
            return model.state_dict(), {**info, "head_seed": head_seed}

        tensors, info = self._cached_model(f"fs_study/experts/{arch}", spec, train, expert_code(arch, "finetuned"))
        model = make_model(arch, data.num_classes, c)
        model.load_state_dict(tensors)
        info["shared_init"] = {"fingerprint": content_hash(shared), **{k: shared_info.get(k) for k in ("cached", "train_seconds")}}
        expert = Expert(arch, task, _frozen(model), info)
        self._experts[key] = expert
        return expert

    def setting(self, arch: str, tasks: Sequence[str], init: str = "different") -> Setting:
        """The experts of ``tasks`` (model 1 = the first), from different inits or from one shared model."""
        if init not in INIT_SETTINGS:
            raise ValueError(f"unknown init setting {init!r}; expected one of {INIT_SETTINGS}")
        key = (arch, tuple(tasks), init)
        if key not in self._settings:
            if init == "different":
                experts = [self.expert(arch, t) for t in tasks]
            else:
                warmup = self.warmup_tasks(tasks)
                experts = [self.finetuned_expert(arch, t, warmup) for t in tasks]
            self._settings[key] = Setting(arch, tuple(tasks), init, experts)
        return self._settings[key]

    # -- merging and evaluation
    def fs_steps(self, arch: str) -> int:
        return self.config.fs_steps_mlp if arch == "mlp" else self.config.fs_steps_vit

    def train_steps(self, arch: str, num_images: int, augment: int) -> int:
        """FS-Merge's and distillation's steps: ``fs_epochs`` passes over the pool (one batch of
        every task a step, as :func:`~lib.fs_merge.train_supernet` counts an epoch), or, with
        ``fs_epochs`` = 0, the fixed budget of the architecture, whatever the pool size."""
        c = self.config
        if c.fs_epochs <= 0:
            return self.fs_steps(arch)
        pool = num_images * (1 + augment)
        return c.fs_epochs * math.ceil(pool / min(c.fs_batch_size, pool))

    def correct(self, logits: Callable[[torch.Tensor], torch.Tensor], task: str) -> np.ndarray:
        """Per-example top-1 outcomes of ``logits`` on ``task``'s test set."""
        data = self.task(task)
        return correct_predictions(logits, data.test_x, data.test_y)

    def merge(self, method: str, models: Sequence[nn.Module], pools, **options):
        """One merge, timed: ``((model, out_unmerge, info), seconds, peak MiB)``."""
        return measured_call(lambda: merge(method, models, pools, self.config, progress=self.progress, **options))

    def run(self, setting: Setting, method: str, num_images: int | None = None, augment: int | None = None,
            rank: int | None = None, fs_init: str | None = None, steps: int | None = None,
            lr: float | None = None) -> list[dict]:
        """Merge ``setting``'s experts with ``method`` and evaluate on every task: one row per task,
        with the per-example outcomes (``correct``) that paired standard errors need.

        Memoised: the same (method, relevant options) is merged once per process. Options that do
        not affect a method (the pool for data-free merges, rank/init/steps for untrained ones)
        are recorded as None.
        """
        c = self.config
        data_driven, trained = method in DATA_DRIVEN, method in TRAINED
        options = {
            "num_images": (c.num_images if num_images is None else num_images) if data_driven else None,
            "augment": (c.augment if augment is None else augment) if data_driven else None,
            "rank": (c.rank if rank is None else rank) if trained else None,
            "fs_init": (c.fs_init if fs_init is None else fs_init) if trained else None,
            "steps": (self.fs_steps(setting.arch) if steps is None else steps) if trained else None,
            "lr": (lr if lr is not None else c.fs_lr if method == FS_MERGE else c.kd_lr) if trained else None,
        }
        if trained and (steps is None) and c.fs_epochs > 0:
            options["steps"] = self.train_steps(setting.arch, options["num_images"], options["augment"])
        key = (method, *options.values())
        if key in setting.results:
            return setting.results[key]
        models, heads = setting.models, setting.heads
        pools = [self.pool(t, options["num_images"], options["augment"]) for t in setting.tasks] if data_driven else None
        if method == ENSEMBLE:
            logits = [lambda x, t=t: models[t](x) for t in range(len(models))]
            seconds, peak, info = 0.0, 0.0, {}
            trunk_params = sum(p.numel() for m in models for n, p in m.named_parameters() if not n.startswith("head."))
            map_params = 0
        else:
            warm_up()
            (model, maps, info), seconds, peak = self.merge(method, models, pools, rank=options["rank"],
                                                            fs_init=options["fs_init"], steps=options["steps"] or 0,
                                                            lr=options["lr"])
            maps = maps.to(next(model.parameters()).device)  # identity maps are made on the CPU
            logits = [lambda x, t=t: folded_logits(model, maps, heads[t], x, t) for t in range(len(models))]
            trunk_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head."))
            identity = torch.equal(maps, _identity_maps(models).to(maps))
            permutation = bool(((maps == 0) | (maps == 1)).all() and (maps.sum(-1) == 1).all())
            map_params = 0 if identity or (method == REBASIN and permutation) else maps.numel()
        rows = []
        for t, (name, expert) in enumerate(zip(setting.tasks, setting.experts)):
            data = self.task(name)
            correct = self.correct(logits[t], name)
            rows.append({
                "setting": setting.name, "pair": setting.pair, "arch": setting.arch, "init": setting.init,
                "models": len(setting.tasks), "seed": c.seed, "method": method, "task": name, "task_index": t, **options,
                "accuracy": 100.0 * float(correct.mean()), "expert_accuracy": self.expert_accuracy(expert),
                "chance": data.chance, "test_examples": len(correct), "correct": correct,
                "seconds": seconds, "peak_mib": peak, "trunk_parameters": trunk_params, "output_map_parameters": map_params,
                "final_loss": info.get("final_loss"), "trainable_parameters": info.get("trainable_parameters"),
            })
        setting.results[key] = rows
        return rows

    def expert_accuracy(self, expert: Expert) -> float:
        if "test_accuracy_now" not in expert.info:
            correct = self.correct(expert.model, expert.task)
            expert.info["test_accuracy_now"] = 100.0 * float(correct.mean()) if len(correct) else 0.0
        return expert.info["test_accuracy_now"]

    def run_all(self, setting: Setting, methods: Sequence[str] | None = None, **options) -> list[dict]:
        rows = []
        for method in methods or methods_for(setting):
            rows += self.run(setting, method, **options)
        return rows

    # -- the notebook's experiments
    def main_settings(self) -> list[Setting]:
        """Every different-init setting of the main comparison: MLP pairs, ViT pairs, the four-model MLP merge."""
        c = self.config
        return ([self.setting("mlp", p) for p in c.mlp_pairs] + [self.setting("vit", p) for p in c.vit_pairs]
                + ([self.setting("mlp", c.four_model_tasks)] if c.four_model_tasks else []))

    def first_pair(self, arch: str) -> list[str] | None:
        pairs = self.config.mlp_pairs if arch == "mlp" else self.config.vit_pairs
        return list(pairs[0]) if pairs else None

    def main_comparison(self) -> list[dict]:
        return [row for setting in self.main_settings() for row in self.run_all(setting)]

    def image_count_sweep(self) -> list[dict]:
        """For the first pair of each ``sweep_archs``: FS-Merge, distillation and the data-driven
        closed-form merges at every ``image_counts`` (+ ``augment`` copies); FS-Merge and
        distillation also without augmentation for ``ablation_archs``. Same steps for every n."""
        c, rows = self.config, []
        for arch in c.sweep_archs:
            if not self.first_pair(arch):
                continue
            setting = self.setting(arch, self.first_pair(arch))
            methods = [FS_MERGE, DISTILLATION, REGMEAN] + ([ZIPIT] if ZIPIT in methods_for(setting) else [])
            for n in c.image_counts:
                for method in methods:
                    rows += self.run(setting, method, num_images=n, augment=c.augment)
                if arch in c.ablation_archs:
                    for method in TRAINED:
                        rows += self.run(setting, method, num_images=n, augment=0)
        return rows

    def ablations(self) -> list[dict]:
        """FS-Merge's initialisation, rank, augmentation and lr, and distillation's augmentation and lr,
        on the first pair of each ``ablation_archs``; rows carry a ``variant`` (``DEFAULT_VARIANT``: the config)."""
        c, rows = self.config, []

        def ablate(setting, variant, method, **options):
            rows.extend({**row, "variant": variant} for row in self.run(setting, method, **options))

        for arch in c.ablation_archs:
            if not self.first_pair(arch):
                continue
            setting = self.setting(arch, self.first_pair(arch))
            ablate(setting, DEFAULT_VARIANT, FS_MERGE)
            ablate(setting, DEFAULT_VARIANT, DISTILLATION)
            other = "average" if c.fs_init == "first" else "first"
            ablate(setting, f"init {other}", FS_MERGE, fs_init=other)
            for r in c.ranks:
                if r != c.rank:
                    ablate(setting, f"rank r={r}", FS_MERGE, rank=r)
            for method in TRAINED:
                ablate(setting, "no augmentation", method, augment=0)
            for lr in c.ablation_lrs:
                if lr != c.fs_lr:
                    ablate(setting, f"lr {lr:g}", FS_MERGE, lr=lr)
                if lr != c.kd_lr:
                    ablate(setting, f"lr {lr:g}", DISTILLATION, lr=lr)
        return rows

    def control(self) -> list[dict]:
        """Every method on the first pair of each ``control_archs``, experts fine-tuned from one shared model."""
        rows = []
        for arch in self.config.control_archs:
            if self.first_pair(arch):
                rows += self.run_all(self.setting(arch, self.first_pair(arch), init="same"))
        return rows

    def results(self, outcomes: bool = True) -> pd.DataFrame:
        """Every row computed so far, over all settings (without the per-example outcomes unless ``outcomes``)."""
        rows = [r for s in self._settings.values() for rs in s.results.values() for r in rs]
        table = pd.DataFrame(rows)
        return table if outcomes or not len(table) else table.drop(columns="correct")

    def experts_table(self) -> pd.DataFrame:
        rows = []
        for (arch, task, kind, *_), e in self._experts.items():
            rows.append({"arch": arch, "task": task, "init": "different (from scratch)" if kind == "scratch" else "same (fine-tuned from shared)",
                         "test accuracy": self.expert_accuracy(e), "chance": self.task(task).chance, "steps": e.info.get("steps"),
                         "train seconds": e.info.get("train_seconds"), "loaded from cache": e.info.get("cached")})
        return pd.DataFrame(rows)

    # -- what the notebook's captions and titles say (the paper-scale study says its own)
    scale_label = "small scale"
    init_labels = {"different": "different inits (from scratch)", "same": "shared init (fine-tuned)"}

    def experts_caption(self) -> str:
        return ("Experts trained from scratch with different seeds (small scale): test accuracy %, chance level, "
                "training steps and seconds.")

    def budget_text(self) -> str:
        """How FS-Merge and distillation were trained, for captions."""
        c = self.config
        if c.fs_epochs > 0:
            return f"{c.fs_epochs} epochs of the pool, peak lr {c.fs_lr:g} / {c.kd_lr:g}"
        return (f"{c.fs_steps_mlp} (MLP) / {c.fs_steps_vit} (ViT) steps, peak lr {c.fs_lr:g} / {c.kd_lr:g} "
                "(paper: 100 epochs, 1e-4)")

    def main_caption(self) -> str:
        c = self.config
        return (f"**Small scale** (not the paper's numbers). Average accuracy % ± its standard error, normalized and "
                f"retained scores, accuracy per task. Data-driven methods: {c.num_images} unlabeled images per task + "
                f"{c.augment} augmented copies each. FS-Merge / distillation: {self.budget_text()}.")

    def sweep_caption(self) -> str:
        return (f"**Small scale.** Average accuracy % vs unlabeled original images per task (+ {self.config.augment} "
                "augmented copies each, or originals only). Same number of training steps for every n.")

    def control_caption(self) -> str:
        return ("**Small scale.** The same pair merged from different initialisations (from scratch) and from one shared "
                f"initialisation (warm-up on the other tasks, then fine-tuned at lr {self.config.finetune_lr}).")

    def cost_caption(self) -> str:
        return (f"**Small scale, {torch.get_num_threads()} CPU thread(s).** Merge wall time, peak resident memory "
                "growth and parameters; one run each (no uncertainty).")

    memory_label = "peak memory growth, MiB (log)"
    cost_title = "Cost of each merge (small scale, CPU)"

    def skipped(self) -> list[str]:
        """Experiments of the notebook not run at this scale, each with its reason (for the findings)."""
        return []

    def run_time_note(self, wall_seconds: float) -> str:
        """How long the run took and how much of it trained experts (for the findings' notes)."""
        experts = self.experts_table()
        loaded = int(experts["loaded from cache"].sum()) if len(experts) else 0
        threads = torch.get_num_threads()
        return (f"Run time: {wall_seconds / 60:.1f} min on {threads} CPU thread{'s' if threads != 1 else ''}, of which "
                f"{self.expert_seconds / 60:.1f} min trained experts ({loaded} of {len(experts)} experts were loaded "
                f"from the cache); with warm expert caches about {(wall_seconds - self.expert_seconds) / 60:.1f} min.")


# ------------------------------------------------------------------------------ tables


def summary(rows: pd.DataFrame, index: Sequence[str] = ("method",)) -> pd.DataFrame:
    """Wide table: accuracy (%) per task, their average, the normalised score (accuracy as % of
    each task's expert, averaged) and the retained score (the share of each expert's
    above-chance accuracy that survives: 100·(acc − chance)/(expert − chance), averaged; 0 is
    chance level, which the normalised score hides when a task has few classes)."""
    rows = rows.assign(normalized=100 * rows["accuracy"] / rows["expert_accuracy"],
                       retained=100 * (rows["accuracy"] - rows["chance"]) / (rows["expert_accuracy"] - rows["chance"]))
    index = list(index)
    wide = rows.pivot_table(index=index, columns="task", values="accuracy", sort=False)
    wide.columns.name = None
    grouped = rows.groupby(index, sort=False)
    wide["average"] = grouped["accuracy"].mean()
    wide["normalized"] = grouped["normalized"].mean()
    wide["retained"] = grouped["retained"].mean()
    return wide


def flat(table: pd.DataFrame) -> pd.DataFrame:
    """One index level (the first) for readable Markdown; the other levels become columns."""
    return table.reset_index().set_index(table.index.names[0])


def per_task(rows: pd.DataFrame, index: Sequence[str]) -> pd.Series:
    """"task accuracy, …" per group, for the tables."""
    return rows.groupby(list(index), sort=False).apply(
        lambda g: ", ".join(f"{t} {a:.1f}" for t, a in zip(g["task"], g["accuracy"])), include_groups=False
    ).rename("accuracy per task (%)")


def _with_standard_error(table: pd.DataFrame, rows: pd.DataFrame, index: Sequence[str]) -> pd.DataFrame:
    errors = rows.groupby(list(index), sort=False).apply(lambda g: contrast(g, [(1, {})]).se, include_groups=False)
    return table.assign(**{"± SE": errors})


def main_table(rows: pd.DataFrame) -> pd.DataFrame:
    """The main comparison: average accuracy (± its standard error), normalized, retained, per task."""
    index = ["setting", "method"]
    table = summary(rows, index)[["average"]]
    table = _with_standard_error(table, rows, index).join(summary(rows, index)[["normalized", "retained"]])
    return flat(table.join(per_task(rows, index)).round(1))


def sweep_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Average accuracy per setting, method and data (augmented or not), one column per image count."""
    rows = rows.assign(data=np.where(rows["augment"] > 0, "+ augmented", "originals only"))
    table = rows.groupby(["setting", "method", "data", "num_images"], sort=False)["accuracy"].mean().unstack("num_images")
    table.columns = [f"n={c}" for c in table.columns]
    return flat(table.round(1))


def ablation_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Every ablation's average accuracy (± SE), scores, final training loss (×1e-3) and merge seconds."""
    index = ["setting", "method", "variant"]
    table = _with_standard_error(summary(rows, index)[["average"]], rows, index)
    table = table.join(summary(rows, index)[["normalized", "retained"]]).join(per_task(rows, index))
    firsts = rows.groupby(index, sort=False)[["final_loss", "seconds"]].first()
    table["final feature loss ×1e-3"] = 1000 * firsts["final_loss"]  # so the .md's one decimal keeps the digits
    table["merge seconds"] = firsts["seconds"]
    return flat(table.round(1))


def control_table(main: pd.DataFrame, control: pd.DataFrame) -> pd.DataFrame:
    """The control's pairs from different inits (the main comparison) and from a shared init, side by side."""
    both = pd.concat([main[main["pair"].isin(set(control["pair"]))], control])
    table = summary(both, index=["pair", "method", "init"])[["average", "normalized", "retained"]].unstack("init")
    table.columns = [f"{score} ({init} init)" for score, init in table.columns]
    return flat(table.round(1))


def cost_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Merge wall time, peak memory growth and parameters of every method in every setting (one run each)."""
    table = rows.groupby(["setting", "method"], sort=False)[
        ["seconds", "peak_mib", "trunk_parameters", "output_map_parameters", "trainable_parameters"]].first()
    table = table.rename(columns={"seconds": "merge seconds", "peak_mib": "peak MiB", "trunk_parameters": "trunk parameters",
                                  "output_map_parameters": "output-map parameters", "trainable_parameters": "trained parameters"})
    return table.round({"merge seconds": 2, "peak MiB": 1})


# ------------------------------------------------------------------------------ verdicts
#
# A "term" is one model's rows, chosen by column values (e.g. {"setting": s, "method": FS_MERGE}).
# contrast(rows, [(1, a), (-1, b)]) is a − b in points of task-averaged accuracy: within one seed
# every term is scored on the same test examples, so the per-example differences are paired; over
# several seeds it is the mean over seeds with the between-seed standard error.

RUN_KEY = ("setting", "method", "task", "seed", "num_images", "augment", "rank", "fs_init", "steps", "lr", "variant")


def outcomes(rows: pd.DataFrame, where: Mapping) -> dict[str, np.ndarray]:
    """``{task: per-example outcomes}`` of the one model that ``where`` selects in ``rows`` (one seed)."""
    chosen = rows
    for column, value in where.items():
        chosen = chosen[chosen[column] == value]
    # the same memoised run can reach a table twice (e.g. FS-Merge's default in main and sweep)
    chosen = chosen.drop_duplicates([c for c in RUN_KEY if c in chosen.columns])
    if chosen.empty:
        raise KeyError(f"no rows where {dict(where)}")
    if chosen["task"].duplicated().any():
        raise ValueError(f"{dict(where)} selects more than one model; name the setting, method and options")
    return {r.task: np.asarray(r.correct, dtype=bool) for r in chosen.itertuples()}


def paired_contrast(terms: Sequence[tuple[float, Mapping[str, np.ndarray]]]) -> Estimate:
    """Σ weight·accuracy over ``terms`` (points, task-averaged) with its paired standard error:
    every term's outcomes are on the same examples of each task, so the weighted sum is taken
    per example first, which removes the variance the terms share."""
    tasks = list(terms[0][1])
    means, variances = [], []
    for task in tasks:
        per_example = 0.0
        for weight, outcome in terms:
            if task not in outcome or set(outcome) != set(tasks):
                raise ValueError(f"the terms were scored on different tasks: {sorted(outcome)} vs {sorted(tasks)}")
            x = np.asarray(outcome[task], dtype=float)
            if np.ndim(per_example) and x.shape != per_example.shape:
                raise ValueError(f"task {task!r}: terms scored on {x.shape} and {per_example.shape} examples")
            per_example = per_example + weight * x
        means.append(per_example.mean())
        variances.append(per_example.var(ddof=1) / len(per_example) if len(per_example) > 1 else 0.0)
    return Estimate(100 * float(np.mean(means)), 100 * math.sqrt(sum(variances)) / len(tasks))


def contrast(rows: pd.DataFrame, terms: Sequence[tuple[float, Mapping]]) -> Estimate:
    """Σ weight·accuracy of the models each ``where`` selects: paired within a seed, over seeds if several."""
    seeds = list(dict.fromkeys(rows["seed"])) if "seed" in rows.columns else [None]
    values = []
    for seed in seeds:
        part = rows if seed is None else rows[rows["seed"] == seed]
        values.append(paired_contrast([(weight, outcomes(part, where)) for weight, where in terms]))
    return values[0] if len(values) == 1 else over_seeds([v.value for v in values])


def quoted(d: Estimate, unit: str = " points") -> str:
    """A difference as the findings state it: value ± SE, and whether it exceeds 2 SE."""
    if not math.isfinite(d.se):
        return f"{d.value:+.1f}{unit} (no standard error: no verdict)"
    size = "exceeds 2 SE" if verdict(d) in ("better", "worse") else "within noise, |d| ≤ 2 SE"
    return f"{d}{unit} ({size})"


def _state(d: Estimate) -> str:
    """One setting's outcome for a claim "d > 0"."""
    return {"better": "held", "worse": "did not hold", "within noise": "inconclusive"}.get(verdict(d), "undetermined")


def _outcome(states: Sequence[str], unit: str = "settings") -> str:
    """The claim's outcome over settings, with the count behind it."""
    n = len(states)
    if n == 0:
        return "not run"
    counts = {s: states.count(s) for s in dict.fromkeys(states)}
    if len(counts) == 1:
        only = states[0]
        where = "" if n == 1 else f" in both {unit}" if n == 2 else f" in all {n} {unit}"
        return {"inconclusive": "inconclusive (within noise)"}.get(only, only) + where
    parts = [f"{label} in {counts[s]}" for s, label in (("held", "held"), ("did not hold", "did not hold"),
                                                         ("inconclusive", "within noise"), ("undetermined", "undetermined"))
             if s in counts]
    return "mixed: " + ", ".join(parts) + f" of {n} {unit}"


def _accuracy(rows: pd.DataFrame, where: Mapping) -> Estimate:
    return contrast(rows, [(1, where)])


def _difference(rows: pd.DataFrame, a: Mapping, b: Mapping) -> Estimate:
    return contrast(rows, [(1, a), (-1, b)])


def _settings(rows: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(rows["setting"]))


def simple_merges_collapse(main: pd.DataFrame) -> Claim:
    """Claim 1: with different inits, no closed-form merge does better than keeping model 1 alone
    (doing nothing). Per setting the best closed-form merge (by average accuracy) is compared with
    model 1 alone; the claim holds where it is worse by more than 2 SE."""
    states, parts = [], []
    for s in _settings(main[main["init"] == "different"]):
        methods = [m for m in CLOSED_FORM if m in set(main.loc[main["setting"] == s, "method"])]
        accuracies = {m: _accuracy(main, {"setting": s, "method": m}) for m in methods}
        best = max(methods, key=lambda m: accuracies[m].value)
        d = _difference(main, {"setting": s, "method": MODEL_1}, {"setting": s, "method": best})
        states.append(_state(d))
        low, high = min(a.value for a in accuracies.values()), max(a.value for a in accuracies.values())
        parts.append(f"{s}: {', '.join(methods)} reach {low:.1f}–{high:.1f}% against "
                     f"{_accuracy(main, {'setting': s, 'method': MODEL_1}).plain()}% for model 1 alone and "
                     f"{_accuracy(main, {'setting': s, 'method': ENSEMBLE}).plain()}% for the ensemble; "
                     f"model 1 alone − the best ({best}) = {quoted(d)}")
    return Claim("Closed-form merges (weight averaging, SLERP, RegMean, Re-Basin, ZipIt!) collapse across different "
                 "initialisations: none beats keeping model 1 alone", _outcome(states), "; ".join(parts) + ".",
                 "model 1 alone (doing nothing); the ensemble of experts as the upper reference")


def distillation_works(main: pd.DataFrame) -> Claim:
    """Claim 2: distillation beats keeping model 1 alone (by more than 2 SE) in every setting."""
    states, parts = [], []
    for s in _settings(main[main["init"] == "different"]):
        kd, one, ensemble = ({"setting": s, "method": m} for m in (DISTILLATION, MODEL_1, ENSEMBLE))
        d = _difference(main, kd, one)
        states.append(_state(d))
        parts.append(f"{s}: distillation {_accuracy(main, kd).plain()}%, − model 1 alone = {quoted(d)}; "
                     f"ensemble − distillation = {quoted(_difference(main, ensemble, kd))}")
    return Claim("Knowledge distillation works (beats doing nothing)", _outcome(states), "; ".join(parts) + ".",
                 "model 1 alone (doing nothing); the ensemble of experts as the upper reference")


def fs_merge_beats_distillation(main: pd.DataFrame) -> Claim:
    """Claim 3: FS-Merge beats distillation (paired over the same test examples) in every setting."""
    states, parts = [], []
    for s in _settings(main[main["init"] == "different"]):
        fs, kd, one = ({"setting": s, "method": m} for m in (FS_MERGE, DISTILLATION, MODEL_1))
        d = _difference(main, fs, kd)
        states.append(_state(d))
        parts.append(f"{s}: FS-Merge {_accuracy(main, fs).plain()}% − distillation {_accuracy(main, kd).plain()}% = "
                     f"{quoted(d)}; FS-Merge − model 1 alone = {quoted(_difference(main, fs, one))}")
    images = sorted({int(n) for n in main.loc[main["method"] == FS_MERGE, "num_images"] if pd.notna(n)})
    at = f" (at {', '.join(map(str, images))} unlabeled images per task)" if images else ""
    return Claim(f"FS-Merge beats distillation{at}",
                 _outcome(states), "; ".join(parts) + ".", "model 1 alone (doing nothing)")


def advantage_largest_with_little_data(sweep: pd.DataFrame, main: pd.DataFrame) -> Claim:
    """Claim 4: FS-Merge's advantage over distillation is largest in the low-data regime: at the
    fewest images FS-Merge beats distillation, and by more than at the most images (both > 2 SE;
    the change of the gap is one paired contrast of four models on the same test examples)."""
    augmented = sweep[sweep["augment"] > 0]
    if augmented["augment"].nunique() > 1:
        raise ValueError("the sweep mixes augmentation settings; pass one")
    rows = pd.concat([main[main["method"] == MODEL_1], augmented])
    states, parts = [], []
    for s in _settings(augmented):
        counts = sorted(set(augmented.loc[augmented["setting"] == s, "num_images"]))
        low, high = counts[0], counts[-1]
        fs = {n: {"setting": s, "method": FS_MERGE, "num_images": n} for n in (low, high)}
        kd = {n: {"setting": s, "method": DISTILLATION, "num_images": n} for n in (low, high)}
        gap_low, gap_high = _difference(rows, fs[low], kd[low]), _difference(rows, fs[high], kd[high])
        shrink = contrast(rows, [(1, fs[low]), (-1, kd[low]), (-1, fs[high]), (1, kd[high])])
        first, second = _state(gap_low), _state(shrink)
        states.append("held" if first == second == "held" else
                      "did not hold" if "did not hold" in (first, second) else "inconclusive")
        parts.append(f"{s}: FS-Merge − distillation = {quoted(gap_low)} at {low} images/task and {quoted(gap_high)} at "
                     f"{high}; the gap at {low} minus the gap at {high} = {quoted(shrink)}; FS-Merge at {low} − model 1 alone "
                     f"= {quoted(_difference(rows, fs[low], {'setting': s, 'method': MODEL_1}))}")
    return Claim("FS-Merge's advantage over distillation is largest when data is scarce", _outcome(states),
                 "; ".join(parts) + ".", "model 1 alone (doing nothing)")


def shared_init_narrows_the_gap(main: pd.DataFrame, control: pd.DataFrame) -> Claim:
    """Claim 5: with a shared initialisation the gap between FS-Merge and weight averaging narrows.
    Weight averaging is the fixed comparison (not the best closed-form merge on test, which would
    pick the comparison on the very examples it is scored on); the narrowing is one paired
    contrast of four models on the same test examples."""
    rows = pd.concat([main[main["pair"].isin(set(control["pair"]))], control])
    states, parts = [], []
    for pair in dict.fromkeys(control["pair"]):
        where = {init: {m: {"pair": pair, "init": init, "method": m} for m in (FS_MERGE, AVERAGE, MODEL_1)}
                 for init in INIT_SETTINGS}
        gap = {init: _difference(rows, where[init][FS_MERGE], where[init][AVERAGE]) for init in INIT_SETTINGS}
        narrowing = contrast(rows, [(1, where["different"][FS_MERGE]), (-1, where["different"][AVERAGE]),
                                    (-1, where["same"][FS_MERGE]), (1, where["same"][AVERAGE])])
        states.append(_state(narrowing))
        averaging = {init: _difference(rows, where[init][AVERAGE], where[init][MODEL_1]) for init in INIT_SETTINGS}
        parts.append(f"{pair}: FS-Merge − weight averaging = {quoted(gap['different'])} from different inits and "
                     f"{quoted(gap['same'])} from a shared init, a narrowing of {quoted(narrowing)}; weight averaging − "
                     f"model 1 alone = {quoted(averaging['different'])} (different) vs {quoted(averaging['same'])} (shared)")
    return Claim("With a shared initialisation the gap between FS-Merge and simple merging narrows", _outcome(states, "pairs"),
                 "; ".join(parts) + ".", "model 1 alone (doing nothing) in each init")


def ablation_notes(ablation: pd.DataFrame) -> list[str]:
    """Each ablation against its method's default, paired over the same test examples."""
    notes = []
    for (s, method), group in ablation.groupby(["setting", "method"], sort=False):
        default = {"setting": s, "method": method, "variant": DEFAULT_VARIANT}
        others = [v for v in dict.fromkeys(group["variant"]) if v != DEFAULT_VARIANT]
        changes = "; ".join(f"{v} {quoted(_difference(ablation, {**default, 'variant': v}, default))}" for v in others)
        notes.append(f"Ablation, {method} on {s} (default {_accuracy(ablation, default).plain()}%), variant − default: {changes}.")
    return notes


def cost_notes(main: pd.DataFrame, where: str = "this machine's CPU") -> list[str]:
    """Merge time and memory of FS-Merge, distillation and the closed-form merges (one timing each,
    so no standard error and no verdict)."""
    table = cost_table(main)
    parts = []
    for s in _settings(main):
        c = table.loc[s]
        closed = c.reindex([m for m in CLOSED_FORM if m in c.index])
        parts.append(f"{s}: FS-Merge {c.loc[FS_MERGE, 'merge seconds']:.1f} s / {c.loc[FS_MERGE, 'peak MiB']:.0f} MiB, "
                     f"distillation {c.loc[DISTILLATION, 'merge seconds']:.1f} s / {c.loc[DISTILLATION, 'peak MiB']:.0f} MiB, "
                     f"closed-form merges ≤ {closed['merge seconds'].max():.2f} s")
    return [f"Cost on {where} (one timing per merge, no uncertainty): " + "; ".join(parts) + "."]


def uncertainty_note(rows: pd.DataFrame) -> str:
    seeds = rows["seed"].nunique() if "seed" in rows.columns else 1
    if seeds > 1:
        return (f"Every ± is the standard error over {seeds} seeds of the per-seed value (each seed has its own "
                f"experts and test subsets). A difference counts only beyond {Z:g} SE.")
    return ("Every ± is one standard error in points over the test examples, paired where two models are scored on "
            "the same examples; one seed, so it covers test-set noise only, not the variation between training runs. "
            f"A difference counts only beyond {Z:g} SE.")


def findings(config: FSStudyConfig, main: pd.DataFrame, sweep: pd.DataFrame | None = None,
             ablation: pd.DataFrame | None = None, control: pd.DataFrame | None = None, notes: Sequence[str] = ()) -> str:
    """The notebook's ``findings.md``: the paper's five claims checked on these rows, then notes."""
    claims = [simple_merges_collapse(main), distillation_works(main), fs_merge_beats_distillation(main)]
    if sweep is not None and len(sweep):
        claims.append(advantage_largest_with_little_data(sweep, main))
    if control is not None and len(control):
        claims.append(shared_init_narrows_the_gap(main, control))
    if config.scale == "paper":
        from .fs_merge_paper import paper_preamble

        preamble, where = paper_preamble(config), f"the run's device ({config.device})"
    else:
        preamble = (f"*Small scale (scale={config.scale!r}) on a CPU: tiny experts trained from scratch for a few epochs, "
                    f"{config.image_size}×{config.image_size} images, FS-Merge and distillation trained "
                    f"{config.fs_steps_mlp} (MLP) / {config.fs_steps_vit} (ViT) steps at peak lr {config.fs_lr:g} / "
                    f"{config.kd_lr:g} instead of 100 epochs at 1e-4. These are not the paper's numbers.* ")
        where = "this machine's CPU"
    preamble += uncertainty_note(main)
    extra = [*(ablation_notes(ablation) if ablation is not None and len(ablation) else []), *cost_notes(main, where), *notes]
    return findings_markdown("FS-Merge: which of the paper's claims held at this scale", claims, preamble, extra)


def fs_study(config: FSStudyConfig) -> FSStudy:
    """The study of ``config``'s scale: :class:`FSStudy`, or at paper scale
    :class:`~lib.experiments.fs_merge_paper.PaperFSStudy` (CLIP experts, the same experiments)."""
    if config.scale == "paper":
        from .fs_merge_paper import PaperFSStudy

        return PaperFSStudy(config)
    return FSStudy(config)


__all__ = [
    "FS_STUDY_VERSION", "PAPER_SCALE", "PAPER_PAIRS", "PAPER_PRETRAINED", "fs_study", "METHODS", "CLOSED_FORM", "ENSEMBLE", "MODEL_1", "AVERAGE", "SLERP", "REGMEAN", "REBASIN",
    "ZIPIT", "DISTILLATION", "FS_MERGE", "DEFAULT_VARIANT", "FSStudyConfig", "FSStudy", "Setting", "Expert", "TaskData",
    "expert_seed", "load_task", "unlabeled_pool", "pool_loader", "make_model", "arch_spec", "fit", "accuracy",
    "correct_predictions", "merge", "methods_for", "regmean_grams", "data_spec", "scratch_expert_spec",
    "shared_init_spec", "finetuned_expert_spec", "expert_code", "summary", "flat", "per_task", "main_table",
    "sweep_table", "ablation_table", "control_table", "cost_table", "outcomes", "paired_contrast", "contrast",
    "quoted", "simple_merges_collapse", "distillation_works", "fs_merge_beats_distillation",
    "advantage_largest_with_little_data", "shared_init_narrows_the_gap", "ablation_notes", "cost_notes",
    "uncertainty_note", "findings",
]
