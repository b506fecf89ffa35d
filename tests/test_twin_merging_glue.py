"""Twin-Merging on RoBERTa and GLUE (notebook 05 at paper scale, ``tracks=["text"]``): the exact
low-rank path through HF RoBERTa (embeddings, LayerNorms, attention), the two-layer heads with
STS-B's scalar output, official GLUE scores with paired-bootstrap uncertainties, and the published
numbers only beside a run of the paper's setup. Tiny RoBERTa and fake GLUE copies (``paper_fakes``)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lib.experiments import baselines as B
from lib.experiments import twin_merging as T
from lib.experiments.findings import paired_difference
from lib.heads import head_module
from lib.merging import twin_merging as tw
from lib.paper import glue as G

from paper_fakes import GLUE_TASKS, WORDS, roberta_config, roberta_tokenizer, write_glue_paper_fakes

pytestmark = pytest.mark.usefixtures("one_thread", "private_downloads")


class OfficialTrack:
    """The part of ``GlueTextTrack`` that scoring reads: tasks, display names, GLUE's score."""

    task_score = "official"

    def __init__(self, tasks, max_test=1000):
        self.tasks, self.max_test = list(tasks), max_test

    def display_name(self, task):
        return task

    def score(self, task, predicted, labels):
        return 100 * G.glue_scores(task, predicted, labels)["score"]


