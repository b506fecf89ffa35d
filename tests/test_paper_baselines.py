"""Notebook 01 at paper scale (issue 12): CLIP's image tower, zero-shot heads from its text tower,
the published experts, the papers' vision tasks, run by the same code as the small scale.

Everything is a fake in the real formats (``paper_fakes``): a tiny open_clip CLIP where open_clip's
hub repository would be, published experts as transformers folders, MNIST's idx files and a
EuroSAT hub copy. The loaders are the real ones; nothing touches the network.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path

import pandas as pd
import pytest
import torch

from lib.experiments import baselines as B
from lib.experiments.evaluation import evaluate
from lib.experiments.paper_tracks import ClipVisionTrack, autocast_dtype, run_device
from lib.experiments.training import FinetuneConfig, initial_heads
from lib.paper import rehearsal
from lib.paper import vision_data as V
from lib.paths import REPO_ROOT

from paper_fakes import VISION_TASKS, write_vision_paper_fakes

pytestmark = pytest.mark.usefixtures("one_thread", "private_downloads")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "01_merging_baselines.ipynb"
TASKS = VISION_TASKS


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    return write_vision_paper_fakes(tmp_path_factory.mktemp("paper"))


def test_paper_scale_takes_the_papers_setup_for_what_the_caller_left_unchanged():
    paper = B.BaselinesConfig(scale="paper")
    assert paper.tracks == ("vision",) and paper.vision_tasks == V.PAPER_VISION_TASKS
    assert paper.vision_heads == "zero_shot" and paper.max_test is None and paper.spread_seeds == ()
    mine = B.BaselinesConfig(scale="paper", vision_tasks=("mnist",), max_test=64, paper_vision_arch="ViT-L-14")
    assert mine.vision_tasks == ("mnist",) and mine.max_test == 64
    track = mine.track("vision")
    assert isinstance(track, ClipVisionTrack) and track.arch == "ViT-L-14" and track.max_test == 64
    assert B.BaselinesConfig(scale="paper", tracks=("text",)).tracks == ("text",)  # RoBERTa on GLUE, when asked
    with pytest.raises(ValueError, match="'small'.*'paper'"):
        B.BaselinesConfig(scale="large")


def test_devices_and_autocast_are_chosen_and_checked():
    assert run_device("cpu") == torch.device("cpu")
    assert autocast_dtype("auto", torch.device("cpu")) is None  # float32 on the CPU
    assert autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert autocast_dtype("fp16", torch.device("cuda")) is torch.float16
    with pytest.raises(ValueError, match="autocast = 'fp8'"):
        ClipVisionTrack(TASKS, autocast="fp8")
    with pytest.raises(ValueError, match="zero-shot heads"):
        ClipVisionTrack(TASKS, head_kind="few_shot")


def test_the_clip_track_gives_zero_shot_heads_published_experts_and_lazy_splits(fakes):
    track = ClipVisionTrack(TASKS, data_dir=str(fakes / "data"), models_dir=str(fakes / "models"), device="cpu",
                            max_validation=None)
    heads = initial_heads(track)
    assert set(heads) == set(TASKS) and heads["mnist"]["weight"].shape == (10, 16)
    assert float(heads["mnist"]["normalize"]) == 1.0  # CLIP normalizes image features
    setup = B.prepare_track(track, FinetuneConfig(), None)  # notebook 01 trains no multi-task model here
    assert setup.experts["mnist"].info["source"] == "tanganke/clip-vit-base-patch32_mnist"
    # every weight a published expert fine-tuned is merged; its projection is θ0's (a
    # CLIPVisionModel has none), so it is not
    floats = {k for k, v in setup.pretrained.items() if v.is_floating_point()}
    assert set(setup.mergeable) == floats - {"visual.proj"}
    test = track.split("mnist", "test")
    assert len(test) == 20 and test.batch([0, 1])["pixel_values"].shape == (2, 3, 32, 32)
    before = track.fingerprint("mnist")
    assert before == ClipVisionTrack(TASKS, data_dir=str(fakes / "data"), models_dir=str(fakes / "models"),
                                     max_validation=None).fingerprint("mnist")
    assert before != ClipVisionTrack(TASKS, data_dir=str(fakes / "data"), models_dir=str(fakes / "models"),
                                     max_validation=None, seed=1).fingerprint("mnist")  # another validation split
    encoder = track.pretrained_encoder()
    results = evaluate(track, encoder, setup.experts["mnist"].encoder, setup.heads, tasks=["mnist"])
    assert 0 <= results["mnist"]["accuracy"] <= 100 and len(results["mnist"]["correct"]) == 20


def test_threaded_decoding_gives_the_same_batches(fakes):
    """Images are decoded in threads on a GPU machine; the batch must not depend on it."""
    records = V.load_paper_vision_task("mnist", data_dir=fakes / "data").test
    transform = V.clip_transform(32)
    order = [5, 0, 19, 3, 3]
    torch.testing.assert_close(records.pixels(order, transform, workers=4), records.pixels(order, transform), rtol=0, atol=0)


def test_notebook_01_runs_at_paper_scale_on_the_fakes(fakes, tmp_path):
    """The notebook's own cells at scale="paper": every closed-form merge of the table, its λ
    chosen on validation, evaluated on the full fake test sets, with findings and a run record."""
    import papermill

    out = tmp_path / "run01"
    papermill.execute_notebook(
        str(NOTEBOOK), str(tmp_path / "executed.ipynb"), cwd=str(NOTEBOOK.parent), progress_bar=False,
        parameters={"scale": "paper", "data_dir": str(fakes / "data"), "models_dir": str(fakes / "models"),
                    "output_dir": str(out), "vision_tasks": '["mnist", "eurosat"]', "device": "cpu",
                    "max_validation": 16, "lambda_grid": "[0.0, 0.5, 1.0]", "lambda_refinements": 0,
                    "fisher_examples": 8, "regmean_examples": 16, "selection_examples": 8, "progress": False})
    table = pd.read_csv(out / "vision_baselines_long.csv")
    assert set(table.batchnorm) == {"stored"}  # no BatchNorm in a ViT: nothing re-estimated
    assert {"Task Arithmetic", "TIES", "Fisher", "RegMean"} <= set(table.method)
    assert "Multi-task" not in set(table.method)
    assert table[table.task == "mnist"].groupby("method").size().max() == 1
    findings = (out / "findings.md").read_text()
    assert "Trivial baseline" in findings
    assert not (out / "vision_seed_spread.csv").exists()  # published experts: no seed spread


def test_cache_keys_name_theta0_by_its_weights_not_only_its_name(fakes, tmp_path):
    """Two θ0 checkpoints under one name (the rehearsal's random stand-ins and the real weights, a
    re-download) are two backbones: neither is given the other's cached zero-shot heads."""
    from lib.paper.clip import task_zero_shot_head

    rehearsal.write_clip_hub(tmp_path / "models", ["mnist"], config=rehearsal.TINY_CLIP, seed=7)
    one, other = (ClipVisionTrack(["mnist"], data_dir=str(fakes / "data"), models_dir=str(models), device="cpu")
                  for models in (fakes / "models", tmp_path / "models"))
    assert one.backbone_id() == other.backbone_id() and one.backbone_weights() != other.backbone_weights()
    first = one.zero_shot_heads()["mnist"]  # cached first
    second = other.zero_shot_heads()["mnist"]
    torch.testing.assert_close(second["weight"], task_zero_shot_head(other._bundle(), "mnist")["weight"])
    assert not torch.equal(first["weight"], second["weight"])


