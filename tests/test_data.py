"""Tests of the data layer (lib.data) and the metrics (lib.metrics).

Most tests build a tiny fake mirror in tmp_path, in the real on-disk formats and with the
real files' quirks (a cp1252 line with byte 0x85, a label-only line, an empty tweet). A few
check the real mirror and are skipped when it is absent. Nothing here uses the network:
downloads are served by fakes of ``_fetch`` and of the torchvision dataset classes.
"""
from __future__ import annotations

import io
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lib.data.text as text_module
from lib.data import (
    TEXT_TASKS,
    load_text_task,
    load_vision_task,
    prepare_images,
    stratified_split,
    subsample,
)
from lib.metrics import accuracy, confusion_matrix, macro_f1, official_metric

from conftest import SHARED_DATA, needs_data

# --- a tiny fake mirror ------------------------------------------------------------------

STANCE = ("abortion", "atheism", "climate", "feminist", "hillary")


def _labelled(n: int, num_classes: int, word: str) -> bytes:
    """``n`` SentEval lines ``<label> <text>``, labels cycling through the classes."""
    return b"".join(f"{i % num_classes} {word} number {i} .\n".encode() for i in range(n))


def _write_tweeteval(folder: Path, sizes=(12, 4, 6), num_classes=2, empty_tweet_at=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "val", "test"), sizes):
        tweets = [f"@user tweet {i} of {split} \U0001f525 #tag" for i in range(n)]
        if split == "train" and empty_tweet_at is not None:
            tweets[empty_tweet_at] = ""
        (folder / f"{split}_text.txt").write_text("".join(t + "\n" for t in tweets), encoding="utf-8")
        (folder / f"{split}_labels.txt").write_text("".join(f"{i % num_classes}\n" for i in range(n)))


# The fake mirror's files stand for the published ones, so their sizes are the "published" sizes
# here (tests/test_nothing_silent.py checks the real sizes against the real mirror).
FAKE_SENTEVAL_LINES = {"rt-polarity.all": 40, "custrev.all": 20, "subj.all": 20, "mpqa.all": 20,
                       **{f"stsa.{kind}.{split}": n for kind in ("binary", "fine")
                          for split, n in (("train", 16), ("dev", 6), ("test", 8))},
                       "TREC.train.all": 60, "TREC.test.all": 12}
FAKE_TWEETEVAL_LINES = {task: {"train": 12, "val": 4, "test": 6} for task in ("irony", "hate", "emoji")}


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setattr(text_module, "SENTEVAL_LINES", FAKE_SENTEVAL_LINES)
    monkeypatch.setattr(text_module, "TWEETEVAL_LINES", FAKE_TWEETEVAL_LINES)
    root = tmp_path / "mirror"
    senteval = root / "text" / "senteval"
    senteval.mkdir(parents=True)
    # MR: cp1252 lines, one with byte 0x85 (an ellipsis), which str.splitlines() would split.
    (senteval / "rt-polarity.all").write_bytes(
        _labelled(38, 2, "movie") + b"0 the clich\xe9s pile up \x85 and up . \n" + b"1 \x93great\x94 fun\n"
    )
    # CR: one line with a label and no text, and a blank line at the end.
    (senteval / "custrev.all").write_bytes(_labelled(19, 2, "camera") + b"1 \n" + b"\n")
    for file, n, c in (("subj.all", 20, 2), ("mpqa.all", 20, 2)):
        (senteval / file).write_bytes(_labelled(n, c, "phrase"))
    for split, n in (("train", 16), ("dev", 6), ("test", 8)):
        (senteval / f"stsa.binary.{split}").write_bytes(_labelled(n, 2, "sst"))
        (senteval / f"stsa.fine.{split}").write_bytes(_labelled(n, 5, "sst"))
    (senteval / "TREC.train.all").write_bytes(_labelled(60, 6, "what is"))
    (senteval / "TREC.test.all").write_bytes(_labelled(12, 6, "who is"))

    tweeteval = root / "text" / "tweeteval"
    _write_tweeteval(tweeteval / "irony")
    (tweeteval / "irony" / "mapping.txt").write_text("0\tnon_irony\n1\tirony")
    _write_tweeteval(tweeteval / "hate", empty_tweet_at=3)
    (tweeteval / "hate" / "mapping.txt").write_text("0\tnot-hate\n1\thate")
    _write_tweeteval(tweeteval / "emoji", num_classes=3)
    emoji_mapping = "0\t\u2764\t_red_heart_\t\n1\t\U0001f525\t_fire_\t\n2\t\u2728\t_sparkles_\t\n"
    (tweeteval / "emoji" / "mapping.txt").write_text(emoji_mapping, encoding="utf-8")
    (tweeteval / "stance").mkdir()
    (tweeteval / "stance" / "mapping.txt").write_text("0\tnone\n1\tagainst\n2\tfavor")
    for target in STANCE:
        _write_tweeteval(tweeteval / "stance" / target, num_classes=3)

    vision = root / "vision"
    vision.mkdir()
    rng = np.random.default_rng(0)
    np.savez(
        vision / "mnist.npz",
        x_train=rng.integers(0, 256, (50, 28, 28, 1), dtype=np.uint8),
        y_train=np.arange(50, dtype=np.int64) % 10,
        x_test=rng.integers(0, 256, (20, 28, 28, 1), dtype=np.uint8),
        y_test=np.arange(20, dtype=np.int64) % 10,
        classes=np.array([str(d) for d in range(10)]),
    )
    return root


