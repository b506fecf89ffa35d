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

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

# open_clip's model-config format: a 2-layer, 32-wide ViT on 32x32 images (patches of 8) and a
# 2-layer, 32-wide text transformer; QuickGELU, as OpenAI's weights use.
TINY = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 8, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
OPEN_CLIP_REPO = "timm/vit_base_patch32_clip_224.openai"  # open_clip's hub repository for ViT-B-32/openai


# ----------------------------------------------------------------------------- models
def hf_vision(with_projection: bool, hidden_act: str = "quick_gelu", seed: int = 1):
    """A tiny transformers CLIP vision model of TINY's shape (LayerNorms made non-trivial)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    vision = TINY["vision_cfg"]
    config = CLIPVisionConfig(hidden_size=vision["width"], intermediate_size=int(vision["width"] * vision["mlp_ratio"]),
                              num_hidden_layers=vision["layers"], num_attention_heads=vision["width"] // vision["head_width"],
                              image_size=vision["image_size"], patch_size=vision["patch_size"],
                              projection_dim=TINY["embed_dim"], hidden_act=hidden_act)
    torch.manual_seed(seed)
    model = (CLIPVisionModelWithProjection if with_projection else CLIPVisionModel)(config).eval()
    with torch.no_grad():  # transformers initialises LayerNorms to (1, 0): make them count
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def write_published_folder(folder: Path, hf, files: str = "safetensors") -> None:
    """A folder as the hub holds a published expert: config.json plus weights whose keys carry
    transformers 4's ``vision_model.`` prefix."""
    folder.mkdir(parents=True)
    hf.config.to_json_file(str(folder / "config.json"))
    state = {"vision_model." + k.removeprefix("vision_model."): v.contiguous() for k, v in hf.state_dict().items()}
    if files == "safetensors":
        save_file(state, folder / "model.safetensors")
    elif files == "sharded":
        keys = sorted(state)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, part in shards.items():
            save_file({k: state[k] for k in part}, folder / name)
        index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        torch.save(state, folder / "pytorch_model.bin")


def write_tiny_clip_hub(models: Path, tasks, seed: int = 0, change: float = 0.05) -> None:
    """θ0 (a tiny open_clip CLIP) and one published expert per task under ``models``.

    θ0's image tower *is* a transformers vision model converted to open_clip keys, so each expert
    (that model with every weight moved by ``change`` × a seeded Gaussian) is a fine-tuned θ0, as
    the published experts are, and merging them means something."""
    from lib.paper import clip as C

    torch.manual_seed(seed)
    clip = C.load_clip(config=TINY).model
    base = hf_vision(with_projection=False, seed=seed + 1)
    clip.visual.load_state_dict(C.hf_vision_to_open_clip(base.state_dict(), projection=clip.visual.proj.detach()))
    folder = models / OPEN_CLIP_REPO
    folder.mkdir(parents=True)
    # like open_clip's built-in ViT configs, the file does not ask for QuickGELU (load_clip forces it)
    config = {k: v for k, v in TINY.items() if k != "quick_gelu"}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, folder / "open_clip_model.safetensors")
    for i, task in enumerate(tasks):
        expert = hf_vision(with_projection=False, seed=seed + 1)
        generator = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(change * torch.randn(p.shape, generator=generator))
        write_published_folder(models / C.expert_repo("ViT-B-32", task), expert)


# ----------------------------------------------------------------------------- datasets
def colour(label: int) -> tuple[int, int, int]:
    """A colour that encodes a label (0..396), readable back from the pixels."""
    return (label % 256, (label * 7) % 256, label // 2)


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


def hub_copy(class_names, per_class: dict[str, int]):
    """A DatasetDict like the hub copies: an Image column and a ClassLabel column."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(class_names))})
    splits = {}
    for split, n in per_class.items():
        labels = [y for y in range(len(class_names)) for _ in range(n)]
        images = [Image.new("RGB", (8, 8), colour(5 * y)) for y in labels]
        splits[split] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    return datasets.DatasetDict(splits)


def write_hub_copy(data: Path, task: str, per_class: dict[str, int]) -> None:
    """A task's hub copy saved with ``save_to_disk`` where the mirror keeps it."""
    from lib.paper import vision_data as V

    names = V.task_spec(task).sources["huggingface"].get("class_names")
    names = names if isinstance(names, list) else V.task_spec(task).classes
    hub_copy(names, per_class).save_to_disk(str(data / "vision_paper" / "huggingface" / task))


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
