"""lora-lite DoRA (factored row norm) vs PEFT's use_dora=True: time per training step, peak step
memory and adapter-tensor bytes, on one random Llama, fp32 or a bitsandbytes 4bit base.

Both sides hold the same A, B, m (so they compute the same function: checked first), then run
interleaved training steps (forward with labels, backward, AdamW); medians and ratios printed.
Timing and peak memory (tensor memory of one step, profiler events on CPU,
max_memory_allocated on CUDA) as ``lora_lite.testing.bench`` measures them.

    python plugins/dora/benchmarks/dora_vs_peft.py                 # fp32
    python plugins/dora/benchmarks/dora_vs_peft.py --quantize 4bit
"""
import copy

import torch

import lora_lite as ll
from lora_lite.layers.quantize import quantize_model
from lora_lite.testing import bench


def adapter_bytes(model, marker):
    return sum(t.numel() * t.element_size() for n, t in
               list(model.named_parameters()) + list(model.named_buffers()) if marker in n)


def make_pair(args):
    from peft import LoraConfig, get_peft_model
    base = bench.random_llama(args.hidden, args.layers, args.vocab, args.seq)
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
    p = bench.arg_parser(__doc__.split("\n")[0])
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--quantize", choices=["4bit", "8bit"])
    args = p.parse_args()
    bench.quiet()
    ours, theirs = make_pair(args)
    batch = bench.token_batch(args)
    with torch.no_grad():
        gap = (ours(**batch).logits - theirs(**batch).logits).abs().max().item()
    steps = {"lora-lite": bench.trainer(ours.train()), "peft": bench.trainer(theirs.train())}
    times = bench.interleaved_times(steps, batch, args)
    memory = bench.step_memories(steps, batch, args.device)
    print(f"Llama hidden {args.hidden}, {args.layers} layer(s), base {args.quantize or 'fp32'}; DoRA "
          f"r={args.r} on q/v; {args.batch}x{args.seq} tokens on {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"same function: max |logits diff| = {gap:.2e}")
    bench.print_table(times, memory, args)
    for name, model in (("lora-lite", ours), ("peft", theirs)):
        print(f"{name:12} adapter tensors {adapter_bytes(model, 'lora_') / 2**10:.1f} KiB")


if __name__ == "__main__":
    main()
