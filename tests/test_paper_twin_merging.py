"""Notebook 05 at paper scale (issue 12): Twin-Merging on CLIP with the published experts, by the
same code as the small scale (the exact low-rank path through CLIP's attention and embeddings),
on a tiny CLIP and fake data in the real formats."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path

import pytest

from lib.experiments import twin_merging as T
from lib.paper import vision_data as V

from paper_fakes import write_vision_paper_fakes

pytestmark = pytest.mark.usefixtures("one_thread", "private_downloads")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "05_twin_merging.ipynb"


def test_paper_scale_takes_notebook_01s_paper_profile():
    paper = T.TwinMergingConfig(scale="paper")
    assert paper.tracks == ("vision",) and paper.vision_tasks == V.PAPER_VISION_TASKS and paper.max_test is None
    assert paper.baselines_config().track("vision").scale == "paper"
    with pytest.raises(ValueError, match="vision track only"):
        T.TwinMergingConfig(scale="paper", tracks=("text",))


def test_notebook_05_runs_at_paper_scale_on_the_fakes(tmp_path_factory, tmp_path):
    import papermill

    fakes = write_vision_paper_fakes(tmp_path_factory.mktemp("paper"))
    out = tmp_path / "run05"
    papermill.execute_notebook(
        str(NOTEBOOK), str(tmp_path / "executed.ipynb"), cwd=str(NOTEBOOK.parent), progress_bar=False,
        parameters={"scale": "paper", "data_dir": str(fakes / "data"), "models_dir": str(fakes / "models"),
                    "output_dir": str(out), "vision_tasks": '["mnist", "eurosat"]', "device": "cpu",
                    "max_validation": 16, "lambda_grid": "[0.0, 0.5, 1.0]", "lambda_refinements": 0,
                    "selection_examples": 8, "router_sizes": "[2, 4]", "router_epochs": 2, "task_count_step": 1,
                    "unseen_tasks": 1, "sweep_test_examples": 8, "stream_examples": 8, "stream_batch_size": 4,
                    "progress": False})
    findings = (out / "findings.md").read_text()
    assert "Paper scale" in findings and "Trivial baseline" in findings
    assert (out / "stream_cost.csv").exists()
