"""Head kinds (Benchmark v2): zero-shot text heads from class descriptions, few-shot probes and
heads trained jointly with each expert; each kind through training, merging and evaluation."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import SHARED_DATA, TinyTrack, needs_data
from lib.data.descriptions import DESCRIPTIONS_FILE, class_descriptions
from lib.experiments import baselines as B
from lib.experiments import training
from lib.experiments.training import FinetuneConfig
from lib.experiments.tracks import TextTrack
from lib.heads import head_module, random_head, zero_shot_head

pytestmark = pytest.mark.usefixtures("one_thread")
FT = FinetuneConfig(max_steps=6, batch_size=16, eval_every=3, lr=1e-2, max_eval_examples=32)


# ----------------------------------------------------------------------------- the heads themselves
def test_zero_shot_row_is_the_normalized_mean_of_normalized_description_embeddings():
    torch.manual_seed(0)
    per_class = [torch.randn(3, 5) * torch.tensor([[1.0], [10.0], [0.1]]), torch.randn(1, 5)]
    head = zero_shot_head(per_class, temperature=20.0)
    for row, e in zip(head["weight"], per_class):
        unit = e / e.norm(dim=1, keepdim=True)           # each description counts once, whatever its norm
        expected = unit.mean(0) / unit.mean(0).norm()
        assert torch.allclose(row, 20.0 * expected, atol=1e-6)
    assert torch.equal(head["bias"], torch.zeros(2))


def test_zero_shot_head_normalizes_features_and_a_plain_head_does_not():
    head = zero_shot_head([torch.randn(2, 4), torch.randn(2, 4)], temperature=10.0)
    x = torch.randn(6, 4)
    module = head_module(head)
    assert torch.allclose(module(3.0 * x), module(x), atol=1e-5)   # cosine similarity × T
    assert torch.allclose(module(x), 10.0 * F.normalize(x, dim=1) @ (head["weight"] / 10.0).T, atol=1e-5)
    plain = head_module({k: head[k] for k in ("weight", "bias")})
    assert not torch.allclose(plain(3.0 * x), plain(x))
    with pytest.raises(ValueError, match="weight, bias"):
        head_module({"weight": head["weight"]})


def test_random_head_is_seeded_and_leaves_the_global_generator_alone():
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    a = random_head(8, 3, seed=1)
    assert torch.equal(torch.rand(1), before)
    assert torch.equal(a["weight"], random_head(8, 3, seed=1)["weight"])
    assert not torch.equal(a["weight"], random_head(8, 3, seed=2)["weight"])


# ----------------------------------------------------------------------------- the descriptions file
def test_descriptions_name_the_file_and_the_fix(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump({"sst2": {"a": {"negative": ["bad"], "positive": ["good"]}}}))
    assert class_descriptions("sst2", ["negative", "positive"], path) == {"a": [["bad"], ["good"]]}
    with pytest.raises(KeyError, match=r"d\.yaml has no descriptions for task 'trec'.*probe"):
        class_descriptions("trec", ["DESC"], path)
    with pytest.raises(ValueError, match=r"d\.yaml, task 'sst2', set 'a': the classes must be exactly"):
        class_descriptions("sst2", ["negative", "neutral", "positive"], path)


@needs_data
def test_the_descriptions_file_covers_every_default_text_task_with_its_loader_class_names():
    from lib.data import load_text_task

    for task in B.BaselinesConfig().text_tasks:
        classes = load_text_task(task, data_dir=str(SHARED_DATA)).classes
        candidates = class_descriptions(task, classes)
        assert len(candidates) >= 2, task  # something to choose between on validation


def test_track_rejects_unknown_head_kinds_and_zero_shot_without_text():
    with pytest.raises(ValueError, match="choose one of probe, few_shot, joint, zero_shot"):
        TinyTrack(["a", "b"], head_kind="zeroshot")
    with pytest.raises(ValueError, match="no text|has none"):
        TinyTrack(["a", "b"], head_kind="zero_shot")


# ----------------------------------------------------------------------------- head kinds end to end
def _run(track):
    setup = B.prepare_track(track, FT, FT, progress=False)
    config = B.BaselinesConfig(lambda_grid=(0.0, 0.5, 1.0), selection_examples=16)
    merged = B.closed_form_merges(track, setup, {}, config, methods=("task_arithmetic", "ties"), progress=False)
    table, _ = B.evaluate_methods(track, setup, merged, progress=False)
    return setup, table


def test_joint_heads_train_with_each_expert_and_evaluate_every_model_through_them(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGE_CACHE_DIR", str(tmp_path))
    track = TinyTrack(["a", "b"], head_kind="joint")
    start = training.initial_heads(track)
    setup, table = _run(track)
    for task in track.tasks:
        trained = setup.experts[task].heads[task]
        assert not torch.equal(trained["weight"], start[task]["weight"])    # the head learned
        assert setup.heads[task] is trained                                   # merges are read through it
        assert not torch.equal(setup.multitask.heads[task]["weight"], trained["weight"])  # its own heads
    assert set(table.method) >= {"Task Arithmetic", "TIES", B.PRETRAINED, B.EXPERTS, B.MULTITASK}


def test_frozen_heads_stay_frozen_and_few_shot_probes_see_k_examples_per_class(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGE_CACHE_DIR", str(tmp_path))
    seen, encoded = [], []
    probe, encode = training.linear_probe, training.encode
    monkeypatch.setattr(training, "linear_probe", lambda f, y, *a, **k: seen.append(np.bincount(y)) or probe(f, y, *a, **k))
    monkeypatch.setattr(training, "encode", lambda encoder, split, *a, **k: encoded.append(len(split))
                        or encode(encoder, split, *a, **k))
    track = TinyTrack(["a", "b"], head_kind="few_shot", head_shots=4)
    setup, _ = _run(track)
    assert [list(c) for c in seen] == [[4, 4, 4], [4, 4, 4]]
    assert encoded[:2] == [12, 12]  # the shots only, not the whole training split
    for task in track.tasks:
        assert torch.equal(setup.experts[task].heads[task]["weight"], setup.heads[task]["weight"])
        assert torch.equal(setup.multitask.heads[task]["weight"], setup.heads[task]["weight"])


def test_a_task_named_like_a_path_trains(tmp_path, monkeypatch):
    """Heads are keyed by position inside the trained module: a dotted task name once crashed
    nn.ModuleDict ('module name can't contain \".\"')."""
    monkeypatch.setenv("MERGE_CACHE_DIR", str(tmp_path))
    track = TinyTrack(["my.task", "../other.csv"])
    heads = training.probe_heads(track, max_examples=32)
    multitask = training.finetune(track, track.tasks, heads, FT, progress=False, train_head=True)
    assert set(multitask.heads) == {"my.task", "../other.csv"}
    again = training.finetune(track, track.tasks, heads, FT, progress=False, train_head=True)  # from the cache
    for task in track.tasks:
        assert torch.equal(again.heads[task]["weight"], multitask.heads[task]["weight"])


class _TinyTextTrack(TextTrack):
    """Real MiniLM tokenizer and data, a 2-layer 32-wide random BERT: the zero-shot path, fast."""

    def _tokenizer(self):
        if "tokenizer" not in self._cache:
            from transformers import BertConfig

            from lib.models import load_text_encoder

            _, self._cache["tokenizer"] = load_text_encoder()
            config = BertConfig(vocab_size=self._cache["tokenizer"].vocab_size, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64)
            with torch.random.fork_rng():
                torch.manual_seed(0)
                self._cache["encoder0"], _ = load_text_encoder(config=config)
        return self._cache["tokenizer"]

    def backbone_id(self) -> str:
        return "tiny-bert"


@needs_data
def test_zero_shot_text_track_chooses_descriptions_on_validation_then_trains_merges_and_evaluates(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGE_CACHE_DIR", str(tmp_path))
    track = _TinyTextTrack(tasks=["sst2", "trec"], data_dir=str(SHARED_DATA), head_kind="zero_shot",
                           max_train=64, max_validation=32, max_test=32)
    heads, selections = training.zero_shot_heads(track)
    for task in track.tasks:
        chosen = selections[task]
        assert chosen.best in class_descriptions(task, track.raw(task).classes)
        assert chosen.best_score == max(s for _, s in chosen.scores)
        assert float(heads[task]["normalize"]) == 1.0
        assert heads[task]["weight"].norm(dim=1) == pytest.approx(torch.full((track.num_classes(task),), 20.0), abs=1e-4)
    setup, table = _run(track)
    for task in track.tasks:  # frozen: the experts were trained under the zero-shot head
        assert torch.equal(setup.experts[task].heads[task]["weight"], heads[task]["weight"])
    assert np.isfinite(table.accuracy).all()


def test_the_descriptions_file_is_valid_yaml_with_named_sets():
    catalogue = yaml.safe_load(DESCRIPTIONS_FILE.read_text(encoding="utf-8"))
    for task, sets in catalogue.items():
        assert isinstance(sets, dict) and sets, task
        for name, per_class in sets.items():
            assert all(isinstance(k, str) for k in per_class), (task, name)  # no YAML booleans/numbers
