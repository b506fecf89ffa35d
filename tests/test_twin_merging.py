"""Twin-Merging (lib/merging/twin_merging.py, METHODS.md §3): compression, merging, routing and
the three inference paths, on tiny random models."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig

from lib import merging as M
from lib.merging import twin_merging as tw
from lib.models import CifarResNet, load_text_encoder

T = 3


def perturbed(sd: dict, seed: int, scale: float = 0.05) -> dict:
    """An "expert": every float tensor moved by seeded noise (running variances kept positive)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if not torch.is_floating_point(v):
            out[k] = v.clone()
        elif k.endswith("running_var"):
            out[k] = v * torch.exp(scale * torch.randn(v.shape, generator=g))
        else:
            out[k] = v + scale * torch.randn(v.shape, generator=g)
    return out


def twin(model: nn.Module, rank_ratio: float = 0.5):
    """(shared, experts, exclusive) for T experts around ``model``'s weights; shared = Task Arithmetic.
    A CLIP tower's output projection stays θ0's in every expert (as in the published experts)."""
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    experts = [{**perturbed(theta0, seed), **({"visual.proj": theta0["visual.proj"]} if "visual.proj" in theta0 else {})}
               for seed in range(1, T + 1)]
    shared = M.task_arithmetic(theta0, experts, 0.3)
    return shared, experts, tw.compress(shared, experts, rank_ratio)


def mixed_weights(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2.0 * torch.randn(n, T, generator=g), dim=1)


# ------------------------------------------------------------------------ tiny models


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=24)
    return load_text_encoder(config=config)[0]


def text_batch(n: int = 4, length: int = 8) -> dict:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(n, length, dtype=torch.long)
    for b in range(n):
        mask[b, length - b:] = 0  # lengths 8, 7, 6, ...: padding in every input but the first
    return {"input_ids": torch.randint(1, 40, (n, length), generator=g), "attention_mask": mask,
            "labels": torch.zeros(n, dtype=torch.long)}


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(6, 10), nn.LayerNorm(10), nn.Linear(10, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc2(torch.relu(self.norm(self.fc1(x)))))


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = TinyMLP()
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2.0)
    return model


def mlp_batch(n: int = 4) -> dict:
    return {"x": torch.randn(n, 6, generator=torch.Generator().manual_seed(2))}


def tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    return CifarResNet(blocks_per_stage=1)


def image_batch(n: int = 3) -> dict:
    return {"pixel_values": torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))}


