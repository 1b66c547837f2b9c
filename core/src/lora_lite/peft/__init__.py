"""PEFT interop: export to and import from PEFT folders, LoRA config helpers."""
