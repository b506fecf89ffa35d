"""CLIP image encoders, their zero-shot heads, and the published fine-tuned experts.

The paper-scale vision protocol (METHODS.md §8; Ilharco et al. 2023, Yang et al. 2024):

- **θ0** is the image tower of OpenAI's CLIP, as open_clip builds it: ``ViT-B-32``, ``ViT-B-16``
  or ``ViT-L-14`` with pretrained tag ``openai``. OpenAI's weights were trained with QuickGELU,
  x·σ(1.702x); open_clip's built-in configs use exact GELU, so the tag is loaded with
  ``force_quick_gelu=True`` (without it open_clip only warns, and every feature is slightly off).
- **Heads** are frozen zero-shot heads from the text tower (``zero_shot_head``):

      w_c = T · normalize( mean_j normalize(e(template_j(c))) ),   b_c = 0,
      logits(x) = W · normalize(f(x)),

  with ``e`` the text encoder (``encode_text``: the projected end-of-text token), the templates
  and class names of ``data/clip_tasks.yaml``, and T CLIP's learned logit scale (100 for
  OpenAI's weights). The head state is the project's (``lib.heads``): ``weight``, ``bias`` and
  ``normalize`` = 1, which makes ``head_module`` L2-normalize the image features first.
- **Experts**: the fine-tuned encoders the field uses (FusionBench's
  ``tanganke/clip-vit-base-patch32_<task>``, and ``-base-patch16``, ``-large-patch14``) are
  published in transformers' ``CLIPVisionModel`` format. ``load_hf_vision_encoder`` reads such a
  folder (safetensors, sharded safetensors or ``pytorch_model.bin``) and converts it.

Why convert transformers → open_clip, and not the reverse: the protocol's θ0 and text tower are
open_clip's, and the project's own ViT (``lib.archs.ViT``, used by FS-Merge) already follows
open_clip's parameter names, so every encoder of the vision track lives in one key space and a
merge never meets two layouts. The conversion only renames, stacks and transposes: no weight
changes value (outputs agree to float rounding, the two libraries' kernels differ):

    embeddings.class_embedding            -> class_embedding
    embeddings.patch_embedding.weight     -> conv1.weight
    embeddings.position_embedding.weight  -> positional_embedding
    pre_layrnorm / post_layernorm         -> ln_pre / ln_post
    encoder.layers.i.layer_norm1 / 2      -> transformer.resblocks.i.ln_1 / ln_2
    encoder.layers.i.self_attn.{q,k,v}_proj (weight, bias)
                                          -> transformer.resblocks.i.attn.in_proj_{weight,bias},
                                             the three stacked in the order q, k, v
    encoder.layers.i.self_attn.out_proj   -> transformer.resblocks.i.attn.out_proj
    encoder.layers.i.mlp.fc1 / fc2        -> transformer.resblocks.i.mlp.c_fc / c_proj
    visual_projection.weight [e, d]       -> proj [d, e] (transposed)

Keys may carry transformers 4's ``vision_model.`` prefix (how the published files store them)
or not (transformers 5's ``CLIPVisionModel.state_dict()``); the ``position_ids`` buffer some
files carry is not a weight and is dropped. A ``CLIPVisionModel`` has no projection (FusionBench
keeps the pretrained ``visual_projection`` frozen in its head), so an expert without one takes
θ0's: the same matrix in every expert, which every merge therefore leaves unchanged.

Deviation to keep in mind: open_clip stores an attention layer's q, k and v as one stacked
[3d, d] matrix. Element-wise merges (averaging, Task Arithmetic, TIES, DARE) and RegMean (q, k
and v read the same input, so they share its Gram matrix) are unaffected; a method that takes
one SVD or one top-k per tensor (Twin-Merging's compression, a per-tensor TIES) sees the three
together where FusionBench, in transformers' layout, sees them apart.

Where weights come from: a local model folder (``models_dir``, else ``$MODELS_DIR``, else the
``models`` folder beside ``$DATA_DIR``; the rule of ``lib.paths.models_mirror``) holds
a hub repository ``org/name`` as ``<models>/org/name/``: the open_clip weights as open_clip's
own hub repository (``timm/vit_base_patch32_clip_224.openai``: ``open_clip_config.json`` and
``open_clip_model.safetensors``), an expert as ``tanganke/clip-vit-base-patch32_sun397``. Without a
model folder, open_clip and ``huggingface_hub`` download once into ``download_dir()/models``.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..heads import zero_shot_head as _zero_shot_head_from_embeddings
from ..paths import REPO_ROOT, download_dir, models_mirror
from .vision_data import clip_transform, task_spec

CLIP_ARCHS: tuple[str, ...] = ("ViT-B-32", "ViT-B-16", "ViT-L-14")
# transformers' name of each architecture: the published experts are named after it.
HF_CLIP_NAMES = {
    "ViT-B-32": "clip-vit-base-patch32",
    "ViT-B-16": "clip-vit-base-patch16",
    "ViT-L-14": "clip-vit-large-patch14",
}
EXPERT_OWNER = "tanganke"  # FusionBench's fine-tuned experts: tanganke/<hf name>_<task>
HF_PREFIX = "vision_model."


# ----------------------------------------------------------------------------- where weights live
def hub_folder(repo_id: str, models_dir: str | os.PathLike | None = None,
               patterns: Sequence[str] = ("*.json", "*.safetensors")) -> Path:
    """A local copy of the hub repository ``repo_id``: ``<models>/<repo_id>`` when a model folder
    is set (it must be there), else downloaded once with ``huggingface_hub.snapshot_download``."""
    mirror = models_mirror(models_dir)
    if mirror is not None:
        folder = mirror / repo_id
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} not found. Put the files of the hub repository {repo_id} there "
                                    f"(e.g. huggingface-cli download {repo_id} --local-dir {folder}), or unset "
                                    "models_dir / MODELS_DIR to download.")
        return folder
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, cache_dir=str(download_dir() / "models" / "hub"),
                                        allow_patterns=list(patterns)))
        if not any(folder.glob("*.safetensors")):  # an older repository: weights as pytorch_model.bin
            folder = Path(snapshot_download(repo_id, cache_dir=str(download_dir() / "models" / "hub"),
                                            allow_patterns=["*.json", "pytorch_model.bin"]))
    except Exception as err:  # offline, or no such repository: say where the files can go instead
        raise RuntimeError(f"Could not download {repo_id} ({type(err).__name__}: {err}). Offline, put its files in "
                           f"<models>/{repo_id} and set models_dir (or MODELS_DIR) to <models>.") from err
    return folder


def expert_repo(arch: str, task: str, tasks_file: str | os.PathLike | None = None) -> str:
    """The hub name of the published expert of ``task`` for ``arch`` (FusionBench's)."""
    if arch not in HF_CLIP_NAMES:
        raise ValueError(f"arch = {arch!r}: published experts exist for {', '.join(HF_CLIP_NAMES)}.")
    return f"{EXPERT_OWNER}/{HF_CLIP_NAMES[arch]}_{task_spec(task, tasks_file).expert}"


# ----------------------------------------------------------------------------- open_clip models
@dataclass
class CLIPBundle:
    """A CLIP model with what it needs: ``preprocess`` (PIL image -> tensor) and ``tokenizer``."""

    model: nn.Module
    preprocess: Callable
    tokenizer: Callable
    arch: str
    pretrained: str | None


def load_clip(arch: str = "ViT-B-32", pretrained: str | None = "openai", *,
              models_dir: str | os.PathLike | None = None, config: dict | None = None,
              device: str | torch.device = "cpu") -> CLIPBundle:
    """An open_clip CLIP model (both towers), its evaluation transform and its tokenizer.

    ``config`` (open_clip's model-config format: ``embed_dim``, ``vision_cfg``, ``text_cfg``,
    ``quick_gelu``) builds a randomly initialised model of that shape instead: tests, and the
    paper-scale code exercised with tiny models. With a model folder the weights are read from
    ``<models>/<open_clip's hub repository for the tag>``; without one open_clip downloads them
    into ``download_dir()/models/open_clip``.
    """
    import open_clip

    if config is not None:
        model = open_clip.CLIP(**config).to(device).eval()
        preprocess = clip_transform(config["vision_cfg"]["image_size"])
        tokenizer = open_clip.SimpleTokenizer(context_length=config["text_cfg"].get("context_length", 77))
        return CLIPBundle(model, preprocess, tokenizer, arch, None)
    if arch not in CLIP_ARCHS:
        raise ValueError(f"arch = {arch!r}: the protocol uses {', '.join(CLIP_ARCHS)}.")
    # OpenAI trained with QuickGELU, and so did the tags open_clip marks quick_gelu (MetaCLIP, DFN);
    # open_clip's built-in configs say GELU and only warn
    quick_gelu = pretrained == "openai" or _tag_uses_quick_gelu(arch, pretrained)
    mirror = models_mirror(models_dir)
    if mirror is not None:
        repo = open_clip_repo(arch, pretrained)
        folder = mirror / repo
        checkpoints = sorted(folder.glob("open_clip_*.safetensors")) + sorted(folder.glob("open_clip_*.bin"))
        if (folder / "open_clip_config.json").is_file():
            name, weights = f"local-dir:{folder}", None
        elif checkpoints:
            name, weights = arch, str(checkpoints[0])
        else:
            raise FileNotFoundError(f"{folder} has no open_clip weights (open_clip_config.json with "
                                    f"open_clip_model.safetensors). Put the files of the hub repository {repo} there, "
                                    "or unset models_dir / MODELS_DIR to download.")
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights, device=device,
                                                                     force_quick_gelu=quick_gelu)
    else:
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=pretrained, device=device, force_quick_gelu=quick_gelu,
                cache_dir=str(download_dir() / "models" / "open_clip"))
        except RuntimeError as err:
            raise RuntimeError(f"Could not load open_clip {arch} ({pretrained}): {err}. Offline, put the files of "
                               f"the hub repository {open_clip_repo(arch, pretrained)} in <models>/"
                               f"{open_clip_repo(arch, pretrained)} and set models_dir (or MODELS_DIR).") from err
    return CLIPBundle(model.eval(), preprocess, open_clip.get_tokenizer(arch), arch, pretrained)


