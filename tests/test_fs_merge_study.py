"""The FS-Merge study's plumbing: config, cache keys, verdicts on synthetic tables, and (with the
mirror) cached experts, pools and every method."""
import dataclasses
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lib.experiments.config import notebook_config, notebook_defaults
from lib.experiments.cost import measured_call
from lib.experiments.findings import Estimate, mean_accuracy, over_seeds, paired_difference
from lib.experiments.fs_merge import (
    AVERAGE,
    CLOSED_FORM,
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
    ablation_notes,
    advantage_largest_with_little_data,
    contrast,
    distillation_works,
    expert_code,
    expert_seed,
    findings,
    finetuned_expert_spec,
    fs_merge_beats_distillation,
    main_table,
    make_model,
    merge,
    methods_for,
    outcomes,
    paired_contrast,
    quoted,
    regmean_grams,
    scratch_expert_spec,
    shared_init_narrows_the_gap,
    shared_init_spec,
    simple_merges_collapse,
    summary,
)
from lib.experiments.cache import cache_path, code_hash
from lib.fs_merge import folded_logits

from conftest import SHARED_DATA, needs_data

pytestmark = pytest.mark.usefixtures("one_thread")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "03_fs_merge.ipynb"
TINY = dict(train_per_task=64, test_per_task=40, mlp_hidden=[16], vit_width=8, vit_depth=1, vit_heads=2, mlp_epochs=1,
            vit_epochs=1, warmup_tasks=["usps"], warmup_per_task=32, warmup_epochs=1, finetune_epochs=1, rebasin_sweeps=3,
            num_images=4, augment=2, fs_steps_mlp=2, fs_steps_vit=2, rank=2, progress=False,
            data_dir=str(SHARED_DATA or ""))


@pytest.fixture(scope="module")
def study():
    return FSStudy(FSStudyConfig(**TINY))


# ----------------------------------------------------------------------------- config


def test_notebook_parameters_are_exactly_the_config_fields_with_equal_defaults():
    defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in dataclasses.fields(FSStudyConfig)}
    assert notebook_defaults(NOTEBOOK) == defaults


def test_small_is_the_default_and_an_unknown_scale_is_a_clear_error():
    assert FSStudyConfig().scale == "small"
    assert notebook_config(FSStudyConfig, {"scale": "paper"}).scale == "paper"  # tests/test_paper_fs_merge.py
    with pytest.raises(ValueError, match="scale"):
        notebook_config(FSStudyConfig, {"scale": "huge"})


def test_notebook_config_reads_lists_given_on_the_command_line():
    config = notebook_config(FSStudyConfig, {"mlp_pairs": '[["mnist", "usps"]]', "rank": 3, "unrelated": 1})
    assert config.mlp_pairs == [["mnist", "usps"]] and config.rank == 3


def test_every_expert_gets_its_own_seed():
    seeds = {expert_seed(0, arch, task, "scratch") for arch in ("mlp", "vit") for task in ("mnist", "usps", "cifar10")}
    assert len(seeds) == 6
    assert expert_seed(0, "mlp", "mnist") == expert_seed(0, "mlp", "mnist") != expert_seed(1, "mlp", "mnist")


# ------------------------------------------------------------------------- cache keys


def keys(config):
    """The cache file of every kind of cached expert under ``config`` (fixed data fingerprints)."""
    out = {}
    for arch in ("mlp", "vit"):
        specs = {"scratch": scratch_expert_spec(config, arch, "mnist", "f1", 10),
                 "shared": shared_init_spec(config, arch, {"usps": "f2", "gtsrb": "f3"}),
                 "finetuned": finetuned_expert_spec(config, arch, "mnist", "f1", 10, "shared-hash")}
        for kind, spec in specs.items():
            out[arch, kind] = cache_path("k", {**spec, "code": code_hash(*expert_code(arch, kind))})
    return out


ARCHS, KINDS = ("mlp", "vit"), ("scratch", "shared", "finetuned")


def only(arch=None, kinds=KINDS):
    return {(a, k) for a in ARCHS for k in kinds if arch in (None, a)}


