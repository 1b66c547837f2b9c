"""IA3 for lora-lite: ``ia3`` and ``ia3_ff`` (found through the ``lora_lite`` entry point ``lora_lite_ia3.plugin``)."""
