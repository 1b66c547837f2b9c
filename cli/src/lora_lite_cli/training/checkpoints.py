"""Checkpoints of an interrupted run: ``<run folder>/checkpoint/{adapter.safetensors, trainer.pt}``.

A checkpoint holds the state at a step boundary only: the adapter and optimizer after step N,
the scheduler and loss scaler after step N, and the RNG states taken at the *start* of step N+1
(``loop.Committed``), so a run resumed from it computes step N+1 exactly as an uninterrupted run
does. ``trainer.pt`` is written to a temporary file and renamed, so a checkpoint is never half
written; the adapter file goes the same way through ``ll.save``.

The optimizer state is portable (``optimizer_format: portable``): whole tensors keyed by adapter
tensor name, gathered from FSDP2's DTensor shards (the adapter and its AdamW moments are small),
so a checkpoint written by N processes resumes with any number, under FSDP2, DDP or in one
process. A checkpoint of an older lora-lite's FSDP1 run (per-rank ``optimizer.rank{N}.pt``
shards, ``optimizer_shards = N``) is refused in one line: FSDP1 is not supported.
"""
from __future__ import annotations

import os
import pickle
import zipfile

import torch

import lora_lite as ll

from .runtime import fsdp_wanted
from .settings import RESUME_FREE, Settings, TrainError, check_settings

CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE = "trainer.pt"
ADAPTER_FILE = "adapter.safetensors"
PORTABLE = "portable"  # optimizer_format: whole tensors by adapter tensor name
REQUIRED = ("step", "settings", "optimizer", "scheduler", "torch_rng", "python_rng", "losses",
            "lrs", "sanity", "adapter_before", "probe_before")


def save_checkpoint(folder: str, model, state: dict) -> None:
    """Write the adapter of ``model`` and the trainer ``state`` (a dict with REQUIRED keys)."""
    os.makedirs(folder, exist_ok=True)
    ll.save(model, os.path.join(folder, ADAPTER_FILE))
    tmp = os.path.join(folder, TRAINER_STATE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(folder, TRAINER_STATE))


_UNREADABLE = (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError,
               zipfile.BadZipFile, AttributeError, TypeError)


def _first_line(e) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:120]


def check_shards(path: str, state: dict, fsdp: bool) -> None:
    """A portable checkpoint resumes anywhere; an older one with a whole optimizer state (indices
    of the run's parameters) not under FSDP; FSDP1's per-rank shards never. One line otherwise."""
    if state.get("optimizer_format") == PORTABLE:
        return
    if state.get("sharded_optimizer") and not state.get("optimizer_shards"):
        raise TrainError(f"--resume {path!r}: this checkpoint comes from an FSDP run of an older "
                         "lora-lite that kept only rank 0's optimizer shard; its "
                         f"{ADAPTER_FILE} is whole: start a new run from it")
    if state.get("optimizer_shards"):
        raise TrainError(f"--resume {path!r}: this checkpoint holds the per-rank optimizer shards "
                         f"of an FSDP1 run, and FSDP1 is not supported; its {ADAPTER_FILE} is "
                         "whole: start a new run from it")
    if fsdp:
        raise TrainError(f"--resume {path!r}: this checkpoint holds a whole optimizer state "
                         "(a run without FSDP); resume it without --use_fsdp (torchrun, "
                         "accelerate launch --multi_gpu, or one process)")


