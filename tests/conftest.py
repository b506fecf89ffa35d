"""Shared test fixtures: where the offline mirror is, a private cache per test session, and a
tiny synthetic track for pipeline tests that must not need the mirror.

Tests that read the mirror carry ``@needs_data`` (optionally naming the files they read,
``@needs_data("vision/usps.npz")``) or ``@needs_models``. Where the mirror is missing they are
skipped, except under CI (``CI`` set), where the mirror is provided: there a missing mirror is a
failure, so a broken CI setup cannot turn the real-data tests into silent skips.
"""
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from lib.experiments.tracks import PreparedSplit, Track

REPO = Path(__file__).resolve().parents[1]


def _existing(path: Path) -> Path | None:
    return path if path.exists() else None


# The same variables as the Makefile: DATA_DIR is the mirror itself, MODELS_DIR defaults to its sibling.
_DATA_DIR = Path(os.environ.get("DATA_DIR") or REPO.parent / "shared" / "data").expanduser().resolve()
_MODELS_DIR = Path(os.environ.get("MODELS_DIR") or _DATA_DIR.parent / "models").expanduser().resolve()
SHARED_DATA = _existing(_DATA_DIR)
SHARED_MODELS = _existing(_MODELS_DIR)

needs_data = pytest.mark.needs_data
needs_models = pytest.mark.needs_models


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_data(*files): reads the offline data mirror (DATA_DIR)")
    config.addinivalue_line("markers", "needs_models(*files): reads the model mirror (MODELS_DIR)")


def _missing(item) -> str | None:
    """Why ``item`` cannot run here, or None."""
    for marker, root, variable in (("needs_data", _DATA_DIR, "DATA_DIR"), ("needs_models", _MODELS_DIR, "MODELS_DIR")):
        for mark in item.iter_markers(marker):
            absent = [p for p in (root, *(root / f for f in mark.args)) if not p.exists()]
            if absent:
                return f"{absent[0]} not found (set {variable} to the offline mirror)"
    return None


def pytest_runtest_setup(item):
    reason = _missing(item)
    if reason is None:
        return
    if on_ci():
        pytest.fail(f"CI is set but {reason}: CI provides the mirror, so its tests must run, not skip.",
                    pytrace=False)
    pytest.skip(reason)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Tests never read or write the user's .cache: experts there belong to real runs."""
    old = os.environ.get("MERGE_CACHE_DIR")
    os.environ["MERGE_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("MERGE_CACHE_DIR", None)
    else:
        os.environ["MERGE_CACHE_DIR"] = old


@pytest.fixture
def private_downloads(tmp_path, monkeypatch):
    """No data or model mirror, and downloads (and parquet caches) into a temporary folder rather
    than the repository's data/downloads: for tests of the download paths."""
    monkeypatch.setenv("MERGE_DOWNLOAD_DIR", str(tmp_path / "downloads"))
    for variable in ("DATA_DIR", "MODELS_DIR"):
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is far faster than several fighting over shared cores
    (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- a tiny synthetic track ---------------------------------------------------------------


class TinyEncoder(nn.Module):
    """conv → BatchNorm → ReLU → pool: the layer kinds of the vision track, at 8×8 pixels."""

    feature_dim = 8

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)

    def forward(self, pixel_values):
        return torch.relu(self.bn1(self.conv1(pixel_values))).mean((2, 3))


def _tiny_collate(split, idx):
    return {"pixel_values": torch.from_numpy(split.inputs[idx])}


def _tiny_split(templates, n, rng):
    labels = np.arange(n) % len(templates)
    images = templates[labels] + rng.normal(0, 1.5, (n, 3, 8, 8))
    return SimpleNamespace(images=images.astype(np.float32), labels=labels.astype(np.int64))


@dataclass
class TinyTrack(Track):
    """Two or more 3-class tasks of noisy 8×8 patterns; each task has its own class patterns.
    Data, θ0 and everything else are pure functions of the task name and seed, so a pipeline
    test needs no mirror: ``TinyTrack(["a", "b"])``."""

    name: str = "tiny"
    frozen_parameters: tuple = ()
    fisher_method: str = "vmap"
    sizes: tuple = (96, 32, 48)  # train, validation, test

    def backbone_id(self) -> str:
        return "tiny-conv"

    def _load(self, task):
        rng = np.random.default_rng([self.seed, sum(map(ord, task))])
        templates = rng.normal(0, 1, (3, 3, 8, 8))
        train, validation, test = (_tiny_split(templates, n, rng) for n in self.sizes)
        return SimpleNamespace(train=train, validation=validation, test=test, classes=["x", "y", "z"])

    def _prepare(self, task, split):
        return PreparedSplit(task, split.images, split.labels, _tiny_collate)

    def pretrained_encoder(self):
        with torch.random.fork_rng():
            torch.manual_seed(1234)
            return TinyEncoder()
