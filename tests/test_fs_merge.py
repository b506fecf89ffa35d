"""FS-Merge: folding is exact, "first" starts at model 1, N=1 is the model, training learns."""
import dataclasses

import pytest
import torch

from lib.archs import MLP, ViT
from lib.fs_merge import (
    Distillation,
    FSMergeConfig,
    MLPSuperNet,
    ViTSuperNet,
    augmented_pool,
    build_supernet,
    distill,
    folded_logits,
    fs_merge,
    train_supernet,
)

TOL = dict(atol=1e-10, rtol=1e-10)  # float64 throughout: folding is exact up to rounding


pytestmark = pytest.mark.usefixtures("one_thread")


def make_mlps(n, seed=0):
    torch.manual_seed(seed)
    return [MLP(6, [8, 7], 3, activation="gelu").double() for _ in range(n)]


def make_vits(n, seed=0):
    torch.manual_seed(seed)
    return [ViT(8, 4, 3, width=8, depth=2, heads=2, mlp_ratio=2.0, output_dim=6, num_classes=3).double() for _ in range(n)]


def mlp_inputs():
    return torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def vit_inputs():
    return torch.randn(5, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def randomise(module, seed=2):
    """Move every trainable parameter (M, U, low-rank factors, LayerNorms) away from its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


CASES = [(MLPSuperNet, make_mlps, mlp_inputs), (ViTSuperNet, make_vits, vit_inputs)]


@pytest.mark.parametrize("supernet_class, make, inputs", CASES, ids=["mlp", "vit"])
def test_folding_is_exact_and_keeps_the_architecture(supernet_class, make, inputs):
    models = make(3)
    reference = models[0].state_dict()
    supernet = supernet_class(models, rank=3, init="average", seed=0)
    randomise(supernet)
    folded, out_unmerge = supernet.fold()
    assert type(folded) is type(models[0])
    folded_state = folded.state_dict()
    assert list(folded_state) == list(reference)
    assert all(folded_state[k].shape == v.shape for k, v in reference.items())
    assert sum(p.numel() for p in folded.parameters()) == sum(p.numel() for p in models[0].parameters())
    assert out_unmerge.shape == (3, models[0].feature_dim, models[0].feature_dim)
    x = inputs()
    with torch.no_grad():
        for task in range(3):
            expected = supernet.task_features(x, task)
            assert torch.allclose(folded.features(x) @ out_unmerge[task].T, expected, **TOL)
            logits = folded_logits(folded, out_unmerge, models[task].head, x, task)
            assert torch.allclose(logits, supernet.task_logits(x, task), **TOL)


@pytest.mark.parametrize("supernet_class, make, inputs", CASES, ids=["mlp", "vit"])
def test_first_init_starts_at_model_1(supernet_class, make, inputs):
    models = make(2)
    supernet = supernet_class(models, rank=3, init="first")
    x = inputs()
    with torch.no_grad():
        assert torch.allclose(supernet.task_features(x, 0), models[0].features(x), **TOL)
        assert torch.allclose(supernet.task_logits(x, 0), models[0](x), **TOL)
        folded, out_unmerge = supernet.fold()
    for key, value in models[0].state_dict().items():
        assert torch.allclose(folded.state_dict()[key], value, **TOL), key
    assert torch.allclose(out_unmerge, torch.eye(models[0].feature_dim, dtype=torch.float64).expand_as(out_unmerge))


@pytest.mark.parametrize("supernet_class, make, inputs", CASES, ids=["mlp", "vit"])
def test_one_model_supernet_is_that_model(supernet_class, make, inputs):
    (model,) = make(1)
    supernet = build_supernet([model], rank=2, init="average")
    assert isinstance(supernet, supernet_class)
    x = inputs()
    with torch.no_grad():
        assert torch.allclose(supernet.task_logits(x, 0), model(x), **TOL)
        folded, _ = supernet.fold()
        assert torch.allclose(folded(x), model(x), **TOL)


def test_average_init_averages_the_models():
    models = make_mlps(2)
    supernet = MLPSuperNet(models, rank=2, init="average")
    weight, bias = supernet.layers[0].fold()
    assert torch.allclose(weight, (models[0].layers[0].weight + models[1].layers[0].weight) / 2, **TOL)
    assert torch.allclose(bias, (models[0].layers[0].bias + models[1].layers[0].bias) / 2, **TOL)


def test_supernet_does_not_train_the_originals():
    models = make_mlps(2)
    supernet = MLPSuperNet(models, rank=2)
    trainable = {name for name, p in supernet.named_parameters() if p.requires_grad}
    assert trainable and not any(name.startswith("teachers.") for name in trainable)


def task_loaders(num_tasks, shape, batches=4, batch_size=16):
    g = torch.Generator().manual_seed(3)
    return [[torch.randn(batch_size, *shape, dtype=torch.float64, generator=g) for _ in range(batches)] for _ in range(num_tasks)]


@pytest.mark.parametrize("supernet_class, make, shape", [(MLPSuperNet, make_mlps, (6,)), (ViTSuperNet, make_vits, (3, 8, 8))], ids=["mlp", "vit"])
def test_training_reduces_the_feature_loss(supernet_class, make, shape):
    models = make(2)
    loaders = task_loaders(2, shape)
    supernet = supernet_class(models, rank=2, init="first")
    before = [supernet.feature_loss(batch, t).item() for t, loader in enumerate(loaders) for batch in loader]
    history = train_supernet(supernet, loaders, steps=40, lr=1e-2, progress=False)
    after = [supernet.feature_loss(batch, t).item() for t, loader in enumerate(loaders) for batch in loader]
    assert len(history) == 40
    assert sum(after) < 0.7 * sum(before)


def test_distillation_baseline_trains_and_folds():
    models = make_mlps(2)
    loaders = task_loaders(2, (6,))
    student = Distillation(models, rank=2)
    x = loaders[0][0]
    with torch.no_grad():  # starts at model 1 with identity output maps
        assert torch.allclose(student.task_features(x, 0), models[0].features(x), **TOL)
    before = sum(student.feature_loss(loaders[t][0], t).item() for t in range(2))
    train_supernet(student, loaders, steps=40, lr=1e-2, progress=False)
    after = sum(student.feature_loss(loaders[t][0], t).item() for t in range(2))
    assert after < 0.7 * before
    model, out_unmerge = student.fold()
    assert type(model) is MLP and out_unmerge.shape == (2, 7, 7)
    with torch.no_grad():
        assert torch.allclose(model.features(x) @ out_unmerge[1].T, student.task_features(x, 1), **TOL)
    # the teachers are untouched
    assert all(not p.requires_grad for p in student.teachers.parameters())


def test_fs_merge_and_distill_follow_their_config():
    loaders = task_loaders(2, (6,), batches=2)
    config = FSMergeConfig(rank=2, init="average", epochs=2, lr=1e-2, weight_decay=0.1, seed=5)
    histories = {}
    for run, build in ((fs_merge, lambda ms: build_supernet(ms, rank=2, init="average", seed=5)),
                       (distill, lambda ms: Distillation(ms, rank=2, seed=5))):
        model, out_unmerge, histories[run] = run(make_mlps(2), loaders, config, progress=False)
        # the same run spelled out by hand: epochs × batches steps at the config's lr, decay and seed
        by_hand = build(make_mlps(2))
        assert histories[run] == train_supernet(by_hand, loaders, steps=4, lr=1e-2, weight_decay=0.1, seed=5, progress=False)
        folded, maps = by_hand.fold()
        assert torch.equal(out_unmerge, maps)
        for key, value in folded.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key
    # and each field matters: changing one changes the training run
    for change in ({"lr": 1e-3}, {"weight_decay": 0.0}, {"epochs": 1}, {"seed": 6}, {"init": "first"}, {"rank": 1}):
        _, _, changed = fs_merge(make_mlps(2), loaders, dataclasses.replace(config, **change), progress=False)
        assert changed != histories[fs_merge], change


@pytest.mark.parametrize("supernet_class, make, shape", [(MLPSuperNet, make_mlps, (6,)), (ViTSuperNet, make_vits, (3, 8, 8))], ids=["mlp", "vit"])
def test_micro_batches_take_the_same_steps(supernet_class, make, shape):
    # chunked backward (uneven chunks: 16 = 6 + 5 + 5) accumulates the gradient of the whole batch
    runs = {}
    for chunks in (1, 3):
        supernet = supernet_class(make(2), rank=2, init="first", seed=5)
        history = train_supernet(supernet, task_loaders(2, shape), steps=3, lr=1e-2, seed=5, progress=False,
                                 micro_batches=chunks)
        runs[chunks] = (history, {k: v.clone() for k, v in supernet.state_dict().items()})
    assert runs[1][0] == pytest.approx(runs[3][0], rel=1e-6)  # the loss is summed in float32
    for key, value in runs[1][1].items():
        assert torch.allclose(runs[3][1][key], value, rtol=1e-6, atol=1e-9), key
    with pytest.raises(ValueError, match="micro_batches"):
        train_supernet(supernet_class(make(2), rank=2), task_loaders(2, shape), steps=1, micro_batches=0, progress=False)


def test_training_is_seeded():
    runs = []
    for _ in range(2):
        supernet = MLPSuperNet(make_mlps(2), rank=2, seed=5)
        runs.append(train_supernet(supernet, task_loaders(2, (6,)), steps=5, lr=1e-2, seed=5, progress=False))
    assert runs[0] == runs[1]


def test_augmented_pool():
    images = torch.rand(4, 3, 8, 8)
    pool = augmented_pool(images, 10, seed=0)
    assert pool.shape == (14, 3, 8, 8)
    assert torch.equal(pool[:4], images)
    assert torch.equal(pool, augmented_pool(images, 10, seed=0))
    assert pool.min() >= 0 and pool.max() <= 1


def test_vit_loads_open_clip_vision_transformer():
    transformer = pytest.importorskip("open_clip.transformer")
    torch.manual_seed(0)
    reference = transformer.VisionTransformer(image_size=8, patch_size=4, width=16, layers=2, heads=2, mlp_ratio=2.0, output_dim=6).eval()
    with torch.no_grad():  # open_clip zero-initialises some biases; make them matter
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    vit = ViT(8, 4, 3, width=16, depth=2, heads=2, mlp_ratio=2.0, output_dim=6, num_classes=3)
    vit.load_open_clip_state_dict(reference.state_dict())
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(vit.features(x), reference(x), atol=1e-5)


def test_vit_from_open_clip_reads_the_dimensions_and_activation():
    pytest.importorskip("open_clip")
    from open_clip.model import QuickGELU
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    reference = VisionTransformer(image_size=12, patch_size=4, width=16, layers=1, heads=4, mlp_ratio=3.0, output_dim=5, act_layer=QuickGELU).eval()
    vit = ViT.from_open_clip(reference, num_classes=2)
    assert vit.activation == "quick_gelu" and vit.heads == 4 and vit.feature_dim == 5
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert torch.allclose(vit.features(x), reference(x), atol=1e-5)
