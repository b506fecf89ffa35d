"""Notebook 05's plumbing (lib/experiments/twin_merging.py): its config against notebook 01's, the
router's data (validation only), the unseen-task build, the mixed stream, the pipeline on the
synthetic TinyTrack, the findings on synthetic results, and the notebook end to end."""
import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lib import merging
from lib.experiments import baselines as B
from lib.experiments import twin_merging as T
from lib.experiments.config import notebook_config, notebook_defaults
from lib.experiments.selection import TestSplitAccessed, ValidationOnly
from lib.merging import twin_merging as tw

from conftest import SHARED_DATA, SHARED_MODELS, TinyTrack, needs_data, needs_models

pytestmark = pytest.mark.usefixtures("one_thread")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "05_twin_merging.ipynb"

# Tiny settings: three 3-class tasks of 8×8 patterns (96 train, 32 validation, 48 test examples each).
TINY = T.TwinMergingConfig(
    tracks=("vision",), vision_batch_size=16, vision_max_steps=6, eval_every=3, multitask_steps_per_task=3,
    lambda_grid=(0.0, 0.5, 1.0), lambda_refinements=0, selection_examples=16, rank_ratio=0.5,
    rank_ratios=(0.1, 0.5, 1.0), router_sizes=(4, 16), router_epochs=8, unseen_tasks=1, sweep_test_examples=24,
    stream_examples=12, stream_batch_size=4, progress=False)


class ForbiddenTest(TinyTrack):
    """A TinyTrack whose test split raises while ``ForbiddenTest.forbid`` is set."""

    forbid: bool = False

    def split(self, task, split):
        if self.forbid and split == "test":
            raise AssertionError(f"the test split of {task!r} was read")
        return super().split(task, split)


def tiny_setup(track):
    base = TINY.baselines_config()
    experts, _ = base.finetune_configs("vision", len(track.tasks))
    return B.prepare_track(track, experts, None, progress=False)


# ----------------------------------------------------------------------------- configuration
def test_notebook_parameters_are_exactly_the_config_fields_with_equal_defaults():
    defaults = notebook_defaults(NOTEBOOK)
    assert list(defaults) == [f.name for f in fields(T.TwinMergingConfig)]
    assert notebook_config(T.TwinMergingConfig, defaults) == T.TwinMergingConfig()


def test_shared_fields_are_notebook_01s_names_and_defaults_and_build_its_config():
    ours, theirs = T.TwinMergingConfig(), B.BaselinesConfig()
    shared = {f.name for f in fields(T.TwinMergingConfig)} & {f.name for f in fields(B.BaselinesConfig)}
    # every setting that decides notebook 01's experts and merges is shared, so its cache is found again
    assert {"text_tasks", "vision_tasks", "max_validation", "max_test", "text_heads", "vision_heads", "text_max_steps",
            "vision_lr", "multitask_steps_per_task", "lambda_grid", "ties_density", "dare_drop_rate",
            "selection_examples", "seed"} <= shared
    assert all(getattr(ours, name) == getattr(theirs, name) for name in shared)
    custom = T.TwinMergingConfig(vision_max_steps=7, lambda_grid=(0.0, 1.0), output_dir="runs/elsewhere").baselines_config()
    assert custom.vision_max_steps == 7 and custom.lambda_grid == (0.0, 1.0) and custom.output_dir == ""
    assert T.TwinMergingConfig().task_counts(8) == [2, 4, 6, 8] and T.TwinMergingConfig().task_counts(7) == [2, 4, 6, 7]
    assert T.TwinMergingConfig().seen_for_unseen(list("abcd")) == (["a", "b"], ["c", "d"])


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="'small'.*'paper'"):
        T.TwinMergingConfig(scale="large")
    with pytest.raises(ValueError, match="rank ratio"):
        T.TwinMergingConfig(rank_ratios=(0.1, 1.5))
    with pytest.raises(ValueError, match="router_held_out"):
        T.TwinMergingConfig(router_held_out=1.0)
    with pytest.raises(ValueError, match="'text', 'vision'"):
        T.TwinMergingConfig(tracks=("txt",))


