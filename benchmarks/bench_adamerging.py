"""Cost of one AdaMerging step against a plain forward+backward of the same model on the same batch.

Issue 10's target: an adaptation step costs at most 1.5× a plain forward+backward, the work any
gradient step needs. Both run in eval mode on the same inputs (per task, its batches through the
encoder and that task's frozen head, the entropy loss summed over tasks):

- plain: ``model(**inputs)`` with the module's own parameters, ``backward()`` into them;
- AdaMerging: one step of ``lib.merging.adamerge`` (layer-wise): θ(λ) = θ0 + Σt clamp(λt,k)·τt,k,
  the same forwards through ``functional_call``, ``backward()`` to λ, one Adam step.

The two are measured alternately (plain, AdaMerging, plain, ...) after one warm-up each, and the
median seconds of each are compared; beside them, the same AdaMerging step with
``per_batch_backward=True`` (one backward per input batch: the paper scale's default). Peak memory is the growth of the resident set during a call
(``lib.experiments.cost.measure``). A second run of several AdaMerging steps records, per step,
its time, the process's peak resident set during the step (VmHWM, reset after each step) and the
resident set at its end: both must stay flat over the steps. Random weights: a MiniLM-L6-sized BERT (22.7M parameters; token embeddings frozen,
as in the text track) and a CIFAR ResNet-20 (with BatchNorm buffers, averaged by the merge).

Writes ``figures/bench_adamerging/`` (``--no-record``: print only).

    python benchmarks/bench_adamerging.py                       # both tracks, ~1-2 minutes on 2 cores
    python benchmarks/bench_adamerging.py --track text --tasks 8 --seq-len 64
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from lib import merging  # noqa: E402
from lib.experiments.cost import measure, release_freed_memory  # noqa: E402
from lib.experiments.report import Run  # noqa: E402
from lib.merging.adamerging import entropy  # noqa: E402
from lib.models import CifarResNet, load_text_encoder  # noqa: E402


def minilm_sized_encoder() -> nn.Module:
    from transformers import BertConfig

    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512)
    encoder, _ = load_text_encoder(config=config)
    encoder.transformer.embeddings.word_embeddings.weight.requires_grad_(False)  # frozen, as in the text track
    return encoder


def setup(track: str, tasks: int, batches_per_task: int, batch: int, seq_len: int, seed: int = 0):
    """(model, θ0, τ's, heads, per-task batches) with random weights and inputs."""
    torch.manual_seed(seed)
    model = minilm_sized_encoder() if track == "text" else CifarResNet(3)
    model.eval()
    pretrained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    experts = []
    for _ in range(tasks):
        expert = {}
        for k, v in pretrained.items():
            if k in trainable:
                expert[k] = v + 1e-3 * torch.randn_like(v)
            elif k.endswith("running_var"):
                expert[k] = v * (1 + 0.1 * torch.rand_like(v))
            elif k.endswith("running_mean"):
                expert[k] = v + 0.1 * torch.randn_like(v)
            else:
                expert[k] = v.clone()  # frozen tensors, integer buffers
        experts.append(expert)
    taus = merging.without_frozen(merging.task_vectors(pretrained, experts))
    del experts
    heads = {t: nn.Linear(model.feature_dim, 10).requires_grad_(False) for t in range(tasks)}

    def inputs():
        if track == "text":
            return {"input_ids": torch.randint(0, 30522, (batch, seq_len)),
                    "attention_mask": torch.ones(batch, seq_len, dtype=torch.long)}
        return {"pixel_values": torch.randn(batch, 3, 32, 32)}

    data = {t: [inputs() for _ in range(batches_per_task)] for t in range(tasks)}
    return model, pretrained, taus, heads, data


def plain_step(model, heads, data):
    """Forward+backward of the model's own parameters on the same batches, same loss."""
    model.zero_grad(set_to_none=True)
    loss = sum(entropy(heads[t](model(**b))).mean() for t, batches in data.items() for b in batches)
    loss.backward()
    return float(loss.detach())


def rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(float(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def bench(track: str, args) -> dict:
    model, pretrained, taus, heads, data = setup(track, args.tasks, args.batches_per_task, args.batch, args.seq_len)
    n_params = sum(v.numel() for v in pretrained.values() if v.is_floating_point())
    keys = merging.learned_keys(pretrained, taus)
    print(f"\n== {track}: {n_params / 1e6:.2f}M parameters, {args.tasks} tasks × {args.batches_per_task} batches "
          f"of {args.batch}" + (f" × {args.seq_len} tokens" if track == "text" else " images")
          + f", layer-wise λ: {len(taus)} × {len(keys)}")

    def ada_step(per_batch_backward=False):
        return merging.adamerge(model, pretrained, taus, heads, lambda s: data, steps=1,
                                per_batch_backward=per_batch_backward)

    plain, ada, per_batch = [], [], []
    for repeat in range(args.repeats + 1):  # the first triple warms up and is dropped
        p, a, b = (measure(lambda: plain_step(model, heads, data)), measure(ada_step),
                   measure(lambda: ada_step(per_batch_backward=True)))
        if repeat:
            plain.append(p)
            ada.append(a)
            per_batch.append(b)
    model.zero_grad(set_to_none=True)
    (t_plain, m_plain), (t_ada, m_ada), (t_batch, m_batch) = (
        (statistics.median(s for s, _ in runs), statistics.median(m for _, m in runs)) for runs in (plain, ada, per_batch))
    print(f"{'':28s}{'seconds':>10s}{'peak MiB':>10s}")
    print(f"{'plain forward+backward':28s}{t_plain:10.3f}{m_plain:10.1f}")
    print(f"{'AdaMerging step':28s}{t_ada:10.3f}{m_ada:10.1f}")
    print(f"{'  per-batch backward':28s}{t_batch:10.3f}{m_batch:10.1f}")
    print(f"ratio (AdaMerging / plain): {t_ada / t_plain:.2f}  (target ≤ 1.5; medians of {args.repeats})")

    # Per step over one run: the resident set must not grow.
    rows = []
    release_freed_memory()
    reset_peak()
    start = [time.perf_counter()]

    def record(step, params, lam):  # called after the step's backward, before its Adam update
        rows.append((step, time.perf_counter() - start[0], rss_mib("VmHWM"), rss_mib("VmRSS")))
        reset_peak()
        start[0] = time.perf_counter()

    merging.adamerge(model, pretrained, taus, heads, lambda s: data, steps=args.steps, callback=record)
    print(f"{'step':>5s}{'seconds':>10s}{'peak MiB':>10s}{'RSS MiB':>10s}   (one run of {args.steps} steps: "
          "the process's peak resident set during the step, and the resident set at its end)")
    for step, seconds, peak, rss in rows:
        print(f"{step:5d}{seconds:10.3f}{peak:10.1f}{rss:10.1f}")
    summary = {"track": track, "parameters (M)": n_params / 1e6, "plain forward+backward s": t_plain,
               "AdaMerging step s": t_ada, "ratio (time)": t_ada / t_plain, "plain peak MiB": m_plain,
               "AdaMerging peak MiB": m_ada, "per-batch backward s": t_batch,
               "per-batch ratio (time)": t_batch / t_plain, "per-batch peak MiB": m_batch}
    per_step = [{"track": track, "step": step, "seconds": seconds, "peak MiB": peak, "RSS MiB": rss}
                for step, seconds, peak, rss in rows]
    return summary, per_step


def main(argv=None):
    started = time.perf_counter()  # run.json's wall time counts from here, not from when the table is written
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--track", choices=["text", "vision", "both"], default="both")
    parser.add_argument("--tasks", type=int, default=2, help="tasks adapted on (the ratio does not depend on it: "
                        "both costs grow with the number of tasks)")
    parser.add_argument("--batches-per-task", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per text input")
    parser.add_argument("--repeats", type=int, default=3, help="measured pairs per track, after one warm-up")
    parser.add_argument("--steps", type=int, default=10, help="steps of the per-step memory run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default); one gives "
                        "stable timings on a shared machine")
    parser.add_argument("--no-record", action="store_true", help="print only; write nothing under figures/")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    tracks = ["text", "vision"] if args.track == "both" else [args.track]
    results = [bench(track, args) for track in tracks]
    summary = pd.DataFrame([s for s, _ in results]).set_index("track")
    per_step = pd.DataFrame([row for _, rows in results for row in rows]).set_index(["track", "step"])
    if not args.no_record:
        run = Run("bench_adamerging", vars(args), source="benchmarks/bench_adamerging.py", started=started)
        run.table(summary.round(3), "step_cost",
                  f"One layer-wise AdaMerging step against a plain forward+backward of the same model on the same "
                  f"batches ({args.tasks} tasks × {args.batches_per_task} batches of {args.batch}; random weights); "
                  f"medians of {args.repeats} alternating triples; target ratio ≤ 1.5. Per-batch backward: the same "
                  "step with adamerge(per_batch_backward=True), the paper scale's default (the same gradient, one "
                  "batch's activations at a time). Peak = growth of the resident set during the call.")
        run.table(per_step.round(3), "memory_per_step",
                  f"One run of {args.steps} AdaMerging steps: the process's peak resident set during each step "
                  "and the resident set at its end (both must stay flat).")
        run.finish()
    return summary, per_step


if __name__ == "__main__":
    main()
