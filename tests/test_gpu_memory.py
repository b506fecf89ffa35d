"""GPU memory predicted on a CPU (lib.experiments.gpu_memory): the byte count, fake = real, and
CUDA autocast's float32 policy."""
import contextlib
import copy
import gc

import torch
import torch.nn.functional as F
from torch import nn

from lib.experiments.gpu_memory import BLOCK, LiveTensorBytes, allocated_bytes, cuda_autocast_policy, predicted_cuda_peak


def test_allocations_round_up_to_the_caching_allocators_blocks():
    assert BLOCK == 512
    assert [allocated_bytes(n) for n in (0, 1, 512, 513, 4000)] == [0, 512, 512, 1024, 4096]


def test_each_storage_counts_once_while_alive_and_the_peak_stays():
    with LiveTensorBytes() as live:
        a = torch.empty(1000)                      # 4000 bytes -> 4096
        view = a.view(10, 100)                     # a view: no new storage
        b = torch.empty(100, dtype=torch.float64)  # 800 bytes -> 1024
        assert live.current == live.peak == 4096 + 1024
        del a, view
        gc.collect()
        assert live.current == 1024 and live.peak == 4096 + 1024
    old = torch.ones(256)
    live.add(old, old[:10])                        # tensors from before the mode: counted once each
    assert live.current == 1024 + 1024
    del b


def test_a_matrix_product_peaks_at_its_inputs_their_bf16_copies_and_its_output():
    def product():
        a, b = torch.randn(256, 512), torch.randn(512, 128)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return a @ b

    assert predicted_cuda_peak(lambda: torch.randn(256, 512) @ torch.randn(512, 128)) == 4 * (256 * 512 + 512 * 128 + 256 * 128)
    # float32 inputs, their bf16 casts (autocast), and the bf16 output, all alive at the product
    assert predicted_cuda_peak(product) == 6 * (256 * 512 + 512 * 128) + 2 * 256 * 128


