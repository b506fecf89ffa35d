"""Paper-scale text building blocks (issue 12; METHODS.md §7-8): RoBERTa-base on eight GLUE tasks,
on CPU with tiny fakes.

The model is a tiny random RoBERTa of the real architecture (transformers' ``RobertaConfig`` with
2 layers of width 16) and a word-level tokenizer over a few words with RoBERTa's special tokens
and pair format, built offline (``paper_fakes``, shared with the GLUE track's tests). The datasets are a few dozen rows per split in the real on-disk
formats: a ``DatasetDict`` saved with ``save_to_disk`` and a hub snapshot's parquet files, with
GLUE's column names, label names and hidden (-1) test labels. Every text carries its split, row
and label, so a test can check that texts and labels stay aligned. Nothing touches the network.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read at import by huggingface_hub / datasets: never the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from lib.paper import glue as G

from paper_fakes import (GLUE_KNOWN, SPECIALS, WORDS, fake_glue, glue_label, roberta_classifier, roberta_config,
                         roberta_tokenizer, write_roberta_expert)

# one thread; no mirror and a private download folder (nothing written into data/downloads)
pytestmark = pytest.mark.usefixtures("one_thread", "private_downloads")

KNOWN = GLUE_KNOWN


# ============================================================================ tiny tokenizer and model
@pytest.fixture(scope="module")
def tokenizer():
    return roberta_tokenizer()


_config, _classifier = roberta_config, roberta_classifier


def _sentences(n: int = 5) -> G.GlueSplit:
    rng = np.random.default_rng(0)
    first = [" ".join(rng.choice(WORDS, rng.integers(2, 9))) for _ in range(n)]
    second = [" ".join(rng.choice(WORDS, rng.integers(1, 6))) for _ in range(n)]
    return G.GlueSplit(first, second, np.zeros(n, dtype=np.int64), np.arange(n))


# ============================================================================ the task file
def test_task_file_names_exactly_the_eight_tasks_with_their_label_counts():
    tasks = G.glue_tasks()
    assert tuple(tasks) == G.PAPER_TEXT_TASKS == tuple(KNOWN)
    for name, (num_labels, fields) in KNOWN.items():
        spec = tasks[name]
        assert (spec.num_labels, spec.fields, spec.config) == (num_labels, fields, name), name
        assert spec.is_pair == (len(fields) == 2)
        assert (spec.regression is not None) == (name == "stsb")
    metrics = {name: spec.metrics for name, spec in tasks.items()}
    assert metrics == {"cola": ("matthews",), "sst2": ("accuracy",), "mrpc": ("f1", "accuracy"),
                       "stsb": ("pearson", "spearman"), "qqp": ("f1", "accuracy"), "mnli": ("accuracy",),
                       "qnli": ("accuracy",), "rte": ("accuracy",)}
    assert tasks["mnli"].evaluation_split == "validation_matched"
    assert all(s.evaluation_split == "validation" for n, s in tasks.items() if n != "mnli")
    assert tasks["qqp"].canonical == {"train": 363846, "validation": 40430, "test": 390965}
    assert tasks["mnli"].labels == ("entailment", "neutral", "contradiction")
    protocol = G.glue_protocol()
    assert (protocol.base_model, protocol.max_length, protocol.validation_fraction) == ("FacebookAI/roberta-base", 128, 0.1)
    assert protocol.expert_sources[protocol.default_expert_source]["repo"] == "lu-vae/roberta-glue"


def test_a_task_file_with_inconsistent_labels_is_refused(tmp_path):
    text = G.TASKS_FILE.read_text().replace("    num_labels: 3\n", "    num_labels: 2\n")
    (tmp_path / "tasks.yaml").write_text(text)
    with pytest.raises(ValueError, match=r"task 'mnli': num_labels is 2 but labels names 3"):
        G.glue_tasks(tmp_path / "tasks.yaml")


# ============================================================================ data on disk
_label, _fake_glue = glue_label, fake_glue


def _assert_aligned(task: str, split: G.GlueSplit, split_name: str, fields) -> None:
    """Each example's texts name its own split, row and label."""
    columns = [split.first] + ([split.second] if split.second is not None else [])
    assert len(columns) == len(fields)
    for field, column in zip(fields, columns):
        for text, row, label in zip(column, split.rows, split.labels):
            name, where, number, gold = text.split(":")
            assert (name, where, int(number)) == (field, split_name, row)
            assert float(gold) == pytest.approx(float(label))