SHAPES_EXPERTS = {  # field -> (another value, the cached artefacts it must change)
    "seed": (1, only()), "image_size": (16, only()), "train_per_task": (100, only()),
    "expert_weight_decay": (0.1, only()), "expert_batch_size": (64, only()),
    "mlp_hidden": ([32], only("mlp")), "mlp_epochs": (2, only("mlp", ["scratch"])),
    "vit_patch": (4, only("vit")), "vit_width": (32, only("vit")), "vit_depth": (2, only("vit")),
    "vit_heads": (2, only("vit")), "vit_mlp_ratio": (4.0, only("vit")), "vit_epochs": (2, only("vit", ["scratch"])),
    "expert_lr": (2e-3, only(None, ["scratch", "shared"])), "warmup_per_task": (10, only(None, ["shared"])),
    "warmup_epochs": (1, only(None, ["shared"])), "finetune_epochs": (1, only(None, ["finetuned"])),
    "finetune_lr": (1e-3, only(None, ["finetuned"])),
}


@pytest.mark.parametrize("name", sorted(SHAPES_EXPERTS))
def test_a_setting_that_shapes_an_expert_is_in_its_cache_key(name):
    value, affected = SHAPES_EXPERTS[name]
    before, after = keys(FSStudyConfig()), keys(FSStudyConfig(**{name: value}))
    # (a fine-tuned expert also changes through its shared model's content hash, fixed here)
    assert {artefact for artefact in before if after[artefact] != before[artefact]} == affected


def test_merge_settings_do_not_invalidate_experts():
    before = keys(FSStudyConfig())
    after = keys(FSStudyConfig(fs_lr=1e-2, kd_lr=1e-2, num_images=8, rank=3, regmean_alpha=0.5, regmean_ridge=1e-3,
                               progress=False, output_dir="elsewhere", data_dir="elsewhere"))
    assert after == before


def test_warmup_order_and_code_are_in_the_key():
    config = FSStudyConfig()
    a = shared_init_spec(config, "mlp", {"usps": "f2", "gtsrb": "f3"})
    b = shared_init_spec(config, "mlp", {"gtsrb": "f3", "usps": "f2"})
    assert cache_path("k", a) != cache_path("k", b)  # another round robin, another model
    assert code_hash(*expert_code("mlp", "scratch")) != code_hash(*expert_code("vit", "scratch"))
    assert code_hash(*expert_code("mlp", "scratch")) != code_hash(*expert_code("mlp", "finetuned"))


def test_a_changed_setting_or_code_misses_the_old_cache_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGE_CACHE_DIR", str(tmp_path))
    calls = []

    def train():
        calls.append(1)
        return {"w": torch.full((2,), float(len(calls)))}, {"steps": len(calls)}

    def load(config, code=expert_code("mlp", "scratch")):
        spec = scratch_expert_spec(config, "mlp", "mnist", "f1", 10)
        return FSStudy(config)._cached_model("fs_study/experts/mlp", spec, train, code)

    base = FSStudyConfig()
    first, info = load(base)
    assert info["cached"] is False and len(calls) == 1
    again, info = load(base)
    assert info["cached"] is True and len(calls) == 1 and torch.equal(again["w"], first["w"])
    other, info = load(FSStudyConfig(expert_lr=2e-3))
    assert info["cached"] is False and len(calls) == 2 and not torch.equal(other["w"], first["w"])
    _, info = load(base, code=expert_code("mlp", "finetuned"))  # other code: not the old entry
    assert info["cached"] is False and len(calls) == 3


# ------------------------------------------------------------- verdicts on synthetic tables


def outcome_array(n_correct, n, offset=0):
    """n outcomes with exactly n_correct true, starting at ``offset`` (cyclically): two models'
    arrays overlap as much as their offsets allow, which is what pairing exploits."""
    x = np.zeros(n, dtype=bool)
    x[(offset + np.arange(n_correct)) % n] = True
    return x


def rows(setting, method, correct_per_task, n=400, init="different", seed=0, offset=0, **options):
    pair = setting.replace(" (same init)", "")
    return [{"setting": setting, "pair": pair, "init": init, "seed": seed, "method": method, "task": task,
             "correct": outcome_array(k, n, offset), "accuracy": 100 * k / n, "expert_accuracy": 90.0, "chance": 10.0,
             "seconds": 1.0, "peak_mib": 10.0, "trunk_parameters": 1, "output_map_parameters": 0,
             "trainable_parameters": None, "num_images": options.get("num_images"),
             "augment": options.get("augment"), **options}
            for task, k in zip(("a", "b"), correct_per_task)]


