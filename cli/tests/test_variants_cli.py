"""``lora-lite variants``: installed variants with their facts; broken plugins as warnings."""
import json

from typer.testing import CliRunner

import lora_lite as ll
from lora_lite.testing import gain_variant, registered
from lora_lite_cli.app import get_app

runner = CliRunner()


def input_gain_specs(d_in, d_out, cfg):
    return {"lora_g": ll.ParamSpec((d_in,), init="ones")}


def input_gain(layer, x):
    return x * layer.lora_g  # lora_g: (d_in,)


def knobby_variant(name, **members):
    """A valid variant with knobs, calibration and a pre-hook (an input gain)."""
    return gain_variant(name, knobs={"block": 8, "mode": "fast"}, uses_rank=False,
                        needs_calibration=True, supports_quantized=False, forward=None,
                        forward_input=input_gain, param_specs=input_gain_specs, **members)


Knobby = knobby_variant("cli_knobby")
NoForward = gain_variant("cli_no_forward", forward=None)  # breaks the contract: no forward


def test_variants_json_lists_lora_with_its_facts():
    result = runner.invoke(get_app(), ["variants", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    lora = next(v for v in data["variants"] if v["name"] == "lora")
    assert lora["distribution"] == "lora-lite-lora" and lora["version"] == "0.1.0"
    assert lora["hook"] == "output"
    assert (lora["rewrites_weight"], lora["needs_calibration"], lora["supports_quantized"]) == \
        (False, False, True)
    assert (lora["r"], lora["alpha"], lora["knobs"]) == (8, 16.0, {"use_rslora": False})
    assert lora["paper"].startswith("https://arxiv.org/")
    assert isinstance(data["problems"], list)
    # training defaults as `train` resolves them; `source` lists what the variant said itself
    by_name = {v["name"]: v["train_defaults"] for v in data["variants"]}
    assert by_name["lora"]["lr"] == 2e-3 and by_name["lora"]["source"] == ["lr"]
    # pissa rewrites the base only with the opt-in rewrite_base=True: not under its defaults
    pissa = next(v for v in data["variants"] if v["name"] == "pissa")
    assert (pissa["rewrites_weight"], pissa["rewrites_weight_by_config"]) == (False, True)
    assert lora["rewrites_weight_by_config"] is False
    # ia3 places itself per architecture at attach (k/v; never a fused qkv_proj by regex)
    assert by_name["ia3"]["targets"] == [] and by_name["ia3"]["lr"] == 2e-2


Generic = knobby_variant("cli_generic")  # declares no train_defaults: the generic row, no `source`
BadDefaults = knobby_variant("cli_bad_defaults", train_defaults=["lr", 1])  # reported, the listing goes on


def test_variants_json_generic_defaults_and_a_malformed_train_defaults():
    with registered(Generic, BadDefaults, name="cli_defaults", distribution="cli-defaults"):
        result = runner.invoke(get_app(), ["variants", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    generic = next(v for v in data["variants"] if v["name"] == "cli_generic")["train_defaults"]
    assert generic["lr"] == 2e-3 and generic["source"] == []
    assert "lora" in {v["name"] for v in data["variants"]}
    assert not any(v["name"] == "cli_bad_defaults" for v in data["variants"])
    [problem] = [p for p in data["problems"] if p["distribution"] == "cli-defaults"]
    assert "'cli_bad_defaults' cannot be described: TypeError" in problem["error"]


def test_variants_shows_knobs_and_broken_plugins():
    with registered(Knobby, NoForward, name="cli_test_variants", distribution="cli-test-variants"):
        result = runner.invoke(get_app(), ["variants", "--json"])
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        knobby = next(v for v in data["variants"] if v["name"] == "cli_knobby")
        assert knobby["distribution"] == "cli-test-variants"
        assert knobby["hook"] == "input" and knobby["needs_calibration"] is True
        assert knobby["supports_quantized"] is False and knobby["uses_rank"] is False
        assert knobby["knobs"] == {"block": 8, "mode": "fast"}
        assert not any(v["name"] == "cli_no_forward" for v in data["variants"])
        broken = [p for p in data["problems"] if p["distribution"] == "cli-test-variants"]
        assert len(broken) == 1 and "cli_no_forward" in broken[0]["error"]
        assert "uninstall cli-test-variants" in broken[0]["fix"]

        result = runner.invoke(get_app(), ["variants"], env={"COLUMNS": "200"})
        assert result.exit_code == 0
        assert "cli_knobby" in result.stdout and "block=8, mode=fast" in result.stdout
        assert "lora-lite-lora 0.1.0" in result.stdout
        assert "warning:" in result.stderr and "cli-test-variants" in result.stderr
        assert "cli_no_forward" in result.stderr
    data = json.loads(runner.invoke(get_app(), ["variants", "--json"]).stdout)
    assert not any(v["name"] == "cli_knobby" for v in data["variants"])
