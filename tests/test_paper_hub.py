"""The hub download of the paper-scale readers, with ``datasets.load_dataset`` faked: a copy
lands in the target folder whole (or not at all), and an unreachable hub names the fix."""
import datasets
import pytest

from lib.paper.hub import download_to_folder


def _fake_hub(monkeypatch, fail=False):
    calls = []

    def load_dataset(repo, config=None, cache_dir=None):
        calls.append((repo, config))
        if fail:
            raise ConnectionError("no network")
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}),
                                     "test": datasets.Dataset.from_dict({"text": ["c"], "label": [1]})})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_a_download_is_saved_whole_and_reads_back(tmp_path, monkeypatch):
    calls = _fake_hub(monkeypatch)
    folder = tmp_path / "huggingface" / "rte"
    download_to_folder("nyu-mll/glue", "rte", folder, "offline hint")
    assert calls == [("nyu-mll/glue", "rte")]
    copy = datasets.load_from_disk(str(folder))
    assert copy["train"]["label"] == [0, 1] and copy["test"]["text"] == ["c"]
    assert [p.name for p in folder.parent.iterdir()] == ["rte"]  # no temporary folder left beside it


def test_an_unreachable_hub_names_where_the_files_can_go(tmp_path, monkeypatch):
    _fake_hub(monkeypatch, fail=True)
    folder = tmp_path / "huggingface" / "eurosat"
    with pytest.raises(RuntimeError, match=r"tanganke/eurosat .*ConnectionError.*put it in <mirror>"):
        download_to_folder("tanganke/eurosat", None, folder, "Offline, put it in <mirror>/vision_paper.")
    assert not folder.exists()
