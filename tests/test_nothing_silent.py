"""Nothing silent (issue 13): bad input, damaged caches and changed data give a clear error or a
recomputation, never a wrong number.

Each test breaks one thing and asserts what a user then sees: the error type, and a message that
names the file or key and says what to do; or, for a damaged cache, a warning naming the file and
a recomputation. Real mirror files are copied into tmp_path before they are damaged.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import lib.data.text as text_module
import lib.merging as M
from lib import statistics as S
from lib.data import load_text_task, load_vision_task
from lib.experiments import cache, training
from lib.experiments.cache import (HASH_KEY, DamagedCacheWarning, cache_path, cached_tensors, content_hash,
                                   load_metadata, remove_stale_temporaries, save_tensors_atomic)
from lib.experiments.training import FinetuneConfig, finetune, probe_heads

from conftest import SHARED_DATA, TinyTrack, needs_data

pytestmark = pytest.mark.usefixtures("one_thread")


# ============================================================================ damaged caches
def _damage_in_place(path: Path) -> None:
    """Flip the file's last byte (tensor data: safetensors puts it after the header): same size."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _counting_cache(root: Path):
    """A cached computation and the list of times it actually ran."""
    runs = []

    def compute():
        runs.append(1)
        return {"x": torch.arange(6.0).reshape(2, 3)}

    return (lambda: cached_tensors("k", {"what": "arange"}, compute, root=root)), runs


def test_saved_files_carry_the_hash_of_their_tensors(tmp_path):
    tensors = {"a": torch.randn(3, 2), "b": torch.arange(4)}
    save_tensors_atomic(tensors, tmp_path / "f.safetensors", {"spec": {"x": 1}})
    assert load_metadata(tmp_path / "f.safetensors")[HASH_KEY] == content_hash(tensors)


@pytest.mark.parametrize("damage, says", [(_damage_in_place, "does not match the hash"),
                                          (_truncate, "cannot be read")])
def test_a_damaged_cache_file_is_named_moved_aside_and_recomputed(tmp_path, damage, says):
    load, runs = _counting_cache(tmp_path)
    first = load()
    path = cache_path("k", {"what": "arange"}, tmp_path)
    damage(path)
    with pytest.warns(DamagedCacheWarning, match=rf"{path.name}.*{says}(.|\n)*recomputed"):
        again = load()
    assert len(runs) == 2 and torch.equal(again["x"], first["x"])  # recomputed, the right numbers
    assert len(list(path.parent.glob(f"{path.name}.corrupt-*"))) == 1  # kept aside for inspection
    load()
    assert len(runs) == 2  # the recomputed file is trusted again


def test_a_file_without_hash_from_before_is_loaded_unverified(tmp_path, recwarn):
    load, runs = _counting_cache(tmp_path)
    path = cache_path("k", {"what": "arange"}, tmp_path)
    path.parent.mkdir(parents=True)
    save_file({"x": torch.full((2, 3), 7.0)}, str(path))  # as the cache wrote files before hashes
    assert torch.equal(load()["x"], torch.full((2, 3), 7.0)) and runs == []
    assert not [w for w in recwarn if issubclass(w.category, DamagedCacheWarning)]


CONFIG = FinetuneConfig(max_steps=8, batch_size=16, eval_every=4, patience=5, lr=1e-2, warmup_steps=2, seed=1)


