"""What the paper-scale vision notebooks cost on a GPU: unit costs measured on CLIP image towers
of the real sizes (random weights), and what they come to for the authors' budgets.

The README's paper-scale section needs GPU hours and memory per notebook. Downloading CLIP is
not needed to measure them: the cost of a forward or backward depends on the shapes, not the
weights. So the towers here are ``lib.archs.ViT`` with open_clip's shapes for ``ViT-B-32``,
``ViT-B-16`` and ``ViT-L-14`` (224-pixel inputs, QuickGELU; the same operations as open_clip's
``VisionTransformer``, which ``ViT.from_open_clip`` loads bit for bit, except that its attention is
an explicit softmax where open_clip's calls ``scaled_dot_product_attention``: the same values, but
attention maps kept for the backward, so more memory than the notebooks' open_clip towers need;
``make bench-gpu-memory`` predicts both), with 8 tasks whose
frozen heads have the 8 datasets' class counts. Everything runs under bf16 autocast, as the
paper-scale tracks do on CUDA (``autocast="auto"``). Measured, per tower:

- **inference**: images per second through the tower and a head at batch 256 (random pixels:
  JPEG decoding and resizing, done on the CPU in threads by the tracks, are not included);
- **AdaMerging step** (notebook 02): one layer-wise step of ``lib.merging.adamerge`` on 8 tasks ×
  2 batches of 16, the authors' setting: θ(λ) = θ0 + Σ clamp(λ)·τ, the forwards through
  ``functional_call``, the backward to λ, Adam. Seconds per step (median after warm-up) and peak
  GPU memory; × 500 = one run at the authors' budget;
  Beside it, a plain forward+backward of the same batches and loss into the tower's own
  parameters (issue 10's yardstick: an adaptation step should cost at most 1.5× that); and the
  same step with ``per_batch_backward=True`` (the paper scale's default: the same gradient, one
  batch's activations alive at a time);
- **fine-tuning step** (``paper_experts="finetune"``, ``CLIP_RECIPE``): AdamW on the tower at
  batch 128, head frozen; × 2,000 = one expert; and the same step with the batch's gradient
  accumulated over parts (``CLIP_MICRO_BATCH``'s size for the tower, else 16), as
  ``training.finetune`` does with ``micro_batch_size``;
- **FS-Merge step** (notebook 03, a second table): a rank-12 SuperNet over two ViT-B-16 towers,
  batch 128 per task, with one backward per step (``micro_batches=1``) and in chunks of 16
  (``micro_batches=8``, the paper scale's default: the same gradient).

Timings bracket ``torch.cuda.synchronize()``; peak memory is ``torch.cuda.max_memory_allocated``
(reset before each measurement). On a CPU (``--tiny``) the same code runs on a 2-block tower, to
test the script, not to measure.

    python benchmarks/bench_gpu_paper.py                    # on a CUDA machine; writes figures/bench_gpu_paper/
    python benchmarks/bench_gpu_paper.py --tiny --no-record # a quick check anywhere
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from lib import merging  # noqa: E402
from lib.archs import ViT  # noqa: E402
from lib.fs_merge import build_supernet, train_supernet  # noqa: E402
from lib.experiments.paper_tracks import CLIP_MICRO_BATCH  # noqa: E402
from lib.experiments.report import Run  # noqa: E402
from lib.experiments.training import micro_batches  # noqa: E402

# open_clip's image towers: (width, blocks, heads, patch, output width)
TOWERS = {"ViT-B-32": (768, 12, 12, 32, 512), "ViT-B-16": (768, 12, 12, 16, 512), "ViT-L-14": (1024, 24, 16, 14, 768)}
TINY = {"tiny": (64, 2, 4, 32, 32)}
# classes of SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD (METHODS.md §7)
CLASSES = (397, 196, 45, 10, 10, 43, 10, 47)
ADAMERGING_STEPS, EXPERT_STEPS = 500, 2000  # the authors' AdaMerging budget; CLIP_RECIPE's steps


def _on(module: nn.Module, device: torch.device | None) -> nn.Module:
    """``module`` on ``device`` (None: where it was built, as on bench_gpu_memory's fake tensors)."""
    return module if device is None else module.to(device)


def tower(shape: tuple[int, ...], image: int, device: torch.device | None) -> ViT:
    """A ViT of ``shape`` on ``device`` (None: where it is built)."""
    width, blocks, heads, patch, out = shape
    return _on(ViT(image_size=image, patch_size=patch, in_channels=3, width=width, depth=blocks, heads=heads,
                   mlp_ratio=4.0, output_dim=out, num_classes=10, activation="quick_gelu"), device).eval()


def adamerging_setup(spec: str, args, device: torch.device | None) -> tuple[ViT, dict, list, int]:
    """(tower, a clone of its θ0, the tasks' frozen heads, AdaMerging's batch size) for ``spec``
    (a tower name, or ``name:B`` for batches of B images); the tower's own head is replaced by
    ``nn.Identity``, so that ``model(x)`` gives the features each task's head reads."""
    name, _, batch_size = spec.partition(":")
    model = tower({**TOWERS, **TINY}[name], args.image, device)
    heads = [_on(nn.Linear(model.feature_dim, c), device).requires_grad_(False) for c in CLASSES[:args.tasks]]
    pretrained = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    model.head = nn.Identity()
    return model, pretrained, heads, int(batch_size or args.adamerging_batch)


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    """(median seconds over ``repeats`` after one warm-up, peak GPU MiB over them)."""
    fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), peak_mib(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")


def bench(spec: str, args, device: torch.device) -> dict:
    """One row: ``spec`` is a tower name, or ``name:B`` for AdaMerging batches of B images."""
    name = spec.partition(":")[0]
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    model, pretrained, heads, adamerging_batch = adamerging_setup(spec, args, device)
    taus = [{k: 1e-3 * torch.randn_like(v) for k, v in pretrained.items()} for _ in heads]
    images = lambda n: torch.randn(n, 3, args.image, args.image, device=device)  # noqa: E731
    row = {"tower": spec, "AdaMerging batch (images)": adamerging_batch, "parameters (M)": sum(v.numel() for v in pretrained.values()) / 1e6}

    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        batch = images(args.inference_batch)

        @torch.no_grad()
        def infer():
            heads[0](model(batch))

        s, m = timed(infer, device, args.repeats)
        row |= {"inference (images/s)": args.inference_batch / s, "inference peak (GiB)": m / 1024}
        del batch

        data = {t: [{"x": images(adamerging_batch)} for _ in range(2)] for t in range(len(heads))}

        def plain_step():  # the same forwards and loss, backward into the tower's own parameters
            model.zero_grad(set_to_none=True)
            sum(merging.entropy(heads[t](model(**b))).mean() for t, bs in data.items() for b in bs).backward()

        s, _ = timed(plain_step, device, args.repeats)
        model.zero_grad(set_to_none=True)
        row["plain forward+backward, same batches (ms)"] = 1000 * s

        def adamerging_step(per_batch_backward: bool) -> tuple[float, float]:
            """(median seconds per step after two warm-up steps, peak GPU MiB) of ``adamerge``."""
            step_seconds = []

            def record(step, params, coefficients):  # after the step's backward
                sync(device)
                step_seconds.append(time.perf_counter())

            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            merging.adamerge(model, pretrained, taus, heads, lambda step: data, steps=args.repeats + 2,
                             callback=record, per_batch_backward=per_batch_backward)
            sync(device)
            gaps = [b - a for a, b in zip([started, *step_seconds], step_seconds)][2:]  # drop two warm-up steps
            return statistics.median(gaps), peak_mib(device)

        plain = row["plain forward+backward, same batches (ms)"]
        step, peak = adamerging_step(per_batch_backward=False)
        row |= {"AdaMerging step (ms)": 1000 * step, "AdaMerging / plain": 1000 * step / plain,
                "AdaMerging peak (GiB)": peak / 1024, f"AdaMerging {ADAMERGING_STEPS} steps (min)": step * ADAMERGING_STEPS / 60}
        step, peak = adamerging_step(per_batch_backward=True)  # the paper scale's default (the same gradient)
        row |= {"per-batch backward: step (ms)": 1000 * step, "per-batch backward / plain": 1000 * step / plain,
                "per-batch backward: peak (GiB)": peak / 1024}
        del data

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.1)
    x = images(args.finetune_batch)
    y = torch.randint(0, CLASSES[0], (args.finetune_batch,), device=device)

    def finetune_step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(heads[0](model(x)), y)
        loss.backward()
        optimizer.step()

    parts = CLIP_MICRO_BATCH.get(name) or 16

    def finetune_step_in_parts():  # training.finetune's gradient accumulation (paper_micro_batch)
        optimizer.zero_grad(set_to_none=True)
        for part, weight in micro_batches({"x": x, "labels": y}, parts):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(heads[0](model(part["x"])), part["labels"]) * weight
            loss.backward()
        optimizer.step()

    model.train()
    s, m = timed(finetune_step, device, args.repeats)
    row |= {"fine-tuning step (ms)": 1000 * s, "fine-tuning peak (GiB)": m / 1024,
            f"one expert, {EXPERT_STEPS} steps (min)": s * EXPERT_STEPS / 60}
    s, m = timed(finetune_step_in_parts, device, args.repeats)
    row |= {"fine-tuning in parts (images)": parts, "in parts: step (ms)": 1000 * s, "in parts: peak (GiB)": m / 1024}
    del model, optimizer, taus, pretrained
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(pd.Series(row).to_string(), flush=True)
    return row


