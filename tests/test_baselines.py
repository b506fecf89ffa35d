"""Notebook 01's plumbing (lib/experiments/baselines.py): config, selection on validation only,
the end-to-end pipeline on a tiny track, and the findings computed from its results."""
import re
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from lib import merging
from lib.experiments import baselines as B
from lib.experiments import training
from lib.experiments.config import notebook_config, notebook_defaults
from lib.experiments.selection import Selection, TestSplitAccessed
from lib.experiments.tracks import VisionTrack
from lib.experiments.training import FinetuneConfig

from conftest import SHARED_DATA, SHARED_MODELS, needs_data, needs_models

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "01_merging_baselines.ipynb"


def test_notebook_parameters_are_exactly_the_config_fields_with_equal_defaults():
    defaults = notebook_defaults(NOTEBOOK)
    names = [f.name for f in fields(B.BaselinesConfig)]
    assert list(defaults) == names
    from_notebook = notebook_config(B.BaselinesConfig, defaults)
    assert from_notebook == B.BaselinesConfig()


def test_default_lambda_grid_is_methods_md_grid_searched_coarse_to_fine():
    config = B.BaselinesConfig()
    grid = config.lambda_grid
    assert grid[0] == 0.0 and grid[-1] == 1.0 and np.allclose(np.diff(grid), 0.1)
    # one halving of the 0.1 step reaches METHODS.md §1's resolution, 0.05
    assert config.lambda_refinements == 1 and np.isclose(0.1 / 2 ** config.lambda_refinements, 0.05)


def test_benchmark_v1_restores_the_first_design_and_keeps_the_callers_settings():
    v1 = B.BaselinesConfig(benchmark="v1")
    assert {name: getattr(v1, name) for name in B.BENCHMARK_V1} == B.BENCHMARK_V1
    assert v1.text_tasks == B.BaselinesConfig().text_tasks  # what v1 does not name stays
    mine = B.BaselinesConfig(benchmark="v1", vision_tasks=("usps",), text_heads="few_shot")
    assert mine.vision_tasks == ("usps",) and mine.text_heads == "few_shot" and mine.vision_heads == "probe"
    # the v1 design differs from today's defaults, or the parameter would change nothing
    assert any(getattr(B.BaselinesConfig(), k) != v for k, v in B.BENCHMARK_V1.items())
    with pytest.raises(ValueError, match="v1"):
        B.BaselinesConfig(benchmark="v3")


def test_unknown_tracks_are_clear_errors():
    with pytest.raises(ValueError, match="'text', 'vision'"):
        B.BaselinesConfig(tracks=("txt",))
    with pytest.raises(ValueError, match="batchnorm_examples = 0"):
        B.BaselinesConfig(batchnorm_examples=0).track("vision")
    with pytest.raises(ValueError, match="paper_vision_source = 'hub'.*'huggingface'"):
        B.BaselinesConfig(paper_vision_source="hub")  # refused at any scale, not only when the paper track is built


# ----------------------------------------------------------------------------- pipeline
class _TestForbidden(VisionTrack):
    """A track whose test split raises while ``forbid`` is set."""

    forbid: bool = False

    def split(self, task, split):
        if self.forbid and split == "test":
            raise AssertionError("the test split was read during selection")
        return super().split(task, split)


@needs_models
@needs_data
def test_pipeline_end_to_end_and_selection_never_reads_test(monkeypatch):
    track = _TestForbidden(tasks=["usps", "mnist"], data_dir=str(SHARED_DATA), models_dir=str(SHARED_MODELS),
                           max_train=128, max_validation=32, max_test=48, batchnorm_examples=40)
    ft = FinetuneConfig(max_steps=6, batch_size=16, eval_every=3, lr=1e-3, max_eval_examples=32)
    setup = B.prepare_track(track, ft, ft, progress=False)
    assert "layer1.0.bn1.running_mean" in setup.mergeable
    config = B.BaselinesConfig(lambda_grid=(0.0, 0.5, 1.0), fisher_examples=16, regmean_examples=32,
                               selection_examples=16)
    stats = B.compute_statistics(track, setup, config, progress=False)
    assert stats["gram"]["usps"]["conv1.weight"].shape == (27, 27)  # convolutions as unfolded patches
    assert stats["gram_counts"]["usps"]["conv1.weight"] == 32 * 32 * 32  # 32 images × 32×32 positions
    track.forbid = True
    merged = B.closed_form_merges(track, setup, stats, config, progress=False)
    track.forbid = False
    assert list(merged) == [merging.REGISTRY[m].label for m in B.METHODS]
    ta = merged["Task Arithmetic"]
    assert ta.selection.parameter == "scale" and ta.hyperparameters["scale"] == ta.selection.best
    # the chosen value is the validation maximum of the curve it reports (ties: the smallest)
    best = max(s for _, s in ta.selection.scores)
    assert ta.selection.best == min(v for v, s in ta.selection.scores if s == best)
    # buffers are averaged by every merge: TA's running variances equal the experts' mean
    key = "layer1.0.bn1.running_var"
    mean = torch.stack([e.encoder[key] for e in setup.experts.values()]).mean(0)
    assert torch.allclose(ta.state[key], mean, atol=1e-6)
    reestimated, reestimate = [], training.reestimate_batchnorm
    monkeypatch.setattr(training, "reestimate_batchnorm",
                        lambda *a, **k: reestimated.append(k["examples_per_split"]) or reestimate(*a, **k))
    table, outcomes = B.evaluate_methods(track, setup, merged, reestimate_bn=True, progress=False)
    assert reestimated == [40] * len(merged)  # the track's batchnorm_examples, for every merge
    wide = B.summary(table)
    assert "TIES (BN re-estimated)" in wide.index
    # per-example outcomes reproduce the table's accuracies
    for (row, bn), per_task in outcomes.items():
        for task, correct in per_task.items():
            acc = table[(table.method == row) & (table.batchnorm == bn) & (table.task == task)].accuracy.item()
            assert acc == pytest.approx(100 * correct.mean())


