"""Where a run executes: the device, the CPU threads, and the processes (through accelerate).

``make_accelerator`` builds one ``accelerate.Accelerator`` from the settings. It reads the
launcher's environment, so the same command runs as one process, under ``torchrun
--nproc_per_node N`` or under ``accelerate launch --num_processes N`` (gloo on CPU, nccl on
CUDA): accelerate sets up the process group, wraps the model in DDP, autocasts the forward for
``--mixed-precision`` (with a loss scaler for fp16) and compiles it for ``--compile``. Under
``accelerate launch --use_fsdp --fsdp_version 2`` the model is sharded with FSDP2 (FSDP1 is
refused up front). Workarounds for the installed accelerate/torch are in ``shims``.
"""
from __future__ import annotations

import contextlib
import os
import resource
import time
import warnings

import torch

import lora_lite as ll

from . import shims
from .settings import Settings, TrainError

# torch.compile backend for --compile: inductor, or what LORA_LITE_COMPILE_BACKEND names (one
# accelerate knows, e.g. "aot_eager" to debug, or "eager", dynamo's graph capture without
# inductor's code generation: seconds instead of minutes, which the tests use)
COMPILE_BACKEND = os.environ.get("LORA_LITE_COMPILE_BACKEND", "inductor")
FSDP1_REFUSED = ("FSDP1 is not supported: set fsdp_version: 2 in the accelerate config (or launch "
                 "with --fsdp_version 2; see docs/training.md#fsdp)")



def pick_device(device: str | None) -> str:
    """'auto'/None -> cuda when present, else cpu; anything else as given."""
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"--device {device}: no CUDA device is available (use --device cpu)")
    if device != "cpu" and not device.startswith("cuda"):
        raise TrainError(f"--device {device!r}: expected cpu, cuda or auto")
    return device


def busy_cores(interval: float = 0.5) -> float | None:
    """How many cores other work keeps busy now: the busy share of all CPU time in /proc/stat
    over ``interval`` seconds, times the core count (Linux; None elsewhere)."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:9]]
        return values[3] + values[4], sum(values)  # idle + iowait, total
    try:
        idle0, total0 = sample()
        time.sleep(interval)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1.0 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def auto_threads() -> int:
    """Torch threads for this run: one per core that other work does not keep busy (at least
    1). A busy core makes a 2-thread matmul wait for its descheduled thread: with one of two
    cores busy, 2 threads are 2-3x slower than 1 for generation and up to 5x for a training step.
    OMP_NUM_THREADS, when set, wins."""
    current = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):
        return current
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    busy = busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):
            return current
    return max(1, min(current, cores - int(round(busy))))


def set_threads(threads: int | None) -> int:
    torch.set_num_threads(threads or auto_threads())
    return torch.get_num_threads()


def launched_processes() -> int:
    """How many processes the launcher started (torchrun and accelerate launch set WORLD_SIZE)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def make_accelerator(s: Settings):
    """The Accelerator of this run. fp16 autocast needs an accelerator device: on CPU it is
    refused up front (bf16 works there)."""
    from accelerate import Accelerator
    on_cpu = not s.device.startswith("cuda")
    if s.mixed_precision == "fp16" and on_cpu:
        raise TrainError("--mixed-precision fp16 needs a CUDA device (autocast to fp16 with a "
                         "loss scaler); on CPU use --mixed-precision bf16")
    wants_fsdp = fsdp_wanted()
    if wants_fsdp and os.environ.get("FSDP_VERSION", "1") != "2":  # accelerate's default is 1
        raise TrainError(FSDP1_REFUSED)
    if s.quantize and wants_fsdp:
        refuse_quantized_fsdp(s.quantize)
    if launched_processes() > 1 and s.batch_size < launched_processes():
        raise TrainError(f"--batch-size {s.batch_size} is smaller than the "
                         f"{launched_processes()} processes")
    if launched_processes() == 1:
        shims.reset_accelerate_state()
    plugin = fsdp2_plugin() if on_cpu and wants_fsdp else None
    # the scheduler steps once per optimizer step whatever the number of processes (the
    # global batch does not grow with them)
    accelerator = Accelerator(cpu=on_cpu, mixed_precision=s.mixed_precision,
                              dynamo_plugin=dynamo_plugin(s.compile, regional=not wants_fsdp),
                              step_scheduler_with_optimizer=False, fsdp_plugin=plugin)
    if plugin is not None:
        shims.fsdp_on_cpu(accelerator, plugin)
    refuse_unsupported(accelerator)
    return accelerator