# ----------------------------------------------------------------------------- compression for the sweep
def test_truncating_a_higher_rank_compression_is_compressing_at_the_lower_rank():
    g = torch.Generator().manual_seed(0)
    shapes = {"fc.weight": (12, 9), "conv.weight": (6, 3, 3, 3), "fc.bias": (12,)}
    shared = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    experts = [{k: v + torch.randn(v.shape, generator=g) for k, v in shared.items()} for _ in range(3)]
    high = tw.compress(shared, experts, rank_ratio=1.0)
    for ratio in (0.1, 0.3, 0.5):
        for cut, direct in zip(T.truncate(high, ratio), tw.compress(shared, experts, rank_ratio=ratio)):
            for k in shapes:
                if isinstance(direct[k], tw.LowRank):
                    assert cut[k].us.shape == direct[k].us.shape
                    torch.testing.assert_close(cut[k].us, direct[k].us)
                    torch.testing.assert_close(cut[k].vh, direct[k].vh)
                else:
                    assert torch.equal(cut[k], direct[k])
    with pytest.raises(ValueError, match="higher ratio"):
        T.truncate(tw.compress(shared, experts, rank_ratio=0.1), 0.5)


# ----------------------------------------------------------------------------- the mixed stream
def test_mixed_stream_holds_every_test_input_exactly_once_shuffled_and_batches_them_in_order():
    track = TinyTrack(["a", "b", "c"])
    stream = T.mixed_stream(track, track.tasks, seed=0)
    expected = {(t, i) for t in track.tasks for i in range(len(track.split(t, "test")))}
    assert len(stream) == len(expected) and set(zip(stream.task, stream["index"])) == expected
    assert list(stream.task[:48]) != ["a"] * 48  # shuffled, not task after task
    rows = stream.iloc[:10]
    batch = T.stream_batch(track, rows)
    for position, (task, index) in enumerate(zip(rows.task, rows["index"])):
        own = track.split(task, "test").batch([index])
        assert torch.equal(batch["pixel_values"][position], own["pixel_values"][0])
        assert batch["labels"][position] == own["labels"][0]