def test_every_task_reads_from_the_rehearsals_hub_copies(tmp_path):
    """The rehearsal's stand-in datasets are hub copies the real reader takes, with each task's
    real class names and the images at the task's typical size."""
    sizes = rehearsal.write_hub_copies(tmp_path, V.PAPER_VISION_TASKS, train_per_class=1, test_per_class=1)
    for task in V.PAPER_VISION_TASKS:
        read = V.load_paper_vision_task(task, data_dir=tmp_path, source="huggingface")
        assert read.num_classes == len(V.task_spec(task).classes) == sizes[task]["test"]
        assert len(read.train) + len(read.validation) == sizes[task]["train"] and len(read.test) == sizes[task]["test"]
        assert read.test.image(0).size == rehearsal.TYPICAL_IMAGE_SIZE[task]
    track = ClipVisionTrack(["svhn"], data_dir=str(tmp_path), source="huggingface", device="cpu")
    assert any("Hugging Face" in note for note in track.raw("svhn").notes)  # not its default, torchvision
    with pytest.raises(ValueError, match="source = 'hub'"):
        ClipVisionTrack(["svhn"], source="hub")


def test_the_rehearsal_runs_notebook_01_on_stand_ins_and_reports_its_cost(tmp_path):
    """make rehearse-paper's script, on a tiny CLIP under ViT-B/32's names: it writes the stand-ins,
    runs the notebook at paper scale on them and reports its stages, merges and peak memory."""
    spec = importlib.util.spec_from_file_location("rehearse_paper", REPO_ROOT / "benchmarks" / "rehearse_paper.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    small = ["max_validation=16", "lambda_grid=[0.0, 1.0]", "lambda_refinements=0", "fisher_examples=4",
             "regmean_examples=8", "selection_examples=8"]
    assert script.main(["--tiny", "--tasks", "mnist", "eurosat", "--no-record", "--work", str(tmp_path),
                        "--train-per-class", "10", "--test-per-class", "2"]
                       + [a for p in small for a in ("--param", p)]) == 0
    table = pd.read_csv(tmp_path / "report" / "rehearsal.csv", index_col="what")
    assert table.loc["merge: TIES", "unit"] == "s" and table.loc["test images, all tasks", "value"] == 40
    assert table.loc["peak host memory (the kernel's resident set)", "value"] > 0.1
    assert set(pd.read_csv(tmp_path / "notebook" / "vision_baselines_long.csv").task) == {"mnist", "eurosat"}
    assert json.loads((tmp_path / "report" / "run.json").read_text())["notebook"] == "benchmarks/rehearse_paper.py"
    assert any((tmp_path / "cache").rglob("*.safetensors"))  # its own cache, not the session's
    assert os.environ["MERGE_CACHE_DIR"] != str(tmp_path / "cache")  # and this process's setting is back


