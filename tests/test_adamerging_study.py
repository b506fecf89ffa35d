"""Notebook 02's plumbing (lib/experiments/adamerging.py): config, label-free adaptation, the
honest variant's guard, correlations with known answers, findings computed from the numbers, and
one papermill run of the notebook on a tiny vision track."""
import dataclasses
import json
import math
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lib.experiments import adamerging as A
from lib.experiments.baselines import BaselinesConfig
from lib.experiments.config import notebook_config, notebook_defaults
from lib.experiments.selection import TestSplitAccessed
from lib.experiments.tracks import VisionTrack

from conftest import SHARED_DATA, SHARED_MODELS, needs_data, needs_models

pytestmark = pytest.mark.usefixtures("one_thread")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "02_adamerging.ipynb"

# A tiny vision study: two tasks, a few steps of everything; "joint" heads (trained with each expert)
# spare the linear probes' encoding of 2,000 training images per task. The papermill test runs the
# notebook with the same settings, so it finds the module fixture's experts and adaptation runs cached.
TINY = dict(tracks=("vision",), vision_tasks=("usps", "mnist"), data_dir=str(SHARED_DATA),
            models_dir=str(SHARED_MODELS), max_validation=32, max_test=48, vision_heads="joint", vision_max_steps=6,
            vision_batch_size=32, eval_every=3, multitask_steps_per_task=3, lambda_grid=(0.0, 0.5, 1.0),
            lambda_refinements=0, fisher_examples=16, regmean_examples=32, selection_examples=16,
            vision_adamerging_steps=5, adamerging_batch_size=8, paper_budget_steps=5, unseen_tasks=1, surgery_steps=5,
            batchnorm_examples=64, progress=False)


# ----------------------------------------------------------------------------- configuration
def test_notebook_parameters_are_exactly_the_config_fields_with_equal_defaults():
    defaults = notebook_defaults(NOTEBOOK)
    assert list(defaults) == [f.name for f in fields(A.AdaMergingConfig)]
    assert notebook_config(A.AdaMergingConfig, defaults) == A.AdaMergingConfig()


def test_shared_fields_are_notebook_01s_with_its_defaults_so_its_cache_is_reused():
    ours = {f.name: f for f in fields(A.AdaMergingConfig)}
    theirs = {f.name: f for f in fields(BaselinesConfig)}
    # every notebook-01 setting that shapes the experts and merges is a parameter here too
    assert set(theirs) - set(ours) == set(A.NOT_SHARED)
    for name in set(ours) & set(theirs) - {"output_dir"}:
        assert ours[name].default == theirs[name].default, name
    changed = A.AdaMergingConfig(vision_tasks=("usps", "mnist"), ties_density=0.1, output_dir="runs/elsewhere")
    base = changed.baselines_config()
    assert base.vision_tasks == ("usps", "mnist") and base.ties_density == 0.1
    assert base.output_dir == ""  # where notebook 02 writes is not notebook 01's business


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="'small'.*'paper'"):
        A.AdaMergingConfig(scale="large")
    with pytest.raises(ValueError, match="paper_budget_track"):
        A.AdaMergingConfig(tracks=("text",), paper_budget_track="vision")
    with pytest.raises(ValueError, match="data_fractions"):
        A.AdaMergingConfig(data_fractions=(0.0, 1.0))
    with pytest.raises(ValueError, match="text_adamerging_steps"):
        A.AdaMergingConfig(text_adamerging_steps=0)


def test_lr_is_scaled_to_the_budget_only_below_the_papers_steps():
    config = A.AdaMergingConfig()
    assert config.lr_for(A.PAPER_STEPS) == config.adamerging_lr == 1e-3
    assert config.lr_for(16) == pytest.approx(1e-3 * 500 / 16)
    assert config.lr_for(1000) == 1e-3
    assert A.AdaMergingConfig(scale_lr_to_budget=False).lr_for(16) == 1e-3


