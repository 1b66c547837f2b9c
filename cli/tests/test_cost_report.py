"""``lora-lite cost-report`` on a tiny local model, with and without ``--compare peft``."""
import json
from dataclasses import dataclass

import pytest
import torch
from typer.testing import CliRunner

import lora_lite as ll
from lora_lite.plugins import register_plugin, unregister_plugin
from lora_lite.testing import tiny_llama
from lora_lite_cli import cost
from lora_lite_cli.app import get_app

runner = CliRunner()
FAST = ["--seq-len", "16", "--batch", "2", "--repeats", "2", "--warmup", "1", "--device", "cpu"]
# tiny_llama, q/v of 2 layers at r=8: q 64->64 and v 64->32 -> 8 * (128 + 96) per layer
LORA_PARAMS = 2 * 8 * (128 + 96)


def save_tiny_model(folder):
    """A tiny random Llama and a word-level tokenizer saved as a local model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tiny_llama().save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(128)}
    vocab.update({"<unk>": 0, "</s>": 1})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@dataclass
class GainConfig(ll.AdapterConfig):
    variant: str = "cli_cost_gain"
    uses_rank = False


class Gain(ll.Variant):
    """A third-party-style variant the cost tables know nothing about; needs calibration."""
    name = "cli_cost_gain"
    config = GainConfig
    needs_calibration = True

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_g": ll.ParamSpec((d_out,), init="ones")}

    @staticmethod
    def group_init(model, targets, cfg, calibration_data):
        ll.stream_inputs(model, targets, calibration_data, lambda t, rows: None)

    @staticmethod
    def forward(layer, x, y):
        return y * layer.lora_g


class GainPlugin:
    @ll.hookimpl
    def register_variants(self, register):
        register(Gain)


def test_cost_report_against_peft(tiny_dir):
    register_plugin(GainPlugin(), "cli_cost_gain", distribution="cli-cost-gain")
    try:
        result = runner.invoke(get_app(), ["cost-report", "--model", tiny_dir, "--variants",
                                           "lora,cli_cost_gain", "--compare", "peft", "--json", *FAST])
    finally:
        unregister_plugin("cli_cost_gain")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = data["rows"]
    assert [(r["variant"], r["impl"]) for r in rows] == [
        ("base", "full FT"), ("lora", "lora-lite"), ("lora", "peft"), ("cli_cost_gain", "lora-lite")]
    base, ours, theirs, gain = rows
    assert base["trainable"] == sum(p.numel() for p in tiny_llama().parameters())
    for row in (ours, theirs):
        assert row["trainable"] == LORA_PARAMS and row["targets"] == 4
        # analytic MACs/token of LoRA = r (d_in + d_out) per target; FlopCounterMode counts
        # 2 FLOPs per MAC, exactly: the ratio is 1
        assert row["macs_per_token"] == LORA_PARAMS
        assert row["flops_per_token"] == 2 * LORA_PARAMS
        assert row["flop_ratio"] == 1.0
    for row in rows:
        assert row["error"] is None
        assert row["fwd_ms"] > 0 and row["step_ms"] > 0
        assert row["peak_mb"] is not None and row["peak_mb"] >= 0  # Linux: peak RSS delta
    for row in rows[1:]:
        assert row["init_ms"] >= 0
    # the unknown variant gets the generic rule: no 2-D tensor, no matmul, 0 = 0
    assert gain["trainable"] == 2 * (64 + 32) and gain["macs_per_token"] == 0
    assert gain["flops_per_token"] == 0 and gain["flop_ratio"] is None
    assert "calibration" in gain["note"] and "generic rule" in gain["note"]
    (ratio,) = data["ratios"]
    assert ratio["variant"] == "lora" and ratio["trainable"] == 1.0
    assert ratio["flops_per_token"] == 1.0 and ratio["fwd_ms"] > 0
    assert data["settings"]["compare_peft"] is True
    assert "process peak RSS" in data["memory_method"]
    assert "2 FLOPs per MAC" in data["conventions"]


def test_cost_report_markdown_and_table(tiny_dir):
    result = runner.invoke(get_app(), ["cost-report", "-m", tiny_dir, "--variants", "lora",
                                       "--rank", "4", "--markdown", *FAST])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any(line.startswith("| variant | impl | trainable |") for line in lines)
    row = next(line for line in lines if line.startswith("| lora | lora-lite |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{LORA_PARAMS // 2:,}" and cells[5] == "1.000"
    result = runner.invoke(get_app(), ["cost-report", "-m", tiny_dir, "--variants", "lora", *FAST],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "cost per variant" in result.stdout and "full FT" in result.stdout


def test_cost_report_errors(tiny_dir):
    app = get_app()
    result = runner.invoke(app, ["cost-report", "-m", tiny_dir, "--variants", "nope"])
    assert result.exit_code == 2 and "no installed plugin provides it" in result.stderr
    result = runner.invoke(app, ["cost-report", "-m", tiny_dir, "--compare", "other"])
    assert result.exit_code == 2 and "--compare" in result.stderr
    result = runner.invoke(app, ["cost-report", "-m", tiny_dir, "--set", "nonknob=1"])
    assert result.exit_code == 2 and "nonknob" in result.stderr
    result = runner.invoke(app, ["cost-report", "-m", tiny_dir, "--repeats", "0"])
    assert result.exit_code == 2 and "--repeats" in result.stderr


def test_analytic_table_matches_the_flop_counter_on_lora():
    """The FLOP/MAC convention on its own: one LoRA layer, FlopCounterMode vs the table."""
    model = tiny_llama()
    cfg = ll.config("lora", r=4, target_names=[r"layers\.0\.self_attn\.q_proj$"], target_roles=())
    batch = {"input_ids": torch.zeros(1, 8, dtype=torch.long)}
    base = cost.count_flops(model, batch)
    ll.attach(model, cfg)
    added = cost.count_flops(model, batch) - base
    macs, rule = cost.analytic_macs("lora", ll.attached(model).targets, cfg, tokens_per_call=8)
    ll.detach(model)
    assert rule == "table" and macs == 4 * (64 + 64)
    assert added == 2 * macs * 8  # 2 FLOPs per MAC, 8 tokens


def test_peak_memory_sees_an_allocation_and_forgets_it_after_free():
    with cost.PeakMemory("cpu") as mem:
        block = torch.ones(16 * 2**20)  # 64 MiB, every page touched
        del block
    assert 60 < mem.peak_mb < 100
    with cost.PeakMemory("cpu") as after:  # the freed block went back to the OS
        pass
    assert after.peak_mb < 16
