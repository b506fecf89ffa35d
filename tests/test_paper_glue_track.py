"""Notebook 01's text track at paper scale (issue 12): RoBERTa-base on GLUE with the published
experts and their own two-layer heads, official GLUE scores (STS-B a regression) and a paired
bootstrap for their uncertainties, run by the same code as the small scale.

Everything is a fake in the real formats (``paper_fakes``): a tiny random RoBERTa where
``FacebookAI/roberta-base`` would be, published experts in ``lu-vae/roberta-glue``'s layout and
GLUE hub copies of CoLA (Matthews), STS-B (Pearson/Spearman) and MRPC (F1 and accuracy).
"""
from __future__ import annotations

import dataclasses
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn as nn

from lib import statistics
from lib.experiments import baselines as B
from lib.experiments.evaluation import evaluate
from lib.experiments.findings import paired_bootstrap, paired_difference
from lib.experiments.paper_tracks import GLUE_RECIPE, GlueTextTrack
from lib.experiments.training import initial_heads, training_loss
from lib.heads import SequenceClassificationHead, TaskHead, head_module
from lib.paper import glue as G

from paper_fakes import GLUE_TASKS, write_glue_paper_fakes

pytestmark = pytest.mark.usefixtures("one_thread", "private_downloads")


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    return write_glue_paper_fakes(tmp_path_factory.mktemp("glue"))


def _track(fakes, tasks=GLUE_TASKS, **settings) -> GlueTextTrack:
    return GlueTextTrack(list(tasks), data_dir=str(fakes / "data"), models_dir=str(fakes / "models"), device="cpu",
                         **settings)


def _config(fakes, **settings) -> B.BaselinesConfig:
    tiny = dict(scale="paper", tracks=("text",), text_tasks=tuple(GLUE_TASKS), data_dir=str(fakes / "data"),
                models_dir=str(fakes / "models"), device="cpu", lambda_grid=(0.0, 0.5, 1.0), lambda_refinements=0,
                selection_examples=8, fisher_examples=8, regmean_examples=16, progress=False)
    return B.BaselinesConfig(**{**tiny, **settings})


# ----------------------------------------------------------------------------- heads
def test_head_module_builds_each_kind_of_head_from_its_state_keys():
    linear = head_module({"weight": torch.randn(3, 16), "bias": torch.zeros(3)})
    assert type(linear) is TaskHead
    state = G.initial_head(16, 3, seed=0)
    two_layer = head_module(state)
    assert isinstance(two_layer, SequenceClassificationHead)
    assert not any(p.requires_grad for p in two_layer.parameters())  # frozen, as every head_module head
    assert two_layer.weight.shape == (3, 16) and two_layer.weight.device.type == "cpu"  # like a linear head's
    x = torch.randn(5, 16)
    torch.testing.assert_close(two_layer(x), torch.tanh(x @ state["dense.weight"].T) @ state["out_proj.weight"].T,
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"weight, bias.*or a two-layer head's dense.weight.*got \['dense.weight'\]"):
        head_module({"dense.weight": torch.zeros(3, 3)})


def test_the_two_layer_head_drops_out_only_in_training_steps():
    head = head_module(G.initial_head(16, 2, seed=1)).train()
    x = torch.randn(64, 16)
    with torch.no_grad():  # validation inside the training loop: train mode, no gradients
        torch.testing.assert_close(head(x), head.eval()(x), rtol=0, atol=0)
    head.train()
    assert not torch.equal(head(x), head.eval()(x))  # a training step: dropout on


# ----------------------------------------------------------------------------- the bootstrap
def _correlated_outcomes(n=400, tasks=("a", "b"), seed=0):
    """Two models right on mostly the same examples: the paired SE is far below the unpaired one."""
    rng = np.random.default_rng(seed)
    a, b = {}, {}
    for task in tasks:
        difficulty = rng.random(n)
        a[task] = difficulty < 0.75
        b[task] = difficulty < 0.70
    return a, b


def _accuracy(task, correct, rows):
    return 100 * float(np.mean(correct[rows]))


def _unpaired_bootstrap(score, a, b, resamples=1000, seed=0):
    """The rule broken: a and b resampled with different rows."""
    rng = np.random.default_rng(seed)
    draws = np.zeros(resamples)
    for task in a:
        n = len(a[task])
        for r in range(resamples):
            draws[r] += score(task, a[task], rng.integers(0, n, n)) - score(task, b[task], rng.integers(0, n, n))
    return float(np.std(draws / len(a), ddof=1))