def setting_rows(setting, accuracy, n=400, init="different", seed=0, **options):
    """One setting's table from ``{method: (correct on a, correct on b)}``."""
    table = []
    for method, correct in accuracy.items():
        extra = {**options} if method in (FS_MERGE, DISTILLATION) else {}
        table += rows(setting, method, correct, n, init, seed, **extra)
    return table


COLLAPSE = {ENSEMBLE: (360, 360), MODEL_1: (360, 40), AVERAGE: (60, 40), SLERP: (64, 48), REGMEAN: (120, 80),
            REBASIN: (50, 48), DISTILLATION: (300, 260), FS_MERGE: (302, 262)}  # ViT-like: merges collapse
WORKS = {**COLLAPSE, AVERAGE: (300, 280), ZIPIT: (340, 320)}  # MLP-like: merges beat model 1 alone


def test_paired_contrast_is_findings_paired_difference_and_mean_accuracy():
    a = {"a": outcome_array(300, 400), "b": outcome_array(100, 400, 7)}
    b = {"a": outcome_array(280, 400, 3), "b": outcome_array(150, 400)}
    for ours, theirs in ((paired_contrast([(1, a), (-1, b)]), paired_difference(a, b)),
                         (paired_contrast([(1, a)]), mean_accuracy(a))):
        assert (ours.value, ours.se) == pytest.approx((theirs.value, theirs.se))
    with pytest.raises(ValueError):
        paired_contrast([(1, a), (-1, {"a": a["a"]})])


def test_contrast_pairs_within_a_seed_and_uses_the_spread_over_seeds():
    table = pd.DataFrame(setting_rows("S", COLLAPSE))
    d = contrast(table, [(1, {"method": FS_MERGE}), (-1, {"method": DISTILLATION})])
    assert d.value == pytest.approx(100 * (2 / 400 + 2 / 400) / 2)
    # FS-Merge's correct examples contain distillation's: the paired SE is far below the unpaired one
    unpaired = np.hypot(contrast(table, [(1, {"method": FS_MERGE})]).se, contrast(table, [(1, {"method": DISTILLATION})]).se)
    assert 0 < d.se < unpaired / 5
    seeds = pd.DataFrame(setting_rows("S", COLLAPSE) + setting_rows("S", {**COLLAPSE, FS_MERGE: (330, 262)}, seed=1))
    d = contrast(seeds, [(1, {"method": FS_MERGE}), (-1, {"method": DISTILLATION})])
    expected = over_seeds([0.5, 100 * (30 / 400 + 2 / 400) / 2])
    assert (d.value, d.se) == pytest.approx((expected.value, expected.se))


def test_a_selection_must_name_one_model():
    table = pd.DataFrame(setting_rows("S", COLLAPSE) + setting_rows("T", COLLAPSE))
    with pytest.raises(ValueError, match="more than one model"):
        outcomes(table, {"method": FS_MERGE})
    with pytest.raises(KeyError):
        outcomes(table, {"method": ZIPIT})
    # the same memoised run reaching a table twice is one model, not two
    twice = pd.DataFrame(setting_rows("S", COLLAPSE) + rows("S", FS_MERGE, COLLAPSE[FS_MERGE]))
    assert set(outcomes(twice, {"method": FS_MERGE})) == {"a", "b"}


def test_collapse_is_judged_against_model_1_alone_and_quotes_the_table():
    main = pd.DataFrame(setting_rows("VIT: a + b", COLLAPSE) + setting_rows("MLP: a + b", WORKS))
    claim = simple_merges_collapse(main)
    assert claim.outcome == "mixed: held in 1, did not hold in 1 of 2 settings"
    assert "model 1 alone" in claim.baseline and "ensemble" in claim.baseline
    # the range is the table's, not typed: ViT's closed-form averages run from Re-Basin's to RegMean's
    vit = summary(main[main.setting == "VIT: a + b"]).loc[list(CLOSED_FORM[:4]), "average"]
    assert f"{vit.min():.1f}–{vit.max():.1f}%" in claim.evidence
    assert "(exceeds 2 SE)" in claim.evidence
    only_collapse = simple_merges_collapse(main[main.setting == "VIT: a + b"])
    assert only_collapse.outcome == "held"


