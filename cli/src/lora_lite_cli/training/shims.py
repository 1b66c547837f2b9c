"""The workarounds the training runtime still needs for the installed accelerate and torch, in one
place. Each says which versions need it and has a test in cli/tests/test_shims.py that fails
once a version no longer needs it (then delete the shim and its test).

Removed with FSDP2 (issue 23): FSDP2 clips with accelerate's own DTensor-aware
``clip_grad_norm_`` and loads with accelerate's own meta handling, so shims 2, 3 and 5 below
are needed by FSDP1 only (the older FSDP path).

1. ``fsdp_on_cpu``: accelerate turns FSDP on for accelerator devices only.
2. ``cpu_fsdp_plugin``: accelerate refuses FSDP1's ``sync_module_states`` without one.
3. ``cpu_state_sync``: torch's FSDP1 refuses CPU tensors for ``sync_module_states``.
4. ``keep_distributed_type``: accelerate's ``prepare`` forgets shim 1's FSDP state on CPU.
5. ``fsdp1_clip_grad_norm``: accelerate's FSDP1 clipping of a parameter subset is rank-local.
6. ``reset_accelerate_state``: accelerate keeps one run's settings in process-wide singletons.
"""
from __future__ import annotations

import contextlib
import os

import torch


def env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def cpu_fsdp_plugin():
    """[shim 2: accelerate <= 1.16, FSDP1 on CPU] accelerate's FSDP plugin for CPU processes,
    with the launcher's settings (FSDP2: accelerate's plugin as it is).

    accelerate's plugin refuses ``sync_module_states`` (and so ``cpu_ram_efficient_loading``,
    which needs it) without an accelerator device, only because it builds its ``param_init_fn``
    (``to_empty`` onto the meta modules) for that device. Here the plugin is built with both off
    and then given them with ``to_empty`` onto the CPU; torch's own CPU refusal is lifted for
    the wrapping only (``cpu_state_sync``): gloo broadcasts CPU tensors."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    sync, meta = env_flag("FSDP_SYNC_MODULE_STATES"), env_flag("FSDP_CPU_RAM_EFFICIENT_LOADING")
    saved = os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING")
    if os.environ.get("FSDP_VERSION", "1") == "2":  # FSDP2 has no sync_module_states
        return FullyShardedDataParallelPlugin()
    plugin = FullyShardedDataParallelPlugin(sync_module_states=False,
                                            cpu_ram_efficient_loading=False)
    if saved is None:  # the plugin writes its value back into the environment
        os.environ.pop("FSDP_CPU_RAM_EFFICIENT_LOADING", None)
    else:
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = saved
    plugin.cpu_ram_efficient_loading = meta
    plugin.sync_module_states = sync or meta  # meta loading needs rank 0's states broadcast
    if plugin.sync_module_states:
        cpu = torch.device("cpu")
        plugin.param_init_fn = lambda module: module.to_empty(device=cpu, recurse=False)
    return plugin


def fsdp_on_cpu(accelerator, plugin) -> None:
    """[shim 1: accelerate <= 1.16, FSDP1 and FSDP2 on CPU] ``accelerate launch --use_fsdp`` on CPU processes:
    accelerate only turns FSDP on for accelerator devices and would silently run DDP; torch's FSDP works on CPU with
    gloo, so the state is switched to FSDP with the launcher's plugin settings (``prepare`` then wraps the
    model in FSDP on the CPU)."""
    from accelerate.utils import DistributedType
    if accelerator.state.distributed_type == DistributedType.MULTI_CPU:
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        accelerator.state.device = torch.device("cpu")  # FSDP compares it with the params' "cpu"


@contextlib.contextmanager
def cpu_state_sync(accelerator):
    """[shim 3: torch <= 2.13, FSDP1 on CPU] While FSDP wraps a CPU model with ``sync_module_states``: torch refuses CPU
    tensors there through one check (``_check_module_states_for_sync_module_states``) although gloo
    broadcasts them; the check is skipped for the wrapping only. Elsewhere: nothing."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None or not getattr(plugin, "sync_module_states", False) or accelerator.device.type != "cpu":
        yield
        return
    from torch.distributed.fsdp import _init_utils
    original = _init_utils._check_module_states_for_sync_module_states
    _init_utils._check_module_states_for_sync_module_states = lambda module_states: None
    try:
        yield
    finally:
        _init_utils._check_module_states_for_sync_module_states = original



@contextlib.contextmanager
def keep_distributed_type(accelerator):
    """[shim 4: accelerate <= 1.16, on CPU] ``accelerator.prepare`` re-derives MULTI_CPU from
    the CPU while preparing; left so, shim 1's FSDP state is lost (FSDP1 would clip each rank's
    shard alone; FSDP2 would save DTensors). The state as it was before ``prepare`` is put back
    after. Measured with accelerate 1.16 under FSDP2 on 2 CPU processes: FSDP -> MULTI_CPU across
    each ``prepare``."""
    kind = accelerator.state.distributed_type
    try:
        yield
    finally:
        accelerator.state.distributed_type = kind


def fsdp1_clip_grad_norm(accelerator, root, max_norm: float) -> torch.Tensor:
    """[shim 5: accelerate <= 1.16, FSDP1] accelerate's ``clip_grad_norm_`` hands FSDP1's own
    (global) norm only a list of *every* model parameter; given the adapter's tensors it computed
    each rank's local norm and each rank clipped by its own (measured: a first gradient norm of
    1.212 against one process's 1.217). FSDP1's ``clip_grad_norm_`` reduces over the ranks; the
    frozen base has no gradients, so the norm is the adapter's."""
    accelerator.unscale_gradients()
    return root.clip_grad_norm_(max_norm)


def reset_accelerate_state() -> None:
    """[shim 6: accelerate <= 1.16] one process, maybe several runs (tests, notebooks):
    accelerate keeps its settings in process-wide singletons and refuses a second Accelerator
    with other --mixed-precision, so a run starts them afresh."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
