"""Built-in commands; each module decorates ``lora_lite_cli.app.app``."""