def test_a_damaged_expert_is_retrained_and_a_damaged_head_recomputed(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGE_CACHE_DIR", str(tmp_path))
    track = TinyTrack(["a", "b"])
    heads = probe_heads(track, max_examples=64)
    expert = finetune(track, ["a"], heads, CONFIG, progress=False)
    (path,) = (tmp_path / "experts" / "tiny").glob("*.safetensors")
    _damage_in_place(path)
    with pytest.warns(DamagedCacheWarning, match=path.name):
        again = finetune(track, ["a"], heads, CONFIG, progress=False)
    for k in expert.encoder:  # retrained from scratch: the same expert, not the damaged bytes
        assert torch.equal(again.encoder[k], expert.encoder[k]), k

    (head_file,) = [p for p in (tmp_path / "heads" / "tiny").glob("*.safetensors")
                    if torch.equal(cache.load_cached(p)["head.weight"], heads["a"]["weight"])]
    _truncate(head_file)
    with pytest.warns(DamagedCacheWarning, match=head_file.name):
        assert torch.equal(probe_heads(track, max_examples=64)["a"]["weight"], heads["a"]["weight"])


def test_a_damaged_partial_checkpoint_restarts_training(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGE_CACHE_DIR", str(tmp_path))
    track = TinyTrack(["a", "b"])
    heads = probe_heads(track, max_examples=64)
    save = training._save_partial

    def save_then_crash(*args):  # interrupted right after the first checkpoint
        save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "_save_partial", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        finetune(track, ["a"], heads, CONFIG, progress=False)
    monkeypatch.setattr(training, "_save_partial", save)
    (partial,) = (tmp_path / "experts" / "tiny").glob("*.partial.safetensors")
    _damage_in_place(partial)
    with pytest.warns(DamagedCacheWarning, match=partial.name):
        resumed = finetune(track, ["a"], heads, CONFIG, progress=False)
    assert resumed.info["steps"] == CONFIG.max_steps and all(torch.isfinite(v).all() for v in resumed.encoder.values())


def test_a_damaged_fs_study_expert_is_retrained_and_not_reported_as_cached(tmp_path, monkeypatch):
    from lib.experiments.fs_merge import FSStudy, FSStudyConfig, expert_code, scratch_expert_spec

    monkeypatch.setenv("MERGE_CACHE_DIR", str(tmp_path))
    runs = []

    def train():
        runs.append(1)
        return {"w": torch.ones(2)}, {"steps": 1}

    def load():
        spec = scratch_expert_spec(FSStudyConfig(), "mlp", "mnist", "f1", 10)
        code = expert_code("mlp", "scratch")
        return FSStudy(FSStudyConfig())._cached_model("fs_study/experts/mlp", spec, train, code)

    load()
    (path,) = (tmp_path / "fs_study").rglob("*.safetensors")
    _damage_in_place(path)
    with pytest.warns(DamagedCacheWarning, match=path.name):
        tensors, info = load()
    assert info["cached"] is False and len(runs) == 2 and torch.equal(tensors["w"], torch.ones(2))


# ============================================================================ temporaries
def _temporary(folder: Path, tag: str, age: float = 0.0) -> Path:
    """A temporary file as save_tensors_atomic names them, ``age`` seconds old."""
    tmp = folder / f".k.safetensors.abc123.{tag}{cache.TEMP_SUFFIX}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(b"half a checkpoint")
    os.utime(tmp, (time.time() - age, time.time() - age))
    return tmp


def test_temporaries_are_written_beside_their_target(tmp_path, monkeypatch):
    written = []
    real = cache.save_file
    monkeypatch.setattr(cache, "save_file", lambda tensors, tmp, metadata: written.append(Path(tmp))
                        or real(tensors, tmp, metadata=metadata))
    target = tmp_path / "experts" / "x.safetensors"
    save_tensors_atomic({"a": torch.zeros(2)}, target)
    assert written[0].parent == target.parent and not written[0].exists()


def test_stale_temporaries_are_removed_at_the_next_start(tmp_path):
    host = cache._writer_tag().rpartition("-")[0]
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                              check=True)
    killed = _temporary(tmp_path / "experts", f"{host}-{finished.stdout.strip()}")  # its writer has ended
    old = _temporary(tmp_path / "fisher", "otherhost-1", age=2 * cache.STALE_TEMP_SECONDS)
    live = _temporary(tmp_path / "fisher", cache._writer_tag())  # this process: still writing
    elsewhere = _temporary(tmp_path / "fisher", "otherhost-2")  # another machine's, recent: maybe writing
    cache_path("experts", {"x": 1}, tmp_path)  # the first use of this cache root sweeps it
    assert not killed.exists() and not old.exists()
    assert live.exists() and elsewhere.exists()
    assert remove_stale_temporaries(tmp_path) == []  # nothing more is stale


# ============================================================================ merges: finite inputs
def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g),
            "bn.running_var": torch.rand(4, generator=g) + 0.5, "bn.num_batches_tracked": torch.tensor(3)}