def _train_two_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.LayerNorm(256), nn.Linear(256, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_fake_tensors_predict_what_real_tensors_hold():
    with LiveTensorBytes() as live:
        _train_two_steps()
    assert predicted_cuda_peak(_train_two_steps) == live.peak > 0


def test_cuda_autocast_policy_runs_layer_norm_and_softmax_in_float32_and_is_undone_after():
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.layer_norm(x.bfloat16(), (16,)).dtype, torch.softmax(x.bfloat16(), -1).dtype
        with cuda_autocast_policy():
            cuda = F.layer_norm(x.bfloat16(), (16,)).dtype, torch.softmax(x.bfloat16(), -1).dtype
            module = nn.LayerNorm(16)(x.bfloat16()).dtype
    assert plain == (torch.bfloat16, torch.bfloat16)  # CPU autocast keeps them in bf16 ...
    assert cuda == (torch.float32, torch.float32) and module == torch.float32  # ... CUDA autocast does not
    with cuda_autocast_policy():
        assert F.layer_norm(x.bfloat16(), (16,)).dtype == torch.bfloat16  # only while autocast is on
    assert F.layer_norm.__name__ == "layer_norm" and not hasattr(F.layer_norm, "__wrapped__")  # restored


def test_fake_runs_take_item_module_moves_and_deep_copies():
    seen = {}

    def run():
        model = nn.Linear(3, 3).to("cpu")                 # a move to where it is
        twin = copy.deepcopy(model)                       # a copy in the same fake mode
        loss = (model(torch.randn(2, 3)) + twin(torch.randn(2, 3))).sum()
        loss.backward()
        seen["item"] = float(loss.detach())              # a fake tensor has no value: 1.0
        seen["twin"] = isinstance(twin.weight, nn.Parameter), twin.weight.grad is not None

    predicted_cuda_peak(run)
    assert seen == {"item": 1.0, "twin": (True, True)}


def test_embedding_sums_stand_in_is_the_original_at_its_largest_and_runs_on_fake_tensors():
    """The Fisher's per-example embedding sums call torch.unique, which fake tensors cannot run.
    The stand-in allocates what the original does when every (example, token) pair is distinct,
    with the same result there, and more than the original when tokens repeat."""
    from lib import statistics
    from lib.experiments.gpu_memory import embedding_sums_at_their_largest

    torch.manual_seed(0)
    module, batch, tokens = nn.Embedding(1000, 64), 8, 32
    cases = {"distinct": torch.randperm(1000)[:batch * tokens].reshape(batch, tokens),
             "repeated": torch.randint(0, 20, (batch, tokens))}
    g, weights = torch.randn(batch, tokens, 64), torch.rand(batch)
    original = statistics._embedding_sq_sum_
    for name, ids in cases.items():
        runs = {}
        for kind in ("original", "stand-in"):
            total = torch.zeros(1000, 64)
            with contextlib.nullcontext() if kind == "original" else embedding_sums_at_their_largest():
                with LiveTensorBytes() as live:
                    statistics._embedding_sq_sum_(total, module, ids, g, weights)
            runs[kind] = live.peak, total
        if name == "distinct":
            assert runs["stand-in"][0] == runs["original"][0]
            assert torch.allclose(runs["stand-in"][1], runs["original"][1], rtol=1e-6, atol=0)
        else:
            assert runs["stand-in"][0] > runs["original"][0]
    assert statistics._embedding_sq_sum_ is original  # restored

    class MeanOfEmbeddings(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding, self.out = nn.Embedding(50, 16), nn.Linear(16, 3)

        def forward(self, input_ids):
            return self.out(self.embedding(input_ids).mean(1))

    def fisher_through_an_embedding():
        statistics.diagonal_fisher(MeanOfEmbeddings(), [{"input_ids": torch.randint(0, 50, (4, 6)),
                                                         "labels": torch.randint(0, 3, (4,))}], method="hooks",
                                   disable=True)

    with embedding_sums_at_their_largest():
        assert predicted_cuda_peak(fisher_through_an_embedding) > 0


def test_bench_gpu_memory_predicts_every_notebook_step_on_tiny_models():
    """``make bench-gpu-memory``'s script end to end on tiny towers and a tiny RoBERTa (printing only),
    and notebook 05's device-side factors built as ``twin_merging.compress`` and ``stack`` shape them."""
    import sys
    from pathlib import Path

    from lib.merging import twin_merging as tw
    from lib.paths import REPO_ROOT

    sys.path.insert(0, str(Path(REPO_ROOT) / "benchmarks"))
    try:
        import bench_gpu_memory as bench
    finally:
        sys.path.pop(0)
    validation, notebooks = bench.main(["--tiny", "--no-record"])
    steps = " | ".join(notebooks["step"])
    for expected in ("AdaMerging step, per-batch backward", "Fisher, batch 4, vmap", "fine-tuning step, batch 4",
                     "Twin-Merging low-rank inference", "distillation step, batch 4 per task in 8 chunks",
                     "fine-tuning step, batch 2 × 16 tokens", "per-example gradients by hooks"):
        assert expected in steps, (expected, steps)
    assert (validation["predicted peak (GiB)"] > 0).all() and (notebooks["predicted peak (GiB)"] > 0).all()

    encoder = bench.open_clip_tower("tiny", True)
    shared = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    experts = [{k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() and not k.endswith(".proj") else v.clone()
                for k, v in shared.items()} for _ in range(3)]
    real, built = tw.stack(tw.compress(shared, experts)), bench.stacked_exclusive(shared, 3, tw.RANK_RATIO)
    assert sorted(real.factors) == sorted(built.factors) and sorted(real.dense) == sorted(built.dense)
    for k in real.factors:
        assert [(t.shape, t.dtype) for t in real.factors[k]] == [(t.shape, t.dtype) for t in built.factors[k]], k
    assert all(real.dense[k].shape == built.dense[k].shape for k in real.dense)