class AttentionBlock(nn.Module):
    """A pre-norm transformer block as open_clip builds CLIP's (nn.MultiheadAttention batch first)."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(4)
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = self.ln(x)
        return self.out(x + self.mha(h, h, h, need_weights=False)[0]).mean(1)


def attention_block() -> nn.Module:
    torch.manual_seed(0)
    return AttentionBlock()


def tiny_clip() -> nn.Module:
    """CLIP's image tower as open_clip builds it (class and position embeddings, batch-first
    nn.MultiheadAttention), tiny; its output projection shared by the experts, as published ones do."""
    from lib.paper.clip import image_encoder, load_clip

    torch.manual_seed(0)
    config = {"embed_dim": 8, "quick_gelu": True, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 16,
              "layers": 1, "head_width": 8, "mlp_ratio": 2.0}, "text_cfg": {"width": 16, "heads": 2, "layers": 1}}
    return image_encoder(load_clip(config=config).model)


def clip_batch(n: int = 4) -> dict:
    return {"pixel_values": torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(3))}


class CausalAttention(nn.Module):
    """nn.MultiheadAttention sequence first, with an additive causal mask (CLIP's text tower)."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        length = x.shape[1]
        mask = torch.full((length, length), float("-inf")).triu(1)
        y = self.mha(*(x.transpose(0, 1),) * 3, attn_mask=mask, need_weights=False)[0].transpose(0, 1)
        return self.out(y).mean(1)


def causal_attention() -> nn.Module:
    torch.manual_seed(0)
    return CausalAttention()


def sequence_batch(n: int = 4) -> dict:
    return {"x": torch.randn(n, 5, 4, generator=torch.Generator().manual_seed(4))}


MODELS = {"bert": (tiny_bert, text_batch), "mlp": (tiny_mlp, mlp_batch), "resnet": (tiny_resnet, image_batch),
          "attention block": (attention_block, sequence_batch), "causal attention": (causal_attention, sequence_batch),
          "clip": (tiny_clip, clip_batch)}


# ------------------------------------------------------------------------ compression and merge

SHAPES = {"fc.weight": (6, 4), "fc.bias": (6,), "conv.weight": (5, 3, 3, 3), "emb.weight": (10, 4),
          "bn.weight": (5,), "bn.running_mean": (5,), "bn.running_var": (5,)}


def state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    sd["bn.running_var"] = sd["bn.running_var"].abs() + 0.5
    sd["bn.num_batches_tracked"] = torch.tensor(seed)
    return sd


def test_full_rank_with_one_hot_weights_reproduces_each_expert():
    shared, experts = state(0), [state(s) for s in range(1, T + 1)]
    exclusive = tw.compress(shared, experts, rank_ratio=1.0)
    for t, expert in enumerate(experts):
        merged = tw.merge(shared, exclusive, torch.eye(T)[t])
        assert list(merged) == list(shared)
        for k, v in expert.items():
            if torch.is_floating_point(v):
                torch.testing.assert_close(merged[k], v, rtol=1e-5, atol=1e-5)
        assert merged["bn.num_batches_tracked"] == shared["bn.num_batches_tracked"]  # copied from shared


def test_rank_r_part_is_the_best_rank_r_approximation_with_the_discarded_singular_values_as_error():
    shared, experts = state(0), [state(s) for s in range(1, T + 1)]
    ratio = 0.5
    exclusive = tw.compress(shared, experts, rank_ratio=ratio)
    for expert, part in zip(experts, exclusive):
        for k, v in shared.items():
            if v.dim() < 2:
                assert torch.equal(part[k], expert[k] - v) if torch.is_floating_point(v) else k not in part
                continue
            diff = (expert[k] - v).reshape(v.shape[0], -1)  # conv kernels: the (out, in·kh·kw) view
            r = max(1, int(ratio * min(diff.shape) + 0.5))
            u, s, vh = torch.linalg.svd(diff.double(), full_matrices=False)
            assert part[k].us.shape == (diff.shape[0], r) and part[k].vh.shape == (r, diff.shape[1])
            approx = part[k].us.double() @ part[k].vh.double()
            torch.testing.assert_close(approx, (u[:, :r] * s[:r]) @ vh[:r], rtol=1e-5, atol=1e-5)
            error = torch.linalg.matrix_norm(diff.double() - approx)
            torch.testing.assert_close(error, s[r:].norm(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(tw.dense(part[k], v.shape).double(), approx.reshape(v.shape))


def test_rank_rounds_to_nearest_with_halves_up_and_at_least_one():
    assert tw.rank_for((384, 1536), 0.1) == 38  # 38.4
    assert tw.rank_for((5, 3, 3, 3), 0.5) == 3  # min(5, 27) = 5: 2.5 rounds up
    assert tw.rank_for((2, 384), 0.1) == 1  # 0.2, but at least one
    assert tw.rank_for((16, 16, 3, 3), 0.1) == 2  # 1.6


def test_unchanged_tensor_is_stored_at_rank_zero():
    shared = state(0)
    expert = {**state(1), "emb.weight": shared["emb.weight"].clone()}  # e.g. frozen token embeddings
    part = tw.compress(shared, [expert], 0.5)[0]
    assert part["emb.weight"].us.shape == (10, 0)
    expected = sum(4 * (v.us.numel() + v.vh.numel()) if isinstance(v, tw.LowRank) else 4 * v.numel()
                   for v in part.values())
    assert tw.nbytes(part) == tw.nbytes([part]) == expected
    assert tw.nbytes([part, part]) == 2 * expected


def test_merge_is_linear_in_the_weights():
    shared, experts = state(0), [state(s) for s in range(1, T + 1)]
    exclusive = tw.compress(shared, experts, 0.5)
    w1, w2 = torch.tensor([0.2, -0.5, 1.0]), [0.7, 0.1, 0.3]
    a, b = 0.6, -1.3
    combined = tw.merge(shared, exclusive, a * w1 + b * torch.tensor(w2))
    m1, m2 = tw.merge(shared, exclusive, w1), tw.merge(shared, exclusive, w2)
    for k, v in shared.items():
        if torch.is_floating_point(v):
            torch.testing.assert_close(combined[k] - v, a * (m1[k] - v) + b * (m2[k] - v), rtol=1e-5, atol=1e-5)
    zero = tw.merge(shared, exclusive, [0.0] * T)
    assert all(torch.equal(zero[k], v) for k, v in shared.items())
    with pytest.raises(ValueError, match="one weight per task"):
        tw.merge(shared, exclusive, [1.0, 0.0])


# ------------------------------------------------------------------------ router


def test_top_k_routing_keeps_only_k_tasks_renormalised():
    torch.manual_seed(0)
    router = tw.router_mlp(8, 5)
    features = torch.randn(20, 8)
    full = tw.route(router, features)
    torch.testing.assert_close(full.sum(1), torch.ones(20))
    top2 = tw.route(router, features, top_k=2)
    assert ((top2 > 0).sum(1) == 2).all()
    torch.testing.assert_close(top2.sum(1), torch.ones(20))
    kept = full.topk(2, dim=1).indices
    torch.testing.assert_close(top2.gather(1, kept), full.gather(1, kept) / full.gather(1, kept).sum(1, keepdim=True))
    assert torch.equal(tw.route(router, features, top_k=1), torch.eye(5)[full.argmax(1)])
    with pytest.raises(ValueError, match="top_k"):
        tw.route(router, features, top_k=6)


def test_router_layout_and_training_keeps_the_best_held_out_epoch():
    router = tw.router_mlp(6, 3)
    assert [type(m) for m in router] == [nn.Linear, nn.BatchNorm1d, nn.LeakyReLU, nn.Dropout] * 2 + [nn.Linear]
    assert router[0].out_features == router[4].out_features == 12 and router[3].p == 0.5
    g = torch.Generator().manual_seed(0)
    centers = 3.0 * torch.randn(3, 6, generator=g)
    tasks = torch.arange(3).repeat(40)
    features = centers[tasks] + torch.randn(120, 6, generator=g)
    held_tasks = torch.arange(3).repeat(10)
    held = centers[held_tasks] + torch.randn(30, 6, generator=g)
    state_before = torch.random.get_rng_state()
    router, history = tw.train_router(features, tasks, held, held_tasks, epochs=15, batch_size=32, lr=1e-2, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state_before)  # the global RNG is untouched
    assert [h["epoch"] for h in history] == list(range(1, 16))
    best = max(h["held_out_accuracy"] for h in history)
    assert not router.training
    assert tw._accuracy(router, held, held_tasks) == best > 0.9
    again, _ = tw.train_router(features, tasks, held, held_tasks, epochs=15, batch_size=32, lr=1e-2, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(router.state_dict().values(), again.state_dict().values()))
    # held-out labels that disagree with training: the held-out accuracy falls as the router learns,
    # so the best epoch is an early one, not the last
    wrong = (held_tasks + 1) % 3
    router, history = tw.train_router(features, tasks, held, wrong, epochs=15, batch_size=32, lr=1e-2, seed=0)
    accuracies = [h["held_out_accuracy"] for h in history]
    assert tw._accuracy(router, held, wrong) == max(accuracies) > accuracies[-1]


# ------------------------------------------------------------------------ inference paths


@pytest.mark.parametrize("top_k", [None, 1], ids=["router weights", "top-1 weights"])
@pytest.mark.parametrize("name", list(MODELS))
def test_low_rank_path_equals_per_input_materialisation(name, top_k):
    make_model, make_batch = MODELS[name]
    model = make_model()
    shared, _, exclusive = twin(model)
    batch = make_batch()
    weights = mixed_weights(len(batch[next(iter(batch))]))
    weights = weights if top_k is None else tw.keep_top_k(weights, top_k)
    expected = tw.per_input_forward(model, shared, exclusive, weights, batch)
    got = tw.low_rank_forward(model, shared, exclusive, weights, batch)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tw.low_rank_forward(model, shared, tw.stack(exclusive), weights, batch), got)
    # the corrections matter: the shared model alone is far from it
    assert (tw.low_rank_forward(model, shared, exclusive, 0 * weights, batch) - expected).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["bert", "mlp"])
def test_grouped_inference_with_one_input_per_group_equals_per_input(name):
    make_model, make_batch = MODELS[name]
    model = make_model()
    shared, _, exclusive = twin(model)
    batch = make_batch(T)
    weights = torch.tensor([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    assert weights.argmax(1).tolist() == [2, 0, 1]  # every input its own group, not in group order
    expected = tw.per_input_forward(model, shared, exclusive, weights, batch)
    torch.testing.assert_close(tw.grouped_forward(model, shared, exclusive, weights, batch), expected,
                               rtol=1e-4, atol=1e-5)


def test_grouped_inference_uses_the_groups_mean_weights():
    model = tiny_mlp()
    shared, _, exclusive = twin(model)
    batch = mlp_batch(3)
    weights = torch.tensor([[0.9, 0.1, 0.0], [0.6, 0.2, 0.2], [0.1, 0.1, 0.8]])
    got = tw.grouped_forward(model, shared, exclusive, weights, batch)
    group_mean = weights[:2].mean(0).expand(2, T)
    first_group = tw.per_input_forward(model, shared, exclusive, group_mean, {"x": batch["x"][:2]})
    torch.testing.assert_close(got[:2], first_group)
    last = tw.per_input_forward(model, shared, exclusive, weights[2:], {"x": batch["x"][2:]})
    torch.testing.assert_close(got[2:], last)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 1, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x)[0].mean(1)


class ReadsWeights(nn.Module):
    """A Linear whose weight the model reads without calling the layer, and a bare parameter."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return F.linear(x, self.lin.weight) * self.scale


def test_low_rank_path_refuses_layers_it_cannot_apply():
    torch.manual_seed(0)
    model = Attention()  # asks for the attention weights, which a recomputation would not give
    shared, _, exclusive = twin(model)
    with pytest.raises(tw.UnsupportedLayer, match="need_weights=False"):
        tw.low_rank_forward(model, shared, exclusive, mixed_weights(2), {"x": torch.randn(2, 3, 4)})
    model = ReadsWeights()
    shared, _, exclusive = twin(model)
    with pytest.raises(tw.UnsupportedLayer, match="scale"):  # a bare parameter belongs to no supported layer
        tw.low_rank_forward(model, shared, exclusive, mixed_weights(2), {"x": torch.randn(2, 4)})
    without_scale = [{**part, "scale": torch.zeros(4)} for part in exclusive]
    with pytest.raises(RuntimeError, match="not called"):  # lin's weight is read, its forward never runs
        tw.low_rank_forward(model, shared, without_scale, mixed_weights(2), {"x": torch.randn(2, 4)})


def test_inputs_are_not_modified():
    model = tiny_bert()
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    experts = [perturbed(theta0, seed) for seed in range(1, T + 1)]
    shared = M.task_arithmetic(theta0, experts, 0.3)
    batch, weights = text_batch(), mixed_weights(4)
    snapshot = [{k: v.clone() for k, v in sd.items()} for sd in [shared, *experts, batch]]
    model_before = {k: v.clone() for k, v in model.state_dict().items()}
    weights_before = weights.clone()
    exclusive = tw.compress(shared, experts, 0.5)
    exclusive_before = [{k: tuple(t.clone() for t in v) if isinstance(v, tw.LowRank) else v.clone()
                         for k, v in part.items()} for part in exclusive]
    tw.merge(shared, exclusive, weights[0])
    for forward in (tw.low_rank_forward, tw.grouped_forward, tw.per_input_forward):
        forward(model, shared, exclusive, weights, batch)
    features, tasks = torch.randn(12, 16), torch.arange(3).repeat(4)
    features_before = features.clone()
    tw.train_router(features, tasks, features, tasks, epochs=2)
    tw.route(tw.router_mlp(16, 3), features, top_k=2)
    for before, after in zip(snapshot, [shared, *experts, batch]):
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in model_before.items())
    assert torch.equal(weights, weights_before) and torch.equal(features, features_before)
    for before, after in zip(exclusive_before, exclusive):
        for k, v in before.items():
            assert all(torch.equal(a, b) for a, b in zip(v, after[k])) if isinstance(v, tuple) else torch.equal(v, after[k])
    assert model.training  # the forwards put it in eval mode only while they ran
