"""``lora-lite attach`` on a tiny local model: targets, parameters, identity, --save, calibration."""
import json

import torch
from typer.testing import CliRunner

import lora_lite as ll
from lora_lite.testing import gain_variant, registered, tiny_llama
from lora_lite_cli.app import get_app

runner = CliRunner()


def attach_json(*args):
    result = runner.invoke(get_app(), ["attach", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_attach_lora_reports_targets_params_identity_and_saves(tiny_dir, tmp_path):
    path = tmp_path / "init.safetensors"
    data = attach_json("--variant", "lora", "--model", tiny_dir, "--rank", "4",
                       "--save", str(path))
    # tiny_llama: hidden 64, 2 layers, q 64->64, v 64->32 (2 kv heads of 16)
    names = [t["name"] for t in data["targets"]]
    assert names == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]
    assert [(t["d_in"], t["d_out"]) for t in data["targets"]] == [(64, 64), (64, 32)] * 2
    assert all(t["role"] == "reader" for t in data["targets"])
    assert [t["trainable"] for t in data["targets"]] == [4 * (64 + 64), 4 * (64 + 32)] * 2
    assert data["trainable_params"] == 2 * 4 * (128 + 96) == 1792
    assert data["identity_error"] == 0.0  # B = 0: LoRA is exactly the identity at init
    assert data["calibration"] is None
    assert data["config"]["r"] == 4 and data["config"]["variant"] == "lora"
    # the saved initial adapter loads onto a fresh base and is the identity there too
    meta, shapes = ll.read_header(path)
    assert meta["variant"] == "lora" and len(shapes) == 8
    model = tiny_llama()
    batch = {"input_ids": torch.arange(10).reshape(1, 10)}
    with torch.no_grad():
        ref = model(**batch).logits
        ll.load(model, path)
        assert torch.equal(model(**batch).logits, ref)


def test_attach_table_output_and_knobs(tiny_dir):
    result = runner.invoke(get_app(), ["attach", "-v", "lora", "-m", tiny_dir, "-t", "down_proj$",
                                       "--layers", "1", "--set", "alpha=4"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "model.layers.1.mlp.down_proj" in result.stdout and "writer" in result.stdout
    assert "128->64" in result.stdout
    assert "trainable parameters: 1,536" in result.stdout  # 8 * (128 + 64)
    assert "identity error at init" in result.stdout


def test_attach_on_a_4bit_base(tiny_dir):
    data = attach_json("--variant", "lora", "--model", tiny_dir, "--quantize", "4bit")
    assert data["trainable_params"] == 2 * 8 * (128 + 96)
    assert data["identity_error"] == 0.0


rows_seen = []  # per group_init call of the probe: how many input rows it saw


def count_rows(model, targets, cfg, calibration_data):
    counts = []
    ll.stream_inputs(model, targets, calibration_data, lambda t, rows: counts.append(len(rows)))
    rows_seen.append(sum(counts))


CalibProbe = gain_variant("cli_calib_probe", needs_calibration=True, group_init=count_rows)


def test_attach_gives_calibration_data_to_variants_that_need_it(tiny_dir):
    rows_seen.clear()
    with registered(CalibProbe, name="cli_calib_probe", distribution="cli-calib-probe"):
        data = attach_json("--variant", "cli_calib_probe", "--model", tiny_dir)
        assert data["calibration"] == "4 batches of 2x32 generated token ids"
        # 4 batches x 2 sequences x 32 tokens through each of the 4 targets
        assert rows_seen == [4 * 2 * 32 * 4]
        assert data["trainable_params"] == 2 * (64 + 32)
        assert data["identity_error"] == 0.0
        result = runner.invoke(get_app(), ["attach", "--variant", "cli_calib_probe", "-m", tiny_dir],
                               env={"COLUMNS": "200"})
        assert result.exit_code == 0
        assert "generated random token ids as calibration data" in result.stdout