def test_distillation_works_against_doing_nothing():
    main = pd.DataFrame(setting_rows("S", COLLAPSE))
    assert distillation_works(main).outcome == "held"
    useless = pd.DataFrame(setting_rows("S", {**COLLAPSE, DISTILLATION: (360, 40)}))
    claim = distillation_works(useless)
    assert claim.outcome == "inconclusive (within noise)" and "+0.0 ± 0.0" in claim.evidence
    assert distillation_works(pd.DataFrame(setting_rows("S", {**COLLAPSE, DISTILLATION: (100, 40)}))).outcome == "did not hold"


def test_fs_merge_versus_distillation_within_noise_and_clearly():
    close = pd.DataFrame(setting_rows("S", {**COLLAPSE, FS_MERGE: (301, 260)}))  # one example better
    claim = fs_merge_beats_distillation(close)
    assert claim.outcome == "inconclusive (within noise)" and "within noise, |d| ≤ 2 SE" in claim.evidence
    clear = pd.DataFrame(setting_rows("S", {**COLLAPSE, FS_MERGE: (340, 300)}))
    assert fs_merge_beats_distillation(clear).outcome == "held"
    assert "model 1 alone" in fs_merge_beats_distillation(clear).baseline


def sweep_rows(gaps):
    """FS-Merge and distillation at n = 16 and 1024, FS-Merge ahead by gaps[n] examples per task."""
    table = []
    for n, gap in gaps.items():
        table += rows("S", DISTILLATION, (250, 250), num_images=n, augment=8)
        table += rows("S", FS_MERGE, (250 + gap, 250 + gap), num_images=n, augment=8)
    return pd.DataFrame(table)


def test_low_data_advantage_needs_a_win_at_few_images_and_a_shrinking_gap():
    main = pd.DataFrame(setting_rows("S", COLLAPSE))
    assert advantage_largest_with_little_data(sweep_rows({16: 40, 1024: 0}), main).outcome == "held"
    assert advantage_largest_with_little_data(sweep_rows({16: 0, 1024: 40}), main).outcome == "did not hold"
    assert advantage_largest_with_little_data(sweep_rows({16: 40, 1024: 39}), main).outcome == "inconclusive (within noise)"
    with pytest.raises(ValueError, match="augmentation"):
        advantage_largest_with_little_data(pd.concat([sweep_rows({16: 1}), pd.DataFrame(
            rows("S", FS_MERGE, (1, 1), num_images=16, augment=4))]), main)


def test_shared_init_narrows_the_gap_to_weight_averaging():
    main = pd.DataFrame(setting_rows("S", COLLAPSE))
    narrowed = pd.DataFrame(setting_rows("S (same init)", {**COLLAPSE, AVERAGE: (290, 250)}, init="same"))
    claim = shared_init_narrows_the_gap(main, narrowed)
    assert claim.outcome == "held" and "model 1 alone" in claim.baseline
    same = pd.DataFrame(setting_rows("S (same init)", COLLAPSE, init="same"))
    assert shared_init_narrows_the_gap(main, same).outcome == "inconclusive (within noise)"


def test_ablations_are_paired_against_their_default():
    table = pd.DataFrame(rows("S", FS_MERGE, (302, 262), variant="default") + rows("S", FS_MERGE, (250, 250), variant="rank r=0")
                         + rows("S", DISTILLATION, (300, 260), variant="default")
                         + rows("S", DISTILLATION, (300, 261), variant="no augmentation"))
    fs, kd = ablation_notes(table)
    assert "rank r=0 -8.0 ± " in fs and "(exceeds 2 SE)" in fs
    assert "no augmentation +0.1 ± " in kd and "within noise" in kd


def test_no_standard_error_means_no_verdict():
    assert "within noise" not in quoted(Estimate(0.1, float("nan")))
    assert "no verdict" in quoted(Estimate(0.1, float("nan")))
    assert "exceeds 2 SE" in quoted(Estimate(3.0, 1.0)) and "within noise" in quoted(Estimate(1.0, 1.0))


