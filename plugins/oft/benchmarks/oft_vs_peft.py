"""lora-lite OFT / BOFT vs PEFT's on the same model: time per training step and peak memory.

A benchmark, not a test. For each method both adapters sit on identical copies of one random
Llama (fp32, CPU unless --device cuda) holding the same (random, non-identity) adapter values,
written into PEFT through lora-lite's own ``peft_state``, so they compute the same function
(checked first). Then:

- time per training step (forward with labels, backward, AdamW step on the adapter): after
  --warmup steps each, --rounds rounds in which both run one step, interleaved and alternating
  which goes first; the median per method and the ratio of medians are printed.
- peak memory of one training step: the most tensor memory allocated at once during the step,
  above what was alive when it began (torch.profiler memory events on CPU,
  torch.cuda.max_memory_allocated on CUDA): activations saved for backward, gradients,
  temporaries; not the Python heap or allocator caching.

    python plugins/oft/benchmarks/oft_vs_peft.py                 # ~2-4 minutes on 2 CPU cores
    python plugins/oft/benchmarks/oft_vs_peft.py --only boft --factors 2 --hidden 2048

PEFT's BOFT with more than one butterfly factor needs its CUDA extension (compiled on first use
with ninja); without it PEFT silently runs one factor. On CPU, --factors > 1 therefore gives
PEFT a stand-in for that extension (torch.block_diag per factor; the rest of PEFT's forward, the
dense permutation products and x·M, is PEFT's own). With --factors 1 PEFT runs unmodified.
"""
import argparse
import copy
import logging
import statistics
import time
import warnings

import torch

import lora_lite as ll

TARGETS = ["q_proj", "v_proj"]


def build_model(hidden, layers, vocab, seq, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=max(1, hidden // 256), vocab_size=vocab,
                         max_position_embeddings=seq, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


class StandInBlockDiag:
    """PEFT's fbd_cuda interface, in torch: (N, D, b, b) -> [(N, D·b, D·b)] and its backward."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*torch.unbind(f)) for f in blocks])]

    @staticmethod
    def backward(grad, blocks):
        n, d, b, _ = blocks.shape
        return [torch.stack([torch.stack([grad[i, j * b:(j + 1) * b, j * b:(j + 1) * b]
                                          for j in range(d)]) for i in range(n)])]


def peft_extension(args):
    """What PEFT's BOFT gets for its CUDA extension (see the module docstring)."""
    import peft.tuners.boft.layer as boft_layer
    if args.factors > 1 and not args.device.startswith("cuda"):
        boft_layer.get_fbd_cuda = lambda: StandInBlockDiag
    elif not args.device.startswith("cuda"):
        boft_layer.get_fbd_cuda = lambda: None   # skip PEFT's failing compile on every layer


def make_pair(variant, args):
    import peft
    base = build_model(args.hidden, args.layers, args.vocab, args.seq).to(args.device)
    knobs = ({"block_size": args.oft_block} if variant == "oft"
             else {"block_size": args.boft_block, "n_butterfly_factor": args.factors})
    cfg = ll.config(variant, target_names=[rf"{t}$" for t in TARGETS], **knobs)
    ours = copy.deepcopy(base)
    ll.attach(ours, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move off the identity init so both really rotate
        for t in ll.adapter_tensors(ours).values():
            t.add_(0.05 * torch.randn(t.shape, generator=g).to(t.device))
    V = ll.get_variant(variant)
    theirs = peft.get_peft_model(base, peft.get_peft_config(V.peft_config(cfg, TARGETS)))
    state = {f"base_model.model.{t.name}.{k}": v for t in ll.attached(ours).targets
             for k, v in V.peft_state(t.layer, cfg).items()}
    peft.set_peft_model_state_dict(theirs, state)
    return ours, theirs, cfg


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


def compare(variant, args, batch):
    ours, theirs, cfg = make_pair(variant, args)
    with torch.no_grad():
        gap = (ours(**batch).logits - theirs(**batch).logits).abs().max().item()
    ours.train(), theirs.train()
    methods = {"lora-lite": trainer(ours), "peft": trainer(theirs)}
    for step, _ in methods.values():
        for _ in range(args.warmup):
            step(batch)
    times = {name: [] for name in methods}
    order = list(methods)
    for i in range(args.rounds):
        for name in order[i % 2:] + order[:i % 2]:            # alternate who goes first
            times[name].append(timed(methods[name][0], batch, args.device))
    memory = {name: peak_step_memory(step, batch, args.device) for name, (step, _) in methods.items()}
    med = {name: statistics.median(ts) for name, ts in times.items()}
    knobs = {k: v for k, v in cfg.to_dict().items() if k in type(cfg).knobs()}
    print(f"\n== {variant} {knobs}")
    print(f"same function: max |logits(lora-lite) - logits(peft)| = {gap:.2e}; trainable "
          f"parameters: lora-lite {methods['lora-lite'][1]}, peft {methods['peft'][1]}")
    print(f"{'':10} {'median s/step':>13} {'min':>7} {'max':>7}   {'peak step memory':>16}")
    for name in methods:
        print(f"{name:10} {med[name]:13.3f} {min(times[name]):7.3f} {max(times[name]):7.3f}   "
              f"{memory[name] / 2**20:13.1f} MiB")
    print(f"ratios (lora-lite / peft): time per step {med['lora-lite'] / med['peft']:.2f}x, "
          f"peak step memory {memory['lora-lite'] / memory['peft']:.2f}x "
          f"({args.rounds} interleaved rounds after {args.warmup} warm-up steps each)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=["oft", "boft"], help="benchmark one method only")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--oft-block", type=int, default=32, help="OFT block size b")
    p.add_argument("--boft-block", type=int, default=4, help="BOFT block size b")
    p.add_argument("--factors", type=int, default=2, help="BOFT butterfly factors m")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    peft_extension(args)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; adapters "
          f"on q_proj and v_proj; batch {args.batch} x seq {args.seq} = {args.batch * args.seq} "
          f"tokens; fp32 on {args.device} with {torch.get_num_threads()} threads; torch "
          f"{torch.__version__}")
    if args.factors > 1 and not args.device.startswith("cuda"):
        print("PEFT's BOFT runs with a torch stand-in for its CUDA block-diagonal extension")
    for variant in [args.only] if args.only else ["oft", "boft"]:
        compare(variant, args, batch)


if __name__ == "__main__":
    main()
