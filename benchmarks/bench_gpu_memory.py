"""GPU memory of the paper-scale steps, predicted on a CPU, and checked against an H200.

``lib.experiments.gpu_memory.predicted_cuda_peak`` runs a step on fake tensors and counts the
bytes of the tensors alive at once, with CUDA autocast's dtypes. This script

1. **checks the prediction** against every peak ``make bench-gpu-paper`` measured on an H200
   (``figures/bench_gpu_paper/*.csv``, read as data): the same steps on the same towers
   (``lib.archs.ViT`` with open_clip's shapes), with the same tensors alive as that script had
   (its fine-tuning rows, for example, ran with the AdaMerging rows' θ0 copy and 8 task vectors
   still in memory, so they are predicted that way too). Predicted / measured near 1 says the
   model of memory holds;
2. **predicts the notebooks' own steps at their paper-scale defaults**, on open_clip's image
   towers (what notebooks 01, 02 and 05 run; open_clip's attention goes through
   ``scaled_dot_product_attention``, which keeps no attention matrix, unlike the explicit
   softmax of ``lib.archs.ViT`` above):
   - notebook 02's AdaMerging step: layer-wise, 8 tasks × 2 batches of 16 images, bf16
     autocast, one backward per batch (``adamerging_per_batch_backward``, the paper scale's
     default) and, beside it, one backward per step; with what ``_run_adamerging`` holds on the
     device: the encoder (θ0, which ``theta0_sharing_encoder`` also passes as θ0: no second
     copy), 8 task vectors, 8 frozen heads;
   - notebook 01's diagonal Fisher of an expert (float32, per-example gradients by vmap over a
     batch of 16) in chunks of ``CLIP_FISHER_CHUNK`` examples, and of 16;
   - an expert's fine-tuning step (``paper_experts finetune``, ``CLIP_RECIPE``: AdamW, batch
     128, gradient clipped) in parts of ``CLIP_MICRO_BATCH`` images, and as one batch;
   - notebook 05's evaluation of θ(x) by the exact low-rank path (``low_rank_predictions``: float32,
     batches of 128, the encoder, θ_shared and 8 tasks' stacked factors at rank ratio 0.1);
   - notebook 03's distillation baseline on two ViT-B-16 experts (``lib.archs.ViT``, as FS-Merge
     runs them; FS-Merge's own step is among the checked rows of 1.), batch 128 per task, its
     backward in ``fs_micro_batches`` = 8 chunks and in one;
   - notebook 04's RoBERTa-base steps at 384 tokens: a fine-tuning step of ``SentimentRecipe``
     (batch 16, bf16 autocast) and the Fisher's exact per-example gradients (hooks, float32,
     ``fisher_batch_size`` 32).

3. **on a CUDA machine**, instead: runs the notebooks' steps of 2. for real and puts the
   measured peaks beside the committed predictions (``figures/bench_gpu_memory_measured/``).

A 24 GB card holds about 22 GiB of tensors once the CUDA context and the allocator's slack
are taken off; the column "fits 24 GB" applies that margin.

    python benchmarks/bench_gpu_memory.py            # ~11 min on 2 cores; writes figures/bench_gpu_memory/
    python benchmarks/bench_gpu_memory.py --tiny --no-record   # a quick check of the script
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench_gpu_paper import CLASSES, TINY, TOWERS, adamerging_setup, tower  # noqa: E402  (this folder: the measured steps' towers)
from lib import merging  # noqa: E402
from lib.experiments.gpu_memory import embedding_sums_at_their_largest, predicted_cuda_peak  # noqa: E402
from lib import statistics  # noqa: E402
from lib.experiments.paper_tracks import CLIP_FISHER_CHUNK, CLIP_MICRO_BATCH, CLIP_RECIPE  # noqa: E402
from lib.models import Classifier  # noqa: E402
from lib.experiments.report import Run  # noqa: E402
from lib.experiments.training import micro_batches  # noqa: E402
from lib.fs_merge import Distillation, build_supernet, train_supernet  # noqa: E402

GIB = 2**30
CARD_24GB = 22.0  # GiB of tensors a 24 GB card holds after the CUDA context and allocator slack
MEASURED = ROOT / "figures" / "bench_gpu_paper"
BF16 = torch.bfloat16


# ------------------------------------------------------------------ the steps, as bench_gpu_paper runs them


def adamerging_run(model: nn.Module, pretrained: dict, heads: list, batch: int, image: int, per_batch_backward: bool,
                   input_name: str = "x", autocast: str = "cpu"):
    """Task vectors, 8 tasks × 2 batches of inputs, and two layer-wise AdaMerging steps under
    ``autocast``'s autocast ("cpu" on fake tensors: ``cuda_autocast_policy`` gives it CUDA's dtypes)."""
    taus = [{k: torch.randn_like(v) for k, v in pretrained.items()} for _ in heads]
    data = {t: [{input_name: torch.randn(batch, 3, image, image)} for _ in range(2)] for t in range(len(heads))}
    with torch.autocast(autocast, dtype=BF16):
        merging.adamerge(model, pretrained, taus, heads, lambda step: data, steps=2, per_batch_backward=per_batch_backward)
    return taus


def adamw_steps(model: nn.Module, logits, batch: dict, part: int | None, max_norm: float | None, steps: int = 2,
                autocast: str = "cpu", **adamw):
    """``steps`` AdamW steps (``adamw``: its settings) of ``model``'s trainable parameters on one
    ``batch`` (with "labels"), cross-entropy of ``logits(chunk)`` under bf16 autocast, in parts of
    ``part`` examples (None: whole), the gradient norm clipped to ``max_norm`` (None: not), as
    ``training.finetune`` does."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, **adamw)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        for chunk, weight in micro_batches(batch, part):
            with torch.autocast(autocast, dtype=BF16):
                loss = F.cross_entropy(logits(chunk), chunk["labels"]) * weight
            loss.backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        optimizer.step()


