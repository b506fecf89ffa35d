"""Notebooks 02 and 05 at paper scale (issue 12): AdaMerging + Surgery and Twin-Merging on CLIP with
the published experts, run by the same code as the small scale (Twin-Merging's exact low-rank path
through CLIP's attention and embeddings), on a tiny CLIP and fake data in the real formats; and
the text track at paper scale, RoBERTa on GLUE, in notebooks 01 and 05, on a tiny RoBERTa and fake
GLUE copies."""
from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path

import pandas as pd
import pytest

from lib.experiments import adamerging as A
from lib.experiments import twin_merging as T
from lib.experiments.paper_tracks import GlueTextTrack
from lib.paper import glue as G
from lib.paper import vision_data as V

from paper_fakes import GLUE_TASKS, write_glue_paper_fakes, write_vision_paper_fakes

pytestmark = pytest.mark.usefixtures("one_thread", "private_downloads")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
# the tiny paper-scale settings both notebooks share (notebook 01's fields)
TINY = {"scale": "paper", "vision_tasks": '["mnist", "eurosat"]', "device": "cpu", "max_validation": 16,
        "lambda_grid": "[0.0, 0.5, 1.0]", "lambda_refinements": 0, "selection_examples": 8, "unseen_tasks": 1,
        "progress": False}


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    return write_vision_paper_fakes(tmp_path_factory.mktemp("paper"))


@pytest.fixture(scope="module")
def glue_fakes(tmp_path_factory):
    return write_glue_paper_fakes(tmp_path_factory.mktemp("glue"))


def _run(notebook: str, fakes, out: Path, **parameters) -> None:
    import papermill

    papermill.execute_notebook(
        str(NOTEBOOKS / notebook), str(out.parent / f"{out.name}.executed.ipynb"), cwd=str(NOTEBOOKS),
        progress_bar=False, parameters={**TINY, "data_dir": str(fakes / "data"), "models_dir": str(fakes / "models"),
                                        "output_dir": str(out), **parameters})


# ----------------------------------------------------------------------------- 02: AdaMerging
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


def test_notebook_02_runs_at_paper_scale_on_the_fakes(fakes, tmp_path):
    out = tmp_path / "run02"
    _run("02_adamerging.ipynb", fakes, out, fisher_examples=8, regmean_examples=16, vision_adamerging_steps=3,
         adamerging_batch_size=4, surgery_steps=3)
    written = sorted(p.name for p in out.iterdir())
    assert "findings.md" in written and "run.json" in written
    findings = (out / "findings.md").read_text()
    assert "Trivial baseline" in findings
    tables = [pd.read_csv(out / name) for name in written if name.endswith(".csv")]
    rows = set().union(*(set(t.iloc[:, 0].astype(str)) | set(t.get("method", pd.Series(dtype=str)).astype(str))
                         for t in tables))
    assert A.LAYER_WISE in rows and A.surgery_row(A.LAYER_WISE) in rows


# ----------------------------------------------------------------------------- 05: Twin-Merging
def test_twin_merging_at_paper_scale_takes_notebook_01s_paper_profile():
    paper = T.TwinMergingConfig(scale="paper")
    assert paper.tracks == ("vision",) and paper.vision_tasks == V.PAPER_VISION_TASKS and paper.max_test is None
    assert paper.baselines_config().track("vision").scale == "paper"
    # RoBERTa-base on the 8 GLUE tasks, Twin-Merging's main benchmark, when asked for
    glue = T.TwinMergingConfig(scale="paper", tracks=("text",))
    track = glue.baselines_config().track("text")
    assert isinstance(track, GlueTextTrack) and tuple(track.tasks) == G.PAPER_TEXT_TASKS and track.max_test == 1000
    assert glue.text_heads == "joint" and glue.bootstrap_resamples == 1000


def test_notebook_05_runs_at_paper_scale_on_the_fakes(fakes, tmp_path):
    out = tmp_path / "run05"
    _run("05_twin_merging.ipynb", fakes, out, router_sizes="[2, 4]", router_epochs=2, task_count_step=1,
         sweep_test_examples=8, stream_examples=8, stream_batch_size=4)
    findings = (out / "findings.md").read_text()
    assert "Paper scale" in findings and "Trivial baseline" in findings
    assert (out / "stream_cost.csv").exists()


def test_notebook_05_runs_twin_merging_on_glue_at_paper_scale_on_the_fakes(glue_fakes, tmp_path):
    """Twin-Merging's main benchmark, every experiment on RoBERTa with its two-layer heads (STS-B a
    regression), scored by the official GLUE scores with bootstrap uncertainties."""
    out = tmp_path / "run05_text"
    _run("05_twin_merging.ipynb", glue_fakes, out, tracks='["text"]', text_tasks=str(GLUE_TASKS).replace("'", '"'),
         router_sizes="[2, 4]", router_epochs=2, task_count_step=2, rank_ratios="[0.1, 0.3]", sweep_test_examples=12,
         stream_examples=8, stream_batch_size=4, bootstrap_resamples=50)
    main = pd.read_csv(out / "text_long.csv")
    twin = main[main.method == T.TWIN].set_index("task")
    experts = main[main.method == "Individual experts"].set_index("task")
    assert set(twin.index) == set(GLUE_TASKS) and math.isnan(twin.loc["stsb", "accuracy"])  # a regression
    assert twin.normalized.tolist() == pytest.approx((100 * twin.score / experts.score.reindex(twin.index)).tolist())
    assert "AdaMerging" not in set(main.method)  # notebook 02 does not run GLUE
    stream = pd.read_csv(out / "stream_cost.csv")
    assert "score" in stream.columns and "accuracy" not in stream.columns
    ablation = pd.read_csv(out / "ablation.csv")
    assert {"average GLUE score", "GLUE score SE"} <= set(ablation.columns)
    findings = (out / "findings.md").read_text()
    assert "Paper scale: RoBERTa-base on GLUE" in findings and "points of average GLUE score" in findings
    assert "not comparable (3 tasks" in findings and "paired bootstrap" in findings
    assert findings.count("Trivial baseline") == 6


# ----------------------------------------------------------------------------- 01: RoBERTa on GLUE
def test_notebook_01_runs_the_glue_track_at_paper_scale_on_the_fakes(glue_fakes, tmp_path):
    import papermill

    fakes = glue_fakes
    out = tmp_path / "run01_text"
    papermill.execute_notebook(
        str(NOTEBOOKS / "01_merging_baselines.ipynb"), str(tmp_path / "run01_text.executed.ipynb"), cwd=str(NOTEBOOKS),
        progress_bar=False,
        parameters={"scale": "paper", "tracks": '["text"]', "text_tasks": str(GLUE_TASKS).replace("'", '"'),
                    "data_dir": str(fakes / "data"), "models_dir": str(fakes / "models"), "output_dir": str(out),
                    "device": "cpu", "max_validation": 16, "lambda_grid": "[0.0, 0.5, 1.0]", "lambda_refinements": 0,
                    "fisher_examples": 8, "regmean_examples": 16, "selection_examples": 8, "progress": False})
    table = pd.read_csv(out / "text_baselines_long.csv")
    assert set(table.task) == set(GLUE_TASKS) and {"Task Arithmetic", "TIES", "Fisher", "RegMean"} <= set(table.method)
    assert (table[table.method == "Individual experts"].normalized == 100).all()  # official score / the expert's
    assert table[table.task == "stsb"].accuracy.isna().all()  # a regression has no accuracy
    findings = (out / "findings.md").read_text()
    assert "Paper scale" in findings and "average GLUE score" in findings and "Trivial baseline" in findings
