"""A user's own tasks: strict parsing of text files and image folders, and task.yaml.

Every bad case builds a tiny file in tmp_path, the way a careful user could get it wrong,
and checks three things about the error: its type, that it names the file (and the line,
where there is one), and that it says how to fix the problem. The good cases check the
formats a user is likely to have (Excel's byte-order mark, pandas' column order, quoted
commas, GLUE's .tsv) and that every default and every ignored file shows up in the notes.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib.data import load_text_task, load_vision_task
from lib.data.task_description import read_task_description

# 20 examples, 10 per class: enough to carve a validation and a test example of each class.
ROWS = "".join(f"{i % 2},text number {i}\n" for i in range(20))
HEADER = "label,text\n"


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def _fails(load, target: Path, names: Path, fix: str, line: int | None = None, error=ValueError):
    """``load(target)`` raises ``error`` naming ``names`` (at ``line``) and containing ``fix``."""
    with pytest.raises(error) as caught:
        load(str(target))
    message = str(caught.value)
    where = f"{names}, line {line}" if line is not None else str(names)
    assert where in message, f"{where!r} not in {message!r}"
    assert re.search(fix, message, re.DOTALL), f"{fix!r} not in {message!r}"
    return message


def _all_texts(task) -> list[str]:
    return task.train.texts + task.validation.texts + task.test.texts


# --- text: malformed files -------------------------------------------------------------

BAD_TABLES = {
    # name: (file name, content, line named in the error or None, the fix the message gives)
    "unquoted comma": ("a.csv", HEADER + ROWS + "1,good, really\n", 22, r"must be in double quotes"),
    "extra column": ("a.csv", "label,text,source\n0,a,web\n", 1, r"extra column\(s\) \['source'\].*Remove the others"),
    "other header": ("a.csv", "review,stars\ngood,1\n", 1, r"Name the two columns label and text \(or sentence\)"),
    "no header": ("a.csv", ROWS, 1, r"no header line.*'label,text'"),
    "pandas index": ("a.csv", ",label,text\n0,0,a\n1,1,b\n", 1, r"index=False"),
    "semicolons": ("a.csv", "label;text\n0;a\n", 1, r"semicolons.*comma-separated"),
    "tabs in a .csv": ("a.csv", "label\ttext\n0\ta\n", 1, r"rename it to \.tsv"),
    "commas in a .tsv": ("a.tsv", "label,text\n0,a\n", 1, r"rename it to \.csv"),
    "tsv without header": ("a.tsv", "0\tgood\n1\tbad\n", 1, r"no header line.*label<TAB>text"),
    "tab inside a tsv text": ("a.tsv", "label\ttext\n0\tgood\tfun\n", 2, r"cannot contain a tab"),
    "text after a closing quote": ("a.csv", HEADER + '0,"good"fun\n', 2, r"malformed quoting.*double quotes"),
    "one field": ("a.csv", HEADER + "0,a\n1\n", 3, r"1 field\(s\) where the header has 2.*needs a label and a text, separated by a comma"),
    "empty file": ("a.csv", "", None, r"is empty.*header line"),
    "header only": ("a.csv", HEADER, None, r"no examples\. Add one example per line"),
    "only empty texts": ("a.csv", HEADER + "0,\n1, \n", None, r"no examples \(2 rows with a label and no text\)"),
    "label not an integer": ("a.csv", HEADER + "0,good\npositive,bad\n", 3, r"not an integer\. Labels must be integers 0\.\.C-1"),
    "negative label": ("a.csv", HEADER + "0,good\n-1,bad\n", 3, r"out of range.*Labels must be integers 0\.\.C-1"),
    "header in a .txt": ("a.txt", "label text\n0 good\n", 1, r"A \.txt file has no header"),
    "one class": ("a.csv", HEADER + "".join(f"0,t{i}\n" for i in range(9)), None, r"only one class.*Add examples of another class"),
    "gap in the labels": ("a.csv", HEADER + ROWS.replace("1,", "2,"), None, r"label 1 has no training examples.*renumber"),
    "too small to carve": ("a.csv", HEADER + "0,a\n1,b\n0,c\n1,d\n0,e\n1,f\n", None,
                           r"too few examples to carve.*at least 5.*provide validation and test data"),
}


@pytest.mark.parametrize("case", sorted(BAD_TABLES))
def test_malformed_text_file_is_an_error_naming_file_line_and_fix(tmp_path, case):
    file, content, line, fix = BAD_TABLES[case]
    path = _write(tmp_path / file, content)
    _fails(load_text_task, path, path, fix, line)


def test_line_numbers_count_quoted_line_breaks(tmp_path):
    # The second example spans lines 3-4, so the bad label after it is on line 5, not "row 4".
    path = _write(tmp_path / "a.csv", HEADER + '0,one\n1,"two\nlines"\nx,three\n')
    _fails(load_text_task, path, path, "not an integer", line=5)
    # A bad example that spans lines 3-4 is reported where it starts.
    path.write_text(HEADER + '0,one\nx,"two\nlines"\n1,three\n')
    _fails(load_text_task, path, path, "not an integer", line=3)


def test_class_present_only_in_test(tmp_path):
    folder = tmp_path / "task"
    _write(folder / "train.csv", HEADER + ROWS)
    test = _write(folder / "test.csv", HEADER + "0,a\n1,b\n2,c\n")
    _fails(load_text_task, folder, folder / "train.csv", r"label 2 has no training examples \(it appears only in test\.csv\)")
    test.write_text(HEADER)  # a given split with no examples
    _fails(load_text_task, folder, test, r"no examples")


def test_folder_without_train_file_lists_what_it_holds(tmp_path):
    folder = tmp_path / "task"
    _write(folder / "data.csv", HEADER + ROWS)
    _fails(load_text_task, folder, folder, r"It holds: data\.csv.*rename your files", error=FileNotFoundError)
    _fails(load_text_task, tmp_path / "absent" / "x.csv", tmp_path / "absent" / "x.csv", "no such file",
           error=FileNotFoundError)


def test_carved_validation_too_small_for_its_fraction(tmp_path):
    folder = tmp_path / "task"
    _write(folder / "train.csv", HEADER + ROWS)
    _write(folder / "test.csv", HEADER + "0,a\n1,b\n")
    _write(folder / "task.yaml", "validation_fraction: 0.02\n")  # 0.02 of 10 rounds to 0
    message = _fails(load_text_task, folder, folder / "train.csv", r"carve validation \(0\.02 of each class\)")
    assert "test (" not in message and "validation_fraction in the task description" in message


# --- the task description --------------------------------------------------------------


def test_task_description_classes_metric_and_name_for_a_file(tmp_path):
    path = _write(tmp_path / "reviews.csv", HEADER + ROWS)
    _write(tmp_path / "reviews.task.yaml", "name: movie reviews\nclasses: [negative, positive]\nmetric: macro_f1\n")
    task = load_text_task(str(path))
    assert (task.name, task.classes, task.metric) == ("movie reviews", ["negative", "positive"], "macro_f1")
    assert any("task description" in n and "reviews.task.yaml" in n for n in task.notes)
    assert not any("by default" in n for n in task.notes)


def test_task_description_json_in_a_folder_with_fractions(tmp_path):
    folder = tmp_path / "task"
    _write(folder / "train.csv", HEADER + "".join(f"{i % 2},t{i}\n" for i in range(40)))
    _write(folder / "task.json", json.dumps({"metric": "matthews", "validation_fraction": 0.25, "test_fraction": 0.25}))
    task = load_text_task(str(folder))
    assert task.metric == "matthews" and (len(task.train), len(task.validation), len(task.test)) == (20, 10, 10)
    assert any("validation 0.25 and test 0.25" in n for n in task.notes)


def test_without_description_the_defaults_are_in_the_notes(tmp_path):
    path = _write(tmp_path / "plain.csv", HEADER + ROWS)
    task = load_text_task(str(path))
    assert task.metric == "accuracy" and task.classes == ["0", "1"] and task.name == "plain"
    notes = "\n".join(task.notes)
    assert "no task description (looked for plain.task.yaml" in notes
    assert "metric accuracy by default" in notes and "name 'plain': the file name" in notes
    assert "classes: the labels 0..1, unnamed" in notes
    assert "validation 0.1 and test 0.1 of each class" in notes


def test_labels_out_of_range_of_the_described_classes(tmp_path):
    path = _write(tmp_path / "a.csv", HEADER + ROWS + "2,three\n")
    description = _write(tmp_path / "a.task.yaml", "classes: [negative, positive]\n")
    _fails(load_text_task, path, path, rf"out of range \(expected 0\.\.1\)\. {re.escape(str(description))} lists 2 classes", 22)
    path.write_text(HEADER + ROWS)
    description.write_text("classes: [negative, positive, neutral]\n")
    _fails(load_text_task, path, path, r"class 'neutral' \(label 2\) has no training examples.*remove it from classes")


BAD_DESCRIPTIONS = {
    "unknown key": ("metrics: macro_f1\n", (r"unknown key\(s\) metrics\. Allowed keys: name, classes, metric, "
                                            r"validation_fraction, test_fraction")),
    "unknown metric": ("metric: f1\n", r"metric must be one of accuracy, macro_f1.*matthews; got 'f1'"),
    "classes not a list": ("classes: negative\n", r"classes must be a list of class names"),
    "one class name": ("classes: [spam]\n", r"at least two non-empty class names"),
    "repeated class": ("classes: [a, b, a]\n", r"distinct names \(a repeated\)"),
    "fraction above 1": ("test_fraction: 10\n", r"test_fraction must be a number between 0 and 1"),
    "fractions sum to 1": ("validation_fraction: 0.5\ntest_fraction: 0.5\n", r"leaves nothing to train on"),
    "name not a string": ("name: [a]\n", r"name must be a non-empty string"),
    "not a mapping": ("- a\n- b\n", r"expected key: value pairs"),
    "bad YAML": ("classes: [a, b\n", r"not valid YAML.*line"),
    "metric needs 3 classes": ("metric: stance_f1\n", r"needs at least 3 classes.*Choose another metric"),
}


@pytest.mark.parametrize("case", sorted(BAD_DESCRIPTIONS))
def test_bad_task_description_names_the_file_and_the_fix(tmp_path, case):
    content, fix = BAD_DESCRIPTIONS[case]
    path = _write(tmp_path / "a.csv", HEADER + ROWS)
    description = _write(tmp_path / "a.task.yaml", content)
    _fails(load_text_task, path, description, fix)


def test_bad_json_and_two_descriptions(tmp_path):
    folder = tmp_path / "task"
    _write(folder / "train.csv", HEADER + ROWS)
    description = _write(folder / "task.json", '{"metric": "accuracy",}')
    _fails(load_text_task, folder, description, r"not valid JSON.*line 1")
    description.write_text("{}")
    _write(folder / "task.yaml", "")
    _fails(load_text_task, folder, folder, r"several task descriptions \(task\.yaml, task\.json\); keep one")


def test_read_task_description_keeps_what_it_is_given(tmp_path):
    path = _write(tmp_path / "task.yaml", "\ufeffclasses: [0, 1, 10]\ntest_fraction: 0.2\n")  # BOM, integer names
    description = read_task_description(path)
    assert description.classes == ("0", "1", "10") and description.fraction("test") == 0.2
    assert description.fraction("validation") == 0.1 and description.effective_metric == "accuracy"


# --- text: what a careful user's good files look like ----------------------------------


def test_excel_bom_sentence_label_order_and_quoting(tmp_path):
    # As Excel and pandas write it: a byte-order mark, the text column first, quoted commas,
    # doubled quotes, a quoted line break; then a blank line and a label with no text.
    rows = "".join(f'"a text, with comma {i}",{i % 2}\n' for i in range(20))
    rows += '"she said ""hi""",1\n"two\nlines",0\n\n,0\n'
    path = _write(tmp_path / "my.task.csv", b"\xef\xbb\xbf" + ("Sentence,Label\n" + rows).encode())
    task = load_text_task(str(path))
    texts = _all_texts(task)
    assert task.name == "my.task" and len(texts) == 22
    assert "a text, with comma 3" in texts and 'she said "hi"' in texts and "two\nlines" in texts
    labels = dict(zip(texts, np.concatenate([task.train.labels, task.validation.labels, task.test.labels])))
    assert labels["a text, with comma 3"] == 1 and labels['she said "hi"'] == 1
    describe = next(n for n in task.notes if n.startswith("my.task.csv"))
    assert "byte-order mark removed" in describe and "1 blank lines skipped" in describe
    assert "dropped 1 with a label and no text" in describe and describe.endswith("-> 22 examples")