def _tag_uses_quick_gelu(arch: str, pretrained: str | None) -> bool:
    """Whether open_clip's pretrained config of ``arch``/``pretrained`` says QuickGELU."""
    import open_clip

    return bool(pretrained and (open_clip.get_pretrained_cfg(arch, pretrained) or {}).get("quick_gelu", False))


def open_clip_repo(arch: str, pretrained: str | None) -> str:
    """The hub repository open_clip downloads the weights of ``arch``/``pretrained`` from."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, pretrained or "")
    if not cfg or not cfg.get("hf_hub"):
        raise ValueError(f"open_clip knows no hub weights for {arch} with tag {pretrained!r}.")
    return cfg["hf_hub"].strip("/")


class CLIPImageEncoder(nn.Module):
    """The image tower of a CLIP model as one of the project's encoders.

    ``encoder(pixel_values=x)`` gives the projected image features [B, embed_dim], not
    normalized: a zero-shot head (``normalize`` = 1) normalizes them, as CLIP does. State-dict
    keys are open_clip's own for the tower (``visual.conv1.weight``, ...), what
    ``clip_model.state_dict()`` holds for it.
    """

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    @property
    def feature_dim(self) -> int:
        return int(self.visual.output_dim)

    @property
    def image_size(self) -> int:
        size = self.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual(pixel_values)


def image_encoder(clip_model: nn.Module) -> CLIPImageEncoder:
    """θ0: a copy of ``clip_model``'s image tower, as a project encoder."""
    return CLIPImageEncoder(copy.deepcopy(clip_model.visual))


