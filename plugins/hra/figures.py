"""Print the issue-4 figures for hra on the tiny test Llama (fp32, 4bit, 8bit bases).

    python plugins/hra/figures.py

Uses the setup, PEFT parity and dense-reference checks of tests/test_hra.py (loaded from there).
"""
import copy
import importlib.util
import logging
import pathlib
import warnings

import torch

import lora_lite as ll
from lora_lite.testing import logits, make_batch, measure_invariants

warnings.filterwarnings("ignore")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its per-call 8-bit cast notice
_spec = importlib.util.spec_from_file_location(
    "hra_tests", pathlib.Path(__file__).parent / "tests" / "test_hra.py")
T = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(T)


def peft_on_quantized(base):
    """PEFT's HRA on a quantized base vs lora-lite's, same vectors: max logit gap, or the error."""
    from peft import HRAConfig, get_peft_model
    ours = T.make_model(base)
    ll.attach(ours, ll.config("hra", **T.KWARGS))
    T.randomize(ours)
    peft_model = get_peft_model(T.make_model(base), HRAConfig(r=T.KWARGS["r"], target_modules=T.TARGETS))
    vectors = ll.adapter_tensors(ours)
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if hasattr(module, "hra_u") and "default" in module.hra_u:
                module.hra_u["default"].copy_(vectors[name.removeprefix("base_model.model.") + ".lora_U"].T)
    try:
        return f"{(logits(ours, make_batch()) - logits(peft_model.eval(), make_batch())).abs().max().item():.2e}"
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        return f"raises {type(e).__name__}"


def main():
    cfg = ll.config("hra", **T.KWARGS)
    m = {base: measure_invariants(lambda: T.make_model(base), cfg, make_batch())
         for base in ("fp32", "4bit", "8bit")}
    parity, _ = T.peft_parity_error()
    header = ("variant", "targets", "identity fp32", "PEFT parity", "reload fp32",
              "identity 4bit", "identity 8bit", "reload 4bit", "reload 8bit", "trainable")
    row = ("hra r=4", "q_proj/v_proj", f"{m['fp32']['identity_err']:.1e}", f"{parity:.1e}",
           f"{m['fp32']['reload_err']:.1e}", f"{m['4bit']['identity_err']:.1e}",
           f"{m['8bit']['identity_err']:.1e}", f"{m['4bit']['reload_err']:.1e}",
           f"{m['8bit']['reload_err']:.1e}", str(m["fp32"]["trainable"]))
    widths = [max(len(a), len(b)) for a, b in zip(header, row)]
    for r in (header, row):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print("\nerrors: max |logit difference| on tiny_llama (hidden 64, 2 layers), make_batch(); "
          "PEFT parity on the same shape with random biases, fp32, random Householder vectors\n")
    print("one quantized q_proj, random vectors: max |error| of the hooked layer against")
    print("  base   same kernel on x·Rᵀ   dense dequantized W   wrong order x·R   |output|   PEFT HRA on this base (logits gap)")
    for base in ("fp32", "4bit", "8bit"):
        same, dense, wrong, scale = T.quantized_reference_errors(base)
        peft = peft_on_quantized(base)
        print(f"  {base:5}  {same:.2e}              {dense:.2e}              {wrong:.2e}          "
              f"{scale:.2f}       {peft}")


if __name__ == "__main__":
    main()
