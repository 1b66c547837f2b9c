"""lora-lite DoRA (factored row norm) vs PEFT's use_dora=True: time per training step, peak step
memory and adapter-tensor bytes, on one random Llama, fp32 or a bitsandbytes 4bit base.

Both sides hold the same A, B, m (so they compute the same function: checked first), then run
interleaved training steps (forward with labels, backward, AdamW); medians and ratios printed.
Peak memory as in plugins/hra/benchmarks/hra_vs_peft.py (tensor memory of one step, profiler
events on CPU, max_memory_allocated on CUDA).

    python plugins/dora/benchmarks/dora_vs_peft.py                 # fp32
    python plugins/dora/benchmarks/dora_vs_peft.py --quantize 4bit
"""
import argparse
import copy
import importlib.util
import logging
import os
import statistics
import warnings

import torch

import lora_lite as ll
from lora_lite.quantize import quantize_model

_HRA = os.path.join(os.path.dirname(__file__), "..", "..", "hra", "benchmarks", "hra_vs_peft.py")
_spec = importlib.util.spec_from_file_location("hra_vs_peft", _HRA)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)   # build_model, trainer, timed, peak_step_memory


def adapter_bytes(model, marker):
    return sum(t.numel() * t.element_size() for n, t in
               list(model.named_parameters()) + list(model.named_buffers()) if marker in n)


def make_pair(args):
    from peft import LoraConfig, get_peft_model
    base = bench.build_model(args.hidden, args.layers, args.vocab, args.seq)
    if args.quantize:
        base = quantize_model(base, args.quantize)
    base = base.to(args.device)
    ours = copy.deepcopy(base)
    ll.attach(ours, ll.config("dora", r=args.r, alpha=2 * args.r, target_names=[r"q_proj$", r"v_proj$"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in ll.adapter_tensors(ours).items():
            if name.endswith("lora_B"):
                t.normal_(0, 0.01, generator=g)
    theirs = get_peft_model(base, LoraConfig(r=args.r, lora_alpha=2 * args.r, use_dora=True,
                                             target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, module in theirs.named_modules():
            if "default" in getattr(module, "lora_A", {}):
                layer = ours.get_submodule(name.replace("base_model.model.", ""))
                module.lora_A["default"].weight.copy_(layer.lora_A)
                module.lora_B["default"].weight.copy_(layer.lora_B)
                module.lora_magnitude_vector["default"].weight.copy_(layer.lora_m)
    return ours, theirs


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--quantize", choices=["4bit", "8bit"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    ours, theirs = make_pair(args)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        gap = (ours(**batch).logits - theirs(**batch).logits).abs().max().item()
    ours.train(), theirs.train()
    methods = {"lora-lite": bench.trainer(ours), "peft": bench.trainer(theirs)}
    for step, _ in methods.values():
        for _ in range(args.warmup):
            step(batch)
    times = {n: [] for n in methods}
    order = list(methods)
    for i in range(args.rounds):
        for n in order[i % 2:] + order[:i % 2]:
            times[n].append(bench.timed(methods[n][0], batch, args.device))
    memory = {n: bench.peak_step_memory(s, batch, args.device) for n, (s, _) in methods.items()}
    med = {n: statistics.median(t) for n, t in times.items()}
    sizes = {"lora-lite": adapter_bytes(ours, "lora_"), "peft": adapter_bytes(theirs, "lora_")}
    print(f"Llama hidden {args.hidden}, {args.layers} layer(s), base {args.quantize or 'fp32'}; DoRA "
          f"r={args.r} on q/v; {args.batch}x{args.seq} tokens on {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"same function: max |logits diff| = {gap:.2e}")
    for n in methods:
        print(f"{n:10} median {med[n]:.3f} s/step  peak step memory {memory[n] / 2**20:.1f} MiB  "
              f"adapter tensors {sizes[n] / 2**10:.1f} KiB")
    print(f"ratios (lora-lite / peft): time per step {med['lora-lite'] / med['peft']:.2f}x, peak "
          f"step memory {memory['lora-lite'] / memory['peft']:.2f}x ({args.rounds} interleaved rounds)")


if __name__ == "__main__":
    main()