# ----------------------------------------------------------------------------- unlabeled inputs
def test_data_fractions_keep_at_least_one_input_are_nested_and_seeded():
    for n in (1, 7, 48, 1000):
        for fraction in (0.001, 0.01, 0.05, 1.0):
            idx = A.fraction_of(n, fraction, seed=0, task="usps")
            assert len(idx) == max(1, round(fraction * n)) and len(set(idx)) == len(idx)
            assert idx.min() >= 0 and idx.max() < n
    small, large = A.fraction_of(1000, 0.01, 0, "usps"), A.fraction_of(1000, 0.05, 0, "usps")
    assert set(small) <= set(large)
    assert np.array_equal(small, A.fraction_of(1000, 0.01, 0, "usps"))
    assert not np.array_equal(small, A.fraction_of(1000, 0.01, 1, "usps"))


def test_input_stream_visits_every_input_once_per_pass_and_is_a_function_of_the_step():
    pools = {"a": np.arange(100, 164), "b": np.array([7])}  # 64 inputs; a pool smaller than a batch
    stream = A.input_stream(pools, batch_size=16, batches_per_step=2, seed=0)
    first_pass = np.concatenate([b for step in range(2) for b in stream(step)["a"]])
    assert sorted(first_pass) == list(range(100, 164))  # 2 steps × 2 batches × 16 = one pass
    assert all(len(b) == 16 for b in stream(5)["a"])
    assert [list(b) for b in stream(3)["b"]] == [[7], [7]]
    assert all(np.array_equal(x, y) for x, y in zip(stream(9)["a"], stream(9)["a"]))
    assert not np.array_equal(np.concatenate(stream(0)["a"]), np.concatenate(stream(2)["a"]))  # a new shuffle


# ----------------------------------------------------------------------------- correlation
def test_correlation_has_the_known_value_and_fisher_z_interval():
    c = A.correlation([1, 2, 3, 4, 5], [2, 4, 5, 4, 5])
    r = 6 / math.sqrt(60)  # Σdxdy = 6, Σdx² = 10, Σdy² = 6
    assert c.r == pytest.approx(r) and c.n == 5
    half = 1.959964 / math.sqrt(5 - 3)
    assert c.low == pytest.approx(math.tanh(math.atanh(r) - half))
    assert c.high == pytest.approx(math.tanh(math.atanh(r) + half))
    assert A.correlation([1, 2, 3, 4], [4, 3, 2, 1]).r == pytest.approx(-1.0)
    assert math.isnan(A.correlation([1, 2, 3, 4], [1, 1, 1, 1]).r)  # no variation: undefined, not 0
    assert math.isnan(A.correlation([1, 2, 3], [1, 2, 3]).low)  # n = 3: no interval


def test_correlation_interval_covers_the_true_value_of_a_large_sample():
    rng = np.random.default_rng(0)
    x = rng.normal(size=4000)
    y = 0.5 * x + math.sqrt(1 - 0.25) * rng.normal(size=4000)  # true correlation 0.5
    c = A.correlation(x, y)
    assert c.low < 0.5 < c.high and c.high - c.low < 0.06


def test_pooled_correlation_is_within_tasks():
    # Within each task entropy and cross-entropy rise together; across tasks the levels are
    # arranged the other way, so pooling the raw pairs would give a negative r.
    x1, x2 = np.arange(10.0), np.arange(10.0) + 100
    groups = [(x1, 2 * x1 + 50 + np.sin(x1)), (x2, 0.5 * x2 - 60 + np.cos(x2))]
    raw = A.correlation(np.concatenate([x1, x2]), np.concatenate([g[1] for g in groups]))
    assert raw.r < 0
    pooled = A.pooled_correlation(groups)
    assert pooled.r > 0.9 and pooled.low > 0 and pooled.n == 20
    # weights n − 3: two copies of one group are that group with the interval of twice the steps
    single = A.correlation(*groups[0])
    twice = A.pooled_correlation([groups[0], groups[0]])
    assert twice.r == pytest.approx(single.r)
    assert math.atanh(twice.high) - math.atanh(twice.r) == pytest.approx(1.959964 / math.sqrt(14))