def test_glue_style_tsv_keeps_quotes(tmp_path):
    # GLUE's .tsv files are not quoted: a text that starts with a quote keeps it as written.
    rows = "".join(f'"Quoted" at the start {i}\t{i % 2}\n' for i in range(20))
    path = _write(tmp_path / "sst.tsv", "sentence\tlabel\n" + rows)
    task = load_text_task(str(path))
    assert '"Quoted" at the start 4' in _all_texts(task)


def test_dotted_folder_and_relative_path(tmp_path, monkeypatch):
    folder = tmp_path / "data" / "my.data"
    _write(folder / "train.csv", HEADER + ROWS)
    _write(folder / "notes.txt", "where the data came from")
    _write(folder / ".DS_Store", b"\0")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    task = load_text_task("../data/my.data")
    assert task.name == "my.data"
    assert any("ignored 2 entries" in n and ".DS_Store, notes.txt" in n for n in task.notes)
    assert load_text_task("../data/my.data/train.csv").name == "train"


# --- image folders -----------------------------------------------------------------------


def _image(path: Path, value: int = 0, size=(6, 6), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 0)).save(path)
    return path


def _image_folder(root: Path, classes, per_class: int = 10) -> Path:
    for c in classes:
        for i in range(per_class):
            _image(root / str(c) / f"{i}.png", value=10 * len(str(c)) + i)
    return root