def _sizes(task: str) -> dict[str, int]:
    spec = G.glue_task_spec(task)
    sizes = {"train": 40, spec.evaluation_split: 7, "test" if task != "mnli" else "test_matched": 5}
    if task == "mnli":
        sizes["validation_mismatched"] = 4
    return sizes


@pytest.mark.parametrize("task", list(KNOWN))
def test_each_task_parses_from_a_saved_copy(tmp_path, task):
    num_labels, fields = KNOWN[task]
    _fake_glue(task, _sizes(task)).save_to_disk(str(tmp_path / "data" / "text_paper" / "huggingface" / task))
    loaded = G.load_glue_task(task, data_dir=tmp_path / "data")
    assert loaded.num_classes == num_labels and loaded.fields == fields and loaded.regression == (task == "stsb")
    assert (len(loaded.train), len(loaded.validation), len(loaded.test)) == (36, 4, 7)
    assert all((s.second is not None) == (len(fields) == 2) for s in (loaded.train, loaded.validation, loaded.test))
    evaluation = G.glue_task_spec(task).evaluation_split
    for split, name in ((loaded.train, "train"), (loaded.validation, "train"), (loaded.test, evaluation)):
        _assert_aligned(task, split, name, fields)
        assert split.labels.dtype == (np.float32 if task == "stsb" else np.int64)
    assert sorted(np.concatenate([loaded.train.rows, loaded.validation.rows]).tolist()) == list(range(40))
    assert any("differ from the canonical" in n for n in loaded.notes)  # 40 rows are not GLUE's train


def test_a_hub_snapshots_parquet_files_are_read_and_mnli_has_two_validation_sets(tmp_path):
    root = tmp_path / "data" / "text_paper" / "huggingface"  # = huggingface-cli download nyu-mll/glue --local-dir
    for task in ("mnli", "qqp"):
        (root / task).mkdir(parents=True)
        for split, dataset in _fake_glue(task, _sizes(task)).items():
            dataset.to_parquet(str(root / task / f"{split}-00000-of-00001.parquet"))
    matched = G.load_glue_task("mnli", data_dir=tmp_path / "data")
    _assert_aligned("mnli", matched.test, "validation_matched", KNOWN["mnli"][1])
    other = G.load_glue_task("mnli", data_dir=tmp_path / "data", evaluation_split="validation_mismatched")
    assert len(other.test) == 4
    _assert_aligned("mnli", other.test, "validation_mismatched", KNOWN["mnli"][1])
    qqp = G.load_glue_task("qqp", data_dir=tmp_path / "data")
    _assert_aligned("qqp", qqp.validation, "train", KNOWN["qqp"][1])
    with pytest.raises(ValueError, match="test labels are hidden"):
        G.load_glue_task("mnli", data_dir=tmp_path / "data", evaluation_split="test_matched")


def test_validation_is_dares_held_out_tenth_and_test_never_moves(tmp_path):
    _fake_glue("rte", {"train": 40, "validation": 7, "test": 5}).save_to_disk(
        str(tmp_path / "data" / "text_paper" / "huggingface" / "rte"))
    task = G.load_glue_task("rte", data_dir=tmp_path / "data", seed=0)
    expected = np.sort(np.random.RandomState(0).permutation(40)[36:])  # DARE: the last 10% of a seeded permutation
    assert task.validation.rows.tolist() == expected.tolist()
    assert not set(task.validation.rows) & set(task.train.rows)
    other = G.load_glue_task("rte", data_dir=tmp_path / "data", seed=1)
    assert other.validation.rows.tolist() != task.validation.rows.tolist()  # validation follows the seed
    assert other.test.rows.tolist() == task.test.rows.tolist() == list(range(7))  # the test split never does
    first = G.load_glue_task("rte", data_dir=tmp_path / "data", max_test=3)
    assert first.test.rows.tolist() == [0, 1, 2]  # Twin-Merging: the first examples of validation
    assert any("first 3 examples" in n for n in first.notes)


