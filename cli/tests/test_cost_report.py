"""``lora-lite cost-report`` on a tiny local model, with and without ``--compare peft``."""
import json
from dataclasses import dataclass

import pytest
import torch
from typer.testing import CliRunner

import lora_lite as ll
from lora_lite.testing import gain_variant, measure, registered, tiny_llama
from lora_lite_cli import cost
from lora_lite_cli.app import get_app

runner = CliRunner()
FAST = ["--seq-len", "16", "--batch", "2", "--repeats", "2", "--warmup", "1", "--device", "cpu"]
# tiny_llama, q/v of 2 layers at r=8: q 64->64 and v 64->32 -> 8 * (128 + 96) per layer
LORA_PARAMS = 2 * 8 * (128 + 96)


def stream_calibration(model, targets, cfg, calibration_data):
    ll.stream_inputs(model, targets, calibration_data, lambda t, rows: None)


# a third-party-style variant that says nothing about its cost; needs calibration
Gain = gain_variant("cli_cost_gain", uses_rank=False, needs_calibration=True,
                    group_init=stream_calibration)


@dataclass
class LowRankConfig(ll.AdapterConfig):
    variant: str = "cli_cost_lowrank"


class LowRank(ll.Variant):
    """A LoRA written as an outsider would, declaring its cost and its PEFT mapping."""
    name = "cli_cost_lowrank"
    config = LowRankConfig
    cost_note = "outsider's note on lora-lite's side"
    peft_cost_note = "outsider's note on PEFT's side"

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_A": ll.ParamSpec((cfg.r, d_in), init="kaiming"),
                "lora_B": ll.ParamSpec((d_out, cfg.r), init="zeros")}

    @staticmethod
    def forward(layer, x, y):
        return y + layer._lora_cfg.scale * ((x @ layer.lora_A.T) @ layer.lora_B.T).to(y.dtype)

    @staticmethod
    def added_macs(target, cfg):
        calls["added_macs"] += 1
        return cfg.r * (target.d_in + target.d_out), 0

    @staticmethod
    def peft_config(cfg, target_names):
        return {"peft_type": "LORA", "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": 0.0,
                "bias": "none"}


calls = {"added_macs": 0}


@pytest.fixture
def cost_plugin():
    with registered(Gain, LowRank, name="cli_cost", distribution="cli-cost"):
        yield


