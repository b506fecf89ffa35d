"""The FS-Merge study (issue #3): experts from different initialisations, every merge, evaluated.

Everything ``notebooks/03_fs_merge.ipynb`` runs, as plain functions around :class:`FSStudy`:

    study = FSStudy(FSStudyConfig(...), data_dir="../shared/data")
    pair = study.setting("mlp", ["mnist", "fashion_mnist"])            # trains or loads experts
    rows = study.run(pair, FS_MERGE, num_images=64)                     # per-task accuracy + cost
    control = study.setting("mlp", ["mnist", "fashion_mnist"], init="same")
    table = study.results()                                              # every run so far

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
learning rate). All are cached as safetensors keyed by a hash of everything that produced
them (architecture, training settings, seeds, a SHA-256 of the training images, this
module's ``FS_STUDY_VERSION``), so a second run only loads them.

**Unlabeled data for the data-driven merges.** Per task, the first ``num_images`` of a seeded
permutation of the training split (so a smaller pool is a subset of a larger one), plus
``augment`` augmented copies per original from :func:`lib.fs_merge.augmented_pool`. FS-Merge,
distillation, RegMean's Gram matrices and ZipIt!'s correlations all see the same pool. Labels
are never used.

**Methods** (names are the constants below): the ensemble (all experts kept, task t answered by
expert t: the upper reference), model 1 alone (where FS-Merge's "first" init starts), weight
averaging, SLERP (two models), RegMean, Git Re-Basin weight matching then averaging, ZipIt!
(two MLPs), distillation (student initialised from model 1, FS-Merge's feature loss, data,
schedule and per-task output maps) and FS-Merge. Every merged model has the original
architecture and size; task t is read with expert t's own head after the merge's per-task
output map (``folded_logits``; the identity for averaging, SLERP and RegMean).

**Training budget.** FS-Merge and distillation run a fixed number of optimisation steps
(``fs_steps_mlp`` / ``fs_steps_vit``), whatever the pool size, so runs with different amounts of
data cost the same; the paper trains 100 epochs (more steps for more data) at lr 1e-4 for
both. With a few hundred steps on CPU, lr 1e-4 leaves both far from converged, so both use a
peak lr of 3e-3 (``fs_lr``, ``kd_lr``; one lr for both, as in the paper). In a pilot with
{1e-3, 3e-3, 1e-2} on the first MLP and ViT pairs, 3e-3 was distillation's best by final
*training* feature loss (no labels involved); FS-Merge's loss was lower still at 1e-2 on the
different-init pairs, but at 1e-2 it diverged on the same-init MLP pair (all ReLUs dead). Both
deviations are stated wherever results are shown, and the ablation runs both methods at
``ablation_lrs``.

**Cost.** Each merge's wall time and peak resident memory (:func:`lib.experiments.cost.measured_call`) cover
the merge itself (statistics, training, folding), not building the shared data pool.
"""
from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import merging
from ..archs import MLP, ViT
from .cache import cache_path, cached_tensors, content_hash, load_metadata
from .cost import measured_call
from ..data import VISION_TASKS, load_vision_task, prepare_images, subsample_indices
from ..fs_merge import Distillation, augmented_pool, build_supernet, folded_logits, train_supernet
from ..permutation import rebasin_merge, zipit_merge
from ..statistics import gram_matrices

# Bump when a change here changes what a cached expert would contain.
FS_STUDY_VERSION = 1

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
TRAINED = (DISTILLATION, FS_MERGE)  # trained on the pool: depend on rank, init, steps
DATA_DRIVEN = (REGMEAN, ZIPIT, *TRAINED)  # depend on the pool


