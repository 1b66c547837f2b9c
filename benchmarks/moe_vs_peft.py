"""lora-lite vs PEFT LoRA on fused MoE experts (target_parameters): time per step, peak memory.

A benchmark, not a test: a random Qwen3-MoE (fp32, CPU unless --device cuda), LoRA of rank r on
every routed expert's gate_up_proj and down_proj (one adapter per expert), the same tensors on
both sides (checked first: same function). Then interleaved training steps (forward with
labels, backward, AdamW) and the peak tensor memory of one step, as ``lora_lite.testing.bench``
measures them (medians; ratios lora-lite / PEFT).

    python benchmarks/moe_vs_peft.py                    # a few minutes on 2 CPU cores
    python benchmarks/moe_vs_peft.py --hidden 512 --experts 16 --rounds 7
"""
import copy

import torch

import lora_lite as ll
from lora_lite.testing import bench

EXPERTS = [r"mlp\.experts\.gate_up_proj$", r"mlp\.experts\.down_proj$"]


def random_moe(args):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    torch.manual_seed(0)
    config = Qwen3MoeConfig(hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                            moe_intermediate_size=args.hidden // 2, num_hidden_layers=args.layers,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=args.hidden // 8,
                            num_experts=args.experts, num_experts_per_tok=2, vocab_size=args.vocab,
                            decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=args.seq)
    return Qwen3MoeForCausalLM(config)


def make_pair(args):
    from peft import LoraConfig, get_peft_model
    base = random_moe(args).to(args.device)
    ours = copy.deepcopy(base)
    ll.attach(ours, ll.config("lora", r=args.r, alpha=2 * args.r, target_parameters=EXPERTS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in ll.adapter_tensors(ours).values():
            t.copy_(0.02 * torch.randn(t.shape, generator=g).to(t.device))
    ll.export_peft(ours, args.folder)
    peft_model = get_peft_model(base, LoraConfig(
        r=args.r, lora_alpha=2 * args.r, target_modules=[],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    set_peft_model_state_dict(peft_model, load_file(f"{args.folder}/adapter_model.safetensors"))
    return ours, peft_model


def main():
    p = bench.arg_parser(__doc__.split("\n")[0])
    p.set_defaults(hidden=256, layers=2, seq=128, batch=4)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--folder", default="/tmp/lora-lite-moe-bench")
    args = p.parse_args()
    bench.quiet()
    ours, peft_model = make_pair(args)
    batch = bench.token_batch(args)
    with torch.no_grad():
        gap = (ours(**batch).logits - peft_model(**batch).logits).abs().max().item()
    steps = {"lora-lite": bench.trainer(ours.train()), "peft": bench.trainer(peft_model.train())}
    print(f"model: Qwen3-MoE hidden {args.hidden}, {args.layers} layers, {args.experts} experts "
          f"(top 2), moe_intermediate {args.hidden // 2}, vocab {args.vocab}; LoRA r={args.r} per "
          f"expert on gate_up_proj and down_proj; batch {args.batch} x seq {args.seq}; fp32 on "
          f"{args.device} with {torch.get_num_threads()} threads; torch {torch.__version__}")
    print(f"same function: max |logits(lora-lite) - logits(peft)| = {gap:.2e}; trainable "
          f"parameters: lora-lite {steps['lora-lite'][1]}, peft {steps['peft'][1]}")
    times = bench.interleaved_times(steps, batch, args)
    print()
    bench.print_table(times, bench.step_memories(steps, batch, args.device), args)


if __name__ == "__main__":
    main()