def report(tiny_dir, *args):
    result = runner.invoke(get_app(), ["cost-report", "--model", tiny_dir, "--json", *FAST, *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_cost_report_asks_the_variant(tiny_dir, cost_plugin):
    """MACs, notes and the PEFT mapping come from the variant class; the rule says so."""
    calls["added_macs"] = 0
    data = report(tiny_dir, "--variants", "cli_cost_lowrank", "cli_cost_gain", "--compare", "peft")
    rows = data["rows"]
    assert [(r["variant"], r["impl"]) for r in rows] == [
        ("base", "full FT"), ("cli_cost_lowrank", "lora-lite"), ("cli_cost_lowrank", "peft"),
        ("cli_cost_gain", "lora-lite")]
    base, ours, theirs, gain = rows
    assert calls["added_macs"] == 4  # once per target
    from transformers import AutoModelForCausalLM
    full = AutoModelForCausalLM.from_pretrained(tiny_dir)  # the model the report ran on
    assert base["trainable"] == sum(p.numel() for p in full.parameters())
    for row in (ours, theirs):
        assert row["error"] is None and row["macs_rule"] == "variant"
        assert row["trainable"] == LORA_PARAMS and row["targets"] == 4
        # analytic MACs/token of LoRA = r (d_in + d_out) per target; FlopCounterMode counts
        # 2 FLOPs per MAC, exactly: the ratio is 1
        assert row["macs_per_token"] == LORA_PARAMS
        assert row["flops_per_token"] == 2 * LORA_PARAMS and row["flop_ratio"] == 1.0
        assert row["adapter_mb"] == pytest.approx(LORA_PARAMS * 4 / 2**20)
        assert row["optimizer_mb"] == pytest.approx(2 * LORA_PARAMS * 4 / 2**20, rel=0.01)
        lo, hi = row["step_ms_spread"]
        assert 0 < lo <= row["step_ms"] <= hi
    # the ratio agrees, so the variant's note is not needed; a zero-MAC variant shows it
    assert "outsider" not in ours["note"]
    # the variant that gives nothing gets the generic rule: no 2-D tensor, no matmul, 0 = 0
    assert gain["macs_rule"] == "generic" and gain["macs_per_token"] == 0
    assert gain["trainable"] == 2 * (64 + 32) and gain["flops_per_token"] == 0
    assert "calibration" in gain["note"] and "generic rule" in gain["note"]
    (ratio,) = data["ratios"]
    assert ratio["variant"] == "cli_cost_lowrank" and ratio["trainable"] == 1.0
    assert ratio["flops_per_token"] == 1.0
    lo, hi = ratio["step_ms_range"]
    assert 0 < lo <= ratio["step_ms"] <= hi and ratio["memory_mb"] > 0
    assert data["settings"]["compare_peft"] is True
    assert "process peak RSS" in data["memory_method"]
    assert "2 FLOPs per MAC" in data["conventions"]


def test_notes_come_from_the_variant():
    assert cost.variant_note(LowRank, "lora-lite") == "outsider's note on lora-lite's side"
    assert cost.variant_note(LowRank, "peft") == "outsider's note on PEFT's side"
    assert cost.variant_note(Gain, "peft") == ""
    row = cost.Row("x", "peft", macs_per_token=10.0, flops_per_token=30.0, flop_ratio=1.5)
    assert cost._explain(row, "why it differs") == "why it differs"
    assert "beyond the analytic count" in cost._explain(row, "")
    assert cost.peft_spec(Gain, Gain.config(), ["a"]) is None


def test_cost_report_on_a_4bit_base_next_to_peft(tiny_dir, cost_plugin):
    pytest.importorskip("bitsandbytes")
    data = report(tiny_dir, "--variants", "cli_cost_lowrank", "--compare", "peft",
                  "--quantize", "4bit")
    assert data["settings"]["quantize"] == "4bit"
    base, ours, theirs = data["rows"]
    assert base["trainable"] < sum(p.numel() for p in tiny_llama().parameters())  # 4-bit frozen
    for row in (ours, theirs):
        assert row["error"] is None and row["trainable"] == LORA_PARAMS
        assert row["activations_mb"] is not None and row["optimizer_mb"] > 0, row
    assert data["ratios"][0]["trainable"] == 1.0


def test_cost_report_markdown_and_table(tiny_dir):
    result = runner.invoke(get_app(), ["cost-report", "-m", tiny_dir, "--variants", "lora",
                                       "--rank", "4", "--markdown", *FAST])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any(line.startswith("| variant | impl | trainable |") for line in lines)
    row = next(line for line in lines if line.startswith("| lora | lora-lite |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{LORA_PARAMS // 2:,}" and cells[6] == "1.000"
    result = runner.invoke(get_app(), ["cost-report", "-m", tiny_dir, "--variants", "lora", *FAST],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "cost per variant" in result.stdout and "full FT" in result.stdout


def test_cost_report_errors(tiny_dir):
    app = get_app()
    result = runner.invoke(app, ["cost-report", "-m", tiny_dir, "--variants", "nope"])
    assert result.exit_code == 2 and "'nope': no installed plugin provides it" in result.stderr
    result = runner.invoke(app, ["cost-report", "-m", tiny_dir, "--compare", "other"])
    assert result.exit_code == 2 and "--compare" in result.stderr
    result = runner.invoke(app, ["cost-report", "-m", tiny_dir, "--set", "nonknob=1"])
    assert result.exit_code == 2 and "nonknob" in result.stderr
    result = runner.invoke(app, ["cost-report", "-m", tiny_dir, "--repeats", "0"])
    assert result.exit_code == 2 and "--repeats" in result.stderr


def test_the_variants_count_matches_the_flop_counter():
    """The FLOP/MAC convention on its own: one low-rank layer, FlopCounterMode vs the count."""
    model = tiny_llama()
    cfg = LowRank.config(r=4, target_names=(r"layers\.0\.self_attn\.q_proj$",), target_roles=())
    batch = {"input_ids": torch.zeros(1, 8, dtype=torch.long)}
    base = cost.count_flops(model, batch)
    with registered(Gain, LowRank, name="cli_cost", distribution="cli-cost"):
        ll.attach(model, cfg)
        added = cost.count_flops(model, batch) - base
        macs, rule = cost.analytic_macs(LowRank, ll.attached(model).targets, cfg, tokens_per_call=8)
        assert cost.analytic_macs(Gain, ll.attached(model).targets, cfg, 8) == (None, "generic")
        ll.detach(model)
    assert rule == "variant" and macs == 4 * (64 + 64)
    assert added == 2 * macs * 8  # 2 FLOPs per MAC, 8 tokens


def test_peak_memory_sees_an_allocation_and_forgets_it_after_free():
    with cost.PeakMemory("cpu") as mem:
        block = torch.ones(16 * 2**20)  # 64 MiB, every page touched
        del block
    assert 60 < mem.peak_mb < 100
    with cost.PeakMemory("cpu") as after:  # the freed block went back to the OS
        pass
    assert after.peak_mb < 16


def test_peft_training_config_wins_over_the_export_form():
    class Exported(LowRank):
        @staticmethod
        def peft_training_config(cfg, target_names):
            return {"peft_type": "IA3", "target_modules": list(target_names),
                    "feedforward_modules": []}
    import peft
    assert isinstance(cost.peft_spec(LowRank, LowRank.config(), ["a"])[0], peft.LoraConfig)
    assert isinstance(cost.peft_spec(Exported, LowRank.config(), ["a"])[0], peft.IA3Config)


def test_interleaved_turns_alternate_which_side_runs_first(monkeypatch):
    """A fixed order biases the ratio (the side that always runs first after the other's
    forward pays for it); every other turn runs PEFT first."""
    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name
        def forward(self):
            calls.append(("fwd", self.name))
        def step(self):
            calls.append(("step", self.name))

    def timed(fn, device):  # every call takes 1 ms
        fn()
        return 1e-3, 0.0
    monkeypatch.setattr(measure, "timed", timed)
    report = cost.CostReport.__new__(cost.CostReport)
    report.s, report.device = type("S", (), {"repeats": 4})(), "cpu"
    rows = {k: cost.Row("v", k) for k in ("lora-lite", "peft")}
    turns = report._time_rows({"lora-lite": Fake("lora-lite"), "peft": Fake("peft")}, rows)
    firsts = [calls[i][1] for i in range(0, len(calls), 4)]
    assert firsts == ["lora-lite", "peft", "lora-lite", "peft"]
    assert [c[1] for c in calls[:4]] == ["lora-lite", "peft", "lora-lite", "peft"]
    assert [c[1] for c in calls[4:8]] == ["peft", "lora-lite", "peft", "lora-lite"]
    assert len(turns["step"]["peft"]) == 4 and rows["peft"].step_ms == 1.0
