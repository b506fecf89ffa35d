"""Notebook 02 at paper scale (issue 12): AdaMerging and Surgery on CLIP with the published experts,
run by the same code as the small scale, on a tiny CLIP and fake data in the real formats."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path

import pandas as pd
import pytest

from lib.experiments import adamerging as A
from lib.paper import vision_data as V

from paper_fakes import write_vision_paper_fakes

pytestmark = pytest.mark.usefixtures("one_thread", "private_downloads")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "02_adamerging.ipynb"


def test_paper_scale_takes_the_papers_setup_and_the_authors_budget():
    paper = A.AdaMergingConfig(scale="paper")
    assert paper.tracks == ("vision",) and paper.vision_tasks == V.PAPER_VISION_TASKS and paper.max_test is None
    assert paper.vision_adamerging_steps == A.PAPER_STEPS and paper.paper_budget_track == ""
    assert paper.lr_for(paper.steps_for("vision")) == paper.adamerging_lr  # the paper's lr, unscaled
    base = paper.baselines_config()
    assert base.scale == "paper" and base.vision_tasks == V.PAPER_VISION_TASKS
    mine = A.AdaMergingConfig(scale="paper", vision_adamerging_steps=50)
    assert mine.vision_adamerging_steps == 50
    with pytest.raises(ValueError, match="vision track only"):
        A.AdaMergingConfig(scale="paper", tracks=("text",))


def test_notebook_02_runs_at_paper_scale_on_the_fakes(tmp_path_factory, tmp_path):
    import papermill

    fakes = write_vision_paper_fakes(tmp_path_factory.mktemp("paper"))
    out = tmp_path / "run02"
    papermill.execute_notebook(
        str(NOTEBOOK), str(tmp_path / "executed.ipynb"), cwd=str(NOTEBOOK.parent), progress_bar=False,
        parameters={"scale": "paper", "data_dir": str(fakes / "data"), "models_dir": str(fakes / "models"),
                    "output_dir": str(out), "vision_tasks": '["mnist", "eurosat"]', "device": "cpu",
                    "max_validation": 16, "lambda_grid": "[0.0, 0.5, 1.0]", "lambda_refinements": 0,
                    "fisher_examples": 8, "regmean_examples": 16, "selection_examples": 8,
                    "vision_adamerging_steps": 3, "adamerging_batch_size": 4, "unseen_tasks": 1, "surgery_steps": 3,
                    "progress": False})
    written = sorted(p.name for p in out.iterdir())
    assert "findings.md" in written and "run.json" in written
    findings = (out / "findings.md").read_text()
    assert "Trivial baseline" in findings
    tables = [pd.read_csv(out / name) for name in written if name.endswith(".csv")]
    rows = set().union(*(set(t.iloc[:, 0].astype(str)) | set(t.get("method", pd.Series(dtype=str)).astype(str))
                         for t in tables))
    assert A.LAYER_WISE in rows and A.surgery_row(A.LAYER_WISE) in rows