def _all_texts(task) -> list[str]:
    return task.train.texts + task.validation.texts + task.test.texts


# --- SentEval ----------------------------------------------------------------------------


def test_senteval_decodes_every_line_and_splits_80_10_10(mirror):
    task = load_text_task("mr", data_dir=mirror)
    texts = _all_texts(task)
    assert len(texts) == 40  # 40 lines, nothing dropped: 0x85 did not split a line
    assert "the clichés pile up … and up ." in texts  # cp1252: 0x85 is an ellipsis
    assert "\u201cgreat\u201d fun" in texts
    assert any("2 not valid UTF-8" in note for note in task.notes)
    assert (len(task.train), len(task.validation), len(task.test)) == (32, 4, 4)
    assert task.classes == ["negative", "positive"] and task.metric == "accuracy"
    for split in (task.train, task.validation, task.test):
        assert split.labels.dtype == np.int64
        assert np.bincount(split.labels).tolist()[0] == np.bincount(split.labels).tolist()[1]  # stratified


def test_decoding_falls_back_line_by_line():
    assert text_module._decode("café".encode()) == ("café", False)
    assert text_module._decode(b"caf\xe9 \x85") == ("café …", True)  # cp1252
    assert text_module._decode(b"\x81") == ("\x81", True)  # undefined in cp1252: Latin-1


def test_label_only_lines_are_dropped_and_counted(mirror):
    task = load_text_task("cr", data_dir=mirror)
    assert len(_all_texts(task)) == 19  # 20 non-empty lines minus 1 label-only line
    assert any("dropped 1 with a label and no text" in note for note in task.notes)


def test_seeded_split_is_deterministic_disjoint_and_seed_dependent(mirror):
    a, b = load_text_task("mr", data_dir=mirror, seed=0), load_text_task("mr", data_dir=mirror, seed=0)
    assert a.test.texts == b.test.texts and a.train.texts == b.train.texts
    assert not set(a.train.texts) & set(a.test.texts) and not set(a.train.texts) & set(a.validation.texts)
    c = load_text_task("mr", data_dir=mirror, seed=1)
    assert sorted(_all_texts(c)) == sorted(_all_texts(a)) and c.test.texts != a.test.texts


def test_official_splits(mirror):
    sst2 = load_text_task("sst2", data_dir=mirror)
    assert (len(sst2.train), len(sst2.validation), len(sst2.test)) == (16, 6, 8)
    assert load_text_task("SST5", data_dir=mirror).num_classes == 5
    trec = load_text_task("trec", data_dir=mirror)
    assert len(trec.test) == 12 and (len(trec.train), len(trec.validation)) == (54, 6)  # 10% of each class
    assert trec.classes == ["DESC", "ENTY", "ABBR", "HUM", "LOC", "NUM"]


# --- TweetEval ---------------------------------------------------------------------------


def test_tweeteval_reads_official_splits_and_mapping(mirror):
    irony = load_text_task("irony", data_dir=mirror)
    assert irony.classes == ["non_irony", "irony"] and irony.metric == "irony_f1"
    assert (len(irony.train), len(irony.validation), len(irony.test)) == (12, 4, 6)
    assert "\U0001f525" in irony.train.texts[0]
    hate = load_text_task("hate", data_dir=mirror)
    assert len(hate.train) == 11 and any("dropped 1" in note for note in hate.notes)
    assert hate.train.labels.tolist() == [i % 2 for i in range(12) if i != 3]  # alignment kept
    assert load_text_task("emoji", data_dir=mirror).classes == ["red_heart", "fire", "sparkles"]


