"""Built-in commands: every module in this package decorates ``lora_lite_cli.app.app``."""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
