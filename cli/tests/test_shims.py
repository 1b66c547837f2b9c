"""Each workaround in training/shims.py against the installed accelerate/torch: every test shows
the behaviour the shim works around; once a version changes it, the test fails and the shim
(and its test) can go."""
import inspect

import pytest

from lora_lite_cli.training import shims


def test_shim1_accelerate_turns_fsdp_on_for_accelerator_devices_only():
    """fsdp_on_cpu: accelerate sets DistributedType.FSDP only inside a branch over accelerator
    device kinds, MULTI_CPU not among them."""
    from accelerate.state import AcceleratorState
    src = inspect.getsource(AcceleratorState.__init__)
    switch = src.index("self.distributed_type = DistributedType.FSDP")
    branch = src[src.rindex("elif self.distributed_type in [", 0, switch):switch]
    assert "DistributedType.MULTI_GPU" in branch and "MULTI_CPU" not in branch


def test_shim1_accelerate_state_copies_partial_states_distributed_type_back():
    """fsdp_on_cpu writes FSDP into PartialState too: accelerate's own AcceleratorState() (as
    ``prepare`` calls it) copies PartialState's distributed_type over the accelerator's; once
    it stops doing that, only the accelerator's state needs the switch."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType
    shims.reset_accelerate_state()
    try:
        accelerator = Accelerator(cpu=True)
        accelerator.state.distributed_type = DistributedType.FSDP  # the accelerator's state alone
        assert AcceleratorState().distributed_type != DistributedType.FSDP  # put back
        assert accelerator.distributed_type != DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.MULTI_CPU  # as on 2 CPU processes
        shims.fsdp_on_cpu(accelerator, "plugin")
        assert AcceleratorState().distributed_type == DistributedType.FSDP  # kept
        assert accelerator.distributed_type == DistributedType.FSDP
        assert accelerator.state.fsdp_plugin == "plugin"
    finally:
        shims.reset_accelerate_state()


def test_shim2_accelerate_keeps_one_runs_settings_process_wide():
    from accelerate import Accelerator
    shims.reset_accelerate_state()
    Accelerator(cpu=True, mixed_precision="no")
    with pytest.raises(ValueError):
        Accelerator(cpu=True, mixed_precision="bf16")
    shims.reset_accelerate_state()
    assert Accelerator(cpu=True, mixed_precision="bf16").mixed_precision == "bf16"
    shims.reset_accelerate_state()
