"""PEFT interop of parameter targets: LoRA on target_parameters matches PEFT's own outputs
(PEFT is the oracle), PEFT folders load, lora-lite exports load in PEFT, both round-trip."""
import json

import pytest
import torch
from moe_models import MOE_MODELS, ids
from safetensors.torch import load_file
from test_param_targets import Holder

import lora_lite as ll

peft = pytest.importorskip("peft")
ARCHS = ["mixtral", "qwen3_moe"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def logits(model, x=None):
    with torch.no_grad():
        out = model(ids() if x is None else x)
    return out.logits if hasattr(out, "logits") else out


def peft_model(base, target_modules=(), r=2, alpha=4):
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules),
                          target_parameters=EXPERTS)
    model = peft.get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_folder_loads_and_matches_peft(arch, tmp_path):
    pm = peft_model(MOE_MODELS[arch](), target_modules=["q_proj"])
    want = logits(pm)
    pm.save_pretrained(tmp_path / "peft")
    model = MOE_MODELS[arch]()
    report = ll.load(model, tmp_path / "peft")
    state = ll.attached(model)
    assert len(state.param_targets) == 4 and len(state.targets) == 2
    assert report["targets"] == 6
    torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=1e-5)
    # and back: the export is PEFT's own folder, tensor for tensor
    ll.export_peft(model, tmp_path / "back")
    mine, theirs = (load_file(tmp_path / f / "adapter_model.safetensors") for f in ("back", "peft"))
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(pt.name for pt in state.param_targets)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_loads_in_peft_and_matches(arch, tmp_path):
    model = MOE_MODELS[arch]()
    ll.attach(model, ll.config("lora", r=2, alpha=4))  # defaults: all-linear + the experts
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for t in ll.adapter_tensors(model).values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    want = logits(model)
    ll.export_peft(model, tmp_path / "peft")
    pm = peft.PeftModel.from_pretrained(MOE_MODELS[arch](), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(pm), want, atol=1e-5, rtol=1e-5)
    # PEFT's merge_and_unload and ll.merge fold the same fused parameters
    merged_peft = pm.merge_and_unload()
    ll.merge(model)
    for name, p in merged_peft.named_parameters():
        if p.dim() == 3:
            torch.testing.assert_close(model.get_parameter(name), p, atol=1e-6, rtol=1e-5)
    # a lora-lite file of the same adapter reloads to PEFT's outputs too
    fresh = MOE_MODELS[arch]()
    ll.load(fresh, tmp_path / "peft")
    ll.save(fresh, tmp_path / "a.safetensors")
    again = MOE_MODELS[arch]()
    ll.load(again, tmp_path / "a.safetensors")
    torch.testing.assert_close(logits(again), want, atol=1e-5, rtol=1e-5)


def test_transposed_layout_matches_peft(tmp_path):
    """(E, d_in, d_out) storage with is_transposed = True (GPT-OSS's layout) and a 2-D one."""
    x = torch.randn(3, 4, 5)
    base = Holder()
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=[],
                                                  target_parameters=["experts.w", "experts.flat"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    want = logits(pm, x)
    pm.save_pretrained(tmp_path / "peft")
    model = Holder()
    ll.load(model, tmp_path / "peft")
    torch.testing.assert_close(logits(model, x), want, atol=1e-5, rtol=1e-5)


def test_peft_folder_naming_a_missing_parameter_is_refused(tmp_path):
    pm = peft_model(MOE_MODELS["qwen3_moe"]())
    pm.save_pretrained(tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["target_parameters"] = ["mlp.experts.no_such_proj"]
    path.write_text(json.dumps(config))
    model = MOE_MODELS["qwen3_moe"]()
    with pytest.raises(ll.AdapterFileError, match="match no parameter"):
        ll.load(model, tmp_path / "peft")
    assert ll.attached(model) is None
