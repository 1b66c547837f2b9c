"""The workarounds the training runtime still needs for the installed accelerate and torch, in one
place. Each says which versions need it and has a test in cli/tests/test_shims.py that fails
once a version no longer needs it (then delete the shim and its test).

1. ``fsdp_on_cpu``: accelerate turns FSDP on for accelerator devices only.
2. ``reset_accelerate_state``: accelerate keeps one run's settings in process-wide singletons.
"""
from __future__ import annotations

import torch


def fsdp_on_cpu(accelerator, plugin) -> None:
    """[shim 1: accelerate <= 1.16, FSDP2 on CPU] ``accelerate launch --use_fsdp`` on CPU
    processes: accelerate only turns FSDP on for accelerator devices and would silently run DDP;
    torch's FSDP2 works on CPU with gloo, so the state is switched to FSDP with the launcher's
    plugin (``prepare`` then shards the model with ``fully_shard`` on the CPU). Written where
    accelerate writes it for a GPU (``AcceleratorState.__init__``): into the shared
    ``PartialState`` too, which every later ``AcceleratorState()`` (``prepare`` makes several)
    copies its ``distributed_type`` from; set on the accelerator's state alone, ``prepare``
    puts MULTI_CPU back (accelerate 1.16 resets FSDP to MULTI_CPU in each ``prepare``)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType
    if accelerator.state.distributed_type == DistributedType.MULTI_CPU:
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        accelerator.state.device = torch.device("cpu")  # FSDP compares it with the params' "cpu"


def reset_accelerate_state() -> None:
    """[shim 2: accelerate <= 1.16] one process, maybe several runs (tests, notebooks):
    accelerate keeps its settings in process-wide singletons and refuses a second Accelerator
    with other --mixed-precision, so a run starts them afresh."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