# ----------------------------------------------------------------------------- measuring steps
def test_prediction_profile_measures_how_concentrated_predictions_are():
    head = {"weight": torch.eye(3), "bias": torch.zeros(3)}
    one_class = torch.tensor([[5.0, 0, 0]] * 4)
    spread = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0]])
    assert A.prediction_profile(one_class, head)["top-class share"] == 100
    profile = A.prediction_profile(spread, head)
    assert profile["top-class share"] == 50 and profile["inputs"] == 4
    assert profile["feature norm"] == pytest.approx(5.0) and profile["max |logit|"] == pytest.approx(5.0)


def synthetic_collapse(layer_wise_share: float, ta_share: float, n: int = 500) -> A.Collapse:
    def row(share):
        return {t: {"top-class share": share, "inputs": n, "feature norm": 1.0, "max |logit|": 1.0}
                for t in ("a", "b", "c")}
    return A.Collapse({A.PRETRAINED: row(20), A.TA: row(ta_share), A.TASK_WISE: row(layer_wise_share),
                       A.LAYER_WISE: row(layer_wise_share)}, None)


def test_collapse_is_a_top_class_share_well_above_task_arithmetics():
    collapsed, d = A.collapse_verdict(synthetic_collapse(80, 25))
    assert collapsed and d.value == pytest.approx(55)
    assert 0 < d.se < 2
    assert not A.collapse_verdict(synthetic_collapse(30, 25))[0]   # within the margin
    assert not A.collapse_verdict(synthetic_collapse(10, 25))[0]   # more spread than TA
    assert not A.collapse_verdict(synthetic_collapse(37, 25, n=20))[0]  # past the margin, but not by 2 SE


def test_step_meter_sees_memory_held_across_steps_and_not_memory_freed():
    meter = A.StepMeter()
    if math.isnan(meter.lap()[1]):
        pytest.skip("no /proc/self/status here: peaks are NaN")
    held, growing = [], []
    for _ in range(3):
        held.append(torch.ones(8 * 2**20))  # 32 MiB written, so resident
        growing.append(meter.lap()[1])
    del held
    meter, flat = A.StepMeter(), []
    for _ in range(3):
        x = torch.ones(8 * 2**20)
        del x
        flat.append(meter.lap()[1])
    assert growing[2] - growing[0] > 48
    assert max(flat) - min(flat) < 16 and min(flat) > 24


# ----------------------------------------------------------------------------- the tiny study
@pytest.fixture(scope="module")
def config():
    return A.AdaMergingConfig(**TINY)


@pytest.fixture(scope="module")
def study(config):
    return A.run_track("vision", config)


def fresh_track(config, cls=VisionTrack):
    """The config's vision track as a new object (its own loaded data), of class ``cls``."""
    track = config.baselines_config().track("vision")
    made = cls(**{f.name: getattr(track, f.name) for f in fields(track) if f.init and f.name != "_cache"})
    made.identity(made.tasks)  # fingerprints (cache keys) are computed now, before any guard is set
    return made


def context(study, config, track):
    return A.TrackContext(track, study.setup, config, config.baselines_config(), track.pretrained_encoder())


class LabelsRead(AssertionError):
    pass


