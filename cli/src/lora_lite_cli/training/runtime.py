"""Where a run executes: the device, the CPU threads, and the processes (through accelerate).

``make_accelerator`` builds one ``accelerate.Accelerator`` from the settings. It reads the
launcher's environment, so the same command runs as one process, under ``torchrun
--nproc_per_node N`` or under ``accelerate launch --num_processes N`` (gloo on CPU, nccl on
CUDA): accelerate sets up the process group, wraps the model in DDP, autocasts the forward for
``--mixed-precision`` (with a loss scaler for fp16) and compiles it for ``--compile``.
"""
from __future__ import annotations

import os
import resource
import time

import torch

from .settings import Settings, TrainError


# torch.compile backend for --compile (tests swap in "eager": dynamo's graph capture without
# inductor's code generation, seconds instead of minutes on a busy CPU)
COMPILE_BACKEND = "inductor"


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
    1). A busy core makes a 2-thread matmul wait for its descheduled thread: measured here with
    one of two cores busy, a 50 x 32-token generation took 43 s on 2 threads and 16 s on 1, a
    training step 6-18 s and 3.3-3.7 s. OMP_NUM_THREADS, when set, wins."""
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
    if launched_processes() > 1 and s.batch_size < launched_processes():
        raise TrainError(f"--batch-size {s.batch_size} is smaller than the "
                         f"{launched_processes()} processes")
    if launched_processes() == 1:
        # one process, maybe several runs (tests, notebooks): accelerate keeps its settings in
        # process-wide singletons, so a run with other --mixed-precision starts them afresh
        from accelerate.state import AcceleratorState, GradientState
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    # the scheduler steps once per optimizer step whatever the number of processes (the
    # global batch does not grow with them)
    accelerator = Accelerator(cpu=on_cpu, mixed_precision=s.mixed_precision,
                              dynamo_backend=COMPILE_BACKEND if s.compile else "no",
                              step_scheduler_with_optimizer=False)
    refuse_unsupported(accelerator)
    return accelerator


def refuse_unsupported(accelerator) -> None:
    """Sharded engines (FSDP, DeepSpeed) would hand ``ll.save`` shards of the adapter: refused
    up front until the trainer gathers them (DDP and one process are supported)."""
    kind = str(accelerator.distributed_type).split(".")[-1]
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise TrainError(f"lora-lite train does not support {kind} yet (the adapter would be "
                         "saved as shards); launch with torchrun or `accelerate launch "
                         "--multi_gpu` (DDP) instead")


def finish(accelerator) -> None:
    """Leave the process group cleanly: every rank waits for the others, then destroys it.

    Without the barrier, a rank that finished early (ranks > 0 write no files) tore its gloo
    pairs down while rank 0 was still busy; rank 0's own teardown then met closed sockets and
    gloo's background thread aborted the process ("terminate called without an active
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
