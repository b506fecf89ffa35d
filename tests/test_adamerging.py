"""AdaMerging, AdaMerging++ and Representation Surgery (lib.merging.adamerging, lib.merging.surgery).

Tiny models only: a two-layer MLP with BatchNorm (so the buffer rule is exercised) and a linear
toy problem whose best coefficients are known.
"""
from __future__ import annotations

import gc
import warnings

import pytest
import torch
import torch.nn as nn

from lib import merging
from lib.merging.adamerging import entropy_objective, learned_keys, merged_state
from lib.merging.surgery import apply_surgery, frozen_features, init_adapter, surgery_loss, train_surgery

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyEncoder(nn.Module):
    def __init__(self, d_in=4, d=6):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d)
        self.bn = nn.BatchNorm1d(d)
        self.fc2 = nn.Linear(d, d)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def tiny_setup(num_tasks=3, dtype=torch.float32, seed=0):
    """(model, θ0, experts, heads, batches): experts differ from θ0 in every float key, buffers included."""
    g = torch.Generator().manual_seed(seed)
    model = TinyEncoder().to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    experts = []
    for _ in range(num_tasks):
        expert = {}
        for k, v in pretrained.items():
            if k.endswith("running_var"):
                expert[k] = v * torch.rand(v.shape, generator=g, dtype=dtype).add(0.5)
            elif torch.is_floating_point(v):
                expert[k] = v + 0.3 * torch.randn(v.shape, generator=g, dtype=dtype)
            else:
                expert[k] = v + 7  # num_batches_tracked: never merged
        experts.append(expert)
    heads = {t: nn.Linear(6, 3).to(dtype) for t in range(num_tasks)}
    batches = {t: {"x": torch.randn(5, 4, generator=g, dtype=dtype)} for t in range(num_tasks)}
    return model, pretrained, experts, heads, batches


def clone(obj):
    if torch.is_tensor(obj):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clone(v) for v in obj]
    return obj


def assert_same(a, b):
    if torch.is_tensor(a):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    else:
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)


# ------------------------------------------------------------------------------ merged_state


@pytest.mark.parametrize("layerwise", [False, True])
def test_constant_coefficients_equal_task_arithmetic(layerwise):
    _, pretrained, experts, _, _ = tiny_setup()
    taus = merging.task_vectors(pretrained, experts)
    K = len(learned_keys(pretrained, taus))
    lam = torch.full((3, K) if layerwise else (3,), 0.4)
    merged = merged_state(pretrained, taus, lam)
    expected = merging.task_arithmetic(pretrained, experts, 0.4)
    assert list(merged) == list(expected)
    for k in expected:  # buffers averaged, num_batches_tracked θ0's, the rest θ0 + 0.4·Στ
        torch.testing.assert_close(merged[k], expected[k], rtol=0, atol=1e-6)


def test_layerwise_columns_follow_pretrained_order_and_buffers_get_no_coefficient():
    _, pretrained, experts, _, _ = tiny_setup(num_tasks=2)
    taus = merging.task_vectors(pretrained, experts)
    keys = learned_keys(pretrained, taus)
    assert keys == ["fc1.weight", "fc1.bias", "bn.weight", "bn.bias", "fc2.weight", "fc2.bias"]
    lam = torch.rand(2, len(keys))
    merged = merged_state(pretrained, taus, lam)
    for j, k in enumerate(keys):
        torch.testing.assert_close(merged[k], pretrained[k] + lam[0, j] * taus[0][k] + lam[1, j] * taus[1][k])
    for k in ("bn.running_mean", "bn.running_var"):
        torch.testing.assert_close(merged[k], (experts[0][k] + experts[1][k]) / 2)
    assert merged["bn.num_batches_tracked"] is pretrained["bn.num_batches_tracked"]
    with pytest.raises(ValueError, match="coefficients have shape"):
        merged_state(pretrained, taus, torch.rand(len(keys), 2))