# ----------------------------------------------------------------------------- zero-shot heads
@torch.no_grad()
def zero_shot_head(text_model: nn.Module, tokenizer: Callable, class_names: Sequence[str],
                   templates: Sequence[str], logit_scale: float | None = None,
                   batch_size: int = 256) -> dict[str, torch.Tensor]:
    """The frozen zero-shot head of ``class_names``: for each class, the normalized mean of the
    normalized embeddings of its prompts (each template with ``{c}`` replaced by the name),
    times ``logit_scale`` (default: the model's learned ``logit_scale.exp()``).

    ``text_model`` is a CLIP model (anything with ``encode_text(tokens)``). Returns the project's
    head state ``{"weight": [C, e], "bias": 0, "normalize": 1}`` (``lib.heads``).
    """
    if not class_names or not templates:
        raise ValueError("zero_shot_head needs at least one class name and one template.")
    if logit_scale is None:
        logit_scale = float(text_model.logit_scale.exp())
    prompts = [template.format(c=name) for name in class_names for template in templates]
    device = next(text_model.parameters()).device
    was_training = text_model.training
    text_model.eval()
    try:
        embedded = torch.cat([text_model.encode_text(tokenizer(prompts[i: i + batch_size]).to(device)).float().cpu()
                              for i in range(0, len(prompts), batch_size)])
    finally:
        text_model.train(was_training)
    per_class = list(embedded.split(len(templates)))  # prompts are grouped class by class
    return _zero_shot_head_from_embeddings(per_class, float(logit_scale))


