"""Tiny MoE models for the parameter-target tests (fused 3-D experts, built from configs)."""
import torch


def tiny_qwen3_moe(seed=0, hidden=32, experts=4):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(hidden_size=hidden, intermediate_size=48, moe_intermediate_size=24,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            num_experts=experts, num_experts_per_tok=2, vocab_size=64,
                            decoder_sparse_step=1, mlp_only_layers=[], head_dim=hidden // 4)
    return Qwen3MoeForCausalLM(config).eval()


def tiny_mixtral(seed=0, hidden=32, experts=4):
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(seed)
    config = MixtralConfig(hidden_size=hidden, intermediate_size=24, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
                           num_experts_per_tok=2, vocab_size=64, head_dim=hidden // 4)
    return MixtralForCausalLM(config).eval()


def tiny_olmoe(seed=0, hidden=32, experts=4):
    from transformers import OlmoeConfig, OlmoeForCausalLM
    torch.manual_seed(seed)
    config = OlmoeConfig(hidden_size=hidden, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_experts=experts,
                         num_experts_per_tok=2, vocab_size=64)
    return OlmoeForCausalLM(config).eval()


MOE_MODELS = {"qwen3_moe": tiny_qwen3_moe, "mixtral": tiny_mixtral, "olmoe": tiny_olmoe}


def ids(seed=1, batch=2, length=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (batch, length), generator=g)