def test_concatenated_text_batches_are_padded_like_the_track_pads_them():
    short = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    long = {"input_ids": torch.tensor([[1, 2, 3, 4, 5], [8, 9, 0, 0, 0]]),
            "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])}
    out = T.concat_inputs([short, long])
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 0], [1, 2, 3, 4, 5], [8, 9, 0, 0, 0]]
    assert out["attention_mask"].sum(1).tolist() == [3, 5, 2]
    # RoBERTa pads with its own pad id (1), which its position ids skip; the mask still with zeros
    roberta = T.concat_inputs([short, {k: v[:1] for k, v in long.items()}], {"input_ids": 1})
    assert roberta["input_ids"].tolist() == [[5, 6, 7, 1, 1], [1, 2, 3, 4, 5]]
    assert roberta["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


# ----------------------------------------------------------------------------- routers and builds
def test_shared_expert_and_routers_never_read_the_test_split():
    track = ForbiddenTest(["a", "b", "c"])
    setup = tiny_setup(track)
    ForbiddenTest.forbid = True  # on the class: the narrowed copies of the track that builds make refuse too
    try:
        shared = T.shared_expert(track, setup, track.tasks, TINY, progress=False)
        build = T.build_twin(track, setup, track.tasks, shared, track.pretrained_encoder(), TINY, 0.5, TINY.router_sizes)
    finally:
        ForbiddenTest.forbid = False
    assert sorted(build.routers) == [4, 16]
    fit = build.routers[16]
    # 32 validation examples per task: 7 held out (20%) to choose the epoch, 25 in the labeled pool
    assert fit.used == {"a": 16, "b": 16, "c": 16} and fit.held_out == 3 * 7
    assert build.routers[4].used == {"a": 4, "b": 4, "c": 4}
    assert 1 <= fit.best_epoch <= TINY.router_epochs
    with pytest.raises(TestSplitAccessed):  # the view the routers read through refuses test
        ValidationOnly(track).split("a", "test")


def test_router_splits_are_nested_and_keep_the_held_out_part_apart():
    held, pool = T.router_split(50, 0.2, seed=0, salt=1)
    assert len(held) == 10 and len(pool) == 40 and not set(held) & set(pool)
    assert set(held) | set(pool) == set(range(50))
    again_held, again_pool = T.router_split(50, 0.2, seed=0, salt=1)
    assert (held == again_held).all() and (pool == again_pool).all()  # seeded: labeled sets nest across sizes
    assert not (T.router_split(50, 0.2, seed=0, salt=2)[0] == held).all()


def test_unseen_build_depends_on_nothing_of_the_unseen_task():
    track = TinyTrack(["a", "b", "c"])
    setup = tiny_setup(track)
    encoder = track.pretrained_encoder()

    def build(setup):
        shared = T.shared_expert(track, setup, ["a", "b"], TINY, progress=False)
        return T.build_twin(track, setup, ["a", "b"], shared, encoder, TINY, 0.5, [16])

    seen = build(setup)
    # the unseen task's expert and head replaced by garbage: a build that read them would change
    noisy = {k: v + 3.0 * torch.randn_like(v) if v.is_floating_point() else v for k, v in setup.experts["c"].encoder.items()}
    garbage = B.Setup(track, setup.pretrained, {**setup.heads, "c": {k: -v for k, v in setup.heads["c"].items()}},
                      {**setup.experts, "c": B.Expert(noisy, setup.experts["c"].heads)}, None, setup.mergeable)
    other = build(garbage)
    assert seen.tasks == ["a", "b"] and len(seen.exclusive) == 2
    assert seen.routers[16].router[-1].out_features == 2  # the router knows only the seen tasks
    for k in seen.shared.state:
        assert torch.equal(seen.shared.state[k], other.shared.state[k]), k
    for mine, theirs in zip(T._flat(seen.exclusive).values(), T._flat(other.exclusive).values()):
        assert torch.equal(mine, theirs)
    for k, v in seen.routers[16].router.state_dict().items():
        assert torch.equal(v, other.routers[16].router.state_dict()[k]), k
    # and the shared expert is Task Arithmetic of the seen experts at the λ chosen on their validation data
    keys = setup.mergeable
    ta = merging.task_arithmetic({k: setup.pretrained[k] for k in keys},
                                 [{k: setup.experts[t].encoder[k] for k in keys} for t in ("a", "b")], seen.shared_lambda)
    for k in keys:
        torch.testing.assert_close(seen.shared.state[k], ta[k])


# ----------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def tiny_run():
    track = TinyTrack(["a", "b", "c"])
    return track, T.run_track("vision", TINY, progress=False, track=track)


def test_pipeline_builds_every_table(tiny_run):
    _, result = tiny_run
    wide = T.summary(result.tables["main"])
    for row in (B.PRETRAINED, B.EXPERTS, B.MULTITASK, "Weight averaging", "Task Arithmetic", "TIES", "DARE + TA",
                "DARE + TIES", T.TWIN):
        assert row in wide.index
    assert list(result.tables["ablation"].index) == [B.PRETRAINED, T.SHARED_ONLY, T.EXCLUSIVE_ONLY, T.TWIN]
    rank = result.tables["rank"]
    assert list(rank.rank_ratio) == [0.0, 0.1, 0.5, 1.0]
    assert rank.exclusive_bytes.is_monotonic_increasing and rank.exclusive_bytes.iloc[1] > 0
    assert (rank.total_bytes == rank.exclusive_bytes + rank["one model bytes"]).all()
    assert list(result.tables["router"].requested) == [4, 16]
    assert list(result.tables["task_count"].tasks.unique()) == [2, 3]
    assert result.shared_lambdas[3] == result.merges["Task Arithmetic"].hyperparameters["scale"]
    unseen = result.tables["unseen"]
    assert (unseen["built on"] == "a, b").all() and (unseen["unseen"] == "c").all()
    assert (result.tables["stream"]["inputs"] == TINY.stream_examples).all()


def test_pipeline_sweep_subset_is_the_main_evaluation_on_fewer_examples(tiny_run):
    """The subset's Twin outcomes, computed on their own, equal the full test outcomes at the
    subset's indices: the references sliced from the main table score the same examples."""
    track, result = tiny_run
    full = T.sliced(result.outcomes["main"][T.TWIN], track, track.tasks, TINY.sweep_test_examples)
    subset = result.outcomes["ablation"][T.TWIN]
    assert set(full) == set(subset)
    for task in full:
        assert len(subset[task]) == TINY.sweep_test_examples and (full[task] == subset[task]).all()
    # the shared expert at rank 0 is the Task Arithmetic row on the same examples
    ta = T.sliced(result.outcomes["main"]["Task Arithmetic"], track, track.tasks, TINY.sweep_test_examples)
    assert all((ta[t] == result.outcomes["rank"][0.0][t]).all() for t in ta)


def test_low_rank_path_serves_the_stream_exactly_as_per_input_materialisation(tiny_run):
    _, result = tiny_run
    stream = result.outcomes["stream"]
    for a, b in ((T.LOW_RANK, T.PER_INPUT), ("Low-rank, exact per input, top-2", "Per-input materialisation, top-2")):
        assert stream[a].keys() == stream[b].keys()
        assert all((stream[a][t] == stream[b][t]).all() for t in stream[a])
    assert sum(len(v) for v in stream[T.LOW_RANK].values()) == TINY.stream_examples


def test_stream_table_counts_each_paths_matrix_work(tiny_run):
    _, result = tiny_run
    table = result.tables["stream"]
    flops = table["MFLOP per input"]
    # the low-rank path adds the factors' products to the static forward; per-input adds one merge per
    # input (on this tiny model the cheaper of the two), over fewer tasks with top-2 routing
    assert 0 < flops[T.STATIC] < flops[T.LOW_RANK] and flops[T.STATIC] < flops[T.PER_INPUT]
    assert flops["Per-input materialisation, top-2"] < flops[T.PER_INPUT]
    assert table.loc[T.LOW_RANK, "× low-rank (FLOPs)"] == 1.0
    assert "In matrix work per input" in T._speed_claim(result, TINY.top_k).evidence


def test_matrix_flops_counts_products_not_elementwise_work():
    from lib.experiments.cost import matrix_flops

    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    assert matrix_flops(layer, x) == 2 * 2 * 4 * 3
    assert matrix_flops(lambda t: (t * 2 + 1).relu(), x) == 0
    acc = torch.zeros(2, 3)
    assert matrix_flops(lambda: acc.addmm_(x, layer.weight.T.detach(), alpha=0.5)) == 2 * 2 * 4 * 3  # torch skips it


# ----------------------------------------------------------------------------- findings
def _outcomes(accuracy: float, seed: int = 0, n: int = 2000, tasks=("x", "y")) -> dict:
    """Per-example outcomes with the given accuracy (%), correlated across rows by a shared difficulty."""
    difficulty = np.random.default_rng(seed).random((len(tasks), n))
    return {t: difficulty[i] < accuracy / 100 for i, t in enumerate(tasks)}


def _result(twin: float, shared: float, exclusive: float, low_rank: float, small_router: float, unseen_twin: float,
            per_input_ms: float, stream_gap: float) -> T.TwinTrackResult:
    """A track result built from accuracies (%), the experts at 90%."""
    expert, pretrained = _outcomes(90), _outcomes(60)
    main = {B.EXPERTS: expert, B.PRETRAINED: pretrained, "Task Arithmetic": _outcomes(shared), T.TWIN: _outcomes(twin)}
    ablation = {B.PRETRAINED: pretrained, T.SHARED_ONLY: _outcomes(shared), T.EXCLUSIVE_ONLY: _outcomes(exclusive),
                T.TWIN: _outcomes(twin)}
    rank = {0.0: _outcomes(shared), 0.1: _outcomes(low_rank), 0.3: _outcomes(twin)}
    router = {10: _outcomes(small_router), 1000: _outcomes(twin)}
    unseen = {T.TWIN: _outcomes(unseen_twin, tasks=("z",)), T.SHARED_ONLY: _outcomes(70, tasks=("z",)),
              B.PRETRAINED: _outcomes(65, tasks=("z",))}
    stream = {T.LOW_RANK: _outcomes(twin, n=128), T.PER_INPUT: _outcomes(twin - stream_gap, n=128)}
    tables = {
        "ablation": pd.DataFrame([T._row(r, c, expert) for r, c in ablation.items()]).set_index("row"),
        "rank": pd.DataFrame({"rank_ratio": [0.0, 0.1, 0.3], "share of the experts' storage": [0.5, 0.6, 0.8],
                              "experts bytes": 2e6, "one model bytes": 1e6}),
        "router": pd.DataFrame({"requested": [10, 1000], "used_min": [10, 400], "router_accuracy": [97.0, 99.0],
                                "router_accuracy_SE": [0.4, 0.2]}),
        "unseen": pd.DataFrame({"built on": ["x, y"] * 3}, index=list(unseen)),
        "stream": pd.DataFrame({"ms per input": [2.0, 0.1, 4.0, 8.0, per_input_ms], "SE (ms)": [0.1, 0.01, 0.2, 0.3, 1.0],
                                "× static": [1.0, 0.05, 2.0, 4.0, per_input_ms / 2], "accuracy": [80, None, twin, 80, twin],
                                "inputs": 256}, index=[T.STATIC, T.ROUTER, T.LOW_RANK, T.GROUPED, T.PER_INPUT]),
    }
    outcomes = {"main": main, "ablation": ablation, "rank": rank, "router": router, "unseen": unseen, "stream": stream}
    return T.TwinTrackResult("text", tables, outcomes)


def test_findings_hold_when_the_numbers_say_so_and_name_their_trivial_baselines():
    good = _result(twin=88, shared=75, exclusive=70, low_rank=88, small_router=88, unseen_twin=70, per_input_ms=80,
                   stream_gap=0)
    text = T.findings({"text": good}, T.TwinMergingConfig(rank_ratio=0.1))
    for claim in ("near expert-level normalized score (≥ 95): held", "exclusive parts are needed: held",
                  "a low rank suffices (ratio 0.1 within ±2 points of ratio 0.3): held",
                  "a small router set suffices (10 per task within ±2 points of 1000): held",
                  "falls back to about its shared expert (within ±2 points): held",
                  "faster than per-input materialisation at the same accuracy: held"):
        assert claim in text, claim
    assert "Trivial baseline: θ0 with the experts' heads" in text and "Trivial baseline: the shared expert" in text
    assert text.count("Trivial baseline") == 6 and "±" in text and "Small-scale" in text


def test_findings_do_not_hold_when_the_numbers_say_otherwise():
    bad = _result(twin=70, shared=75, exclusive=80, low_rank=60, small_router=50, unseen_twin=40, per_input_ms=6,
                  stream_gap=10)
    text = T.findings({"text": bad}, T.TwinMergingConfig(rank_ratio=0.1))
    for claim in ("near expert-level normalized score (≥ 95): did not hold", "exclusive parts are needed: did not hold",
                  "ratio 0.3): did not hold", "1000): did not hold", "(within ±2 points): did not hold",
                  "at the same accuracy: did not hold"):
        assert claim in text, claim


def test_equivalence_and_threshold_verdicts_use_two_standard_errors():
    assert T.within_margin(T.Estimate(0.5, 0.5)) == "held"
    assert T.within_margin(T.Estimate(0.5, 1.0)).startswith("inconclusive")  # 0.5 + 2 > 2
    assert T.within_margin(T.Estimate(-5.0, 1.0)) == "did not hold"
    assert T.at_least(T.Estimate(97.0, 0.9), 95) == "held" and T.at_least(T.Estimate(96.0, 1.0), 95).startswith("inc")
    assert T.at_least(T.Estimate(90.0, 2.0), 95) == "did not hold"


def test_normalized_estimate_is_the_paired_normalized_score():
    expert = {"x": np.array([1, 1, 1, 0] * 50, bool)}
    same = T.normalized_estimate(expert, expert)
    assert same.value == pytest.approx(100.0) and same.se == 0.0
    half = T.normalized_estimate({"x": np.array([1, 0, 1, 0] * 50, bool)}, expert)
    assert half.value == pytest.approx(100 * 0.5 / 0.75) and half.se > 0


# ----------------------------------------------------------------------------- notebook 02's rows
def test_adamerging_rows_are_read_only_from_a_run_on_the_same_experts(tmp_path):
    config = T.TwinMergingConfig()
    track = TinyTrack(["a", "b"])
    experts = pd.Series({"a": 80.0, "b": 90.0})
    rows, note = T.adamerging_rows(track, config, experts, tmp_path)
    assert rows.empty and "has not written" in note
    pd.DataFrame({"a": [80.0, 72.0, 75.0, 60.0], "b": [90.0, 81.0, 85.5, 70.0], "Average": 0.0, "Normalized": 0.0},
                 index=pd.Index([B.EXPERTS, "AdaMerging layer-wise", "AdaMerging layer-wise + Surgery",
                                 "Task Arithmetic"], name="row")).to_csv(tmp_path / "tiny_main.csv")
    # another list of tracks, or other locations, do not change the experts
    (tmp_path / "run.json").write_text(json.dumps({"parameters": {"seed": 0, "max_test": 1000, "tracks": ["text"],
                                                                  "data_dir": "elsewhere"}}))
    rows, note = T.adamerging_rows(track, config, experts, tmp_path)
    assert list(rows.method.unique()) == ["AdaMerging layer-wise"]  # not Surgery, not the other merges
    assert rows.set_index("task").normalized.to_dict() == pytest.approx({"a": 90.0, "b": 90.0})
    (tmp_path / "run.json").write_text(json.dumps({"parameters": {"seed": 1}}))
    rows, note = T.adamerging_rows(track, config, experts, tmp_path)
    assert rows.empty and "other experts or test sets (seed)" in note


# ----------------------------------------------------------------------------- the notebook
@needs_models
@needs_data("vision/usps.npz", "vision/mnist.npz")
def test_notebook_05_runs_end_to_end_under_papermill(tmp_path):
    """The notebook's cells, not just the library: a tiny vision run into a temporary folder,
    lists given as JSON strings as on the command line."""
    import papermill

    out = tmp_path / "run05"
    papermill.execute_notebook(
        str(NOTEBOOK), str(tmp_path / "executed.ipynb"), cwd=str(NOTEBOOK.parent), progress_bar=False,
        parameters={"data_dir": str(SHARED_DATA), "models_dir": str(SHARED_MODELS), "output_dir": str(out),
                    "tracks": '["vision"]', "vision_tasks": '["usps", "mnist"]', "max_validation": 32, "max_test": 48,
                    # heads trained with the experts: no linear probe on 2,000 encoded training images per task
                    "vision_heads": "joint", "vision_batch_size": 16,
                    "vision_max_steps": 6, "eval_every": 3, "multitask_steps_per_task": 3,
                    "lambda_grid": "[0.0, 0.5, 1.0]", "lambda_refinements": 0, "selection_examples": 16,
                    "rank_ratios": "[0.1, 0.3]", "router_sizes": "[4, 16]", "router_epochs": 5, "unseen_tasks": 1,
                    "sweep_test_examples": 16, "stream_examples": 8, "stream_batch_size": 4, "progress": False})
    findings = (out / "findings.md").read_text()
    assert "Trivial baseline" in findings and "±" in findings and "Small-scale" in findings
    main = pd.read_csv(out / "vision_normalized.csv", index_col=0)
    assert T.TWIN in main.index and "Normalized" in main.columns
    assert {"rank_sweep.csv", "router_size.csv", "stream_cost.csv", "task_counts.csv", "ablation.csv",
            "unseen_tasks.csv", "run.json", "stream_cost.png"} <= {p.name for p in out.iterdir()}
    assert not (out.parent / "figures").exists()  # nothing written beside the output folder


def test_flop_bound_says_when_the_measured_gap_is_overhead():
    def table(flops, measured):
        return pd.DataFrame({"× low-rank (FLOPs)": [flops], "× low-rank": [measured]}, index=[T.PER_INPUT])

    below = T._flop_bound(table(0.7, 5.9))  # less matrix work, yet slower: overhead
    assert "0.7×" in below and "measured 5.9× exceeds it" in below and "overhead" in below
    above = T._flop_bound(table(2.9, 2.0))  # the measured gap within the arithmetic's
    assert "2.9×" in above and "overhead" not in above
    assert T._flop_bound(pd.DataFrame({"× low-rank": [3.0]}, index=[T.PER_INPUT])) == ""
