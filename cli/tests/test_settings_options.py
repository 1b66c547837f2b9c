"""The train options are generated from the Settings fields (commands.settings_options)."""
import dataclasses

import pytest
from typer.testing import CliRunner

from lora_lite_cli.app import get_app
from lora_lite_cli.commands.settings_options import (
    flagged_fields,
    given_values,
    settings_options,
    shared_settings_options,
    with_defaults,
)
from lora_lite_cli.training.settings import Settings


def test_every_setting_but_variant_is_a_train_option():
    flagged = {f.name for f, _ in flagged_fields()}
    assert flagged == {f.name for f in dataclasses.fields(Settings)} - {"variant"}
    out = CliRunner().invoke(get_app(), ["train", "--help"], env={"COLUMNS": "200"}).output
    for flag in ("--batch-size", "-b", "--output", "-o", "--set", "--calibration-batches", "--resume", "--json"):
        assert flag in out
    assert "Optimizer steps (default: 80)." in out


def test_given_values_parse_and_leave_out_what_was_not_given():
    given = given_values({"targets": ["q_proj"], "layers": "0-1", "knobs": ["block=8"], "pack": False,
                          "output": "runs/x", "steps": 3})
    assert given["targets"] == ("q_proj",) and given["layers"] == (0, 1)
    assert given["knobs"] == {"block": "8"} and given["output"] == "runs/x" and given["steps"] == 3
    assert given["pack"] is None and given["lr"] is None and given["model"] is None


def test_a_parameter_named_like_a_setting_is_refused():
    def command(steps: int = 1, given: dict | None = None):
        return given
    with pytest.raises(TypeError, match="steps"):
        settings_options(command)


def test_eval_takes_its_shared_flags_from_the_settings():
    from typer.main import get_command

    from lora_lite_cli.commands import eval as eval_cmd
    command = get_command(get_app()).commands["eval"]
    params = {p.name: p for p in command.params}
    assert set(eval_cmd.SHARED) <= set(params)
    assert set(params) - set(eval_cmd.SHARED) == {"adapter", "base", "predictions", "mix", "as_json"}
    assert set(params["eval_limit"].opts) == {"--eval-limit", "--limit", "-n"}
    assert set(params["eval_batch_size"].opts) == {"--eval-batch-size", "--batch-size", "-b"}
    out = CliRunner().invoke(get_app(), ["eval", "--help"], env={"COLUMNS": "300"}).output
    for text in ("Generation budget per answer (default: 32).", "Prompts per generation batch (default: 50).",
                 "Evaluate the first N items, 0 for all (default: 100).", "cpu, cuda or auto (default: cpu)."):
        assert text in out, text


def test_shared_options_refuse_unknown_names_and_overrides():
    def command(given: dict | None = None):
        return given
    with pytest.raises(TypeError, match="no flagged settings"):
        shared_settings_options(("steps", "nope"))(command)
    with pytest.raises(TypeError, match="overrides"):
        shared_settings_options(("steps",), {"lr": {"help": "x"}})(command)
    wrapped = shared_settings_options(("steps", "lr"))(command)
    assert wrapped(steps=3, lr=None) == {"steps": 3, "lr": None}
    assert with_defaults({"steps": None, "model": None}, keep_none=("model",)) == {"steps": 80, "model": None}
