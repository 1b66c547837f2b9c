"""What a run under FSDP2 does besides the plain path: meta-device loading on ranks > 0, the check
that every rank built the same adapter, and the figures that show what each rank loaded.

With ``fsdp_cpu_ram_efficient_loading: true`` only rank 0 reads the weights; the other ranks
build the architecture with its parameters on the meta device (``models.load_model(empty=True)``;
buffers such as rotary frequencies are computed on the CPU), attach the adapter there (its
tensors on meta too: shapes only, its per-layer ``init`` runs on meta tensors), and after
``fully_shard`` accelerate broadcasts rank 0's state dict into every rank's shards (adapter
tensors included: rank 0's init, weight-reading ones such as an SVD too, is what every rank
trains). A variant that runs the model on data at attach (calibration) cannot do that on meta
and is refused up front (``--quantize`` with meta loading is refused in
``runtime.refuse_quantized_fsdp``).
"""
from __future__ import annotations

import lora_lite as ll

from .settings import TrainError

NO_META = ("launch with --fsdp_cpu_ram_efficient_loading false (every rank then reads the "
           "weights itself)")


def refuse_on_meta(s, variant) -> None:
    """Under meta loading: what ranks > 0 cannot do on a meta-device base (calibrate), refused on
    every rank before anything loads (one line)."""
    if s.calibration or variant.needs_calibration:
        raise TrainError(f"variant {s.variant!r} runs the model on data at attach (calibration), "
                         "which ranks > 0 cannot do on their meta-device base under FSDP "
                         f"cpu_ram_efficient_loading; {NO_META}")


def gather(accelerator, value) -> list:
    """``value`` of every rank, in rank order (every rank must call it)."""
    import torch.distributed as dist
    out = [None] * accelerator.num_processes
    dist.all_gather_object(out, value)
    return out


def materialised(model) -> int:
    """Parameters of ``model`` that hold memory (not on the meta device)."""
    return sum(p.numel() for p in model.parameters() if p.device.type != "meta")


def loading_figures(accelerator, model, meta: bool) -> dict:
    """Per rank, before FSDP wraps the model: the parameters it materialised (every parameter on
    rank 0; 0 on ranks > 0 under meta loading) and its peak RSS so far."""
    import resource
    mine = {"parameters_materialised": materialised(model),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    ranks = gather(accelerator, mine)
    return {"meta_loading": meta,
            "parameters_materialised_per_rank": [r["parameters_materialised"] for r in ranks],
            "peak_rss_mb_per_rank_before_wrap": [r["peak_rss_mb"] for r in ranks]}


def adapter_signature(model) -> list:
    return sorted((name, tuple(t.shape), str(t.dtype))
                  for name, t in ll.adapter_tensors(model).items())


def agree_on_adapter(accelerator, model, error: str | None, meta: bool) -> None:
    """Every rank attached the same adapter tensors (names, shapes, dtypes), or every rank stops
    with the same line: FSDP would otherwise broadcast into mismatched tensors or hang."""
    mine = {"error": error, "signature": None if error else adapter_signature(model)}
    ranks = gather(accelerator, mine)
    for rank, got in enumerate(ranks):
        if got["error"]:
            where = " on its meta-device base" if meta and rank > 0 else ""
            hint = f"; {NO_META}" if meta and rank > 0 else ""
            raise TrainError(f"rank {rank} could not attach the adapter{where}: "
                             f"{got['error']}{hint}", 2 if hint else 1)
    reference = ranks[0]["signature"]
    for rank, got in enumerate(ranks[1:], start=1):
        if got["signature"] != reference:
            differ = sorted(set(map(tuple, got["signature"])) ^ set(map(tuple, reference)))
            raise TrainError(f"rank {rank} built another adapter than rank 0 (first difference: "
                             f"{differ[0] if differ else '?'}): a variant whose tensors depend on "
                             f"the weights' values cannot be built on meta; {NO_META}")


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"