def finetune_steps(model: nn.Module, head: nn.Module, batch: int, image: int, part: int | None, clip: bool = True,
                   steps: int = 2, autocast: str = "cpu"):
    """``steps`` AdamW steps of CLIP_RECIPE on one batch of images, in parts of ``part`` images (None:
    whole), the gradient clipped (``clip``; bench_gpu_paper's step does not clip)."""
    images = {"x": torch.randn(batch, 3, image, image), "labels": torch.randint(0, head.out_features, (batch,))}
    model.train()
    adamw_steps(model, lambda chunk: head(model(chunk["x"])), images, part,
                CLIP_RECIPE.max_grad_norm if clip else None, steps, autocast,
                lr=CLIP_RECIPE.lr, weight_decay=CLIP_RECIPE.weight_decay)


def frozen_heads(width: int, tasks: int) -> list[nn.Module]:
    return [nn.Linear(width, c).requires_grad_(False) for c in CLASSES[:tasks]]


def validation_rows(args) -> list[dict]:
    """Each peak bench_gpu_paper measured, predicted by running its step on fake tensors."""
    costs = pd.read_csv(MEASURED / "gpu_unit_costs.csv", index_col=0)
    fs_merge = pd.read_csv(MEASURED / "fs_merge_step.csv", index_col="micro_batches")
    rows = []
    for spec in args.towers:
        def adamerging(per_batch: bool):
            model, pretrained, heads, batch = adamerging_setup(spec, args, None)
            adamerging_run(model, pretrained, heads, batch, args.image, per_batch)

        def finetuning():  # after the AdaMerging rows: θ0's clone and the τ's were still alive
            model, pretrained, heads, _ = adamerging_setup(spec, args, None)
            taus = [{k: torch.randn_like(v) for k, v in pretrained.items()} for _ in heads]  # noqa: F841
            finetune_steps(model, heads[0], args.finetune_batch, args.image, part=None, clip=False)

        for step, row_name, fn in [("AdaMerging step, one backward", "AdaMerging peak (GiB)", lambda: adamerging(False)),
                                   ("AdaMerging step, per-batch backward", "per-batch backward: peak (GiB)",
                                    lambda: adamerging(True)),
                                   (f"fine-tuning step, batch {args.finetune_batch}", "fine-tuning peak (GiB)", finetuning)]:
            if spec.endswith(":8") and step.startswith("fine-tuning"):
                continue  # the same fine-tuning as the tower's own column
            measured = costs.at[row_name, spec] if row_name in costs.index and spec in costs.columns else float("nan")
            rows.append(predicted_row(f"{spec} (lib.archs.ViT)", step, fn, measured))
    tower_name = "tiny" if args.tiny else "ViT-B-16"
    for chunks in (1, 8):
        def fs_merge_step(chunks=chunks):
            feature_matching_step(lambda towers: build_supernet(towers, rank=12, init="first"),
                                  [tower({**TOWERS, **TINY}[tower_name], args.image, None) for _ in range(2)],
                                  args.finetune_batch, args.image, chunks)

        measured = fs_merge.at[chunks, "peak (GiB)"] if chunks in fs_merge.index and not args.tiny else float("nan")
        rows.append(predicted_row(f"2 × {tower_name} (lib.archs.ViT)", f"FS-Merge step, micro_batches {chunks}",
                                  fs_merge_step, measured))
    return rows