@pytest.mark.parametrize("task, setup, error, says", [
    ("rte", "nothing", FileNotFoundError,
     r"text_paper/huggingface/rte not found.*save_to_disk.*huggingface-cli download nyu-mll/glue --repo-type dataset"
     r".*unset DATA_DIR"),
    ("rte", "empty", FileNotFoundError, r"text_paper/huggingface/rte holds neither a saved DatasetDict"),
    ("mnli", "no evaluation split", ValueError, r"no validation_matched split \(found test_matched, train\)"),
    ("qqp", "wrong columns", ValueError, r"no column 'question1', 'question2'.*is this the 'qqp' configuration"),
    ("mnli", "wrong label order", ValueError, r"labels are named \['entailment', 'contradiction', 'neutral'\]"),
    ("rte", "hidden labels", ValueError, r"validation split: row 0 has label -1.*hidden labels are -1"),
])
def test_missing_or_wrong_mirror_files_are_clear_errors(tmp_path, task, setup, error, says):
    folder = tmp_path / "data" / "text_paper" / "huggingface" / task
    (tmp_path / "data").mkdir()
    if setup == "empty":
        folder.mkdir(parents=True)
    elif setup == "no evaluation split":
        _fake_glue(task, {"train": 4, "test_matched": 2}).save_to_disk(str(folder))
    elif setup == "wrong columns":  # QNLI's files where QQP's belong
        _fake_glue("qnli", {"train": 4, "validation": 2}).save_to_disk(str(folder))
    elif setup == "wrong label order":
        _fake_glue(task, {"train": 6, "validation_matched": 3},
                   label_names=["entailment", "contradiction", "neutral"]).save_to_disk(str(folder))
    elif setup == "hidden labels":  # a test split saved under the name validation
        copy = _fake_glue(task, {"train": 4, "test": 2})
        type(copy)({"train": copy["train"], "validation": copy["test"]}).save_to_disk(str(folder))
    with pytest.raises(error, match=says):
        G.load_glue_task(task, data_dir=tmp_path / "data")


# ============================================================================ tokens
def test_pairs_are_encoded_the_roberta_way_and_truncated(tokenizer):
    pair = G.GlueSplit(["the cat sat", "a dog"], ["is good", "who"], np.array([0, 1]), np.arange(2))
    single = G.GlueSplit(["the cat sat"], None, np.array([0]), np.arange(1))
    ids = G.tokenize(tokenizer, pair)
    words = {w: i + len(SPECIALS) for i, w in enumerate(WORDS)}
    assert ids[0] == [0, words["the"], words["cat"], words["sat"], 2, 2, words["is"], words["good"], 2]
    assert G.tokenize(tokenizer, single) == [[0, words["the"], words["cat"], words["sat"], 2]]
    long = G.GlueSplit(["the " * 30], ["cat " * 30], np.array([0]), np.arange(1))
    assert len(G.tokenize(tokenizer, long, max_length=16)[0]) == 16
    chunked = G.tokenize(tokenizer, _sentences(7), chunk=3)
    assert chunked == G.tokenize(tokenizer, _sentences(7))  # chunks change nothing
    batch = G.pad_batch([[0, 5, 2], [0, 2]], pad_token_id=tokenizer.pad_token_id)
    assert batch["input_ids"].tolist() == [[0, 5, 2], [0, 2, 1]]  # RoBERTa pads with 1, not BERT's 0
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_a_padded_batch_gives_each_example_its_own_features(tokenizer):
    encoder, _ = G.load_roberta(config=_config())
    rows = G.tokenize(tokenizer, _sentences(5))
    assert len({len(r) for r in rows}) > 1  # the batch really needs padding
    with torch.no_grad():
        batched = encoder(**G.pad_batch(rows, tokenizer.pad_token_id))
        alone = torch.cat([encoder(**G.pad_batch([r], tokenizer.pad_token_id)) for r in rows])
    assert batched.shape == (5, encoder.feature_dim)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)


