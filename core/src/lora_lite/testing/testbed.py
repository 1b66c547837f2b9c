"""The test bed: tiny random models, batches, logits and the raw invariant measurements.

``lora_lite.testing`` re-exports all of it next to ``check_variant`` (``conformance``), which
judges these measurements. Needs ``transformers`` and, for quantized bases, ``bitsandbytes``.
"""
from __future__ import annotations

import copy
import os
import tempfile

import torch

from ..adapter_file import load, save
from ..attach import adapter_tensors, attach, detach, trainable_parameters
from ..layers.quantize import quantize_model as quantize
from ..layers.weights import guard_training

BASES = ("fp32", "4bit", "8bit")


def tiny_llama(seed=0, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=128,
               bias=False):
    """A random LlamaForCausalLM built from a config (fp32, eval mode, no download).
    ``bias=True``: every projection has a random bias (N(0, 0.1))."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=intermediate,
                         vocab_size=vocab, max_position_embeddings=128, tie_word_embeddings=False,
                         attention_bias=bias, mlp_bias=bias)
    config._name_or_path = f"tiny-random-llama-seed{seed}"
    model = LlamaForCausalLM(config).eval()
    if bias:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.Linear) and m.bias is not None:
                    m.bias.normal_(0.0, 0.1)
    return model


def model_maker(base="fp32", **tiny_kwargs):
    """A no-argument function building a fresh ``tiny_llama`` on ``base``: fp32, 4bit or 8bit."""
    if base not in BASES:
        raise ValueError(f"base must be one of {BASES}, not {base!r}")
    if base == "fp32":
        return lambda: tiny_llama(**tiny_kwargs)
    return lambda: quantize(tiny_llama(**tiny_kwargs), base)


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


def train_steps(model, batch=None, steps=3, lr=1e-2):
    """``steps`` AdamW steps (no weight decay) of the LM loss on ``batch`` (``make_batch()``) over
    the adapter's trainable tensors; the model is left in eval mode, gradients cleared."""
    batch = make_batch() if batch is None else batch
    opt = torch.optim.AdamW(trainable_parameters(model), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()


def backward_lm(*models, batch=None):
    """One backward of the LM loss on ``batch`` (``make_batch()``) through each model, in train
    mode: gradients to compare between implementations."""
    batch = make_batch() if batch is None else batch
    for model in models:
        model.train()
        loss_of(model, batch).backward()


def peft_layer_pairs(peft_model, model, tensor="lora_A"):
    """(PEFT's tuner layer, the same layer of ``model``) for every module of ``peft_model`` whose
    ``tensor`` dict (PEFT's per-adapter ModuleDict / ParameterDict, e.g. lora_A, hra_u) holds
    the "default" adapter; for copying values between the two in parity tests."""
    for name, module in peft_model.named_modules():
        if "default" in getattr(module, tensor, {}):
            yield module, model.get_submodule(name.removeprefix("base_model.model."))


def perturb(model, std=0.1, seed=1, replace=False):
    """Move every trainable adapter tensor off its init (adds N(0, std²), or ``replace`` it by
    N(0, std²)), so a comparison with another implementation is not trivially the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in trainable_parameters(model):
            noise = std * torch.randn(t.shape, generator=g).to(t.device, t.dtype)
            t.copy_(noise) if replace else t.add_(noise)


def measure_invariants(make_model, cfg, batch, calibration_data=None, steps=3, lr=1e-2):
    """Run the invariants of the variant contract on fresh models from ``make_model()``.

    Returns the measured figures (``check_variant`` judges them; tests and reports print them):
    identity_err, rewrote_base (attach wrote into a base weight), trainable, grad_norm_first, grad_norm_after_eval,
    zero_grad_adapters (count) and zero_grad_names, base_grad_leaks (count) and leak_names, base_changed, trained_delta,
    reload_err, file_keys, file_bytes, detach_bitexact, detach_logits_err.
    """
    model = make_model()
    ref = same_kernel_logits(model, batch)
    before = snapshot_state(model)
    attach(model, cfg, calibration_data=calibration_data)
    rewrote = _rewrites(model)
    adapted0 = logits(model, batch)
    out = {"identity_err": (adapted0 - ref).abs().max().item(), "rewrote_base": rewrote}
    out.update(_train(model, batch, steps, lr))
    trained = logits(model, batch)
    out["trained_delta"] = (trained - adapted0).abs().max().item()
    adapter_keys = {k for k in model.state_dict() if ".lora_" in k}
    now = snapshot_state(model)
    out["base_changed"] = not all(
        torch.equal(now[k], before[k]) for k in before if k in now and k not in adapter_keys) \
        if not rewrote else None
    out.update(_reload(model, make_model, batch, trained))
    detach(model)
    out["detach_bitexact"] = state_equal(snapshot_state(model), before)
    out["detach_logits_err"] = (same_kernel_logits(model, batch) - ref).abs().max().item()
    return out


def _train(model, batch, steps, lr):
    """``steps`` AdamW steps, evaluating between them (must not switch gradients off: the bnb
    4bit trap). Counts base parameters that got a gradient and adapter tensors that got none."""
    named = adapter_tensors(model)
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    leaks, zero, norms = set(), [], []
    model.train()
    for step in range(steps):
        opt.zero_grad()
        loss_of(model, batch).backward()
        norms.append(sum(p.grad.norm().item() for p in params if p.grad is not None))
        if step == steps - 1:  # (at step 0 LoRA's A has zero grad by design: B = 0)
            zero = [n for n, p in named.items()
                    if any(p is q for q in params) and (p.grad is None or not p.grad.any())]
        leaks |= {n for n, p in model.named_parameters()
                  if p.grad is not None and not any(p is q for q in params)}
        opt.step()
        model.eval()
        logits(model, batch)
        model.train()
    model.eval()
    return {"trainable": sum(p.numel() for p in params), "grad_norm_first": norms[0],
            "grad_norm_after_eval": norms[-1], "zero_grad_adapters": len(zero),
            "zero_grad_names": zero, "base_grad_leaks": len(leaks), "leak_names": sorted(leaks)}


def _reload(model, make_model, batch, trained):
    """save -> load on a fresh base: the file's size and keys, and the logit difference."""
    from safetensors import safe_open
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "adapter.safetensors")
        save(model, path)
        with safe_open(path, "pt") as f:
            keys = sorted(f.keys())
        fresh = make_model()
        with torch.random.fork_rng(devices=[]):
            # as in a user's new process: the global RNG is not where attach found it (building
            # a seeded tiny model resets it, so a variant drawing tensors from it would repeat)
            torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
            load(fresh, path)
        return {"file_bytes": os.path.getsize(path), "file_keys": keys,
                "reload_err": (logits(fresh, batch) - trained).abs().max().item()}


