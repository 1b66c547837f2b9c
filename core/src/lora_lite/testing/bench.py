"""Side-by-side training-step benchmarks (lora-lite against PEFT, or any two or more models):
the scaffolding the plugins' ``benchmarks/*_vs_peft.py`` scripts share, for plugin authors too.

    from lora_lite.testing import bench
    p = bench.arg_parser("my variant vs PEFT"); args = p.parse_args()
    base = bench.random_llama(args.hidden, args.layers, args.vocab, args.seq).to(args.device)
    ...                                   # ours, theirs: two adapted copies of base
    batch = bench.token_batch(args)
    steps = {"lora-lite": bench.trainer(ours), "peft": bench.trainer(theirs)}
    times = bench.interleaved_times(steps, batch, args)
    bench.print_table(times, bench.step_memories(steps, batch, args.device), args)

The measuring itself (batches, timed calls, turn order, peak memory) is ``lora_lite.testing.measure``,
shared with ``lora-lite cost-report``; this module adds the training-step scaffolding on top (and
keeps ``sync``, ``timed`` and ``turn_order`` importable from here).

- time per training step (forward with labels, backward, AdamW on what requires grad): after
  ``warmup`` steps each, ``rounds`` rounds in which every model runs one step, interleaved and
  rotating which goes first, so load from other jobs hits all of them alike; medians, min, max.
- peak memory of one step: the most tensor memory allocated at once during the step, above what
  was alive when it began (torch.profiler memory events on CPU, max_memory_allocated on CUDA):
  activations saved for backward, gradients, temporaries; not the Python heap or allocator cache.
- ``floor_model``: the same base with no adapter, only one trainable scalar per target scaling
  its input, so backward runs through the same graph: the frozen-base cost no adapter can beat.

Needs ``transformers`` for ``random_llama`` (nothing downloads: a random model from a config).
"""
from __future__ import annotations

import argparse
import copy
import logging
import re
import statistics
import warnings

import torch

from . import measure
from .measure import sync, timed, turn_order

__all__ = ["arg_parser", "floor_model", "interleaved_calls", "interleaved_times", "peak_step_memory", "print_table",
           "quiet", "random_llama", "step_memories", "sync", "timed", "token_batch", "trainer", "turn_order"]


def arg_parser(description: str) -> argparse.ArgumentParser:
    """The model / batch / timing options every benchmark shares (add your own after)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def quiet():
    """Silence the warnings and transformers' / bitsandbytes' logging that would bury the table."""
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def random_llama(hidden: int, layers: int, vocab: int, seq: int, seed: int = 0):
    """A random LlamaForCausalLM (fp32, CPU): intermediate 11/4 · hidden, heads of 64, 4 query
    heads per key/value head."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=max(1, hidden // 256), vocab_size=vocab,
                         max_position_embeddings=seq, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def token_batch(args, seed: int = 0) -> dict:
    """Random input_ids (args.batch, args.seq) below args.vocab, on args.device, full mask."""
    return measure.token_batch(args.vocab, args.batch, args.seq, seed, args.device)


def trainer(model):
    """(step, trainable parameter count): step(batch) = forward with labels, backward, AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

    def step(batch):
        opt.zero_grad(set_to_none=True)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
    return step, sum(p.numel() for p in params)


def floor_model(base, target_pattern: str):
    """A copy of ``base`` with every parameter frozen and, on each module whose name matches
    ``target_pattern`` (re.search), a forward pre-hook x ↦ x · t with one trainable scalar t = 1:
    the step then backpropagates through the same graph as an adapter on those modules, at
    almost no cost of its own."""
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    found = [m for n, m in model.named_modules() if n and re.search(target_pattern, n)]
    if not found:
        raise ValueError(f"floor_model: no module name matches {target_pattern!r}")
    for module in found:
        module.floor_scale = torch.nn.Parameter(torch.ones((), device=next(base.parameters()).device))
        module.register_forward_pre_hook(lambda mod, args: (args[0] * mod.floor_scale, *args[1:]))
    return model


def interleaved_calls(fns: dict, warmup: int, rounds: int, device) -> dict[str, dict]:
    """fns: name -> callable. ``warmup`` calls each, then ``rounds`` rounds of one call per name,
    rotating which goes first. name -> {"wall": [s, ...], "cpu": [s, ...]} (CPU time of this
    process: on a CPU shared with other jobs it is far less perturbed than wall time when the
    run uses one thread; meaningless on CUDA)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    return measure.interleaved({"call": fns}, rounds, device)["call"]


def interleaved_times(steps: dict, batch, args) -> dict[str, dict]:
    """steps: name -> step or (step, n_params); interleaved_calls of step(batch) with
    args.warmup and args.rounds."""
    runs = {name: s[0] if isinstance(s, tuple) else s for name, s in steps.items()}
    fns = {name: (lambda step=step: step(batch)) for name, step in runs.items()}
    return interleaved_calls(fns, args.warmup, args.rounds, args.device)


def peak_step_memory(step, batch, device) -> int:
    """Peak tensor bytes alive at once during one step, above those alive at its start
    (``measure.PeakMemory`` with ``cpu="tensors"``)."""
    with measure.PeakMemory(device, cpu="tensors") as mem:
        step(batch)
    return mem.peak_bytes


def step_memories(steps: dict, batch, device) -> dict[str, int]:
    return {name: peak_step_memory(s[0] if isinstance(s, tuple) else s, batch, device)
            for name, s in steps.items()}


def print_table(times: dict, memory: dict | None, args, reference: str = "peft", unit: str = "s/step"):
    """Per name: median / min / max wall time, median CPU time (on CPU), peak step memory; then
    every other name's ratios to ``reference`` (ratios of medians). Returns the wall medians."""
    cpu_col = not str(args.device).startswith("cuda")
    med = {n: statistics.median(t["wall"]) for n, t in times.items()}
    cpu = {n: statistics.median(t["cpu"]) for n, t in times.items()}
    print(f"{'':12} {'median ' + unit:>13} {'min':>8} {'max':>8}" + (f" {'median CPU':>10}" if cpu_col else "")
          + (f"   {'peak step memory':>16}" if memory else ""))
    for name, t in times.items():
        print(f"{name:12} {med[name]:13.4f} {min(t['wall']):8.4f} {max(t['wall']):8.4f}"
              + (f" {cpu[name]:10.4f}" if cpu_col else "")
              + (f"   {memory[name] / 2**20:13.1f} MiB" if memory else ""))
    for name in times:
        if name == reference or reference not in times:
            continue
        t = med[name] / med[reference]
        line = f"ratios ({name} / {reference}): time {t:.2f}x (inverse {1 / t:.2f}x)"
        if cpu_col:
            line += f", CPU time {cpu[name] / cpu[reference]:.2f}x"
        if memory:
            line += f", peak step memory {memory[name] / max(memory[reference], 1):.2f}x"
        print(line)
    print(f"({args.rounds} interleaved rounds after {args.warmup} warm-up calls each; "
          f"{torch.get_num_threads()} threads)")
    return med
