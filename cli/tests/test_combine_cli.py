"""`lora-lite combine`: two adapter files -> one combined file (as ll.combine makes it), one base
load; bad input is one line, exit code 2."""
import json

import torch
from typer.testing import CliRunner

import lora_lite as ll
from lora_lite_cli import models
from lora_lite_cli.app import get_app

runner = CliRunner()


def _saved(tiny_dir, path, seed):
    model, _ = models.load_model(tiny_dir)
    ll.attach(model, ll.config("lora", r=4, target_names=[r"(q_proj|v_proj)$"], target_roles=(), seed=seed))
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in ll.trainable_parameters(model):
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    ll.save(model, path)
    return path


def test_combine_svd_writes_the_combination(tiny_dir, tmp_path):
    a, b = _saved(tiny_dir, tmp_path / "a.safetensors", 1), _saved(tiny_dir, tmp_path / "b.safetensors", 2)
    out = tmp_path / "c.safetensors"
    result = runner.invoke(get_app(), ["combine", str(a), str(b), "--how", "svd", "--rank", "8",
                                       "--weights", "1,0.5", "--output", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["rank"] == 8 and report["max_relative_error"] < 1e-4  # rank 8 holds 4 + 4
    model, _ = models.load_model(tiny_dir)
    ll.load(model, a, name="a")
    ll.load(model, b, name="b")
    ll.load(model, out, name="c")
    ids = torch.tensor([[5, 17, 33, 60, 2, 41]])
    with torch.no_grad(), ll.using(model, ["a", "b"], [1.0, 0.5]):
        want = model(ids).logits
    with torch.no_grad(), ll.using(model, "c"):
        got = model(ids).logits
    assert (got - want).abs().max() < 1e-4


def test_combine_refuses_bad_weights_in_one_line(tiny_dir, tmp_path):
    a = _saved(tiny_dir, tmp_path / "a.safetensors", 1)
    result = runner.invoke(get_app(), ["combine", str(a), str(a), "--weights", "1,nan",
                                       "--output", str(tmp_path / "c.safetensors")])
    assert result.exit_code == 2 and "finite" in result.output
    assert not (tmp_path / "c.safetensors").exists()
