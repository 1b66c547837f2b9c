"""Measuring a model's cost: the one place for what ``lora-lite cost-report`` and the
``benchmarks/*_vs_peft.py`` scripts (through ``lora_lite.testing.bench``) both need.

- ``token_batch``: random token ids (fixed by a seed) with a full attention mask.
- ``sync`` / ``timed``: a call's wall and CPU time, the device synchronised on both sides.
- ``turn_order`` / ``interleaved``: timed rounds in which every contender runs once, rotating
  which goes first, so load from other jobs hits all of them alike.
- ``PeakMemory``: the peak memory of a ``with`` window above the level at its start. CUDA:
  ``max_memory_allocated``. CPU: ``"tensors"``, the most tensor bytes alive at once (torch.profiler
  memory events: activations, gradients, temporaries; not the Python heap or allocator cache), or
  ``"process"``, the process's peak resident set (Linux VmHWM, reset through
  /proc/self/clear_refs; glibc's mmap threshold pinned at 1 MiB so freed tensors go back to the OS
  and the baseline is honest).
"""
from __future__ import annotations

import ctypes
import gc
import os
import time

import torch

CPU_METHODS = ("tensors", "process")


def token_batch(vocab: int, batch: int, seq: int, seed: int = 0, device="cpu") -> dict:
    """Random input_ids (batch, seq) below ``vocab`` (fixed by ``seed``), on ``device``, full mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def sync(device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one call of fn()."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def turn_order(names: list, turn: int) -> list:
    """``names`` rotated by ``turn``: over the rounds each one goes first as often as the others
    (a fixed order biases the ratio: measured in lora-lite's cost report, the side always run
    first read 1.03x for identical work)."""
    k = turn % len(names) if names else 0
    return names[k:] + names[:k]


def interleaved(phases: dict, rounds: int, device) -> dict:
    """phases: phase -> {name: callable}, every phase with the same names. ``rounds`` rounds; in
    round i each phase in turn calls every name once, in ``turn_order(names, i)``. Returns
    phase -> name -> {"wall": [s, ...], "cpu": [s, ...]} (CPU time of this process: on a CPU shared
    with other jobs far less perturbed than wall time when the run uses one thread; meaningless
    on CUDA)."""
    names = list(next(iter(phases.values()), {}))
    times: dict[str, dict[str, dict[str, list[float]]]] = {
        phase: {name: {"wall": [], "cpu": []} for name in names} for phase in phases}
    for i in range(rounds):
        order = turn_order(names, i)
        for phase, fns in phases.items():
            for name in order:
                wall, cpu = timed(fns[name], device)
                times[phase][name]["wall"].append(wall)
                times[phase][name]["cpu"].append(cpu)
    return times


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


class PeakMemory:
    """``with PeakMemory(device, cpu) as mem: ...`` -> ``mem.peak_bytes`` / ``mem.peak_mb``, the
    peak above the level at entry (None where the method is unavailable); see the module."""

    _pinned = False

    def __init__(self, device, cpu: str = "process"):
        if cpu not in CPU_METHODS:
            raise ValueError(f"PeakMemory: cpu={cpu!r}, expected one of {', '.join(CPU_METHODS)}")
        self.device, self.cpu = torch.device(device), cpu
        self.peak_bytes: int | None = None
        self._base: int | None = None
        self._profile = None

    @classmethod
    def method(cls, device, cpu: str = "process") -> str:
        """What the window's figure is, in words."""
        if torch.device(device).type == "cuda":
            return "CUDA max_memory_allocated above the level before the window"
        if cpu == "tensors":
            return "tensor bytes alive at once (torch.profiler memory events) above the window's start"
        if cls._can_reset_rss():
            return "process peak RSS (VmHWM) above the RSS before the window"
        return "unavailable on this platform"

    @property
    def peak_mb(self) -> float | None:
        return None if self.peak_bytes is None else self.peak_bytes / 2**20

    @staticmethod
    def _can_reset_rss():
        return os.path.exists("/proc/self/clear_refs") and os.access("/proc/self/clear_refs", os.W_OK)

    @classmethod
    def _pin_malloc(cls):
        """Large blocks always mmapped (so free returns them to the OS): an honest RSS baseline."""
        if cls._pinned:
            return
        cls._pinned = True
        libc = _libc()
        if libc is not None and hasattr(libc, "mallopt"):
            M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
            libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
            libc.mallopt(M_TRIM_THRESHOLD, 1 << 20)

    def _reset_rss(self) -> int:
        self._pin_malloc()
        libc = _libc()
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        return _status_kb("VmRSS") * 1024

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.cpu == "tensors":
            from torch.profiler import ProfilerActivity, profile
            self._base = 0
            self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profile.__enter__()
        elif self._can_reset_rss():
            self._base = self._reset_rss()
        return self

    def __exit__(self, *exc):
        if self._base is None:
            return False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._profile is not None:
            self._profile.__exit__(*exc)
            peak = _profiled_peak(self._profile)
        else:
            peak = _status_kb("VmHWM") * 1024
        self.peak_bytes = max(peak - self._base, 0)
        return False


def _profiled_peak(prof) -> int:
    """The most bytes alive at once over a profile's memory events (allocations minus frees)."""
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak
