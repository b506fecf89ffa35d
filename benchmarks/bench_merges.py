"""Wall time and peak memory of each closed-form merge, against a "read the inputs" baseline.

Times are reported as seconds and as a ratio to the baseline: one pass summing every input
tensor (θ0 and all θt) plus a copy of one state dict. Any merge must read its inputs and
write one model, so a ratio near 1 means a method costs about that, and the ratio is less
machine-dependent than the seconds.

Peak memory is the growth of this process's resident set during the call (the merged model
included), read from Linux's VmHWM after resetting it through /proc/self/clear_refs. Freed
memory is handed back to the OS (malloc_trim) between calls so one method's leftovers do
not hide the next one's allocations. Where /proc is unavailable the column is NaN.

    python benchmarks/bench_merges.py                  # the eight real text experts (make bench)
    python benchmarks/bench_merges.py --synthetic      # 8 random MiniLM-L6-sized models
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from lib import merging  # noqa: E402
from lib.experiments.cost import measure  # noqa: E402

StateDict = Mapping[str, torch.Tensor]


# ------------------------------------------------------------------------ measurement


def read_inputs(pretrained: StateDict, finetuned: Sequence[StateDict]) -> dict[str, torch.Tensor]:
    """The baseline: sum every input tensor once, and copy one state dict."""
    total = sum(t.sum() for sd in [pretrained, *finetuned] for t in sd.values() if t.is_floating_point())
    copy = {k: v.clone() for k, v in pretrained.items()}
    copy["__sum__"] = torch.as_tensor(total)
    return copy


# -------------------------------------------------------------------------- benchmark


def merge_calls(pretrained: StateDict, finetuned: Sequence[StateDict], extras: Mapping) -> dict[str, Callable]:
    """The merges to time, at their usual settings; those whose statistics are missing
    from ``extras`` (keys ``fishers``, ``grams`` with ``gram_counts``, ``hessians``,
    ``pretrained_hessian``) are skipped."""
    calls = {
        "weight_average": lambda: merging.weight_average(finetuned),
        "task_arithmetic": lambda: merging.task_arithmetic(pretrained, finetuned, 0.3),
        "ties (density 0.2, mean)": lambda: merging.ties_merging(pretrained, finetuned, 0.2, 1.0, "mean"),
        "dare (p 0.9) + task_arithmetic": lambda: merging.task_arithmetic(
            pretrained, merging.dare(pretrained, finetuned, 0.9, seed=0), 0.3),
        "slerp (2 models)": lambda: merging.slerp(finetuned[0], finetuned[1], 0.5),
    }
    if "fishers" in extras:
        calls["fisher"] = lambda: merging.fisher_merging(finetuned, extras["fishers"])
    if "grams" in extras and "gram_counts" in extras:
        calls["regmean (alpha 0.9)"] = lambda: merging.regmean(finetuned, extras["grams"], 0.9,
                                                               counts=extras["gram_counts"])
    if "hessians" in extras and "pretrained_hessian" in extras:
        calls["gradient_matching"] = lambda: merging.gradient_matching(
            pretrained, finetuned, extras["hessians"], extras["pretrained_hessian"], 1.0)
    return calls


def run_benchmark(pretrained: StateDict, finetuned: Sequence[StateDict], extras: Mapping | None = None,
                  repeats: int = 1) -> pd.DataFrame:
    """Time every merge on already-loaded state dicts; the best of ``repeats`` runs each
    (for memory too: the first call of a method can include one-time costs such as loading
    LAPACK's code, which are not the method's).

    Returns one row per method (the read baseline first) with columns ``method``,
    ``seconds``, ``ratio_to_read`` and ``peak_mib``.
    """
    calls = {"read inputs (baseline)": lambda: read_inputs(pretrained, finetuned),
             **merge_calls(pretrained, finetuned, extras or {})}
    rows = []
    for name, fn in calls.items():
        runs = [measure(fn) for _ in range(repeats)]
        rows.append({"method": name, "seconds": min(s for s, _ in runs), "peak_mib": min(m for _, m in runs)})
    table = pd.DataFrame(rows)
    table.insert(2, "ratio_to_read", table["seconds"] / table["seconds"].iloc[0])
    return table


# -------------------------------------------------------------------------- synthetic


def minilm_l6_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter shapes of all-MiniLM-L6-v2's encoder (22.7M parameters), BERT names."""
    d, ff = 384, 1536
    shapes = {
        "embeddings.word_embeddings.weight": (30522, d),
        "embeddings.position_embeddings.weight": (512, d),
        "embeddings.token_type_embeddings.weight": (2, d),
        "embeddings.LayerNorm.weight": (d,),
        "embeddings.LayerNorm.bias": (d,),
    }
    for i in range(6):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[p + name + ".weight"] = (d, d)
            shapes[p + name + ".bias"] = (d,)
        shapes[p + "intermediate.dense.weight"] = (ff, d)
        shapes[p + "intermediate.dense.bias"] = (ff,)
        shapes[p + "output.dense.weight"] = (d, ff)
        shapes[p + "output.dense.bias"] = (d,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + norm + ".weight"] = (d,)
            shapes[p + norm + ".bias"] = (d,)
    shapes["pooler.dense.weight"] = (d, d)
    shapes["pooler.dense.bias"] = (d,)
    return shapes