def test_findings_state_every_claim_with_its_baseline():
    config = FSStudyConfig()
    main = pd.DataFrame(setting_rows("S", COLLAPSE, num_images=64, augment=8))
    control = pd.DataFrame(setting_rows("S (same init)", {**COLLAPSE, AVERAGE: (290, 250)}, init="same"))
    text = findings(config, main, sweep_rows({16: 40, 1024: 0}), control=control, notes=["Run time: 1 min."])
    assert text.count("Trivial baseline: model 1 alone") == 5
    assert "FS-Merge beats distillation (at 64 unlabeled images per task)" in text
    assert "test-set noise only" in text and "300 (MLP) / 200 (ViT) steps" in text and text.endswith("Run time: 1 min.\n")
    # a table's standard error column is the verdicts' standard error
    table = main_table(main)
    assert table.loc[table.method == FS_MERGE, "± SE"].item() == pytest.approx(
        round(contrast(main, [(1, {"method": FS_MERGE})]).se, 1))


# ------------------------------------------------------------------- merges (no mirror)


@pytest.mark.parametrize("arch", ["mlp", "vit"])
def test_closed_form_merges_of_a_model_with_itself_give_the_model(arch):
    config = FSStudyConfig(**TINY)
    torch.manual_seed(0)
    model = make_model(arch, 5, config).eval()
    pool = torch.randn(64, 3, 32, 32)
    grams, counts = regmean_grams(model, pool)
    if arch == "vit":
        assert {"conv1.weight", "proj", "transformer.resblocks.0.attn.in_proj_weight",
                "transformer.resblocks.0.attn.out_proj.weight", "transformer.resblocks.0.mlp.c_fc.weight",
                "transformer.resblocks.0.mlp.c_proj.weight"} == set(grams) == set(counts)
        assert counts["proj"] == 64 and counts["transformer.resblocks.0.attn.in_proj_weight"] == 64 * 17
    else:
        assert set(grams) == set(counts) == {"layers.0.weight"} and counts["layers.0.weight"] == 64
    x = torch.randn(8, 3, 32, 32)
    methods = [AVERAGE, SLERP, REGMEAN, REBASIN] + ([ZIPIT] if arch == "mlp" else [])
    with torch.no_grad():
        expected = model(x)
        for method in methods:
            merged, maps, _ = merge(method, [model, model], [pool, pool], config)
            for t in range(2):
                assert torch.allclose(folded_logits(merged, maps, model.head, x, t), expected, atol=1e-4), (method, t)


def two_mlps_with_a_dead_unit():
    config = FSStudyConfig(**{**TINY, "mlp_hidden": [16, 8], "image_size": 8})
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = make_model("mlp", 3, config).eval()
        with torch.no_grad():  # hidden unit 3 never fires: a zero row and column in layers.1's Gram
            model.layers[0].weight[3] = 0
            model.layers[0].bias[3] = -1
        models.append(model)
    return config, models


def test_regmean_ridge_handles_a_dead_unit():
    config, models = two_mlps_with_a_dead_unit()
    pools = [torch.randn(32, 3, 8, 8) for _ in models]
    merged, _, _ = merge(REGMEAN, models, pools, config)
    average = (models[0].layers[1].weight + models[1].layers[1].weight) / 2
    # the weights reading the dead unit go to the average; the rest are finite
    assert torch.isfinite(merged.layers[1].weight).all()
    assert torch.allclose(merged.layers[1].weight[:, 3], average[:, 3], atol=1e-5)
    with pytest.raises(ValueError, match="singular"):
        merge(REGMEAN, models, pools, dataclasses.replace(config, regmean_ridge=0.0))


def test_regmean_weighs_tasks_equally_whatever_their_pool_size():
    config, models = two_mlps_with_a_dead_unit()
    a, b = torch.randn(32, 3, 8, 8), torch.randn(32, 3, 8, 8)
    once, _, _ = merge(REGMEAN, models, [a, b], config)
    twice, _, _ = merge(REGMEAN, models, [a, torch.cat([b, b])], config)  # the same data, counted twice
    for key, value in once.state_dict().items():
        assert torch.allclose(twice.state_dict()[key], value, atol=1e-5), key


def test_measured_call_returns_the_result_time_and_peak_memory():
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("no /proc/self/clear_refs: peak memory is not measurable here (NaN by design)")
    result, seconds, peak = measured_call(lambda: torch.ones(16 * 2**20))  # 64 MiB
    assert result.numel() == 16 * 2**20 and seconds >= 0
    assert 48 < peak < 1024  # NaN fails both