# ============================================================================ metrics
def test_matthews_f1_and_accuracy_match_hand_computed_values():
    gold, predicted = [1, 1, 1, 0, 0, 0, 1, 0], [1, 1, 0, 0, 0, 1, 1, 0]  # TP 3, FN 1, TN 3, FP 1
    assert G.glue_scores("cola", predicted, gold) == pytest.approx({"matthews": 0.5, "score": 0.5})  # (9-1)/16
    gold, predicted = [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 1]  # TP 2, FN 2, TN 1, FP 1
    f1, acc = 4 / 7, 0.5  # 2 TP / (2 TP + FP + FN); 3 of 6 right
    assert G.glue_scores("mrpc", predicted, gold) == pytest.approx({"f1": f1, "accuracy": acc, "score": (f1 + acc) / 2})
    assert G.glue_scores("qqp", [0, 0, 0, 0, 0, 0], gold)["f1"] == 0.0  # no positive predicted: F1 of class 1 is 0
    mnli = G.glue_scores("mnli", [0, 1, 2, 2], [0, 1, 2, 1])
    assert mnli == pytest.approx({"accuracy": 0.75, "score": 0.75})
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    assert G.predictions(logits, regression=False).tolist() == [1, 0]


def test_pearson_and_spearman_match_hand_computed_values():
    from scipy import stats

    x, y = [1, 2, 3, 4], [2, 4, 5, 9]  # deviations (-1.5, -.5, .5, 1.5) and (-3, -1, 0, 4): 11 / sqrt(5 * 26)
    assert G.pearson(x, y) == pytest.approx(11 / np.sqrt(130))
    x, y = [1, 2, 2, 3], [1, 3, 2, 4]  # ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4): 4.5 / sqrt(4.5 * 5)
    assert G.average_ranks(x).tolist() == [1, 2.5, 2.5, 4]
    assert G.spearman(x, y) == pytest.approx(np.sqrt(0.9))
    assert G.spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)  # monotone, not linear
    assert G.pearson([1, 2, 3, 4], [1, 8, 27, 64]) < 0.99
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 6, 50) * 0.5, rng.normal(size=50)  # many ties, as STS-B's gold scores have
    assert G.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)
    assert G.pearson(a, b) == pytest.approx(stats.pearsonr(a, b).statistic)
    assert G.pearson([1, 1, 1], [1, 2, 3]) == 0.0  # a constant prediction: no association, not NaN
    outputs = torch.tensor([[4.5], [0.5], [2.0]])
    scores = G.glue_scores("stsb", G.predictions(outputs, regression=True), [5.0, 0.0, 2.5])
    assert set(scores) == {"pearson", "spearman", "score"} and scores["spearman"] == pytest.approx(1.0)
    assert scores["score"] == pytest.approx((scores["pearson"] + 1.0) / 2)


# ============================================================================ models
_write_expert = write_roberta_expert


@pytest.mark.parametrize("task, files", [("mrpc", "safetensors"), ("mnli", "bin"), ("stsb", "safetensors")])
def test_a_published_expert_folder_reproduces_the_classifiers_logits(tmp_path, tokenizer, task, files):
    num_labels = KNOWN[task][0]
    model = _classifier(num_labels)
    models = tmp_path / "models"
    _write_expert(models / "lu-vae" / "roberta-glue" / task / "roberta-base_lr1e-05", model, files)
    base, _ = G.load_roberta(config=_config())
    before = {k: v.clone() for k, v in base.state_dict().items()}
    encoder, head = G.load_glue_expert(task, base, models_dir=models)
    assert set(head) == set(G.HEAD_KEYS) and head["out_proj.weight"].shape == (num_labels, 16)
    assert set(encoder.state_dict()) == {k for k in model.state_dict() if k.startswith("roberta.")}
    batch = G.pad_batch(G.tokenize(tokenizer, _sentences(6)), tokenizer.pad_token_id)
    with torch.no_grad():
        ours = G.classification_head_module(head)(encoder(**batch))
        theirs = model(**batch).logits
    assert torch.equal(ours, theirs)  # the same operations in the same order: bit for bit
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())  # θ0 itself is untouched