def test_findings_set_a_paper_scale_run_beside_the_published_numbers():
    from types import SimpleNamespace

    from test_baselines import _result

    rows = {B.PRETRAINED: 48.0, B.EXPERTS: 90.0, "Task Arithmetic": 70.0, "TIES": 72.0}
    result = _result("vision", rows, tasks=V.PAPER_VISION_TASKS)
    result.setup = SimpleNamespace(track=SimpleNamespace(tasks=list(V.PAPER_VISION_TASKS), scale="paper",
                                                         arch="ViT-B-32"))
    text = B.findings({"vision": result})
    assert "Paper scale" in text and "Small-scale" not in text
    assert re.search(r"Task Arithmetic 7\d\.\d ± 0\.\d \(published 69\.1\)", text)
    assert re.search(r"TIES 7\d\.\d ± 0\.\d \(published 72\.4\)", text)
    result.setup.track.arch = "ViT-L-14"  # published numbers are ViT-B/32's: no comparison
    assert "not comparable (ViT-L-14 on 8 tasks" in B.findings({"vision": result})


def test_the_clip_recipe_warms_up_then_follows_half_a_cosine():
    from lib.experiments.paper_tracks import CLIP_RECIPE
    from lib.experiments.training import _lr_factor

    recipe = dataclasses.replace(CLIP_RECIPE, max_steps=1500)  # 500 warm-up steps, then 1000 of cosine
    factors = [_lr_factor(step, recipe) for step in range(1500)]
    assert factors[0] == pytest.approx(1 / 500) and factors[499] == pytest.approx(1.0)
    assert factors[999] == pytest.approx(0.5, abs=2e-3)  # half-way through the decay: cos(π/2)
    assert factors[-1] == pytest.approx(0.0, abs=1e-4) and all(a >= b for a, b in zip(factors[499:], factors[500:]))
    linear = dataclasses.replace(recipe, schedule="linear")
    assert _lr_factor(999, linear) == pytest.approx(0.501)
    # a setting added after experts were cached keys them only when it is not its default
    assert "schedule" not in FinetuneConfig().key() and recipe.key()["schedule"] == "cosine"


