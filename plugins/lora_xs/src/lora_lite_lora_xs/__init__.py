"""LoRA-XS for lora-lite (found through the ``lora_lite`` entry point ``lora_lite_lora_xs.plugin``)."""