def test_a_wrong_or_missing_expert_is_a_clear_error(tmp_path):
    models = tmp_path / "models"
    base, _ = G.load_roberta(config=_config())
    _write_expert(models / "lu-vae" / "roberta-glue" / "rte" / "roberta-base_lr1e-05", _classifier(3), "safetensors")
    with pytest.raises(ValueError, match=r"classifier has 3 outputs but the task has 2.*another task"):
        G.load_glue_expert("rte", base, models_dir=models)
    with pytest.raises(FileNotFoundError, match=r"lu-vae/roberta-glue/cola/roberta-base_lr1e-05 not found.*"
                                                r"huggingface-cli download lu-vae/roberta-glue"):
        G.load_glue_expert("cola", base, models_dir=models)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty holds no model.safetensors.*RobertaForSequenceClassification"):
        G.load_expert_folder(tmp_path / "empty", base)
    wider = _classifier(2)
    state = {**wider.state_dict(), "lm_head.dense.weight": torch.zeros(1)}
    with pytest.raises(KeyError, match=r"neither roberta.\* nor classifier.\*: \['lm_head.dense.weight'\]"):
        G.split_sequence_classifier(state)


def test_roberta_and_its_tokenizer_load_from_the_model_folder(tmp_path, tokenizer):
    from transformers import RobertaForMaskedLM

    torch.manual_seed(3)
    pretrained = RobertaForMaskedLM(_config())  # roberta-base is published as a masked LM
    folder = tmp_path / "models" / "FacebookAI" / "roberta-base"
    pretrained.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    encoder, loaded_tokenizer = G.load_roberta(models_dir=tmp_path / "models")
    expected = {k: v for k, v in pretrained.state_dict().items() if k.startswith("roberta.")}
    assert set(encoder.state_dict()) == set(expected)
    assert all(torch.equal(v, expected[k]) for k, v in encoder.state_dict().items())
    assert loaded_tokenizer("the cat", "a dog")["input_ids"] == tokenizer("the cat", "a dog")["input_ids"]
    with pytest.raises(FileNotFoundError, match=r"elsewhere/FacebookAI/roberta-base not found.*"
                                                r"huggingface-cli download FacebookAI/roberta-base"):
        G.load_roberta(models_dir=tmp_path / "elsewhere")


def test_heads_start_as_transformers_initialises_them():
    head = G.initial_head(16, 3, seed=7)
    assert head["dense.weight"].shape == (16, 16) and head["out_proj.weight"].shape == (3, 16)
    assert torch.equal(head["out_proj.bias"], torch.zeros(3)) and torch.equal(head["dense.bias"], torch.zeros(16))
    assert 0.01 < float(head["dense.weight"].std()) < 0.03  # N(0, 0.02²)
    assert torch.equal(G.initial_head(16, 3, seed=7)["dense.weight"], head["dense.weight"])  # seeded
    assert not torch.equal(G.initial_head(16, 3, seed=8)["dense.weight"], head["dense.weight"])
    module = G.classification_head_module(head)
    assert not module.training and module(torch.zeros(2, 16)).shape == (2, 3)
    with pytest.raises(ValueError, match="keys dense.weight"):
        G.classification_head_module({"weight": torch.zeros(3, 16), "bias": torch.zeros(3)})


# ============================================================================ the recipe
def test_the_recipe_is_dares_and_fits_the_projects_training_loop():
    from lib.experiments.training import FinetuneConfig

    recipe = G.GlueFinetuneRecipe()
    assert (recipe.lr, recipe.batch_size, recipe.epochs, recipe.warmup_ratio, recipe.weight_decay,
            recipe.max_length) == (1e-5, 16, 10, 0.06, 0.01, 128)
    # RTE: 2,490 training rows, 10% held out -> 2,241 to train on: 141 steps an epoch
    assert recipe.steps_per_epoch(2241) == 141 and recipe.total_steps(2241) == 1410
    assert recipe.warmup_steps(2241) == 85  # ceil(0.06 x 1410 = 84.6)
    config = FinetuneConfig(**recipe.finetune_settings(2241, 249, seed=3))
    assert (config.max_steps, config.warmup_steps, config.eval_every, config.patience, config.max_eval_examples,
            config.lr, config.seed, config.max_grad_norm) == (1410, 85, 141, 10, 249, 1e-5, 3, 1.0)