# ----------------------------------------------------------------- with the data mirror


@needs_data
def test_experts_are_cached_and_reloaded_identically(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGE_CACHE_DIR", str(tmp_path / "a"))
    config = FSStudyConfig(**TINY)
    first = FSStudy(config).expert("mlp", "mnist")
    assert first.info["cached"] is False and first.info["steps"] == 1
    again = FSStudy(config).expert("mlp", "mnist")
    assert again.info["cached"] is True
    for key, value in first.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[key], value), key
    # deterministic under the seed: training again from nothing gives the same weights
    monkeypatch.setenv("MERGE_CACHE_DIR", str(tmp_path / "b"))
    retrained = FSStudy(config).expert("mlp", "mnist")
    assert retrained.info["cached"] is False
    for key, value in first.model.state_dict().items():
        assert torch.equal(retrained.model.state_dict()[key], value), key
    # a change in training settings is another cache entry
    other = FSStudy(FSStudyConfig(**{**TINY, "expert_lr": 2e-3})).expert("mlp", "mnist")
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
    fresh = FSStudy(study.config)
    fresh._tasks = study._tasks  # same data, no reload
    assert torch.equal(fresh.pool("mnist", 4, 2), small)


@needs_data
@pytest.mark.parametrize("arch", ["mlp", "vit"])
def test_untrained_first_fs_merge_is_model_1(study, arch):
    pair = study.setting(arch, ["mnist", "usps"])
    fs = study.run(pair, FS_MERGE, steps=0)
    model_1 = study.run(pair, MODEL_1)
    assert fs[0]["accuracy"] == study.expert_accuracy(pair.experts[0])
    assert all(np.array_equal(a["correct"], b["correct"]) for a, b in zip(fs, model_1))
    assert fs[0]["steps"] == 0 and model_1[0]["steps"] is None


@needs_data
def test_ensemble_equals_each_expert_on_its_own_task(study):
    pair = study.setting("mlp", ["mnist", "usps"])
    rows_ = study.run(pair, ENSEMBLE)
    assert [r["accuracy"] for r in rows_] == [r["expert_accuracy"] for r in rows_]
    assert all(r["accuracy"] == 100 * r["correct"].mean() and len(r["correct"]) == r["test_examples"] for r in rows_)
    assert rows_[0]["trunk_parameters"] == 2 * study.run(pair, AVERAGE)[0]["trunk_parameters"]
    wide = summary(study.results().query("method == @ENSEMBLE"))
    assert np.allclose(wide["normalized"], 100) and np.allclose(wide["retained"], 100)


@needs_data
def test_every_method_is_run_with_its_options_and_memoised(study):
    pair = study.setting("mlp", ["mnist", "usps"])
    assert ZIPIT in methods_for(pair) and ZIPIT not in methods_for(study.setting("vit", ["mnist", "usps"]))
    table = pd.DataFrame(study.run_all(pair))
    assert list(dict.fromkeys(table["method"])) == methods_for(pair)
    trained = table[table.method.isin([FS_MERGE, DISTILLATION])]
    assert (trained["steps"] == 2).all() and (trained["num_images"] == 4).all() and np.isfinite(trained["final_loss"]).all()
    assert table.loc[table.method == AVERAGE, "num_images"].isna().all()  # data-free: the pool is not an option
    assert study.run(pair, FS_MERGE) is study.run(pair, FS_MERGE)  # memoised, not retrained
    assert [r["num_images"] for r in study.run(pair, FS_MERGE, num_images=8)] == [8, 8]
    assert "correct" not in study.results(outcomes=False).columns


@needs_data
def test_same_init_experts_share_the_warmup(study):
    assert study.warmup_tasks(["mnist", "usps"]) == ["usps"]  # the tiny config names it
    default = FSStudy(FSStudyConfig(**{**TINY, "warmup_tasks": []}))
    assert default.warmup_tasks(["mnist", "usps"]) == ["fashion_mnist", "gtsrb", "cifar10"]
    control = study.setting("mlp", ["mnist", "fashion_mnist"], init="same")
    prints = {e.info["shared_init"]["fingerprint"] for e in control.experts}
    assert len(prints) == 1 and control.name.endswith("(same init)") and control.pair == "MLP: mnist + fashion_mnist"