def task_zero_shot_head(bundle: CLIPBundle, task: str, tasks_file: str | os.PathLike | None = None
                        ) -> dict[str, torch.Tensor]:
    """The zero-shot head of a task of ``data/clip_tasks.yaml`` (its class names and templates)."""
    spec = task_spec(task, tasks_file)
    return zero_shot_head(bundle.model, bundle.tokenizer, spec.classes, spec.templates)


# ----------------------------------------------------------------------------- transformers -> open_clip
_RENAMES = {
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight",
    "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight",
    "post_layernorm.bias": "ln_post.bias",
}
_LAYER_RENAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_NOT_WEIGHTS = ("embeddings.position_ids",)


def hf_vision_to_open_clip(state: dict[str, torch.Tensor], projection: torch.Tensor | None = None
                           ) -> dict[str, torch.Tensor]:
    """Convert a transformers CLIP vision state dict to open_clip's ``VisionTransformer`` keys.

    ``state`` is a ``CLIPVisionModel`` (or ``CLIPVisionModelWithProjection``) state dict, with or
    without the ``vision_model.`` prefix. ``projection`` ([width, embed_dim], open_clip's ``proj``)
    is used when ``state`` has no ``visual_projection.weight``. Every key must be consumed: an
    unknown key is an error, not silently dropped.
    """
    state = {k.removeprefix(HF_PREFIX): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k not in _NOT_WEIGHTS}
    out, used = {}, set()
    for source, target in _RENAMES.items():
        if source in state:
            out[target] = state[source]
            used.add(source)
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for i in layers:
        hf, oc = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [f"{hf}self_attn.{p}_proj.{kind}" for p in ("q", "k", "v")]
            if all(k in state for k in qkv):
                out[f"{oc}attn.in_proj_{kind}"] = torch.cat([state[k] for k in qkv], dim=0)
                used.update(qkv)
            for source, target in _LAYER_RENAMES.items():
                key = f"{hf}{source}.{kind}"
                if key in state:
                    out[f"{oc}{target}.{kind}"] = state[key]
                    used.add(key)
    if "visual_projection.weight" in state:
        out["proj"] = state["visual_projection.weight"].t().contiguous()
        used.add("visual_projection.weight")
    elif projection is not None:
        out["proj"] = projection.detach().clone()
    else:
        raise KeyError("the state dict has no visual_projection.weight (a CLIPVisionModel has none): pass "
                       "projection=, e.g. the pretrained encoder's visual.proj.")
    unknown = sorted(set(state) - used)
    if unknown:
        raise KeyError(f"keys with no open_clip counterpart: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}. "
                       "Is this a CLIP vision model?")
    return out