def test_stance_targets_and_their_concatenation(mirror):
    one = load_text_task("stance_hillary", data_dir=mirror)
    assert one.classes == ["none", "against", "favor"] and one.metric == "stance_f1"
    everything = load_text_task("stance", data_dir=mirror)
    assert (len(everything.train), len(everything.test)) == (5 * 12, 5 * 6)
    assert set(TEXT_TASKS) >= {f"stance_{t}" for t in STANCE} | {"stance", "mr", "emoji"}


# --- clear errors ------------------------------------------------------------------------


def test_missing_mirror_file_names_it_and_the_way_out(mirror):
    (mirror / "text" / "senteval" / "subj.all").unlink()
    with pytest.raises(FileNotFoundError, match=r"subj\.all(.|\n)*unset DATA_DIR"):
        load_text_task("subj", data_dir=mirror)


def test_unknown_task_suggests_close_names(mirror):
    with pytest.raises(ValueError, match="Did you mean 'irony'"):
        load_text_task("iorny", data_dir=mirror)
    with pytest.raises(ValueError, match="Did you mean 'cifar10'"):
        load_vision_task("cifar-10", data_dir=mirror)


def test_bad_labels_name_file_and_line(mirror):
    path = mirror / "text" / "senteval" / "mpqa.all"
    path.write_bytes(b"0 good\n1 bad\nx what\n")
    with pytest.raises(ValueError, match=r"mpqa\.all, line 3: label 'x' is not an integer"):
        load_text_task("mpqa", data_dir=mirror)
    path.write_bytes(b"0 good\n7 bad\n")
    with pytest.raises(ValueError, match=r"mpqa\.all, line 2: label 7 is out of range"):
        load_text_task("mpqa", data_dir=mirror)


def test_tweeteval_line_count_mismatch(mirror):
    labels = mirror / "text" / "tweeteval" / "irony" / "val_labels.txt"
    labels.write_text("0\n1\n0\n")
    with pytest.raises(ValueError, match=r"val_text\.txt has 4 lines but .*val_labels\.txt has 3"):
        load_text_task("irony", data_dir=mirror)


# --- downloading (with a fake network) ---------------------------------------------------


