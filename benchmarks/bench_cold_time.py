"""How long a cold run of notebook 01 takes on this machine, predicted from measured unit costs.

A cold run (nothing cached) of ``notebooks/01_merging_baselines.ipynb`` at its defaults takes
hours on a 2-core CPU, too long to time on every change. This script measures, with the
notebooks' two threads, the unit costs the run is made of, on the real models and data of each
track, and multiplies them by the run's counts:

- one training step (forward, cross-entropy, backward, AdamW) at the track's batch size;
- encoding one example (inference: validation during training, λ selection, test evaluation,
  RegMean's Grams);
- one example of per-example squared gradients (the Fisher).

Counts come from the defaults of ``BaselinesConfig`` and, for the number of training steps
(early stopping decides it), from the last committed run's ``expert_training.csv`` when there
is one (else each budget's maximum). The seed spread's experts are assumed to stop where seed
0's did. What the model leaves out (data loading, merges themselves, re-estimating BatchNorm,
plotting) is small next to training and inference. It is a prediction, not a measurement: the
README gives both.

    python benchmarks/bench_cold_time.py [--data-dir ../shared/data --models-dir ../shared/models]
"""
from __future__ import annotations

import argparse
import statistics as stats
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from lib import merging  # noqa: E402
from lib.experiments import baselines as B  # noqa: E402
from lib.experiments.report import Run  # noqa: E402
from lib.experiments.training import _train_indices, encode, initial_heads  # noqa: E402
from lib.functional import model_inputs  # noqa: E402
from lib.heads import head_module  # noqa: E402

COMMITTED_TRAINING = REPO / "figures" / "01_merging_baselines" / "expert_training.csv"


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first calls load kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return stats.median(times)


