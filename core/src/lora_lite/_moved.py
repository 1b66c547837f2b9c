"""Old module paths kept importable for one release: ``import lora_lite.layer_kinds`` still
works, with a DeprecationWarning naming the new path (the modules moved into subpackages)."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "lora_lite.layer_kinds": "lora_lite.layers.kinds",
    "lora_lite.weights": "lora_lite.layers.weights",
    "lora_lite.bnb_backend": "lora_lite.layers.bnb",
    "lora_lite.quantize": "lora_lite.layers.quantize",
    "lora_lite.mha": "lora_lite.layers.mha",
    "lora_lite.peft_export": "lora_lite.peft.export",
    "lora_lite.peft_import": "lora_lite.peft.load",
    "lora_lite.peft_lora": "lora_lite.peft.lora",
    "lora_lite.peft_checks": "lora_lite.peft.checks",
    "lora_lite.peft_params": "lora_lite.peft.params",
    "lora_lite.peft_folders": "lora_lite.peft.folders",
    "lora_lite.hookspecs": "lora_lite.plugins.hookspecs",
    "lora_lite.conformance": "lora_lite.testing.conformance",
    "lora_lite.conformance_multi": "lora_lite.testing.conformance_multi",
    "lora_lite.testbed": "lora_lite.testing.testbed",
    "lora_lite.tiny_models": "lora_lite.testing.tiny_models",
    "lora_lite.arch_matrix": "lora_lite.testing.arch_matrix",
    "lora_lite.toy_plugins": "lora_lite.testing.toy_plugins",
    "lora_lite.bench": "lora_lite.testing.bench",
}


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``lora_lite.<old>`` to the module now at ``lora_lite.<new>``."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass


def install():
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
