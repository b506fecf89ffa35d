"""The closed-form baselines study: everything the first notebook runs, as plain functions.

    setup = prepare_track(track, finetune_config, multitask_config)
    stats = compute_statistics(track, setup, config)
    merged = closed_form_merges(track, setup, stats, config)     # name -> MergeResult
    table = evaluate_methods(track, setup, merged)

Merges see only the *mergeable* keys: encoder tensors that fine-tuning changed (frozen ones,
e.g. MiniLM's token embeddings, are copied from θ0). Heads are never merged. λ for Task
Arithmetic, TIES and the DARE variants is chosen on the validation split, never on test.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import merging, statistics
from .cache import cached_tensors, content_hash
from .evaluation import evaluate
from ..models import Classifier
from .tracks import Track, TextTrack, VisionTrack, model_inputs
from .training import Expert, FinetuneConfig, head_module, probe_heads, reestimate_batchnorm, train_experts, train_multitask


@dataclass
class BaselinesConfig:
    """Closed-form merge settings. Fields are notebook parameters."""

    lambda_grid: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
    ties_density: float = 0.2
    ties_disjoint: str = "mean"
    dare_drop_rate: float = 0.7
    dare_seed: int = 0
    fisher_examples: int = 256
    regmean_examples: int = 512
    regmean_alpha: float = 0.9
    gradient_matching_scale: float = 1.0
    selection_examples: int = 100  # validation examples per task for choosing λ
    seed: int = 0


@dataclass
class Setup:
    """θ0, its task heads, the experts and the multi-task model of one track."""

    track: Track
    pretrained: dict[str, torch.Tensor]
    heads: dict[str, dict[str, torch.Tensor]]
    experts: dict[str, Expert]
    multitask: Expert
    mergeable: list[str] = field(default_factory=list)

    def finetuned(self) -> list[dict[str, torch.Tensor]]:
        return [self.experts[t].encoder for t in self.track.tasks]

    def restrict(self, state: dict) -> dict:
        return {k: state[k] for k in self.mergeable}

    def complete(self, merged: dict) -> dict:
        """A full encoder state: merged tensors over θ0's (frozen and non-float ones)."""
        return {**self.pretrained, **merged}


def make_track(name: str, tasks: list[str], data_dir: str | None, seed: int = 0, **options) -> Track:
    cls = {"text": TextTrack, "vision": VisionTrack}[name]
    return cls(tasks=list(tasks), data_dir=data_dir, seed=seed, **options)


def from_parameters(name: str, p: dict) -> tuple[Track, FinetuneConfig, FinetuneConfig, BaselinesConfig]:
    """The track and configs that the baselines notebook builds from its parameters ``p``
    (shared with ``make bench``, so both find the same cached experts)."""
    track = make_track(name, p[f"{name}_tasks"], p.get("data_dir") or None, seed=p["seed"],
                       max_validation=p["max_validation"], max_test=p["max_test"])
    common = dict(batch_size=p[f"{name}_batch_size"], lr=p[f"{name}_lr"], patience=p["patience"], seed=p["seed"])
    experts = FinetuneConfig(max_steps=p[f"{name}_max_steps"], eval_every=p["eval_every"], **common)
    multitask = FinetuneConfig(max_steps=p["multitask_steps_per_task"] * len(track.tasks),
                               eval_every=2 * p["eval_every"], **common)
    merges = BaselinesConfig(**{f: (tuple(p[f]) if f == "lambda_grid" else p[f])
                                for f in BaselinesConfig.__dataclass_fields__ if f in p})
    return track, experts, multitask, merges


def notebook_parameters(path) -> dict:
    """The default values of a notebook's ``parameters`` cell."""
    import ast

    import papermill

    return {name: ast.literal_eval(spec["default"]) for name, spec in papermill.inspect_notebook(str(path)).items()}


def prepare_track(track: Track, config: FinetuneConfig, multitask_config: FinetuneConfig, progress=True) -> Setup:
    pretrained = {k: v.clone() for k, v in track.pretrained_encoder().state_dict().items()}
    heads = probe_heads(track)
    experts = train_experts(track, heads, config, progress)
    multitask = train_multitask(track, heads, multitask_config, progress)
    mergeable = [k for k, v in pretrained.items() if v.is_floating_point()
                 and any(not torch.equal(e.encoder[k], v) for e in experts.values())]
    return Setup(track, pretrained, heads, experts, multitask, mergeable)


# ----------------------------------------------------------------------------- statistics
def _classifier(track: Track, encoder_state: dict, head_state: dict) -> Classifier:
    encoder = track.pretrained_encoder()
    encoder.load_state_dict(encoder_state)
    return Classifier(encoder, head_module(head_state))


def _encoder_stats(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("encoder."): v for k, v in stats.items() if k.startswith("encoder.")}