def unit_costs(track, config: B.BaselinesConfig, name: str, repeats: int) -> dict[str, float]:
    """Seconds per training step, per encoded example and per Fisher example, on the track's
    first two tasks (their mean)."""
    heads = initial_heads(track)
    expert_config, _ = config.finetune_configs(name, len(track.tasks))
    step, encoded, fisher = [], [], []
    for task in track.tasks[:2]:
        encoder = track.pretrained_encoder()
        head = head_module(heads[task])
        params = [p for n, p in encoder.named_parameters() if n not in track.frozen_parameters]
        optimizer = torch.optim.AdamW(params, lr=expert_config.lr)
        split = track.split(task, "train")
        counter = iter(range(10**6))

        def train_step():
            batch = split.batch(_train_indices(split, expert_config.batch_size, next(counter), 0))
            encoder.train()
            loss = F.cross_entropy(head(encoder(**model_inputs(batch))), batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        step.append(median_seconds(train_step, repeats))
        validation = track.split(task, "validation").subset(256, 0)
        encoded.append(median_seconds(lambda: encode(encoder, validation), 1) / len(validation))
        some = split.subset(2 * config.fisher_batch_size, 0)
        names = [f"encoder.{k}" for k, p in encoder.named_parameters() if p.requires_grad
                 and k not in track.frozen_parameters]
        fisher.append(median_seconds(lambda: B._fisher(track, encoder.state_dict(), heads[task], split, names,
                                                       config, len(some)), 1) / len(some))
    return {"step": stats.mean(step), "example": stats.mean(encoded), "fisher example": stats.mean(fisher)}


def trained_steps(name: str, models: list[str], budget: int) -> dict[str, int]:
    """Steps each model trained for in the committed run, else the budget."""
    if COMMITTED_TRAINING.exists():
        table = pd.read_csv(COMMITTED_TRAINING)
        table = table[table.track == name].set_index("model")["steps"]
        return {m: int(table.get(m, budget)) for m in models}
    return {m: budget for m in models}


def predicted_components(track, config: B.BaselinesConfig, name: str, cost: dict[str, float]) -> list[dict]:
    """(component, count, unit, seconds each, predicted minutes) of one track's cold run."""
    T = len(track.tasks)
    expert_config, multitask_config = config.finetune_configs(name, T)
    experts = trained_steps(name, list(track.tasks), expert_config.max_steps)
    multitask = trained_steps(name, ["multi-task"], multitask_config.max_steps)["multi-task"]
    seeds = 1 + (len(config.spread_seeds) if name == "vision" else 0)
    val_per_eval = expert_config.max_eval_examples
    expert_steps = seeds * sum(experts.values())
    expert_evals = seeds * sum(s // expert_config.eval_every + 1 for s in experts.values()) * val_per_eval
    multitask_evals = (multitask // multitask_config.eval_every + 1) * T * val_per_eval
    test = sum(min(len(track.split(t, "test")), config.max_test or 10**9) for t in track.tasks)
    tuned = [m for m in B.METHODS if merging.REGISTRY[m].tuned]
    points = len(config.lambda_grid) + 2 * config.lambda_refinements
    merged_rows = len(B.METHODS) * (2 if getattr(track, "has_batchnorm", False) else 1)  # BN re-estimated rows
    rows = [
        ("expert training steps", expert_steps, "step", cost["step"]),
        ("expert validation (early stopping)", expert_evals, "example", cost["example"]),
        ("multi-task training steps", multitask, "step", cost["step"]),
        ("multi-task validation", multitask_evals, "example", cost["example"]),
        ("Fisher (per-example squared gradients)", seeds * (T + 1) * config.fisher_examples, "fisher example",
         cost["fisher example"]),
        ("RegMean Grams", seeds * T * config.regmean_examples, "example", cost["example"]),
        ("λ selection on validation", seeds * len(tuned) * points * T * config.selection_examples, "example",
         cost["example"]),
        ("test evaluation", seeds * (2 + merged_rows) * test + test, "example", cost["example"]),  # θ0, experts, MT
    ]
    if track.head_kind == "few_shot":  # each task's probe on θ0's features of head_shots examples per class
        shots = sum(min(track.head_shots * track.num_classes(t), len(track.split(t, "train"))) for t in track.tasks)
        rows.append(("few-shot heads (θ0 features)", seeds * shots, "example", cost["example"]))
    if getattr(track, "has_batchnorm", False):  # each merge's statistics re-estimated on batchnorm_examples per task
        rows.append(("BatchNorm re-estimation", seeds * len(B.METHODS) * T * config.batchnorm_examples, "example",
                     cost["example"]))
    return [{"track": name, "component": c, "count": n, "unit": u, "ms each": 1e3 * s, "minutes": n * s / 60}
            for c, n, u, s in rows]


def main(argv=None) -> pd.DataFrame:
    started = time.perf_counter()  # run.json's wall time counts from here, not from when the table is written
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="", help="local data mirror (e.g. ../shared/data); '' downloads")
    parser.add_argument("--models-dir", default="")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the notebooks use 2)")
    parser.add_argument("--repeats", type=int, default=4, help="timed training steps per task (after a warm-up)")
    parser.add_argument("--no-record", action="store_true", help="print only; write nothing under figures/")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = B.BaselinesConfig(data_dir=args.data_dir, models_dir=args.models_dir, progress=False)
    rows = []
    for name in config.tracks:
        track = config.track(name)
        rows += predicted_components(track, config, name, unit_costs(track, config, name, args.repeats))
    table = pd.DataFrame(rows).set_index(["track", "component"])
    total = table["minutes"].sum()
    print(table.to_string(float_format=lambda x: f"{x:.4g}"))
    print(f"predicted cold run of notebook 01 at its defaults: {total:.0f} minutes with {args.threads} thread(s)")
    if not args.no_record:
        run = Run("bench_cold_time", vars(args), source="benchmarks/bench_cold_time.py", started=started)
        table.loc[("all", "total"), ["minutes"]] = total
        table["count"] = table["count"].astype("Int64")  # integers in the table, blank for the total
        run.table(table.round(2), "cold_time",
                  f"Notebook 01 cold at its defaults, predicted: measured unit costs ({args.threads} threads) × the "
                  "run's counts (training steps from the last committed run). A prediction, not a measurement.")
        run.finish()
    return table


if __name__ == "__main__":
    main()