def test_class_folders_in_natural_order(tmp_path):
    folder = _image_folder(tmp_path / "digits", range(12))
    task = load_vision_task(str(folder))
    assert task.classes == [str(c) for c in range(12)]  # "2" before "10", not after "11"
    assert task.metric == "accuracy"
    # Folder "2" gets label 2: its images (value 10 + i) are labelled 2.
    red = np.concatenate([task.train.images, task.validation.images, task.test.images])[..., 0].reshape(-1, 36)[:, 0]
    labels = np.concatenate([task.train.labels, task.validation.labels, task.test.labels])
    assert set(labels[red < 20].tolist()) <= set(range(10)) and set(labels[red >= 20].tolist()) == {10, 11}
    assert any("natural order (2 before 10): 0, 1, 2, 3" in n for n in task.notes)


def test_task_yaml_fixes_class_order_name_and_metric(tmp_path):
    folder = _image_folder(tmp_path / "pets", ["cat", "dog", "bird"])
    _write(folder / "task.yaml", "name: pets v2\nclasses: [dog, cat, bird]\nmetric: macro_f1\n")
    task = load_vision_task(str(folder))
    assert (task.name, task.classes, task.metric) == ("pets v2", ["dog", "cat", "bird"], "macro_f1")
    assert not any("task.yaml" in n and "ignored" in n for n in task.notes)  # the description is not a stray file
    _write(folder / "task.yaml", "classes: [dog, cat]\n")
    _fails(load_vision_task, folder, folder / "bird", r"not listed in .*task\.yaml.*add it to classes")
    _write(folder / "task.yaml", "classes: [dog, cat, bird, fish]\n")
    _fails(load_vision_task, folder, folder, r"class 'fish' \(label 3\) has no training examples.*Add a folder")


