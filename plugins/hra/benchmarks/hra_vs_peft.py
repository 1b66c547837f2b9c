"""lora-lite HRA vs PEFT HRA on the same model: time per training step and peak memory.

A benchmark, not a test: both adapters sit on identical copies of one random
Llama (fp32, CPU unless --device cuda), with the same Householder vectors, so they compute the
same function (checked first). Then:

- time per training step (forward with labels, backward, AdamW step on the adapter): after
  --warmup steps each, --rounds rounds in which both run one step, interleaved and alternating
  which goes first; the median per method and the ratio of medians are printed.
- peak memory of one training step: the highest amount of tensor memory allocated during the
  step and alive at once, above what was alive when the step began, as PyTorch's own allocator
  reports it (torch.profiler memory events on CPU, torch.cuda.max_memory_allocated on CUDA). It
  counts tensors only (activations saved for backward, gradients, temporaries), not the Python
  heap or allocator caching, so it is the memory the method itself asks for.

    python plugins/hra/benchmarks/hra_vs_peft.py            # ~1-2 minutes on 2 CPU cores
    python plugins/hra/benchmarks/hra_vs_peft.py --hidden 2048 --rounds 3
    python plugins/hra/benchmarks/hra_vs_peft.py --naive     # + the literal per-token loop

--naive adds a third copy whose hook applies the reflections to x itself, one at a time
(x ← x − 2 (x·v) v): the same function, but autograd keeps r copies of x (r × tokens × d_in),
which is why lora-lite applies them to the r × r coefficient map instead.
"""
import argparse
import copy
import logging
import statistics
import time
import warnings

import torch

import lora_lite as ll


def build_model(hidden, layers, vocab, seq, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=max(1, hidden // 256), vocab_size=vocab,
                         max_position_embeddings=seq, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


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
    base = build_model(args.hidden, args.layers, args.vocab, args.seq).to(args.device)
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


def trainer(model):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

    def step(batch):
        opt.zero_grad(set_to_none=True)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
    return step, sum(p.numel() for p in params)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(step, batch, device):
    sync(device)
    t0 = time.perf_counter()
    step(batch)
    sync(device)
    return time.perf_counter() - t0


def peak_step_memory(step, batch, device):
    """Peak tensor bytes alive at once during one step, above those alive at its start."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(batch)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(batch)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--naive", action="store_true", help="also time the literal per-token loop")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)

    ours, peft_model = make_pair(args)
    naive = make_naive(ours) if args.naive else None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        a, b = ours(**batch).logits, peft_model(**batch).logits
    gap = (a - b).abs().max().item()
    ours.train(), peft_model.train()
    methods = {"lora-lite": trainer(ours), "peft": trainer(peft_model)}
    if naive is not None:
        with torch.no_grad():
            gap_naive = (naive(**batch).logits - a).abs().max().item()
        naive.train()
        methods["naive loop"] = trainer(naive)
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, intermediate "
          f"{args.hidden * 11 // 4}, vocab {args.vocab}; HRA r={args.r} on q_proj and v_proj; "
          f"batch {args.batch} x seq {args.seq} = {args.batch * args.seq} tokens; fp32 on "
          f"{args.device} with {torch.get_num_threads()} threads; torch {torch.__version__}")
    print(f"same function: max |logits(lora-lite) - logits(peft)| = {gap:.2e}; trainable "
          f"parameters: lora-lite {methods['lora-lite'][1]}, peft {methods['peft'][1]}")
    if naive is not None:
        print(f"naive loop: max |logits - logits(lora-lite)| = {gap_naive:.2e}")

    for name, (step, _) in methods.items():
        for _ in range(args.warmup):
            step(batch)
    times = {name: [] for name in methods}
    order = list(methods)
    for i in range(args.rounds):
        for name in order[i % len(order):] + order[:i % len(order)]:   # rotate who goes first
            times[name].append(timed(methods[name][0], batch, args.device))
    memory = {name: peak_step_memory(step, batch, args.device) for name, (step, _) in methods.items()}

    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"\n{'':10} {'median s/step':>13} {'min':>7} {'max':>7}   {'peak step memory':>16}")
    for name in methods:
        print(f"{name:10} {med[name]:13.3f} {min(times[name]):7.3f} {max(times[name]):7.3f}   "
              f"{memory[name] / 2**20:13.1f} MiB")
    print(f"\nratios (peft / lora-lite): time per step {med['peft'] / med['lora-lite']:.2f}x, "
          f"peak step memory {memory['peft'] / memory['lora-lite']:.2f}x "
          f"({args.rounds} interleaved rounds after {args.warmup} warm-up steps each)")
    if naive is not None:
        print(f"ratios (naive loop / lora-lite): time per step "
              f"{med['naive loop'] / med['lora-lite']:.2f}x, peak step memory "
              f"{memory['naive loop'] / memory['lora-lite']:.2f}x")


if __name__ == "__main__":
    main()