def test_download_path_reads_the_same_as_the_mirror(mirror, tmp_path, monkeypatch):
    remote = {text_module.SENTEVAL_URL.format(file=p.name): p for p in (mirror / "text" / "senteval").iterdir()}
    for p in (mirror / "text" / "tweeteval").rglob("*.txt"):
        folder = p.parent.relative_to(mirror / "text" / "tweeteval").as_posix()
        folder = folder.replace("hillary", "hilary")  # served only under the old spelling
        remote[text_module.TWEETEVAL_URL.format(task=folder, file=p.name)] = p
    fetched = []

    def fake_fetch(url: str, dest: Path) -> None:
        if url not in remote:
            raise urllib.error.HTTPError(url, 404, "Not Found", None, None)
        fetched.append(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(remote[url].read_bytes())

    monkeypatch.setattr(text_module, "_fetch", fake_fetch)
    monkeypatch.delenv("DATA_DIR", raising=False)
    monkeypatch.setenv("MERGE_DOWNLOAD_DIR", str(tmp_path / "downloads"))
    downloaded = load_text_task("mr")
    assert (tmp_path / "downloads" / "text" / "senteval" / "rt-polarity.all").is_file()
    assert downloaded.test.texts == load_text_task("mr", data_dir=mirror).test.texts
    assert any("downloaded from" in note for note in downloaded.notes)
    stance = load_text_task("stance_hillary")
    assert len(stance.train) == 12
    assert (tmp_path / "downloads" / "text" / "tweeteval" / "stance" / "hillary" / "train_text.txt").is_file()
    count = len(fetched)
    load_text_task("mr"), load_text_task("stance_hillary")
    assert len(fetched) == count  # the second run reads the downloaded copies


def test_real_fetch_is_atomic_on_failure(tmp_path, monkeypatch):
    def broken(url, timeout):
        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(text_module.urllib.request, "urlopen", broken)
    monkeypatch.delenv("DATA_DIR", raising=False)
    monkeypatch.setenv("MERGE_DOWNLOAD_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="set DATA_DIR"):
        load_text_task("cr")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no partial file left


# --- a user's own data -------------------------------------------------------------------


def test_user_csv_txt_and_folder(tmp_path):
    csv_file = tmp_path / "mine.csv"
    rows = "".join(f'{i % 3},"text {i}, with a comma"\n' for i in range(30))
    csv_file.write_text("label,text\n" + rows)
    task = load_text_task(str(csv_file))
    assert task.classes == ["0", "1", "2"] and len(_all_texts(task)) == 30
    assert (len(task.train), len(task.validation), len(task.test)) == (24, 3, 3)
    assert "text 0, with a comma" in _all_texts(task)

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "train.txt").write_bytes(_labelled(20, 2, "x"))
    (folder / "test.tsv").write_bytes(b"label\ttext\n0\tone\n1\ttwo\n")  # a .tsv needs a header
    task = load_text_task(str(folder))
    assert task.test.texts == ["one", "two"] and (len(task.train), len(task.validation)) == (18, 2)

    with pytest.raises(FileNotFoundError, match="no such file"):
        load_text_task(str(tmp_path / "absent.csv"))
    (tmp_path / "gaps.txt").write_bytes(b"0 a\n2 b\n")
    with pytest.raises(ValueError, match=r"gaps\.txt: label 1 has no training examples.*0\.\.C-1 without gaps"):
        load_text_task(str(tmp_path / "gaps.txt"))


def test_subsample_is_stratified_and_deterministic(mirror):
    split = load_text_task("trec", data_dir=mirror).train
    small = subsample(split, 12, seed=3)
    assert len(small) == 12 and np.bincount(small.labels).tolist() == [2] * 6
    assert small.texts == subsample(split, 12, seed=3).texts
    assert len(subsample(split, 10_000)) == len(split)
    labels = np.arange(100) % 4
    parts = stratified_split(labels, (0.1, 0.1), seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(100))  # a partition
    # 25 per class: 2.5 rounds half up to 3 per class in each held-out part
    assert [np.bincount(labels[p], minlength=4).tolist() for p in parts] == [[19] * 4, [3] * 4, [3] * 4]
    assert not np.array_equal(parts[1], stratified_split(labels, (0.1, 0.1), seed=1)[1])


# --- vision ------------------------------------------------------------------------------


def test_vision_mirror_npz_with_seeded_validation(mirror):
    task = load_vision_task("mnist", data_dir=mirror)
    assert task.train.images.dtype == np.uint8 and task.train.images.shape[1:] == (28, 28, 1)
    assert (len(task.train), len(task.validation), len(task.test)) == (40, 10, 20)
    assert np.bincount(task.validation.labels).tolist() == [1] * 10
    again = load_vision_task("mnist", data_dir=mirror)
    assert np.array_equal(task.validation.images, again.validation.images)
    with pytest.raises(FileNotFoundError, match=r"usps\.npz(.|\n)*unset DATA_DIR"):
        load_vision_task("usps", data_dir=mirror)


_constructed: list[str] = []


class _FakeTorchvision:
    """Tiny stand-ins for torchvision datasets, returning (PIL image, int) like the real ones."""

    def __init__(self, root, train=True, split=None, download=False):
        _constructed.append(type(self).__name__)
        self.n = 12 if (train if split is None else split == "train") else 6

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return Image.fromarray(np.full(self.shape, i * 10, dtype=np.uint8)), i % self.classes


class FakeMNIST(_FakeTorchvision):
    shape, classes = (28, 28), 10  # mode "L"


class FakeGTSRB(_FakeTorchvision):
    shape, classes = (40, 36, 3), 43  # photos of varying size: resized to 32x32


def test_torchvision_download_is_converted_and_cached(tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    monkeypatch.setattr(torchvision.datasets, "GTSRB", FakeGTSRB)
    monkeypatch.delenv("DATA_DIR", raising=False)
    monkeypatch.setenv("MERGE_DOWNLOAD_DIR", str(tmp_path))
    mnist = load_vision_task("mnist")
    assert (tmp_path / "vision" / "mnist.npz").is_file()
    assert mnist.train.images.shape[1:] == (28, 28, 1) and mnist.train.images.dtype == np.uint8
    assert len(mnist.test) == 6 and mnist.test.images[5].max() == 50
    assert any("mirror holds subsets" in note for note in mnist.notes)
    gtsrb = load_vision_task("gtsrb")
    assert gtsrb.test.images.shape == (6, 32, 32, 3) and len(gtsrb.classes) == 43
    built = len(_constructed)
    again = load_vision_task("mnist")
    assert len(_constructed) == built  # the second run reads the saved .npz
    assert np.array_equal(again.test.images, mnist.test.images)


class FakeKMNIST(FakeMNIST):
    pass


class FakeEuroSAT(_FakeTorchvision):
    """One set of 64x64 RGB photos, no train/test split (torchvision's EuroSAT is an ImageFolder)."""

    shape, classes = (64, 64, 3), 10

    def __init__(self, root, download=False):
        _constructed.append("FakeEuroSAT")
        self.n = 50  # 5 per class

    # Red says the label (to check that the split keeps image and label together); green is
    # the same noise in every image (to check the resizing filter).
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)

    def __getitem__(self, i):
        image = np.zeros(self.shape, dtype=np.uint8)
        image[..., 0], image[..., 1] = 20 * (i % 10), self.noise
        return Image.fromarray(image), i % 10


EUROSAT_CLASSES = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                   "PermanentCrop", "Residential", "River", "SeaLake"]


