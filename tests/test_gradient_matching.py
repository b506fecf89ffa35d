"""The logic of the gradient-matching study (lib/experiments/gradient_matching.py) on tiny inputs."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lib.experiments import gradient_matching as G
from lib import merging
from lib import statistics as S
from lib.experiments.tracks import PreparedSplit, _text_collate


pytestmark = pytest.mark.usefixtures("one_thread")


def rand_state(seed, keys=("encoder.w", "encoder.b", "head.weight", "head.bias"), shape=(3, 4)):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g, dtype=torch.float64) for k in keys}


def rand_hessian(seed, like):
    g = torch.Generator().manual_seed(1000 + seed)
    return {k: torch.rand(v.shape, generator=g, dtype=torch.float64) * 5 + 0.1 for k, v in like.items()}


def assert_states_close(a, b, **kw):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], **kw)


# ----------------------------------------------------------------------------- data removal
def test_uncertainty_weighted_removal_is_plain_subtraction_when_h0_dominates():
    theta0, theta_all, theta_r = rand_state(0), rand_state(1), rand_state(2)
    h0 = {k: torch.full_like(v, 3.0) for k, v in theta0.items()}
    zero = {k: torch.zeros_like(v) for k, v in theta0.items()}
    plain = G.remove_plain(theta_all, theta0, theta_r)
    for k in plain:  # θ_all − (θr − θ0)
        torch.testing.assert_close(plain[k], theta_all[k] - theta_r[k] + theta0[k])
    for correction in (True, False):
        uw = G.remove_uncertainty_weighted(theta_all, theta0, theta_r, h0, [zero, zero], zero, delta=0.0,
                                           hessian_correction=correction)
        assert_states_close(uw, plain)
        # and approximately so when the task Hessians are tiny next to H0
        tiny = {k: 1e-9 * v for k, v in rand_hessian(5, theta0).items()}
        uw = G.remove_uncertainty_weighted(theta_all, theta0, theta_r, h0, [tiny], tiny, hessian_correction=correction)
        assert_states_close(uw, plain, rtol=1e-6, atol=1e-6)


def test_uncertainty_weighted_removal_undoes_a_gradient_matching_merge_exactly():
    theta0 = rand_state(0)
    tasks = [rand_state(s) for s in (1, 2, 3)]
    hs = [rand_hessian(s, theta0) for s in (1, 2, 3)]
    h0 = rand_hessian(0, theta0)
    merged_all = merging.gradient_matching(theta0, tasks, hs, h0, 1.0, delta=1e-12)
    merged_rest = merging.gradient_matching(theta0, tasks[:2], hs[:2], h0, 1.0, delta=1e-12)
    removed = G.remove_uncertainty_weighted(merged_all, theta0, tasks[2], h0, hs[:2], hs[2], delta=1e-12)
    assert_states_close(removed, merged_rest, rtol=1e-9, atol=1e-9)
    # plain subtraction does not, in general
    plain = G.remove_plain(merged_all, theta0, tasks[2])
    assert max(float((plain[k] - merged_rest[k]).abs().max()) for k in plain) > 1e-3


def test_first_order_removal_weights_the_task_vector_between_zero_and_one():
    theta0, theta_all, theta_r = rand_state(0), rand_state(1), rand_state(2)
    h0, h1, hr = rand_hessian(0, theta0), rand_hessian(1, theta0), rand_hessian(2, theta0)
    uw = G.remove_uncertainty_weighted(theta_all, theta0, theta_r, h0, [h1], hr, delta=0.0, hessian_correction=False)
    for k in uw:
        w = (theta_all[k] - uw[k]) / (theta_r[k] - theta0[k])
        torch.testing.assert_close(w, h0[k] / (h0[k] + h1[k]))
        assert (w > 0).all() and (w <= 1).all()


# ----------------------------------------------------------------------------- gradient mismatch
def quadratic_problem(d=4, T=3, seed=0):
    """Summed task losses ℓ̄t(θ) = Nt·½(θ − mt)ᵀAt(θ − mt), prior ℓ̄_0 = ½‖θ − θ0‖²_{H0}: task
    models, the target and Task Arithmetic in closed form."""
    g = torch.Generator().manual_seed(seed)
    H0 = torch.diag(torch.rand(d, generator=g, dtype=torch.float64) + 0.5)
    theta0 = torch.randn(d, generator=g, dtype=torch.float64)
    A, m, N = [], [], {}
    for t in range(T):
        B = torch.randn(d, d, generator=g, dtype=torch.float64)
        A.append(B @ B.T / d + 0.1 * torch.eye(d, dtype=torch.float64))
        m.append(torch.randn(d, generator=g, dtype=torch.float64))
        N[f"t{t}"] = 3 + 2 * t
    mean_grad = lambda t, theta: A[t] @ (theta - m[t])  # ḡt, the mean-loss gradient
    solve = lambda ts: torch.linalg.solve(H0 + sum(N[f"t{t}"] * A[t] for t in ts),
                                          H0 @ theta0 + sum(N[f"t{t}"] * A[t] @ m[t] for t in ts))
    thetas = [solve([t]) for t in range(T)]
    target = solve(range(T))
    ta = theta0 + sum(th - theta0 for th in thetas)
    return H0, theta0, thetas, target, ta, mean_grad, N


def test_mismatch_at_the_target_is_the_papers_task_arithmetic_error():
    # Daheim et al.: θ_{1:T} − θ_TA = −H0⁻¹ Σt [∇ℓ̄t(θ_{1:T}) − ∇ℓ̄t(θt)]
    H0, theta0, thetas, target, ta, mean_grad, N = quadratic_problem()
    at_target = {f"t{t}": {"w": mean_grad(t, target)} for t in range(3)}
    at_tasks = {f"t{t}": {"w": mean_grad(t, thetas[t])} for t in range(3)}
    mismatch = G.gradient_mismatch(at_target, at_tasks, N)
    assert mismatch == pytest.approx(float((H0 @ (target - ta)).norm()), rel=1e-9)
    assert mismatch > 0.1


def test_mismatch_is_zero_when_the_merge_is_the_single_task_model_and_scales_with_alpha():
    _, _, thetas, _, _, mean_grad, N = quadratic_problem(T=1)
    g = {"t0": {"w": mean_grad(0, thetas[0])}}
    assert G.gradient_mismatch(g, g, N) == 0.0
    # one task vector at α = 1 is its own target: Task Arithmetic returns θ1 itself
    other = {"t0": {"w": mean_grad(0, thetas[0] + 0.3)}}
    assert G.gradient_mismatch(other, g, N, alphas={"t0": 2.0}) == pytest.approx(2 * G.gradient_mismatch(other, g, N))


def test_objective_gradient_vanishes_at_the_target_only():
    H0, theta0, thetas, target, ta, mean_grad, N = quadratic_problem()
    sizes = {**N, "base": 1}
    grads = lambda th: {"base": {"w": H0 @ (th - theta0)}, **{f"t{t}": {"w": mean_grad(t, th)} for t in range(3)}}
    assert G.objective_gradient_norm(grads(target), sizes) == pytest.approx(0.0, abs=1e-9)
    assert G.objective_gradient_norm(grads(ta), sizes) > 0.1


# ----------------------------------------------------------------------------- merges of full state dicts
def tiny_models():
    theta0 = rand_state(0, shape=(2, 3))
    tasks = {t: rand_state(i, shape=(2, 3)) for i, t in enumerate(["a", "b"], start=1)}
    models = G.Models(theta0=theta0, tasks=tasks, all_data=rand_state(9, shape=(2, 3)),
                      without=rand_state(8, shape=(2, 3)), removed="b")
    fisher = {n: rand_hessian(i, theta0) for i, n in enumerate(["base", "a", "b"])}
    stats = G.Statistics(fisher=fisher, sizes={"base": 10, "a": 5, "b": 20}, base="base")
    return models, stats


def test_every_merge_merges_the_head_like_any_other_tensor():
    models, stats = tiny_models()
    merged = {
        "ta": G.task_arithmetic(models, ["a", "b"], 1.0),
        "gm": G.gradient_matching(models, stats, ["a", "b"], 1.0),
        "fisher": G.fisher_merging(models, stats, ["a", "b"]),
        "average": G.averaging(models, ["a", "b"]),
    }
    for name, state in merged.items():
        assert set(state) == set(models.theta0), name
        for k in ("head.weight", "head.bias"):
            assert not torch.equal(state[k], models.theta0[k]), (name, k)
    t0, ta, tb = models.theta0["head.weight"], models.tasks["a"]["head.weight"], models.tasks["b"]["head.weight"]
    torch.testing.assert_close(merged["ta"]["head.weight"], ta + tb - t0)
    torch.testing.assert_close(merged["average"]["head.weight"], (t0 + ta + tb) / 3)
    h = {n: stats.hessian(n)["head.weight"] for n in ("base", "a", "b")}
    expected = t0 + ((h["base"] + h["a"]) * (ta - t0) + (h["base"] + h["b"]) * (tb - t0)) / (h["base"] + h["a"] + h["b"])
    torch.testing.assert_close(merged["gm"]["head.weight"], expected)
    assert torch.equal(stats.hessian("b")["head.bias"], 20 * stats.fisher["b"]["head.bias"])


def test_full_state_has_encoder_and_head_keys_and_leaves_frozen_tensors_out():
    expert = G.Expert(encoder={"x.weight": torch.ones(2), "emb.weight": torch.zeros(3)},
                      heads={"mr": {"weight": torch.ones(2, 2), "bias": torch.zeros(2)}})
    state = G.full_state(expert, "mr", frozen=("emb.weight",))
    assert set(state) == {"encoder.x.weight", "head.weight", "head.bias"}
    enc, head = G.split_state(state)
    assert set(enc) == {"x.weight"} and set(head) == {"weight", "bias"}


def test_relative_distance():
    a = {"w": torch.tensor([3.0, 4.0])}
    target = {"w": torch.zeros(2)}
    assert G.relative_distance(a, target, {"w": torch.tensor([0.0, 10.0])}) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- on a tiny BERT "track"
class TinyTrack:
    """Just enough of a TextTrack: a tiny random MiniLM-shaped encoder and random token data."""

    frozen_parameters = ("transformer.embeddings.word_embeddings.weight",)
    seed = 0
    name = "toy"

    def __init__(self):
        import transformers

        from lib.models import load_text_encoder

        config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, vocab_size=50, max_position_embeddings=32)
        torch.manual_seed(0)
        self.encoder, _ = load_text_encoder(config=config)
        rng = np.random.default_rng(0)
        self.splits = {}
        for split, n in (("train", 12), ("validation", 8), ("test", 10)):
            ids = [[101 % 50, *rng.integers(1, 50, rng.integers(2, 9)).tolist()] for _ in range(n)]
            self.splits[split] = PreparedSplit("toy", ids, rng.integers(0, 2, n), _text_collate,
                                               np.array([len(r) for r in ids]))

    def pretrained_encoder(self):
        return copy.deepcopy(self.encoder)

    def identity(self):
        return {"track": "toy-test"}

    def split(self, task, split):
        return self.splits[split]


@pytest.fixture(scope="module")
def toy():
    track = TinyTrack()
    torch.manual_seed(1)
    head = torch.nn.Linear(16, 2)
    expert = G.Expert(encoder={k: v.clone() for k, v in track.encoder.state_dict().items()},
                      heads={"toy": {k: v.detach().clone() for k, v in head.state_dict().items()}})
    return track, G.full_state(expert, "toy", track.frozen_parameters)


def test_mean_nll_gradient_matches_plain_autograd(toy):
    track, state = toy
    grads = G.mean_nll_gradient(track, state, "toy", n_examples=12, batch_size=5)
    assert set(grads) == set(state)
    model = G.classifier(track, state)
    data = track.split("toy", "train")
    batch = data.batch(np.arange(12))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]),
                                             batch["labels"])
    loss.backward()
    params = dict(model.named_parameters())
    for k, g in grads.items():
        torch.testing.assert_close(g, params[k].grad, rtol=1e-4, atol=1e-6)


def test_vmappable_classifier_and_the_timed_methods_agree(toy):
    track, state = toy
    model = G.classifier(track, state)
    wrapped = G.VmappableClassifier(model)
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in model.named_parameters()]
    batch = track.split("toy", "train").batch(np.arange(6))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model.eval()
    torch.testing.assert_close(wrapped(**inputs), model(**inputs))
    batches = list(track.split("toy", "train").subset(8, 0).batches(3))
    table = G.time_sq_grad_methods(wrapped, batches, list(state), vmap_chunks=(2,), peak_flops=1e9)
    assert list(table.index) == [G.LOOP, "vmap over grad (chunks of 2)", "hooks (one batched backward per batch)", G.BOUND]
    assert table["examples"].eq(8).all()
    assert table["max |diff| / max |loop|"].iloc[:3].max() < 1e-4
    assert table.loc[G.LOOP, "speed-up vs loop (wall)"] == pytest.approx(1.0)
    # the bound: three products per Linear and position at 1 GFLOP/s
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert table.loc[G.BOUND, "wall ms/example"] == pytest.approx(1000 * 3 * G.linear_flops(wrapped, tokens) / 1e9 / 8)


def test_per_example_gradient_timing_covers_every_dataset_and_sums_them(toy):
    track, state = toy
    models = G.Models(theta0=state, tasks={"other": state}, all_data=state, without=state, removed="other")
    config = G.GradientMatchingConfig(base_task="toy", tasks=("other",), fisher_examples=8, fisher_batch_size=4,
                                      timing_examples=6, timing_vmap_chunks=(3,))
    table = G.time_per_example_gradients(track, models, config)
    assert list(table.index.get_level_values("dataset").unique()) == ["toy", "other", "all"]
    per = table.loc["toy"]
    assert per["examples"].eq(6).all() and table.loc["all", "examples"].eq(12).all()
    both = table.xs(G.LOOP, level="method")["wall ms/example"]
    assert both["all"] == pytest.approx((both["toy"] + both["other"]) / 2)
    assert table.loc[("all", G.LOOP), "speed-up vs loop (wall)"] == pytest.approx(1.0)
    assert table.attrs["peak GFLOP/s"] > 0


def test_evaluator_accuracy_agreement_and_memo(toy):
    track, state = toy
    ev = G.Evaluator(track)
    acc = ev.accuracies(state, ["toy"])
    model = G.classifier(track, state).eval()
    data = track.split("toy", "test")
    with torch.no_grad():
        batch = data.batch(np.arange(len(data)))
        pred = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).argmax(1).numpy()
    assert acc["toy"] == pytest.approx(100 * (pred == data.labels).mean())
    assert ev.agreement(state, state, ["toy"]) == 100.0
    flipped = dict(state, **{"head.weight": -state["head.weight"], "head.bias": -state["head.bias"]})
    assert ev.agreement(state, flipped, ["toy"]) < 100.0
    assert len(ev._memo) == 2


def test_fisher_statistics_hessian_is_n_times_fisher():
    _, stats = tiny_models()
    h = stats.hessian("a")
    assert all(torch.equal(h[k], 5 * stats.fisher["a"][k]) for k in h)
    assert S.hessian_estimate(stats.fisher["a"], 5).keys() == h.keys()


def test_paired_difference_of_a_model_with_itself_is_zero_and_sign_is_right(toy):
    track, state = toy
    ev = G.Evaluator(track)
    assert G.paired_difference(ev, state, state, ["toy"]) == (0.0, 0.0)
    flipped = dict(state, **{"head.weight": -state["head.weight"], "head.bias": -state["head.bias"]})
    diff, se = G.paired_difference(ev, state, flipped, ["toy"])
    acc, acc_flipped = ev.accuracies(state, ["toy"])["toy"], ev.accuracies(flipped, ["toy"])["toy"]
    assert diff == pytest.approx(acc - acc_flipped) and se > 0


def test_a_shared_head_model_trains_saves_and_reloads(toy):
    # the all-data model: several datasets through one head (train_head=True, shared_head=True)
    from lib.experiments.training import FinetuneConfig, finetune

    track, state = toy
    _, head = G.split_state(state)
    config = FinetuneConfig(max_steps=2, batch_size=4, warmup_steps=1, eval_every=1, max_eval_examples=8)
    init = G.Expert(encoder=track.encoder.state_dict(), heads={})
    first = finetune(track, ["a", "b"], {"a": head, "b": head}, config, False, init=init, train_head=True, shared_head=True)
    again = finetune(track, ["a", "b"], {"a": head, "b": head}, config, False, init=init, train_head=True, shared_head=True)
    for expert in (first, again):
        assert all(torch.equal(expert.heads["a"][k], expert.heads["b"][k]) for k in ("weight", "bias"))
        assert not torch.equal(expert.heads["a"]["weight"], head["weight"])  # the head was trained
    assert all(torch.equal(first.encoder[k], again.encoder[k]) for k in first.encoder)