def test_the_paired_bootstrap_se_of_accuracy_matches_the_analytic_paired_se():
    a, b = _correlated_outcomes()
    analytic = paired_difference(a, b)
    boot = paired_bootstrap(_accuracy, a, b, resamples=1000, seed=0)
    assert boot.value == pytest.approx(analytic.value)  # the point estimate is the difference itself
    assert boot.se == pytest.approx(analytic.se, rel=0.15)
    assert paired_bootstrap(_accuracy, a, b, seed=0) == boot  # seeded
    # breaking the pairing gives an SE several times too large: the comparison above would fail
    unpaired = _unpaired_bootstrap(_accuracy, a, b)
    assert unpaired > 2 * analytic.se and unpaired != pytest.approx(analytic.se, rel=0.15)
    # one model alone: its average and the SE of a mean of Bernoulli outcomes
    alone = paired_bootstrap(_accuracy, a)
    expected = math.sqrt(sum(np.var(x, ddof=1) / len(x) for x in a.values())) / len(a)
    assert alone.value == pytest.approx(100 * np.mean([x.mean() for x in a.values()]))
    assert alone.se == pytest.approx(100 * expected, rel=0.15)
    with pytest.raises(ValueError, match="different tasks"):
        paired_bootstrap(_accuracy, a, {"a": b["a"]})
    with pytest.raises(ValueError, match="same, non-empty set of examples"):
        paired_bootstrap(_accuracy, a, {t: v[:-1] for t, v in b.items()})


# ----------------------------------------------------------------------------- the track
def test_paper_scale_text_is_the_glue_track_with_dares_recipe(fakes):
    config = B.BaselinesConfig(scale="paper", tracks=("text",))
    assert config.text_tasks == G.PAPER_TEXT_TASKS and config.text_heads == "joint"
    track = config.track("text")
    assert isinstance(track, GlueTextTrack) and track.max_test == 1000  # Twin-Merging's test sets
    assert track.fisher_method == "hooks" and track.task_score == "official"
    recipe, multitask = config.finetune_configs("text", 8)
    assert multitask is None and recipe == GLUE_RECIPE
    assert B.BaselinesConfig(scale="paper", tracks=("text",), max_test=64).track("text").max_test == 64
    with pytest.raises(ValueError, match="head_kind = 'probe'.*'joint'"):
        GlueTextTrack(["cola"], head_kind="probe")
    with pytest.raises(ValueError, match="Unknown paper-scale GLUE task 'sst5'"):
        GlueTextTrack(["sst5"])


def test_stsb_is_scored_by_the_correlations_of_the_scalar_output(fakes):
    track = _track(fakes, tasks=["stsb", "cola"])
    setup = B.prepare_track(track, GLUE_RECIPE, None, progress=False)
    head = setup.heads["stsb"]
    assert head["out_proj.weight"].shape == (1, 16)  # the expert's own head: one output
    assert setup.experts["stsb"].info["source"] == "lu-vae/roberta-glue/stsb/roberta-base_lr1e-05"
    encoder = track.pretrained_encoder()
    results = evaluate(track, encoder, setup.experts["stsb"].encoder, setup.heads, tasks=["stsb", "cola"])
    stsb = results["stsb"]
    test = track.split("stsb", "test")
    assert test.labels.dtype == np.float32 and len(test) == 12
    encoder.load_state_dict(setup.experts["stsb"].encoder)
    with torch.no_grad():
        outputs = [G.classification_head_module(head)(encoder(**{k: v for k, v in test.batch([i]).items()
                                                                   if k != "labels"}))[0, 0].item()
                   for i in range(len(test))]
    expected = 50 * (G.pearson(outputs, test.labels) + G.spearman(outputs, test.labels))
    assert stsb["official"] == pytest.approx(expected, abs=1e-3) == stsb["score"]
    assert stsb["predicted"] == pytest.approx(np.array(outputs), abs=1e-5)  # the scalar, not an argmax
    assert math.isnan(stsb["accuracy"]) and "correct" not in stsb
    cola = results["cola"]  # Matthews correlation of the argmax
    assert cola["official"] == pytest.approx(100 * G.glue_scores("cola", cola["predicted"], track.split("cola", "test").labels)["matthews"])
    assert cola["metric"] == "matthews" and cola["correct"].dtype == bool


def test_a_regression_heads_fisher_is_the_squared_gradient_of_its_output():
    """The Fisher of N(output, 1): E_y[(y − ŷ)² (∇ŷ)²] = (∇ŷ)²; "expected" computes it exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    x = torch.randn(6, 4)

    class Inputs(nn.Module):  # the statistics take batches of named inputs
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

    wrapped = Inputs(model)
    batch = {"x": x, "labels": torch.zeros(6)}
    fisher = statistics.diagonal_fisher(wrapped, [batch], label_mode="expected", method="hooks", disable=True)
    expected = {n: torch.zeros_like(p) for n, p in wrapped.named_parameters()}
    for b in range(6):
        grads = torch.autograd.grad(wrapped(x[b : b + 1])[0, 0], list(wrapped.parameters()))
        for (n, _), g in zip(wrapped.named_parameters(), grads):
            expected[n] += g ** 2 / 6
    for n in expected:
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-5, atol=1e-7)
    sampled = statistics.diagonal_fisher(wrapped, [batch] * 200, label_mode="sample", method="hooks", disable=True)
    assert float(sampled["net.2.weight"].sum()) == pytest.approx(float(expected["net.2.weight"].sum()), rel=0.2)


def test_the_text_track_merges_and_evaluates_end_to_end_with_bootstrap_verdicts(fakes):
    config = _config(fakes)
    result = B.run_track("text", config, progress=False)
    table = result.table
    assert {"Task Arithmetic", "TIES", "Fisher", "RegMean"} <= set(table.method) and "Multi-task" not in set(table.method)
    experts = table[table.method == B.EXPERTS].set_index("task")
    assert (experts["normalized"] == 100).all()  # each expert's official score over itself
    ta = table[table.method == "Task Arithmetic"].set_index("task")
    assert ta["normalized"].tolist() == pytest.approx((100 * ta["score"] / experts["score"]).tolist())
    assert set(ta.metric) == {"matthews", "mean(pearson, spearman)", "mean(f1, accuracy)"}
    wide = B.summary(table)
    assert wide.loc["Task Arithmetic", "stsb"] == pytest.approx(round(ta.loc["stsb", "score"], 1))
    # RegMean's Grams and the Fishers cover RoBERTa's layers; the heads' layers are not merged
    stats = B.compute_statistics(result.setup.track, result.setup, config, progress=False)
    grams = stats["gram"]["stsb"]
    assert "roberta.encoder.layer.0.attention.self.query.weight" in grams and not any("out_proj" in k for k in grams)
    assert float(stats["fisher"]["stsb"]["roberta.encoder.layer.1.output.dense.weight"].abs().sum()) > 0
    # uncertainties: a paired bootstrap of the official scores
    average = table[table.method == "Weight averaging"].set_index("task")["score"]
    d = result.difference("Weight averaging", B.PRETRAINED)
    assert d.se > 0 and d.value == pytest.approx((average - table[table.method == B.PRETRAINED]
                                                  .set_index("task")["score"]).mean())
    versus = B.comparison_table(result)
    assert len(versus) == len(result.merges)
    text = B.findings({"text": result})
    assert "average GLUE score" in text and "Twin-Merging" in text and "not comparable (3 GLUE tasks" in text


def test_experts_can_be_fine_tuned_with_the_recipe_stsb_included(fakes):
    track = _track(fakes, tasks=["cola", "stsb"], experts="finetune")
    recipe = dataclasses.replace(GLUE_RECIPE, epochs=1, batch_size=8)
    heads = initial_heads(track)
    assert set(heads["cola"]) == set(G.HEAD_KEYS) and heads["stsb"]["out_proj.weight"].shape[0] == 1
    setup = B.prepare_track(track, recipe, None, progress=False)
    for task in ("cola", "stsb"):
        expert = setup.experts[task]
        assert expert.info["steps"] == 5 and "source" not in expert.info  # 36 training rows, batch 8: one epoch
        assert not torch.equal(expert.heads[task]["dense.weight"], heads[task]["dense.weight"])  # trained jointly
        # the epoch is chosen by the official validation score (STS-B's correlations), not by accuracy
        encoder = track.pretrained_encoder()
        official = evaluate(track, encoder, expert.encoder, {task: expert.heads[task]}, [task], split="validation")
        assert expert.info["best_validation_accuracy"] == pytest.approx(official[task]["score"] / 100, abs=1e-6)
    again = B.prepare_track(track, recipe, None, progress=False).experts["cola"]  # from the cache
    assert all(torch.equal(again.heads["cola"][k], v) for k, v in setup.experts["cola"].heads["cola"].items())


def test_a_regression_trains_with_mean_squared_error_and_a_classification_with_cross_entropy():
    outputs = torch.tensor([[0.5], [2.0], [4.0]])
    scores = torch.tensor([1.0, 2.0, 2.5])
    assert training_loss(outputs, scores).item() == pytest.approx((0.25 + 0 + 2.25) / 3)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    classes = torch.tensor([0, 0])
    assert training_loss(logits, classes).item() == pytest.approx(torch.nn.functional.cross_entropy(logits, classes).item())
