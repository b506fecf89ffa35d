"""Shared test fixtures: where the offline mirror is, and a private cache per test session."""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _mirror(sub: str) -> Path | None:
    env = os.environ.get("DATA_DIR")
    root = Path(env).parent if env else REPO.parent / "shared"
    path = root / sub
    return path if path.exists() else None


SHARED_DATA = _mirror("data")
SHARED_MODELS = _mirror("models")
needs_data = pytest.mark.skipif(SHARED_DATA is None, reason="offline mirror ../shared/data not found (set DATA_DIR)")
needs_models = pytest.mark.skipif(SHARED_MODELS is None, reason="../shared/models not found (set DATA_DIR)")


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
