"""The shims that let XTuner run on a machine without CUDA."""

import pytest
import torch

from xtuner_patch import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="shims apply only without CUDA")


@pytest.fixture
def fresh_shims():
    cpu_compat.restore()
    yield
    cpu_compat.apply()


def test_apply_and_restore(fresh_shims):
    original_set_device = torch.cuda.set_device
    assert not hasattr(torch.cpu, "is_bf16_supported")
    with pytest.raises((RuntimeError, AssertionError, AttributeError)):
        torch.cuda.set_device(0)  # what mmengine's launcher hits on a CPU rank

    assert cpu_compat.apply() is True
    assert cpu_compat.apply() is True  # idempotent
    assert isinstance(torch.cpu.is_bf16_supported(), bool)
    torch.cuda.set_device(0)  # now a no-op
    assert cpu_compat.is_applied()

    cpu_compat.restore()
    assert not hasattr(torch.cpu, "is_bf16_supported")
    assert torch.cuda.set_device is original_set_device
    assert not cpu_compat.is_applied()


def test_xtuner_bf16_query_works_on_cpu():
    device = pytest.importorskip("xtuner.utils.device")
    # XTuner asks the current device module; on a CPU host that is torch.cpu.
    assert device.get_torch_device() is torch.cpu
    # bf16 runs on every CPU torch supports (emulated without bf16 instructions), as
    # torch.cuda.is_bf16_supported(including_emulation=True) reports for GPUs; XTuner
    # picks DeepSpeed's bf16 over fp16 (which DeepSpeed cannot run on a CPU) from it.
    assert device.get_torch_device().is_bf16_supported() is True
    assert torch.ones(2, dtype=torch.bfloat16).sum().item() == 2
    native = torch.cpu.is_bf16_supported(including_emulation=False)
    assert native == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    from xtuner.tools.utils import auto_dtype_of_deepspeed_config

    resolved = auto_dtype_of_deepspeed_config({"fp16": {"enabled": "auto"},
                                               "bf16": {"enabled": "auto"}})
    assert resolved["bf16"]["enabled"] is True and resolved["fp16"]["enabled"] is False
