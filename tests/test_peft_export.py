"""ll.export_peft, with PEFT as the oracle: the native export of every PEFT-shared variant loads in
peft.PeftModel.from_pretrained onto the unmodified base within 1e-5; as_lora_rank at full rank
loads as plain LoRA within 1e-4 for every installed variant; what cannot be exported is refused."""
import json

import pytest
import torch
from interop_cases import (
    PEFT_SHARED,
    THIRD_PARTY,
    adapted_model,
    biased_llama,
    installed,
    make_config,
    rel_err,
    third_party_variant,  # noqa: F401  (fixture)
)

import lora_lite as ll
from lora_lite.testing import logits, make_batch, tiny_llama

peft = pytest.importorskip("peft")
BATCH = make_batch()
pytestmark = pytest.mark.usefixtures("third_party_variant")
FULL_RANK = 64   # >= min(d_out, d_in) of every tiny-Llama layer


def peft_logits(folder, make_model=tiny_llama):
    return logits(peft.PeftModel.from_pretrained(make_model(), str(folder)).eval(), BATCH)


def has_native_export(name):
    variant = ll.get_variant(name)
    return callable(getattr(variant, "peft_config", None)) and \
        variant.peft_config(make_config(name), ["x"]) is not None


def native_variants():
    """Collection time: the variants that offer a native export (the third-party one, which may
    be registered only later from its source, is known to)."""
    return sorted(n for n in installed()
                  if (n == THIRD_PARTY and n not in ll.variants()) or has_native_export(n))


@pytest.mark.parametrize("name", native_variants())
def test_native_export_loads_in_peft(name, tmp_path):
    model, _ = adapted_model(name)
    report = ll.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == report["peft_type"]
    assert rel_err(peft_logits(tmp_path), logits(model, BATCH)) <= 1e-5


def test_the_ten_peft_shared_variants_export_natively():
    assert set(PEFT_SHARED) & set(installed()) <= {n for n in installed() if has_native_export(n)}


@pytest.mark.parametrize("name", installed())
def test_as_lora_rank_at_full_rank_is_plain_lora_within_1e4(name, tmp_path):
    model, _ = adapted_model(name)
    report = ll.export_peft(model, tmp_path, as_lora_rank=FULL_RANK)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config.get("use_dora")) == ("LORA", FULL_RANK, False)
    assert report["max_relative_error"] <= 1e-5 and set(report["layers"]) == set(config["target_modules"])
    assert rel_err(peft_logits(tmp_path), logits(model, BATCH)) <= 1e-4


def test_truncated_rank_reports_its_error(tmp_path):
    model, _ = adapted_model("lora")            # rank 4 delta
    exact = ll.export_peft(model, tmp_path / "r4", as_lora_rank=4)
    cut = ll.export_peft(model, tmp_path / "r2", as_lora_rank=2)
    assert exact["max_relative_error"] <= 1e-5
    assert all(0.05 < v["relative_error"] < 1 for v in cut["layers"].values())


def test_pissa_exports_rank_2r_relative_to_the_original_base(tmp_path):
    model, cfg = adapted_model("pissa")
    ll.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 2 * cfg.r and config["init_lora_weights"] is True
    assert rel_err(peft_logits(tmp_path), logits(model, BATCH)) <= 1e-5  # on the untouched base


@pytest.mark.parametrize("name", [n for n in installed() if n not in native_variants()])
def test_variants_peft_lacks_say_to_use_as_lora_rank(name, tmp_path):
    model, _ = adapted_model(name)
    with pytest.raises(ll.AttachError, match="as_lora_rank"):
        ll.export_peft(model, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()


@pytest.mark.parametrize("name", ["ia3", "road"])
def test_a_bias_change_cannot_be_plain_lora(name, tmp_path):
    model, _ = adapted_model(name, make_model=biased_llama)
    with pytest.raises(ll.AttachError, match="bias"):
        ll.export_peft(model, tmp_path, as_lora_rank=FULL_RANK)
    assert not (tmp_path / "adapter_config.json").exists()
    ll.export_peft(model, tmp_path)           # the native form carries it
    assert rel_err(peft_logits(tmp_path, biased_llama), logits(model, BATCH)) <= 1e-5


def test_bad_rank_and_mixed_vera_shapes_are_refused(tmp_path):
    model, _ = adapted_model("lora")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ll.ConfigError, match="as_lora_rank"):
            ll.export_peft(model, tmp_path, as_lora_rank=bad)
    if "vera" in installed():
        vera, _ = adapted_model("vera", target_names=(r"q_proj$", r"v_proj$"))  # 64x64 and 64x32
        with pytest.raises(ll.AttachError, match="shares"):
            ll.export_peft(vera, tmp_path)
    with pytest.raises(ll.AttachError, match="no lora-lite adapter"):
        ll.export_peft(tiny_llama(), tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()


def test_imported_rank_pattern_exports_back(tmp_path):
    cfg = ll.config("lora", r=4, alpha=8, target_names=(r"q_proj$", r"v_proj$"), target_roles=(),
                    overrides=((r"layers\.1\.self_attn\.q_proj$", {"r": 2, "alpha": 3.0}),))
    model = tiny_llama()
    ll.attach(model, cfg)
    with torch.no_grad():
        for p in ll.trainable_parameters(model):
            p.normal_(0, 0.3)
    assert model.model.layers[1].self_attn.q_proj.lora_A.shape[0] == 2
    ll.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert list(config["rank_pattern"].values()) == [2]
    assert rel_err(peft_logits(tmp_path), logits(model, BATCH)) <= 1e-5