def portable_optimizer_state(optimizer, named: dict) -> dict:
    """The optimizer's state with whole tensors, keyed by adapter tensor name (``named``: name
    -> the parameter the optimizer holds): the same file whatever the number of processes, so
    any number resumes it. FSDP2's DTensor moments are gathered (every rank must call it)."""
    order = parameter_names(optimizer, named)
    saved = optimizer.state_dict()
    state = {order[i]: {k: whole(v) for k, v in moments.items()}
             for i, moments in saved["state"].items()}
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_portable_optimizer_state(optimizer, named: dict, saved: dict) -> None:
    """Load ``portable_optimizer_state``'s dict: each whole tensor sharded like its parameter
    (FSDP2) or as it is."""
    order = parameter_names(optimizer, named)
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups) or any(
            sorted(g["params"]) != sorted(parameter_names(mine, named))
            for g, mine in zip(groups, optimizer.param_groups, strict=True)) or not set(saved["state"]) <= set(order):
        raise TrainError("--resume: the checkpoint's optimizer state names other adapter tensors "
                         "than this run trains; start a new run from its " + ADAPTER_FILE)
    position = {n: i for i, n in enumerate(order)}
    state = {position[n]: {k: like(v, named[n]) for k, v in moments.items()}
             for n, moments in saved["state"].items()}
    # torch pairs the saved groups' ids with this optimizer's parameters in order: this order
    groups = [{**g, "params": [position[n] for n in parameter_names(mine, named)]}
              for g, mine in zip(groups, optimizer.param_groups, strict=True)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def parameter_names(optimizer_or_group, named: dict) -> list:
    """The names of the parameters an optimizer (or one of its param groups) holds, in order."""
    names = {id(p): n for n, p in named.items()}
    groups = optimizer_or_group.param_groups if hasattr(optimizer_or_group, "param_groups") \
        else [optimizer_or_group]
    return [names[id(p)] for g in groups for p in g["params"]]


def whole(value):
    if hasattr(value, "full_tensor"):  # a DTensor shard (FSDP2)
        value = value.full_tensor()
    return value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value


def like(value, param):
    """``value`` (whole) placed as ``param`` is: this rank's shard of it for a DTensor."""
    if hasattr(param, "device_mesh") and isinstance(value, torch.Tensor) \
            and value.shape == param.shape:
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(value.to(param.to_local().device), param.device_mesh,
                                 param.placements, src_data_rank=None)
    return value


def checkpoint_folder(path: str) -> str:
    """The checkpoint folder for a --resume value: the folder, its trainer.pt, or a run folder."""
    if os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path))
    if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
        return os.path.abspath(os.path.join(path, CHECKPOINT_DIR))
    return os.path.abspath(path)


def read_checkpoint(path: str) -> tuple[str, dict]:
    """(checkpoint folder, trainer state); a TrainError (exit 2) for anything that is not a
    complete, readable checkpoint."""
    folder = checkpoint_folder(path)
    state_file = os.path.join(folder, TRAINER_STATE)
    if not os.path.isfile(state_file) or not os.path.isfile(os.path.join(folder, ADAPTER_FILE)):
        raise TrainError(f"--resume {path!r}: not a checkpoint (expected {TRAINER_STATE} and "
                         f"{ADAPTER_FILE} in it)")
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except _UNREADABLE as e:  # weights_only: a pickle that would run code lands here too
        raise TrainError(f"--resume {path!r}: {TRAINER_STATE} is not a readable checkpoint "
                         f"({_first_line(e)}); start the run again without --resume") from None
    missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        raise TrainError(f"--resume {path!r}: {TRAINER_STATE} lacks {', '.join(missing)}; "
                         "start the run again without --resume")
    check_shards(path, state, fsdp_wanted())
    return folder, state


def settings_for_resume(path: str, given: dict) -> tuple[Settings, str, dict]:
    """(settings, checkpoint folder, state). The run continues in the folder that holds the
    checkpoint (whatever the current directory) unless --output says otherwise; options that
    change the training must equal the checkpoint's."""
    folder, state = read_checkpoint(path)
    s = Settings.from_dict(dict(state["settings"]))
    s.threads = None  # chosen afresh for this machine's load unless given
    s.output = os.path.dirname(folder)
    for key, value in given.items():
        if value is None or key == "knobs" and not value:
            continue
        current = getattr(s, key)
        if isinstance(current, tuple):
            value = tuple(value)
        if key in RESUME_FREE:
            setattr(s, key, os.path.abspath(value) if key == "output" else value)
        elif value != current:
            raise TrainError(f"--resume: {key} is {current!r} in the checkpoint, got {value!r}; "
                             "a resumed run keeps its settings")
    check_settings(s)
    return s, folder, state