def measured_cuda_peak(fn) -> int:
    """``torch.cuda.max_memory_allocated`` over ``fn()``, run with CUDA as the default device, less
    what was allocated before it."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.device("cuda"):
        fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def predicted_row(model: str, step: str, fn, measured_gib: float = float("nan"), peak=predicted_cuda_peak) -> dict:
    started = time.perf_counter()
    predicted = peak(fn) / GIB
    row = {"model": model, "step": step, "predicted peak (GiB)": predicted, "measured on H200 (GiB)": measured_gib,
           "predicted / measured": predicted / measured_gib, "fits 24 GB": "yes" if predicted <= CARD_24GB else "no"}
    print(f"{model:32s} {step:40s} {predicted:7.2f} GiB  ({time.perf_counter() - started:.0f} s)", flush=True)
    return row


# ---------------------------------------------------------------------- the notebooks' own steps


def open_clip_tower(arch: str, tiny: bool) -> nn.Module:
    """open_clip's image tower of ``arch`` (random weights; QuickGELU as OpenAI's tag needs)."""
    import open_clip
    from lib.paper.clip import CLIPImageEncoder

    if tiny:
        vision = {"image_size": 64, "layers": 2, "width": 64, "patch_size": 32, "head_width": 16}
        model = open_clip.model.CLIP(embed_dim=32, vision_cfg=vision, text_cfg={"layers": 1, "width": 32, "heads": 2},
                                     quick_gelu=True)
    else:
        config = open_clip.get_model_config(arch)
        model = open_clip.model.CLIP(**{**config, "quick_gelu": True})
    return CLIPImageEncoder(model.visual)


def roberta_classifier(tiny: bool) -> Classifier:
    """Notebook 04's model at paper scale: RoBERTa-base (random weights; eager attention, as
    ``glue.load_roberta`` loads it) read at ``<s>``, with a trainable two-class dense-tanh-out_proj
    head (the whole model is trained and merged there)."""
    from transformers import RobertaConfig

    from lib.paper import glue

    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64) if tiny else {}
    config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                           bos_token_id=0, eos_token_id=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                           **shape)  # roberta-base's shape where not tiny; dropout 0 as SentimentRecipe trains
    encoder, _ = glue.load_roberta(config=config)
    head = glue.classification_head_module(glue.initial_head(encoder.feature_dim, 2, seed=0), dropout=0.0)
    return Classifier(encoder, head.requires_grad_(True))


def roberta_fisher(tiny: bool, batch: dict, label_mode: str, method: str, chunk_size) -> None:
    """Notebook 04's Fisher of one batch (float32), its embedding sums at their largest
    (``embedding_sums_at_their_largest``: every token of the batch distinct)."""
    with embedding_sums_at_their_largest():
        statistics.diagonal_fisher(roberta_classifier(tiny), [batch], label_mode=label_mode, method=method,
                                   chunk_size=chunk_size, disable=True)


def token_batch(batch: int, tokens: int, vocab: int = 50265) -> dict:
    return {"input_ids": torch.randint(3, vocab, (batch, tokens)), "attention_mask": torch.ones(batch, tokens,
            dtype=torch.long), "labels": torch.randint(0, 2, (batch,))}


def text_finetune_steps(model: Classifier, batch: dict, recipe, autocast: str, steps: int = 2):
    """``steps`` steps of notebook 04's ``recipe`` (``SentimentRecipe``: AdamW, gradient norm
    clipped) on one batch of tokens, its forward under bf16 autocast."""
    adamw_steps(model, lambda chunk: model(input_ids=chunk["input_ids"], attention_mask=chunk["attention_mask"]),
                batch, None, recipe.max_grad_norm, steps, autocast, lr=recipe.lr, weight_decay=recipe.weight_decay,
                betas=recipe.adam_betas, eps=recipe.adam_epsilon)


def feature_matching_step(build, towers: list[nn.Module], batch: int, image: int, chunks: int):
    """One bf16 step of ``train_supernet`` on ``build(towers)`` (FS-Merge's SuperNet, or notebook
    03's distillation baseline with the same loss and schedule) on ``batch`` images per task, its
    backward in ``chunks`` parts (``fs_micro_batches``)."""
    loaders = [[torch.randn(batch, 3, image, image)] for _ in towers]
    train_supernet(build(towers), loaders, steps=1, progress=False, autocast=BF16, micro_batches=chunks)


def stacked_exclusive(shared: dict, tasks: int, rank_ratio: float):
    """What notebook 05 puts on the device beside θ_shared: ``twin_merging.stack`` of ``tasks``
    exclusive parts as ``compress`` shapes them (U·S and Vᵀ at rank ``rank_for`` for every tensor
    of two or more dimensions, dense differences for the rest; the tower's output projection at
    rank 0, shared as it is by the published experts), built stacked: the per-task parts stay on
    the CPU there."""
    from lib.merging import twin_merging as tw

    factors, dense = {}, {}
    for k, v in shared.items():
        if not v.is_floating_point():
            continue
        if v.dim() >= 2:
            rank = 0 if k.split(".")[-1] == "proj" else tw.rank_for(v.shape, rank_ratio)
            if rank:
                columns = tasks * rank
                factors[k] = (torch.randn(v.shape[0], columns), torch.randn(columns, v[0].numel()),
                              torch.arange(tasks).repeat_interleave(rank))
        else:
            dense[k] = torch.randn(tasks, *v.shape)
    return tw.Stacked(factors, dense, tasks)


def twin_low_rank_inference(arch: str, tiny: bool, batch: int, tasks: int) -> None:
    """Notebook 05's evaluation of θ(x) (``low_rank_predictions``): the exact low-rank path over a
    batch of images, float32, no autocast, with the encoder, θ_shared and the stacked exclusive
    parts on the device."""
    from lib.merging import twin_merging as tw

    encoder = open_clip_tower(arch, tiny).eval()
    shared = {k: v.detach().clone() for k, v in encoder.state_dict().items()}  # to_device(base): its own copy
    stacked = stacked_exclusive(shared, tasks, tw.RANK_RATIO)
    size = encoder.image_size
    with torch.no_grad():
        tw.low_rank_forward(encoder, shared, stacked, torch.softmax(torch.randn(batch, tasks), 1),
                            {"pixel_values": torch.randn(batch, 3, size, size)})


def notebook_rows(args, peak=predicted_cuda_peak) -> list[dict]:
    """The notebooks' steps, predicted on fake tensors (``peak``), or measured on CUDA
    (``measured_cuda_peak``, with CUDA autocast)."""
    autocast = "cuda" if peak is measured_cuda_peak else "cpu"
    row = lambda model, step, fn: predicted_row(model, step, fn, peak=peak)  # noqa: E731
    rows = []
    for arch in (["tiny"] if args.tiny else list(TOWERS)):
        def adamerging(per_batch: bool, arch=arch):  # notebook 02: _run_adamerging's tensors on the device
            encoder = open_clip_tower(arch, args.tiny).eval()
            pretrained = {k: v.detach() for k, v in encoder.state_dict().items()}  # theta0_sharing_encoder: no copy
            heads = frozen_heads(encoder.feature_dim, args.tasks)
            adamerging_run(encoder, pretrained, heads, args.adamerging_batch, encoder.image_size, per_batch,
                           input_name="pixel_values", autocast=autocast)

        def finetuning(part, arch=arch):
            encoder = open_clip_tower(arch, args.tiny)
            head = frozen_heads(encoder.feature_dim, 1)[0]
            finetune_steps(encoder, head, args.finetune_batch, encoder.image_size, part, autocast=autocast)

        def fisher(chunk, arch=arch):  # notebook 01's statistics: float32, per-example gradients by vmap
            encoder = open_clip_tower(arch, args.tiny)
            classifier = Classifier(encoder, frozen_heads(encoder.feature_dim, 1)[0].requires_grad_(True))
            size = encoder.image_size
            batch = {"pixel_values": torch.randn(args.fisher_batch, 3, size, size),
                     "labels": torch.randint(0, CLASSES[0], (args.fisher_batch,))}
            statistics.diagonal_fisher(classifier, [batch], label_mode="sample", method="vmap", chunk_size=chunk,
                                       disable=True)

        model = f"{arch} (open_clip)"
        rows.append(row(model, "AdaMerging step, per-batch backward (default)", lambda: adamerging(True)))
        rows.append(row(model, "AdaMerging step, one backward", lambda: adamerging(False)))
        chunk = CLIP_FISHER_CHUNK.get(arch, 16)
        rows.append(row(model, f"Fisher, batch {args.fisher_batch}, vmap chunks of {chunk} (default)",
                                  lambda: fisher(chunk)))
        if chunk != 16:
            rows.append(row(model, f"Fisher, batch {args.fisher_batch}, vmap chunks of 16", lambda: fisher(16)))
        part = CLIP_MICRO_BATCH.get(arch)
        if part:
            rows.append(row(model, f"fine-tuning step, batch {args.finetune_batch} in parts of {part} (default)",
                                      lambda: finetuning(part)))
        rows.append(row(model, f"fine-tuning step, batch {args.finetune_batch}" + ("" if part else " (default)"),
                                  lambda: finetuning(None)))
        rows.append(row(model, f"Twin-Merging low-rank inference, batch {args.twin_batch}, {args.tasks} tasks (default)",
                        lambda arch=arch: twin_low_rank_inference(arch, args.tiny, args.twin_batch, args.tasks)))
    rows += other_notebook_rows(args, row, autocast)
    return rows


def other_notebook_rows(args, row, autocast: str) -> list[dict]:
    """Notebook 03's distillation baseline (2 × ViT-B-16, lib.archs.ViT as FS-Merge runs them;
    its FS-Merge step is among the validation rows) and notebook 04's RoBERTa-base steps."""
    from lib.experiments.fs_merge import PAPER_SCALE as FS_PAPER
    from lib.experiments.gradient_matching import (FISHER_CHUNK, FISHER_LABELS, FISHER_METHOD, PAPER_RECIPE,
                                                   GradientMatchingConfig)

    rows = []
    name = "tiny" if args.tiny else "ViT-B-16"
    chunks, fs_batch = FS_PAPER["fs_micro_batches"], args.finetune_batch if args.tiny else FS_PAPER["fs_batch_size"]
    for parts, label in ((chunks, f"in {chunks} chunks (default)"), (1, "one backward")):
        rows.append(row(f"2 × {name} (lib.archs.ViT)", f"distillation step, batch {fs_batch} per task {label}",
                        lambda parts=parts: feature_matching_step(
                            lambda towers: Distillation(towers, rank=12, seed=0),
                            [tower({**TOWERS, **TINY}[name], args.image, None) for _ in range(2)], fs_batch,
                            args.image, parts)))
    tokens, train_batch = (16, 2) if args.tiny else (PAPER_RECIPE.max_length, PAPER_RECIPE.batch_size)
    fisher_batch = 2 if args.tiny else GradientMatchingConfig.fisher_batch_size
    model = "RoBERTa-base (transformers)" if not args.tiny else "tiny RoBERTa (transformers)"
    rows.append(row(model, f"fine-tuning step, batch {train_batch} × {tokens} tokens (default)",
                    lambda: text_finetune_steps(roberta_classifier(args.tiny), token_batch(train_batch, tokens),
                                                PAPER_RECIPE, autocast)))
    rows.append(row(model, f"Fisher, batch {fisher_batch} × {tokens} tokens, per-example gradients by hooks (default)",
                    lambda: roberta_fisher(args.tiny, token_batch(fisher_batch, tokens), FISHER_LABELS, FISHER_METHOD,
                                           FISHER_CHUNK)))
    return rows


