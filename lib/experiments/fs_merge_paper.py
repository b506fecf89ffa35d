"""FS-Merge at paper scale (issue 12; METHODS.md §4, §6, §8): the experiment of Kinderman et al.
(2024) on CLIP ViT-B-16, run by the same notebook code as the small scale
(``notebooks/03_fs_merge.ipynb`` with ``scale="paper"``; ``FSStudyConfig``'s ``PAPER_SCALE``).

    config = FSStudyConfig(scale="paper", data_dir=..., models_dir=...)
    study = fs_study(config)                       # a PaperFSStudy
    main = pd.DataFrame(study.main_comparison())   # the same methods, tables and verdicts

What changes, and why:

- **Experts from different initialisations.** Each task's expert is CLIP's image tower of
  ``paper_arch`` (open_clip), fine-tuned from the pretrained tag ``paper_pretrained`` gives that
  task, with that model's own frozen zero-shot head from its own text tower (class names ×
  templates of ``data/clip_tasks.yaml``). The authors fine-tuned from ``openai`` (Stanford Cars) and from
  pretrainings of their own (``our_dist*``), which are not public; different public open_clip
  pretrainings are our substitute. A setting's experts must share the MLP nonlinearity (the
  SuperNet, like every merge, runs one in the merged width): the default tags are the QuickGELU
  ones (``openai``, ``metaclip_400m``, ``metaclip_fullcc``, ``dfn2b``).
- **Fine-tuning** is notebook 01's paper-scale path (``lib.experiments.training.finetune`` on a
  ``ClipVisionTrack`` of that tag): METHODS.md §8's recipe, ``CLIP_RECIPE`` (AdamW, lr 1e-5,
  weight decay 0.1, batch 128, 500 warm-up steps then cosine, head frozen), ``paper_expert_steps``
  steps (2,000), the best validation checkpoint kept; cached under ``.cache/experts/vision``.
  The authors used the same recipe family (lr 1e-5, cosine, per-dataset epochs at batch 32 per GPU).
- **Same-initialisation control**: every expert from ``paper_control_pretrained`` (``openai``),
  fine-tuned here with the same recipe, or (``paper_control_experts="published"``) FusionBench's
  published experts ``tanganke/clip-vit-base-patch16_<task>`` (``lib.paper.clip.load_expert``). With
  the default tags model 1 of the first pair (Cars, ``openai``) is the same expert in both settings.
- Every expert is converted to the project's ViT (``lib.archs.ViT.from_open_clip``: ln_pre,
  proj and QuickGELU included; tested to preserve outputs), so ``lib.fs_merge`` and every merge
  of the small study run on it unchanged. Task t is read by expert t's zero-shot head
  (``lib.heads.TaskHead``: features L2-normalised first) after the merge's output map.
- **Data**: the eight tasks of ``lib.paper.vision_data`` (canonical splits; experts train on
  train minus a seeded 10% validation split). Images go through CLIP's evaluation transform
  (bicubic resize, centre crop 224, OpenAI's mean and std) for every expert, whatever its tag.
  Test sets are decoded once and kept as uint8 (3·224² bytes an image; the default pairs' full
  test sets are about 3.7 GB). The unlabeled pool of a task is the first ``num_images`` of a
  seeded permutation of its training split (nested across sizes) plus ``augment`` augmented copies
  of each (``lib.fs_merge.augmented_pool``: random crop with reflect padding of 1/8 of the side,
  28 px at 224 as 4 px at the small scale's 32, flip, one of grayscale / solarize / 3×3 blur),
  normalised and kept in float32 (900 images: 0.54 GB a task).
- **Compute**: experts, merges and evaluation on ``device`` ("auto": CUDA when there is one);
  forward passes under ``autocast`` (bf16 on CUDA); FS-Merge and distillation train under it too.
  Closed-form merges and RegMean's solve run in float32 (RegMean's and Git Re-Basin's on the CPU).
  The cost table's memory column is the device's peak allocated memory during the merge on CUDA.
- **Not run at paper scale** (stated in the findings): the MLP settings and the four-model MLP
  merge (the paper's MLP experiments are another benchmark), and ZipIt! (this project's
  implementation merges MLPs only; the paper compares with it on ViT).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..archs import ViT
from ..fs_merge import augmented_pool
from ..heads import head_module
from .cost import measured_call
from .fs_merge import (AVERAGE, MODEL_1, REBASIN, SLERP, Expert, FSStudy, FSStudyConfig, Setting, _frozen, expert_seed,
                       merge)
from .paper_tracks import CLIP_RECIPE, ClipVisionTrack, autocast_dtype, run_device
from .training import finetune

EVAL_BATCH = 256
ON_THE_CPU = (REBASIN,)  # weight matching runs on the CPU (SciPy's assignment): merged there, moved back


# ----------------------------------------------------------------------------------- tracks


@dataclass
class PretrainedClipTrack(ClipVisionTrack):
    """``ClipVisionTrack`` of any open_clip pretrained tag (θ0, zero-shot heads and cache keys of
    that tag); the ``openai`` track is notebook 01's."""

    pretrained: str = "openai"

    def backbone_id(self) -> str:
        return f"open_clip {self.arch} {self.pretrained}"

    def _bundle(self):
        if "bundle" not in self._cache:
            from ..paper.clip import load_clip

            self._cache["bundle"] = load_clip(self.arch, self.pretrained, models_dir=self.models_dir)
        return self._cache["bundle"]