def synthetic_models(n_tasks: int = 8, seed: int = 0, gram_examples: int = 256):
    """Random (pretrained, finetuned, extras) of MiniLM-L6's size, with fake statistics.

    Fishers are uniform random; the Hessians reuse the Fisher tensors (Ht = Nt·F̂t with
    Nt = 1 costs the same to merge, and saves memory); Grams are XᵀX of random inputs.
    """
    g = torch.Generator().manual_seed(seed)
    shapes = minilm_l6_shapes()
    pretrained = {k: 0.02 * torch.randn(s, generator=g) for k, s in shapes.items()}
    finetuned = [{k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in pretrained.items()}
                 for _ in range(n_tasks)]
    fishers = [{k: torch.rand(s, generator=g) for k, s in shapes.items()} for _ in range(n_tasks)]
    grams, counts = [], []
    for _ in range(n_tasks):
        gram = {}
        for k, s in shapes.items():
            if not k.startswith("embeddings") and len(s) == 2:  # the linear layers
                x = torch.randn(gram_examples, s[1], generator=g)
                gram[k] = x.T @ x
        grams.append(gram)
        counts.append({k: gram_examples for k in gram})
    extras = {
        "fishers": fishers,
        "grams": grams,
        "gram_counts": counts,
        "hessians": fishers,
        "pretrained_hessian": {k: torch.rand(s, generator=g) for k, s in shapes.items()},
    }
    return pretrained, finetuned, extras


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    started = time.perf_counter()  # run.json's wall time counts from here, not from when the table is written
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", action="store_true",
                        help="benchmark random MiniLM-L6-sized models with fake statistics")
    parser.add_argument("--tasks", type=int, default=8, help="number of fine-tuned models (synthetic)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per method; the fastest is reported")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (0: torch's default). One thread gives stable "
                             "timings on a shared machine, where every parallel op otherwise waits "
                             "for a descheduled thread")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.synthetic:
        pretrained, finetuned, extras = synthetic_models(args.tasks)
        what = f"{len(finetuned)} synthetic models"
    else:
        pretrained, finetuned, extras = text_experts()
        what = f"the {len(finetuned)} MiniLM text experts of notebooks/01_merging_baselines (mergeable tensors)"
    n_params = sum(v.numel() for v in pretrained.values())
    print(f"{what}: {n_params / 1e6:.1f}M parameters each, {torch.get_num_threads()} threads")
    table = run_benchmark(pretrained, finetuned, extras, repeats=args.repeats)
    print(table.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    if not args.synthetic:
        from lib.experiments.report import Run

        run = Run("bench_merges", {**vars(args), "models": what}, source="benchmarks/bench_merges.py", started=started)
        run.table(table.set_index("method").round(3), "merge_cost",
                  f"Cost of each closed-form merge on {what}; ratio = seconds / seconds to read the inputs once.")
        run.finish()
    return table


def text_experts():
    """θ0, the eight text experts and their statistics, exactly as the baselines notebook has
    them (its default parameters; trained and cached on first use, which takes a while)."""
    from lib.experiments.baselines import BaselinesConfig, compute_statistics, prepare_track
    from lib.experiments.config import notebook_config, notebook_defaults

    defaults = notebook_defaults(Path(__file__).resolve().parent.parent / "notebooks" / "01_merging_baselines.ipynb")
    config = notebook_config(BaselinesConfig, {**defaults, "data_dir": os.environ.get("DATA_DIR", ""), "progress": False})
    track = config.track("text")
    expert_config, _ = config.finetune_configs("text", len(track.tasks))
    setup = prepare_track(track, expert_config, None)  # no multi-task model: no merge uses it
    stats = compute_statistics(track, setup, config)
    pretrained = setup.restrict(setup.pretrained)
    finetuned = [setup.restrict(s) for s in setup.finetuned()]
    tasks = track.tasks
    pick = lambda stat: {k: v for k, v in stat.items() if k in pretrained}  # noqa: E731
    extras = {"fishers": [pick(stats["fisher"][t]) for t in tasks], "grams": [pick(stats["gram"][t]) for t in tasks],
              "gram_counts": [pick(stats["gram_counts"][t]) for t in tasks],
              "hessians": [pick(stats["hessian"][t]) for t in tasks],
              "pretrained_hessian": pick(stats["hessian_pretrained"])}
    return pretrained, finetuned, extras


if __name__ == "__main__":
    main()
