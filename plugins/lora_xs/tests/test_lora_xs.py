"""LoRA-XS: invariants (fp32, 4bit, 8bit), only R trains, the SVD factors, the formula and
merged_weight, the reference's random init, config and shape validation."""
import warnings

import pytest
import torch

import lora_lite as ll
from lora_lite.testing import check_variant, quantize, tiny_llama

warnings.filterwarnings("ignore", message="MatMul8bitLt")

TARGETS = [r"q_proj$", r"v_proj$"]
MAKERS = {"fp32": tiny_llama, "4bit": lambda: quantize(tiny_llama(), "4bit"),
          "8bit": lambda: quantize(tiny_llama(), "8bit")}


def make_cfg(**kw):
    return ll.config("lora_xs", **{"r": 4, "alpha": 4, "target_names": TARGETS, **kw})


@pytest.mark.parametrize("kind", list(MAKERS))
def test_conformance(kind):
    out = check_variant("lora_xs", make_cfg(), bases=[kind], identity_tol=0.0, reload_tol=0.0,
                        merge=kind == "fp32")
    m = out["bases"][kind]
    assert m["identity_err"] == 0.0                    # R = 0
    assert m["trainable"] == 4 * 4 * 4                 # r² on each of 4 targets
    assert m["grad_norm_first"] > 0                    # R learns from R = 0
    assert {k.rsplit(".", 1)[1] for k in m["file_keys"]} == {"lora_A", "lora_B", "lora_R"}
    assert out["peft_parity"] is None                  # PEFT has no LoRA-XS


def test_factors_are_the_svd_and_formula_holds():
    model = tiny_llama()
    ll.attach(model, make_cfg())
    layer = ll.attached(model).targets[0].layer
    W = ll.dense_weight(layer)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    assert torch.allclose(layer.lora_B @ layer.lora_A, U[:, :4] @ torch.diag(S[:4]) @ Vh[:4], atol=1e-5)
    assert not layer.lora_A.requires_grad and layer.lora_R.requires_grad
    with torch.no_grad():
        layer.lora_R.normal_(0, 0.1)
        x = torch.randn(3, layer.in_features)
        want = x @ W.T + layer._lora_cfg.scale * x @ (layer.lora_B @ layer.lora_R @ layer.lora_A).T
        assert (layer(x) - want).abs().max() < 1e-5
        Wm, b = ll.get_variant("lora_xs").merged_weight(layer, layer._lora_cfg)
        assert b is None and (x @ Wm.T - want).abs().max() < 1e-5


def test_reference_random_init_is_seeded_and_small():
    a, b = tiny_llama(), tiny_llama()
    ll.attach(a, make_cfg(init_std=1e-5)), ll.attach(b, make_cfg(init_std=1e-5))
    ra = ll.attached(a).targets[0].layer.lora_R
    assert torch.equal(ra, ll.attached(b).targets[0].layer.lora_R)
    assert 0 < ra.abs().max() < 1e-4


def test_bad_input():
    for field, value in [("init_std", -1.0), ("r", 0)]:
        with pytest.raises(ll.ConfigError, match=field):
            make_cfg(**{field: value})
    model = tiny_llama()
    with pytest.raises(ValueError, match="exceeds min"):
        ll.attach(model, make_cfg(r=40))              # v_proj is 64 -> 32
    assert ll.attached(model) is None
