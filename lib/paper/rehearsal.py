"""Random stand-ins for the paper scale's files, written in the real on-disk formats.

A machine without internet cannot fetch OpenAI's CLIP, FusionBench's experts or the eight
datasets, yet the paper path should run there before anyone spends a GPU day on it. These
writers put random models and images exactly where and how the real files would be, so the
real loaders read them:

- ``write_clip_hub``: θ0, an open_clip CLIP of ``arch``'s shape (``ViT-B-32``, ``ViT-B-16``,
  ``ViT-L-14``, or any open_clip config, e.g. a tiny one for tests), in open_clip's hub
  repository layout (``open_clip_config.json`` + ``open_clip_model.safetensors``); and one
  published expert per task as FusionBench's are (transformers' ``CLIPVisionModel`` folders,
  ``tanganke/clip-vit-base-patch32_<task>``), each θ0's image tower plus ``change`` × a seeded
  Gaussian, so that merging them is a merge of fine-tuned θ0s;
- ``write_hub_copies``: each task as a hub copy (a ``datasets`` DatasetDict saved with
  ``save_to_disk``) with the task's real class names, ``train``/``test`` images per class, at
  the size typical of the real dataset, JPEG-encoded as most hub copies are. Each image is the
  colour of its label (``colour``) plus noise, so a reader can be checked against its labels.

Used by ``make rehearse-paper`` (``benchmarks/rehearse_paper.py``: notebook 01 at paper scale
on full-size random models, for its time and memory) and by the tests' fakes. The weights are
random: a rehearsal measures cost, never accuracy.
"""
from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import save_file

from . import clip as C
from . import vision_data as V

# open_clip's model-config format, tiny: a 2-layer, 32-wide ViT on 32×32 images (patches of 8) and a
# 2-layer, 32-wide text transformer; QuickGELU, as OpenAI's weights use. For tests of the code paths.
TINY_CLIP = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 8, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
# width × height of a typical image of each task (the real datasets vary; these set decoding cost)
TYPICAL_IMAGE_SIZE = {
    "sun397": (300, 225), "stanford_cars": (360, 240), "resisc45": (256, 256), "eurosat": (64, 64),
    "svhn": (32, 32), "gtsrb": (50, 50), "mnist": (28, 28), "dtd": (480, 360),
}


def clip_config(arch: str) -> dict:
    """open_clip's model config of ``arch`` with OpenAI's QuickGELU (what ``load_clip`` builds)."""
    import open_clip

    config = open_clip.get_model_config(arch)
    if config is None:
        raise ValueError(f"open_clip has no model config {arch!r}.")
    return {**copy.deepcopy(config), "quick_gelu": True}


def random_hf_vision(config: dict, with_projection: bool = False, hidden_act: str = "quick_gelu", seed: int = 1):
    """A random transformers CLIP vision model of ``config``'s image tower (open_clip's format),
    its LayerNorms moved off (1, 0) so that every weight matters."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    vision = config["vision_cfg"]
    width = vision["width"]
    hf_config = CLIPVisionConfig(
        hidden_size=width, intermediate_size=int(width * vision.get("mlp_ratio", 4.0)),
        num_hidden_layers=vision["layers"], num_attention_heads=width // vision.get("head_width", 64),
        image_size=vision["image_size"], patch_size=vision["patch_size"], projection_dim=config["embed_dim"],
        hidden_act=hidden_act)
    torch.manual_seed(seed)
    model = (CLIPVisionModelWithProjection if with_projection else CLIPVisionModel)(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def write_published_folder(folder: Path, hf, files: str = "safetensors") -> None:
    """A folder as the hub holds a published expert: config.json plus weights whose keys carry
    transformers 4's ``vision_model.`` prefix (``files``: "safetensors", "sharded" or "bin")."""
    folder.mkdir(parents=True)
    hf.config.to_json_file(str(folder / "config.json"))
    state = {C.HF_PREFIX + k.removeprefix(C.HF_PREFIX): v.contiguous() for k, v in hf.state_dict().items()}
    if files == "safetensors":
        save_file(state, folder / "model.safetensors")
    elif files == "sharded":
        keys = sorted(state)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, part in shards.items():
            save_file({k: state[k] for k in part}, folder / name)
        index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    elif files == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        raise ValueError(f"files = {files!r}: choose 'safetensors', 'sharded' or 'bin'.")