def _merge_inputs():
    theta0, finetuned = _state(0), [_state(1), _state(2)]

    def positive(sd):  # Fishers and Hessians: positive, for the weights only
        return {k: v.abs() + 0.1 for k, v in sd.items() if k in ("w", "b")}

    stats = {"fisher": [positive(sd) for sd in finetuned],
             "gram": [{"w": torch.eye(3) * (i + 1)} for i in range(2)], "gram_counts": [{"w": 5}, {"w": 5}],
             "hessian": [positive(sd) for sd in finetuned], "hessian_pretrained": positive(theta0)}
    return theta0, finetuned, stats


TUNED = {name: {h: grid[len(grid) // 2] for h, grid in method.tuned.items()} for name, method in M.REGISTRY.items()}
# How each merge names the fine-tuned models (those without θ0 call them state dicts).
SECOND_MODEL = {"weight_average": "state_dicts[1]", "fisher": "state_dicts[1]", "regmean": "state_dicts[1]",
                "slerp": "state_dict_b"}


@pytest.mark.parametrize("name", sorted(M.REGISTRY))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_every_merge_rejects_a_non_finite_model_naming_model_and_key(name, bad):
    theta0, finetuned, stats = _merge_inputs()
    finetuned[1]["w"][2, 1] = bad
    label = SECOND_MODEL.get(name, "finetuned[1]")
    kind = "NaN" if math.isnan(bad) else "Inf"
    with pytest.raises(ValueError, match=rf"{re.escape(label)}\['w'\] has 1 {kind} entries(.|\n)*recompute it"):
        M.REGISTRY[name](theta0, finetuned, stats, **TUNED[name])
    if name not in ("weight_average", "fisher", "regmean", "slerp"):  # those with θ0
        theta0, finetuned, stats = _merge_inputs()
        theta0["b"][0] = bad
        with pytest.raises(ValueError, match=r"pretrained\['b'\] has 1"):
            M.REGISTRY[name](theta0, finetuned, stats, **TUNED[name])


@pytest.mark.parametrize("statistic, method, label", [
    ("fisher", "fisher", r"fishers\[1\]\['w'\]"), ("gram", "regmean", r"grams\[1\]\['w'\]"),
    ("hessian", "gradient_matching", r"hessians\[1\]\['w'\]"),
    ("hessian_pretrained", "gradient_matching", r"pretrained_hessian\['w'\]")])
def test_a_non_finite_statistic_is_rejected_naming_it(statistic, method, label):
    theta0, finetuned, stats = _merge_inputs()
    target = stats[statistic] if statistic == "hessian_pretrained" else stats[statistic][1]
    target["w"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"{label} has 1 NaN(.|\n)*recompute it"):
        M.REGISTRY[method](theta0, finetuned, stats, **TUNED[method])


@pytest.mark.parametrize("name", sorted(M.REGISTRY))
def test_every_numeric_hyper_parameter_must_be_finite(name):
    theta0, finetuned, stats = _merge_inputs()
    method = M.REGISTRY[name]
    numeric = [h for h, v in {**method.fixed, **TUNED[name]}.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)]
    for hyper in numeric:
        with pytest.raises(ValueError, match=rf"{name}: {hyper} = nan is not finite \(NaN or Inf\); pass a finite"):
            method(theta0, finetuned, stats, **{**TUNED[name], hyper: float("nan")})


@pytest.mark.parametrize("call, says", [
    (lambda t0, ft, st: M.task_arithmetic(t0, ft, float("nan")), "task_arithmetic: scale"),
    (lambda t0, ft, st: M.ties_merging(t0, ft, 0.2, float("inf")), "ties_merging: scale"),
    (lambda t0, ft, st: M.weight_average(ft, [1.0, float("nan")]), "weight_average: weights"),
    (lambda t0, ft, st: M.fisher_merging(ft, st["fisher"], eps=float("nan")), "fisher_merging: eps"),
    (lambda t0, ft, st: M.regmean(ft, st["gram"], counts=st["gram_counts"], ridge=float("nan")), "regmean: ridge"),
    (lambda t0, ft, st: M.gradient_matching(t0, ft, st["hessian"], st["hessian_pretrained"], delta=float("nan")),
     "gradient_matching: delta"),
    (lambda t0, ft, st: M.slerp(ft[0], ft[1], float("nan")), "slerp: t"),
    (lambda t0, ft, st: M.TaskVector(t0, ft[0]).apply_to(t0, float("nan")), "TaskVector.apply_to: scale"),
])
def test_merge_functions_check_their_hyper_parameters_themselves(call, says):
    theta0, finetuned, stats = _merge_inputs()
    with pytest.raises(ValueError, match=rf"{says} = \[?.*(nan|inf).* is not finite \(NaN or Inf\); pass a finite"):
        call(theta0, finetuned, stats)


def test_task_vector_with_keys_missing_from_theta0_is_an_error():
    theta0, finetuned, _ = _merge_inputs()
    tau = M.TaskVector(vector={f"module.{k}": v for k, v in M.TaskVector(theta0, finetuned[0]).vector.items()})
    with pytest.raises(ValueError, match=r"'module\.w'(.|\n)*same keys as θ0(.|\n)*prefix"):
        tau.apply_to(theta0)
    bad = M.TaskVector(theta0, finetuned[0])
    bad.vector["w"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"task vector\['w'\] has 1 NaN"):
        bad.apply_to(theta0)


def test_negative_scales_where_meaningless_are_errors():
    theta0, finetuned, stats = _merge_inputs()
    with pytest.raises(ValueError, match=r"scale = -1.*must be >= 0(.|\n)*remove_uncertainty_weighted"):
        M.gradient_matching(theta0, finetuned, stats["hessian"], stats["hessian_pretrained"], scale=-1.0)
    with pytest.raises(ValueError, match=r"t = 1\.5 is outside \[0, 1\]; (.|\n)*Pass t in \[0, 1\]"):
        M.slerp(finetuned[0], finetuned[1], 1.5)
    with pytest.raises(ValueError, match=r"weights \[1\.0, -1\.0\] include a negative one"):
        M.fisher_merging(finetuned, stats["fisher"], weights=[1.0, -1.0])


def test_negative_scales_that_mean_task_negation_are_allowed():
    """Task Arithmetic's and TIES's negative λ negates the task vectors (documented choice)."""
    theta0, finetuned, _ = _merge_inputs()
    keys = ("w", "b")
    theta0, finetuned = {k: theta0[k] for k in keys}, [{k: sd[k] for k in keys} for sd in finetuned]
    negated = [{k: 2 * theta0[k] - sd[k] for k in keys} for sd in finetuned]  # θ0 − τ
    for merge in (lambda ft, s: M.task_arithmetic(theta0, ft, s), lambda ft, s: M.ties_merging(theta0, ft, 0.5, s)):
        for k, v in merge(finetuned, -0.4).items():
            torch.testing.assert_close(v, merge(negated, 0.4)[k])


# ============================================================================ statistics
class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x):
        return self.linear(x)


def _batch(x):
    return [{"x": x, "labels": torch.zeros(len(x), dtype=torch.long)}]


def test_an_all_zero_or_non_finite_fisher_is_an_error_naming_what_to_check():
    model = Linear()
    with pytest.raises(ValueError, match=r"Fisher is zero in all 1 tensors \(linear\.weight\)(.|\n)*param_names"):
        S.diagonal_fisher(model, _batch(torch.zeros(4, 3)), param_names=["linear.weight"], disable=True)
    with torch.no_grad():
        model.linear.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"outputs are NaN or Inf for 4 of 4 examples(.|\n)*Check the model's weights"):
        S.diagonal_fisher(model, _batch(torch.ones(4, 3)), disable=True)  # labels sampled from NaN outputs
    with pytest.raises(ValueError, match=r"Fisher of 'linear\.\w+' has \d+ NaN(.|\n)*check its weights for NaN"):
        S.diagonal_fisher(model, _batch(torch.ones(4, 3)), label_mode="true", disable=True)


