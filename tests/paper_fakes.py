"""Fakes for the paper-scale code, written in the real on-disk formats (issue 12).

- A tiny CLIP (open_clip's architecture: 2 layers, width 32, 32×32 images) saved where open_clip's
  hub repository for ``ViT-B-32``/``openai`` would be in a model folder;
- published experts of it, as the hub holds them (transformers' ``CLIPVisionModel`` folders,
  ``tanganke/clip-vit-base-patch32_<task>``), each θ0 plus a small task-specific change;
- image datasets: MNIST's idx files, EuroSAT's torchvision folders, a hub copy saved with
  ``save_to_disk``. Every image's colour encodes its label, so a test can read it back;
- a tiny random RoBERTa (2 layers of width 16) with a word-level tokenizer in RoBERTa's format,
  saved where ``FacebookAI/roberta-base`` would be, published GLUE experts of it in
  ``lu-vae/roberta-glue``'s layout, and GLUE hub copies (``nyu-mll/glue``'s columns and labels).

The code under test reads all of these with its real loaders; nothing touches the network.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from lib.paper.rehearsal import (TINY_CLIP, colour, hub_copy, random_hf_vision, write_clip_hub,  # noqa: F401
                                 write_hub_copy, write_published_folder)

TINY = TINY_CLIP  # open_clip's model-config format: 2 layers of width 32, 32×32 images
OPEN_CLIP_REPO = "timm/vit_base_patch32_clip_224.openai"  # open_clip's hub repository for ViT-B-32/openai


# ----------------------------------------------------------------------------- models
def hf_vision(with_projection: bool, hidden_act: str = "quick_gelu", seed: int = 1):
    """A tiny transformers CLIP vision model of TINY's shape (LayerNorms made non-trivial)."""
    return random_hf_vision(TINY, with_projection=with_projection, hidden_act=hidden_act, seed=seed)


def write_tiny_clip_hub(models: Path, tasks, seed: int = 0, change: float = 0.05) -> None:
    """θ0 (a tiny open_clip CLIP) and one published expert per task under ``models``
    (``lib.paper.rehearsal.write_clip_hub`` at TINY's shape)."""
    write_clip_hub(models, tasks, "ViT-B-32", config=TINY, seed=seed, change=change)


# ----------------------------------------------------------------------------- datasets
def label_of(image: Image.Image, labels=range(397)) -> int:
    """The label whose colour is nearest ``image``'s mean colour."""
    mean = np.asarray(image.convert("RGB"), dtype=float).reshape(-1, 3).mean(0)
    return min(labels, key=lambda y: np.abs(mean - colour(y)).sum())


def save_image(path: Path, label: int, size=(12, 10), fmt=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour(label)).save(path, format=fmt)


def write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST's idx format: magic (0x08 = uint8, then the number of dimensions), sizes, data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(data: Path, n_train: int = 60, n_test: int = 10) -> None:
    """MNIST in torchvision's raw layout, each image a flat grey level 25 × its label."""
    raw = data / "vision_paper" / "torchvision" / "MNIST" / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        write_idx(raw / f"{prefix}-images-idx3-ubyte", np.stack([np.full((28, 28), 25 * y) for y in labels]))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)


VISION_TASKS = ["mnist", "eurosat"]


def write_vision_paper_fakes(root: Path) -> Path:
    """θ0, experts for VISION_TASKS and their data under ``root``/models and ``root``/data."""
    write_tiny_clip_hub(root / "models", VISION_TASKS)
    write_mnist(root / "data", n_train=60, n_test=20)
    write_hub_copy(root / "data", "eurosat", {"train": 6, "test": 2})
    return root


# ----------------------------------------------------------------------------- RoBERTa and GLUE
GLUE_KNOWN = {  # task -> (number of outputs, text columns), as GLUE defines them
    "cola": (2, ("sentence",)), "sst2": (2, ("sentence",)), "mrpc": (2, ("sentence1", "sentence2")),
    "stsb": (1, ("sentence1", "sentence2")), "qqp": (2, ("question1", "question2")),
    "mnli": (3, ("premise", "hypothesis")), "qnli": (2, ("question", "sentence")),
    "rte": (2, ("sentence1", "sentence2")),
}
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids 0..3 and its mask token
WORDS = "the a cat dog sat on mat is not good bad movie who what where sky blue".split()
ROBERTA_REPO = "FacebookAI/roberta-base"
GLUE_TASKS = ["cola", "stsb", "mrpc"]  # Matthews, Pearson/Spearman of a regression, F1 + accuracy


def roberta_tokenizer():
    """A word-level tokenizer with RoBERTa's special tokens and pair format <s> a </s></s> b </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")


def roberta_config(num_labels: int = 2):
    """RoBERTa's architecture, tiny: 2 layers of width 16, 40 positions."""
    from transformers import RobertaConfig

    config = RobertaConfig(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=16, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=32, max_position_embeddings=40,
                           type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, num_labels=num_labels)
    config._attn_implementation = "eager"
    return config


