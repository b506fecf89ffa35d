"""Small model definitions shared by the merging methods: an MLP and a CLIP-style ViT.

Both split a model into a feature extractor and a separate classification ``head``:
``model.features(x)`` is what a merge operates on, ``model(x) = model.head(model.features(x))``.
Merges never touch the head (each task keeps its own).

The ViT follows open_clip's ``VisionTransformer`` layout and parameter names
(``conv1.weight``, ``class_embedding``, ``positional_embedding``, ``ln_pre``,
``transformer.resblocks.{i}.{ln_1, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj,
ln_2, mlp.c_fc, mlp.c_proj}``, ``ln_post``, ``proj``), so an open_clip image encoder's state
dict loads into it (see :meth:`ViT.load_open_clip_state_dict`). Attention is written out
explicitly (Q, K, V are slices of ``in_proj``) so that FS-Merge can put its merge/unmerge
matrices around each of the linear maps.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("relu", "gelu", "quick_gelu")


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """Apply a named elementwise nonlinearity.

    ``quick_gelu`` is x·sigmoid(1.702x), the approximation OpenAI's CLIP weights were
    trained with (open_clip builds ``openai`` checkpoints with it).
    """
    if name == "relu":
        return F.relu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


class MLP(nn.Module):
    """Fully connected network: ``layers`` (Linear + activation each), then a linear ``head``.

    ``features(x)`` is the activated output of the last hidden layer (width ``hidden[-1]``);
    the head maps those features to ``num_classes`` logits. Parameters are named
    ``layers.{i}.weight/bias`` and ``head.weight/bias``.
    """

    def __init__(self, in_dim: int, hidden: list[int], num_classes: int, activation: str = "relu"):
        super().__init__()
        if not hidden:
            raise ValueError("an MLP needs at least one hidden layer")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
        widths = [in_dim, *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(hidden[-1], num_classes)
        self.activation = activation

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for layer in self.layers:
            h = activation(self.activation, layer(h))
        return h

    def hidden_activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The activated output of every hidden layer (the last one is ``features(x)``)."""
        outputs, h = [], x.flatten(1)
        for layer in self.layers:
            h = activation(self.activation, layer(h))
            outputs.append(h)
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(Q Kᵀ / √d_head) V per head, for (batch, tokens, width) Q, K, V.

    The heads are consecutive slices of the width, as in ``nn.MultiheadAttention``.
    """
    b, n, width = q.shape
    split = lambda t: t.reshape(b, n, heads, width // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // heads), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(b, n, width)


class Attention(nn.Module):
    """Self-attention with ``nn.MultiheadAttention``'s parameters (Q, K, V stacked in ``in_proj``)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(multi_head_attention(q, k, v, self.heads))


class FeedForward(nn.Module):
    """c_fc → activation → c_proj."""

    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(activation(self.activation, self.c_fc(x)))


class ResidualBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, activation: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = FeedForward(width, int(width * mlp_ratio), activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float, activation: str):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualBlock(width, heads, mlp_ratio, activation) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class ViT(nn.Module):
    """CLIP-style vision transformer (open_clip layout) with a classification ``head``.

    features(x) = ln_post(class token after the blocks) @ proj, of width ``output_dim``;
    ``head`` maps them to ``num_classes`` logits (for CLIP, a zero-shot head built from the
    text encoder would replace it; merges never touch it).
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        in_channels: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        output_dim: int,
        num_classes: int,
        activation: str = "gelu",
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
        self.heads = heads
        self.activation = activation
        num_tokens = (image_size // patch_size) ** 2 + 1
        scale = width**-0.5  # open_clip's initialisation scale for the embeddings and proj
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(num_tokens, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, depth, heads, mlp_ratio, activation)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        self.head = nn.Linear(output_dim, num_classes)

    @property
    def feature_dim(self) -> int:
        return self.proj.shape[1]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (batch, channels, H, W) → tokens (batch, 1 + patches, width), class token first."""
        patches = self.conv1(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.positional_embedding

    def features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.transformer(self.ln_pre(self.embed(x)))
        return self.ln_post(tokens[:, 0]) @ self.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @classmethod
    def from_open_clip(cls, visual: nn.Module, num_classes: int) -> "ViT":
        """A ViT with the weights of an open_clip ``VisionTransformer`` (``clip_model.visual``).

        Dimensions and the activation (GELU, or QuickGELU for OpenAI's weights) are read from
        the module; the ``head`` is freshly initialised (put the task's head there).
        """
        block = visual.transformer.resblocks[0]
        width = visual.conv1.out_channels
        model = cls(
            image_size=visual.conv1.stride[0] * int(math.isqrt(visual.positional_embedding.shape[0] - 1)),
            patch_size=visual.conv1.kernel_size[0],
            in_channels=visual.conv1.in_channels,
            width=width,
            depth=len(visual.transformer.resblocks),
            heads=block.attn.num_heads,
            mlp_ratio=block.mlp.c_fc.out_features / width,
            output_dim=visual.proj.shape[1],
            num_classes=num_classes,
            activation="quick_gelu" if type(block.mlp.gelu).__name__ == "QuickGELU" else "gelu",
        )
        model.load_open_clip_state_dict(visual.state_dict())
        return model.to(visual.proj.device, visual.proj.dtype)

    def load_open_clip_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load an open_clip ``VisionTransformer`` state dict (e.g. ``clip_model.visual``).

        The activation must match the checkpoint's: OpenAI's CLIP weights need
        ``activation="quick_gelu"`` (or use :meth:`from_open_clip`, which reads it).

        Everything but ``head`` must be present and match; keys this model does not have
        (open_clip extras such as an ``attn_pool``) are an error rather than silently dropped.
        """
        own = self.state_dict()
        missing = [k for k in own if not k.startswith("head.") and k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if missing or unexpected:
            raise KeyError(f"state dict does not match this ViT: missing {missing}, unexpected {unexpected}")
        self.load_state_dict({**state_dict, **{k: v for k, v in own.items() if k.startswith("head.")}})