def test_stray_and_hidden_files_are_listed(tmp_path):
    folder = _image_folder(tmp_path / "shapes", ["circle", "square"])
    _write(folder / "notes.txt", "x")
    _write(folder / ".DS_Store", b"\0")
    _write(folder / "circle" / "Thumbs.db", b"\0")
    for i in range(5):
        _write(folder / "square" / f"label{i}.json", "{}")
    task = load_vision_task(str(folder))
    note = next(n for n in task.notes if n.startswith("ignored"))
    assert note.startswith("ignored 8 entries") and ".DS_Store" in note and "and 3 more" in note
    assert len(task.train) + len(task.validation) + len(task.test) == 20


def test_empty_class_folder_is_an_error(tmp_path):
    folder = _image_folder(tmp_path / "digits", range(3))
    (folder / "10").mkdir()
    _write(folder / "10" / ".DS_Store", b"\0")  # only a hidden file: still empty
    _fails(load_vision_task, folder, folder / "10", r"empty class folder.*add images to it or remove it")


@pytest.mark.parametrize("damage", ["truncated", "not an image"])
def test_unreadable_image_names_the_file(tmp_path, damage):
    folder = _image_folder(tmp_path / "digits", range(2))
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)  # does not compress away
    Image.fromarray(noise).save(buffer, "PNG")
    half = buffer.getvalue()[: len(buffer.getvalue()) // 2]  # as an interrupted download leaves it
    bad = _write(folder / "1" / "7.png", half if damage == "truncated" else b"<html>404</html>")
    _fails(load_vision_task, folder, bad, r"cannot read this image.*re-save or download it again, or delete it")


def test_image_folder_structure_errors(tmp_path):
    one = _image_folder(tmp_path / "one", ["only"])
    _fails(load_vision_task, one, one, r"only one class \('only'\).*Add examples of another class")
    split = tmp_path / "split"
    _image_folder(split / "train", ["a", "b"])
    _image_folder(split / "test", ["a", "c"], per_class=2)
    _fails(load_vision_task, split, split / "test" / "c", r"not a folder in .*train.*add training images of it")
    small = _image_folder(tmp_path / "small", ["a", "b"], per_class=3)
    _fails(load_vision_task, small, small, r"too few examples to carve.*at least 5")
    _fails(load_vision_task, tmp_path / "nowhere" / "x", tmp_path / "nowhere" / "x", "no such folder",
           error=FileNotFoundError)


def test_split_folders_carve_validation_and_list_top_level_strays(tmp_path):
    folder = tmp_path / "split"
    _image_folder(folder / "train", ["a", "b"])
    _image_folder(folder / "test", ["a", "b"], per_class=2)
    _write(folder / "README.md", "x")
    task = load_vision_task(str(folder))
    assert (len(task.train), len(task.validation), len(task.test)) == (18, 2, 4)
    assert any(n.startswith("ignored 1 entry") and "README.md" in n for n in task.notes)
    assert any("carved from train" in n and "validation 0.1" in n for n in task.notes)