# ----------------------------------------------------------------------------- the low-rank path
def _roberta_batch(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Sentence pairs of different lengths from two 'tasks', joined as the mixed stream joins them."""
    tokenizer = roberta_tokenizer()
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(2):  # two tasks' batches, each padded by the track's collate, then joined
        first = [" ".join(rng.choice(WORDS, rng.integers(1, 8))) for _ in range(n)]
        second = [" ".join(rng.choice(WORDS, rng.integers(1, 8))) for _ in range(n)]
        split = G.GlueSplit(first, second, np.zeros(n), np.arange(n))
        parts.append(G.pad_batch(G.tokenize(tokenizer, split), tokenizer.pad_token_id))
    return T.concat_inputs(parts, {"input_ids": tokenizer.pad_token_id})


def test_the_low_rank_path_through_roberta_is_per_input_materialisation_with_both_kinds_of_head():
    config = roberta_config()
    config.initializer_range = 0.5
    torch.manual_seed(0)
    encoder, _ = G.load_roberta(config=config)
    shared = {k: v.clone() for k, v in encoder.state_dict().items()}
    frozen = ("token_type_embeddings", "position_embeddings")  # left unchanged by the experts
    g = torch.Generator().manual_seed(1)
    experts = [{k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() and not any(f in k for f in frozen)
                else v for k, v in shared.items()} for _ in range(3)]
    exclusive = tw.compress(shared, experts, rank_ratio=0.5)
    stacked = tw.stack(exclusive)
    # unchanged embeddings carry no exclusive part (rank 0): nothing to apply, nothing to hook
    assert not any(f in k for k in stacked.factors for f in frozen)
    assert "roberta.embeddings.word_embeddings.weight" in stacked.factors
    assert "roberta.embeddings.LayerNorm.weight" in stacked.dense
    batch = _roberta_batch(3)
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 1).all()  # padded with RoBERTa's pad id
    weights = torch.softmax(torch.randn(len(batch["input_ids"]), 3, generator=g), 1)
    low = tw.low_rank_forward(encoder, shared, stacked, weights, batch)
    slow = tw.per_input_forward(encoder, shared, exclusive, weights, batch)
    torch.testing.assert_close(low, slow, rtol=1e-4, atol=1e-5)
    static = tw.low_rank_forward(encoder, shared, stacked, torch.zeros_like(weights), batch)
    assert (low - static).abs().max() > 1e-3  # the exclusive parts do change the features
    # through each task's own two-layer head: STS-B predicts its scalar output, MNLI an argmax
    stsb, mnli = G.initial_head(16, 1, seed=0, std=0.5), G.initial_head(16, 3, seed=1, std=0.5)
    track = OfficialTrack(["stsb", "mnli"])
    track.task_results = lambda task, outputs, labels: {"score": 0.0, "predicted": G.predictions(outputs, task == "stsb")}
    with torch.no_grad():
        out_low, out_slow = head_module(stsb)(low), head_module(stsb)(slow)
    scalar = T.head_outcome(track, "stsb", out_low, np.zeros(len(low)))
    assert scalar.dtype == np.float64 and scalar.shape == (len(low),) and len(np.unique(scalar)) > 2
    np.testing.assert_allclose(scalar, T.head_outcome(track, "stsb", out_slow, np.zeros(len(low))), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        classes = T.head_outcome(track, "mnli", head_module(mnli)(low), np.zeros(len(low)))
        assert (classes == head_module(mnli)(slow).argmax(1).numpy()).all() and classes.dtype.kind == "i"


# ----------------------------------------------------------------------------- scores and uncertainties
def _predictions(seed: int, n: int = 60) -> tuple[dict, dict]:
    """Gold labels and an expert's predictions on CoLA (classes) and STS-B (scores)."""
    rng = np.random.default_rng(seed)
    gold = {"cola": rng.integers(0, 2, n), "stsb": np.round(rng.random(n) * 5, 2)}
    expert = {"cola": np.where(rng.random(n) < 0.85, gold["cola"], 1 - gold["cola"]),
              "stsb": gold["stsb"] + rng.normal(0, 0.8, n)}
    return gold, expert


def _worse(gold, expert, seed):
    rng = np.random.default_rng(seed)
    return {"cola": np.where(rng.random(len(gold["cola"])) < 0.7, expert["cola"], 1 - expert["cola"]),
            "stsb": expert["stsb"] + rng.normal(0, 1.5, len(gold["stsb"]))}


def test_glue_outcomes_are_scored_by_official_scores_with_a_paired_bootstrap():
    gold, expert = _predictions(0)
    other = _worse(gold, expert, 1)
    track = OfficialTrack(["cola", "stsb"])
    scoring = T.Scoring(track, gold, seed=0, resamples=200)
    assert scoring.official and scoring.unit == "average GLUE score" and scoring.column == "score"
    official = {t: 100 * G.glue_scores(t, other[t], gold[t])["score"] for t in gold}
    assert scoring.value(other) == pytest.approx(np.mean(list(official.values())))
    d = scoring.difference(other, expert)
    assert d == B.score_difference(track, other, expert, gold, seed=0, resamples=200)  # notebook 01's dispatch
    assert d.value < 0 and d.se > 0
    # normalized: score / the expert's on the same examples; the expert itself is exactly 100
    norm = scoring.normalized(other, expert)
    expert_score = {t: 100 * G.glue_scores(t, expert[t], gold[t])["score"] for t in gold}
    assert norm.value == pytest.approx(np.mean([100 * official[t] / expert_score[t] for t in gold]))
    assert norm.value == pytest.approx(scoring.normalized_value(other, expert)) and norm.se > 0
    assert scoring.normalized(expert, expert) == T.Estimate(100.0, 0.0)
    # an expert with no skill (Matthews 0): no scale to normalize by
    assert np.isnan(scoring.normalized(other, {**expert, "cola": np.zeros_like(gold["cola"])}).value)
    # accuracy tracks keep the analytic paired SE
    correct = {t: np.asarray(other[t] == expert[t]) for t in ("cola",)}
    right = {"cola": np.ones_like(correct["cola"])}
    assert T.Scoring().difference(correct, right) == paired_difference(correct, right)


def _glue_result(tasks, max_test) -> T.TwinTrackResult:
    """A main table's outcomes on GLUE: the experts, θ0, three merges and Twin-Merging."""
    gold, expert = {}, {}
    for i, task in enumerate(tasks):
        rng = np.random.default_rng(i)
        n = 40
        gold[task] = np.round(rng.random(n) * 5, 2) if task == "stsb" else rng.integers(0, 3 if task == "mnli" else 2, n)
        expert[task] = gold[task] + rng.normal(0, 0.5, n) if task == "stsb" else gold[task].copy()
    merges = (B.PRETRAINED, "Weight averaging", "Task Arithmetic", "TIES", T.TWIN)
    rows = {B.EXPERTS: expert, **{row: {t: _noisy(gold[t], expert[t], 10 * seed + j) for j, t in enumerate(tasks)}
                                  for seed, row in enumerate(merges, start=1)}}
    track = OfficialTrack(tasks, max_test)
    return T.TwinTrackResult("text", {}, {"main": rows}, setup=SimpleNamespace(track=track),
                             scorings={"main": T.Scoring(track, gold, resamples=20)})


def _noisy(gold, expert, seed):
    rng = np.random.default_rng(seed)
    if gold.dtype.kind == "f":
        return expert + rng.normal(0, 1.0, len(gold))
    return np.where(rng.random(len(gold)) < 0.8, expert, (expert + 1) % (gold.max() + 1))


def test_the_published_glue_numbers_stand_beside_a_run_of_the_papers_setup_only():
    claim = T._main_claim(_glue_result(G.PAPER_TEXT_TASKS, 1000))
    assert "Published (Twin-Merging, RoBERTa-base, 8 GLUE tasks" in claim.evidence
    assert "(published 96.1, the authors' re-run 95.8)" in claim.evidence
    assert "(published 67.8, the authors' re-run 58.3)" in claim.evidence and "(published 52.6)" in claim.evidence
    assert "points of average GLUE score" in claim.evidence
    for tasks, max_test in ((G.PAPER_TEXT_TASKS[:3], 1000), (G.PAPER_TEXT_TASKS, 64)):
        claim = T._main_claim(_glue_result(tasks, max_test))
        assert "not comparable" in claim.evidence and "published 96.1" not in claim.evidence


# ----------------------------------------------------------------------------- the pipeline on GLUE
@pytest.fixture(scope="module")
def glue_run(tmp_path_factory):
    fakes = write_glue_paper_fakes(tmp_path_factory.mktemp("glue"))
    config = T.TwinMergingConfig(
        scale="paper", tracks=("text",), text_tasks=tuple(GLUE_TASKS), data_dir=str(fakes / "data"),
        models_dir=str(fakes / "models"), device="cpu", max_validation=16, lambda_grid=(0.0, 0.5, 1.0),
        lambda_refinements=0, selection_examples=8, unseen_tasks=1, router_sizes=(2, 4), router_epochs=2,
        task_count_step=2, rank_ratios=(0.1, 0.3), sweep_test_examples=12, stream_examples=12, stream_batch_size=4,
        bootstrap_resamples=20, progress=False)
    return config, T.run_track("text", config, progress=False)


def test_every_path_carries_stsbs_scalar_and_the_official_scores(glue_run):
    config, result = glue_run
    track = result.setup.track
    assert result.scored("main").official and result.scored("stream").official
    twin = result.outcomes["main"][T.TWIN]
    assert twin["stsb"].dtype == np.float64 and twin["cola"].dtype.kind == "i"  # predictions, not correct-or-not
    main = result.tables["main"]
    row = main[(main.method == T.TWIN) & (main.task == "stsb")].iloc[0]
    assert row["score"] == pytest.approx(track.score("stsb", twin["stsb"], track.split("stsb", "test").labels))
    for key in ("ablation", "rank", "router", "task_count", "unseen"):
        for outcomes in result.outcomes[key].values():
            if "stsb" in outcomes:
                assert outcomes["stsb"].dtype == np.float64, key
    # the sweep's Twin on all test examples is the main evaluation (same outputs, same order)
    np.testing.assert_array_equal(result.outcomes["ablation"][T.TWIN]["stsb"], twin["stsb"])
    stream = result.outcomes["stream"]
    assert stream[T.LOW_RANK]["stsb"].dtype == np.float64
    for a, b in ((T.LOW_RANK, T.PER_INPUT), (f"{T.LOW_RANK}, top-2", f"{T.PER_INPUT}, top-2")):
        for task in stream[a]:
            np.testing.assert_allclose(stream[a][task], stream[b][task], rtol=1e-4, atol=1e-5)
    table = result.tables["stream"]
    assert table.loc[T.LOW_RANK, "score"] == pytest.approx(table.loc[T.PER_INPUT, "score"], abs=T.ROUNDING)
    d = result.scored("stream").difference(stream[T.LOW_RANK], stream[T.PER_INPUT])
    assert abs(d.value) < T.ROUNDING  # the same official score, up to float rounding
    assert "GLUE score low-rank − per-input = +0.0 ± 0.0 points" in T._speed_claim(result, config.top_k).evidence