def test_keys_missing_from_the_task_vectors_pass_through():
    _, pretrained, experts, _, _ = tiny_setup(num_tasks=2)
    taus = [{k: v for k, v in tau.items() if not k.startswith("fc2")} for tau in merging.task_vectors(pretrained, experts)]
    merged = merged_state(pretrained, taus, torch.full((2, 4), 0.5))
    assert merged["fc2.weight"] is pretrained["fc2.weight"]
    assert not torch.equal(merged["fc1.weight"], pretrained["fc1.weight"])


def test_adamerging_pp_vectors_merge_to_ties_with_disjoint_sum():
    _, pretrained, experts, _, _ = tiny_setup()
    taus = merging.ties_task_vectors(pretrained, experts, density=0.2)
    merged = merged_state(pretrained, taus, torch.full((3,), 0.6))
    expected = merging.ties_merging(pretrained, experts, density=0.2, scale=0.6, disjoint="sum")
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k], rtol=0, atol=1e-6)
    # trimmed: each task keeps at most ~20% of its non-buffer entries, all agreeing with the elected sign
    keys = learned_keys(pretrained, taus)
    n = sum(pretrained[k].numel() for k in keys)
    for tau in taus:
        assert sum(int(tau[k].count_nonzero()) for k in keys) <= round(0.2 * n)


# ---------------------------------------------------------------------------- gradients, clamp


def loss_at(model, pretrained, taus, heads, batches, lam, clamp=True):
    return entropy_objective(model, heads, merged_state(pretrained, taus, lam, clamp), batches)[0]


def test_gradient_is_inner_product_with_task_vector_and_matches_finite_differences():
    model, pretrained, experts, heads, batches = tiny_setup(num_tasks=2, dtype=torch.float64)
    model.eval()
    taus = merging.task_vectors(pretrained, experts)
    keys = learned_keys(pretrained, taus)
    lam = (0.1 + 0.8 * torch.rand(2, len(keys), dtype=torch.float64)).requires_grad_()
    (grad,) = torch.autograd.grad(loss_at(model, pretrained, taus, heads, batches, lam), lam)

    # ∂L/∂λt,k = ⟨∂L/∂θk, τt,k⟩ at θ(λ)
    theta = {k: v.detach().requires_grad_(k in keys) for k, v in merged_state(pretrained, taus, lam).items()}
    loss = entropy_objective(model, heads, theta, batches)[0]
    g_theta = dict(zip(keys, torch.autograd.grad(loss, [theta[k] for k in keys])))
    inner = torch.tensor([[float((g_theta[k] * tau[k]).sum()) for k in keys] for tau in taus], dtype=torch.float64)
    torch.testing.assert_close(grad, inner, rtol=1e-9, atol=1e-12)

    # central finite differences, every coefficient
    eps = 1e-6
    fd = torch.zeros_like(grad)
    with torch.no_grad():
        for t in range(2):
            for j in range(len(keys)):
                up, down = lam.detach().clone(), lam.detach().clone()
                up[t, j] += eps
                down[t, j] -= eps
                fd[t, j] = (loss_at(model, pretrained, taus, heads, batches, up)
                            - loss_at(model, pretrained, taus, heads, batches, down)) / (2 * eps)
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-7)
    assert grad.abs().min() > 0  # every coefficient matters here, so the check is not vacuous


def test_coefficients_outside_unit_interval_act_clamped_with_zero_gradient():
    model, pretrained, experts, heads, batches = tiny_setup(num_tasks=3)
    model.eval()
    taus = merging.task_vectors(pretrained, experts)
    lam = torch.tensor([1.7, -0.5, 0.4], requires_grad=True)
    clamped = merged_state(pretrained, taus, lam)
    inside = merged_state(pretrained, taus, torch.tensor([1.0, 0.0, 0.4]))
    for k in inside:
        torch.testing.assert_close(clamped[k], inside[k])
    unclamped = merged_state(pretrained, taus, lam.detach(), clamp=False)
    assert not torch.allclose(unclamped["fc1.weight"], inside["fc1.weight"])
    (grad,) = torch.autograd.grad(loss_at(model, pretrained, taus, heads, batches, lam), lam)
    assert grad[0] == 0 and grad[1] == 0  # outside [0, 1]: no gradient (the authors' clamp)
    assert grad[2] != 0


