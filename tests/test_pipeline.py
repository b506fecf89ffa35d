"""The expensive-step machinery: cache, checkpoints, fine-tuning, evaluation and BatchNorm
re-estimation. Everything but the real-checkpoint test runs on the synthetic TinyTrack
(conftest.py), so none of it needs the mirror."""
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lib.experiments.evaluation as evaluation
import lib.experiments.training as training
from lib.experiments.cache import cache_key, cached_tensors, content_hash, load_metadata, save_tensors_atomic
from lib.experiments.evaluation import evaluate
from lib.experiments.training import FinetuneConfig, finetune, probe_heads, reestimate_batchnorm
from lib.models import load_cifar_resnet
from lib.paths import cache_dir

from conftest import SHARED_DATA, SHARED_MODELS, TinyTrack, needs_data, needs_models

pytestmark = pytest.mark.usefixtures("one_thread")


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


@needs_models("cifar_resnet/resnet20-12fca82f.th")
@needs_data("vision/cifar10.npz")
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


# ----------------------------------------------------------------------------- fine-tuning
CONFIG = FinetuneConfig(max_steps=12, batch_size=16, eval_every=4, patience=5, lr=1e-2, warmup_steps=2, seed=1)


def _count_steps(monkeypatch) -> list[int]:
    """The training steps ``finetune`` executes from now on (one batch is drawn per step)."""
    executed = []
    draw = training._train_indices

    @functools.wraps(draw)  # unwraps to the real function in the cache key's code hash
    def counted(split, batch_size, step, seed):
        executed.append(step)
        return draw(split, batch_size, step, seed)

    monkeypatch.setattr(training, "_train_indices", counted)
    return executed


def test_finetune_resumes_from_its_last_checkpoint(monkeypatch, tmp_path):
    """An interrupted run continues from its checkpoint, running only the steps it had left, and
    ends where an uninterrupted run ends. (Equality alone would not show resuming: a run that
    started over would end there too; the step count does.)"""
    track = TinyTrack(["a", "b"])
    heads = probe_heads(track, max_examples=64)
    save = training._save_partial

    def save_then_crash(*args):  # interrupt right after the first evaluation's checkpoint (step 4)
        save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "_save_partial", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        finetune(track, ["a"], heads, CONFIG, progress=False)
    monkeypatch.setattr(training, "_save_partial", save)

    executed = _count_steps(monkeypatch)
    resumed = finetune(track, ["a"], heads, CONFIG, progress=False)
    assert executed == list(range(4, 12))  # steps 0-3 were not run again
    assert not list(cache_dir().glob("**/*.partial.safetensors"))  # the checkpoint is gone when done

    executed.clear()
    assert finetune(track, ["a"], heads, CONFIG, progress=False).info == resumed.info
    assert executed == []  # the finished expert is served from the cache

    monkeypatch.setenv("MERGE_CACHE_DIR", str(tmp_path))  # an uninterrupted run, from scratch
    uninterrupted = finetune(TinyTrack(["a", "b"]), ["a"], heads, CONFIG, progress=False)
    assert executed == list(range(12))
    for k in resumed.encoder:
        assert torch.allclose(resumed.encoder[k], uninterrupted.encoder[k], atol=1e-6), k
    assert np.allclose(resumed.info["history"], uninterrupted.info["history"])


def test_finetune_depends_on_seed_and_data(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGE_CACHE_DIR", str(tmp_path))
    track = TinyTrack(["a", "b"])
    heads = probe_heads(track, max_examples=64)
    one = finetune(track, ["a"], heads, CONFIG, progress=False)
    other_seed = finetune(track, ["a"], heads, FinetuneConfig(**{**CONFIG.__dict__, "seed": 2}), progress=False)
    other_task = finetune(track, ["b"], heads, CONFIG, progress=False)
    for other in (other_seed, other_task):
        assert not torch.equal(other.encoder["conv1.weight"], one.encoder["conv1.weight"])
    # fine-tuning moved the weights, and the expert's head is the frozen probe
    assert not torch.equal(one.encoder["conv1.weight"], track.pretrained_encoder().state_dict()["conv1.weight"])
    assert torch.equal(one.heads["a"]["weight"], heads["a"]["weight"])


def test_finetune_clips_the_gradient_norm_when_asked(tmp_path, monkeypatch):
    """One step of AdamW moves each weight by about lr whatever the gradient's scale, unless the
    gradient is clipped so far below Adam's eps (1e-8) that the step all but vanishes."""
    monkeypatch.setenv("MERGE_CACHE_DIR", str(tmp_path))
    track = TinyTrack(["a"])
    heads = probe_heads(track, max_examples=64)
    one_step = dict(max_steps=1, eval_every=1, warmup_steps=1, lr=1e-2)
    theta0 = track.pretrained_encoder().state_dict()["conv1.weight"]
    moved = {}
    for clip in (None, 1e-12):
        config = FinetuneConfig(**{**CONFIG.__dict__, **one_step, "max_grad_norm": clip})
        expert = finetune(track, ["a"], heads, config, progress=False)
        moved[clip] = (expert.encoder["conv1.weight"] - theta0).abs().max().item()
    assert moved[None] > 1e-3 and moved[1e-12] < moved[None] / 100, moved  # what is left: weight decay
    assert "max_grad_norm" not in CONFIG.key() and config.key()["max_grad_norm"] == 1e-12  # old keys stay valid
    with pytest.raises(ValueError, match="max_grad_norm = 0"):
        FinetuneConfig(max_grad_norm=0)


class _NoBatchNormEncoder(torch.nn.Module):
    """TinyEncoder without its BatchNorm, whose statistics would differ per micro-batch."""

    feature_dim = 8

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, pixel_values):
        return torch.relu(self.conv1(pixel_values)).mean((2, 3))


