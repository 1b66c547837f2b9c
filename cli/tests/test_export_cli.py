"""`lora-lite export`: --format merged writes a folder plain transformers loads (checked in a
process where lora_lite cannot be imported) with the adapted outputs; --format peft writes a
folder PEFT loads; `eval --adapter` takes a PEFT folder; bad input is one line, exit code 2."""
import json
import pathlib
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import lora_lite as ll
from lora_lite_cli import models
from lora_lite_cli.app import get_app

runner = CliRunner()
IDS = torch.tensor([[5, 17, 33, 60, 2, 41, 9, 77]])


def adapter(tiny_dir, folder, variant="lora", **knobs):
    """A saved adapter with random values, and the adapted model's logits on IDS."""
    model, _ = models.load_model(tiny_dir)
    ll.attach(model, ll.config(variant, target_names=[r"(q_proj|v_proj)$"], target_roles=(), **knobs))
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in ll.trainable_parameters(model):
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    path = folder / "adapter.safetensors"
    ll.save(model, path)
    with torch.no_grad():
        return path, model(IDS).logits


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


PLAIN_LOAD = """
import sys, json, torch
sys.modules["lora_lite"] = None          # no lora-lite in this process
from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
AutoTokenizer.from_pretrained(sys.argv[1])
with torch.no_grad():
    print(json.dumps(m(torch.tensor(json.loads(sys.argv[2]))).logits.tolist()))
"""


def test_export_merged_loads_in_plain_transformers(tiny_dir, tmp_path):
    path, adapted = adapter(tiny_dir, tmp_path, "dora", r=4)
    out = tmp_path / "merged"
    result = runner.invoke(get_app(), ["export", "--adapter", str(path), "--format", "merged",
                                       "--output", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["variant"] == "dora" and report["model"] == tiny_dir and report["max_error"] == 0.0
    proc = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(out), json.dumps(IDS.tolist())],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert rel(torch.tensor(json.loads(proc.stdout)), adapted) <= 1e-5


def test_export_peft_loads_in_peft_and_evals(tiny_dir, tmp_path):
    peft = pytest.importorskip("peft")
    path, adapted = adapter(tiny_dir, tmp_path, "antipasto", r=8)
    out = tmp_path / "peft"
    refused = runner.invoke(get_app(), ["export", "--adapter", str(path), "--format", "peft",
                                        "--output", str(out)])
    assert refused.exit_code == 2 and "as_lora_rank" in refused.output
    result = runner.invoke(get_app(), ["export", "--adapter", str(path), "--format", "peft",
                                       "--as-lora-rank", "64", "--output", str(out)])
    assert result.exit_code == 0, result.output
    base, _ = models.load_model(tiny_dir)
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(base, str(out)).eval()(IDS).logits
    assert rel(got, adapted) <= 1e-4
    result = runner.invoke(get_app(), ["eval", "--adapter", str(out), "--limit", "1",
                                       "--max-new-tokens", "2", "--no-base", "--json",
                                       "--predictions", str(tmp_path / "p.jsonl")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["variant"] == "lora" and report["model"] == tiny_dir


@pytest.mark.parametrize("args, needle", [
    (["--format", "zip"], "--format"),
    (["--format", "merged", "--as-lora-rank", "4"], "--as-lora-rank"),
    (["--format", "peft", "--as-lora-rank", "0"], "--as-lora-rank"),
])
def test_bad_options_are_one_line(tiny_dir, tmp_path, args, needle):
    path, _ = adapter(tiny_dir, tmp_path)
    result = runner.invoke(get_app(), ["export", "--adapter", str(path), "--output",
                                       str(tmp_path / "o"), *args])
    assert result.exit_code == 2 and needle in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_folder_without_adapter_config_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(get_app(), ["export", "--adapter", str(tmp_path / "empty"), "--format",
                                       "peft", "--output", str(tmp_path / "o")])
    assert result.exit_code == 2 and "adapter_config.json" in result.output
    assert len(result.output.strip().splitlines()) == 1


# -- issue 24: an export loses nothing ---------------------------------------------------------

def _export(path, out, *extra, fmt="peft"):
    return runner.invoke(get_app(), ["export", "--adapter", str(path), "--format", fmt,
                                     "--output", str(out), *extra])


def _siblings(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}"))


def test_a_non_empty_output_is_refused_unless_overwrite_and_nothing_is_deleted(tiny_dir, tmp_path):
    path, _ = adapter(tiny_dir, tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "adapter_config.json").write_text("{}")  # even a same-named file is the user's
    refused = _export(path, out)
    assert refused.exit_code == 2 and "not empty" in refused.output and "--overwrite" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "notes.txt"]
    done = _export(path, out, "--overwrite")
    assert done.exit_code == 0, done.output
    aside = tmp_path / "mine.previous-1"
    assert "moved to" in done.output and str(aside) in " ".join(done.output.split())
    assert (aside / "notes.txt").read_text() == "my notes"
    assert (aside / "adapter_config.json").read_text() == "{}"
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    ll.load(models.load_model(tiny_dir)[0], out)  # the new export is complete
    assert _siblings(out) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _export(path, empty).exit_code == 0  # an empty folder is fine, nothing to move


@pytest.mark.parametrize("fmt, interrupt", [("peft", RuntimeError), ("merged", KeyboardInterrupt)])
@pytest.mark.parametrize("existing", [False, True])
def test_an_interrupted_export_leaves_no_folder_and_keeps_the_old_one(tiny_dir, tmp_path, monkeypatch,
                                                                      fmt, interrupt, existing):
    """The export fails after writing part of its files (an exception; Ctrl-C): --output is as
    it was (absent, or the previous folder untouched), and no temporary folder is left."""
    path, _ = adapter(tiny_dir, tmp_path)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    if fmt == "peft":
        real = ll.export_peft

        def half_export(model, folder, **kw):
            real(model, folder, **kw)
            (pathlib.Path(folder) / "adapter_config.json").unlink()  # written, then stopped
            raise interrupt("disk full")
        monkeypatch.setattr(ll, "export_peft", half_export)
    else:
        from transformers import PreTrainedTokenizerBase

        def stop(self, *a, **kw):  # the weights are written; the tokenizer is not
            raise interrupt()
        monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", stop)
    result = _export(path, out, *(["--overwrite"] if existing else []), fmt=fmt)
    assert result.exit_code == (130 if interrupt is KeyboardInterrupt else 1), result.output
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    else:
        assert not out.exists()
    assert _siblings(out) == [] and not (tmp_path / "out.previous-1").exists()


def test_core_export_peft_interrupted_leaves_a_folder_that_does_not_load(tiny_dir, tmp_path,
                                                                         monkeypatch):
    """ll.export_peft writes the weights first and the config last: stopped in between, the
    folder has no adapter_config.json, so it never loads as a complete adapter."""
    from lora_lite.peft import export as peft_export
    path, _ = adapter(tiny_dir, tmp_path)
    model, _ = models.load_model(tiny_dir)
    ll.load(model, path)
    out = tmp_path / "core"
    ll.export_peft(model, out)  # a complete previous export
    monkeypatch.setattr(peft_export.json, "dump", lambda *a, **kw: (_ for _ in ()).throw(OSError("full")))
    with pytest.raises(OSError):
        ll.export_peft(model, out)
    fresh, _ = models.load_model(tiny_dir)
    with pytest.raises(ll.AdapterFileError, match="no adapter_config.json"):
        ll.load(fresh, out)
