"""Helpers for testing variants (used by lora-lite's plugins and by third-party plugin authors).

Needs ``transformers`` (tiny random Llama) and, for quantized bases, ``bitsandbytes``; neither is
a runtime dependency of lora-lite. Nothing here downloads anything.
"""
from __future__ import annotations

import copy
import os
import tempfile

import torch
from torch import nn

from .adapter_file import load, save
from .attach import attach, detach, trainable_parameters
from .quantize import quantize_model as quantize  # noqa: F401  (kept for plugin tests)
from .weights import guard_training


def tiny_llama(seed=0, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=128):
    """A random LlamaForCausalLM built from a config (fp32, eval mode, no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=intermediate,
                         vocab_size=vocab, max_position_embeddings=128, tie_word_embeddings=False)
    config._name_or_path = f"tiny-random-llama-seed{seed}"
    return LlamaForCausalLM(config).eval()


def make_batch(vocab=128, batch=2, seq=12, seed=0, pad_first=3):
    """input_ids + attention_mask (the first row left-padded by ``pad_first`` positions)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :pad_first] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits.float()


def snapshot_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def state_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def loss_of(model, batch):
    out = model(**batch, labels=batch["input_ids"])
    return out.loss


def measure_invariants(make_model, cfg, batch, calibration_data=None, steps=3, lr=1e-2):
    """Run every invariant of design.md section 4 on fresh models from ``make_model()``.

    Returns the measured figures (tests assert on them; reports print them):
    identity_err, trainable, grad_norm_first, zero_grad_adapters, base_grad_leaks,
    base_changed, eval_between_steps_grad, trained_delta, reload_err, file_keys,
    file_bytes, detach_bitexact, detach_logits_err.
    """
    model = make_model()
    ref = same_kernel_logits(model, batch)
    before = snapshot_state(model)
    attach(model, cfg, calibration_data=calibration_data)
    adapted0 = logits(model, batch)
    out = {"identity_err": (adapted0 - ref).abs().max().item()}
    params = trainable_parameters(model)
    out["trainable"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    leaks, zero_grads, grad_norms = 0, 0, []
    for step in range(steps):
        opt.zero_grad()
        loss_of(model, batch).backward()
        grad_norms.append(sum(p.grad.norm().item() for p in params if p.grad is not None))
        if step == steps - 1:  # (at step 0 LoRA's A has zero grad by design: B = 0)
            zero_grads = sum(1 for p in params if p.grad is None or not p.grad.any())
        leaks += sum(1 for n, p in model.named_parameters()
                     if p.grad is not None and not any(p is q for q in params))
        opt.step()
        model.eval()  # evaluate between steps: must not switch gradients off (bnb 4bit trap)
        logits(model, batch)
        model.train()
    model.eval()
    out["grad_norm_first"] = grad_norms[0]
    out["grad_norm_after_eval"] = grad_norms[-1]
    out["zero_grad_adapters"] = zero_grads
    out["base_grad_leaks"] = leaks
    trained = logits(model, batch)
    out["trained_delta"] = (trained - adapted0).abs().max().item()
    adapter_keys = {f"{k}" for k in model.state_dict() if ".lora_" in k}
    now = snapshot_state(model)
    out["base_changed"] = not all(
        torch.equal(now[k], before[k]) for k in before if k in now and k not in adapter_keys) \
        if not _rewrites(model) else None
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "adapter.safetensors")
        save(model, path)
        out["file_bytes"] = os.path.getsize(path)
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            out["file_keys"] = sorted(f.keys())
        fresh = make_model()
        load(fresh, path)
        out["reload_err"] = (logits(fresh, batch) - trained).abs().max().item()
    detach(model)
    out["detach_bitexact"] = state_equal(snapshot_state(model), before)
    out["detach_logits_err"] = (same_kernel_logits(model, batch) - ref).abs().max().item()
    return out


def same_kernel_logits(model, batch):
    """Base-model logits through the same kernels an attached model uses (bitsandbytes' CPU
    4-bit inference kernel differs from its training kernel by ~1e-3, unrelated to adapters)."""
    undo = guard_training(model)
    try:
        return logits(model, batch)
    finally:
        undo()


def _rewrites(model):
    from .weights import weight_was_rewritten
    return any(weight_was_rewritten(m) for m in model.modules())


def clone_model(model):
    return copy.deepcopy(model)
