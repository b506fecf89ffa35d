"""Inference cost of Twin-Merging's three paths against a static merge, side by side in one run.

A MiniLM-sized random BERT (hidden 384, 6 layers, 12 heads, intermediate 1536) and T random
experts' exclusive parts at rank ratio r (METHODS.md §3) serve a mixed stream of inputs, each
with its own router weights:

- static: one merged model, one batched forward (what a single merge costs; no per-input weights);
- low-rank: ``low_rank_forward``, the static forward plus Σt w_t·U_t(S_t(V_tᵀh)) per input, exact;
- grouped: ``grouped_forward``, one merge and one batched forward per router-argmax group;
- per-input: ``per_input_forward``, one dense merge per input, run at batch size 1 (the authors' path).

Twin-Merging's routing pass (the shared model's features, then the router MLP) costs one more
static forward for all three Twin paths alike and is not included. The exclusive parts are
random, not from real experts: cost depends only on their shapes. By default the token-embedding
matrix has no exclusive part, as in the project's MiniLM experts, whose token embeddings are
frozen (``--tuned-embeddings`` gives it one, as fully fine-tuned experts would have).

Streams of 8, 32 and 128 tokens per input (short tweets to GLUE-length pairs), each with full
router weights and with top-k weights (the k most likely tasks, renormalised: a merge then sums
k tasks' parts; the low-rank path still multiplies every task's factors). Besides the times it counts the
matrix work (2 × multiply-adds) of each path: the static forward, the low-rank corrections per
layer call, and one dense merge per input or group. The FLOP ratio of per-input materialisation
to the low-rank path is the speed-up the arithmetic allows; it grows as inputs get shorter,
because a merge costs the same for 8 tokens as for 128. It checks that the low-rank path and
per-input materialisation agree, and writes ``figures/bench_twin_merging/`` (``--no-record``: print only).

    python benchmarks/bench_twin_merging.py                       # 64 inputs per stream, T = 8, r = 10%, top-2
    python benchmarks/bench_twin_merging.py --threads 2 --lengths 32 --tuned-embeddings
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from lib.functional import functional_forward  # noqa: E402
from lib.merging import twin_merging as tw  # noqa: E402
from lib.experiments.report import Run  # noqa: E402
from lib.models import load_text_encoder  # noqa: E402


def minilm_sized_encoder() -> nn.Module:
    from transformers import BertConfig

    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512)
    return load_text_encoder(config=config)[0].eval()


def random_exclusive(shared: dict, num_tasks: int, rank_ratio: float, tuned_embeddings: bool,
                     seed: int = 0) -> list[dict]:
    """Random exclusive parts of compress()'s shapes: rank-r factors for tensors of 2+ dimensions,
    dense for the others; rank 0 for the token embeddings unless ``tuned_embeddings``."""
    g = torch.Generator().manual_seed(seed)
    exclusive = []
    for _ in range(num_tasks):
        part = {}
        for k, v in shared.items():
            if not torch.is_floating_point(v):
                continue
            if v.dim() >= 2:
                frozen = k.endswith("word_embeddings.weight") and not tuned_embeddings
                r = 0 if frozen else tw.rank_for(v.shape, rank_ratio)
                m, n = v.shape[0], v[0].numel()
                part[k] = tw.LowRank(torch.randn(m, r, generator=g) * 0.01, torch.randn(r, n, generator=g) / n ** 0.5)
            else:
                part[k] = torch.randn(v.shape, generator=g) * 0.01
        exclusive.append(part)
    return exclusive


def mixed_stream(num_inputs: int, length: int, num_tasks: int, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """Inputs of ``length`` tokens (no padding, so batch size 1 gains nothing from cutting it) and
    router-like weights: each input's own task gets most of the weight, the others some."""
    g = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(1000, 30000, (num_inputs, length), generator=g),
              "attention_mask": torch.ones(num_inputs, length, dtype=torch.long)}
    task = torch.randint(0, num_tasks, (num_inputs,), generator=g)
    weights = torch.softmax(3.0 * nn.functional.one_hot(task, num_tasks) + torch.randn(num_inputs, num_tasks,
                                                                                         generator=g), dim=1)
    return inputs, weights


