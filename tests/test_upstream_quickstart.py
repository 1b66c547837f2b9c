"""Migration from upstream lora-lite: its quickstart (the README's "Coming from upstream
lora-lite" block, run as written on a tiny model) and ``ll.<Name>Config`` for installed plugins."""
import pathlib
import re

import pytest
import torch

import lora_lite as ll
from lora_lite import plugins
from lora_lite.testing import logits, make_batch, tiny_llama

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def quickstart_code() -> str:
    section = README.read_text().split("## Coming from upstream lora-lite", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_quickstart_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, batch = tiny_llama(), make_batch()
    before = logits(model, batch)
    scope = {"model": model}
    exec(compile(quickstart_code(), "README quickstart", "exec"), scope)
    assert type(scope["cfg"]).__name__ == "LoRAConfig" and scope["cfg"].dtype is torch.bfloat16
    assert ll.attached(model) is not None and (tmp_path / "adapter.safetensors").is_file()
    assert torch.equal(logits(model, batch), before)  # B = 0: the loaded adapter is the identity


def test_config_classes_of_installed_plugins_are_package_attributes():
    for cls in ll.variants().values():
        assert getattr(ll, cls.config.__name__) is cls.config
    assert ll.LoRAConfig(r=8).variant == "lora"


def test_a_missing_config_class_says_what_is_installed_and_names_a_package_only_when_known(
        only_plugins):
    only_plugins("lora-lite-lora")
    with pytest.raises(AttributeError) as err:
        _ = ll.HRAConfig
    assert "no installed plugin provides a config class of that name" in str(err.value)
    assert "installed: LoRAConfig" in str(err.value) and "pip install" not in str(err.value)
    assert not hasattr(ll, "NoSuchThing")

    class Broken:  # a plugin that fails while registering the variant "hra"
        @staticmethod
        @ll.hookimpl
        def register_variants(register):
            register(type("HRA", (), {"name": "hra"}))
    plugins.register_plugin(Broken, "broken-hra", distribution="lora-lite-hra")
    with pytest.raises(AttributeError, match=r"HRAConfig.*plugin 'lora-lite-hra'"):
        _ = ll.HRAConfig
