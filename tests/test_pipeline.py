"""The expensive-step machinery: cache, checkpoints, fine-tuning, and the baselines pipeline."""
import numpy as np
import pytest
import torch

from lib.experiments.cache import cache_key, cached_tensors, content_hash, load_metadata, save_tensors_atomic
from lib.models import load_cifar_resnet
from lib.experiments.baselines import BaselinesConfig, closed_form_merges, compute_statistics, evaluate_methods, make_track, prepare_track, summary
from lib.experiments.training import FinetuneConfig, finetune, probe_heads

from conftest import SHARED_DATA, SHARED_MODELS, needs_data, needs_models


def test_cache_key_is_stable_and_order_free():
    assert cache_key({"a": 1, "b": [1, 2]}) == cache_key({"b": [1, 2], "a": 1})
    assert cache_key({"a": 1}) != cache_key({"a": 2})


def test_content_hash_is_equal_exactly_for_equal_states():
    a = {"w": torch.randn(3, 4), "bf": torch.randn(5).bfloat16(), "n": torch.tensor(7)}
    assert content_hash(a) == content_hash({k: v.clone() for k, v in reversed(list(a.items()))})
    assert content_hash(a) != content_hash({**a, "w": -a["w"]})  # a sum of |values| would miss this
    assert content_hash(a) != content_hash({**a, "w": a["w"].reshape(4, 3)})  # shape counts
    assert content_hash(a) != content_hash({**a, "n": torch.tensor(8)})


def test_cached_tensors_computes_once(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"x": torch.arange(3.0)}, {"note": "hi"}

    first = cached_tensors("k", {"a": 1}, compute, root=tmp_path)
    second = cached_tensors("k", {"a": 1}, compute, root=tmp_path)
    assert len(calls) == 1 and torch.equal(first["x"], second["x"])
    (path,) = (tmp_path / "k").glob("*.safetensors")
    assert load_metadata(path)["note"] == "hi"
    assert not list((tmp_path / "k").glob("*.tmp"))  # atomic: no leftovers


def test_atomic_write_leaves_no_partial_file(tmp_path):
    with pytest.raises(Exception):
        save_tensors_atomic({"x": "not a tensor"}, tmp_path / "a.safetensors")
    assert not list(tmp_path.iterdir())


@needs_models
@needs_data
def test_resnet20_checkpoint_is_the_real_cifar_model():
    """The published ResNet-20 gets ~76% on the mirror's JPEG-decoded CIFAR-10 subset."""
    from lib.data import load_vision_task, prepare_images

    encoder, head = load_cifar_resnet(SHARED_MODELS / "cifar_resnet" / "resnet20-12fca82f.th")
    assert sum(p.numel() for p in [*encoder.parameters(), *head.parameters()]) == 269_722
    test = load_vision_task("cifar10", data_dir=SHARED_DATA).test
    idx = np.random.default_rng(0).permutation(len(test.labels))[:600]
    encoder.eval()
    with torch.no_grad():
        pred = head(encoder(prepare_images(test.images[idx]))).argmax(1).numpy()
    assert 0.68 < (pred == test.labels[idx]).mean() < 0.85


def _tiny_vision_track(**kw):
    return make_track("vision", ["usps", "mnist"], str(SHARED_DATA), max_train=128, max_validation=32,
                      max_test=48, models_dir=str(SHARED_MODELS), **kw)


@needs_models
@needs_data
def test_finetune_resumes_exactly_and_depends_on_seed(monkeypatch, tmp_path):
    import lib.experiments.training as training

    track = _tiny_vision_track()
    heads = probe_heads(track, max_examples=64)
    config = FinetuneConfig(max_steps=8, batch_size=16, eval_every=4, patience=5, lr=1e-3, seed=1)

    # An interrupted run: crash right after the first evaluation's checkpoint, then run again.
    real_save = training._save_partial

    def save_then_crash(*args):
        real_save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "_save_partial", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        finetune(track, ["usps"], heads, config, progress=False)
    monkeypatch.setattr(training, "_save_partial", real_save)
    resumed = finetune(track, ["usps"], heads, config, progress=False)

    monkeypatch.setenv("MERGE_CACHE_DIR", str(tmp_path))  # an uninterrupted run, from scratch
    uninterrupted = finetune(_tiny_vision_track(), ["usps"], heads, config, progress=False)
    for k in resumed.encoder:
        assert torch.allclose(resumed.encoder[k], uninterrupted.encoder[k], atol=1e-5), k
    assert np.allclose(resumed.info["history"], uninterrupted.info["history"])

    other_seed = finetune(track, ["usps"], heads, FinetuneConfig(**{**config.__dict__, "seed": 2}), progress=False)
    assert any(not torch.equal(other_seed.encoder[k], resumed.encoder[k]) for k in resumed.encoder)


@needs_models
@needs_data
def test_baselines_pipeline_end_to_end_on_a_tiny_vision_track():
    track = _tiny_vision_track()
    config = FinetuneConfig(max_steps=6, batch_size=16, eval_every=3, lr=1e-3, max_eval_examples=32)
    setup = prepare_track(track, config, config, progress=False)
    assert setup.mergeable and "layer1.0.bn1.running_mean" in setup.mergeable
    merge_config = BaselinesConfig(lambda_grid=(0.5, 1.0), fisher_examples=16, regmean_examples=32, selection_examples=16)
    stats = compute_statistics(track, setup, merge_config, progress=False)
    # RegMean sees the convolutions through their unfolded-patch Gram matrices
    assert stats["gram"]["usps"]["conv1.weight"].shape == (27, 27)
    merged = closed_form_merges(track, setup, stats, merge_config, progress=False)
    assert set(merged) == {"Weight averaging", "Task Arithmetic", "TIES", "DARE + TA", "DARE + TIES", "Fisher",
                           "RegMean", "Gradient matching"}
    assert merged["Task Arithmetic"].hyperparameters["lambda (validation)"] in (0.5, 1.0)
    table = evaluate_methods(track, setup, merged, reestimate_bn=True, progress=False)
    wide = summary(table)
    assert (wide.loc["Individual experts", "Normalized"] == 100.0)
    assert "TIES (BN re-estimated)" in wide.index
    assert wide[["usps", "mnist"]].to_numpy().min() >= 0