def roberta_classifier(num_labels: int, seed: int = 1):
    """A random RobertaForSequenceClassification whose every weight matters (transformers sets
    biases to 0 and LayerNorms to (1, 0): perturb them)."""
    from transformers import RobertaForSequenceClassification

    torch.manual_seed(seed)
    model = RobertaForSequenceClassification(roberta_config(num_labels)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def write_roberta_expert(folder: Path, model, files: str = "safetensors") -> None:
    """A folder as the hub holds a published expert: config.json and the weights, as
    safetensors or (older files) a pytorch_model.bin with the position_ids buffer saved."""
    folder.mkdir(parents=True)
    model.config.to_json_file(str(folder / "config.json"))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if files == "safetensors":
        save_file(state, folder / "model.safetensors")
    else:
        state["roberta.embeddings.position_ids"] = torch.arange(40).unsqueeze(0)
        torch.save(state, folder / "pytorch_model.bin")


def glue_label(task: str, row: int):
    """The gold label of a fake training or validation row."""
    return round((row % 11) * 0.5, 1) if task == "stsb" else row % GLUE_KNOWN[task][0]


def fake_glue(task: str, sizes: dict[str, int], label_names=None, words: bool = False, labels_of=None):
    """A DatasetDict like the hub's configuration: GLUE's columns, a ClassLabel (float32 for
    STS-B), an idx column, and -1 labels on test splits. Each text reads field:split:row:label,
    or (``words``) field:split:row followed by a few seeded words of the tiny vocabulary, so that
    a model sees different inputs; ``labels_of(texts per field)`` then gives the labels."""
    import datasets

    from lib.paper import glue as G

    spec = G.glue_task_spec(task)
    label = datasets.Value("float32") if task == "stsb" else datasets.ClassLabel(names=list(label_names or spec.labels))
    features = datasets.Features({**{f: datasets.Value("string") for f in spec.fields}, "label": label,
                                  "idx": datasets.Value("int32")})
    rng = np.random.default_rng(len(task))
    splits = {}
    for split, n in sizes.items():
        if words:
            columns = {f: [f"{f}:{split}:{i} " + " ".join(rng.choice(WORDS, rng.integers(1, 6))) for i in range(n)]
                       for f in spec.fields}
            labels = list(labels_of(list(columns.values())))
        else:
            labels = [-1] * n if split.startswith("test") else [glue_label(task, i) for i in range(n)]
            columns = {f: [f"{f}:{split}:{i}:{y}" for i, y in enumerate(labels)] for f in spec.fields}
        splits[split] = datasets.Dataset.from_dict({**columns, "label": labels, "idx": list(range(n))}, features=features)
    return datasets.DatasetDict(splits)


def _expert_labels(expert, tokenizer, regression: bool):
    """Labels a published expert gets right: its own predictions (STS-B: the ranks of its scores
    spread over 0-5), so that each expert scores 100 on its task and a merge has room to lose."""
    from lib.paper import glue as G

    def labels_of(columns):
        split = G.GlueSplit(columns[0], columns[1] if len(columns) == 2 else None, np.zeros(len(columns[0])),
                            np.arange(len(columns[0])))
        with torch.no_grad():
            outputs = expert(**G.pad_batch(G.tokenize(tokenizer, split), tokenizer.pad_token_id)).logits
        if regression:
            ranks = G.average_ranks(outputs[:, 0].numpy())
            return np.round(5 * (ranks - 1) / max(1, len(ranks) - 1), 2).tolist()
        return outputs.argmax(1).tolist()

    return labels_of


def write_glue_paper_fakes(root: Path, tasks=GLUE_TASKS, n_train: int = 40, n_test: int = 12,
                           change: float = 0.05) -> Path:
    """θ0 (a tiny RoBERTa, saved as roberta-base is: a masked LM and its tokenizer), one published
    expert per task (θ0's encoder moved by ``change`` × a seeded Gaussian, with a random head of
    the task's size) and each task's GLUE copy labelled by its expert (``_expert_labels``), under
    ``root``/models and ``root``/data."""
    from transformers import RobertaForMaskedLM

    from lib.paper import glue as G

    models, data = root / "models", root / "data"
    torch.manual_seed(3)
    config = roberta_config()
    config.initializer_range = 0.5  # not transformers' 0.02: features that differ from example to example
    pretrained = RobertaForMaskedLM(config).eval()
    pretrained.save_pretrained(str(models / ROBERTA_REPO))
    tokenizer = roberta_tokenizer()
    tokenizer.save_pretrained(str(models / ROBERTA_REPO))
    encoder = {k: v for k, v in pretrained.state_dict().items() if k.startswith("roberta.")}
    for i, task in enumerate(tasks):
        expert = roberta_classifier(G.glue_task_spec(task).num_labels, seed=10 + i)
        generator = torch.Generator().manual_seed(1000 + i)
        moved = {k: v + change * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                 for k, v in encoder.items()}
        expert.load_state_dict(moved, strict=False)  # the classifier keeps its own random weights,
        with torch.no_grad():  # scaled up from transformers' N(0, 0.02²) so that its predictions vary
            for name, p in expert.classifier.named_parameters():
                if name.endswith("weight"):
                    p.mul_(50)
        spec = G.glue_task_spec(task)
        if spec.regression is None:  # centre the logits on sample inputs, so that every class is predicted
            sample = [" ".join(np.random.default_rng(j).choice(WORDS, 4)) for j in range(64)]
            batch = G.pad_batch(G.tokenize(tokenizer, G.GlueSplit(sample, None, np.zeros(64), np.arange(64))),
                                tokenizer.pad_token_id)
            with torch.no_grad():
                expert.classifier.out_proj.bias.sub_(expert(**batch).logits.median(0).values)
        write_roberta_expert(models / "lu-vae" / "roberta-glue" / task / "roberta-base_lr1e-05", expert)
        labels_of = _expert_labels(expert, tokenizer, spec.regression is not None)
        fake_glue(task, {"train": n_train, spec.evaluation_split: n_test}, words=True, labels_of=labels_of).save_to_disk(
            str(data / "text_paper" / "huggingface" / task))
    return root
