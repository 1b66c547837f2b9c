"""lora-lite-vera: config validation, lora-lite's conformance kit (``check_variant``: fp32, 4bit,
8bit bases), shared and regenerated projections, and numerical parity with PEFT's VeRA."""
import gc
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_lite as ll
from lora_lite import testing

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R = 4


def vera_cfg(**kw):
    return ll.config("vera", **{"r": R, "target_names": [f"{n}$" for n in PROJ], **kw})


def vera_module():
    import lora_lite_vera.vera as module
    return module


# -- config -------------------------------------------------------------------------------------

def test_config_defaults_and_knobs():
    cfg = ll.config("vera")
    assert (cfg.variant, cfg.r, cfg.projection_seed, cfg.d_initial) == ("vera", 256, 0, 0.1)
    assert ll.get_variant("vera").config.knobs() == {"projection_seed": 0, "d_initial": 0.1,
                                                     "store_projections": False}


@pytest.mark.parametrize("field, value", [
    ("projection_seed", -1), ("projection_seed", 1.5), ("projection_seed", True),
    ("d_initial", 0.0), ("d_initial", float("nan")), ("d_initial", "0.1"), ("r", 0),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ll.ConfigError, match=rf"^{field}:"):
        ll.config("vera", **{field: value})


def test_registered_without_problems():
    assert ll.get_variant("vera").name == "vera"
    assert ll.hook_kind(ll.get_variant("vera")) == "output"
    assert not [p for p in ll.problems() if p.distribution == "lora-lite-vera"]


# -- conformance: lora-lite's kit for plugin authors ----------------------------------------

@pytest.mark.parametrize("base", ["fp32", "4bit", "8bit"])
def test_conformance(base):
    # λ_b = 0 at init makes the added term exactly zero, so identity is exact (not a tolerance);
    # the reloaded model runs the same ops on the same values: equal up to float noise
    # (PEFT shares one A/B pair across all targets: its parity is checked on one shape below)
    fig = testing.check_variant("vera", vera_cfg(), bases=[base], identity_tol=0.0,
                                reload_tol=1e-6, peft=False)["bases"][base]
    # per target: λ_d (r) + λ_b (d_out); 2 layers x (7 r + sum of d_out = 512)
    assert fig["trainable"] == 2 * (7 * R + 512)
    assert fig["trained_delta"] > 1e-3 and fig["detach_logits_err"] == 0.0
    # the file holds λ_d, λ_b and the fingerprint of every target; never A or B
    suffixes = sorted({k.rsplit(".", 1)[1] for k in fig["file_keys"]})
    assert suffixes == ["lora_lambda_b", "lora_lambda_d", "lora_vera_fingerprint"]
    assert len(fig["file_keys"]) == 3 * 14
    assert fig["file_bytes"] < 16_000


def test_conformance_with_peft_parity_on_targets_of_one_shape():
    pytest.importorskip("peft")
    fig = testing.check_variant("vera", vera_cfg(target_names=[r"q_proj$", r"o_proj$"]),
                                identity_tol=0.0, reload_tol=1e-6)
    assert fig["peft_parity"] is not None and fig["peft_parity"] <= 1e-6
    with pytest.raises(testing.VariantCheckFailed, match="PEFT shares across targets"):
        testing.check_variant("vera", vera_cfg(), identity_tol=0.0, reload_tol=1e-6)


def test_declares_its_own_training_and_cost_knowledge():
    vera = ll.get_variant("vera")
    assert vera.train_defaults["lr"] == 3e-2
    target = next(t for t in ll.find_targets(testing.tiny_llama(), vera_cfg()) if t.d_out == 32)
    assert vera.added_macs(target, vera_cfg()) == (R * (64 + 32), 0)


# -- shared, frozen, regenerated projections --------------------------------------------------

def test_projections_are_shared_frozen_and_not_saved():
    model = testing.tiny_llama()
    state = ll.attach(model, vera_cfg(projection_seed=11))
    by_shape = {}
    for t in state.targets:
        A, B = t.layer.lora_vera_A, t.layer.lora_vera_B
        assert A.shape == (R, t.d_in) and B.shape == (t.d_out, R)
        assert not A.requires_grad and not B.requires_grad
        by_shape.setdefault((t.d_in, t.d_out), set()).add((id(A), id(B)))
    # one (A, B) object pair per distinct shape, used by every layer of that shape
    assert all(len(pairs) == 1 for pairs in by_shape.values())
    assert len(by_shape) == 4  # (64,64) q/o, (64,32) k/v, (64,128) gate/up, (128,64) down
    assert not [k for k in model.state_dict() if "vera_A" in k or "vera_B" in k]
    assert all(not p.requires_grad or ".lora_lambda_" in n for n, p in model.named_parameters())
    ll.detach(model)
    del state, A, B  # the loop's last pair
    gc.collect()
    assert not [k for k in vera_module()._shared.keys() if k[0] == 11]  # freed after detach


def test_projections_regenerate_from_the_seed():
    module = vera_module()
    A1, B1 = module.projections(5, R, 64, 32)
    A2, B2 = module.projections(5, R, 64, 32)
    A3, _ = module.projections(6, R, 64, 32)
    assert torch.equal(A1, A2) and torch.equal(B1, B2)
    assert not torch.equal(A1, A3)
    # kaiming-uniform like PEFT: |A| <= sqrt(6 / d_in), |B| <= sqrt(6 / r)
    assert A1.abs().max() <= (6 / 64) ** 0.5 and B1.abs().max() <= (6 / R) ** 0.5
    models = [testing.tiny_llama(), testing.tiny_llama()]
    layers = []
    for m in models:
        ll.attach(m, vera_cfg(projection_seed=5))
        layers.append(m.model.layers[0].self_attn.k_proj)
    assert torch.equal(layers[0].lora_vera_A, A1) and torch.equal(layers[1].lora_vera_B, B1)


def test_load_refuses_projections_that_do_not_regenerate(tmp_path):
    batch = testing.make_batch()
    model = testing.tiny_llama()
    ll.attach(model, vera_cfg())
    path = tmp_path / "vera.safetensors"
    ll.save(model, path)
    # a machine whose random stream differs would regenerate other A/B: simulate it
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("lora_vera_fingerprint"))
    tensors[key] = tensors[key] + 1.0
    tampered = os.fspath(tmp_path / "tampered.safetensors")
    save_file(tensors, tampered, metadata=metadata)
    fresh = testing.tiny_llama()
    before = testing.logits(fresh, batch)
    with pytest.raises(ll.AdapterFileError, match="projection_seed=0"):
        ll.load(fresh, tampered)
    assert ll.attached(fresh) is None
    assert torch.equal(testing.logits(fresh, batch), before)


