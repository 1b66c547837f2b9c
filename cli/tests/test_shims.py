"""Each workaround in training/shims.py against the installed accelerate/torch: every test shows
the behaviour the shim works around; once a version changes it, the test fails and the shim
(and its test) can go. Shim 4 (keep_distributed_type) is covered end to end only, by the
2-process FSDP runs of test_train.py."""
import inspect
import os
from types import SimpleNamespace

import pytest
import torch

from lora_lite_cli.training import shims


def test_shim1_accelerate_turns_fsdp_on_for_accelerator_devices_only():
    """fsdp_on_cpu: accelerate sets DistributedType.FSDP only inside a branch over accelerator
    device kinds, MULTI_CPU not among them."""
    from accelerate.state import AcceleratorState
    src = inspect.getsource(AcceleratorState.__init__)
    switch = src.index("self.distributed_type = DistributedType.FSDP")
    branch = src[src.rindex("elif self.distributed_type in [", 0, switch):switch]
    assert "DistributedType.MULTI_GPU" in branch and "MULTI_CPU" not in branch


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is about machines without CUDA")
def test_shim2_accelerate_refuses_sync_module_states_without_an_accelerator(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    with pytest.raises((ValueError, RuntimeError), match="not supported on"):
        FullyShardedDataParallelPlugin(sync_module_states=True)
    saved = os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING")
    monkeypatch.setenv("FSDP_VERSION", "2")  # FSDP2: the plugin as accelerate builds it
    plugin = shims.cpu_fsdp_plugin()
    assert plugin.fsdp_version == 2 and plugin.sync_module_states is None
    assert os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING") == saved or saved is None


def test_shim3_torch_fsdp1_refuses_cpu_tensors_for_sync_module_states():
    from torch.distributed.fsdp import _init_utils
    with pytest.raises(ValueError, match="[Cc][Pp][Uu]"):
        _init_utils._check_module_states_for_sync_module_states([torch.zeros(2)])


def test_shim5_accelerate_clips_an_fsdp1_parameter_subset_rank_locally():
    """accelerate hands FSDP1's global clip_grad_norm_ only the full parameter list; the
    adapter's tensors (a subset) go to the rank-local norm."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model.clip_grad_norm_ = lambda *a, **k: "fsdp1-global"
    fake = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False,
                           unscale_gradients=lambda: None, _models=[model],
                           _clip_grad_norm_dtensor_aware=lambda *a, **k: "rank-local")
    assert Accelerator.clip_grad_norm_(fake, list(model.parameters()), 1.0) == "fsdp1-global"
    assert Accelerator.clip_grad_norm_(fake, list(model[1].parameters()), 1.0) == "rank-local"


def test_shim6_accelerate_keeps_one_runs_settings_process_wide():
    from accelerate import Accelerator
    shims.reset_accelerate_state()
    Accelerator(cpu=True, mixed_precision="no")
    with pytest.raises(ValueError):
        Accelerator(cpu=True, mixed_precision="bf16")
    shims.reset_accelerate_state()
    assert Accelerator(cpu=True, mixed_precision="bf16").mixed_precision == "bf16"
    shims.reset_accelerate_state()