# ------------------------------------------------------------------------------ the adaptation


def toy_problem():
    """Two tasks on orthogonal input axes; task t's expert makes head t confident (and right) on
    task t's inputs, θ0 = 0 is uniform, and a third "harmful" τ shrinks both tasks' features.
    The entropy-minimising mix within [0, 1]³ is (1, 1, 0)."""
    model = nn.Linear(3, 3)
    pretrained = {"weight": torch.zeros(3, 3), "bias": torch.zeros(3)}
    e = torch.eye(3)
    tau1 = {"weight": 3 * torch.outer(e[0], e[0]), "bias": torch.zeros(3)}
    tau2 = {"weight": 3 * torch.outer(e[1], e[1]), "bias": torch.zeros(3)}
    tau3 = {k: -0.5 * (tau1[k] + tau2[k]) for k in tau1}
    heads = {}
    for t in range(2):
        head = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            head.weight.copy_(torch.stack([e[t], -e[t]]))
        heads[t] = head
    g = torch.Generator().manual_seed(0)

    def batches(step):
        out = {}
        for t in range(2):
            x = torch.zeros(16, 3)
            x[:, t] = torch.randn(16, generator=g).sign() * (0.5 + torch.rand(16, generator=g))
            x[:, 2] = torch.randn(16, generator=g)  # a nuisance axis no τ reads
            out[t] = [{"input": x[:8]}, {"input": x[8:]}]  # 2 batches per task, as the authors draw
        return out

    return model, pretrained, [tau1, tau2, tau3], heads, batches


@pytest.mark.parametrize("layerwise", [False, True])
def test_entropy_minimisation_finds_the_known_mix(layerwise):
    model, pretrained, taus, heads, batches = toy_problem()
    result = merging.adamerge(model, pretrained, taus, heads, batches, steps=120, lr=0.02, layerwise=layerwise)
    lam = result.coefficients
    if layerwise:
        assert result.keys == ["weight", "bias"]
        assert torch.equal(lam[:, 1], torch.full((3,), 0.3))  # τ = 0 on the bias: no gradient, stays at 0.3
        lam = lam[:, 0]
    assert lam[0] > 0.95 and lam[1] > 0.95 and lam[2] < 0.05, lam
    losses = [r["loss"] for r in result.history]
    assert losses[-1] < 0.5 * losses[0]


def test_without_frozen_drops_keys_no_expert_changed():
    _, _, taus, _, _ = toy_problem()
    assert [list(t) for t in merging.without_frozen(taus)] == [["weight"]] * 3


@pytest.mark.parametrize("drop_buffers", [False, True])
def test_adaptation_and_surgery_leave_every_input_unmodified(drop_buffers):
    model, pretrained, experts, heads, batches = tiny_setup(num_tasks=2)
    model.train()  # adamerge must run it in eval mode and restore the flag
    taus = merging.task_vectors(pretrained, experts)
    if drop_buffers:  # then θ0's own running statistics are the ones the model reads
        taus = [{k: v for k, v in tau.items() if "running" not in k} for tau in taus]
    pp_taus = merging.ties_task_vectors(pretrained, experts)
    snapshot = clone([pretrained, experts, taus, pp_taus, model.state_dict(),
                      [h.state_dict() for h in heads.values()], batches])

    result = merging.adamerge(model, pretrained, taus, heads, lambda s: batches, steps=4, lr=0.05,
                              callback=lambda step, params, lam: {"n": float(len(params))})
    merging.adamerge(model, pretrained, pp_taus, heads, iter([batches] * 3), steps=3, layerwise=False)
    merged = merged_state(pretrained, taus, result.coefficients)
    train_surgery(frozen_features(model, merged), frozen_features(model, dict(enumerate(experts))),
                  lambda s: batches, steps=3)

    assert_same(snapshot, [pretrained, experts, taus, pp_taus, model.state_dict(),
                           [h.state_dict() for h in heads.values()], batches])
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is None for h in heads.values() for p in h.parameters())