def test_experts_can_be_fine_tuned_here_with_the_recipe(fakes):
    track = ClipVisionTrack(["mnist"], data_dir=str(fakes / "data"), models_dir=str(fakes / "models"), device="cpu",
                            experts="finetune", max_validation=8)
    config = B.BaselinesConfig(scale="paper", vision_tasks=("mnist",), vision_max_steps=3, eval_every=3,
                               vision_batch_size=4)
    experts_config, multitask_config = config.finetune_configs("vision", 1)
    assert multitask_config is None and experts_config.schedule == "cosine" and experts_config.weight_decay == 0.1
    setup = B.prepare_track(track, dataclasses.replace(experts_config, warmup_steps=1), None, progress=False)
    expert = setup.experts["mnist"]
    assert expert.info["steps"] == 3 and "source" not in expert.info
    moved = [k for k in setup.pretrained if not torch.equal(setup.pretrained[k], expert.encoder[k])]
    assert moved and all(torch.equal(expert.heads["mnist"][k], setup.heads["mnist"][k]) for k in setup.heads["mnist"])


def test_vit_l14_is_fine_tuned_in_parts_that_fit_a_24_gb_card_unless_told_otherwise():
    def micro(**settings):
        return B.BaselinesConfig(scale="paper", **settings).finetune_configs("vision", 8)[0].micro_batch_size

    assert micro() is None and micro(paper_vision_arch="ViT-B-16") is None  # whole batches fit (bench-gpu-paper)
    assert micro(paper_vision_arch="ViT-L-14") == 16 and micro(paper_vision_arch="ViT-L-14", paper_micro_batch=32) == 32
    assert B.BaselinesConfig(scale="paper", paper_vision_arch="ViT-L-14").finetune_configs("vision", 8)[0].batch_size == 128
    with pytest.raises(ValueError, match="paper_micro_batch = -1"):
        B.BaselinesConfig(scale="paper", paper_micro_batch=-1)


def test_vit_l14_fisher_vmaps_fewer_examples_at_once_so_that_it_fits_a_24_gb_card(monkeypatch):
    def chunk(**settings):
        return B.BaselinesConfig(scale="paper", **settings).track("vision").fisher_chunk

    # bench-gpu-memory: chunks of 16 need ~33 GiB on L/14 (16 per-example gradients of 1.1 GiB)
    assert chunk() == 16 and chunk(paper_vision_arch="ViT-B-16") == 16 and chunk(paper_vision_arch="ViT-L-14") == 4
    assert chunk(paper_vision_arch="ViT-L-14", paper_fisher_chunk=2) == 2
    assert B.BaselinesConfig().track("vision").fisher_chunk == 16  # the small scale: as before
    with pytest.raises(ValueError, match="paper_fisher_chunk = -1"):
        B.BaselinesConfig(scale="paper", paper_fisher_chunk=-1)
    seen = {}
    monkeypatch.setattr(B, "_classifier", lambda *args: None)
    monkeypatch.setattr(B.statistics, "diagonal_fisher", lambda *args, **kwargs: seen.update(kwargs) or {})

    class Split:
        def subset(self, n, seed):
            return self

        def batches(self, size):
            return []

    track = B.BaselinesConfig(scale="paper", paper_vision_arch="ViT-L-14").track("vision")
    B._fisher(track, {}, {}, Split(), [], B.BaselinesConfig(), 8)
    assert seen["chunk_size"] == 4  # what the statistics are computed with