def expert_recipe(config: FSStudyConfig):
    """The experts' fine-tuning settings: CLIP_RECIPE with the config's steps, batch, lr and decay."""
    return replace(CLIP_RECIPE, max_steps=config.paper_expert_steps, batch_size=config.expert_batch_size,
                   lr=config.expert_lr, weight_decay=config.expert_weight_decay, seed=config.seed,
                   warmup_steps=min(CLIP_RECIPE.warmup_steps, config.paper_expert_steps),
                   eval_every=min(CLIP_RECIPE.eval_every, config.paper_expert_steps))


def clip_vit(encoder: nn.Module, head: dict[str, torch.Tensor]) -> ViT:
    """A CLIP image encoder (``lib.paper.clip.CLIPImageEncoder``) as the project's ViT, with
    ``head`` (a zero-shot head state) as its frozen head."""
    model = ViT.from_open_clip(encoder.visual, num_classes=head["weight"].shape[0])
    model.head = head_module(head)
    return model


# ------------------------------------------------------------------------------------- data


def clip_normalise(unit: torch.Tensor) -> torch.Tensor:
    """[0, 1] images → CLIP's input normalisation (OpenAI's mean and std, as ``clip_transform``)."""
    import open_clip

    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN, device=unit.device).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD, device=unit.device).view(1, 3, 1, 1)
    return (unit - mean) / std


