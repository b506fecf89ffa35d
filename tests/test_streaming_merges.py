"""Streaming merges (lib/merging/streaming.py): the in-memory methods' results, bit for bit,
from safetensors files read one key at a time; TIES's exact threshold search; memory."""
from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lib import merging as M
from lib.merging import _common
from lib.merging import streaming as S
from lib.merging import kernels
from lib.merging.dare import _dare_mask, _key_words, dare_keep_mask
from lib.merging.ties import KthLargest, sample_bracket
from lib.merging.ties import _ties_thresholds as memory_thresholds

REPO = Path(__file__).resolve().parents[1]

# Mixed shapes and dtypes: matrices, a conv kernel, vectors, a 0-d scalar, a bfloat16 matrix
# and float64 tensors (stored first, so TIES ranks every |τ| in float64, as in memory),
# BatchNorm buffers (float, averaged) and an integer buffer (copied).
SHAPES = {"conv.weight": (6, 3, 3, 3), "enc.weight": (12, 8), "enc.bias": (12,), "dec.weight": (5, 12),
          "dec.bias": (5,), "logit_scale": (), "emb.weight": (7, 4), "bn.running_mean": (12,), "bn.running_var": (12,)}
HALF = "emb.weight"  # stored in bfloat16
DOUBLE = ("logit_scale", "bn.running_var")  # stored in float64
GRAM_KEYS = ("enc.weight", "dec.weight")
GRAM_ROWS = 40


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes: equal bits, not just equal values (−0.0 ≠ +0.0 here)."""
    return t.reshape(-1).view(torch.uint8) if t.numel() else t


def assert_same_bits(got: dict, expected: dict) -> None:
    assert set(got) == set(expected), set(got) ^ set(expected)
    for k in expected:
        assert got[k].dtype == expected[k].dtype and got[k].shape == expected[k].shape, k
        assert torch.equal(bits(got[k]), bits(expected[k])), f"{k}: {got[k]} != {expected[k]}"


def random_models(n_experts: int, seed: int = 0, scale: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    theta0 = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    theta0["bn.running_var"] = theta0["bn.running_var"].abs() + 0.5
    experts = []
    for t in range(n_experts):
        expert = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in theta0.items()}
        expert["bn.running_mean"] = expert["bn.running_mean"] + 5.0  # large shifts: would win any top-k
        expert["bn.num_batches_tracked"] = torch.tensor(100 + t)
        experts.append(expert)
    theta0["bn.num_batches_tracked"] = torch.tensor(7)
    for sd in [theta0, *experts]:
        sd[HALF] = sd[HALF].to(torch.bfloat16)
        for k in DOUBLE:
            sd[k] = sd[k].to(torch.float64)
    return theta0, experts


def statistics(experts, seed: int = 0):
    g = torch.Generator().manual_seed(1000 + seed)
    fishers = [{k: torch.rand(v.shape, generator=g) + 0.05 for k, v in e.items()
                if v.is_floating_point() and "running" not in k} for e in experts]
    for f in fishers:
        f["dec.bias"][0] = 0.0  # no model has information there: Fisher's weighted-average fallback
    grams = []
    for _ in experts:
        gram = {}
        for k in GRAM_KEYS:
            x = torch.randn(GRAM_ROWS, SHAPES[k][1], generator=g)
            gram[k] = x.T @ x
        grams.append(gram)
    counts = [{k: GRAM_ROWS + 3 * t for k in GRAM_KEYS} for t in range(len(experts))]
    return fishers, grams, counts


def write(folder: Path, name: str, sd: dict) -> Path:
    path = folder / f"{name}.safetensors"
    save_file(sd, path)
    return path


@pytest.fixture
def files(tmp_path):
    """θ0, six experts and their statistics as files, and the same loaded back in memory.
    Six: 6·(1/6) is not exactly 1 in floating point, so weights normalised twice (as Fisher
    merging's fallback average does) differ from 1/6 in the last bit, and a merge that
    normalised them once would be caught."""
    theta0, experts = random_models(6)
    fishers, grams, counts = statistics(experts)
    paths = {"pretrained": write(tmp_path, "theta0", theta0),
             "finetuned": [write(tmp_path, f"expert{t}", e) for t, e in enumerate(experts)],
             "fisher": [write(tmp_path, f"fisher{t}", f) for t, f in enumerate(fishers)],
             "gram": [write(tmp_path, f"gram{t}", g) for t, g in enumerate(grams)],
             "gram_counts": counts}
    memory = {"pretrained": load_file(paths["pretrained"]), "finetuned": [load_file(p) for p in paths["finetuned"]],
              "stats": {"fisher": [load_file(p) for p in paths["fisher"]],
                        "gram": [load_file(p) for p in paths["gram"]], "gram_counts": counts}}
    return paths, memory


def file_stats(method: str, paths: dict, hyper: dict):
    if method == "fisher":
        return {"fisher": paths["fisher"]}
    if method == "regmean":
        return {"gram": paths["gram"], "gram_counts": paths["gram_counts"]}
    return None


CASES = [
    ("weight_average", {}),
    ("task_arithmetic", {"scale": 0.3}),
    ("task_arithmetic", {"scale": -0.7, "buffers": []}),  # no buffers: the running stats are task vectors too
    ("ties", {"scale": 0.3}),
    ("ties", {"scale": 1.0, "density": 0.5, "disjoint": "sum"}),
    ("ties", {"scale": 1.0, "density": 0.0}),  # k = 0: every τ trimmed, θ0 returned
    ("ties", {"scale": 0.6, "density": 1.0}),  # k = n: nothing trimmed
    ("ties", {"scale": 0.5, "density": 0.3, "_sample": False, "_capacity": 5}),  # histogram passes
    ("ties", {"scale": 0.5, "density": 0.1, "buffers": ["enc.bias", "bn.running_mean", "bn.running_var"]}),
    ("dare_ta", {"scale": 0.4}),
    ("dare_ta", {"scale": 0.4, "drop_rate": 0.3, "seed": 5}),
    ("dare_ties", {"scale": 0.4}),
    ("dare_ties", {"scale": 1.0, "density": 0.4, "disjoint": "sum", "_sample": False, "_capacity": 3}),
    ("fisher", {}),
    ("fisher", {"eps": 0.0}),
    ("regmean", {}),
    ("regmean", {"alpha": 0.5, "gram_normalization": "sum", "ridge": 0.1}),
]


def _public(hyper):
    return {k: v for k, v in hyper.items() if not k.startswith("_")}


@pytest.mark.parametrize("piece,workers", [(None, 1), (7, 1), (7, 3)],
                         ids=["whole-keys", "pieces-of-7", "pieces-of-7-3-workers"])
@pytest.mark.parametrize("method,hyper", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_streamed_merge_equals_the_in_memory_method_bit_for_bit(files, tmp_path, monkeypatch, method, hyper, piece,
                                                                workers):
    """Also with keys cut into pieces of 7 entries (odd: DARE's masks start mid-draw), the
    element-wise merges' unit of work, and with three threads merging pieces at once."""
    if piece is not None:
        monkeypatch.setattr(S, "PIECE", piece)
    paths, memory = files
    expected = M.REGISTRY[method](memory["pretrained"], memory["finetuned"], memory["stats"], **_public(hyper))
    with S.stream_merge(method, paths["pretrained"], paths["finetuned"], file_stats(method, paths, hyper),
                        workers=workers, **hyper) as merged:
        pairs = list(merged)
    assert [k for k, _ in pairs] == list(merged.layout)  # the announced order, the writer relies on it
    assert_same_bits(dict(pairs), expected)
    out = S.merge_to_file(method, paths["pretrained"], paths["finetuned"], tmp_path / "merged.safetensors",
                          file_stats(method, paths, hyper), workers=workers, **hyper)
    assert_same_bits(load_file(out), expected)


def _merge_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("stream-merge")]


def test_workers_stop_with_the_stream_and_leave_torch_threads_as_they_were(files, monkeypatch):
    """Closing a stream midway stops its workers; a failing piece raises its own error, in key
    order; torch's thread count, in this thread and in threads started later, is unchanged."""
    paths, _ = files
    monkeypatch.setattr(S, "PIECE", 5)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with S.stream_merge("ties", paths["pretrained"], paths["finetuned"], scale=0.3, workers=3) as merged:
            pairs = iter(merged)
            next(pairs)
            assert _merge_threads()
        assert not _merge_threads()
        assert torch.get_num_threads() == 2
        seen = []
        later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        later.start()
        later.join()
        assert seen == [2]
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="workers must be a positive int"):
        S.stream_merge("ties", paths["pretrained"], paths["finetuned"], scale=0.3, workers=0)


