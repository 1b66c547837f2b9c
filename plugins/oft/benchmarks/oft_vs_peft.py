"""lora-lite OFT / BOFT vs PEFT's on the same model: time per training step and peak memory.

A benchmark, not a test. For each method both adapters sit on identical copies of one random
Llama (fp32, CPU unless --device cuda) holding the same (random, non-identity) adapter values,
written into PEFT through lora-lite's own ``peft_state``, so they compute the same function
(checked first). Then interleaved training steps (forward with labels, backward, AdamW) and
the peak tensor memory of one step, as ``lora_lite.testing.bench`` measures them; --floor adds the
frozen base with no adapter (one trainable scalar per target: the same backward graph), the
time no adapter can go below.

    python plugins/oft/benchmarks/oft_vs_peft.py                 # ~2-4 minutes on 2 CPU cores
    python plugins/oft/benchmarks/oft_vs_peft.py --floor --batch 2 --seq 128
    python plugins/oft/benchmarks/oft_vs_peft.py --only boft --factors 2 --hidden 2048

PEFT's BOFT with more than one butterfly factor needs its CUDA extension (compiled on first use
with ninja); without it PEFT silently runs one factor. On CPU, --factors > 1 therefore gives
PEFT a stand-in for that extension (torch.block_diag per factor; the rest of PEFT's forward, the
dense permutation products and x·M, is PEFT's own). With --factors 1 PEFT runs unmodified.
"""
import copy

import torch

import lora_lite as ll
from lora_lite.testing import bench

TARGETS = ["q_proj", "v_proj"]


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


def method_knobs(variant, args) -> dict:
    if variant == "boft":
        return {"block_size": args.boft_block, "n_butterfly_factor": args.factors}
    if args.oft_block:
        return {"block_size": args.oft_block, "blocks": 0}
    return {"block_size": 0, "blocks": args.oft_blocks}


def make_pair(variant, args):
    import peft
    base = bench.random_llama(args.hidden, args.layers, args.vocab, args.seq).to(args.device)
    knobs = method_knobs(variant, args)
    cfg = ll.config(variant, target_names=[rf"{t}$" for t in TARGETS], **knobs)
    ours = copy.deepcopy(base)
    ll.attach(ours, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move off the identity init so both really rotate
        for t in ll.adapter_tensors(ours).values():
            t.add_(0.05 * torch.randn(t.shape, generator=g).to(t.device))
    V = ll.get_variant(variant)
    theirs = peft.get_peft_model(copy.deepcopy(base),
                                peft.get_peft_config(V.peft_config(cfg, TARGETS)))
    state = {f"base_model.model.{t.name}.{k}": v for t in ll.attached(ours).targets
             for k, v in V.peft_state(t.layer, cfg).items()}
    peft.set_peft_model_state_dict(theirs, state)
    return ours, theirs, cfg, base


def compare(variant, args, batch):
    ours, theirs, cfg, base = make_pair(variant, args)
    with torch.no_grad():
        gap = (ours(**batch).logits - theirs(**batch).logits).abs().max().item()
    ours.train(), theirs.train()
    steps = {"lora-lite": bench.trainer(ours), "peft": bench.trainer(theirs)}
    if args.floor:
        steps["floor"] = bench.trainer(bench.floor_model(base, "(" + "|".join(TARGETS) + ")$").train())
    times = bench.interleaved_times(steps, batch, args)
    memory = bench.step_memories(steps, batch, args.device)
    knobs = {k: v for k, v in cfg.to_dict().items() if k in type(cfg).knobs()}
    print(f"\n== {variant} {knobs}")
    print(f"same function: max |logits(lora-lite) - logits(peft)| = {gap:.2e}; trainable "
          f"parameters: lora-lite {steps['lora-lite'][1]}, peft {steps['peft'][1]}")
    bench.print_table(times, memory, args)


def layer_costs(variant, args):
    """One target layer alone (q_proj of layer 0, args.batch · args.seq tokens): forward +
    backward to its input and adapter, for the frozen base layer, lora-lite's hooked layer and
    PEFT's; the adapter's own cost is the difference to the base layer."""
    ours, theirs, _, base = make_pair(variant, args)
    name = f"model.layers.0.self_attn.{TARGETS[0]}"
    layers = {"base layer": base.get_submodule(name), "lora-lite": ours.get_submodule(name),
              "peft": theirs.base_model.model.get_submodule(name)}
    x = torch.randn(args.batch * args.seq, args.hidden, device=args.device, requires_grad=True)
    grad = torch.randn(args.batch * args.seq, layers["base layer"].out_features, device=args.device)

    def call(layer):
        def fn():
            layer(x).backward(grad)
            x.grad = None
            for p in layer.parameters():
                p.grad = None
        return fn
    layers["base layer"].requires_grad_(False)
    with torch.no_grad():
        gap = (layers["lora-lite"](x) - layers["peft"](x)).abs().max().item()
    print(f"\nsame function: max |layer(lora-lite) - layer(peft)| = {gap:.2e}")
    times = bench.interleaved_calls({n: call(m.train()) for n, m in layers.items()}, args.warmup,
                                    args.rounds, args.device)
    print(f"\n== {variant}: one {name.rsplit('.', 1)[-1]} layer alone, forward + backward, "
          f"{args.batch * args.seq} tokens")
    med = bench.print_table(times, None, args, unit="s/call")
    base_s = med["base layer"]
    print(f"adapter alone (layer - base layer): lora-lite {1e3 * (med['lora-lite'] - base_s):.1f} ms, "
          f"peft {1e3 * (med['peft'] - base_s):.1f} ms")


def main():
    p = bench.arg_parser(__doc__.split("\n")[0])
    p.add_argument("--only", choices=["oft", "boft"], help="benchmark one method only")
    p.set_defaults(hidden=3072, batch=4, seq=256)   # PEFT's comparison shape (module docstring)
    p.add_argument("--oft-blocks", type=int, default=32, help="OFT blocks D (PEFT's r)")
    p.add_argument("--oft-block", type=int, default=0, help="OFT block size b instead of --oft-blocks")
    p.add_argument("--boft-block", type=int, default=4, help="BOFT block size b")
    p.add_argument("--factors", type=int, default=1, help="BOFT butterfly factors m")
    p.add_argument("--layer", action="store_true", help="time one target layer alone (base "
                   "layer, lora-lite's, PEFT's) instead of the training step")
    p.add_argument("--floor", action="store_true", help="also time the frozen base with no "
                   "adapter (one trainable scalar per target, so backward runs the same graph)")
    args = p.parse_args()
    bench.quiet()
    peft_extension(args)
    batch = bench.token_batch(args)
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; adapters "
          f"on q_proj and v_proj; batch {args.batch} x seq {args.seq} = {args.batch * args.seq} "
          f"tokens; fp32 on {args.device} with {torch.get_num_threads()} threads; torch "
          f"{torch.__version__}")
    if args.factors > 1 and not args.device.startswith("cuda"):
        print("PEFT's BOFT runs with a torch stand-in for its CUDA block-diagonal extension")
    for variant in [args.only] if args.only else ["oft", "boft"]:
        (layer_costs(variant, args) if args.layer else compare(variant, args, batch))


if __name__ == "__main__":
    main()
