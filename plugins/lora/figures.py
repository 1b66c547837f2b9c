"""Print the foundation figures: LoRA's invariants on fp32/4bit/8bit bases, its PEFT parity
error, and core's dequantization error on bitsandbytes layers.

    python plugins/lora/figures.py
"""
import importlib.util
import logging
import pathlib
import warnings

import torch

import lora_lite as ll
from lora_lite.testing import make_batch, measure_invariants, quantize, tiny_llama

warnings.filterwarnings("ignore")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
_spec = importlib.util.spec_from_file_location(
    "lora_tests", pathlib.Path(__file__).parent / "tests" / "test_lora.py")
T = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(T)


def peft_parity_error():
    model, batch = tiny_llama(), make_batch()
    cfg = ll.config("lora", r=4, alpha=8, **T.QV)
    ll.attach(model, cfg)
    with torch.no_grad():
        for t in ll.adapter_tensors(model).values():
            t.normal_(0, 0.2)
    twin = T.peft_twin(model, cfg)
    from lora_lite.testing import logits
    return (logits(model, batch) - logits(twin, batch)).abs().max().item()


def dequant_errors():
    """max |dense_weight(quantized) - original| / max |original| over all quantized layers."""
    rows = []
    for kind in ("4bit", "fp4", "8bit"):
        base, q = tiny_llama(), quantize(tiny_llama(), kind)
        original = dict(base.named_modules())
        worst, consistency = 0.0, 0.0
        q.train()  # the training kernel, the one adapters backpropagate through
        for name, layer in q.named_modules():
            if type(layer).__module__.startswith("bitsandbytes"):
                w0 = original[name].weight.detach()
                w = ll.dense_weight(layer)
                worst = max(worst, ((w - w0).abs().max() / w0.abs().max()).item())
                x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(0))
                with torch.no_grad():
                    consistency = max(consistency, (layer(x) - x @ w.T).abs().max().item())
        rows.append((kind, worst, consistency))
    return rows


def main():
    cfg = ll.config("lora", r=4, alpha=8, **T.QV)
    print("LoRA r=4 alpha=8 on q_proj/v_proj of tiny_llama (hidden 64, 2 layers); "
          "errors are max |logit difference|")
    print(f"{'base':6} {'identity':>9} {'reload':>9} {'trainable':>9} {'detach bit-exact':>17} {'file bytes':>10}")
    for kind in ("fp32", "4bit", "8bit"):
        m = measure_invariants(T.make(kind), cfg, make_batch())
        print(f"{kind:6} {m['identity_err']:9.1e} {m['reload_err']:9.1e} {m['trainable']:9d} "
              f"{str(m['detach_bitexact']):>17} {m['file_bytes']:10d}")
    print(f"PEFT parity (same A, B; fp32): {peft_parity_error():.1e}")
    print("dequantization: quantizer error max|W_deq - W|/max|W| (max over layers); "
          "consistency max|layer(x) - x W_deq^T| (x ~ N(0,1))")
    for kind, err, consistency in dequant_errors():
        print(f"  {kind:5} quantizer error {err:.2e}   consistency {consistency:.1e}")


if __name__ == "__main__":
    main()