@dataclass
class FSStudyConfig:
    """Every setting of the FS-Merge study. Fields are the notebook's parameters."""

    # settings: which experts are merged
    mlp_pairs: list = field(default_factory=lambda: [["mnist", "fashion_mnist"], ["gtsrb", "cifar10"]])
    vit_pairs: list = field(default_factory=lambda: [["fashion_mnist", "cifar10"]])
    four_model_tasks: list = field(default_factory=lambda: ["mnist", "fashion_mnist", "usps", "cifar10"])  # MLPs
    # data
    image_size: int = 32
    train_per_task: int = 8000  # images an expert trains on (seeded, class-stratified)
    test_per_task: int = 1000  # test images per task every accuracy is measured on
    seed: int = 0
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
    warmup_tasks: list = field(default_factory=list)  # [] = every task not in the setting
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
    fs_lr: float = 3e-3  # FS-Merge's peak lr (one-cycle, AdamW); the paper: 1e-4 over 100 epochs
    kd_lr: float = 3e-3  # distillation's peak lr (the paper: the same as FS-Merge's)
    fs_weight_decay: float = 1e-3
    rank: int = 12
    fs_init: str = "first"
    ranks: list = field(default_factory=lambda: [0, 4, 12, 32])
    ablation_lrs: list = field(default_factory=lambda: [1e-3, 1e-2])  # both methods, besides the default
    # other baselines
    regmean_alpha: float = 0.7  # the authors' reg_coef for RegMean
    rebasin_sweeps: int = 100
    # which parts of the notebook run for which architecture
    sweep_archs: list = field(default_factory=lambda: ["mlp", "vit"])
    ablation_archs: list = field(default_factory=lambda: ["mlp"])
    control_archs: list = field(default_factory=lambda: ["mlp", "vit"])

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_parameters(cls, parameters: dict) -> "FSStudyConfig":
        """The config from a namespace that holds (at least) every field, e.g. a notebook's globals."""
        return cls(**{f.name: parameters[f.name] for f in fields(cls)})


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


@torch.no_grad()
def accuracy(logits: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy (%) of a logits function on (x, y)."""
    correct = sum(int((logits(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum()) for i in range(0, len(y), batch_size))
    return 100.0 * correct / max(1, len(y))


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
    def name(self) -> str:
        return f"{self.arch.upper()}: {' + '.join(self.tasks)}" + (" (same init)" if self.init == "same" else "")

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
def regmean_grams(model: nn.Module, pool: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Gram matrices of the inputs of every linear map of the trunk (keys as in :func:`_as_matrices`).

    ``lib.statistics.gram_matrices`` covers ``nn.Linear`` and ``conv1``; the ViT's Q/K/V
    (``in_proj_weight``, a parameter read by ``F.linear``) and ``proj`` (``x @ proj``) get
    theirs from hooks on the LayerNorm that feeds each (``ln_1``; ``ln_post`` on the class token).
    """
    names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n != "head"]
    extra: dict[str, torch.Tensor] = {}
    handles = []

    def hook(key):
        def accumulate(module, args, output):
            x = output.detach().float().reshape(-1, output.shape[-1])
            extra[key] = extra.get(key, 0) + x.T @ x
        return accumulate

    if isinstance(model, ViT):
        for i, block in enumerate(model.transformer.resblocks):
            handles.append(block.ln_1.register_forward_hook(hook(f"transformer.resblocks.{i}.attn.in_proj_weight")))
        handles.append(model.ln_post.register_forward_hook(hook("proj")))
    try:
        batches = [{"x": pool[i : i + batch_size]} for i in range(0, len(pool), batch_size)]
        grams = gram_matrices(model, batches, linear_names=names, disable=True)
    finally:
        for h in handles:
            h.remove()
    return {**grams, **extra}


def _regmean(models, pools, config):
    states = [_as_matrices(_trunk(m)) for m in models]
    grams = [regmean_grams(m, p) for m, p in zip(models, pools)]
    # A ReLU unit that is dead on every pool image in every model leaves a zero row and column
    # in the summed Gram, which is then singular. A ridge of 1e-6 × its mean diagonal makes the
    # solve well posed; the weights reading a dead input come out 0, which changes no output.
    for key in grams[0]:
        ridge = 1e-6 * float(sum(g[key].diagonal().mean() for g in grams)) / len(grams) + 1e-12
        for g in grams:
            g[key] = g[key] + ridge * torch.eye(g[key].shape[0])
    merged = merging.regmean(states, grams, config.regmean_alpha)
    return _with_trunk(models, _from_matrices(merged, _trunk(models[0]))), _identity_maps(models)


