"""Mixed batches of K LoRA adapters (row b uses adapter b mod K): lora-lite's ``ll.rows`` vs
PEFT's ``adapter_names=``, forward (inference) time per batch, K = 1, 4, 16, on one random Llama.

Both sides hold the same adapters (checked first: same logits); calls are interleaved with a
rotating order, medians printed with the ratio to PEFT and the overhead over a batch run by a
single adapter (lora-lite's own one-adapter forward).

    python plugins/lora/benchmarks/mixed_batch_vs_peft.py --hidden 256 --seq 64 --batch 16
"""
import copy
import statistics

import torch

import lora_lite as ll
from lora_lite.testing import bench

TARGETS = [r"q_proj$", r"v_proj$"]


def make_pair(base, k, r):
    from peft import LoraConfig, get_peft_model
    ours = copy.deepcopy(base)
    names = [f"t{i}" for i in range(k)]
    g = torch.Generator().manual_seed(1)
    for name in names:
        ll.attach(ours, ll.config("lora", r=r, alpha=2 * r, target_names=TARGETS, target_roles=()), name=name)
        with torch.no_grad():
            for p in ll.trainable_parameters(ours, name=name):
                p.normal_(0, 0.02, generator=g)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    theirs = get_peft_model(copy.deepcopy(base), cfg, adapter_name=names[0])
    for name in names[1:]:
        theirs.add_adapter(name, cfg)
    with torch.no_grad():
        for name in names:
            for t in ll.attached(ours, name).targets:
                layer = theirs.base_model.model.get_submodule(t.name)
                layer.lora_A[name].weight.copy_(getattr(t.layer, f"lora_A__{name}"))
                layer.lora_B[name].weight.copy_(getattr(t.layer, f"lora_B__{name}"))
    return ours.eval(), theirs.eval(), names


def main():
    p = bench.arg_parser(__doc__.split("\n")[0])
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--ks", default="1,4,16")
    args = p.parse_args()
    bench.quiet()
    base = bench.random_llama(args.hidden, args.layers, args.vocab, args.seq).to(args.device)
    batch = bench.token_batch(args)
    print(f"hidden {args.hidden}, layers {args.layers}, batch {args.batch} x seq {args.seq}, r {args.r}, "
          f"{args.rounds} rounds, device {args.device}; forward s/batch, medians")
    print("ratios (lora-lite / peft) in the ratio column; overhead = lora-lite mixed / lora-lite one adapter")
    print(f"{'K':>3} {'lora-lite':>10} {'peft':>10} {'ratio':>6} {'single':>10} {'overhead':>8}")
    for k in [int(v) for v in args.ks.split(",")]:
        ours, theirs, names = make_pair(base, k, args.r)
        rows = [names[b % k] for b in range(args.batch)]
        with torch.no_grad():
            with ll.rows(ours, rows):
                gap = (ours(**batch).logits - theirs(**batch, adapter_names=rows).logits).abs().max().item()
        assert gap < 1e-4, f"K={k}: the two sides differ by {gap:.3g}"
        print(f"K={k}: same function (max |logit difference| {gap:.2g})")

        def run_ours(ours=ours, rows=rows):
            with torch.no_grad(), ll.rows(ours, rows):
                ours(**batch)

        def run_theirs(theirs=theirs, rows=rows):
            with torch.no_grad():
                theirs(**batch, adapter_names=rows)

        def run_single(ours=ours, names=names):
            with torch.no_grad(), ll.using(ours, names[0]):
                ours(**batch)
        times = bench.interleaved_calls({"ours": run_ours, "peft": run_theirs, "single": run_single},
                                        args.warmup, args.rounds, args.device)
        med = {n: statistics.median(t["wall"]) for n, t in times.items()}
        print(f"{k:>3} {med['ours']:>10.4f} {med['peft']:>10.4f} {med['ours'] / med['peft']:>5.2f}x "
              f"{med['single']:>10.4f} {med['ours'] / med['single']:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
