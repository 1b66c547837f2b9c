"""Test setup for lora-lite-vera.

A plugin author runs these tests after ``pip install -e ".[test]"``: lora-lite then finds ``vera``
through the entry point, exactly as users' installs do. When the plugin is not installed (e.g.
lora-lite's own CI runs every test folder of its repository without installing this example),
the source tree's plugin module is registered in-process for each test and removed afterwards.
"""
import pathlib
import sys

import pytest

import lora_lite as ll
from lora_lite import plugins

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"


def plugin_module():
    try:
        import lora_lite_vera.plugin as module
    except ImportError:
        sys.path.insert(0, str(SRC))
        import lora_lite_vera.plugin as module
    return module


@pytest.fixture(autouse=True)
def vera_available():
    if "vera" in ll.variants():
        yield
        return
    plugins.register_plugin(plugin_module(), "vera", "lora-lite-vera", "0.1.0")
    try:
        yield
    finally:
        if "vera" in ll.variants():
            plugins.unregister_plugin("vera")