class _NoBatchNormTrack(TinyTrack):
    def backbone_id(self) -> str:
        return "tiny-conv-no-bn"

    def pretrained_encoder(self):
        with torch.random.fork_rng():
            torch.manual_seed(1234)
            return _NoBatchNormEncoder()


def test_micro_batches_take_the_whole_batchs_steps(tmp_path, monkeypatch):
    """Gradient accumulation over parts of 5 rows (16 = 5 + 5 + 5 + 1: unequal parts, weighted
    by their share) trains the model the whole batch does, up to float rounding."""
    monkeypatch.setenv("MERGE_CACHE_DIR", str(tmp_path))
    track = _NoBatchNormTrack(["a"], name="tiny-no-bn")
    heads = probe_heads(track, max_examples=64)
    whole = finetune(track, ["a"], heads, CONFIG, progress=False)
    parts = finetune(track, ["a"], heads, FinetuneConfig(**{**CONFIG.__dict__, "micro_batch_size": 5}), progress=False)
    assert parts.info["steps"] == whole.info["steps"] == CONFIG.max_steps
    for k in whole.encoder:
        assert not torch.equal(whole.encoder[k], track.pretrained_encoder().state_dict()[k])  # it trained
        torch.testing.assert_close(parts.encoder[k], whole.encoder[k], rtol=1e-5, atol=1e-6)
    assert [p for p, _ in training.micro_batches({"labels": torch.arange(16)}, None)][0]["labels"].numel() == 16
    assert [w for _, w in training.micro_batches({"labels": torch.arange(16)}, 5)] == [5 / 16] * 3 + [1 / 16]


# ----------------------------------------------------------------------------- evaluation
def test_evaluation_scores_the_given_state_and_recomputes_exactly_when_it_changes(monkeypatch, tmp_path):
    monkeypatch.setenv("MERGE_CACHE_DIR", str(tmp_path))
    track = TinyTrack(["a", "b"])
    heads = probe_heads(track, max_examples=64)
    state = {k: v.clone() for k, v in track.pretrained_encoder().state_dict().items()}
    calls = []
    predict = evaluation.predict
    monkeypatch.setattr(evaluation, "predict", lambda *a: calls.append(1) or predict(*a))

    # a module holding other weights: evaluate must score `state`, not whatever the module holds
    stranger = track.pretrained_encoder()
    torch.nn.init.normal_(stranger.conv1.weight)
    first = evaluate(track, stranger, state, heads)
    assert len(calls) == 2
    reference = track.pretrained_encoder()
    for task in track.tasks:
        split = track.split(task, "test")
        expected = predict(reference, heads[task], split) == split.labels
        assert first[task]["accuracy"] == pytest.approx(100 * expected.mean())
        assert np.array_equal(first[task]["correct"], expected)

    again = evaluate(track, track.pretrained_encoder(), state, heads)
    assert len(calls) == 2 and again["a"]["accuracy"] == first["a"]["accuracy"]  # served from the cache
    changed = {**state, "conv1.weight": -state["conv1.weight"]}
    evaluate(track, track.pretrained_encoder(), changed, heads)
    assert len(calls) == 4  # a different model is evaluated, not served the old predictions


# ----------------------------------------------------------------------------- BatchNorm
def test_reestimated_batchnorm_statistics_are_those_of_the_data():
    track = TinyTrack(["a"])
    encoder = track.pretrained_encoder()
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    state["bn1.running_mean"].fill_(5.0)  # stale statistics, as a merge leaves them
    state["bn1.running_var"].fill_(100.0)
    split = track.split("a", "train")
    new = reestimate_batchnorm(encoder, state, [split], examples_per_split=len(split), batch_size=len(split))
    activations = F.conv2d(torch.from_numpy(split.inputs), state["conv1.weight"], padding=1)
    assert torch.allclose(new["bn1.running_mean"], activations.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(new["bn1.running_var"], activations.transpose(0, 1).flatten(1).var(1), rtol=1e-4)
    assert torch.equal(new["conv1.weight"], state["conv1.weight"])
    assert float(state["bn1.running_mean"][0]) == 5.0  # the input state is left as it was
