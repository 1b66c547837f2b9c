"""lora-lite HRA vs PEFT HRA on the same model: time per training step and peak memory.

A benchmark, not a test: both adapters sit on identical copies of one random
Llama (fp32, CPU unless --device cuda), with the same Householder vectors, so they compute the
same function (checked first). Then:

interleaved training steps (forward with labels, backward, AdamW) and the peak tensor memory
of one step, as ``lora_lite.testing.bench`` measures them (medians; ratios lora-lite / PEFT and back).

    python plugins/hra/benchmarks/hra_vs_peft.py            # ~1-2 minutes on 2 CPU cores
    python plugins/hra/benchmarks/hra_vs_peft.py --hidden 2048 --rounds 3
    python plugins/hra/benchmarks/hra_vs_peft.py --naive     # + the literal per-token loop

--naive adds a third copy whose hook applies the reflections to x itself, one at a time
(x ← x − 2 (x·v) v): the same function, but autograd keeps r copies of x (r × tokens × d_in),
which is why lora-lite applies them to the r × r coefficient map instead.
"""
import copy

import torch

import lora_lite as ll
from lora_lite.testing import bench


def naive_forward_input(layer, x):
    """The literal loop on x (reference for --naive only)."""
    U = layer.lora_U
    V = U / U.norm(dim=1, keepdim=True).clamp_min(1e-12)
    for v in reversed(V):                      # H_{r-1} first
        x = x - 2.0 * (x @ v).unsqueeze(-1) * v
    return x


def make_naive(ours):
    """A copy of the lora-lite model whose hooks run the literal loop (swaps the hook's variant)."""
    naive = copy.deepcopy(ours)
    variant = type("NaiveHRA", (ll.variants()["hra"],), {"forward_input": staticmethod(naive_forward_input)})
    for module in naive.modules():
        if hasattr(module, "lora_U"):
            module._lora_variant = variant
    return naive


def make_pair(args):
    from peft import HRAConfig, get_peft_model
    base = bench.random_llama(args.hidden, args.layers, args.vocab, args.seq).to(args.device)
    ours = copy.deepcopy(base)
    ll.attach(ours, ll.config("hra", r=args.r, target_names=[r"q_proj$", r"v_proj$"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move off the identity init so both really reflect
        for t in ll.adapter_tensors(ours).values():
            t.add_(0.5 * torch.randn(t.shape, generator=g).to(t.device) * t.abs().mean())
    peft_model = get_peft_model(base, HRAConfig(r=args.r, target_modules=["q_proj", "v_proj"]))
    vectors = ll.adapter_tensors(ours)
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if hasattr(module, "hra_u") and "default" in module.hra_u:
                module.hra_u["default"].copy_(vectors[name.removeprefix("base_model.model.") + ".lora_U"].T)
    return ours, peft_model


def main():
    p = bench.arg_parser(__doc__.split("\n")[0])
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--naive", action="store_true", help="also time the literal per-token loop")
    args = p.parse_args()
    bench.quiet()
    ours, peft_model = make_pair(args)
    naive = make_naive(ours) if args.naive else None
    batch = bench.token_batch(args)
    with torch.no_grad():
        a = ours(**batch).logits
        gap = (a - peft_model(**batch).logits).abs().max().item()
        gap_naive = None if naive is None else (naive(**batch).logits - a).abs().max().item()
    steps = {"lora-lite": bench.trainer(ours.train()), "peft": bench.trainer(peft_model.train())}
    if naive is not None:
        steps["naive loop"] = bench.trainer(naive.train())
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, intermediate "
          f"{args.hidden * 11 // 4}, vocab {args.vocab}; HRA r={args.r} on q_proj and v_proj; "
          f"batch {args.batch} x seq {args.seq} = {args.batch * args.seq} tokens; fp32 on "
          f"{args.device} with {torch.get_num_threads()} threads; torch {torch.__version__}")
    print(f"same function: max |logits(lora-lite) - logits(peft)| = {gap:.2e}; trainable "
          f"parameters: lora-lite {steps['lora-lite'][1]}, peft {steps['peft'][1]}")
    if naive is not None:
        print(f"naive loop: max |logits - logits(lora-lite)| = {gap_naive:.2e}")
    times = bench.interleaved_times(steps, batch, args)
    print()
    bench.print_table(times, bench.step_memories(steps, batch, args.device), args)


if __name__ == "__main__":
    main()