def measure_notebook_steps(args) -> pd.DataFrame:
    """On a CUDA machine: the notebooks' steps measured, beside the predictions committed in
    figures/bench_gpu_memory/notebook_steps.csv (read as data: predicting takes minutes of CPU)."""
    where = torch.cuda.get_device_name(0)
    run = None if args.no_record else Run("bench_gpu_memory_measured", dict(vars(args)),
                                          out_dir=args.out or ROOT / "figures" / "bench_gpu_memory_measured",
                                          source="benchmarks/bench_gpu_memory.py")
    print(f"{where}; torch {torch.__version__}; measuring the notebooks' steps", flush=True)
    measured = pd.DataFrame(notebook_rows(args, peak=measured_cuda_peak))
    measured = measured.rename(columns={"predicted peak (GiB)": f"measured on {where} (GiB)"})
    predicted = pd.read_csv(ROOT / "figures" / "bench_gpu_memory" / "notebook_steps.csv")
    table = measured[["model", "step", f"measured on {where} (GiB)"]].merge(
        predicted[["model", "step", "predicted peak (GiB)"]], on=["model", "step"], how="left")
    table["predicted / measured"] = table["predicted peak (GiB)"] / table[f"measured on {where} (GiB)"]
    table["fits 24 GB"] = ["yes" if v <= CARD_24GB else "no" for v in table[f"measured on {where} (GiB)"]]
    print(table.to_string(float_format=lambda v: f"{v:.2f}"))
    if run is not None:
        shown = table.set_index("model")
        shown["predicted / measured"] = [f"{v:.2f}" for v in shown["predicted / measured"]]
        run.table(shown, "notebook_steps_measured",
                  f"The paper-scale notebooks' steps on open_clip's image towers (random weights), measured on {where} "
                  "(torch.cuda.max_memory_allocated), beside the prediction on a CPU (figures/bench_gpu_memory/"
                  "notebook_steps.md); the same code, bf16 CUDA autocast.")
        run.finish()
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--towers", nargs="+", default=[*TOWERS, "ViT-L-14:8"],
                        help="bench_gpu_paper's columns to check (NAME:B: AdaMerging on batches of B images)")
    parser.add_argument("--tiny", action="store_true", help="2-block towers, 2 tasks: tests the script")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--adamerging-batch", type=int, default=16)
    parser.add_argument("--finetune-batch", type=int, default=128)
    parser.add_argument("--fisher-batch", type=int, default=16, help="notebook 01's fisher_batch_size")
    parser.add_argument("--twin-batch", type=int, default=128, help="notebook 05's evaluation batch (low_rank_predictions)")
    parser.add_argument("--out", help="output folder (default figures/bench_gpu_memory)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    if args.tiny:
        args.towers, args.image, args.adamerging_batch, args.finetune_batch, args.fisher_batch = ["tiny", "tiny:1"], 64, 2, 4, 4
        args.twin_batch, args.tasks = 4, 2  # 2 tasks: every fake-tensor op costs ~0.2 ms to dispatch
    if torch.cuda.is_available():
        return measure_notebook_steps(args)
    run = None if args.no_record else Run("bench_gpu_memory", dict(vars(args)), out_dir=args.out,
                                          source="benchmarks/bench_gpu_memory.py")
    print(f"torch {torch.__version__}; predicting CUDA peaks on fake tensors", flush=True)
    validation = pd.DataFrame(validation_rows(args))
    notebooks = pd.DataFrame(notebook_rows(args))
    notebooks = notebooks.drop(columns=["measured on H200 (GiB)", "predicted / measured"])  # none measured yet
    print(validation.to_string(float_format=lambda v: f"{v:.2f}"))
    print(notebooks.to_string(float_format=lambda v: f"{v:.2f}"))
    if run is not None:
        shown = validation.set_index("model")
        shown["predicted / measured"] = [f"{v:.2f}" if v == v else "not measured" for v in shown["predicted / measured"]]
        run.table(shown, "predicted_vs_measured",
                  "GPU memory predicted on a CPU (fake tensors, live tensor bytes, CUDA autocast's float32 layer "
                  "norm and softmax; lib.experiments.gpu_memory) against torch.cuda.max_memory_allocated on an "
                  "H200 (make bench-gpu-paper, figures/bench_gpu_paper/), for the same steps with the same tensors "
                  "alive. bf16 autocast; AdaMerging: layer-wise, 8 tasks × 2 batches; fine-tuning: AdamW.")
        run.table(notebooks.set_index("model"), "notebook_steps",
                  "Predicted GPU memory of the paper-scale notebooks' steps at their defaults: notebooks 01, 02 and "
                  f"05 on open_clip's image towers (bf16 autocast; AdaMerging 8 tasks × 2 × {args.adamerging_batch} "
                  "images with θ0, 8 task vectors and 8 heads on the device; Fisher: float32, vmap over a batch of "
                  f"{args.fisher_batch}; fine-tuning CLIP_RECIPE at batch {args.finetune_batch}), notebook 03's "
                  "distillation baseline (bf16 autocast) and notebook 04's RoBERTa-base (fine-tuning under bf16 "
                  f"autocast, Fisher in float32). 'fits 24 GB': at most {CARD_24GB:g} GiB of tensors.")
        run.finish()
    return validation, notebooks


if __name__ == "__main__":
    main()
