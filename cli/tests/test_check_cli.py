"""``lora-lite check``: the conformance kit on the test model, as a table, JSON or Markdown."""
import json

from typer.testing import CliRunner

from lora_lite.testing import gain_variant, registered
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


def leaky_forward(layer, x, y):
    layer.weight.requires_grad_(True)  # lets the base weight collect a gradient
    return y * layer.lora_g


def test_a_failing_check_is_one_line_and_exit_1():
    with registered(gain_variant("cli_leaky", forward=leaky_forward), name="cli-leaky"):
        result = runner.invoke(get_app(), ["check", "cli_leaky"])
    assert result.exit_code == 1
    assert "cli_leaky: check failed: gradient reached base parameter(s) on the fp32 base" in \
        " ".join(result.output.split())