def matrix_work(model: nn.Module, shared: dict, stacked: tw.Stacked, inputs: dict) -> tuple[float, float]:
    """FLOPs (2 × multiply-adds) of one static forward on ``inputs``, and of the low-rank corrections,
    counted at every nn.Linear and nn.Embedding call, plus attention's two L×L products per layer."""
    counts = {"static": 0.0, "corrections": 0.0}

    def count(name):
        def hook(module, args, output):
            rows = args[0].numel() / (module.in_features if isinstance(module, nn.Linear) else 1)
            factor = stacked.factors.get(f"{name}.weight")
            width = factor[1].shape[0] if factor is not None else 0
            if isinstance(module, nn.Linear):
                counts["static"] += 2 * rows * module.in_features * module.out_features
                counts["corrections"] += 2 * rows * width * (module.in_features + module.out_features)
            else:  # an embedding: the lookup is free, the correction is a [rows, R] × [R, dim] product
                counts["corrections"] += 2 * rows * width * module.embedding_dim
        return hook

    handles = [m.register_forward_hook(count(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.Embedding))]
    try:
        with torch.no_grad():
            functional_forward(model, shared, inputs)
    finally:
        for h in handles:
            h.remove()
    config = model.transformer.config
    batch, length = inputs["input_ids"].shape
    counts["static"] += config.num_hidden_layers * 2 * 2 * batch * length * length * config.hidden_size
    return counts["static"], counts["corrections"]


def merge_work(stacked: tw.Stacked, active_tasks: float) -> float:
    """FLOPs of one dense merge θ_shared + Σt w_t·U_t S_t V_tᵀ over ``active_tasks`` tasks (the
    factored keys; dense keys are a few vectors): 2·m·r·n per task and matrix."""
    per_task = sum(2 * us.shape[0] * vh.shape[1] * us.shape[1] for us, vh, _ in stacked.factors.values())
    return per_task / stacked.num_tasks * active_tasks


def timed(fn, repeats: int) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def stream_rows(model, shared, exclusive, stacked, length: int, args) -> list[dict]:
    """Every path on one mixed stream of ``args.inputs`` inputs of ``length`` tokens: wall time and
    matrix work. Top-k rows use the same router weights cut to their k largest."""
    inputs, weights = mixed_stream(args.inputs, length, args.tasks)
    top = tw.keep_top_k(weights, args.top_k)
    warm = {k: v[:2] for k, v in inputs.items()}  # first calls load kernels; keep that out of the times
    functional_forward(model, shared, warm)
    tw.low_rank_forward(model, shared, stacked, weights[:2], warm)
    tw.low_rank_forward(model, shared, stacked, top[:2], warm)

    with torch.no_grad():
        static_s, _ = timed(lambda: functional_forward(model, shared, inputs), args.repeats)
    low_rank_s, low_rank_out = timed(lambda: tw.low_rank_forward(model, shared, stacked, weights, inputs), args.repeats)
    top_s, top_out = timed(lambda: tw.low_rank_forward(model, shared, stacked, top, inputs), args.repeats)
    grouped_s, _ = timed(lambda: tw.grouped_forward(model, shared, exclusive, weights, inputs), args.repeats)
    per_input_s, per_input_out = timed(lambda: tw.per_input_forward(model, shared, exclusive, weights, inputs), 1)
    per_top_s, per_top_out = timed(lambda: tw.per_input_forward(model, shared, exclusive, top, inputs), 1)
    for name, got, expected in [("low-rank", low_rank_out, per_input_out), (f"top-{args.top_k}", top_out, per_top_out)]:
        gap = (got - expected).abs().max().item()
        if gap > 1e-3 * expected.abs().max().item():
            raise AssertionError(f"{name}: the low-rank path and per-input materialisation differ by {gap:.2e}")

    n, k, t = args.inputs, args.top_k, args.tasks
    groups = len(weights.argmax(1).unique())
    static_f, correction_f = matrix_work(model, shared, stacked, inputs)
    paths = [  # name, seconds, FLOPs
        ("static merge (one model)", static_s, static_f),
        ("low-rank, exact per input", low_rank_s, static_f + correction_f),
        (f"low-rank, top-{k}", top_s, static_f + correction_f),  # every task's factors still run
        (f"grouped ({groups} groups by argmax)", grouped_s, static_f + groups * merge_work(stacked, t)),
        ("per-input materialisation", per_input_s, static_f + n * merge_work(stacked, t)),
        (f"per-input materialisation, top-{k}", per_top_s, static_f + n * merge_work(stacked, k)),
    ]
    return [{"tokens per input": length, "path": name, "ms per input": 1e3 * seconds / n,
             "× static (time)": seconds / static_s, "× low-rank (time)": seconds / low_rank_s,
             "GFLOP per input": flops / n / 1e9, "× low-rank (FLOPs)": flops / (static_f + correction_f)}
            for name, seconds, flops in paths]