def test_selection_guard_catches_a_scorer_that_reads_test():
    """The guard itself: a scorer that asks for test data fails (this is what makes the test above able to fail)."""
    from lib.experiments.selection import select

    class Data:
        def split(self, task, which):
            return which

    with pytest.raises(TestSplitAccessed):
        select("scale", (0.0, 1.0), lambda v, data: len(data.split("a", "test")), Data())


# ----------------------------------------------------------------------------- findings
def _result(name: str, accuracies: dict[str, float], n: int = 1000, tasks=("a", "b"), seed=0, bn=None):
    """A TrackResult whose every row has the given accuracy (%) on each task, n examples each."""
    rows, outcomes = [], {}
    rng = np.random.default_rng(0)
    base = rng.random((len(tasks), n))  # shared per-example difficulty: paired outcomes correlate

    def add(row, acc, batchnorm="stored"):
        for i, task in enumerate(tasks):
            correct = base[i] < acc / 100
            outcomes.setdefault((row, batchnorm), {})[task] = correct
            rows.append({"track": name, "method": row, "task": task, "batchnorm": batchnorm,
                         "accuracy": 100 * correct.mean(), "metric": "accuracy"})

    for row, acc in accuracies.items():
        add(row, acc)
    for row, acc in (bn or {}).items():
        add(row, acc, "re-estimated")
    table = pd.DataFrame(rows)
    expert = table[table.method == B.EXPERTS].set_index("task")["accuracy"]
    table["normalized"] = 100 * table.accuracy / table.task.map(expert)
    merges = {row: B.MergeResult({}, {}, None) for row in accuracies if row not in (B.PRETRAINED, B.EXPERTS, B.MULTITASK)}
    return B.TrackResult(name, seed, SimpleNamespace(track=SimpleNamespace(tasks=list(tasks), scale="small")), merges, table, outcomes)


BASE = {B.PRETRAINED: 60, B.EXPERTS: 90, B.MULTITASK: 85}


def test_findings_name_the_trivial_baseline_and_carry_uncertainties():
    result = _result("vision", {**BASE, "Weight averaging": 70, "Fisher": 72, "Task Arithmetic": 74, "RegMean": 76, "TIES": 78})
    text = B.findings({"vision": result})
    assert text.count("Trivial baseline: θ0") >= 1 and "±" in text
    assert "vs θ0): held" in text
    assert "WA < Fisher < TA < RegMean < TIES: held" in text


def test_findings_say_when_merging_does_not_beat_doing_nothing():
    result = _result("vision", {**BASE, "Weight averaging": 55, "Fisher": 56, "Task Arithmetic": 57, "RegMean": 58, "TIES": 59})
    text = B.findings({"vision": result})
    assert "vs θ0): did not hold" in text


def test_findings_report_an_inverted_ordering_and_an_edge_optimum():
    result = _result("text", {**BASE, "Weight averaging": 80, "Fisher": 70, "Task Arithmetic": 74, "RegMean": 76, "TIES": 78})
    result.merges["Task Arithmetic"].selection = Selection("scale", 0.0, 1.0, [(0.0, 1.0), (0.05, 0.9)], "lower", [])
    text = B.findings({"text": result})
    assert "TIES: did not hold" in text  # Fisher is far below weight averaging
    assert re.search(r"Fisher − Weight averaging = -\d+\.\d ± \d+\.\d \(worse\)", text)
    assert "on the lower edge" in text


def test_seed_claim_is_within_noise_when_seeds_disagree():
    results = [_result("vision", {**BASE, "Weight averaging": 70, "Fisher": 70, "Task Arithmetic": 74 + d, "RegMean": 70,
                                  "TIES": 74 - d}, seed=s) for s, d in enumerate((2, -2, 1))]
    seeds = B.seed_table(results)
    assert set(seeds.seed) == {0, 1, 2}
    text = B.findings({"vision": results[0]}, seeds)
    assert "over 3 seeds" in text and "inconclusive (within noise)" in text
    summary = B.seed_summary(seeds)
    assert summary.loc[("vision", "TIES"), "± sd"] > 0


@needs_models
@needs_data
def test_notebook_01_runs_end_to_end_under_papermill_with_command_line_lists(tmp_path):
    """The notebook's cells, not just the library: a tiny vision run, lists given as JSON strings
    exactly as the README's command line passes them, into a temporary output folder."""
    import papermill

    out = tmp_path / "run01"
    papermill.execute_notebook(
        str(NOTEBOOK), str(tmp_path / "executed.ipynb"), cwd=str(NOTEBOOK.parent), progress_bar=False,
        parameters={"data_dir": str(SHARED_DATA), "models_dir": str(SHARED_MODELS), "output_dir": str(out),
                    "tracks": '["vision"]', "vision_tasks": '["usps", "mnist"]', "spread_seeds": "[1]",
                    "max_validation": 32, "max_test": 48, "lambda_grid": "[0.0, 0.5, 1.0]", "fisher_examples": 16,
                    "regmean_examples": 32, "selection_examples": 16, "vision_max_steps": 6, "eval_every": 3,
                    "multitask_steps_per_task": 3, "batchnorm_examples": 64, "progress": False})
    findings = (out / "findings.md").read_text()
    assert "Trivial baseline" in findings and "±" in findings
    seeds = pd.read_csv(out / "vision_seeds_long.csv")
    assert set(seeds.seed) == {0, 1}
    assert not (out.parent / "figures").exists()  # nothing written beside the output folder