def fsdp2_plugin():
    """accelerate's FSDP plugin with the launcher's settings (read from the environment)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    return FullyShardedDataParallelPlugin()


def cpu_fsdp_plugin():
    """Deprecated (FSDP1 is gone, and with it the CPU plugin shim): ``fsdp2_plugin``."""
    warnings.warn("lora_lite_cli.training.runtime.cpu_fsdp_plugin is deprecated (FSDP1 is not "
                  "supported); use fsdp2_plugin", DeprecationWarning, stacklevel=2)
    return fsdp2_plugin()


def refuse_quantized_fsdp(quantize: str) -> None:
    """QLoRA under FSDP: a 4bit base whose packed weights live in float tensors
    (bnb_4bit_quant_storage, set by ``models.load_model`` under FSDP) is sharded by FSDP2 like
    the float weights. Refused in one line: 8bit (its int8 weights cannot be sharded) and
    meta-device loading (a quantized base is read by every rank)."""
    why = None
    if quantize != "4bit":
        why = f"--quantize {quantize} under FSDP is not supported (its int8 weights cannot be sharded)"
    elif env_flag("FSDP_CPU_RAM_EFFICIENT_LOADING"):
        why = ("--quantize 4bit under FSDP needs every rank to read the weights (launch with "
               "--fsdp_cpu_ram_efficient_loading false)")
    if why:
        raise TrainError(f"{why}; or train the quantized base with DDP (torchrun, or accelerate "
                         "launch --multi_gpu)")


def dynamo_plugin(compile_model: bool, regional: bool = True):
    """accelerate's dynamo settings for ``--compile``, with dynamic shapes from the first step
    (the batches differ in length). ``regional``: each repeated block (a decoder layer) compiled
    once and its code reused by the others, the rest of the model apart: a cold compile of the
    default model takes ~33 s, against minutes for the whole model (docs/training.md). Under
    FSDP the whole wrapped
    model is compiled instead: accelerate's regional compile copies the FSDP root, which breaks
    it (a RecursionError in FSDP's __getattr__)."""
    from accelerate.utils import DynamoBackend, TorchDynamoPlugin
    if not compile_model:
        return TorchDynamoPlugin(backend="no")
    known = [b.value.lower() for b in DynamoBackend if b.value != "NO"]
    if COMPILE_BACKEND.lower() not in known:
        raise TrainError(f"LORA_LITE_COMPILE_BACKEND={COMPILE_BACKEND!r} is not a compile backend "
                         f"accelerate knows; unset it (inductor) or pick one of {', '.join(known)}")
    return TorchDynamoPlugin(backend=COMPILE_BACKEND, dynamic=True,
                             use_regional_compilation=regional)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def fsdp_wanted() -> bool:
    return env_flag("ACCELERATE_USE_FSDP")


def fsdp_plugin(accelerator):
    return getattr(accelerator.state, "fsdp_plugin", None) if is_fsdp(accelerator) else None


def meta_loading(accelerator) -> bool:
    """FSDP2 with ``cpu_ram_efficient_loading``: only rank 0 reads the weights; the other ranks
    build the model's parameters on the meta device, and accelerate broadcasts rank 0's state
    dict (adapter included) into the shards after ``fully_shard``."""
    plugin = fsdp_plugin(accelerator)
    return bool(plugin is not None and getattr(plugin, "cpu_ram_efficient_loading", False))


def prepare(accelerator, *objects) -> tuple:
    """``accelerator.prepare``, always a tuple."""
    prepared = accelerator.prepare(*objects)
    # a tuple, or under FSDP2 a list (accelerate 1.16's _prepare_fsdp2)
    return tuple(prepared) if isinstance(prepared, (tuple, list)) else (prepared,)


def refuse_unsupported(accelerator) -> None:
    """DeepSpeed and Megatron would hand ``ll.save`` shards of the adapter: refused up front.
    FSDP2 is supported; FSDP1 is refused (``make_accelerator`` refuses it before the Accelerator
    is built; this catches a plugin built another way)."""
    kind = str(accelerator.distributed_type).split(".")[-1]
    if kind in ("DEEPSPEED", "MEGATRON_LM"):
        raise TrainError(f"lora-lite train does not support {kind} (the adapter would be saved "
                         "as shards); launch with torchrun, `accelerate launch --multi_gpu` "
                         "(DDP) or `accelerate launch --use_fsdp --fsdp_version 2` (FSDP2)")
    plugin = fsdp_plugin(accelerator)
    if plugin is not None and getattr(plugin, "fsdp_version", 1) != 2:
        raise TrainError(FSDP1_REFUSED)


def is_fsdp(accelerator) -> bool:
    return str(accelerator.distributed_type).split(".")[-1] == "FSDP"


def clip_grad_norm(accelerator, params, max_norm: float) -> torch.Tensor:
    """Clip the adapter's gradients to ``max_norm`` (their global norm); returns that norm.
    Under FSDP2 accelerate's DTensor-aware clipping reduces the shards' norms over the ranks."""
    return accelerator.clip_grad_norm_(params, max_norm)


def fsdp_root(wrapped):
    """The FSDP module of the prepared model: under --compile accelerate wraps it in an
    OptimizedModule, whose ``_orig_mod`` it is (FSDP's own methods need the FSDP module)."""
    return getattr(wrapped, "_orig_mod", wrapped)


def full_params(accelerator, wrapped, recurse: bool = True):
    """A context in which the adapter tensors of an FSDP2 model are whole (not DTensor shards),
    so that ``ll.adapter_tensors``/``ll.save`` read whole adapters (every rank must enter it: it
    gathers). ``recurse=False`` (``generate``): nothing to gather, the sharded modules gather
    their base tensors in their forward. Without FSDP: nothing to do."""
    if not is_fsdp(accelerator):
        return contextlib.nullcontext()
    # FSDP2: the layers gather their own base tensors in their forward
    return full_adapter(fsdp_root(wrapped)) if recurse else contextlib.nullcontext()


@contextlib.contextmanager
def full_adapter(model):
    """FSDP2: the adapter's DTensor shards replaced, on their layers, by the whole tensors
    (``DTensor.full_tensor()``: every rank must enter), so ``ll.adapter_tensors``/``ll.save``
    read plain tensors; the shards are put back after. FSDP2's state-dict hook re-shards only
    an unsharded layer, so a layer between steps keeps what is set here."""
    from torch.distributed.tensor import DTensor
    state, swapped = ll.attached(model), []
    for target in state.targets:
        for name in state.tensor_names[target.name]:
            shard = target.layer._parameters.get(name)
            if isinstance(shard, DTensor):
                whole = torch.nn.Parameter(shard.full_tensor(), requires_grad=shard.requires_grad)
                target.layer._parameters[name] = whole
                swapped.append((target.layer, name, shard))
    try:
        yield
    finally:
        for layer, name, shard in reversed(swapped):
            layer._parameters[name] = shard


def local_numel(tensor) -> int:
    """Elements this rank holds: an FSDP2 DTensor's local shard, else the tensor."""
    return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).numel()


def finish(accelerator) -> None:
    """Leave the process group cleanly: every rank waits for the others, then destroys it.

    Without the barrier, a rank that finishes early (ranks > 0 write no files) tears its gloo
    pairs down while rank 0 is still busy; rank 0's own teardown then meets closed sockets and
    gloo's background thread can abort the process ("terminate called without an active
    exception"). Waiting first means nobody closes a connection another rank still uses.
    """
    if accelerator is None:
        return
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        accelerator.wait_for_everyone()
        dist.destroy_process_group()


def peak_memory_mb(device: str) -> dict:
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.startswith("cuda") and torch.cuda.is_available():
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out