def test_the_merges_are_not_trivially_equal(files):
    """The exactness test above compares non-trivial results: the merges differ from θ0, from
    each other, and DARE's from itself under another seed."""
    paths, _ = files
    runs = {"ta": ("task_arithmetic", {"scale": 0.3}), "ties": ("ties", {"scale": 0.3}),
            "dare": ("dare_ta", {"scale": 0.4}), "dare_seed": ("dare_ta", {"scale": 0.4, "seed": 1}),
            "fisher": ("fisher", {}), "regmean": ("regmean", {})}
    results = {name: dict(S.stream_merge(m, paths["pretrained"], paths["finetuned"], file_stats(m, paths, h), **h))
               for name, (m, h) in runs.items()}
    theta0 = load_file(paths["pretrained"])
    for name, merged in results.items():
        assert not torch.equal(merged["enc.weight"], theta0["enc.weight"]), name
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.equal(results[a]["enc.weight"], results[b]["enc.weight"]), (a, b)


# --------------------------------------------------------------- exact k-th largest


def _topk_kth(x: torch.Tensor, k: int) -> float:
    return torch.topk(x.reshape(-1), k).values[-1].item()


def _select(x: torch.Tensor, k: int, capacity: int, chunks: int = 3, bracket=None) -> KthLargest:
    selection = KthLargest(k, x.dtype, capacity)
    if bracket is not None:
        selection.bracket(*bracket)
    while not selection.done:
        for part in x.reshape(-1).chunk(chunks):
            selection.observe(part)
        selection.end_pass()
        assert selection.passes <= 8
    return selection