class UnreadableLabels:
    """Stands in for a split's labels: its length is known, reading any label raises."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, item):
        raise LabelsRead("a test label was read")

    def __array__(self, *args, **kwargs):
        raise LabelsRead("the test labels were read")


@needs_models
@needs_data
def test_adaptation_never_reads_test_labels(study, config, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGE_CACHE_DIR", str(tmp_path))  # nothing cached: the runs below really run
    track = fresh_track(config)
    for task in track.tasks:
        split = track.split(task, "test")
        split.labels = UnreadableLabels(len(split.labels))
    ctx = context(study, config, track)
    for variant in (A.Variant(A.LAYER_WISE, True, 2, 0.01), A.Variant(A.TASK_WISE_PP, False, 2, 0.01, plus=True),
                    A.Variant("0.1%", True, 2, 0.01, fraction=0.001)):
        adapted = A.adapt(ctx, variant, report_labels=False)
        assert len(adapted.seconds) == 2 and adapted.history.cross_entropy.isna().all()
    # the guard bites: a labeled batch, or the cross-entropy report, reads them
    with pytest.raises(LabelsRead):
        track.split("usps", "test").batch([0])
    with pytest.raises(LabelsRead):
        A.adapt(ctx, A.Variant(A.LAYER_WISE, True, 2, 0.01), report_labels=True)


@needs_models
@needs_data
def test_labels_change_the_reported_cross_entropy_but_never_the_coefficients(study, config, tmp_path, monkeypatch):
    track = fresh_track(config)
    ctx = context(study, config, track)
    variant = A.Variant(A.LAYER_WISE, True, 3, 0.05)
    monkeypatch.setenv("MERGE_CACHE_DIR", str(tmp_path / "true"))
    true = A.adapt(ctx, variant)
    rng = np.random.default_rng(0)
    for task in track.tasks:
        split = track.split(task, "test")
        split.labels = rng.permutation(split.labels)
    monkeypatch.setenv("MERGE_CACHE_DIR", str(tmp_path / "permuted"))
    permuted = A.adapt(ctx, variant)
    assert torch.equal(true.coefficients, permuted.coefficients)
    assert np.array_equal(true.history.entropy, permuted.history.entropy)
    assert not np.allclose(true.history.cross_entropy, permuted.history.cross_entropy)


class _TestForbidden(VisionTrack):
    """A track whose test split raises while ``forbid`` is set."""

    forbid: bool = False

    def split(self, task, split):
        if self.forbid and split == "test":
            raise AssertionError("the test split was read")
        return super().split(task, split)


@needs_models
@needs_data
def test_honest_variant_never_reads_the_test_split(study, config, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGE_CACHE_DIR", str(tmp_path))
    track = fresh_track(config, _TestForbidden)
    ctx = context(study, config, track)
    track.forbid = True
    honest = A.adapt_on_validation(ctx)
    assert honest.variant.split == "validation" and len(honest.seconds) == config.vision_adamerging_steps
    assert honest.examples == {t: len(track.split(t, "validation")) for t in track.tasks}
    with pytest.raises(TestSplitAccessed):  # the view it adapts through refuses test
        A.adapt(ctx, A.Variant("peek", True, 2, 0.01, split="test"), data=A.ValidationOnly(track))
    with pytest.raises(AssertionError, match="test split was read"):  # and this track notices a read
        A.adapt(ctx, A.Variant("peek", True, 2, 0.01, split="test"))


@needs_models
@needs_data
def test_the_study_has_every_row_and_a_record_of_every_step(study, config):
    wide = A.main_table(study)
    expected = [A.PRETRAINED, A.EXPERTS, A.MULTITASK, "Weight averaging", "Task Arithmetic", "TIES", "Fisher",
                "RegMean", *A.ADAMERGING_ROWS, *(A.surgery_row(m) for m in A.SURGERY_BASES)]
    assert list(wide.index) == expected
    # per-example outcomes reproduce the table's accuracies
    for row, per_task in study.outcomes.items():
        for task, correct in per_task.items():
            acc = study.table[(study.table.method == row) & (study.table.task == task)].accuracy.item()
            assert acc == pytest.approx(100 * correct.mean())
    # scoring precomputed features gives what notebook 01's evaluate() gives (θ0's row came from there)
    ctx = context(study, config, study.track)
    theta0 = A.results_from_features(ctx, A.encoder_features(ctx, study.setup.pretrained, study.track.tasks))
    assert all(np.array_equal(theta0[t]["correct"], study.correct(A.PRETRAINED)[t]) for t in study.track.tasks)
    keys = study.adapted[A.LAYER_WISE].keys
    assert study.adapted[A.LAYER_WISE].coefficients.shape == (2, len(keys))
    assert study.adapted[A.TASK_WISE].coefficients.shape == (2,)
    assert "layer1.0.bn1.running_mean" not in keys  # buffers get no coefficient
    for row, adapted in study.adapted.items():
        assert len(adapted.seconds) == len(adapted.peak_mib) == adapted.variant.steps, row
        assert (adapted.seconds > 0).all()
    assert study.adapted[A.fraction_row(0.001)].examples == {"usps": 1, "mnist": 1}  # 0.1% of 48: at least one
    assert study.adapted[A.fraction_row(0.05)].examples == {"usps": 2, "mnist": 2}
    assert study.unseen.seen == ["usps"] and study.unseen.unseen == ["mnist"]
    paper = study.adapted[study.budget[A.LAYER_WISE]].variant
    assert paper.steps == config.paper_budget_steps and paper.lr == config.lr_for(config.paper_budget_steps)
    costs = A.cost_table({"vision": study})
    assert set(costs.loc["vision"].index) >= {"Task Arithmetic", A.LAYER_WISE, A.surgery_row("TIES")}
    paper_table = A.paper_table({"vision": study})
    assert paper_table.loc[A.LAYER_WISE, f"{A.PAPER_LABEL}: average %"] == 80.1
    collapse = A.collapse_table({"vision": study}).loc["vision"]
    assert list(collapse.index) == [*A.COLLAPSE_ROWS, A.BATCH_STATISTICS, A.BN_REESTIMATED]  # a BatchNorm track
    assert study.adapted[A.BATCH_STATISTICS].variant.batchnorm == "batch"
    ctx = context(study, config, study.track)
    # the runs cached before the option existed keep their keys; the new run has its own
    stored_spec = A._adaptation_spec(ctx, study.adapted[A.LAYER_WISE].variant, list(study.track.tasks), True)
    batch_spec = A._adaptation_spec(ctx, study.adapted[A.BATCH_STATISTICS].variant, list(study.track.tasks), True)
    assert "batchnorm" not in stored_spec["variant"] and batch_spec["variant"]["batchnorm"] == "batch"
    assert collapse.loc[A.LAYER_WISE, "accuracy %"] == pytest.approx(A.mean_accuracy(study.correct(A.LAYER_WISE)).value)
    assert set(study.collapse.reestimated) == set(study.track.tasks)


# ----------------------------------------------------------------------------- findings
def claim_line(text: str, claim: str) -> str:
    lines = [line for line in text.splitlines() if claim in line]
    assert len(lines) == 1, (claim, text)
    return lines[0]


def with_outcomes(study, **rows):
    """The study with some rows' outcomes replaced: True = every example right, False = all wrong."""
    outcomes = dict(study.outcomes)
    for row, value in rows.items():
        outcomes[row] = {t: np.full_like(c, value) for t, c in study.outcomes[row].items()}
    return dataclasses.replace(study, outcomes=outcomes)