def test_batch_statistics_normalise_each_batch_and_update_nothing():
    from lib.functional import batch_statistics, functional_forward

    model, pretrained, _, _, batches = tiny_setup()
    model.train()
    x = batches[0]["x"]
    stored = {k: v.clone() for k, v in pretrained.items()}
    with batch_statistics(model):
        got = functional_forward(model, pretrained, {"x": x})
        assert not model.fc1.training and model.bn.training  # only BatchNorm in train mode
    h = model.fc1(x)
    by_hand = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + model.bn.eps) * model.bn.weight + model.bn.bias
    torch.testing.assert_close(got, model.fc2(torch.relu(by_hand)))
    assert_same(stored, pretrained)                       # running statistics untouched
    assert model.training and model.bn.track_running_stats  # flags restored


def test_adamerge_with_batch_statistics_differs_and_leaves_inputs_unmodified():
    model, pretrained, experts, heads, batches = tiny_setup()
    taus = merging.task_vectors(pretrained, experts)
    snapshot = clone([pretrained, taus, model.state_dict()])
    stored = merging.adamerge(model, pretrained, taus, heads, lambda s: batches, steps=3, lr=0.05)
    batch = merging.adamerge(model, pretrained, taus, heads, lambda s: batches, steps=3, lr=0.05, batchnorm="batch")
    assert_same(snapshot, [pretrained, taus, model.state_dict()])
    assert not torch.allclose(stored.coefficients, batch.coefficients)  # BatchNorm read other statistics
    with pytest.raises(ValueError, match="batchnorm"):
        merging.adamerge(model, pretrained, taus, heads, lambda s: batches, steps=1, batchnorm="train")


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on torch's deprecated module aliases warns
        warnings.simplefilter("ignore", FutureWarning)
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.parametrize("per_batch_backward", [False, True])
def test_nothing_accumulates_over_steps(per_batch_backward):
    model, pretrained, experts, heads, batches = tiny_setup(num_tasks=2)
    taus = merging.task_vectors(pretrained, experts)
    counts = []
    result = merging.adamerge(model, pretrained, taus, heads, lambda s: batches, steps=12,
                              callback=lambda step, params, lam: counts.append(_live_tensors()),
                              per_batch_backward=per_batch_backward)
    assert len(set(counts[2:])) == 1, counts  # after Adam's state exists, the same tensors every step
    for record in result.history:
        assert isinstance(record["loss"], float)
        assert all(isinstance(h, float) for h in record["entropy"].values())
    assert not result.coefficients.requires_grad


# ------------------------------------------------------------------- one backward per batch


def two_batches_per_task(num_tasks=3, rows=5, dtype=torch.float64):
    model, pretrained, experts, heads, _ = tiny_setup(num_tasks=num_tasks, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    batches = {t: [{"x": torch.randn(rows, 4, generator=g, dtype=dtype)} for _ in range(2)] for t in range(num_tasks)}
    return model.eval(), pretrained, merging.task_vectors(pretrained, experts), heads, batches


@pytest.mark.parametrize("layerwise", [False, True])
def test_per_batch_backward_gives_the_joint_gradient(layerwise):
    model, pretrained, taus, heads, batches = two_batches_per_task()
    adapted = {t: batches[t] for t in (0, 2)}  # adapting on some tasks only: task 1's τ still merged
    keys = learned_keys(pretrained, taus)
    start = 0.1 + 0.8 * torch.rand((3, len(keys)) if layerwise else (3,), dtype=torch.float64)
    grads, losses = [], []
    for per_batch in (False, True):
        lam = start.clone().requires_grad_()
        params = merged_state(pretrained, taus, lam)
        if per_batch:
            loss, per_task = merging.entropy_backward_per_batch(model, heads, params, adapted)
        else:
            loss, per_task = entropy_objective(model, heads, params, adapted)
            loss.backward()
        grads.append(lam.grad)
        losses.append((float(loss.detach()), {t: float(h) for t, h in per_task.items()}))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-15)
    assert grads[0].abs().min() > 0  # task 1's coefficients matter too (its τ is in θ), so nothing is vacuous
    assert losses[1][0] == pytest.approx(losses[0][0], rel=1e-12)
    assert losses[1][1] == pytest.approx(losses[0][1], rel=1e-12)