def test_eurosat_and_kmnist_downloads(tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "EuroSAT", FakeEuroSAT)
    monkeypatch.setattr(torchvision.datasets, "KMNIST", FakeKMNIST)
    monkeypatch.delenv("DATA_DIR", raising=False)
    monkeypatch.setenv("MERGE_DOWNLOAD_DIR", str(tmp_path))
    eurosat = load_vision_task("eurosat")
    with np.load(tmp_path / "vision" / "eurosat.npz") as f:
        assert sorted(f.files) == ["classes", "x_test", "x_train", "y_test", "y_train"]
        assert f["x_train"].shape == (40, 32, 32, 3) and f["x_test"].shape == (10, 32, 32, 3)  # 80/20, resized
        assert f["x_train"].dtype == np.uint8 and f["y_train"].dtype == np.int64
        assert np.bincount(f["y_test"]).tolist() == [1] * 10  # class-stratified
        assert np.abs(f["x_train"][:, 5, 5, 0].astype(int) - 20 * f["y_train"]).max() <= 1  # pairs kept
        lanczos = np.asarray(Image.fromarray(FakeEuroSAT.noise).resize((32, 32), Image.Resampling.LANCZOS))
        assert all(np.array_equal(green, lanczos) for green in f["x_test"][..., 1])  # as the mirror was made
        assert f["classes"].tolist() == EUROSAT_CLASSES
    assert eurosat.classes == EUROSAT_CLASSES and any("80/20" in n and "Lanczos" in n for n in eurosat.notes)
    kmnist = load_vision_task("kmnist")
    assert kmnist.classes == ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]
    assert kmnist.test.images.shape == (6, 28, 28, 1) and len(kmnist.train) + len(kmnist.validation) == 12


