"""``lora-lite variants``: installed variants with their facts; broken plugins as warnings."""
import json
from dataclasses import dataclass

from typer.testing import CliRunner

import lora_lite as ll
from lora_lite.plugins import register_plugin, unregister_plugin
from lora_lite_cli.app import get_app

runner = CliRunner()


@dataclass
class KnobbyConfig(ll.AdapterConfig):
    variant: str = "cli_knobby"
    block: int = 8
    mode: str = "fast"
    uses_rank = False


class Knobby(ll.Variant):
    """A valid variant with knobs, calibration and a pre-hook."""
    name = "cli_knobby"
    config = KnobbyConfig
    needs_calibration = True
    supports_quantized = False

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_g": ll.ParamSpec((d_in,), init="ones")}

    @staticmethod
    def forward_input(layer, x):
        return x * layer.lora_g


class NoForward:
    """Breaks the contract: no forward."""
    name = "cli_no_forward"
    config = KnobbyConfig

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {}


class TestPlugin:
    @ll.hookimpl
    def register_variants(self, register):
        register(Knobby)
        register(NoForward)


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
    # ia3 places itself per architecture at attach (k/v; never a fused qkv_proj by regex)
    assert by_name["ia3"]["targets"] == [] and by_name["ia3"]["lr"] == 2e-2


class Generic(Knobby):
    """Declares no train_defaults: the generic row, and nothing in `source`."""
    name = "cli_generic"
    config = type("GenericConfig", (KnobbyConfig,), {"__annotations__": {"variant": str},
                                                     "variant": "cli_generic"})


class BadDefaults(Knobby):
    """train_defaults of the wrong type: reported, the listing goes on."""
    name = "cli_bad_defaults"
    config = type("BadDefaultsConfig", (KnobbyConfig,), {"__annotations__": {"variant": str},
                                                         "variant": "cli_bad_defaults"})
    train_defaults = ["lr", 1]


def test_variants_json_generic_defaults_and_a_malformed_train_defaults():
    from dataclasses import dataclass as dc
    Generic.config, BadDefaults.config = dc(Generic.config), dc(BadDefaults.config)

    class Plugin:
        @staticmethod
        @ll.hookimpl
        def register_variants(register):
            register(Generic)
            register(BadDefaults)
    register_plugin(Plugin, "cli_defaults", distribution="cli-defaults")
    try:
        result = runner.invoke(get_app(), ["variants", "--json"])
    finally:
        unregister_plugin("cli_defaults")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    generic = next(v for v in data["variants"] if v["name"] == "cli_generic")["train_defaults"]
    assert generic["lr"] == 2e-3 and generic["source"] == []
    assert "lora" in {v["name"] for v in data["variants"]}
    assert not any(v["name"] == "cli_bad_defaults" for v in data["variants"])
    [problem] = [p for p in data["problems"] if p["distribution"] == "cli-defaults"]
    assert "'cli_bad_defaults' cannot be described: TypeError" in problem["error"]


def test_variants_shows_knobs_and_broken_plugins():
    register_plugin(TestPlugin(), "cli_test_variants", distribution="cli-test-variants")
    try:
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
    finally:
        unregister_plugin("cli_test_variants")
    data = json.loads(runner.invoke(get_app(), ["variants", "--json"]).stdout)
    assert not any(v["name"] == "cli_knobby" for v in data["variants"])
