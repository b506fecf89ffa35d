"""Heads and experts: the expensive, cached steps of every track.

Protocol (both tracks, mirroring the papers' CLIP setup where heads are frozen zero-shot heads):
1. Each task's head is a linear probe on θ0's features (a few thousand training examples).
2. An expert fine-tunes the encoder from θ0 with that head frozen, AdamW + linear warm-up/decay,
   evaluating on the validation split every ``eval_every`` steps and stopping when it has not
   improved for ``patience`` evaluations (the best state is kept), within ``max_steps``.
3. The multi-task model is the same loop over all tasks at once (round-robin batches, each
   through its own head): the usual upper reference for a merge.

Results are cached as safetensors keyed by a hash of everything that produced them; a run
interrupted mid-training resumes from its last evaluation.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.descriptions import class_descriptions
from ..heads import MINILM_TEMPERATURE, head_module, random_head, zero_shot_head
from .selection import Selection, select
from . import cache
from .cache import code_hash, content_hash, load_cached, load_metadata, save_tensors_atomic
from .tracks import PreparedSplit, Track, model_inputs, scored_officially


# ----------------------------------------------------------------------------- cache access
# Every cached file here is read through cache.load_cached, which checks it against the hash
# saved with it. ``finetune``'s source is part of every expert's cache key, so it is not edited
# to call that: instead the two names it uses, ``cache_path`` and ``load_file``, are these
# helpers. ``cache_path`` moves a damaged file (and a damaged partial checkpoint) aside before
# the caller looks, so ``path.exists()`` means a file that loads and matches its hash, and a
# damaged one is recomputed by the caller's normal path.
def cache_path(kind: str, spec: dict) -> Path:
    """``cache.cache_path``, with what is cached there verified first (a damaged file moved aside)."""
    path = cache.cache_path(kind, spec)
    for file in (path, _partial_path(path)):
        load_cached(file)  # None for a missing file, and for a damaged one after moving it aside
    return path


def _partial_path(path: Path) -> Path:
    """Where ``finetune`` keeps the checkpoint of an unfinished run of ``path``."""
    return path.with_suffix(".partial.safetensors")


def _load_verified(path) -> dict[str, torch.Tensor]:
    """The tensors of a cached file that :func:`cache_path` has verified."""
    tensors = load_cached(path)
    if tensors is None:  # damaged between the check and now (load_cached warned and moved it aside)
        raise RuntimeError(f"the cache file {path} was damaged or removed while in use; run again to recompute it.")
    return tensors


load_file = _load_verified  # the name finetune reads its partial checkpoint with


def _head_of(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A head's state dict from a cached heads file (keys ``head.weight``, ``head.bias``)."""
    return {k.removeprefix("head."): v for k, v in tensors.items()}


@dataclass
class FinetuneConfig:
    """How experts (and the multi-task model) are trained. Fields are notebook parameters."""

    max_steps: int = 250
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 20
    eval_every: int = 50
    patience: int = 2
    max_eval_examples: int = 256
    seed: int = 0
    schedule: str = "linear"  # after the warm-up: "linear" decay to 0, or "cosine" (the CLIP papers')
    max_grad_norm: float | None = None  # clip the gradient's global norm to this (the paper recipes: 1.0)
    # examples per forward/backward, the gradients of a batch's parts accumulated before the step:
    # the whole batch's step in less memory (the same up to float rounding, unless the model has
    # BatchNorm, whose statistics are per part). None: the whole batch at once.
    micro_batch_size: int | None = None

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "eval_every", "warmup_steps", "max_eval_examples", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"FinetuneConfig.{name} = {getattr(self, name)}: pass a positive integer.")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"FinetuneConfig.lr = {self.lr}: pass a positive, finite learning rate.")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"FinetuneConfig.weight_decay = {self.weight_decay}: pass a finite value >= 0.")
        if self.schedule not in ("linear", "cosine"):
            raise ValueError(f"FinetuneConfig.schedule = {self.schedule!r}: choose 'linear' or 'cosine'.")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"FinetuneConfig.micro_batch_size = {self.micro_batch_size}: pass a positive integer, "
                             "or None for the whole batch at once.")
        if self.max_grad_norm is not None and not 0 < self.max_grad_norm < math.inf:
            raise ValueError(f"FinetuneConfig.max_grad_norm = {self.max_grad_norm}: pass a positive norm, or None "
                             "not to clip.")

    def key(self) -> dict:
        """The settings as a cache key; a setting added later enters it only when it is not its
        default, so the experts cached before it existed are found again."""
        settings = asdict(self)
        for name, default in (("schedule", "linear"), ("max_grad_norm", None), ("micro_batch_size", None)):
            if settings[name] == default:
                del settings[name]
        return settings