def test_an_all_zero_or_non_finite_gram_is_an_error_naming_what_to_check():
    with pytest.raises(ValueError, match=r"Gram matrix is zero in all 1 tensors \(linear\.weight\)(.|\n)*batches"):
        S.gram_matrices(Linear(), _batch(torch.zeros(4, 3)), disable=True)
    x = torch.ones(4, 3)
    x[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"Gram matrix of 'linear\.weight' has \d+ NaN and \d+ Inf(.|\n)*inputs"):
        S.gram_matrices(Linear(), _batch(x), return_counts=True, disable=True)


def test_a_bad_hessian_estimate_is_an_error():
    with pytest.raises(ValueError, match=r"Hessian is zero in all 2 tensors(.|\n)*param_names"):
        S.hessian_estimate({"a": torch.zeros(3), "b": torch.zeros(2)}, 100)
    with pytest.raises(ValueError, match=r"Hessian of 'a' has 1 NaN"):
        S.hessian_estimate({"a": torch.tensor([1.0, float("nan")])}, 100)
    with pytest.raises(ValueError, match=r"num_examples = 0; pass the \(positive\) size"):
        S.hessian_estimate({"a": torch.ones(3)}, 0)


# ============================================================================ mirror files
def _senteval_copy(tmp_path: Path, *files: str) -> tuple[Path, Path]:
    """A mirror holding copies of the real SentEval ``files``, and the copy of the first."""
    folder = tmp_path / "mirror" / "text" / "senteval"
    folder.mkdir(parents=True)
    for file in files:
        shutil.copy(SHARED_DATA / "text" / "senteval" / file, folder / file)
        (folder / file).chmod(0o644)
    return tmp_path / "mirror", folder / files[0]