def main(argv=None) -> pd.DataFrame:
    started = time.perf_counter()  # run.json's wall time counts from here, not from when the table is written
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8, 32, 128],
                        help="tokens per input, one stream each")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rank-ratio", type=float, default=0.1)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs (per-input: one run)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--tuned-embeddings", action="store_true",
                        help="give the token embeddings an exclusive part too (default: frozen, rank 0)")
    parser.add_argument("--no-record", action="store_true", help="print only; write nothing under figures/")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = minilm_sized_encoder()
    shared = {k: v.detach().clone() for k, v in model.state_dict().items()}
    exclusive = random_exclusive(shared, args.tasks, args.rank_ratio, args.tuned_embeddings)
    stack_seconds, stacked = timed(lambda: tw.stack(exclusive), 1)
    model_bytes = sum(v.numel() * v.element_size() for v in shared.values())
    what = (f"MiniLM-sized random BERT ({model_bytes / 2**20:.1f} MiB); T = {args.tasks} exclusive parts at rank "
            f"ratio {args.rank_ratio} ({tw.nbytes(exclusive) / 2**20:.1f} MiB in all); token embeddings "
            f"{'tuned' if args.tuned_embeddings else 'frozen (rank 0)'}; {args.inputs} inputs per stream; "
            f"{torch.get_num_threads()} thread(s)")
    print(f"{what}. stack(): {stack_seconds * 1e3:.0f} ms, once.")
    rows = [row for length in args.lengths
            for row in tqdm(stream_rows(model, shared, exclusive, stacked, length, args), desc=f"{length} tokens",
                            disable=True)]
    table = pd.DataFrame(rows).set_index(["tokens per input", "path"])
    print(table.to_string(float_format=lambda x: f"{x:.2f}"))
    for length in args.lengths:
        per_input = table.loc[(length, "per-input materialisation")]
        print(f"{length} tokens: per-input / low-rank = {per_input['× low-rank (time)']:.1f}× in time, "
              f"{per_input['× low-rank (FLOPs)']:.1f}× in FLOPs (the speed-up the matrix work allows).")
    if not args.no_record:
        run = Run("bench_twin_merging", {**vars(args), "model": what}, source="benchmarks/bench_twin_merging.py", started=started)
        run.table(table.round(3), "inference_cost",
                  f"Twin-Merging inference on mixed streams: {what}. Times are the best of {args.repeats} runs "
                  "(per-input paths: one); FLOPs count the matrix work (2 × multiply-adds), so the FLOP ratio "
                  "is the speed-up a path could reach if every product ran at the same rate.")
        run.finish()
    return table


if __name__ == "__main__":
    main()
