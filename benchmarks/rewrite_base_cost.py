"""Step-time and FLOP cost of ``rewrite_base=False`` (the default of PiSSA and the AntiPaSTO
family: keep W, subtract the initial factors in the hook) against ``rewrite_base=True``.

    .venv/bin/python benchmarks/rewrite_base_cost.py [--model smollm2] [--steps 9] [--seq 128]

Two copies of the model, one per setting, trained step for step in alternation (forward +
backward + AdamW on an LM loss, the same batch), so machine load hits both alike; prints the
median step time of each, their ratio, and the FLOPs per token of forward + backward of each
(torch FlopCounterMode; the frozen base gets no weight gradient, so compare the two settings
with each other, not with the fully trainable base model).
"""
import argparse
import copy
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import lora_lite as ll
from lora_lite_cli.models import load_model


def step(model, opt, batch):
    t = time.perf_counter()
    opt.zero_grad()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    opt.step()
    return time.perf_counter() - t


def flops_per_token(model, batch):
    with FlopCounterMode(display=False) as counter:
        model(**batch, labels=batch["input_ids"]).loss.backward()
    return counter.get_total_flops() / batch["input_ids"].numel()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--variants", default="pissa,antipasto")
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    base, _ = load_model(args.model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (2, args.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for name in args.variants.split(","):
        runs = {}
        for rewrite in (True, False):
            model = copy.deepcopy(base).train()
            ll.attach(model, ll.config(name, target_names=[r"(q_proj|v_proj)$"], target_roles=(),
                                       rewrite_base=rewrite))
            opt = torch.optim.AdamW(ll.trainable_parameters(model), lr=1e-4)
            runs[rewrite] = [model, opt, [], flops_per_token(model, batch)]
            step(model, opt, batch)  # warm-up
        for _ in range(args.steps):
            for rewrite in (True, False):
                model, opt, times, _ = runs[rewrite]
                times.append(step(model, opt, batch))
        med = {k: statistics.median(v[2]) * 1000 for k, v in runs.items()}
        print(f"{name}: step ms rewrite_base=True {med[True]:.0f}, False {med[False]:.0f} "
              f"(ratio {med[False] / med[True]:.3f}); FLOPs/token fwd+bwd True "
              f"{runs[True][3] / 1e6:.2f}M, False {runs[False][3] / 1e6:.2f}M (False adds "
              f"{(runs[False][3] - runs[True][3]) / 1e6:.2f}M, "
              f"{100 * (runs[False][3] / runs[True][3] - 1):.2f}%)", flush=True)
        del runs


if __name__ == "__main__":
    main()