def fs_merge_rows(args, device: torch.device) -> list[dict]:
    """One FS-Merge training step of a SuperNet over two towers, whole-batch vs chunked backward."""
    name = "tiny" if args.tiny else "ViT-B-16"
    dtype = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(0)
    towers = [tower({**TOWERS, **TINY}[name], args.image, device) for _ in range(2)]
    loaders = [[torch.randn(args.finetune_batch, 3, args.image, args.image, device=device)] for _ in towers]
    rows = []
    for chunks in (1, 8):
        supernet = build_supernet(towers, rank=12, init="first").to(device)
        s, m = timed(lambda: train_supernet(supernet, loaders, steps=1, progress=False, autocast=dtype,
                                            micro_batches=chunks), device, args.repeats)
        rows.append({"towers": f"2 × {name}", "batch per task": args.finetune_batch, "micro_batches": chunks,
                     "step (ms)": 1000 * s, "peak (GiB)": m / 1024})
        del supernet
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(pd.DataFrame(rows).to_string(), flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--towers", nargs="+", default=[*TOWERS, "ViT-L-14:8"],
                        help=f"of {[*TOWERS, *TINY]}; NAME:B runs AdaMerging on batches of B images")
    parser.add_argument("--tiny", action="store_true", help="a 2-block tower on whatever device: tests the script")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--inference-batch", type=int, default=256)
    parser.add_argument("--adamerging-batch", type=int, default=16)
    parser.add_argument("--finetune-batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="output folder (default figures/bench_gpu_paper)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    if args.tiny:
        args.towers = [t for t in args.towers if t.partition(":")[0] in TINY] or ["tiny", "tiny:1"]
        args.image, args.inference_batch, args.adamerging_batch, args.finetune_batch = 64, 8, 2, 4
        args.repeats = 2
    run = None if args.no_record else Run("bench_gpu_paper", dict(vars(args)), out_dir=args.out,
                                          source="benchmarks/bench_gpu_paper.py")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    print(f"{where}; torch {torch.__version__}; bf16 autocast: {device.type == 'cuda'}", flush=True)
    rows = [bench(spec, args, device) for spec in args.towers]
    table = pd.DataFrame(rows).set_index("tower")
    print(table.T.to_string(float_format=lambda v: f"{v:.3g}"))
    fs_table = pd.DataFrame(fs_merge_rows(args, device)).set_index("micro_batches")
    if run is not None:
        run.table(table.T.round(3), "gpu_unit_costs",
                  f"CLIP image towers of the real sizes (random weights), {len(CLASSES[:args.tasks])} tasks, bf16 "
                  f"autocast, on {where}: unit costs of the paper-scale notebooks (medians of {args.repeats} after "
                  "warm-up; peak = torch.cuda.max_memory_allocated). Inference excludes image decoding. AdaMerging: "
                  f"layer-wise, {args.tasks} tasks × 2 batches per step (the authors': 16 images each); fine-tuning: "
                  f"batch {args.finetune_batch}, AdamW.")
        run.table(fs_table.round(3), "fs_merge_step",
                  f"One FS-Merge training step (rank 12, AdamW, bf16 autocast) over two towers on {where}, batch "
                  f"{args.finetune_batch} per task: one backward (micro_batches 1) or chunks of "
                  f"about {max(1, args.finetune_batch // 8)} (micro_batches 8, the same gradient). Medians of {args.repeats}.")
        run.finish()
    return table


if __name__ == "__main__":
    main()
