"""Fakes for notebook 03 at paper scale (issue 12), in the real on-disk formats.

- One tiny CLIP per open_clip pretrained tag (``tests.paper_fakes.TINY``'s shape: 2 layers, width
  32, 32×32 images), each from its own seed (so different initialisations), saved where open_clip's
  hub repository for ``ViT-B-16``/<tag> would be in a model folder. Like open_clip's hub files, the
  configs do not ask for QuickGELU: ``load_clip`` must take it from the tag.
- The published experts of the ``openai`` tag (``tanganke/clip-vit-base-patch16_<task>``), each its
  θ0 moved a little, as transformers ``CLIPVisionModel`` folders.
- MNIST's idx files and EuroSAT's hub copy (``tests.paper_fakes``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from paper_fakes import TINY, hf_vision, write_hub_copy, write_mnist, write_published_folder

ARCH = "ViT-B-16"
TAGS = {"mnist": "openai", "eurosat": "metaclip_400m"}  # paper_pretrained of the tests
TASKS = list(TAGS)


def write_tiny_clip_tag(models: Path, tag: str, seed: int) -> None:
    """A tiny open_clip CLIP saved as the hub repository of ``ARCH``/``tag``; its image tower is a
    transformers vision model converted to open_clip keys (so published experts can be made of it)."""
    from lib.paper import clip as C

    torch.manual_seed(seed)
    clip = C.load_clip(config=TINY).model
    base = hf_vision(with_projection=False, seed=seed + 1)
    clip.visual.load_state_dict(C.hf_vision_to_open_clip(base.state_dict(), projection=clip.visual.proj.detach()))
    folder = models / C.open_clip_repo(ARCH, tag)
    folder.mkdir(parents=True)
    config = {k: v for k, v in TINY.items() if k != "quick_gelu"}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, folder / "open_clip_model.safetensors")


def write_published_experts(models: Path, tasks, seed: int, change: float = 0.05) -> None:
    """FusionBench-style experts of the ``openai`` tag (written with ``seed``): θ0 moved by ``change``."""
    from lib.paper import clip as C

    for i, task in enumerate(tasks):
        expert = hf_vision(with_projection=False, seed=seed + 1)
        generator = torch.Generator().manual_seed(2000 + i)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(change * torch.randn(p.shape, generator=generator))
        write_published_folder(models / C.expert_repo(ARCH, task), expert)


def write_fs_merge_paper_fakes(root: Path) -> Path:
    """Tiny CLIPs of every tag of ``TAGS`` (and ``openai``), the openai experts and the data, under ``root``."""
    models = root / "models"
    for i, tag in enumerate(dict.fromkeys(["openai", *TAGS.values()])):
        write_tiny_clip_tag(models, tag, seed=10 * i)
        if tag == "openai":
            write_published_experts(models, TASKS, seed=10 * i)
    write_mnist(root / "data", n_train=60, n_test=20)
    write_hub_copy(root / "data", "eurosat", {"train": 6, "test": 2})
    return root