@dataclass
class Expert:
    """A fine-tuned encoder and the (frozen) heads of the tasks it was trained on."""

    encoder: dict[str, torch.Tensor]
    heads: dict[str, dict[str, torch.Tensor]]
    info: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- features
def run_device_of(encoder: nn.Module) -> torch.device:
    """Where an encoder runs: the track's device for paper-scale encoders (``paper_tracks``
    sets ``run_device``), the CPU for the small-scale ones."""
    return getattr(encoder, "run_device", torch.device("cpu"))


@torch.no_grad()
def encode(encoder: nn.Module, split: PreparedSplit, batch_size: int = 256) -> torch.Tensor:
    """Encoder features for every example of a split, in the split's order."""
    encoder.eval()
    # Paper-scale encoders name the device they run on and their autocast dtype
    # (lib.experiments.paper_tracks); small-scale ones run on the CPU in float32.
    device = run_device_of(encoder)
    dtype = getattr(encoder, "autocast_dtype", None)
    encoder.to(device)
    out = torch.empty(len(split), encoder.feature_dim)
    for batch in split.batches(batch_size, with_index=True):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            features = encoder(**{k: v.to(device) for k, v in model_inputs(batch).items()})
        out[batch["index"]] = features.float().cpu()
    return out


# ----------------------------------------------------------------------------- heads
def linear_probe(features: torch.Tensor, labels: np.ndarray, num_classes: int, steps: int = 300,
                 weight_decay: float = 1e-4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A softmax-regression head fit to frozen features by full-batch L-BFGS."""
    torch.manual_seed(seed)
    head = nn.Linear(features.shape[1], num_classes)
    y = torch.as_tensor(labels, dtype=torch.long)
    opt = torch.optim.LBFGS(head.parameters(), lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(features), y) + weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def probe_heads(track: Track, max_examples: int = 2000) -> dict[str, dict[str, torch.Tensor]]:
    """Each task's linear-probe head on θ0 features (cached)."""
    heads = {}
    encoder = None
    for task in track.tasks:
        spec = {**track.identity([task]), "task": task, "max_examples": max_examples, "kind": "probe",
                "code": code_hash(linear_probe, encode)}
        path = cache_path(f"heads/{track.name}", spec)
        if path.exists():  # a verified file (cache_path moved a damaged one aside)
            heads[task] = _head_of(_load_verified(path))
            continue
        encoder = encoder or track.pretrained_encoder()
        split = track.split(task, "train").subset(max_examples, track.seed)
        head = linear_probe(encode(encoder, split), split.labels, track.num_classes(task), seed=track.seed)
        save_tensors_atomic({f"head.{k}": v for k, v in head.items()}, path, {"spec": spec})
        heads[task] = head
    return heads


def _per_class_indices(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """``shots`` seeded indices of every class (all of a class that has fewer)."""
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def few_shot_heads(track: Track) -> dict[str, dict[str, torch.Tensor]]:
    """Each task's linear probe on θ0 features of ``track.head_shots`` training examples per class
    (cached): for a backbone with no text tower, the analogue of a zero-shot head."""
    heads, encoder = {}, None
    for task in track.tasks:
        spec = {**track.identity([task]), "task": task, "shots": track.head_shots, "kind": "few_shot",
                "code": code_hash(linear_probe, encode, _per_class_indices)}
        path = cache_path(f"heads/{track.name}", spec)
        if not path.exists():
            encoder = encoder or track.pretrained_encoder()
            split = track.split(task, "train")
            idx = _per_class_indices(split.labels, track.head_shots, track.seed)
            # Only the shots: encoding the whole split (MNIST: 60,000 images) was most of a tiny
            # run's time. Heads cached before are the same examples' features, so they stay valid.
            features = encode(encoder, split.rows(idx))
            head = linear_probe(features, split.labels[idx], track.num_classes(task), seed=track.seed)
            save_tensors_atomic({f"head.{k}": v for k, v in head.items()}, path, {"spec": spec})
        heads[task] = _head_of(_load_verified(path))
    return heads


def joint_heads(track: Track) -> dict[str, dict[str, torch.Tensor]]:
    """Freshly initialised heads (seeded per task), to be trained with each expert."""
    dim = track.pretrained_encoder().feature_dim
    return {task: random_head(dim, track.num_classes(task), seed=track.seed * 1000 + i)
            for i, task in enumerate(track.tasks)}


def zero_shot_heads(track: Track, temperature: float = MINILM_TEMPERATURE,
                    descriptions_file=None) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Selection]]:
    """Each task's zero-shot head from its class descriptions (``data/class_descriptions.yaml``),
    the candidate description set chosen on validation accuracy of θ0 (cached).

    Returns the heads and, per task, the :class:`Selection` over candidate sets."""
    heads, selections, encoder = {}, {}, None
    for task in track.tasks:
        candidates = class_descriptions(task, track.raw(task).classes, descriptions_file)
        spec = {**track.identity([task]), "task": task, "kind": "zero_shot", "temperature": temperature,
                "descriptions": candidates, "code": code_hash(zero_shot_head, encode, select)}
        path = cache_path(f"heads/{track.name}", spec)
        if not path.exists():
            encoder = encoder or track.pretrained_encoder()
            made = {name: zero_shot_head([encode(encoder, track.prepare_texts(texts)) for texts in per_class],
                                         temperature) for name, per_class in candidates.items()}
            features = {}

            def score(name, data, task=task):
                split = data.split(task, "validation")
                if "x" not in features:
                    features["x"] = encode(encoder, split)
                logits = head_module(made[name])(features["x"])
                return float((logits.argmax(1).numpy() == split.labels).mean())

            chosen = select("descriptions", list(candidates), score, track)
            save_tensors_atomic({f"head.{k}": v for k, v in made[chosen.best].items()}, path,
                                {"spec": spec, "selection": dataclasses.asdict(chosen)})
        heads[task] = _head_of(_load_verified(path))
        selections[task] = Selection(**load_metadata(path)["selection"])
    return heads, selections


