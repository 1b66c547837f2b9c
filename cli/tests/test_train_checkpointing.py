"""`lora-lite train --gradient-checkpointing`: the blocks recompute their activations, and the
run trains the same adapter (same losses, same tensors) as without the flag."""
import json

import pytest
import torch
from safetensors.torch import load_file
from tinymodel import save_tiny_model
from typer.testing import CliRunner

from lora_lite_cli.app import get_app
from lora_lite_cli.training.run import enable_gradient_checkpointing
from lora_lite_cli.training.settings import TrainError

runner = CliRunner()
SMALL = ["--steps", "3", "--batch-size", "2", "--eval-limit", "0", "--seq-len", "160",
         "--threads", "1", "--rank", "4"]


def run(tiny, out, *extra):
    result = runner.invoke(get_app(), ["train", "--variant", "lora", "--model", str(tiny), *SMALL,
                                       *extra, "--output", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads((out / "metrics.json").read_text()), load_file(str(out / "adapter.safetensors"))


def test_gradient_checkpointing_trains_the_same_adapter(tmp_path):
    tiny = save_tiny_model(tmp_path / "tiny")
    plain, plain_tensors = run(tiny, tmp_path / "plain")
    gc, gc_tensors = run(tiny, tmp_path / "gc", "--gradient-checkpointing")
    assert gc["settings"]["gradient_checkpointing"] is True and gc["sanity"]["ok"]
    assert plain["settings"]["gradient_checkpointing"] is False and "checkpointed_blocks" not in plain
    assert gc["checkpointed_blocks"] >= 2  # the tiny Llama's decoder layers
    assert abs(plain["train"]["loss_first"] - gc["train"]["loss_first"]) < 1e-6
    assert abs(plain["train"]["loss_last"] - gc["train"]["loss_last"]) < 1e-5
    assert plain_tensors.keys() == gc_tensors.keys()
    for key, value in plain_tensors.items():
        assert (value - gc_tensors[key]).abs().max().item() < 1e-5, key


def test_a_model_without_checkpointing_support_is_refused_in_one_line():
    with pytest.raises(TrainError, match=r"--gradient-checkpointing: Linear does not support"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))