def test_adamerge_with_per_batch_backward_follows_the_same_path():
    model, pretrained, taus, heads, batches = two_batches_per_task()
    runs = [merging.adamerge(model, pretrained, taus, heads, lambda s: batches, steps=6, lr=0.05,
                             per_batch_backward=per_batch) for per_batch in (False, True)]
    torch.testing.assert_close(runs[1].coefficients, runs[0].coefficients, rtol=1e-10, atol=1e-12)
    assert [r["loss"] for r in runs[1].history] == pytest.approx([r["loss"] for r in runs[0].history], rel=1e-10)
    assert not torch.equal(runs[0].coefficients, torch.full_like(runs[0].coefficients, merging.adamerging.INIT))


class SavedBytes:
    """Bytes of the tensors autograd holds for backward, counted per storage (a weight saved by
    several operations counts once), and their peak: activation memory, on any device."""

    def __init__(self):
        self.live, self.peak = {}, 0

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        nbytes, count = self.live.get(key, (storage.nbytes(), 0))
        self.live[key] = (nbytes, count + 1)
        self.peak = max(self.peak, sum(n for n, _ in self.live.values()))
        return _Saved(self, key, tensor)

    def release(self, key):
        nbytes, count = self.live[key]
        if count == 1:
            del self.live[key]
        else:
            self.live[key] = (nbytes, count - 1)


class _Saved:
    def __init__(self, owner, key, tensor):
        self.owner, self.key, self.tensor = owner, key, tensor

    def __del__(self):  # the graph holding this tensor was freed
        self.owner.release(self.key)


def test_per_batch_backward_holds_one_batchs_activations_at_a_time():
    model, pretrained, taus, heads, batches = two_batches_per_task(rows=400)  # activations ≫ weights
    peaks = []
    for per_batch in (False, True):
        saved = SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda s: s.tensor):
            merging.adamerge(model, pretrained, taus, heads, lambda s: batches, steps=2, per_batch_backward=per_batch)
        gc.collect()
        assert saved.live == {}  # everything saved was freed after the steps
        peaks.append(saved.peak)
    joint, per_batch = peaks
    assert per_batch < joint / 4, peaks  # 6 batches held at once against one (plus the weights)


# -------------------------------------------------------------------------------------- surgery


def test_surgery_with_zero_up_leaves_features_unchanged():
    z = torch.randn(10, 8)
    adapter = init_adapter(8)
    assert adapter["down.weight"].shape == (16, 8) and adapter["up.weight"].shape == (8, 16)
    assert adapter["down.weight"].abs().sum() > 0 and not adapter["up.weight"].any()
    assert torch.equal(apply_surgery(adapter, z), z)
    adapter["up.weight"] = torch.randn(8, 16)
    assert not torch.allclose(apply_surgery(adapter, z), z)


def test_surgery_training_reduces_the_l1_distance():
    g = torch.Generator().manual_seed(0)
    z = {t: torch.randn(64, 8, generator=g) for t in range(2)}
    shift = {t: (torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g)) for t in range(2)}
    target = {t: z[t] - torch.relu(z[t] @ shift[t][0].T) @ shift[t][1].T for t in range(2)}  # representable

    def batches(step):
        idx = torch.randint(0, 64, (32,), generator=g)
        return {t: [{"i": idx[:16]}, {"i": idx[16:]}] for t in range(2)}

    result = train_surgery(lambda t, b: z[t][b["i"]], lambda t, b: target[t][b["i"]], batches,
                           steps=150, lr=1e-2)
    for t in range(2):
        before = float((z[t] - target[t]).abs().mean())
        after = float(surgery_loss(result.adapters[t], z[t], target[t]))
        assert after < 0.3 * before, (t, before, after)
        assert abs(result.history[0]["l1"][t] - before) < 0.35 * before  # starts at the identity
        assert not result.adapters[t]["up.weight"].requires_grad