@needs_models
@needs_data
def test_findings_name_the_trivial_baseline_carry_uncertainties_and_state_scale_and_budget(study, config):
    text = A.findings({"vision": study}, config)
    claims = [line for line in text.splitlines() if line.startswith("- **")]
    assert len(claims) >= 7
    for line in claims:
        assert "Trivial baseline:" in line and ("±" in line or "95% CI" in line), line
    assert "Small-scale" in text and "smaller than the paper's 500 steps" in text
    assert "Trivial baseline: Task Arithmetic with λ chosen on validation" in text


@needs_models
@needs_data
def test_findings_follow_the_numbers(study, config):
    def verdict_of(s, claim):
        return claim_line(A.findings({"vision": s}, config), claim)

    main_claim = "track: layer-wise ≫ task-wise"
    line = verdict_of(with_outcomes(study, **{A.LAYER_WISE: True, A.TASK_WISE: False}), main_claim)
    assert "task-wise: held" in line
    line = verdict_of(with_outcomes(study, **{A.LAYER_WISE: False, A.TASK_WISE: True}), main_claim)
    assert "did not hold" in line and "The data suggest" in line
    better = {A.surgery_row(m): True for m in A.SURGERY_BASES} | {m: False for m in A.SURGERY_BASES}
    assert "every merge: held" in verdict_of(with_outcomes(study, **better), "Surgery adds")
    worse = {A.surgery_row(m): False for m in A.SURGERY_BASES} | {m: True for m in A.SURGERY_BASES}
    assert "every merge: did not hold" in verdict_of(with_outcomes(study, **worse), "Surgery adds")
    small = {A.fraction_row(f): True for f in (0.001, 0.01, 0.05, 1.0)} | {"Task Arithmetic": False}
    assert "suffices: held (from 0.1%" in verdict_of(with_outcomes(study, **small), "small fraction")

    adapted = study.adapted[A.LAYER_WISE]
    rng = np.random.default_rng(0)

    def with_cross_entropy(sign):
        h = adapted.history.copy()
        h["entropy"] = rng.random(len(h))
        h["cross_entropy"] = sign * 2 * h["entropy"] + 0.01 * rng.random(len(h))
        changed = dataclasses.replace(adapted, history=h)
        return dataclasses.replace(study, adapted={**study.adapted, A.LAYER_WISE: changed})

    assert "cross-entropy: held" in verdict_of(with_cross_entropy(+1), "entropy tracks")
    assert "cross-entropy: did not hold" in verdict_of(with_cross_entropy(-1), "entropy tracks")

    def with_gains(seen: bool, unseen: bool):
        """Task Arithmetic wrong everywhere; AdaMerging right on the seen (usps) and/or unseen (mnist) task."""
        ta = {t: np.zeros_like(c) for t, c in study.unseen.outcomes[A.SEEN_TA].items()}
        ada = {"usps": np.full_like(ta["usps"], seen), "mnist": np.full_like(ta["mnist"], unseen)}
        unseen_study = dataclasses.replace(study.unseen, outcomes={A.SEEN_ADA: ada, A.SEEN_TA: ta})
        return dataclasses.replace(study, unseen=unseen_study)

    spread_claim = "keeps its predictions spread"
    assert "it collapsed" in verdict_of(dataclasses.replace(study, collapse=synthetic_collapse(80, 25)), spread_claim)
    assert "Task Arithmetic's): held" in verdict_of(dataclasses.replace(study, collapse=synthetic_collapse(26, 25)),
                                                    spread_claim)

    assert "ones: held" in verdict_of(with_gains(seen=True, unseen=False), "unseen tasks gain less")
    assert "ones: did not hold" in verdict_of(with_gains(seen=False, unseen=True), "unseen tasks gain less")


