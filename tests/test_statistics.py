"""Per-example gradients, Fisher and Gram matrices against hand computations."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lib import statistics as S
from lib.functional import additive_attention_mask, detached_params, eval_mode, example_at_own_length, functional_forward


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- models
class TinyBert(nn.Module):
    """A tiny random BERT + masked mean pooling + linear head, as the text experts are."""

    def __init__(self, num_classes=3):
        super().__init__()
        import transformers

        config = transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100
        )
        config._attn_implementation = "eager"  # see lib.functional: vmappable on CPU
        self.encoder = transformers.BertModel(config, add_pooling_layer=False)
        self.head = nn.Linear(32, num_classes)

    def forward(self, input_ids, attention_mask):
        # The 4-D additive mask keeps transformers' mask construction vmappable.
        hidden = self.encoder(input_ids=input_ids, attention_mask=additive_attention_mask(attention_mask)).last_hidden_state
        mask = attention_mask.unsqueeze(-1).float()
        return self.head((hidden * mask).sum(1) / mask.sum(1))


class SmallCNN(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.head = nn.Linear(4, num_classes)

    def forward(self, pixel_values):
        return self.head(self.features(pixel_values))


def text_batch(B=5, L=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([L, 4, 2, L, 5][:B])
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    ids = torch.randint(1, 100, (B, L), generator=g) * mask  # padding id 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (B,), generator=g)}


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    return TinyBert()


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = SmallCNN()
    bn = model.features[1]
    bn.running_mean.uniform_(-1, 1)  # non-trivial running statistics, so eval mode matters
    bn.running_var.uniform_(0.5, 2)
    return model


def image_batch(B=4):
    g = torch.Generator().manual_seed(1)
    return {"pixel_values": torch.randn(B, 3, 6, 6, generator=g), "labels": torch.randint(0, 3, (B,), generator=g)}


def assert_close_dicts(a, b, rtol=1e-4):
    assert set(a) == set(b)
    # Relative to the largest entry overall: some entries are exactly zero in exact
    # arithmetic (BERT's attention key biases), where only float noise would be compared.
    scale = max(v.abs().max().item() for v in b.values())
    for k in b:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=rtol * scale, msg=k)


# ----------------------------------------------------------------------------- functional
def test_functional_forward_substitutes_without_touching_the_module(cnn):
    inputs = {"pixel_values": image_batch()["pixel_values"]}
    with eval_mode(cnn):
        own = functional_forward(cnn, detached_params(cnn), inputs)
        torch.testing.assert_close(own, cnn(**inputs))
        zero_head = {"head.weight": torch.zeros(3, 4), "head.bias": torch.ones(3)}
        assert torch.equal(functional_forward(cnn, zero_head, inputs), torch.ones(4, 3))
        torch.testing.assert_close(cnn(**inputs), own)  # the module kept its weights


# ----------------------------------------------------------------------------- per-example gradients
def test_per_example_grads_match_the_loop_on_bert_with_padding(bert):
    batch = text_batch()
    fast = S.per_example_grads(bert, batch, chunk_size=2)
    slow = S.per_example_grads_loop(bert, batch)
    assert fast["head.weight"].shape == (5, 3, 32)
    assert_close_dicts(fast, slow)


def test_per_example_grads_of_padded_example_equal_the_unpadded_one(bert):
    batch = text_batch()
    padded = S.per_example_grads(bert, batch, chunk_size=None)
    alone = {k: v[2:3] for k, v in batch.items()}
    alone = S.per_example_grads_loop(bert, {k: v[:, :2] if v.dim() == 2 else v for k, v in alone.items()})  # length 2
    assert_close_dicts({k: v[2:3] for k, v in padded.items()}, alone)


def test_example_at_own_length_cuts_trailing_padding_only():
    batch = text_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "scale": torch.ones(5, 3)}
    third = example_at_own_length(inputs, 2)  # length 2 of 7
    assert torch.equal(third["input_ids"], batch["input_ids"][2, :2]) and third["attention_mask"].tolist() == [1, 1]
    assert third["scale"].shape == (3,)  # not [B, L]: kept whole
    gap = {"attention_mask": torch.tensor([[1, 0, 1, 0]]), "input_ids": torch.tensor([[5, 6, 7, 8]])}
    assert example_at_own_length(gap, 0)["input_ids"].tolist() == [5, 6, 7]  # up to the LAST token
    images = image_batch()
    assert torch.equal(example_at_own_length(images, 1)["pixel_values"], images["pixel_values"][1])


def test_the_loop_gives_the_same_sums_with_more_padding(bert):
    batch = text_batch()
    longer = {k: nn.functional.pad(v, (0, 6)) if v.dim() == 2 else v for k, v in batch.items()}
    assert_close_dicts(S.per_example_sq_grads_loop(bert, longer), S.per_example_sq_grads_loop(bert, batch))


def test_per_example_grads_match_the_loop_on_cnn_with_batchnorm(cnn):
    cnn.train()  # statistics must switch to eval (running statistics) and back
    stats_before = cnn.features[1].running_mean.clone()
    batch = image_batch()
    fast = S.per_example_grads(cnn, batch)
    slow = S.per_example_grads_loop(cnn, batch)
    assert_close_dicts(fast, slow)
    assert cnn.training and all(m.training for m in cnn.modules())
    assert torch.equal(cnn.features[1].running_mean, stats_before)


@pytest.mark.parametrize("method", ["vmap", "hooks"])
def test_sum_sq_grads_methods_agree_with_the_loop(bert, cnn, method):
    w = torch.tensor([0.5, 1.0, 2.0, 0.1, 1.5])
    for model, batch, weights in [(bert, text_batch(), None), (bert, text_batch(), w), (cnn, image_batch(), w[:4])]:
        ref = S.per_example_sq_grads_loop(model, batch, weights=weights)
        assert_close_dicts(S.sum_sq_grads(model, batch, weights=weights, method=method, chunk_size=2), ref)


def test_hooks_refuse_layers_whose_output_is_changed_in_place():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))

        def forward(self, x):
            return self.net(x)

    batch = {"x": torch.randn(5, 3), "labels": torch.randint(0, 2, (5,))}
    with pytest.raises(RuntimeError, match="in place"):
        S.sum_sq_grads(InPlace(), batch, method="hooks")


def test_param_names_restrict_and_typos_are_errors(bert):
    names = ["head.weight", "encoder.embeddings.word_embeddings.weight"]
    for method in ["vmap", "hooks", "loop"]:
        assert list(S.sum_sq_grads(bert, text_batch(), param_names=names, method=method)) == names[::-1]
    with pytest.raises(KeyError):
        S.per_example_grads(bert, text_batch(), param_names=["head.wieght"])


def test_vmap_error_names_the_attention_mask_fix():
    class TwoDMask(TinyBert):
        def forward(self, input_ids, attention_mask):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return self.head(hidden.mean(1))

    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="additive_attention_mask"):
        S.per_example_grads(TwoDMask(), text_batch())


# ----------------------------------------------------------------------------- Fisher
def softmax_regression(N=20_000, d=3, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, C)
    with torch.no_grad():
        model.weight.copy_(torch.randn(C, d, generator=g))
        model.bias.copy_(torch.randn(C, generator=g))
    x = torch.randn(N, d, generator=g)
    return model, x


class Wrapped(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x)


def test_sampled_fisher_matches_the_analytic_fisher_of_softmax_regression():
    # ∂ log p(y|x) / ∂W[c, j] = (1[y=c] − p_c) x_j, so E_y[·²] = p_c(1 − p_c) x_j² (and 1 for the bias).
    linear, x = softmax_regression()
    model = Wrapped(linear)
    batches = [{"x": xb, "labels": torch.zeros(len(xb), dtype=torch.long)} for xb in x.split(5000)]
    with torch.no_grad():
        p = torch.softmax(linear(x), -1).double()
    feats = torch.cat([x, torch.ones(len(x), 1)], 1).double()  # [x, 1]: weight columns, then bias
    m = p * (1 - p)  # E[(1[y=c] − p_c)²]
    second = p * (1 - p) ** 4 + (1 - p) * p**4  # E[(1[y=c] − p_c)⁴]
    analytic = (m[:, :, None] * feats[:, None, :] ** 2).mean(0)
    # One draw per example: the estimator's standard error, from the per-example variances.
    se = (((second - m**2)[:, :, None] * feats[:, None, :] ** 4).sum(0)).sqrt() / len(x)

    for method in ["vmap", "hooks"]:
        f = S.diagonal_fisher(model, batches, method=method, chunk_size=None, disable=True)
        estimate = torch.cat([f["linear.weight"], f["linear.bias"][:, None]], 1).double()
        z = (estimate - analytic) / se
        assert z.abs().max() < 5, (method, z)
    # Taking the expectation over y exactly leaves no sampling error at all.
    f = S.diagonal_fisher(model, batches, label_mode="expected", chunk_size=None, disable=True)
    exact = torch.cat([f["linear.weight"], f["linear.bias"][:, None]], 1).double()
    torch.testing.assert_close(exact, analytic, rtol=1e-4, atol=1e-6)


def test_empirical_fisher_uses_the_data_labels():
    linear, x = softmax_regression(N=200)
    y = torch.randint(0, 3, (200,), generator=torch.Generator().manual_seed(3))
    f = S.diagonal_fisher(Wrapped(linear), [{"x": x, "labels": y}], label_mode="true", disable=True)
    with torch.no_grad():
        r = nn.functional.one_hot(y, 3) - torch.softmax(linear(x), -1)  # 1[y=c] − p_c
    torch.testing.assert_close(f["linear.weight"], (r[:, :, None] ** 2 * x[:, None, :] ** 2).mean(0), rtol=1e-4, atol=1e-7)


def test_fisher_is_seeded_respects_max_examples_and_restores_mode(bert):
    batches = [text_batch(seed=s) for s in range(3)]
    bert.train()
    a = S.diagonal_fisher(bert, batches, max_examples=12, seed=1, method="hooks", disable=True)
    b = S.diagonal_fisher(bert, batches, max_examples=12, seed=1, method="hooks", disable=True)
    c = S.diagonal_fisher(bert, batches, max_examples=12, seed=2, method="hooks", disable=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in a.values())
    assert all(m.training for m in bert.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in bert.modules())
    # 12 examples = two full batches and two of the third: the mean over exactly those.
    sums = [S.sum_sq_grads(bert, x, labels=y, method="loop") for x, y in _sampled(bert, batches, 12, seed=1)]
    assert_close_dicts(a, {k: sum(s[k] for s in sums) / 12 for k in a})


@pytest.mark.parametrize("label_mode", ["sample", "expected"])
def test_hooks_fisher_takes_its_labels_from_its_own_forward_pass(bert, cnn, label_mode):
    # "hooks" draws from the logits of its own forward pass, chunk by chunk; "vmap" runs a
    # forward pass of the whole batch first. Same seed, same draws, same Fisher -- also for
    # the CNN, whose convolutions and BatchNorm are left to vmap with the labels hooks drew.
    for model, batches in [(bert, [text_batch(seed=s) for s in range(2)]), (cnn, [image_batch()])]:
        a = S.diagonal_fisher(model, batches, label_mode=label_mode, seed=3, method="hooks", chunk_size=2, disable=True)
        b = S.diagonal_fisher(model, batches, label_mode=label_mode, seed=3, method="vmap", chunk_size=2, disable=True)
        assert_close_dicts(a, b)


def _sampled(model, batches, n, seed):
    """The batches diagonal_fisher sees, with the labels it draws."""
    g = torch.Generator().manual_seed(seed)
    for batch in batches:
        batch = {k: v[:n] for k, v in batch.items()}
        n -= len(batch["labels"])
        with torch.no_grad(), eval_mode(model):
            probs = torch.softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), -1)
        yield batch, torch.multinomial(probs, 1, generator=g).squeeze(1)
        if n <= 0:
            return


def test_hessian_estimate_is_n_times_fisher():
    f = {"w": torch.tensor([1.0, 2.0])}
    assert torch.equal(S.hessian_estimate(f, 10)["w"], torch.tensor([10.0, 20.0]))


# ----------------------------------------------------------------------------- Gram matrices
class TokenMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 4)
        self.mix = nn.Linear(4, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, input_ids, attention_mask):
        h = torch.relu(self.mix(self.embed(input_ids)))
        mask = attention_mask.unsqueeze(-1).float()
        return self.head((h * mask).sum(1) / mask.sum(1))


def test_gram_matrices_are_xtx_over_real_tokens_only():
    torch.manual_seed(0)
    model = TokenMLP().train()
    batch = text_batch(L=7)
    batch["input_ids"] = batch["input_ids"] % 20
    grams, counts = S.gram_matrices(model, [batch, batch], return_counts=True, disable=True)
    assert set(grams) == {"mix.weight", "head.weight"}

    with torch.no_grad():
        x = model.embed(batch["input_ids"])[batch["attention_mask"].bool()]  # real tokens only
        h = torch.relu(model.mix(model.embed(batch["input_ids"])))
        m = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (h * m).sum(1) / m.sum(1)
    torch.testing.assert_close(grams["mix.weight"], 2 * x.T @ x)
    torch.testing.assert_close(grams["head.weight"], 2 * pooled.T @ pooled)
    assert counts == {"mix.weight": 2 * int(batch["attention_mask"].sum()), "head.weight": 10}
    assert all(type(c) is int for c in counts.values())  # plain ints, as merging.regmean's counts

    # Whatever sits in padded positions does not matter.
    noisy = dict(batch, input_ids=torch.where(batch["attention_mask"].bool(), batch["input_ids"], 7))
    torch.testing.assert_close(S.gram_matrices(model, [noisy, noisy], disable=True)["mix.weight"], grams["mix.weight"])
    # max_examples cuts the data; only the chosen layers; mode and hooks restored.
    assert S.gram_matrices(model, [batch, batch], max_examples=6, return_counts=True, disable=True)[1]["head.weight"] == 6
    assert set(S.gram_matrices(model, [batch], linear_names=["head.weight"], disable=True)) == {"head.weight"}
    assert model.training
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_gram_keys_line_up_with_bert_weights_and_hooks_go_on_error(bert):
    grams = S.gram_matrices(bert, [text_batch()], disable=True)
    params = dict(bert.named_parameters())
    assert "encoder.encoder.layer.0.attention.self.query.weight" in grams
    assert all(g.shape == (params[n].shape[1],) * 2 for n, g in grams.items())
    bad = dict(text_batch(), attention_mask=torch.ones(5, 3, dtype=torch.long))  # does not line up
    with pytest.raises(ValueError, match="does not line up with attention_mask"):
        S.gram_matrices(bert, [bad], disable=True)
    assert not any(m._forward_pre_hooks for m in bert.modules())


def test_conv_gram_is_the_gram_of_unfolded_patches_and_regmean_reads_it():
    """A conv is linear over its patches: RegMean with that Gram solves the pooled least squares."""
    from lib import merging

    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    x = torch.randn(4, 2, 5, 5)
    model = _ConvOnly(conv)
    grams, counts = S.gram_matrices(model, [{"pixel_values": x, "labels": torch.zeros(4, dtype=torch.long)}],
                                    return_counts=True)
    assert counts == {"conv.weight": 4 * 5 * 5}  # one row per (example, output position)
    patches = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18)
    assert torch.allclose(grams["conv.weight"], patches.T @ patches, atol=1e-4)
    # conv output == patches @ W.flatten(1).T, so the Gram above is exactly RegMean's
    out = conv(x).permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.allclose(out, patches @ conv.weight.flatten(1).T, atol=1e-5)
    # Two models with different weights and data (the second sees inputs 3× larger in the first
    # channel): with the unfolded-patch Grams, RegMean fits both models' outputs on their own
    # data, which is not the plain average.
    x2 = torch.randn(4, 2, 5, 5) * torch.tensor([3.0, 1.0])[:, None, None]
    grams2, counts2 = S.gram_matrices(model, [{"pixel_values": x2, "labels": torch.zeros(4, dtype=torch.long)}],
                                      return_counts=True)
    patches2 = torch.nn.functional.unfold(x2, 3, padding=1).transpose(1, 2).reshape(-1, 18)
    w1 = conv.weight.flatten(1).detach()
    w2 = w1 + torch.randn_like(w1)
    merged = merging.regmean([{"conv.weight": w1}, {"conv.weight": w2}], [grams, grams2], alpha=1.0,
                             counts=[counts, counts2])["conv.weight"]
    target = torch.linalg.lstsq(torch.cat([patches, patches2]), torch.cat([patches @ w1.T, patches2 @ w2.T])).solution.T
    assert torch.allclose(merged, target, atol=1e-4)
    assert not torch.allclose(merged, (w1 + w2) / 2, atol=1e-2)


class _ConvOnly(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, pixel_values):
        return self.conv(pixel_values).mean((2, 3))


class _SelfAttention(nn.Module):
    """One nn.MultiheadAttention, as open_clip's CLIP uses it (self-attention, optional causal mask)."""

    def __init__(self, batch_first: bool, causal: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.causal = causal

    def forward(self, x):
        length = x.shape[1] if self.attn.batch_first else x.shape[0]
        mask = torch.full((length, length), float("-inf")).triu(1) if self.causal else None
        return self.attn(x, x, x, need_weights=False, attn_mask=mask)[0]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_gram_matrices_of_multihead_attention_cover_both_of_its_maps(batch_first, causal):
    """nn.MultiheadAttention applies in_proj and out_proj as functions (no hook fires on
    out_proj); their Grams must still be over exactly what each map is applied to."""
    torch.manual_seed(0)
    model = _SelfAttention(batch_first, causal).eval()
    x = torch.randn(3, 5, 8) if batch_first else torch.randn(5, 3, 8)
    grams, counts = S.gram_matrices(model, [{"x": x}], return_counts=True, disable=True)
    assert set(grams) == {"attn.in_proj_weight", "attn.out_proj.weight"}
    rows = x.reshape(-1, 8)
    torch.testing.assert_close(grams["attn.in_proj_weight"], rows.T @ rows, rtol=1e-4, atol=1e-4)
    # out_proj's inputs, read back from the module's own output: out = a Wᵀ + b, W invertible
    with torch.no_grad():
        out = model(x).reshape(-1, 8)
        weight, bias = model.attn.out_proj.weight, model.attn.out_proj.bias
        attended = torch.linalg.solve(weight, (out - bias).T).T
    torch.testing.assert_close(grams["attn.out_proj.weight"], attended.T @ attended, rtol=1e-3, atol=1e-3)
    assert counts == {"attn.in_proj_weight": 15, "attn.out_proj.weight": 15}


def test_gram_matrices_refuse_attention_they_cannot_read():
    """Cross-attention and padding masks are refused by name, never approximated."""
    class CrossAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x.flip(1), x.flip(1), need_weights=False)[0]

    with pytest.raises(ValueError, match="only self-attention"):
        S.gram_matrices(CrossAttention(), [{"x": torch.randn(2, 3, 8)}], disable=True)