# -- parity with PEFT's VeRA --------------------------------------------------------------------

def copy_from_peft(peft_model, model):
    """Give our adapter PEFT's values: its lambdas, and the slices of its shared A/B that each
    PEFT layer uses (PEFT sizes one pair to the largest target and slices it per layer)."""
    modules = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
               if hasattr(m, "vera_lambda_d")}
    state = ll.attached(model)
    assert sorted(modules) == sorted(t.name for t in state.targets)
    with torch.no_grad():
        for t in state.targets:
            pm = modules[t.name]
            # private copies, so the pair shared with other models stays as the seed made it
            t.layer.register_buffer("lora_vera_A", pm.vera_A["default"][:, :t.d_in].clone(),
                                    persistent=False)
            t.layer.register_buffer("lora_vera_B", pm.vera_B["default"][:t.d_out, :].clone(),
                                    persistent=False)
            t.layer.lora_lambda_d.copy_(pm.vera_lambda_d["default"])
            t.layer.lora_lambda_b.copy_(pm.vera_lambda_b["default"])


def test_matches_peft_vera():
    peft = pytest.importorskip("peft")
    batch = testing.make_batch()
    peft_model = peft.get_peft_model(testing.tiny_llama(), peft.VeraConfig(
        r=R, target_modules=PROJ, projection_prng_key=0, d_initial=0.1))
    # identity at init on both sides (PEFT's λ_b = 0 too)
    base = testing.logits(testing.tiny_llama(), batch)
    assert (testing.logits(peft_model, batch) - base).abs().max().item() == 0.0
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a "trained" PEFT adapter: random non-zero lambdas
        for n, p in peft_model.named_parameters():
            if "vera_lambda" in n:
                p.normal_(0.0, 1.0, generator=g)
    model = testing.tiny_llama()
    ll.attach(model, vera_cfg())
    copy_from_peft(peft_model, model)
    ours, theirs = testing.logits(model, batch), testing.logits(peft_model, batch)
    assert (theirs - base).abs().max().item() > 0.1  # the adapter does change the outputs
    # same ops in the same order on the same fp32 values
    assert (ours - theirs).abs().max().item() <= 1e-6


def test_bf16_adapter_on_fp32_base():
    # λ_b = 0 exactly in bf16 too; the hook computes in bf16, the merged weight in fp32 (~2^-9)
    testing.check_variant("vera", vera_cfg(dtype=torch.bfloat16), identity_tol=0.0,
                          reload_tol=1e-6, merge_tol=5e-3, peft=False)