def write_clip_hub(models: Path, tasks: Sequence[str], arch: str = "ViT-B-32", config: dict | None = None,
                   seed: int = 0, change: float = 0.05) -> None:
    """θ0 (an open_clip CLIP of ``config``, default ``arch``'s real shape) and one published expert
    per task under ``models``, where ``load_clip(arch, "openai")`` and ``load_expert`` look.

    θ0's image tower *is* a transformers vision model converted to open_clip keys, so each expert
    (that model with every weight moved by ``change`` × a seeded Gaussian) is a fine-tuned θ0."""
    config = config or clip_config(arch)
    torch.manual_seed(seed)
    clip = C.load_clip(config=config).model
    base = random_hf_vision(config, seed=seed + 1)
    clip.visual.load_state_dict(C.hf_vision_to_open_clip(base.state_dict(), projection=clip.visual.proj.detach()))
    folder = models / C.open_clip_repo(arch, "openai")
    folder.mkdir(parents=True)
    # like open_clip's built-in ViT configs, the file does not ask for QuickGELU (load_clip forces it)
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {k: v for k, v in config.items() if k != "quick_gelu"}, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, folder / "open_clip_model.safetensors")
    del clip
    for i, task in enumerate(tasks):
        expert = copy.deepcopy(base)
        generator = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(change * torch.randn(p.shape, generator=generator))
        write_published_folder(models / C.expert_repo(arch, task), expert)


def colour(label: int) -> tuple[int, int, int]:
    """A colour that encodes a label (0..396), readable back from the pixels."""
    return (label % 256, (label * 7) % 256, label // 2)


def hub_copy(class_names: Sequence[str], per_class: dict[str, int], size: tuple[int, int] = (8, 8),
             noise: float = 0.0, colour_of=lambda y: colour(5 * y), seed: int = 0):
    """A DatasetDict like the hub copies: an Image column and a ClassLabel column, ``per_class``
    images of each class per split, each ``colour_of(label)``; with ``noise`` > 0, plus uniform
    noise of that amplitude and JPEG-encoded (as most hub copies store them), else lossless."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(class_names))})

    def image(label: int):
        pixels = np.broadcast_to(np.array(colour_of(label), dtype=np.float32), (size[1], size[0], 3))
        if not noise:
            return Image.fromarray(pixels.astype(np.uint8))
        pixels = np.clip(pixels + rng.uniform(-noise, noise, pixels.shape), 0, 255).astype(np.uint8)
        encoded = io.BytesIO()
        Image.fromarray(pixels).save(encoded, format="JPEG", quality=90)
        return Image.open(io.BytesIO(encoded.getvalue()))  # keeps format JPEG: datasets stores these bytes

    splits = {}
    for split, n in per_class.items():
        labels = [y for y in range(len(class_names)) for _ in range(n)]
        splits[split] = datasets.Dataset.from_dict({"image": [image(y) for y in labels], "label": labels},
                                                   features=features)
    return datasets.DatasetDict(splits)


def hub_class_names(task: str) -> list[str]:
    """A task's class names as its hub copy spells them (data/clip_tasks.yaml)."""
    names = V.task_spec(task).sources["huggingface"].get("class_names")
    return names if isinstance(names, list) else list(V.task_spec(task).classes)


def write_hub_copy(data: Path, task: str, per_class: dict[str, int], **image) -> None:
    """A task's hub copy saved with ``save_to_disk`` where a data mirror keeps it
    (``image``: ``hub_copy``'s size, noise, colour_of and seed)."""
    hub_copy(hub_class_names(task), per_class, **image).save_to_disk(
        str(data / V.MIRROR_FOLDER / "huggingface" / task))


def write_hub_copies(data: Path, tasks: Sequence[str], train_per_class: int, test_per_class: int,
                     noise: float = 40.0) -> dict[str, dict[str, int]]:
    """Every task of ``tasks`` as a hub copy under the data mirror ``data``, at its typical image
    size (``TYPICAL_IMAGE_SIZE``), JPEG-encoded. Returns each task's split sizes."""
    sizes = {}
    for i, task in enumerate(tasks):
        write_hub_copy(data, task, {"train": train_per_class, "test": test_per_class},
                       size=TYPICAL_IMAGE_SIZE.get(task, (64, 64)), noise=noise, colour_of=colour, seed=i)
        classes = len(hub_class_names(task))
        sizes[task] = {"train": train_per_class * classes, "test": test_per_class * classes}
    return sizes