def initial_heads(track: Track) -> dict[str, dict[str, torch.Tensor]]:
    """The heads experts start from, of the track's ``head_kind`` (frozen unless "joint")."""
    if hasattr(track, "zero_shot_heads"):  # a track with its own text tower's heads (CLIP, paper scale)
        return track.zero_shot_heads()
    if track.head_kind == "probe":
        return probe_heads(track)
    if track.head_kind == "few_shot":
        return few_shot_heads(track)
    if track.head_kind == "joint":  # a track whose heads are not linear makes its own (GLUE's two-layer ones)
        return track.joint_heads() if hasattr(track, "joint_heads") else joint_heads(track)
    return zero_shot_heads(track)[0]


# ----------------------------------------------------------------------------- fine-tuning
def _train_indices(split: PreparedSplit, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices of batch number ``step`` of a seeded epoch-wise shuffle: a pure function of
    (step, seed), so a resumed run sees exactly the batches an uninterrupted one would.

    Text batches are bucketed: within windows of 50 batches, examples are grouped by length
    before the batches are shuffled, which halves the padding (a random batch of tweets pads
    to twice the mean length) while every epoch still visits every example once."""
    n = len(split)
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n)
    if split.lengths is None or per_epoch * batch_size > n:
        return perm[k * batch_size : (k + 1) * batch_size]
    perm = perm[: per_epoch * batch_size]
    window = 50 * batch_size
    perm = np.concatenate([w[np.argsort(split.lengths[w], kind="stable")]
                           for w in np.split(perm, range(window, len(perm), window))])
    batches = perm.reshape(per_epoch, batch_size)
    return batches[rng.permutation(per_epoch)[k]]


def _lr_factor(step: int, config: FinetuneConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then decay to 0 at ``max_steps``: linear,
    or half a cosine (``schedule="cosine"``, the CLIP fine-tuning recipe of METHODS.md §8)."""
    warmup = (step + 1) / config.warmup_steps
    remaining = (config.max_steps - step) / max(1, config.max_steps - config.warmup_steps)
    decay = remaining if config.schedule == "linear" else 0.5 * (1 - math.cos(math.pi * min(1.0, remaining)))
    return max(0.0, min(warmup, decay))


def training_loss(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the classes; for a regression (float labels and one output: GLUE's
    STS-B) the mean squared error, as transformers' sequence classifiers train with one label."""
    if labels.is_floating_point():
        return F.mse_loss(outputs.float().squeeze(-1), labels.float())
    return F.cross_entropy(outputs.float(), labels)


@torch.no_grad()
def validation_score(encoder, heads, track, tasks, max_examples, seed) -> float:
    """Mean validation score over ``tasks`` in [0, 1]; ``heads`` maps each task to a head module.
    The score is accuracy, or on a track scored by official metrics (GLUE) each task's official
    score (``track.task_results``: CoLA's Matthews correlation, STS-B's correlations), the
    score DARE's recipe chooses its best epoch by."""
    scores = []
    for task in tasks:
        split = track.split(task, "validation").subset(max_examples, seed)
        outputs = heads[task](encode(encoder, split).to(heads[task].weight.device)).float().cpu()
        if scored_officially(track):
            scores.append(track.task_results(task, outputs.numpy(), split.labels)["score"] / 100)
        else:
            scores.append((outputs.argmax(1).numpy() == split.labels).mean())
    return float(np.mean(scores))


def micro_batches(batch: dict[str, torch.Tensor], size: int | None):
    """(part, weight) pairs covering ``batch`` in rows of at most ``size`` (None: the batch
    itself, weight 1), each weighted by its share of the rows, so that the parts' weighted mean
    losses add up to the batch's mean loss and their gradients to its gradient."""
    n = len(batch["labels"])
    if size is None or size >= n:
        yield batch, 1.0
        return
    for start in range(0, n, size):
        part = {k: v[start:start + size] for k, v in batch.items()}
        yield part, len(part["labels"]) / n


def finetune(track: Track, tasks: list[str], heads: dict, config: FinetuneConfig, progress: bool = True, *,
             init: Expert | None = None, train_head: bool = False, shared_head: bool = False) -> Expert:
    """Fine-tune an encoder on ``tasks`` (one task: an expert; all: the multi-task model).

    By default training starts at θ0 with each task's head frozen. ``init`` starts from another
    model's encoder instead; ``train_head`` trains the heads too; ``shared_head`` uses one head
    (``heads[tasks[0]]``) for every task, as a model fine-tuned on several datasets of one task is.
    """
    spec = {**track.identity(tasks), "tasks": list(tasks), "config": config.key(), "kind": "finetune",
            "code": code_hash(finetune, _train_indices, _lr_factor, micro_batches, training_loss, validation_score,
                              encode),
            "frozen": list(track.frozen_parameters),
            "heads": {t: content_hash(heads[t]) for t in tasks}}
    # only non-default options enter the key
    for option, value in {"init": init and content_hash(init.encoder), "train_head": train_head,
                          "shared_head": shared_head}.items():
        if value:
            spec[option] = value
    path = cache_path(f"experts/{track.name}", spec)
    if path.exists():
        return _load_expert(path, tasks)
    partial = path.with_suffix(".partial.safetensors")

    model = nn.Module()  # holds what is trained, so one state dict covers encoder and heads
    model.encoder = track.pretrained_encoder()
    if init is not None:
        model.encoder.load_state_dict(init.encoder)
    # Heads are keyed by position, never by task name: a user's task may be named "my.task".
    head_keys = {t: (tasks[0] if shared_head else t) for t in tasks}
    slot = {k: str(i) for i, k in enumerate(dict.fromkeys(head_keys.values()))}
    model.heads = nn.ModuleDict({slot[k]: head_module(heads[k]) for k in slot})
    head_of = {t: model.heads[slot[k]] for t, k in head_keys.items()}
    trainable = {f"encoder.{n}" for n, _ in model.encoder.named_parameters() if n not in track.frozen_parameters}
    if train_head:
        trainable |= {n for n, _ in model.named_parameters() if n.startswith("heads.")}
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    # Paper scale: train on the track's device, forward under its autocast; what is kept (the
    # best state, checkpoints) stays on the CPU.
    device = run_device_of(model.encoder)
    dtype = getattr(model.encoder, "autocast_dtype", None)
    model.to(device)
    params = [p for n, p in model.named_parameters() if n in trainable]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

    state = {"step": 0, "best_score": -1.0, "best_step": 0, "bad_evals": 0, "history": [], "seconds": 0.0}
    best = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    if partial.exists():  # resume where an interrupted run stopped
        saved = load_file(str(partial))
        state = load_metadata(partial)["state"]
        model.load_state_dict({k[6:]: v for k, v in saved.items() if k.startswith("model.")})
        best = {k[5:]: v for k, v in saved.items() if k.startswith("best.")}
        for i, p in enumerate(params):
            optimizer.state[p] = {"step": saved[f"opt.{i}.step"], "exp_avg": saved[f"opt.{i}.exp_avg"].to(device),
                                  "exp_avg_sq": saved[f"opt.{i}.exp_avg_sq"].to(device)}

    label = f"{track.name}:{'+'.join(tasks) if len(tasks) < 3 else f'{len(tasks)} tasks'}"
    bar = tqdm(total=config.max_steps, initial=state["step"], desc=label, disable=not progress, leave=False)
    started = time.perf_counter() - state["seconds"]
    step = state["step"]
    while step < config.max_steps:
        task = tasks[step % len(tasks)]
        split = track.split(task, "train")
        batch = split.batch(_train_indices(split, config.batch_size, step // len(tasks), config.seed))
        batch = {k: v.to(device) for k, v in batch.items()}
        torch.manual_seed(config.seed * 1_000_003 + step)  # dropout masks, reproducible on resume
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = 0.0
        for part, weight in micro_batches(batch, config.micro_batch_size):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = head_of[task](model.encoder(**model_inputs(part)))
            part_loss = training_loss(logits, part["labels"]) * weight  # weight: its share of the batch
            if not torch.isfinite(part_loss):  # never train on (or cache) a diverged model
                raise FloatingPointError(
                    f"{label}: the training loss became {part_loss.item()} at step {step}. Lower lr (now {config.lr}) "
                    f"or check the data of task {task!r}; the partial checkpoint {partial.name} holds the last good "
                    "evaluation.")
            part_loss.backward()  # gradients add up over the parts: the whole batch's gradient
            loss = loss + part_loss.detach()
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _lr_factor(step, config)
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % config.eval_every == 0 or step == config.max_steps:
            score = validation_score(model.encoder, head_of, track, tasks, config.max_eval_examples, config.seed)
            state["history"].append([step, score])
            if score > state["best_score"]:
                state.update(best_score=score, best_step=step, bad_evals=0)
                best = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            else:
                state["bad_evals"] += 1
            state.update(step=step, seconds=time.perf_counter() - started)
            _save_partial(partial, model, best, params, optimizer, state, spec)
            if state["bad_evals"] >= config.patience:
                break
    bar.close()
    # "accuracy" by its old name: on a track scored officially it is the official score
    info = {"steps": step, "best_step": state["best_step"], "best_validation_accuracy": state["best_score"],
            "seconds": time.perf_counter() - started, "history": state["history"],
            "stopped_early": step < config.max_steps}
    encoder_best = {k[8:]: v for k, v in best.items() if k.startswith("encoder.")}
    heads_best = {t: {k: best[f"heads.{slot[head_keys[t]]}.{k}"] for k in heads[head_keys[t]]} for t in tasks}
    tensors = {f"encoder.{k}": v for k, v in encoder_best.items()}
    # .clone(): with shared_head every task names the same tensors, which safetensors will not save twice
    tensors.update({f"head.{i}.{k}": v.clone() for i, t in enumerate(tasks) for k, v in heads_best[t].items()})
    save_tensors_atomic(tensors, path, {"spec": spec, "info": info})
    partial.unlink(missing_ok=True)
    return Expert(encoder_best, heads_best, info)


def _save_partial(path, model, best, params, optimizer, state, spec):
    tensors = {f"model.{k}": v.cpu() for k, v in model.state_dict().items()}
    tensors.update({f"best.{k}": v for k, v in best.items()})
    for i, p in enumerate(params):
        s = optimizer.state[p]
        tensors.update({f"opt.{i}.step": torch.as_tensor(s["step"]).reshape(()).float().cpu(),
                        f"opt.{i}.exp_avg": s["exp_avg"].cpu(), f"opt.{i}.exp_avg_sq": s["exp_avg_sq"].cpu()})
    save_tensors_atomic(tensors, path, {"spec": spec, "state": state})


def _load_expert(path, tasks) -> Expert:
    tensors = _load_verified(path)
    encoder = {k[8:]: v for k, v in tensors.items() if k.startswith("encoder.")}
    # a head's own keys follow the prefix: "weight", or a two-layer head's "dense.weight"
    heads = {t: {k.removeprefix(f"head.{i}."): v for k, v in tensors.items() if k.startswith(f"head.{i}.")}
             for i, t in enumerate(tasks)}
    return Expert(encoder, heads, load_metadata(path).get("info", {}))


def train_experts(track: Track, heads: dict, config: FinetuneConfig, progress: bool = True) -> dict[str, Expert]:
    """One expert per task of the track (each cached)."""
    train_head = track.head_kind == "joint"
    config_of = getattr(track, "expert_config", lambda task, config: config)  # Track's: per-task recipes
    return {task: finetune(track, [task], heads, config_of(task, config), progress, train_head=train_head)
            for task in tqdm(track.tasks, desc=f"{track.name} experts", disable=not progress)}


def train_multitask(track: Track, heads: dict, config: FinetuneConfig, progress: bool = True) -> Expert:
    """The multi-task model: ``config.max_steps`` is the total over all tasks."""
    return finetune(track, list(track.tasks), heads, config, progress, train_head=track.head_kind == "joint")


# ----------------------------------------------------------------------------- BatchNorm
def reestimate_on_training_data(encoder: nn.Module, state: dict[str, torch.Tensor], track: Track,
                                tasks: list[str]) -> dict[str, torch.Tensor]:
    """``reestimate_batchnorm`` on ``tasks``' training splits, with the track's
    ``batchnorm_examples`` per task and its seed: how every notebook re-estimates a merge."""
    return reestimate_batchnorm(encoder, state, [track.split(t, "train") for t in tasks],
                                examples_per_split=track.batchnorm_examples, seed=track.seed)


@torch.no_grad()
def reestimate_batchnorm(encoder: nn.Module, state: dict[str, torch.Tensor], splits: list[PreparedSplit],
                         examples_per_split: int, batch_size: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    """A copy of ``state`` whose BatchNorm running statistics are recomputed on unlabeled data
    (a shuffled sample of each split, pooled), as merged weights make the stored statistics stale."""
    model = copy.deepcopy(encoder)
    model.load_state_dict(state)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return dict(state)
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all batches seen
    model.train()
    # Stored splits are often sorted by class: shuffle, or each batch would see one class only.
    rng = np.random.default_rng(seed)
    pooled = [(split, i) for split in splits
              for i in rng.permutation(len(split))[:examples_per_split]]
    order = rng.permutation(len(pooled))
    for start in range(0, len(order), batch_size):
        chunk = [pooled[j] for j in order[start : start + batch_size]]
        for split in {id(s): s for s, _ in chunk}.values():  # one forward per split's share
            idx = [i for s, i in chunk if s is split]
            model(**model_inputs(split.batch(idx)))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
