"""Notebook 00 (benchmark calibration): its config, the criterion and the choice of a default on
synthetic tables, and the notebook end to end on a tiny vision run."""
from dataclasses import fields
from pathlib import Path

import pandas as pd
import pytest

from conftest import SHARED_DATA, SHARED_MODELS, needs_data, needs_models
from lib.experiments import calibration as C
from lib.experiments.config import notebook_config, notebook_defaults

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "00_benchmark_calibration.ipynb"


def test_notebook_parameters_are_exactly_the_config_fields_with_equal_defaults():
    defaults = notebook_defaults(NOTEBOOK)
    assert list(defaults) == [f.name for f in fields(C.CalibrationConfig)]
    assert notebook_config(C.CalibrationConfig, defaults) == C.CalibrationConfig()


def test_designs_cover_every_combination_and_map_onto_notebook_01s_config():
    config = C.CalibrationConfig(vision_heads=("joint", "few_shot"), vision_backbones=("resnet20", "resnet56"),
                                 vision_max_steps=(100, 300), text_heads=("zero_shot",))
    designs = config.designs()
    assert len([d for d in designs if d.track == "vision"]) == 8 and len(designs) == 9
    base = config.baselines_config(C.Design("vision", "few_shot", "resnet56", 300))
    assert (base.vision_heads, base.vision_backbone, base.vision_max_steps) == ("few_shot", "resnet56", 300)
    assert base.vision_tasks == config.vision_tasks and base.lambda_grid == config.lambda_grid
    with pytest.raises(ValueError, match="paper"):
        C.CalibrationConfig(scale="paper")


def test_criterion_measures_each_shortfall_in_points():
    assert C.criterion(theta0=55, ta=70, ties=72, best_merge=80) == {
        "θ0 in range": 0.0, "best merge ≤ max": 0.0, "TA, TIES gain": 0.0}
    misses = C.criterion(theta0=80, ta=85, ties=92, best_merge=92)
    assert misses == {"θ0 in range": 10.0, "best merge ≤ max": 4.0, "TA, TIES gain": 5.0}
    assert C.criterion(theta0=30, ta=45, ties=41, best_merge=45)["θ0 in range"] == 10.0
    assert C.criterion(theta0=30, ta=45, ties=41, best_merge=45)["TA, TIES gain"] == 0.0  # 11 ≥ 10
    assert C.criterion(theta0=30, ta=45, ties=39, best_merge=45)["TA, TIES gain"] == 1.0


def _row(heads, theta0, wa, ta, ties, minutes=10.0, track="vision"):
    misses = C.criterion(theta0, ta, ties, max(wa, ta, ties))
    return {"track": track, "heads": heads, "backbone": "resnet20", "max steps": 600, "experts acc.": 95.0,
            "θ0 + heads acc.": theta0 * 0.95, "θ0 + heads norm.": theta0, "Weight averaging norm.": wa,
            "Task Arithmetic norm.": ta, "TIES norm.": ties, "TA − θ0": ta - theta0, "TIES − θ0": ties - theta0,
            **{f"miss: {k}": v for k, v in misses.items()},
            "meets criterion": all(v == 0 for v in misses.values()), "experts stopped early": "7/7",
            "training min": minutes}


def test_choice_prefers_designs_that_meet_the_criterion_then_closeness_to_the_paper_then_cost():
    table = pd.DataFrame([_row("probe", 85, 80, 88, 90),          # θ0 too strong: fails
                          _row("few_shot", 60, 60, 75, 78, 30),   # meets, 7 points from 53
                          _row("joint", 48, 55, 70, 74, 50)])     # meets, 5 points from 53
    chosen, met = C.choose(table, "vision")
    assert met and chosen["heads"] == "joint"
    tied = pd.DataFrame([_row("joint", 58, 55, 70, 74, 50), _row("few_shot", 48, 60, 75, 78, 30)])
    assert C.choose(tied, "vision")[0]["heads"] == "few_shot"  # both 5 from 53: the cheaper
    text = C.findings(table)
    assert "chosen design: joint heads" in text and "meets the criterion" in text
    assert f"vs {C.PAPER_NORMALIZED['Pretrained']:.1f}" in text


def test_when_nothing_meets_the_criterion_the_closest_is_named_with_what_it_misses():
    table = pd.DataFrame([_row("probe", 85, 80, 88, 90), _row("few_shot", 75, 70, 80, 82)])
    chosen, met = C.choose(table, "vision")
    assert not met and chosen["heads"] == "few_shot"  # misses by 5 + 0 + 3 against 15 + 2 + 7
    text = C.findings(table)
    assert "no design meets the criterion" in text and "θ0 in range by 5.0 points" in text
    with pytest.raises(ValueError, match="no calibrated design of the text track"):
        C.choose(table, "text")


@needs_models
@needs_data("vision/usps.npz", "vision/mnist.npz")
def test_notebook_00_runs_end_to_end_under_papermill(tmp_path):
    import papermill

    out = tmp_path / "run00"
    papermill.execute_notebook(
        str(NOTEBOOK), str(tmp_path / "executed.ipynb"), cwd=str(NOTEBOOK.parent), progress_bar=False,
        parameters={"data_dir": str(SHARED_DATA), "models_dir": str(SHARED_MODELS), "output_dir": str(out),
                    "tracks": '["vision"]', "vision_tasks": '["usps", "mnist"]', "vision_heads": '["few_shot", "joint"]',
                    "vision_max_steps": "[6]", "eval_every": 3, "max_validation": 32, "selection_examples": 16,
                    "lambda_grid": "[0.0, 0.5, 1.0]", "head_shots": 4, "progress": False})
    table = pd.read_csv(out / "calibration.csv")
    assert list(table.heads) == ["few_shot", "joint"]
    assert table["θ0 + heads norm."].notna().all() and table["TIES norm."].notna().all()
    assert "Criterion, fixed before any design was run" in (out / "findings.md").read_text()
    assert (out / "calibration.png").exists() and (out / "run.json").exists()