def read_hf_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of a transformers model folder: ``model.safetensors``, the shards of
    ``model.safetensors.index.json``, or ``pytorch_model.bin``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            if not (folder / shard).is_file():
                raise FileNotFoundError(f"{folder / shard} (listed in {index.name}) is missing. Copy the repository again.")
            state.update(load_file(folder / shard))
        return state
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin: "
                            "it should be a transformers CLIPVisionModel folder (e.g. a copy of "
                            f"{EXPERT_OWNER}/{HF_CLIP_NAMES['ViT-B-32']}_sun397).")


def _activation(visual: nn.Module) -> str:
    mlp = visual.transformer.resblocks[0].mlp
    return "quick_gelu" if type(getattr(mlp, "gelu", None)).__name__ == "QuickGELU" else "gelu"


def _check_config(folder: Path, visual: nn.Module) -> None:
    """Refuse an expert whose transformers config does not describe ``visual``'s architecture.

    Shapes would be caught when loading, but not the activation: GELU against QuickGELU loads
    without complaint and shifts every feature."""
    if not (folder / "config.json").is_file():
        return
    from transformers import CLIPVisionConfig

    config = CLIPVisionConfig.from_pretrained(str(folder))  # also reads a CLIPConfig's vision part
    block = visual.transformer.resblocks[0]
    found = {"hidden_act": config.hidden_act, "hidden_size": config.hidden_size,
             "num_hidden_layers": config.num_hidden_layers, "patch_size": config.patch_size}
    expected = {"hidden_act": _activation(visual), "hidden_size": block.attn.embed_dim,
                "num_hidden_layers": len(visual.transformer.resblocks), "patch_size": visual.conv1.kernel_size[0]}
    differ = {k: (found[k], expected[k]) for k in found if found[k] != expected[k]}
    if differ:
        raise ValueError(f"{folder / 'config.json'} describes another architecture than the pretrained encoder "
                         f"(config vs encoder: {differ}). Load the experts of the same architecture as θ0.")


def load_hf_vision_encoder(folder: str | os.PathLike, base: CLIPImageEncoder) -> CLIPImageEncoder:
    """An encoder with the weights of the transformers CLIP vision folder ``folder`` (a published
    expert), converted to open_clip keys. ``base`` (θ0) gives the architecture and, when the
    folder has none, the projection."""
    folder = Path(folder)
    _check_config(folder, base.visual)
    converted = hf_vision_to_open_clip(read_hf_state_dict(folder), projection=base.visual.proj)
    encoder = copy.deepcopy(base)
    try:
        encoder.visual.load_state_dict(converted, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{folder}: the converted weights do not fit the pretrained encoder ({err}). Load the "
                         "experts of the same architecture as θ0.") from err
    return encoder


def load_expert(arch: str, task: str, base: CLIPImageEncoder, models_dir: str | os.PathLike | None = None,
                tasks_file: str | os.PathLike | None = None) -> CLIPImageEncoder:
    """The published fine-tuned expert of ``task`` (``tanganke/<hf name>_<task>``) as an encoder."""
    return load_hf_vision_encoder(hub_folder(expert_repo(arch, task, tasks_file), models_dir), base)


__all__ = [
    "CLIP_ARCHS", "CLIPBundle", "CLIPImageEncoder", "HF_CLIP_NAMES", "expert_repo", "hf_vision_to_open_clip",
    "hub_folder", "image_encoder", "load_clip", "load_expert", "load_hf_vision_encoder", "models_mirror",
    "read_hf_state_dict", "task_zero_shot_head", "zero_shot_head",
]
