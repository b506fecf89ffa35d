"""Fakes for notebook 04 at paper scale, in the real on-disk formats (issue 12).

- a tiny random RoBERTa (``paper_fakes.roberta_config``: 2 layers of width 16) with the word-level
  tokenizer in RoBERTa's format, saved where ``FacebookAI/roberta-base`` would be in a model folder;
- the five sentiment datasets as their hub copies hold them, saved with ``save_to_disk`` where the
  mirror keeps them (``<data>/text_paper/huggingface/<name>``): IMDB (text, label; train, test and
  the unlabelled ``unsupervised`` split with label -1), Yelp polarity (labels named "1" and "2"),
  Rotten Tomatoes (its own validation split), SST-2 as GLUE's configuration (sentence, label, idx;
  test labels -1) and Amazon polarity (label, title, content).

Each text is a few words of the tiny vocabulary with "good" (label 1) or "bad" (label 0) among
them, so a model can learn the task; Amazon's sentiment word is in the title, so only the reader's
title + " " + content join makes it learnable. Every text starts with ``<dataset>:<split>:<row>``
(split into words by the tokenizer, unknown to it), so a test can tell which row it reads.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from paper_fakes import ROBERTA_REPO, WORDS, roberta_config, roberta_tokenizer

NEUTRAL = [w for w in WORDS if w not in ("good", "bad", "not")]
SIZES = {  # per dataset: split -> examples (the real datasets' split names)
    "imdb": {"train": 40, "test": 16, "unsupervised": 6},
    "yelp": {"train": 60, "test": 16},
    "rt": {"train": 30, "validation": 10, "test": 12},
    "sst2": {"train": 40, "validation": 14, "test": 8},
    "amazon": {"train": 50, "test": 16},
}
LABEL_NAMES = {"imdb": ["neg", "pos"], "yelp": ["1", "2"], "rt": ["neg", "pos"], "sst2": ["negative", "positive"],
               "amazon": ["negative", "positive"]}


def fake_text(dataset: str, split: str, row: int, label: int, rng) -> str:
    words = list(rng.choice(NEUTRAL, rng.integers(2, 5))) + ["good" if label == 1 else "bad"]
    rng.shuffle(words)
    return f"{dataset}:{split}:{row} " + " ".join(words)


def fake_label(dataset: str, split: str, row: int) -> int:
    if (dataset == "imdb" and split == "unsupervised") or (dataset == "sst2" and split == "test"):
        return -1  # hidden or absent labels, as on the hub
    return (row * 7 + len(dataset)) % 2


def fake_dataset(dataset: str, sizes: dict[str, int] | None = None):
    """A DatasetDict with the hub copy's columns, label names and splits."""
    import datasets

    sizes = sizes or SIZES[dataset]
    rng = np.random.default_rng(len(dataset))
    label = datasets.ClassLabel(names=LABEL_NAMES[dataset])
    splits = {}
    for split, n in sizes.items():
        labels = [fake_label(dataset, split, i) for i in range(n)]
        texts = [fake_text(dataset, split, i, max(y, 0), rng) for i, y in enumerate(labels)]
        if dataset == "amazon":  # the sentiment word in the title: the reader must join title and content
            titles = [t.split(" ", 1)[0] + " " + ("good" if y == 1 else "bad") for t, y in zip(texts, labels)]
            contents = [" ".join(rng.choice(NEUTRAL, 3)) for _ in labels]
            features = datasets.Features({"label": label, "title": datasets.Value("string"),
                                          "content": datasets.Value("string")})
            columns = {"label": labels, "title": titles, "content": contents}
        elif dataset == "sst2":
            features = datasets.Features({"sentence": datasets.Value("string"), "label": label,
                                          "idx": datasets.Value("int32")})
            columns = {"sentence": texts, "label": labels, "idx": list(range(n))}
        else:
            features = datasets.Features({"text": datasets.Value("string"), "label": label})
            columns = {"text": texts, "label": labels}
        splits[split] = datasets.Dataset.from_dict(columns, features=features)
    return datasets.DatasetDict(splits)


def write_sentiment_paper_fakes(root: Path) -> Path:
    """θ0 (a tiny RoBERTa saved as roberta-base is: a masked LM and its tokenizer) under
    ``root``/models and the five datasets under ``root``/data."""
    from transformers import RobertaForMaskedLM

    models, data = root / "models", root / "data"
    torch.manual_seed(3)
    config = roberta_config()
    config.initializer_range = 0.5  # features that differ from example to example
    RobertaForMaskedLM(config).eval().save_pretrained(str(models / ROBERTA_REPO))
    roberta_tokenizer().save_pretrained(str(models / ROBERTA_REPO))
    for dataset in SIZES:
        fake_dataset(dataset).save_to_disk(str(data / "text_paper" / "huggingface" / dataset))
    return root
