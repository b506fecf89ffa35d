"""The FS-Merge study's plumbing: cached experts, pools, evaluation of every method, cost."""
import numpy as np
import pytest
import torch

from lib.experiments.cost import measured_call
from lib.fs_merge import folded_logits
from lib.experiments.fs_merge import (
    AVERAGE,
    DISTILLATION,
    ENSEMBLE,
    FS_MERGE,
    MODEL_1,
    REBASIN,
    REGMEAN,
    SLERP,
    ZIPIT,
    FSStudy,
    FSStudyConfig,
    expert_seed,
    make_model,
    merge,
    methods_for,
    regmean_grams,
    summary,
)

from conftest import SHARED_DATA, needs_data

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(train_per_task=64, test_per_task=40, mlp_hidden=[16], vit_width=8, vit_depth=1, vit_heads=2, mlp_epochs=1,
            vit_epochs=1, warmup_tasks=["usps"], warmup_per_task=32, warmup_epochs=1, finetune_epochs=1, rebasin_sweeps=3,
            num_images=4, augment=2, fs_steps_mlp=2, fs_steps_vit=2, rank=2)


@pytest.fixture(scope="module")
def study():
    return FSStudy(FSStudyConfig(**TINY), data_dir=SHARED_DATA, progress=False)


def test_config_round_trips_through_notebook_parameters():
    config = FSStudyConfig(**TINY)
    namespace = {**config.as_dict(), "data_dir": "x", "unrelated": 1}
    assert FSStudyConfig.from_parameters(namespace) == config


def test_every_expert_gets_its_own_seed():
    seeds = {expert_seed(0, arch, task, "scratch") for arch in ("mlp", "vit") for task in ("mnist", "usps", "cifar10")}
    assert len(seeds) == 6
    assert expert_seed(0, "mlp", "mnist") == expert_seed(0, "mlp", "mnist") != expert_seed(1, "mlp", "mnist")


@needs_data
def test_experts_are_cached_and_reloaded_identically(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGE_CACHE_DIR", str(tmp_path / "a"))
    config = FSStudyConfig(**TINY)
    first = FSStudy(config, data_dir=SHARED_DATA, progress=False).expert("mlp", "mnist")
    assert first.info["cached"] is False and first.info["steps"] == 1
    again = FSStudy(config, data_dir=SHARED_DATA, progress=False).expert("mlp", "mnist")
    assert again.info["cached"] is True
    for key, value in first.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[key], value), key
    # deterministic under the seed: training again from nothing gives the same weights
    monkeypatch.setenv("MERGE_CACHE_DIR", str(tmp_path / "b"))
    retrained = FSStudy(config, data_dir=SHARED_DATA, progress=False).expert("mlp", "mnist")
    assert retrained.info["cached"] is False
    for key, value in first.model.state_dict().items():
        assert torch.equal(retrained.model.state_dict()[key], value), key
    # a change in training settings is another cache entry
    other = FSStudy(FSStudyConfig(**{**TINY, "expert_lr": 2e-3}), data_dir=SHARED_DATA, progress=False).expert("mlp", "mnist")
    assert other.info["cached"] is False


@needs_data
def test_experts_of_a_setting_start_from_different_inits(study):
    pair = study.setting("mlp", ["mnist", "usps"])
    seeds = [e.info["init_seed"] for e in pair.experts]
    assert seeds[0] != seeds[1]
    assert [e.task for e in pair.experts] == ["mnist", "usps"]


@needs_data
def test_unlabeled_pools_are_nested_seeded_and_augmented(study):
    small, large = study.pool("mnist", 4, 2), study.pool("mnist", 8, 0)
    assert small.shape == (12, 3, 32, 32) and large.shape == (8, 3, 32, 32)
    assert all(any(torch.equal(x, y) for y in large) for x in small[:4])  # the smaller pool's originals
    fresh = FSStudy(study.config, data_dir=SHARED_DATA, progress=False)
    fresh._tasks = study._tasks  # same data, no reload
    assert torch.equal(fresh.pool("mnist", 4, 2), small)