def compute_statistics(track: Track, setup: Setup, config: BaselinesConfig, progress=True) -> dict:
    """Diagonal Fishers (labels sampled from the model), Hessian estimates N_t·F_t and RegMean
    Gram matrices for every expert, plus θ0's Fisher for gradient matching. All cached."""
    # Fisher/Hessian of parameters only: BatchNorm running statistics are buffers, merged by the
    # fallback rule of each method (see lib.merging).
    parameters = {n for n, _ in track.pretrained_encoder().named_parameters()}
    names = [f"encoder.{k}" for k in setup.mergeable if k in parameters]
    fishers, grams, sizes = {}, {}, {}
    for task in tqdm(track.tasks, desc=f"{track.name} statistics", disable=not progress):
        expert = setup.experts[task]
        train = track.split(task, "train")
        sizes[task] = len(train)
        key = {**track.identity(), "task": task, "expert": content_hash(expert.encoder)}

        def fisher(split=train, expert=expert, task=task):
            model = _classifier(track, expert.encoder, expert.heads[task])
            data = split.subset(config.fisher_examples, config.seed)
            return _encoder_stats(statistics.diagonal_fisher(
                model, data.batches(16), param_names=names, seed=config.seed,
                method=track.fisher_method, disable=True))

        def gram(split=train, expert=expert, task=task):
            model = _classifier(track, expert.encoder, expert.heads[task])
            data = split.subset(config.regmean_examples, config.seed)
            return _encoder_stats(statistics.gram_matrices(model, data.batches(64), disable=True))

        fishers[task] = cached_tensors("fisher", {**key, "n": config.fisher_examples, "seed": config.seed}, fisher)
        grams[task] = cached_tensors("gram", {**key, "n": config.regmean_examples, "seed": config.seed}, gram)

    # θ0's own Fisher, on the pooled task data through each task's head (its pre-training data is
    # not available): H0 = N0·F0 with N0 the mean task training-set size, i.e. θ0 weighs like one task.
    def fisher0():
        total = None
        for task in track.tasks:
            model = _classifier(track, setup.pretrained, setup.heads[task])
            data = track.split(task, "train").subset(config.fisher_examples // len(track.tasks) + 1, config.seed)
            f = _encoder_stats(statistics.diagonal_fisher(model, data.batches(16), param_names=names,
                                                          seed=config.seed, method=track.fisher_method, disable=True))
            total = f if total is None else {k: total[k] + f[k] for k in f}
        return {k: v / len(track.tasks) for k, v in total.items()}

    fisher_pretrained = cached_tensors("fisher", {**track.identity(), "task": "pretrained-pooled",
                                                  "n": config.fisher_examples, "seed": config.seed}, fisher0)
    n0 = float(np.mean(list(sizes.values())))
    return {
        "fisher": fishers, "gram": grams, "train_sizes": sizes,
        "hessian": {t: statistics.hessian_estimate(fishers[t], sizes[t]) for t in track.tasks},
        "hessian_pretrained": statistics.hessian_estimate(fisher_pretrained, n0),
    }


# ----------------------------------------------------------------------------- merging
@dataclass
class MergeResult:
    state: dict[str, torch.Tensor]  # full encoder state
    hyperparameters: dict = field(default_factory=dict)
    seconds: float = 0.0


def _validation_average(track, setup, encoder, state, config) -> float:
    res = evaluate(track, encoder, setup.complete(state), setup.heads, split="validation",
                   max_examples=config.selection_examples)
    return float(np.mean([r["accuracy"] for r in res.values()]))


def select_scale(track, setup, encoder, merge_at, config: BaselinesConfig) -> tuple[float, list]:
    """The λ of ``config.lambda_grid`` with the best average validation accuracy."""
    curve = [(lam, _validation_average(track, setup, encoder, merge_at(lam), config)) for lam in config.lambda_grid]
    return max(curve, key=lambda c: c[1])[0], curve


def _conv_as_matrix(state, grams):
    """RegMean sees conv kernels as linear maps over unfolded patches: (out, in·k·k)."""
    return {k: (v.flatten(1) if k in grams and v.dim() == 4 else v) for k, v in state.items()}


def closed_form_merges(track: Track, setup: Setup, stats: dict, config: BaselinesConfig, progress=True) -> dict[str, MergeResult]:
    pre = setup.restrict(setup.pretrained)
    fts = [setup.restrict(s) for s in setup.finetuned()]
    tasks = track.tasks
    encoder = track.pretrained_encoder()
    results: dict[str, MergeResult] = {}

    def timed(name, fn, **hyper):
        start = time.perf_counter()
        merged = fn()
        results[name] = MergeResult(setup.complete(merged), hyper, time.perf_counter() - start)

    sparse = merging.dare(pre, fts, config.dare_drop_rate, config.dare_seed)
    tuned = {
        "Task Arithmetic": lambda lam: merging.task_arithmetic(pre, fts, lam),
        "TIES": lambda lam: merging.ties_merging(pre, fts, config.ties_density, lam, config.ties_disjoint),
        "DARE + TA": lambda lam: merging.task_arithmetic(pre, sparse, lam),
        "DARE + TIES": lambda lam: merging.ties_merging(pre, sparse, config.ties_density, lam, config.ties_disjoint),
    }
    steps = ["Weight averaging", *tuned, "Fisher", "RegMean", "Gradient matching"]
    bar = tqdm(steps, desc=f"{track.name} merges", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        if name == "Weight averaging":
            timed(name, lambda: merging.weight_average(fts))
        elif name in tuned:
            lam, curve = select_scale(track, setup, encoder, tuned[name], config)
            timed(name, lambda: tuned[name](lam), **{"lambda (validation)": lam, "validation curve": curve})
        elif name == "Fisher":
            fishers = [{k: stats["fisher"][t][k] for k in setup.mergeable if k in stats["fisher"][t]} for t in tasks]
            timed(name, lambda: merging.fisher_merging(fts, fishers))
        elif name == "RegMean":
            grams = [{k: g for k, g in stats["gram"][t].items() if k in pre} for t in tasks]
            flat = [_conv_as_matrix(s, grams[0]) for s in fts]
            def regmean():
                # Input directions no task excites (dead ReLU channels) make ΣG singular. Adding the
                # plain average as one more model with Gram ε·I (ε tiny next to the data's scale) pins
                # those directions to the average and leaves the rest as RegMean has them.
                average = merging.weight_average(flat)
                ridge = {k: 1e-6 * sum(g[k].diagonal().mean() for g in grams) * torch.eye(len(grams[0][k]))
                         for k in grams[0]}
                merged = merging.regmean(flat + [average], grams + [ridge], config.regmean_alpha)
                return {k: v.reshape(pre[k].shape) for k, v in merged.items()}
            timed(name, regmean, alpha=config.regmean_alpha)
        elif name == "Gradient matching":
            hess = [{k: stats["hessian"][t][k] for k in setup.mergeable if k in stats["hessian"][t]} for t in tasks]
            h0 = {k: v for k, v in stats["hessian_pretrained"].items() if k in pre}
            # Buffers (BatchNorm running statistics) have no Hessian. merging.gradient_matching would
            # treat them as Task Arithmetic at α (its H0 ≫ Ht limit), which sums the experts' shifts of
            # the running variances and can drive them negative; they get the rule's other neutral
            # limit instead, equal uninformative Hessians with H0 → 0: the plain average.
            with_hessian = [k for k in pre if k in h0]
            buffers = [k for k in pre if k not in h0]
            def gradient_matching():
                pick = lambda sd, keys: {k: sd[k] for k in keys}  # noqa: E731
                merged = merging.gradient_matching(pick(pre, with_hessian), [pick(f, with_hessian) for f in fts],
                                                   hess, h0, config.gradient_matching_scale)
                return {**merged, **merging.weight_average([pick(f, buffers) for f in fts])} if buffers else merged
            timed(name, gradient_matching, alpha=config.gradient_matching_scale,
                  **({"buffers": "averaged"} if buffers else {}))
    return results


# ----------------------------------------------------------------------------- the table
def evaluate_methods(track: Track, setup: Setup, merged: dict[str, MergeResult], reestimate_bn: bool = False,
                     progress=True) -> pd.DataFrame:
    """Long table: one row per (method, task) with accuracy, official metric and normalised score."""
    encoder = track.pretrained_encoder()
    rows = []

    def add(method, kind, results, bn="stored"):
        for task, r in results.items():
            rows.append({"track": track.name, "method": method, "kind": kind, "task": task, "batchnorm": bn, **r})

    add("Pretrained (θ0 + expert head)", "reference", evaluate(track, encoder, setup.pretrained, setup.heads))
    for task in track.tasks:
        add("Individual experts", "reference",
            evaluate(track, encoder, setup.experts[task].encoder, setup.heads, tasks=[task]))
    add("Multi-task", "reference", evaluate(track, encoder, setup.multitask.encoder, setup.heads))
    for name, result in tqdm(merged.items(), desc=f"{track.name} evaluation", disable=not progress):
        add(name, "merge", evaluate(track, encoder, result.state, setup.heads))
        if reestimate_bn:
            state = reestimate_batchnorm(encoder, result.state, [track.split(t, "train") for t in track.tasks])
            add(name, "merge", evaluate(track, encoder, state, setup.heads), bn="re-estimated")
    table = pd.DataFrame(rows)
    expert = table[table.method == "Individual experts"].set_index("task")["accuracy"]
    table["normalized"] = 100 * table["accuracy"] / table["task"].map(expert)
    return table


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Wide table: methods × tasks (accuracy), plus average accuracy and normalised score."""
    key = table.method + np.where(table.batchnorm == "re-estimated", " (BN re-estimated)", "")
    wide = table.assign(row=key).pivot_table(index="row", columns="task", values="accuracy", sort=False)
    wide["Average"] = wide.mean(axis=1)
    wide["Normalized"] = table.assign(row=key).groupby("row", sort=False)["normalized"].mean()
    return wide.round(1)
