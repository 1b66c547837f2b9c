"""Testing variants: ``check_variant``, the conformance kit for plugin authors, and the test bed
(tiny random models, batches, logits, raw invariant measurements, a few training steps, PEFT
layer pairs for parity tests) it runs on, and in-process plugins with a toy variant for tests of
code that consumes variants (``registered``, ``plugin_of``, ``gain_variant``).

    from lora_lite.testing import check_variant
    figures = check_variant(MyVariant, r=4)       # registered or not; raises on the first failure
    figures = check_variant("lora", bases=("fp32", "4bit", "8bit"))

Needs ``transformers`` (tiny random Llama) and, for quantized bases, ``bitsandbytes``; PEFT only
for the parity check. None of them is a runtime dependency of lora-lite; nothing downloads.
"""
from ..layers.quantize import quantize_model as quantize
from .conformance import VariantCheckFailed, check_variant
from .testbed import (
           BASES,
           backward_lm,
           bf16_figures,
           clone_model,
           logits,
           loss_of,
           make_batch,
           measure_invariants,
           model_maker,
           peft_layer_pairs,
           perturb,
           same_kernel_logits,
           snapshot_state,
           state_equal,
           tiny_llama,
           train_steps,
)
from .toy_plugins import gain_variant, plugin_of, registered

__all__ = ["BASES", "VariantCheckFailed", "backward_lm", "bf16_figures", "check_variant", "clone_model",
           "gain_variant", "logits", "loss_of", "make_batch", "measure_invariants", "model_maker",
           "peft_layer_pairs", "perturb", "plugin_of", "quantize", "registered",
           "same_kernel_logits", "snapshot_state", "state_equal", "tiny_llama", "train_steps"]