def _train_and_fold(module, pools, steps, lr, config, progress):
    loaders = [pool_loader(p, config.fs_batch_size) for p in pools]
    history = []
    if steps > 0:
        history = train_supernet(module, loaders, steps=steps, lr=lr, weight_decay=config.fs_weight_decay,
                                 seed=config.seed, progress=progress)
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

    def __init__(self, config: FSStudyConfig, data_dir=None, progress: bool = True):
        self.config = config
        self.data_dir = data_dir or None
        self.progress = progress
        self._tasks: dict[str, TaskData] = {}
        self._experts: dict[tuple, Expert] = {}
        self._pools: dict[tuple, torch.Tensor] = {}
        self._settings: dict[tuple, Setting] = {}
        self.expert_seconds = 0.0  # time spent training (not loading) experts in this process

    # -- data
    def task(self, name: str) -> TaskData:
        if name not in self._tasks:
            self._tasks[name] = load_task(name, self.config, self.data_dir)
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
    def _cached_model(self, kind: str, spec: dict, train: Callable[[], tuple[dict, dict]]):
        """Load ``kind/<hash(spec)>`` or train, save and return ``(tensors, info)``."""
        path = cache_path(kind, spec)
        cached = path.exists()

        def compute():
            started = time.perf_counter()
            tensors, info = train()
            self.expert_seconds += time.perf_counter() - started
            return tensors, {"info": info}

        tensors = cached_tensors(kind, spec, compute)
        info = dict(load_metadata(path).get("info", {}))
        info["cached"] = cached
        return tensors, info

    def _data_spec(self, names: Sequence[str]) -> dict:
        c = self.config
        return {"tasks": {n: self.task(n).fingerprint for n in names}, "image_size": c.image_size, "channels": 3,
                "normalisation": [0.5, 0.5], "train_per_task": c.train_per_task, "split_seed": c.seed}

    def expert(self, arch: str, task: str) -> Expert:
        """The from-scratch expert of ``task`` (trained once, then loaded from the cache)."""
        key = (arch, task, "scratch")
        if key in self._experts:
            return self._experts[key]
        c, data = self.config, self.task(task)
        seed = expert_seed(c.seed, arch, task, "scratch")
        epochs = c.mlp_epochs if arch == "mlp" else c.vit_epochs
        spec = {"what": "fs_study scratch expert", "version": FS_STUDY_VERSION, "arch": arch_spec(arch, c),
                "num_classes": data.num_classes, "data": self._data_spec([task]), "init_seed": seed,
                "train": {"epochs": epochs, "lr": c.expert_lr, "weight_decay": c.expert_weight_decay,
                          "batch_size": c.expert_batch_size}}

        def train():
            torch.manual_seed(seed)
            model = make_model(arch, data.num_classes, c)
            x, y = self._train_tensors(task)
            info = fit(model, [model.head], [(x, y)], epochs, c.expert_lr, c.expert_weight_decay, c.expert_batch_size,
                       seed, desc=f"{arch} expert: {task}", progress=self.progress)
            return model.state_dict(), {**info, "init_seed": seed}

        tensors, info = self._cached_model(f"fs_study/experts/{arch}", spec, train)
        model = make_model(arch, data.num_classes, c)
        model.load_state_dict(tensors)
        expert = Expert(arch, task, _frozen(model), info)
        self._experts[key] = expert
        return expert

    def warmup_tasks(self, tasks: Sequence[str]) -> list[str]:
        chosen = list(self.config.warmup_tasks) or [t for t in VISION_TASKS if t not in tasks]
        if not chosen:
            raise ValueError("the same-init warm-up needs at least one task")
        return chosen

    def shared_init(self, arch: str, warmup: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict]:
        """The shared model of the same-init control: trained on a pooled warm-up of ``warmup`` tasks
        (``warmup_per_task`` images each, one head per task). Returns (trunk state, info)."""
        c = self.config
        warmup = list(warmup)
        seed = expert_seed(c.seed, arch, "+".join(warmup), "shared")
        spec = {"what": "fs_study shared init", "version": FS_STUDY_VERSION, "arch": arch_spec(arch, c),
                "data": self._data_spec(warmup), "init_seed": seed, "per_task": c.warmup_per_task,
                "train": {"epochs": c.warmup_epochs, "lr": c.expert_lr, "weight_decay": c.expert_weight_decay,
                          "batch_size": c.expert_batch_size}}

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

        return self._cached_model(f"fs_study/shared/{arch}", spec, train)

    def finetuned_expert(self, arch: str, task: str, warmup: Sequence[str]) -> Expert:
        """Expert of ``task`` fine-tuned from the shared model (fresh head, everything trained)."""
        key = (arch, task, "same", tuple(warmup))
        if key in self._experts:
            return self._experts[key]
        c, data = self.config, self.task(task)
        shared, shared_info = self.shared_init(arch, warmup)
        head_seed = expert_seed(c.seed, arch, task, "finetuned head")
        spec = {"what": "fs_study fine-tuned expert", "version": FS_STUDY_VERSION, "arch": arch_spec(arch, c),
                "num_classes": data.num_classes, "data": self._data_spec([task]), "shared": content_hash(shared),
                "head_seed": head_seed, "train": {"epochs": c.finetune_epochs, "lr": c.finetune_lr,
                                                  "weight_decay": c.expert_weight_decay, "batch_size": c.expert_batch_size}}

        def build():
            torch.manual_seed(head_seed)
            model = make_model(arch, data.num_classes, c)
            model.load_state_dict({**model.state_dict(), **shared})
            return model

        def train():
            model = build()
            x, y = self._train_tensors(task)
            info = fit(model, [model.head], [(x, y)], c.finetune_epochs, c.finetune_lr, c.expert_weight_decay,
                       c.expert_batch_size, head_seed, desc=f"{arch} fine-tune: {task}", progress=self.progress)
            return model.state_dict(), {**info, "head_seed": head_seed}

        tensors, info = self._cached_model(f"fs_study/experts/{arch}", spec, train)
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

    def run(self, setting: Setting, method: str, num_images: int | None = None, augment: int | None = None,
            rank: int | None = None, fs_init: str | None = None, steps: int | None = None,
            lr: float | None = None) -> list[dict]:
        """Merge ``setting``'s experts with ``method`` and evaluate on every task: one row per task.

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
            (model, maps, info), seconds, peak = measured_call(lambda: merge(
                method, models, pools, c, rank=options["rank"], fs_init=options["fs_init"], steps=options["steps"] or 0,
                lr=options["lr"], progress=self.progress))
            logits = [lambda x, t=t: folded_logits(model, maps, heads[t], x, t) for t in range(len(models))]
            trunk_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head."))
            identity = torch.equal(maps, _identity_maps(models).to(maps))
            permutation = bool(((maps == 0) | (maps == 1)).all() and (maps.sum(-1) == 1).all())
            map_params = 0 if identity or (method == REBASIN and permutation) else maps.numel()
        rows = []
        for t, name in enumerate(setting.tasks):
            data = self.task(name)
            rows.append({
                "setting": setting.name, "arch": setting.arch, "init": setting.init, "models": len(setting.tasks),
                "method": method, "task": name, "task_index": t, **options,
                "accuracy": accuracy(logits[t], data.test_x, data.test_y), "expert_accuracy": None, "chance": data.chance,
                "test_examples": len(data.test_y),
                "seconds": seconds, "peak_mib": peak, "trunk_parameters": trunk_params, "output_map_parameters": map_params,
                "final_loss": info.get("final_loss"), "trainable_parameters": info.get("trainable_parameters"),
            })
        for row, expert in zip(rows, setting.experts):
            row["expert_accuracy"] = self.expert_accuracy(expert)
        setting.results[key] = rows
        return rows

    def expert_accuracy(self, expert: Expert) -> float:
        if "test_accuracy_now" not in expert.info:
            data = self.task(expert.task)
            expert.info["test_accuracy_now"] = accuracy(expert.model, data.test_x, data.test_y)
        return expert.info["test_accuracy_now"]

    def run_all(self, setting: Setting, methods: Sequence[str] | None = None, **options) -> list[dict]:
        rows = []
        for method in methods or methods_for(setting):
            rows += self.run(setting, method, **options)
        return rows

    def results(self) -> pd.DataFrame:
        """Every row computed so far, over all settings."""
        rows = [r for s in self._settings.values() for rs in s.results.values() for r in rs]
        return pd.DataFrame(rows)

    def experts_table(self) -> pd.DataFrame:
        rows = []
        for (arch, task, kind, *_), e in self._experts.items():
            rows.append({"arch": arch, "task": task, "init": "different (from scratch)" if kind == "scratch" else "same (fine-tuned from shared)",
                         "test accuracy": self.expert_accuracy(e), "chance": self.task(task).chance, "steps": e.info.get("steps"),
                         "train seconds": e.info.get("train_seconds"), "loaded from cache": e.info.get("cached")})
        return pd.DataFrame(rows)


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


def average_standard_error(accuracies: Sequence[float], test_sizes: Sequence[int]) -> float:
    """Binomial standard error (points) of the mean of per-task test accuracies (%), one seed."""
    variances = [a * (100 - a) / max(1, n) for a, n in zip(accuracies, test_sizes)]
    return math.sqrt(sum(variances)) / max(1, len(variances))


__all__ = [
    "FS_STUDY_VERSION", "METHODS", "ENSEMBLE", "MODEL_1", "AVERAGE", "SLERP", "REGMEAN", "REBASIN", "ZIPIT",
    "DISTILLATION", "FS_MERGE", "FSStudyConfig", "FSStudy", "Setting", "Expert", "TaskData", "expert_seed", "load_task",
    "unlabeled_pool", "pool_loader", "make_model", "arch_spec", "fit", "accuracy", "merge", "methods_for",
    "regmean_grams", "summary", "average_standard_error",
]