def _mnist_m_archive(top: str) -> bytes:
    """A zip laid out like the GitHub archive of the MNIST-M repository: 32x32 RGB PNGs plus label files."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(f"{top}/README.md", "# DANN")
        for split, n in (("train", 20), ("test", 10)):
            lines = []
            for i in range(n):
                png = io.BytesIO()
                Image.new("RGB", (32, 32), (20 * (i % 10), 0, 0)).save(png, "PNG")
                zf.writestr(f"{top}/mnist_m/mnist_m_{split}/{i:08d}.png", png.getvalue())
                lines.append(f"{i:08d}.png {i % 10}\n")
            zf.writestr(f"{top}/mnist_m/mnist_m_{split}_labels.txt", "".join(lines))
    return buffer.getvalue()


def test_mnist_m_download_from_the_repository_archive(tmp_path, monkeypatch):
    from lib.data import vision

    requested = []
    archive = _mnist_m_archive("Domain-Adversarial-Training-of-Neural-Networks-main")

    def fake_urlopen(url, timeout):  # here the default branch is "main"; the repository's is "master"
        requested.append(url)
        if not url.endswith("/archive/refs/heads/main.zip"):
            raise urllib.error.HTTPError(url, 404, "Not Found", None, None)
        return io.BytesIO(archive)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    monkeypatch.delenv("DATA_DIR", raising=False)
    monkeypatch.setenv("MERGE_DOWNLOAD_DIR", str(tmp_path))
    task = load_vision_task("mnist_m")
    assert [url.rsplit("/", 1)[1] for url in requested] == ["master.zip", "main.zip"]  # a 404 moves on
    assert requested[0].startswith(f"https://github.com/{vision.MNIST_M_REPOSITORY}/archive/")
    with np.load(tmp_path / "vision" / "mnist_m.npz") as f:
        assert f["x_train"].shape == (20, 32, 32, 3) and f["x_test"].shape == (10, 32, 32, 3)
        assert f["y_test"].tolist() == list(range(10)) and f["classes"].tolist() == [str(d) for d in range(10)]
        assert np.array_equal(f["x_train"][:, 0, 0, 0], 20 * f["y_train"])
    assert any("MNIST-M PNGs" in n for n in task.notes)
    load_vision_task("mnist_m")
    assert len(requested) == 2  # the second run reads the saved .npz


def test_image_folders(tmp_path):
    flat = tmp_path / "shapes"
    for c, colour in (("circle", 40), ("square", 200)):
        (flat / c).mkdir(parents=True)
        for i in range(10):
            size = (8, 6) if i else (10, 12)
            Image.new("RGB", size, (colour, i, 0)).save(flat / c / f"{i}.png")
    task = load_vision_task(str(flat))
    assert task.classes == ["circle", "square"]
    assert task.train.images.shape == (16, 12, 10, 3)  # all resized to the first image's size
    assert (len(task.validation), len(task.test)) == (2, 2)

    split = tmp_path / "digits"
    for part, n in (("train", 10), ("test", 3)):
        for c in ("a", "b"):
            (split / part / c).mkdir(parents=True)
            for i in range(n):
                Image.new("L", (5, 5), i).save(split / part / c / f"{i}.png")
    task = load_vision_task(str(split), image_size=4)
    assert task.test.images.shape == (6, 4, 4, 1) and (len(task.train), len(task.validation)) == (18, 2)


def test_prepare_images():
    gray = np.full((2, 28, 28, 1), 255, dtype=np.uint8)
    x = prepare_images(gray)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    expected = (1 - torch.tensor([0.4914, 0.4822, 0.4465])) / torch.tensor([0.2470, 0.2435, 0.2616])
    assert torch.allclose(x[0, :, 5, 5], expected, atol=1e-5)
    rgb = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    plain = prepare_images(rgb, mean=(0, 0, 0), std=(1, 1, 1))
    assert torch.allclose(plain, torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255)


# --- metrics -----------------------------------------------------------------------------


def test_metrics_against_hand_computed_cases():
    y_true, y_pred = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
    # per-class F1 = 2TP / (2TP + FP + FN): class 0: 2/4, class 1: 4/5, class 2: 2/3
    assert confusion_matrix(y_true, y_pred, 3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    assert macro_f1(y_true, y_pred, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert macro_f1(y_true, y_pred, 5) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)  # absent classes left out
    assert official_metric("stance_f1", y_true, y_pred, 3) == pytest.approx((0.8 + 2 / 3) / 2)
    assert official_metric("macro_recall", y_true, y_pred, 3) == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert official_metric("irony_f1", [1, 1, 0, 0], [1, 0, 1, 0], 2) == pytest.approx(0.5)
    assert official_metric("irony_f1", [0, 0], [0, 0], 2) == 0.0  # no ironic tweet: F1 is 0
    assert official_metric("macro_f1", [0, 0], [0, 0], 2) == 1.0
    assert official_metric("accuracy", np.array([1, 2]), torch.tensor([1, 0]), 3) == 0.5
    with pytest.raises(ValueError, match="Unknown metric"):
        official_metric("f1", y_true, y_pred, 3)
    with pytest.raises(ValueError, match="outside"):
        macro_f1([0, 1], [0, 3], 2)
    # Matthews: TP 2, TN 2, FP 1, FN 0 -> (2*2 - 1*0) / sqrt(3*2*3*2) = 2/3; multi-class as scikit-learn
    assert official_metric("matthews", [0, 0, 0, 1, 1], [0, 0, 1, 1, 1], 2) == pytest.approx(2 / 3)
    assert official_metric("matthews", y_true, y_pred, 3) == pytest.approx(0.5222329678670935)
    assert official_metric("matthews", [0, 1, 1], [1, 1, 1], 2) == 0.0  # constant prediction


# --- the real mirror (skipped where it is absent) ----------------------------------------

REAL = SHARED_DATA  # skipped where absent, failed under CI (conftest.py)
needs_real = needs_data("text/senteval", "text/tweeteval")

# (train, validation, test) as loaded with seed 0, and the label-only lines dropped; see data/README.md.
REAL_SIZES = {
    "mr": ((8530, 1066, 1066), 0),
    "cr": ((3015, 378, 378), 4),
    "subj": ((8000, 1000, 1000), 0),
    "mpqa": ((8483, 1060, 1060), 3),
    "sst2": ((6920, 872, 1821), 0),
    "sst5": ((8544, 1101, 2210), 0),
    "trec": ((4906, 546, 500), 0),
    "emoji": ((45000, 5000, 50000), 0),
    "emotion": ((3257, 374, 1421), 0),
    "hate": ((8993, 999, 2970), 8),
    "irony": ((2862, 955, 784), 0),
    "offensive": ((11916, 1324, 860), 0),
    "stance": ((2620, 294, 1249), 0),
}


def _nonempty_lines(path: Path) -> int:
    return sum(1 for line in path.read_bytes().split(b"\n") if line.strip())


@needs_real
@pytest.mark.parametrize("name", sorted(REAL_SIZES))
def test_real_text_sizes_match_the_readme(name):
    task = load_text_task(name, data_dir=REAL)
    sizes, dropped = REAL_SIZES[name]
    assert (len(task.train), len(task.validation), len(task.test)) == sizes
    noted = sum(int(n.split("dropped ")[1].split()[0]) for n in task.notes if "dropped " in n and "->" in n)
    assert noted == dropped  # every dropped line is in the notes
    if name in text_module._SENTEVAL:
        files = [REAL / "text" / "senteval" / f for f in text_module._SENTEVAL[name][0]]
    else:
        files = list((REAL / "text" / "tweeteval" / name).rglob("*_labels.txt"))  # one per tweet
    assert sum(sizes) == sum(_nonempty_lines(f) for f in files) - dropped  # no line lost silently


@needs_real
@pytest.mark.parametrize("name", ["mr", "cr", "subj", "mpqa"])
def test_real_carved_splits_partition_the_file(name):
    file = REAL / "text" / "senteval" / text_module._SENTEVAL[name][0][0]
    task = load_text_task(name, data_dir=REAL)
    # Same multiset of examples as the file: nothing lost, nothing in two splits.
    assert sorted(_all_texts(task)) == sorted(text_module._read_labelled(file, 2).texts)
    assert load_text_task(name, data_dir=REAL).test.texts == task.test.texts  # deterministic
    assert load_text_task(name, data_dir=REAL, seed=1).test.texts != task.test.texts


@pytest.mark.parametrize(
    "name, image_shape, sizes, classes",
    [
        pytest.param("eurosat", (32, 32, 3), (12000, 3000), EUROSAT_CLASSES, marks=needs_data("vision/eurosat.npz")),
        pytest.param("kmnist", (28, 28, 1), (8000, 2000), ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
                     marks=needs_data("vision/kmnist.npz")),
        pytest.param("mnist_m", (32, 32, 3), (6000, 1500), [str(d) for d in range(10)],
                     marks=needs_data("vision/mnist_m.npz")),
    ],
)
def test_real_new_vision_tasks(name, image_shape, sizes, classes):
    task = load_vision_task(name, data_dir=REAL)
    assert (len(task.train) + len(task.validation), len(task.test)) == sizes
    assert task.train.images.shape[1:] == image_shape and task.test.images.dtype == np.uint8
    assert task.classes == classes and task.metric == "accuracy"
    assert set(np.unique(task.test.labels)) == set(range(10))
    assert any(note.startswith(f"mirror {name}.npz is") for note in task.notes)  # labelled as a subset
    if name == "kmnist":
        assert any("re-split of the KMNIST test set" in note for note in task.notes)


@needs_data("vision/usps.npz")
def test_real_vision_usps():
    task = load_vision_task("usps", data_dir=REAL)
    assert (len(task.train) + len(task.validation), len(task.test)) == (7291, 2007)
    assert task.train.images.shape[1:] == (16, 16, 1) and task.train.images.dtype == np.uint8
