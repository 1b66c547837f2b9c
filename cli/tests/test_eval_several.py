"""`lora-lite eval --adapter A --adapter B [--mix A=1,B=0.5]`: each adapter scored on one base
load gives what `eval --adapter A` alone gives; the mix is scored too; bad --mix is one line."""
import json

import torch
from typer.testing import CliRunner

import lora_lite as ll
from lora_lite_cli import models
from lora_lite_cli.app import get_app

runner = CliRunner()
ARGS = ["--eval-limit", "3", "--max-new-tokens", "5", "--json"]


def _saved(tiny_dir, path, seed):
    model, _ = models.load_model(tiny_dir)
    ll.attach(model, ll.config("lora", r=4, target_names=[r"(q_proj|v_proj)$"], target_roles=()))
    with torch.no_grad():
        for p in ll.trainable_parameters(model):
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    ll.save(model, path)
    return path


def _outputs(path):
    return [json.loads(line)["adapted"]["output"] for line in path.read_text().splitlines()]


def test_eval_several_adapters_and_a_mix(tiny_dir, tmp_path):
    a, b = _saved(tiny_dir, tmp_path / "A.safetensors", 1), _saved(tiny_dir, tmp_path / "B.safetensors", 2)
    result = runner.invoke(get_app(), ["eval", "--adapter", str(a), "--adapter", str(b), "--model",
                                       tiny_dir, "--mix", "A=1,B=0.5", *ARGS])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [r["adapter"] for r in out["adapters"]] == [str(a), str(b), "mix A=1,B=0.5"]
    assert all(r["n"] == 3 for r in out["adapters"]) and out["base"]["n"] == 3
    several = _outputs(tmp_path / "eval_predictions.A.jsonl")
    alone = tmp_path / "alone.jsonl"
    single = runner.invoke(get_app(), ["eval", "--adapter", str(a), "--model", tiny_dir,
                                       "--predictions", str(alone), *ARGS])
    assert single.exit_code == 0, single.output
    assert several == _outputs(alone)


def test_eval_bad_mix_is_one_line(tiny_dir, tmp_path):
    a, b = _saved(tiny_dir, tmp_path / "A.safetensors", 1), _saved(tiny_dir, tmp_path / "B.safetensors", 2)
    for mix in ("A=1,C=2", "A=nan", "A=1,A=2"):
        result = runner.invoke(get_app(), ["eval", "--adapter", str(a), "--adapter", str(b),
                                           "--model", tiny_dir, "--mix", mix])
        assert result.exit_code == 2 and "--mix" in result.output, result.output
