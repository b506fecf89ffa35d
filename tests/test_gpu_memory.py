"""GPU memory predicted on a CPU (lib.experiments.gpu_memory): the byte count, fake = real, and
CUDA autocast's float32 policy."""
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