@needs_data
@pytest.mark.parametrize("arch", ["mlp", "vit"])
def test_untrained_first_fs_merge_is_model_1(study, arch):
    pair = study.setting(arch, ["mnist", "usps"])
    fs = study.run(pair, FS_MERGE, steps=0)
    model_1 = study.run(pair, MODEL_1)
    assert fs[0]["accuracy"] == pair_expert_accuracy(study, pair, 0)
    assert [r["accuracy"] for r in fs] == [r["accuracy"] for r in model_1]
    assert fs[0]["steps"] == 0 and model_1[0]["steps"] is None


def pair_expert_accuracy(study, pair, t):
    return study.expert_accuracy(pair.experts[t])


@needs_data
def test_ensemble_equals_each_expert_on_its_own_task(study):
    pair = study.setting("mlp", ["mnist", "usps"])
    rows = study.run(pair, ENSEMBLE)
    assert [r["accuracy"] for r in rows] == [r["expert_accuracy"] for r in rows]
    assert rows[0]["trunk_parameters"] == 2 * study.run(pair, AVERAGE)[0]["trunk_parameters"]
    wide = summary(study.results().query("method == @ENSEMBLE"))
    assert np.allclose(wide["normalized"], 100) and np.allclose(wide["retained"], 100)


@needs_data
def test_every_method_runs_and_is_memoised(study):
    pair = study.setting("mlp", ["mnist", "usps"])
    assert ZIPIT in methods_for(pair) and ZIPIT not in methods_for(study.setting("vit", ["mnist", "usps"]))
    rows = study.run_all(pair)
    assert {r["method"] for r in rows} == set(methods_for(pair))
    assert all(0 <= r["accuracy"] <= 100 and r["seconds"] >= 0 for r in rows)
    trained = [r for r in rows if r["method"] in (FS_MERGE, DISTILLATION)]
    assert all(r["steps"] == 2 and r["num_images"] == 4 and np.isfinite(r["final_loss"]) for r in trained)
    assert study.run(pair, FS_MERGE) is study.run(pair, FS_MERGE)  # memoised, not retrained


@needs_data
def test_same_init_experts_share_the_warmup(study):
    assert study.warmup_tasks(["mnist", "usps"]) == ["usps"]  # the tiny config names it
    default = FSStudy(FSStudyConfig(**{**TINY, "warmup_tasks": []}), data_dir=SHARED_DATA, progress=False)
    assert default.warmup_tasks(["mnist", "usps"]) == ["fashion_mnist", "gtsrb", "cifar10"]
    control = study.setting("mlp", ["mnist", "fashion_mnist"], init="same")
    prints = {e.info["shared_init"]["fingerprint"] for e in control.experts}
    assert len(prints) == 1 and control.name.endswith("(same init)")


@pytest.mark.parametrize("arch", ["mlp", "vit"])
def test_closed_form_merges_of_a_model_with_itself_give_the_model(arch):
    config = FSStudyConfig(**TINY)
    torch.manual_seed(0)
    model = make_model(arch, 5, config).eval()
    pool = torch.randn(64, 3, 32, 32)
    grams = regmean_grams(model, pool)
    if arch == "vit":
        assert {"conv1.weight", "proj", "transformer.resblocks.0.attn.in_proj_weight",
                "transformer.resblocks.0.attn.out_proj.weight", "transformer.resblocks.0.mlp.c_fc.weight",
                "transformer.resblocks.0.mlp.c_proj.weight"} == set(grams)
    else:
        assert set(grams) == {"layers.0.weight"}
    x = torch.randn(8, 3, 32, 32)
    methods = [AVERAGE, SLERP, REGMEAN, REBASIN] + ([ZIPIT] if arch == "mlp" else [])
    with torch.no_grad():
        expected = model(x)
        for method in methods:
            merged, maps, _ = merge(method, [model, model], [pool, pool], config)
            for t in range(2):
                assert torch.allclose(folded_logits(merged, maps, model.head, x, t), expected, atol=1e-4), (method, t)


def test_measured_call_returns_the_result_time_and_peak_memory():
    result, seconds, peak = measured_call(lambda: torch.ones(16 * 2**20))  # 64 MiB
    assert result.numel() == 16 * 2**20 and seconds >= 0
    if not np.isnan(peak):
        assert peak > 48