SST2 = ("stsa.binary.train", "stsa.binary.dev", "stsa.binary.test")
REPAIR = r"Copy it again into the mirror(.|\n)*unset DATA_DIR"


@needs_data(*(f"text/senteval/{f}" for f in SST2))
@pytest.mark.parametrize("damage, says", [
    (lambda p: p.write_bytes(b"".join(p.read_bytes().splitlines(keepends=True)[:3000])), "has 3,000 lines where"),
    (lambda p: p.write_bytes(b""), "has 0 lines where"),
    (lambda p: p.write_bytes(p.read_bytes()[:-5]), "does not end with a line break"),
])
def test_a_truncated_or_empty_senteval_file_is_an_error_naming_it(tmp_path, damage, says):
    mirror, train = _senteval_copy(tmp_path, *SST2)
    assert len(load_text_task("sst2", data_dir=mirror).train) == 6_920  # the intact copy loads
    damage(train)
    with pytest.raises(ValueError, match=rf"stsa\.binary\.train {says}(.|\n)*{REPAIR}"):
        load_text_task("sst2", data_dir=mirror)


@needs_data("text/tweeteval/irony")
def test_a_truncated_tweeteval_split_or_empty_mapping_is_an_error_naming_it(tmp_path):
    folder = tmp_path / "mirror" / "text" / "tweeteval" / "irony"
    shutil.copytree(SHARED_DATA / "text" / "tweeteval" / "irony", folder)
    for p in folder.iterdir():
        p.chmod(0o644)
    for name in ("val_text.txt", "val_labels.txt"):  # both cut alike: they still agree line by line
        (folder / name).write_bytes(b"".join((folder / name).read_bytes().splitlines(keepends=True)[:500]))
    with pytest.raises(ValueError, match=rf"val_text\.txt has 500 lines where the published file has 955(.|\n)*"
                                         rf"{REPAIR}"):
        load_text_task("irony", data_dir=tmp_path / "mirror")
    (folder / "mapping.txt").write_bytes(b"")
    with pytest.raises(ValueError, match=rf"mapping\.txt names no classes(.|\n)*{REPAIR}"):
        load_text_task("irony", data_dir=tmp_path / "mirror")