class ClipImages:
    """Images kept as uint8 [N, 3, S, S] (CLIP's resize and crop done), normalised per batch:
    ``images[i:j]`` is the float batch a model reads, on the CPU; ``batch(i, j, device)``
    normalises on ``device``."""

    def __init__(self, pixels: torch.Tensor):
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.pixels)

    def batch(self, start: int, stop: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return clip_normalise(self.pixels[start:stop].to(device).float() / 255)

    def __getitem__(self, index: slice) -> torch.Tensor:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("ClipImages supports contiguous slices only")
        start, stop, _ = index.indices(len(self))
        return self.batch(start, stop)


def unit_transform(image_size: int):
    """CLIP's evaluation transform without its final normalisation: tensors in [0, 1]."""
    from torchvision import transforms

    from ..paper.vision_data import clip_transform

    steps = clip_transform(image_size).transforms
    if not isinstance(steps[-1], transforms.Normalize):
        raise RuntimeError("open_clip's transform no longer ends with Normalize; update unit_transform")
    return transforms.Compose(steps[:-1])


def decode(records, indices, image_size: int, workers: int, chunk: int = 512) -> torch.Tensor:
    """The images at ``indices`` of ``records`` after CLIP's resize and crop, as uint8 [n, 3, S, S]."""
    transform = unit_transform(image_size)
    indices = np.asarray(indices, dtype=np.int64)
    out = torch.empty(len(indices), 3, image_size, image_size, dtype=torch.uint8)
    for i in range(0, len(indices), chunk):
        unit = records.pixels(indices[i : i + chunk], transform, workers)
        out[i : i + chunk] = (unit * 255).round().clamp(0, 255).to(torch.uint8)
    return out


@dataclass(eq=False)
class PaperTaskData:
    """One paper task as the study reads it (the fields of ``fs_merge.TaskData`` it uses)."""

    name: str
    num_classes: int
    train: object  # ImageRecords: the experts' training split, where unlabeled pools come from
    test_x: ClipImages
    test_y: torch.Tensor
    fingerprint: str
    notes: tuple = ()

    @property
    def chance(self) -> float:
        return 100.0 / self.num_classes


# ------------------------------------------------------------------------------------ study


class PaperFSStudy(FSStudy):
    """:class:`~lib.experiments.fs_merge.FSStudy` on CLIP experts from different pretrainings
    (module docstring); every experiment, table and verdict is the small study's."""

    scale_label = "paper scale"

    def __init__(self, config: FSStudyConfig):
        if config.scale != "paper":
            raise ValueError("PaperFSStudy runs scale='paper' configs")
        super().__init__(config)
        self.device = run_device(config.device)
        self.dtype = autocast_dtype(config.autocast, self.device)
        self._tracks: dict[str, PretrainedClipTrack] = {}
        self.init_labels = {"different": "different pretrainings (open_clip tags)",
                            "same": f"one pretraining ({config.paper_control_pretrained})"}

    # -- tracks and data
    def study_tasks(self) -> list[str]:
        c = self.config
        return list(dict.fromkeys(t for pair in c.vit_pairs for t in pair))

    def track(self, pretrained: str) -> PretrainedClipTrack:
        """The track of one pretrained tag (θ0, heads, fine-tuning); all share the loaded datasets."""
        if pretrained not in self._tracks:
            c = self.config
            track = PretrainedClipTrack(self.study_tasks(), data_dir=c.data_dir or None, seed=c.seed, arch=c.paper_arch,
                                        models_dir=c.models_dir or None, experts="finetune", device=c.device,
                                        autocast=c.autocast, pretrained=pretrained)
            if self._tracks:  # the datasets are read once, whatever the tag
                first = next(iter(self._tracks.values()))
                track._cache.update({k: v for k, v in first._cache.items() if isinstance(k, tuple) and k[0] == "raw"})
            self._tracks[pretrained] = track
        return self._tracks[pretrained]

    def data_track(self) -> PretrainedClipTrack:
        return self.track(self.config.paper_control_pretrained)

    def image_size(self) -> int:
        """θ0's input size (224 for ViT-B-16): every expert's images are resized and cropped to it."""
        if not hasattr(self, "_image_size"):
            self._image_size = self.data_track().pretrained_encoder().image_size
        return self._image_size

    def task(self, name: str) -> PaperTaskData:
        if name not in self._tasks:
            track, c = self.data_track(), self.config
            raw = track.raw(name)
            test = raw.test
            if c.test_per_task is not None and c.test_per_task < len(test):
                from .tracks import stratified_indices

                test = test.take(stratified_indices(test.labels, c.test_per_task, c.seed))
            pixels = decode(test, np.arange(len(test)), self.image_size(), track.decode_workers)
            self._tasks[name] = PaperTaskData(name, len(raw.classes), raw.train, ClipImages(pixels),
                                              torch.as_tensor(test.labels), track.fingerprint(name), tuple(raw.notes))
        return self._tasks[name]

    def pool(self, task: str, num_images: int, augment: int) -> torch.Tensor:
        key = (task, num_images, augment)
        if key not in self._pools:
            data, c = self.task(task), self.config
            order = np.random.default_rng(expert_seed(c.seed, "pool order", task)).permutation(len(data.train))
            size = self.image_size()
            originals = decode(data.train, np.sort(order[:num_images]), size, self.data_track().decode_workers)
            unit = augmented_pool(originals.float() / 255, num_images * augment,
                                  seed=expert_seed(c.seed, "augment", task, num_images), padding=max(1, size // 8))
            self._pools[key] = clip_normalise(unit)
        return self._pools[key]

    # -- experts
    def pretrained_of(self, task: str, init: str) -> str:
        if init == "same":
            return self.config.paper_control_pretrained
        tags = self.config.pretrained_of
        if task not in tags:
            raise ValueError(f"paper_pretrained gives no open_clip tag for {task!r}: add [\"{task}\", \"<tag>\"] "
                             f"(it has {sorted(tags)}).")
        return tags[task]

    def clip_expert(self, task: str, pretrained: str, source: str = "finetune") -> Expert:
        """The expert of ``task`` from ``pretrained``: fine-tuned here with the recipe (cached), or
        the published one; as a frozen ViT with its tag's zero-shot head, on the run's device."""
        key = ("vit", task, pretrained, source)
        if key in self._experts:
            return self._experts[key]
        track, c = self.track(pretrained), self.config
        heads = track.zero_shot_heads()
        started = time.perf_counter()
        encoder = track.pretrained_encoder()
        if source == "published":
            from ..paper.clip import expert_repo, load_expert

            encoder = load_expert(c.paper_arch, task, encoder, models_dir=c.models_dir or None)
            info = {"source": expert_repo(c.paper_arch, task), "cached": True}
        else:
            trained = finetune(track, [task], heads, expert_recipe(c), self.progress)
            encoder.load_state_dict(trained.encoder)
            info = {**trained.info, "source": f"fine-tuned from open_clip {c.paper_arch} {pretrained}"}
            # finetune loads a cached expert rather than training: far faster than its recorded training
            elapsed = time.perf_counter() - started
            info["cached"] = elapsed < 0.5 * float(trained.info.get("seconds", 0.0))
            if not info["cached"]:
                self.expert_seconds += elapsed
        model = _frozen(clip_vit(encoder, heads[task]).to(self.device))
        info["pretrained"] = pretrained
        expert = Expert("vit", task, model, info)
        self._experts[key] = expert
        return expert

    def setting(self, arch: str, tasks: Sequence[str], init: str = "different") -> Setting:
        if arch != "vit":
            raise ValueError(f"arch = {arch!r}: the paper scale merges CLIP ViTs only")
        if init not in ("different", "same"):
            raise ValueError(f"unknown init setting {init!r}")
        key = (arch, tuple(tasks), init)
        if key not in self._settings:
            tags = [self.pretrained_of(t, init) for t in tasks]
            if init == "different" and len(set(tags)) < len(tags):
                raise ValueError(f"{' + '.join(tasks)}: the different-init setting needs a different pretrained tag per "
                                 f"task, paper_pretrained gives {tags}.")
            source = self.config.paper_control_experts if init == "same" else "finetune"
            experts = [self.clip_expert(t, tag, source) for t, tag in zip(tasks, tags)]
            activations = {e.model.activation for e in experts}
            if len(activations) > 1:
                raise ValueError(f"{' + '.join(tasks)}: the experts' pretrainings {tags} use different MLP nonlinearities "
                                 f"({sorted(activations)}); a merge (and FS-Merge's SuperNet) runs one. Choose tags of one "
                                 "kind (QuickGELU: openai, metaclip_400m, metaclip_fullcc, dfn2b; GELU: laion400m_e32, "
                                 "laion2b_s34b_b88k, datacomp_xl_s13b_b90k, ...).")
            self._settings[key] = Setting(arch, tuple(tasks), init, experts)
        return self._settings[key]

    # -- merging and evaluation on the device
    @torch.no_grad()
    def correct(self, logits: Callable[[torch.Tensor], torch.Tensor], task: str) -> np.ndarray:
        data = self.task(task)
        out = []
        for start in range(0, len(data.test_y), EVAL_BATCH):
            x = data.test_x.batch(start, start + EVAL_BATCH, self.device)
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                predicted = logits(x).float().argmax(-1).cpu()
            out.append((predicted == data.test_y[start : start + EVAL_BATCH]).numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=bool)

    def merge(self, method: str, models: Sequence[nn.Module], pools, **options):
        """One merge on the device (Git Re-Basin on CPU copies, moved back), timed; on CUDA the
        memory is the device's peak allocation during the merge."""
        cuda = self.device.type == "cuda"

        def call():
            if method in ON_THE_CPU:
                model, maps, info = merge(method, [copy.deepcopy(m).cpu() for m in models], pools, self.config,
                                          progress=self.progress, **options)
                return model.to(self.device), maps.to(self.device), info
            return merge(method, models, pools, self.config, progress=self.progress, **options)

        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        result, seconds, peak = measured_call(call)
        if cuda:
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        return result, seconds, peak

    # -- what the notebook says
    @property
    def cost_title(self) -> str:
        return f"Cost of each merge (paper scale, {self.device.type.upper() if self.device.type == 'cuda' else 'CPU'})"

    @property
    def memory_label(self) -> str:
        return ("peak GPU memory above the experts, MiB (log)" if self.device.type == "cuda"
                else "peak memory growth, MiB (log)")

    def experts_caption(self) -> str:
        c = self.config
        return (f"Experts (paper scale): CLIP {c.paper_arch} image towers, each fine-tuned from its own open_clip "
                f"pretraining ({c.paper_expert_steps} steps, batch {c.expert_batch_size}, lr {c.expert_lr:g}, cosine; "
                "zero-shot head of its own text tower, frozen), the same-init control's from "
                f"{c.paper_control_pretrained} ({c.paper_control_experts}). Test accuracy % on the full test sets.")

    def main_caption(self) -> str:
        c = self.config
        return (f"**Paper scale** (CLIP {c.paper_arch}, experts from different open_clip pretrainings: our substitute for "
                "the authors' private ones). Average accuracy % ± its standard error, normalized and retained scores, "
                f"accuracy per task. Data-driven methods: {c.num_images} unlabeled images per task + {c.augment} augmented "
                f"copies each. FS-Merge / distillation: {self.budget_text()}.")

    def sweep_caption(self) -> str:
        c = self.config
        same = (f"{c.fs_epochs} epochs for every n (more data, more steps)" if c.fs_epochs > 0
                else "the same number of training steps for every n")
        return (f"**Paper scale.** Average accuracy % vs unlabeled original images per task (+ {c.augment} augmented "
                f"copies each, or originals only); {same}.")

    def control_caption(self) -> str:
        c = self.config
        return (f"**Paper scale.** The same pair merged from experts of different open_clip pretrainings and from experts "
                f"of one ({c.paper_control_pretrained}, {c.paper_control_experts}).")

    def cost_caption(self) -> str:
        where = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                 else f"{torch.get_num_threads()} CPU thread(s)")
        memory = ("peak GPU memory allocated during the merge above the experts" if self.device.type == "cuda"
                  else "peak resident memory growth")
        return (f"**Paper scale, {where}** (autocast {self.dtype or 'off'}). Merge wall time, {memory} and parameters; "
                "one run each (no uncertainty).")

    def skipped(self) -> list[str]:
        return ["Not run at paper scale: the MLP settings and the four-model MLP merge (the paper's MLP experiments are "
                "another benchmark; this one is its ViT-B-16 experiment), and ZipIt! (this project's implementation "
                "merges MLPs only; the paper compares with ZipIt! on ViTs)."]

    def experts_table(self) -> pd.DataFrame:
        rows = []
        control = {e for s in self._settings.values() if s.init == "same" for e in map(id, s.experts)}
        different = {e for s in self._settings.values() if s.init == "different" for e in map(id, s.experts)}
        for (_, task, pretrained, source), e in self._experts.items():
            inits = [name for name, members in (("same", control), ("different", different)) if id(e) in members]
            rows.append({"arch": self.config.paper_arch, "task": task, "pretrained": pretrained,
                         "init": f"{' and '.join(inits) or 'unused'} ({pretrained})",
                         "source": e.info.get("source"), "test accuracy": self.expert_accuracy(e),
                         "chance": self.task(task).chance, "steps": e.info.get("steps"),
                         "best validation accuracy": e.info.get("best_validation_accuracy"),
                         "train seconds": e.info.get("seconds"), "loaded from cache": e.info.get("cached")})
        return pd.DataFrame(rows)

    def run_time_note(self, wall_seconds: float) -> str:
        where = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "the CPU"
        return f"Run time: {wall_seconds / 60:.1f} min on {where} (autocast {self.dtype or 'off'})."


def paper_preamble(config: FSStudyConfig) -> str:
    """The findings' first line at paper scale: what ran, and how it differs from the paper."""
    tags = sorted({config.pretrained_of.get(t, "?") for pair in config.vit_pairs for t in pair})
    budget = (f"{config.fs_epochs} epochs" if config.fs_epochs > 0 else f"{config.fs_steps_vit} steps")
    return (f"*Paper scale (scale='paper'): CLIP {config.paper_arch} experts, each fine-tuned ({config.paper_expert_steps} "
            f"steps, METHODS.md §8's recipe) from its own public open_clip pretraining ({', '.join(tags)}): our "
            "substitute for the authors' private pretrainings, so these are not the paper's experts or numbers. "
            f"FS-Merge and distillation: {budget} at peak lr {config.fs_lr:g} / {config.kd_lr:g}, rank {config.rank}, "
            f"{config.num_images} + {config.num_images * config.augment} augmented unlabeled images per task.* ")


__all__ = ["ClipImages", "PaperFSStudy", "PaperTaskData", "PretrainedClipTrack", "clip_vit", "decode", "expert_recipe",
           "paper_preamble", "unit_transform"]
