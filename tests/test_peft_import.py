"""PEFT import through ll.load(model, folder), with PEFT as the oracle: folders PEFT writes here
(random values) load onto the matching lora-lite variant within 1e-5 of PEFT's outputs, detach
back to the base bit for bit, and re-save as lora-lite files. What cannot be mapped is refused
before the model is touched, with a message naming the field."""
import json
import os

import pytest
import torch
from interop_cases import (
    rel_err,
    third_party_variant,  # noqa: F401  (fixture)
)

import lora_lite as ll
from lora_lite.testing import logits, make_batch, snapshot_state, state_equal, tiny_llama

peft = pytest.importorskip("peft")
BATCH = make_batch()
pytestmark = pytest.mark.usefixtures("third_party_variant")
QV = ["q_proj", "v_proj"]

CASES = {  # id: (variant lora-lite must pick, PEFT config)
    "lora": ("lora", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=QV)),
    "lora_patterns_rslora": ("lora", lambda: peft.LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, target_modules=QV + ["down_proj"],
        rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}, alpha_pattern={"down_proj": 3})),
    "dora": ("dora", lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=QV)),
    "ia3": ("ia3", lambda: peft.IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=[])),
    "ia3_ff": ("ia3_ff", lambda: peft.IA3Config(target_modules=["down_proj"],
                                                feedforward_modules=["down_proj"])),
    "hra": ("hra", lambda: peft.HRAConfig(r=4, target_modules=QV)),
    "road": ("road", lambda: peft.RoadConfig(variant="road_2", group_size=32, target_modules=QV)),
    "road_4": ("road", lambda: peft.RoadConfig(variant="road_4", group_size=16, target_modules=QV)),
    "delora": ("delora", lambda: peft.DeloraConfig(r=4, target_modules=QV)),
    "vera": ("vera", lambda: peft.VeraConfig(r=8, target_modules=QV, save_projection=True)),
}


def peft_folder(config, folder, seed=3):
    """PEFT writes an adapter whose every tensor holds random values; returns PEFT's logits."""
    model = peft.get_peft_model(tiny_llama(), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    model.eval().save_pretrained(str(folder))
    return logits(model, BATCH)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_folders_import_exactly_and_detach_bit_exact(case, tmp_path):
    variant, make = CASES[case]
    if variant not in ll.variants():
        pytest.skip(f"{variant} not installed")
    expected = peft_logits = peft_folder(make(), tmp_path / "peft")
    model = tiny_llama()
    before = snapshot_state(model)
    ll.load(model, tmp_path / "peft")
    assert ll.attached(model).cfg.variant == variant
    assert rel_err(logits(model, BATCH), expected) <= 1e-5
    assert rel_err(logits(tiny_llama(), BATCH), peft_logits) > 1e-3  # the adapter does something
    ll.save(model, tmp_path / "a.safetensors")      # re-saved as a lora-lite file
    again = tiny_llama()
    ll.load(again, tmp_path / "a.safetensors")
    assert rel_err(logits(again, BATCH), expected) <= 1e-5
    ll.detach(model)
    assert state_equal(snapshot_state(model), before)


def test_rank_pattern_becomes_per_target_ranks(tmp_path):
    peft_folder(CASES["lora_patterns_rslora"][1](), tmp_path)
    model = tiny_llama()
    ll.load(model, tmp_path)
    layers = model.model.layers
    assert layers[0].self_attn.v_proj.lora_A.shape[0] == 2
    assert layers[1].self_attn.q_proj.lora_A.shape[0] == 6
    assert layers[0].self_attn.q_proj.lora_A.shape[0] == 4
    assert layers[0].mlp.down_proj._lora_cfg.alpha == 3


def edit_config(folder, **fields):
    path = os.path.join(folder, "adapter_config.json")
    config = json.load(open(path))
    config.update(fields)
    json.dump(config, open(path, "w"))


def lora_folder(folder, **peft_kwargs):
    peft_folder(peft.LoraConfig(**{"r": 4, "target_modules": QV, **peft_kwargs}), folder)
    return folder


def _missing_config(d):
    os.remove(lora_folder(d) / "adapter_config.json")


def _pickle(d):
    lora_folder(d)
    os.replace(d / "adapter_model.safetensors", d / "adapter_model.bin")


BAD = {
    "missing config": (_missing_config, "adapter_config.json"),
    "pickle file": (_pickle, "pickle"),
    "modules_to_save": (lambda d: edit_config(lora_folder(d), modules_to_save=[5]), "modules_to_save"),
    "bias all": (lambda d: lora_folder(d, bias="all"), "bias='all'"),
    "rank 0": (lambda d: edit_config(lora_folder(d), r=0), "r=0"),
    # LoRA on embeddings imports (test_layer_kinds); DoRA's variant adapts linear layers only
    "dora embedding target": (lambda d: lora_folder(d, target_modules=["embed_tokens", "q_proj"],
                                                    use_dora=True), "layer kind 'embedding'"),
    "unknown peft_type": (lambda d: peft_folder(peft.LoHaConfig(r=4, target_modules=QV), d),
                          "peft_type='LOHA'"),
    "lora_bias": (lambda d: edit_config(lora_folder(d), lora_bias=True), "lora_bias"),
    "pissa init": (lambda d: edit_config(lora_folder(d), init_lora_weights="pissa"),
                   "init_lora_weights"),
    "hra apply_GS": (lambda d: (peft_folder(peft.HRAConfig(r=4, target_modules=QV), d),
                                edit_config(d, apply_GS=True)), "apply_GS"),
    "mixed ia3": (lambda d: peft_folder(peft.IA3Config(target_modules=["v_proj", "down_proj"],
                                                       feedforward_modules=["down_proj"]), d),
                  "feedforward_modules"),
    "wrong shapes": (lambda d: edit_config(lora_folder(d), r=2), "do not fit"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_peft_folders_are_refused_with_the_model_untouched(case, tmp_path):
    make, needle = BAD[case]
    folder = tmp_path / "peft"
    folder.mkdir()
    make(folder)
    model = tiny_llama()
    before, before_logits = snapshot_state(model), logits(model, BATCH)
    with pytest.raises(ll.AdapterFileError) as info:
        ll.load(model, folder)
    assert needle in str(info.value)
    assert ll.attached(model) is None and state_equal(snapshot_state(model), before)
    assert torch.equal(logits(model, BATCH), before_logits)


def test_an_unreachable_hub_id_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tiny_llama()
    with pytest.raises(ll.AdapterFileError, match="hub adapter id"):
        ll.load(model, "no-such-org/no-such-adapter")
    assert ll.attached(model) is None
