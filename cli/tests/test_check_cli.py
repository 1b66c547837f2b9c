"""``lora-lite check``: the conformance kit on the test model, as a table, JSON or Markdown."""
import json
from dataclasses import dataclass

from typer.testing import CliRunner

import lora_lite as ll
from lora_lite.plugins import register_plugin, unregister_plugin
from lora_lite_cli.app import get_app

runner = CliRunner()


def test_check_json_gives_the_figures_per_base():
    result = runner.invoke(get_app(), ["check", "lora", "--quantize", "4bit", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["bases"] == ["fp32", "4bit"]
    [lora] = data["variants"]
    assert lora["variant"] == "lora" and lora["trainable"] == 1792
    assert set(lora["bases"]) == {"fp32", "4bit"}
    assert lora["bases"]["4bit"]["identity_err"] == 0.0 and lora["bases"]["fp32"]["detach_bitexact"]


def test_check_markdown_row_and_bad_input():
    result = runner.invoke(get_app(), ["check", "ia3", "--markdown"])
    assert result.exit_code == 0, result.output
    assert "| ia3 | lora-lite-ia3 | 0 | 0 |" in result.stdout
    bad = runner.invoke(get_app(), ["check", "lora", "--quantize", "3bit"])
    assert bad.exit_code == 2 and "expected 4bit or 8bit" in bad.output
    unknown = runner.invoke(get_app(), ["check", "lorra"])
    assert unknown.exit_code == 2 and "did you mean 'lora'" in unknown.output
    assert "pip install" not in unknown.output


@dataclass
class LeakyConfig(ll.AdapterConfig):
    variant: str = "cli_leaky"


class Leaky(ll.Variant):
    """Lets the base weight collect a gradient: check must fail with the reason."""
    name, config = "cli_leaky", LeakyConfig

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_g": ll.ParamSpec((d_out,), init="ones")}

    @staticmethod
    def forward(layer, x, y):
        layer.weight.requires_grad_(True)
        return y * layer.lora_g


class LeakyPlugin:
    @staticmethod
    @ll.hookimpl
    def register_variants(register):
        register(Leaky)


def test_a_failing_check_is_one_line_and_exit_1():
    register_plugin(LeakyPlugin, "cli-leaky", "cli-leaky")
    try:
        result = runner.invoke(get_app(), ["check", "cli_leaky"])
    finally:
        unregister_plugin("cli-leaky")
    assert result.exit_code == 1
    assert "cli_leaky: check failed: gradient reached base parameter(s) on the fp32 base" in \
        " ".join(result.output.split())