# ----------------------------------------------------------------------------- the notebook
@needs_models
@needs_data
def test_notebook_02_runs_end_to_end_under_papermill(study, tmp_path):
    """The notebook's cells, not just the library: the tiny study (cached by the fixture), lists
    given as JSON strings as on the command line, into a temporary output folder."""
    import papermill

    out = tmp_path / "run02"
    parameters = {k: (json.dumps(list(v)) if isinstance(v, tuple) else v) for k, v in TINY.items()}
    papermill.execute_notebook(str(NOTEBOOK), str(tmp_path / "executed.ipynb"), cwd=str(NOTEBOOK.parent),
                               progress_bar=False, parameters={**parameters, "output_dir": str(out)})
    findings = (out / "findings.md").read_text()
    assert "Trivial baseline" in findings and "±" in findings
    for name in ("vision_main.csv", "paper_comparison.md", "entropy_vs_cross_entropy.png", "layerwise_coefficients.png",
                 "data_fractions.csv", "unseen_tasks.csv", "honest_variant.csv", "paper_budget.csv", "cost.csv",
                 "memory_and_time_per_step.png", "run.json"):
        assert (out / name).exists(), name
    assert pd.read_csv(out / "vision_main.csv").shape[0] == 16
    assert not (out.parent / "figures").exists()  # nothing written beside the output folder


def test_theta0_on_the_device_shares_the_encoders_tensors_where_their_values_agree():
    encoder = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    pre = {k: v.clone() for k, v in encoder.state_dict().items()}
    with torch.no_grad():
        encoder[1].weight.add_(1.0)  # the encoder no longer holds θ0 here: that key must be a copy
    shared = A.theta0_sharing_encoder(encoder, pre)
    own = encoder.state_dict()
    same_storage = {k: v.data_ptr() == own[k].data_ptr() for k, v in shared.items()}
    assert same_storage == {"0.weight": True, "0.bias": True, "1.weight": False, "1.bias": True}
    assert all(torch.equal(shared[k], pre[k]) for k in pre)
