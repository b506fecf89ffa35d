"""Git Re-Basin recovers known permutations; ZipIt! of a model with its permuted copy is exact."""
import copy

import pytest
import torch

from lib.archs import MLP, ViT
from lib.permutation import (
    apply_permutation,
    feature_correlation,
    permutation_spec,
    rebasin_merge,
    weight_matching,
    zip_matrices,
    zipit_merge,
    zipit_partial,
)

TOL = dict(atol=1e-10, rtol=1e-10)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_perms(state, seed=0):
    g = torch.Generator().manual_seed(seed)
    spec = permutation_spec(state)
    sizes = {name: state[key].shape[axis] for key, axes in spec.items() for axis, name in enumerate(axes) if name}
    return {name: torch.randperm(n, generator=g) for name, n in sizes.items()}


def permuted_copy(model, seed=0):
    perms = random_perms(model.state_dict(), seed)
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(apply_permutation(model.state_dict(), perms))
    return permuted, perms


def make_mlp(seed=0):
    torch.manual_seed(seed)
    return MLP(6, [16, 12, 10], 4, activation="relu").double()


def make_vit(seed=0):
    torch.manual_seed(seed)
    return ViT(8, 4, 3, width=12, depth=2, heads=3, mlp_ratio=2.0, output_dim=5, num_classes=4).double()


def test_permuting_hidden_units_keeps_the_function():
    for model, x in ((make_mlp(), torch.randn(7, 6, dtype=torch.float64)), (make_vit(), torch.randn(3, 3, 8, 8, dtype=torch.float64))):
        permuted, _ = permuted_copy(model)
        assert not torch.equal(permuted.state_dict()["transformer.resblocks.0.mlp.c_fc.weight" if isinstance(model, ViT) else "layers.0.weight"],
                               model.state_dict()["transformer.resblocks.0.mlp.c_fc.weight" if isinstance(model, ViT) else "layers.0.weight"])
        with torch.no_grad():
            assert torch.allclose(permuted(x), model(x), **TOL)


def test_weight_matching_recovers_a_known_permutation_of_an_mlp():
    model = make_mlp()
    permuted, _ = permuted_copy(model, seed=1)
    perms = weight_matching(model.state_dict(), permuted.state_dict(), seed=0)
    aligned = apply_permutation(permuted.state_dict(), perms)
    for key, value in model.state_dict().items():
        assert torch.equal(aligned[key], value), key


def test_weight_matching_recovers_a_known_permutation_of_a_vit():
    model = make_vit()
    permuted, _ = permuted_copy(model, seed=1)
    perms = weight_matching(model.state_dict(), permuted.state_dict(), seed=0)
    aligned = apply_permutation(permuted.state_dict(), perms)
    for key, value in model.state_dict().items():
        assert torch.equal(aligned[key], value), key


def test_rebasin_merge_of_a_model_and_its_permuted_copy():
    model = make_mlp()
    permuted, _ = permuted_copy(model, seed=2)
    merged, out_unmerge, _ = rebasin_merge([model, permuted])
    x = torch.randn(7, 6, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(merged.features(x), model.features(x), **TOL)
        # task 2 reads its own (permuted) feature order through out_unmerge and its own head
        assert torch.allclose(merged.features(x) @ out_unmerge[1].T, permuted.features(x), **TOL)
        assert torch.allclose(permuted.head(merged.features(x) @ out_unmerge[1].T), permuted(x), **TOL)


def test_rebasin_merge_of_different_models_averages_the_aligned_models():
    models = [make_vit(0), make_vit(1)]
    merged, out_unmerge, perms = rebasin_merge(models, max_sweeps=5)
    assert type(merged) is ViT
    assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in models[0].state_dict().items()}
    assert torch.equal(out_unmerge[1], torch.eye(5, dtype=torch.float64))  # the ViT's features are not permuted
    aligned = apply_permutation(models[1].state_dict(), perms[1])
    assert any(not torch.equal(perms[1][name], torch.arange(len(perms[1][name]))) for name in perms[1])
    for key, value in merged.state_dict().items():
        expected = models[0].state_dict()[key] if key.startswith("head.") else (models[0].state_dict()[key] + aligned[key]) / 2
        assert torch.allclose(value, expected, **TOL), key


def test_weight_matching_does_not_lower_the_match():
    a, b = make_mlp(0).state_dict(), make_mlp(1).state_dict()
    perms = weight_matching(a, b, seed=0)
    aligned = apply_permutation(b, perms)
    inner = lambda x, y: sum(float((x[k] * y[k]).sum()) for k in x if not k.startswith("head."))  # noqa: E731
    assert inner(a, aligned) > inner(a, b)


def test_zip_matrices_pair_every_feature_once():
    features = torch.randn(200, 8, dtype=torch.float64)
    merge, unmerge = zip_matrices(feature_correlation(torch.cat([features, features[:, torch.randperm(8)]], dim=1)))
    assert merge.shape == (8, 16) and unmerge.shape == (16, 8)
    assert torch.equal(merge @ unmerge, torch.eye(8))
    assert torch.equal(unmerge.sum(1), torch.ones(16))


def test_zipit_of_a_model_and_its_permuted_copy_is_exact():
    model = make_mlp()
    permuted, _ = permuted_copy(model, seed=3)
    data = torch.randn(256, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    merged, out_unmerge = zipit_merge([model, permuted], data)
    assert type(merged) is MLP and list(merged.state_dict()) == list(model.state_dict())
    x = torch.randn(9, 6, dtype=torch.float64)
    with torch.no_grad():
        for task, original in enumerate((model, permuted)):
            features = merged.features(x) @ out_unmerge[task].T
            assert torch.allclose(features, original.features(x), **TOL)
            assert torch.allclose(original.head(features), original(x), **TOL)


def test_partial_zipit_keeps_each_model_exact():
    model = make_mlp()
    permuted, _ = permuted_copy(model, seed=3)
    data = [torch.randn(64, 6, dtype=torch.float64) for _ in range(4)]  # batches work too
    x = torch.randn(9, 6, dtype=torch.float64)
    for k in (1, 3):
        partial = zipit_partial([model, permuted], data, num_zipped=k)
        assert len(partial.trunk) == k and len(partial.tails[0]) == 3 - k
        with torch.no_grad():
            for task, original in enumerate((model, permuted)):
                assert torch.allclose(partial(x, task), original(x), **TOL)


def test_zipit_of_different_models_runs_without_within_model_pairs():
    models = [make_mlp(0), make_mlp(1)]
    data = torch.randn(128, 6, dtype=torch.float64)
    merged, out_unmerge = zipit_merge(models, data, allow_within=False)
    # across-model pairing only: every merged feature unmerges to exactly one unit per model
    assert torch.equal(out_unmerge.sum(1), torch.ones(2, 10, dtype=torch.float64))
    assert torch.isfinite(merged.features(data)).all()