@needs_data("text/senteval", "text/tweeteval")
def test_the_published_sizes_are_those_of_the_real_mirror():
    for file, lines in text_module.SENTEVAL_LINES.items():
        raw = text_module._byte_lines(SHARED_DATA / "text" / "senteval" / file)
        assert sum(1 for line in raw if line.strip()) == lines, file
    for task, sizes in text_module.TWEETEVAL_LINES.items():
        for split, lines in sizes.items():
            for kind in ("text", "labels"):
                path = SHARED_DATA / "text" / "tweeteval" / task / f"{split}_{kind}.txt"
                assert len(text_module._byte_lines(path)) == lines, path


def _usps_copy(tmp_path: Path) -> tuple[Path, Path]:
    path = tmp_path / "mirror" / "vision" / "usps.npz"
    path.parent.mkdir(parents=True)
    shutil.copy(SHARED_DATA / "vision" / "usps.npz", path)
    path.chmod(0o644)
    return tmp_path / "mirror", path


def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 3
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


@needs_data("vision/usps.npz")
@pytest.mark.parametrize("damage", [_truncate, _flip_middle, lambda p: p.write_bytes(b""),
                                    lambda p: p.write_bytes(b"not an archive at all" * 10)])
def test_a_damaged_npz_is_an_error_naming_it_and_the_repair(tmp_path, damage):
    mirror, path = _usps_copy(tmp_path)
    damage(path)
    with pytest.raises(ValueError, match=r"usps\.npz is truncated, damaged or not an \.npz archive(.|\n)*"
                                         r"Copy usps\.npz again into the mirror(.|\n)*unset DATA_DIR"):
        load_vision_task("usps", data_dir=mirror)


def _write_npz(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "mirror" / "vision" / "mnist.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = dict(x_train=np.zeros((20, 4, 4, 1), np.uint8), y_train=np.arange(20) % 10,
                  x_test=np.zeros((10, 4, 4, 1), np.uint8), y_test=np.arange(10) % 10,
                  classes=np.array([str(d) for d in range(10)]))
    np.savez(path, **{**arrays, **changes})
    return tmp_path / "mirror"


def test_float_labels_in_an_npz_are_an_error_not_truncated(tmp_path):
    mirror = _write_npz(tmp_path)
    assert len(load_vision_task("mnist", data_dir=mirror).test) == 10  # the intact file loads
    mirror = _write_npz(tmp_path, y_train=np.arange(20) % 10 + 0.7)
    with pytest.raises(ValueError, match=r"mnist\.npz: y_train holds float64 labels; class labels are integers"
                                         r"(.|\n)*Copy mnist\.npz again"):
        load_vision_task("mnist", data_dir=mirror)


def test_an_object_array_in_an_npz_gets_the_right_advice(tmp_path):
    mirror = _write_npz(tmp_path, classes=np.array([str(d) for d in range(10)], dtype=object))
    with pytest.raises(ValueError, match=r"mnist\.npz stores an array as Python objects(.|\n)*dtype=str"):
        load_vision_task("mnist", data_dir=mirror)


# ============================================================================ configuration, training
@pytest.mark.parametrize("field, value", [("max_steps", 0), ("batch_size", 0), ("eval_every", 0),
                                          ("warmup_steps", 0), ("patience", 0), ("max_eval_examples", -1),
                                          ("lr", 0.0), ("lr", float("nan")), ("lr", float("inf")),
                                          ("weight_decay", -0.1), ("weight_decay", float("nan"))])
def test_a_bad_finetune_config_is_an_error_saying_what_to_pass(field, value):
    with pytest.raises(ValueError, match=rf"FinetuneConfig\.{field} = {value}: pass a positive"
                                         rf"|FinetuneConfig\.{field} = {value}: pass a finite"):
        FinetuneConfig(**{field: value})


def test_a_non_finite_loss_stops_training_and_caches_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGE_CACHE_DIR", str(tmp_path))
    track = TinyTrack(["a", "b"])
    heads = probe_heads(track, max_examples=64)
    heads["a"] = {k: v.clone() for k, v in heads["a"].items()}
    heads["a"]["weight"][0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"training loss became nan at step 0(.|\n)*Lower lr"
                                                 r"(.|\n)*check the data of task 'a'"):
        finetune(track, ["a"], heads, CONFIG, progress=False)
    assert not [p for p in (tmp_path / "experts").rglob("*.safetensors") if ".partial" not in p.name]