def same_kernel_logits(model, batch):
    """Base-model logits through the same kernels an attached model uses (bitsandbytes' CPU
    4-bit inference kernel differs from its training kernel by ~1e-3, unrelated to adapters)."""
    undo = guard_training(model)
    try:
        return logits(model, batch)
    finally:
        undo()


def bf16_figures(variant, model_dtype, **cfg_fields):
    """A bf16 adapter on a bf16 or fp32 tiny_llama: (identity error, whether one backward reaches
    every adapter tensor with bf16 gradients, how far one AdamW step (lr 1e-2) moves the logits)."""
    from ..config import config
    model, batch = tiny_llama().to(model_dtype), make_batch()
    ref = logits(model, batch)
    attach(model, config(variant, dtype=torch.bfloat16, **cfg_fields))
    identity = (logits(model, batch) - ref).abs().max().item()
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    model.train()
    loss_of(model, batch).backward()
    grads_ok = all(p.dtype == p.grad.dtype == torch.bfloat16 and p.grad.abs().sum() > 0
                   for p in params)
    opt.step()
    model.eval()
    return identity, grads_ok, (logits(model, batch) - ref).abs().max().item()


def _rewrites(model):
    from ..layers.weights import weight_was_rewritten
    return any(weight_was_rewritten(m) for m in model.modules())


def clone_model(model):
    return copy.deepcopy(model)