ADVERSARIAL = {
    "many ties": lambda g, n: torch.randint(0, 4, (n,), generator=g).float() * 0.25,
    "all equal": lambda g, n: torch.full((n,), 0.125),
    "all zero": lambda g, n: torch.zeros(n),
    "zeros and one value": lambda g, n: torch.where(torch.rand(n, generator=g) < 0.9, 0.0, 3.0),
    "heavy tail": lambda g, n: torch.randn(n, generator=g).abs() ** 6,
    "subnormal and huge": lambda g, n: torch.tensor([1e-45, 3e38, 0.0, 1e-38, 5.0] * (n // 5)),
    "adjacent floats": lambda g, n: torch.nextafter(torch.full((n,), 1.0), torch.tensor(2.0)) * (
        torch.rand(n, generator=g) < 0.5) + torch.ones(n) * (torch.rand(n, generator=g) >= 0.5),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("capacity", [1, 7, 10**6])
@pytest.mark.parametrize("case", list(ADVERSARIAL))
def test_kth_largest_equals_topk_on_adversarial_inputs(case, capacity, dtype):
    g = torch.Generator().manual_seed(0)
    x = ADVERSARIAL[case](g, 500).to(dtype)
    n = x.numel()
    for k in sorted({1, 2, n // 5, n // 2, n - 1, n}):
        selection = _select(x, k, capacity)
        assert selection.value == _topk_kth(x, k), (case, k)
        # The trim |τ| >= value keeps topk's entries and every entry tied with the cut-off.
        kept = x >= selection.value
        assert kept[torch.topk(x, k).indices].all() and kept.sum() >= k
        assert (x[~kept] < selection.value).all()
        if capacity >= n:
            assert selection.passes == 1  # everything kept: one pass
        elif dtype == torch.float32 and capacity == 1:
            assert selection.passes <= 2  # two histogram passes pin a float32


@pytest.mark.parametrize("where", ["exact", "too low", "too high", "empty", "a point"])
def test_kth_largest_is_exact_whatever_the_bracket(where):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, generator=g).abs()
    k = 400
    truth = _topk_kth(x, k)
    bracket = {"exact": (truth, truth * 1.01), "too low": (0.0, truth * 0.5), "too high": (truth * 1.5, 10.0),
               "empty": (1.0, 1.0), "a point": (truth, truth)}[where]
    selection = _select(x, k, capacity=50, bracket=bracket)
    assert selection.value == truth
    if where == "exact":
        assert selection.passes == 1


def test_kth_largest_rejects_k_zero_and_other_dtypes():
    with pytest.raises(ValueError, match="k must be"):
        KthLargest(0, torch.float32)
    with pytest.raises(TypeError):
        KthLargest(1, torch.float16)
    selection = KthLargest(1, torch.float32)
    with pytest.raises(TypeError):
        selection.observe(torch.ones(3, dtype=torch.float64))


def test_sample_bracket_holds_the_kth_value_of_the_population():
    g = torch.Generator().manual_seed(2)
    population = torch.randn(200_000, generator=g).abs().numpy()
    rng = np.random.default_rng(0)
    for k in (1, 500, 40_000, 199_999):
        truth = np.sort(population)[::-1][k - 1]
        low, high = sample_bracket(rng.choice(population, 5000, replace=False), population.size, k)
        assert low <= truth < high, k
        inside = ((population >= low) & (population < high)).mean()
        assert inside < 0.2  # narrow: a fraction of the population, not all of it
    assert sample_bracket(np.empty(0, np.float32), 10, 3) == (0.0, np.inf)


def _as_work(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _topk_thresholds(theta0, experts, density, keys):
    """Each task's n_keep-th largest |τ| by torch.topk over the flat concatenation, in the
    first key's working dtype (ties.py's rule: 0 when all are kept, inf when none)."""
    work = _as_work(theta0[keys[0]]).dtype
    out = []
    for e in experts:
        tau = torch.cat([(_as_work(e[k]) - _as_work(theta0[k])).abs().to(work).reshape(-1) for k in keys])
        n_keep = max(round(density * tau.numel()), 1) if density > 0 else 0
        out.append(0.0 if n_keep >= tau.numel() else float("inf") if n_keep == 0 else _topk_kth(tau, n_keep))
    return out


@pytest.mark.parametrize("kind", ["gaussian", "many ties", "all equal"])
@pytest.mark.parametrize("density", [0.01, 0.2])
def test_in_memory_thresholds_equal_topk_on_large_models(kind, density):
    """Large enough (2^18 entries) that the in-memory search samples, brackets and, with many
    ties, falls back to histogram passes."""
    g = torch.Generator().manual_seed(8)
    shapes = {"a": (512, 256), "b": (256, 511), "c": (257,)}
    theta0 = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    step = {"gaussian": lambda s: 1e-2 * torch.randn(s, generator=g),
            "many ties": lambda s: torch.randint(-3, 4, s, generator=g) * 0.25,
            "all equal": lambda s: torch.where(torch.rand(s, generator=g) < 0.5, -0.125, 0.125)}[kind]
    experts = [{k: v + step(v.shape) for k, v in theta0.items()} for _ in range(3)]
    keys = list(shapes)
    assert memory_thresholds(theta0, experts, density, keys) == _topk_thresholds(theta0, experts, density, keys)


@pytest.mark.parametrize("density", [0.0, 1e-3, 0.2, 0.77, 1.0])
@pytest.mark.parametrize("use_sample", [True, False])
def test_streamed_ties_thresholds_equal_the_in_memory_ones(tmp_path, density, use_sample):
    theta0, experts = random_models(4, seed=3)
    # Many exact ties: magnitudes from a small set, so the cut-off is shared by many entries.
    for e in experts:
        for k, v in e.items():
            if v.is_floating_point() and k != HALF:
                e[k] = theta0[k] + (torch.randint(-3, 4, v.shape) * 0.25).to(v.dtype)
    inputs = S._open_inputs("ties", write(tmp_path, "t0", theta0),
                            [write(tmp_path, f"e{t}", e) for t, e in enumerate(experts)], None, {})
    try:
        _, keys = S._merge_keys(inputs.pretrained, None)
        got = S._ties_thresholds(inputs, keys, density, S._TaskVectors(), capacity=4, use_sample=use_sample)
    finally:
        inputs.close()
    theta0 = load_file(tmp_path / "t0.safetensors")
    experts = [load_file(tmp_path / f"e{t}.safetensors") for t in range(4)]
    assert got == memory_thresholds(theta0, experts, density, keys) == _topk_thresholds(theta0, experts, density, keys)


# ------------------------------------------------------------------------ DARE's masks
# (TIES's and DARE's per-tensor arithmetic against plain masked forms: tests/test_kernels.py)


def _lowbias32_by_hand(x: int) -> int:
    """The hash of ``dare``'s docstring on a Python int, every step cut to 32 bits by hand."""
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


@pytest.mark.parametrize("drop_rate", [0.0, 0.3, 0.9])
def test_dare_mask_follows_its_stated_rule_and_keeps_one_minus_p(drop_rate):
    """The mask is the documented rule (entry i drawn as h(h(i ⊕ k0) ⊕ k1), kept where the draw
    is >= round(p·2^32)), written here on Python ints; the fused loops draw the same numbers; a
    piece at any offset is that piece of the whole mask; it keeps 1 − p of the entries, and
    each (task, key) draws its own mask."""
    shape, n = (301, 7), 301 * 7
    k0, k1 = (int(k) for k in _key_words(3, 1, "layer.weight"))
    draws = np.array([_lowbias32_by_hand(_lowbias32_by_hand(i ^ k0) ^ k1) for i in range(n)], dtype=np.uint64)
    expected = (draws >= round(drop_rate * 2**32)).reshape(shape)
    mask = dare_keep_mask(shape, drop_rate, 3, 1, "layer.weight")
    assert mask.dtype == torch.float32 and torch.equal(mask, torch.from_numpy(expected).float())
    for offset in (0, 5, n - 9):  # the fused loops' own draws (kernels._draw), from any counter
        assert np.array_equal(kernels.draws(_dare_mask(9, drop_rate, 3, 1, "layer.weight", offset), 9),
                              draws[offset:offset + 9])
    flat = mask.reshape(-1)
    for start, count in [(0, 5), (1, 6), (2, 1), (999, 1000), (n - 3, 3)]:
        piece = dare_keep_mask((count,), drop_rate, 3, 1, "layer.weight", offset=start)
        assert torch.equal(piece, flat[start:start + count]), (start, count)
    big = dare_keep_mask((1000, 1000), drop_rate, 0, 0, "w")
    assert abs(big.mean().item() - (1 - drop_rate)) < 5 * math.sqrt(drop_rate * (1 - drop_rate) / 1e6) + 1e-12
    if drop_rate:
        assert not torch.equal(big, dare_keep_mask((1000, 1000), drop_rate, 0, 1, "w"))
        assert not torch.equal(big, dare_keep_mask((1000, 1000), drop_rate, 0, 0, "v"))
    assert dare_keep_mask((4,), 1 - 1e-12, 0, 0, "w").shape == (4,)  # p·2^32 rounding up to 2^32 stays a uint32


@pytest.mark.parametrize("drop_rate", [0.3, 0.7, 0.9])
def test_dare_masks_look_like_independent_coin_flips(drop_rate):
    """What a counter-based generator could get wrong, each within 5 standard errors of
    independent Bernoulli(1 − p) draws: entries next to each other (i, i + 1), entries a row
    apart (i, i + 1024: a weight's column), the kept fraction of each of 64 consecutive blocks,
    and two tasks' masks of one key against each other. (A mask kept where i's own bits pass
    the cutoff, or two tasks sharing one stream, fails every one.)"""
    q, n = 1 - drop_rate, 2**22
    mask = dare_keep_mask((n,), drop_rate, 0, 0, "layer.weight").bool().numpy()
    other = dare_keep_mask((n,), drop_rate, 0, 1, "layer.weight").bool().numpy()

    def close(observed: float, expected: float, count: int) -> bool:
        return abs(observed - expected) < 5 * math.sqrt(expected * (1 - expected) / count)

    assert close(mask.mean(), q, n)
    for lag in (1, 1024):
        assert close((mask[lag:] & mask[:-lag]).mean(), q * q, n - lag), lag
    blocks = mask.reshape(64, -1).mean(axis=1)  # a slow drift along the counter
    assert all(close(b, q, n // 64) for b in blocks)
    assert close((mask & other).mean(), q * q, n)


def test_dare_mask_off_the_cpu_is_drawn_there_with_the_same_bits(monkeypatch):
    """Where the fused loops cannot run (a GPU, bfloat16), the mask is hashed with torch's
    operations on the tensor's device: the same 32-bit draws as the numpy reference, up to the
    counter's last value (products near 2^64 would overflow int64; the split ones do not). No
    GPU here: the torch code runs on the CPU for the bits, and on "meta" for where it runs."""
    D = importlib.import_module("lib.merging.dare")  # the module: lib.merging.dare is also a function

    for offset, count in [(0, 5000), (123457, 4096), (2**32 - 4096, 4096)]:
        numpy_draws, cutoff = D._keep_draws(count, 0.7, 3, 1, "layer.weight", offset)
        torch_draws, torch_cutoff = D._keep_draws_on(torch.device("cpu"), count, 0.7, 3, 1, "layer.weight", offset)
        assert torch_draws.dtype == torch.int64 and cutoff == torch_cutoff
        assert np.array_equal(torch_draws.numpy(), numpy_draws.astype(np.int64)), offset

    def no_cpu_draws(*args, **kwargs):
        raise AssertionError("the mask of a tensor off the CPU was drawn on the CPU")

    monkeypatch.setattr(D, "_keep_draws", no_cpu_draws)
    theta0 = torch.zeros(6, 5, device="meta")
    assert D.dare_keep_mask((6, 5), 0.5, 0, 0, "w", device="meta").device.type == "meta"
    assert D.dare_tensor(theta0, theta0, 0.5, 0, 0, "w").device.type == "meta"


def test_dare_refuses_a_tensor_past_its_32_bit_counter():
    with pytest.raises(ValueError, match="32 bits.*'huge'"):
        _dare_mask(10, 0.5, 0, 0, "huge", offset=2**32 - 5)
    _dare_mask(5, 0.5, 0, 0, "huge", offset=2**32 - 5)  # the last entry the counter numbers


def test_finite_check_by_sum_catches_nan_and_inf_and_allows_overflowing_sums():
    big = torch.full((10,), 3e38)  # finite entries whose sum overflows to inf
    _common._check_finite({"w": big}, "model")
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.ones(10)
        x[3] = bad
        with pytest.raises(ValueError, match=r"model\['w'\] has 1 (NaN|Inf)"):
            _common._check_finite({"w": x}, "model")


# ----------------------------------------------------------------------------- memory


def _instrument_reads(monkeypatch):
    """Count the tensors ``read`` returns that are still alive, and the most at once; with
    the sample's ``read_flat`` runs (a few small pieces at a time), their bytes."""
    state = {"alive": 0, "alive_bytes": 0, "max": 0, "max_bytes": 0, "reads": 0}

    def track(fn):
        counted = fn is S.SafetensorsReader.read

        def wrapper(self, *args):
            out = fn(self, *args)
            nbytes = out.numel() * out.element_size()
            state["alive"] += counted
            state["alive_bytes"] += nbytes
            state["reads"] += 1
            state["largest"] = max(state.get("largest", 0), nbytes)
            state["max"] = max(state["max"], state["alive"])
            state["max_bytes"] = max(state["max_bytes"], state["alive_bytes"])

            def freed():
                state["alive"] -= counted
                state["alive_bytes"] -= nbytes
            weakref.finalize(out, freed)
            return out
        return wrapper

    monkeypatch.setattr(S.SafetensorsReader, "read", track(S.SafetensorsReader.read))
    monkeypatch.setattr(S.SafetensorsReader, "read_flat", track(S.SafetensorsReader.read_flat))
    return state


def _forbid_whole_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a streaming merge loaded a whole file")
    import safetensors
    import safetensors.torch
    for module, name in [(safetensors.torch, "load_file"), (safetensors.torch, "load"), (safetensors, "safe_open"),
                         (torch, "load")]:
        monkeypatch.setattr(module, name, refuse)


HELD_CASES = [("weight_average", {}), ("task_arithmetic", {"scale": 0.3}), ("ties", {"scale": 0.3}),
              ("ties", {"scale": 0.3, "_sample": False, "_capacity": 4}), ("dare_ta", {"scale": 0.3}),
              ("dare_ties", {"scale": 0.3}), ("fisher", {}), ("regmean", {"ridge": 0.1})]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("method,hyper", HELD_CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(HELD_CASES)])
def test_tensors_held_do_not_grow_with_the_number_of_experts(tmp_path, monkeypatch, method, hyper, workers):
    held = {}
    for n_experts in (2, 6):
        theta0, experts = random_models(n_experts, seed=n_experts)
        fishers, grams, counts = statistics(experts)
        folder = tmp_path / str(n_experts)
        folder.mkdir()
        paths = {"pretrained": write(folder, "t0", theta0),
                 "finetuned": [write(folder, f"e{t}", e) for t, e in enumerate(experts)],
                 "fisher": [write(folder, f"f{t}", f) for t, f in enumerate(fishers)],
                 "gram": [write(folder, f"g{t}", g) for t, g in enumerate(grams)], "gram_counts": counts}
        with monkeypatch.context() as patch:
            state = _instrument_reads(patch)
            _forbid_whole_model_loads(patch)
            for key, tensor in S.stream_merge(method, paths["pretrained"], paths["finetuned"],
                                              file_stats(method, paths, hyper), workers=workers, **hyper):
                del tensor
        assert state["reads"] > 0 and state["alive"] == 0
        held[n_experts] = (state["max"], state["max_bytes"], state["largest"])
    # At most θ0 and the expert being folded in (an expert and its statistic for Fisher; for
    # RegMean, the first expert's weight, which the others are measured from, and the expert being
    # folded in with its Gram), whether 2 experts are merged or 6; as many per worker where the
    # workers merge pieces at once (every method but Fisher and RegMean, which work a key at a time).
    most = 3 if method == "regmean" else 2
    per_worker = 1 if method in ("fisher", "regmean") else workers
    if workers == 1:
        assert held[6][0] == held[2][0] <= most, held
    assert held[6][0] <= most and held[2][0] <= most, held
    for n in (2, 6):
        assert held[n][1] <= most * per_worker * held[n][2], held


_RSS_SCRIPT = textwrap.dedent("""
    import ctypes, gc, json, sys, torch
    from pathlib import Path
    from safetensors.torch import save_file
    from lib.merging.streaming import merge_to_file, read_inputs
    torch.set_num_threads(1)
    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024
    folder = Path(sys.argv[1])
    results = {}
    for keys, experts in ((4, 2), (16, 2), (16, 8)):
        sub = folder / f"{keys}_{experts}"
        sub.mkdir()
        g = torch.Generator().manual_seed(0)
        theta0 = {f"layer{i}.weight": torch.randn(512, 512, generator=g) for i in range(keys)}  # 1 MiB each
        save_file(theta0, sub / "t0.safetensors")
        for t in range(experts):
            save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in theta0.items()},
                      sub / f"e{t}.safetensors")
        del theta0
        paths = [sub / f"e{t}.safetensors" for t in range(experts)]
        merge_to_file("ties", sub / "t0.safetensors", paths, sub / "warm.safetensors", scale=0.3)  # first-use costs
        for method in ("ties", "task_arithmetic"):
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back to the OS, so reusing it shows
            open("/proc/self/clear_refs", "w").write("5")  # reset the resident set's high-water mark
            start = status("VmRSS")
            merge_to_file(method, sub / "t0.safetensors", paths, sub / "out.safetensors", scale=0.3)
            results[f"{method} {keys} keys, {experts} experts"] = status("VmHWM") - start
    print(json.dumps(results))
""")


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_peak_memory_does_not_grow_with_the_number_or_size_of_the_models(tmp_path):
    """In a fresh process: merging 8 experts of 16 MiB (1 MiB per tensor) costs about the
    resident memory that merging 2 experts of 4 MiB does: some 4 (Task Arithmetic) to 11 MiB
    (TIES: the tensors of one key, the selection's sample and bracket), not the 144 MiB of
    inputs, nor the ~50 MiB of streaming whole models one at a time.

    glibc's malloc raises its mmap threshold as large blocks are freed, after which freed
    memory stays resident by chance: that made the same run read 10 to 24 MiB. A fixed
    threshold (MALLOC_MMAP_THRESHOLD_) returns every large block when freed, so the resident
    set follows what the merge holds, to within ~1 MiB from run to run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    done = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    peak = json.loads(done.stdout.strip().splitlines()[-1])
    for method in ("ties", "task_arithmetic"):
        small, large = peak[f"{method} 4 keys, 2 experts"], peak[f"{method} 16 keys, 8 experts"]
        assert large < 16, peak  # MiB: one model of the large case is 16 MiB
        assert large < small + 3, peak  # no growth beyond noise (~1 MiB) with 4× the keys and 4× the experts


# ------------------------------------------------------------------ files and errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                                   torch.int32, torch.uint8, torch.bool])
def test_reader_returns_the_bytes_safetensors_stores(tmp_path, dtype):
    g = torch.Generator().manual_seed(6)
    sd = {"matrix": (torch.randn(5, 7, generator=g) * 10).to(dtype), "scalar": torch.tensor(3).to(dtype),
          "empty": torch.zeros(0, 4, dtype=dtype), "vector": (torch.randn(9, generator=g) * 10).to(dtype)}
    path = write(tmp_path, "m", sd)
    expected = load_file(path)
    with S.SafetensorsReader(path) as reader:
        assert set(reader.keys) == set(sd)
        for k in sd:
            assert reader.layout[k].shape == sd[k].shape and reader.layout[k].dtype == dtype
            assert reader.layout[k].device.type == "meta"
            assert torch.equal(bits(reader.read(k)), bits(expected[k]))
        assert torch.equal(reader.read_flat("matrix", 9, 12), expected["matrix"].reshape(-1)[9:21])
        with pytest.raises(IndexError):
            reader.read_flat("matrix", 30, 6)
        with pytest.raises(KeyError, match="nope"):
            reader.read("nope")
    for workers in (1, 3):
        assert S.read_inputs([path, path], workers) == 2 * sum(v.numel() * v.element_size() for v in sd.values())


def test_each_key_asks_the_disk_for_the_next_one_in_every_file(tmp_path, monkeypatch):
    """The read-ahead hint covers exactly the next key's bytes, in every file, as the current key
    is handed out; a hint only, so results are unchanged (the bit-for-bit tests run with it)."""
    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise on this platform: prefetch does nothing")
    theta0, experts = random_models(2)
    paths = [write(tmp_path, "t0", theta0)] + [write(tmp_path, f"e{t}", e) for t, e in enumerate(experts)]
    hints = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: hints.append(
        (os.readlink(f"/proc/self/fd/{fd}"), offset, length, advice)))
    inputs = S._open_inputs("task_arithmetic", paths[0], paths[1:], None, {})
    try:
        keys = inputs.pretrained.keys
        handed = []
        for key in inputs.keys_ahead(keys):
            handed.append(key)
            hinted_now = {h[0] for h in hints[-3:]}
            if len(handed) < len(keys):  # every key here has data: each file was told of the next one
                assert len(hints) == 3 * len(handed) and hinted_now == {str(Path(p).resolve()) for p in paths}
        assert handed == keys and len(hints) == 3 * (len(keys) - 1)
    finally:
        inputs.close()
    assert {h[3] for h in hints} == {os.POSIX_FADV_WILLNEED}
    for path in paths:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        offsets = {k: header[k]["data_offsets"] for k in keys}
        assert [(h[1], h[2]) for h in hints if h[0] == str(Path(path).resolve())] == [
            (8 + n + offsets[k][0], offsets[k][1] - offsets[k][0]) for k in keys[1:]]


def test_ties_sample_asks_the_disk_for_every_run_before_reading_any(tmp_path, monkeypatch):
    """The sample's small reads are all hinted (WILLNEED) first, so the disk serves them at once
    rather than one waited-for read after another; each read lies inside a hinted range."""
    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise on this platform: prefetch does nothing")
    g = torch.Generator().manual_seed(0)
    models = [{"big": torch.randn(40_000, generator=g), "small": torch.randn(300, generator=g)} for _ in range(3)]
    paths = [write(tmp_path, f"m{i}", m) for i, m in enumerate(models)]
    events = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: events.append(
        ("hint", os.readlink(f"/proc/self/fd/{fd}"), offset, length)))
    read_into = S.SafetensorsReader._read_into

    def recorded(reader, out, offset):
        events.append(("read", str(Path(reader.path).resolve()), reader._data_start + offset, out.numel() * out.element_size()))
        return read_into(reader, out, offset)

    monkeypatch.setattr(S.SafetensorsReader, "_read_into", recorded)
    inputs = S._open_inputs("ties", paths[0], paths[1:], None, {})
    try:
        brackets = S._sampled_brackets(inputs, ["big", "small"], 40_300, 8_000, S._TaskVectors(), torch.float32, 0.01)
    finally:
        inputs.close()
    assert len(brackets) == 2
    kinds = [e[0] for e in events]
    first_read = kinds.index("read")
    assert "hint" not in kinds[first_read:] and first_read > 3  # every hint before the first read
    hints = events[:first_read]
    for _, path, offset, nbytes in events[first_read:]:
        assert any(h[1] == path and h[2] <= offset and offset + nbytes <= h[2] + h[3] for h in hints), (path, offset)


def test_writer_streams_a_valid_file_and_refuses_a_wrong_order(tmp_path):
    sd = {"b": torch.randn(3, 2), "a": torch.arange(5), "c": torch.randn(4).to(torch.bfloat16)}
    layout = {k: v.to("meta") for k, v in sd.items()}
    path = S.write_safetensors(tmp_path / "out.safetensors", iter(sd.items()), layout, {"note": "x"})
    back = load_file(path)
    assert_same_bits(back, sd)
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"note": "x"}
    with pytest.raises(ValueError, match="layout's next entry"):
        S.write_safetensors(tmp_path / "bad.safetensors", [("a", sd["a"]), ("b", sd["b"])], layout)
    with pytest.raises(ValueError, match="ended before"):
        S.write_safetensors(tmp_path / "bad.safetensors", [("b", sd["b"])], layout)
    assert not (tmp_path / "bad.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]  # no temporary left behind


def test_reader_rejects_damaged_files(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x05\x00")
    with pytest.raises(ValueError, match="not a safetensors file"):
        S.SafetensorsReader(path)
    path.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="not a safetensors file"):
        S.SafetensorsReader(path)
    good = write(tmp_path, "good", {"w": torch.randn(100)})
    data = good.read_bytes()
    path.write_bytes(data[:-40])  # truncated: the header promises more data than there is
    with pytest.raises(ValueError, match="damaged"):
        S.SafetensorsReader(path)


def test_layouts_are_checked_before_any_tensor_is_read(tmp_path, monkeypatch):
    theta0, experts = random_models(2)
    experts[1]["enc.weight"] = torch.randn(12, 9)
    paths = [write(tmp_path, f"e{t}", e) for t, e in enumerate(experts)]
    state = _instrument_reads(monkeypatch)
    with pytest.raises(ValueError, match="enc.weight"):
        S.stream_merge("task_arithmetic", write(tmp_path, "t0", theta0), paths, scale=0.3)
    del experts[1]["enc.weight"]
    with pytest.raises(ValueError, match="different keys"):
        S.stream_merge("weight_average", None, [paths[0], write(tmp_path, "e1", experts[1])])
    assert state["reads"] == 0


def test_a_nan_names_the_file_and_key_and_leaves_no_output(tmp_path):
    theta0, experts = random_models(2)
    experts[1]["dec.bias"][2] = float("nan")
    paths = [write(tmp_path, f"e{t}", e) for t, e in enumerate(experts)]
    out = tmp_path / "merged.safetensors"
    for method, hyper in [("ties", {"scale": 0.3}), ("task_arithmetic", {"scale": 0.3}), ("weight_average", {})]:
        for workers in (1, 2):
            with pytest.raises(ValueError, match=r"finetuned\[1\] \(.*e1.safetensors\)\['dec.bias'\] has 1 NaN"):
                S.merge_to_file(method, write(tmp_path, "t0", theta0), paths, out, workers=workers, **hyper)
            assert not out.exists() and not _merge_threads()


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_fisher_and_regmean_compute_on_the_device_asked_for(files, monkeypatch, method):
    """``device`` sends each key's tensors to that device for the arithmetic, and the merged
    tensor comes back to the CPU. No GPU here: "meta" stands in (its tensors have shapes, no
    values), with the per-key merge replaced by one that records where its inputs are; on
    the CPU, asking for it changes no bit."""
    paths, memory = files
    stats = file_stats(method, paths, {})
    expected = M.REGISTRY[method](None, memory["finetuned"], memory["stats"])
    with S.stream_merge(method, None, paths["finetuned"], stats, device="cpu") as merged:
        assert_same_bits(dict(merged), expected)
    devices = []
    name = "_fisher" if method == "fisher" else "regmean_weight"

    def where_its_inputs_are(weights, statistic, *rest):
        weights, statistic = list(weights), list(statistic)
        devices.append({t.device.type for t in weights + statistic})
        return torch.zeros(weights[0].shape, dtype=weights[0].dtype)

    monkeypatch.setattr(S, name, where_its_inputs_are)
    with S.stream_merge(method, None, paths["finetuned"], stats, device="meta") as merged:
        out = dict(merged)
    assert devices and all(d == {"meta"} for d in devices)  # every key with a statistic went there
    assert all(t.device.type == "cpu" for t in out.values())
    with pytest.raises(ValueError, match="only \\['fisher', 'regmean'\\] run on another device"):
        S.stream_merge("ties", paths["pretrained"], paths["finetuned"], scale=0.3, device="cuda")


def test_arguments_are_checked_like_the_registry(files):
    paths, _ = files
    p0, ft = paths["pretrained"], paths["finetuned"]
    with pytest.raises(ValueError, match="does not stream"):
        S.stream_merge("slerp", p0, ft)
    with pytest.raises(ValueError, match=r"pass \['scale'\]"):
        S.stream_merge("ties", p0, ft)
    with pytest.raises(ValueError, match="no hyper-parameter"):
        S.stream_merge("ties", p0, ft, scale=0.3, densty=0.2)
    with pytest.raises(ValueError, match="density"):
        S.stream_merge("ties", p0, ft, scale=0.3, density=1.5)
    with pytest.raises(ValueError, match="drop_rate"):
        S.stream_merge("dare_ta", p0, ft, scale=0.3, drop_rate=1.0)
    with pytest.raises(ValueError, match="not finite"):
        S.stream_merge("task_arithmetic", p0, ft, scale=float("nan"))
    with pytest.raises(ValueError, match="needs the pretrained"):
        S.stream_merge("task_arithmetic", None, ft, scale=0.3)
    with pytest.raises(ValueError, match=r"needs the statistics \['fisher'\]"):
        S.stream_merge("fisher", None, ft)
    with pytest.raises(ValueError, match="gram_counts"):
        S.stream_merge("regmean", None, ft, {"gram": paths["gram"]})
    with pytest.raises(ValueError, match="has no entry for 'dec.weight'"):
        S.stream_merge("regmean", None, ft, {"gram": paths["gram"], "gram_counts": [{"enc.weight": 3}] * 6})
    with pytest.raises(ValueError, match="buffers names keys"):
        S.stream_merge("ties", p0, ft, scale=0.3, buffers=["bn.nope"])
    with pytest.raises(ValueError, match="2 Fisher files for 6 models"):
        S.stream_merge("fisher", None, ft, {"fisher": paths["fisher"][:2]})
