"""The train options are generated from the Settings fields (commands.settings_options)."""
import dataclasses

import pytest
from typer.testing import CliRunner

from lora_lite_cli.app import get_app
from lora_lite_cli.commands.settings_options import flagged_fields, given_values, settings_options
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
