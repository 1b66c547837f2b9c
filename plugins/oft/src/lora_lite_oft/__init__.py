"""OFT and BOFT for lora-lite (found through the ``lora_lite`` entry point ``lora_lite_oft.plugin``)."""
