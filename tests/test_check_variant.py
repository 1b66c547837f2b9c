"""lora_lite.testing.check_variant, the conformance kit: it passes a correct variant (registered
or not) and catches each kind of broken one with a one-line reason. Every detector of
measure_invariants is fed a case it must catch."""
import itertools
from dataclasses import dataclass

import pytest
import torch

import lora_lite as ll
from lora_lite.testing import VariantCheckFailed, check_variant, make_batch, measure_invariants, model_maker


@dataclass
class KitLoRAConfig(ll.AdapterConfig):
    variant: str = "kit_lora"


class KitLoRA(ll.Variant):
    """y + s (x Aᵀ) Bᵀ with PEFT's LoRA naming, an exact merge and the report members."""
    name, config = "kit_lora", KitLoRAConfig
    train_defaults = {"lr": 1e-3}

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_A": ll.ParamSpec((cfg.r, d_in), init="kaiming"),
                "lora_B": ll.ParamSpec((d_out, cfg.r), init="zeros")}

    @staticmethod
    def forward(layer, x, y):
        return y + layer._lora_cfg.scale * (x @ layer.lora_A.T) @ layer.lora_B.T

    @staticmethod
    def added_macs(target, cfg):
        return cfg.r * (target.d_in + target.d_out), 0

    @staticmethod
    def merged_weight(layer, cfg):
        return ll.dense_weight(layer) + cfg.scale * layer.lora_B.float() @ layer.lora_A.float(), None

    @staticmethod
    def peft_config(cfg, target_names):
        return {"peft_type": "LORA", "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": 0.0,
                "target_modules": target_names}

    @staticmethod
    def peft_state(layer, cfg):
        return {"lora_A.weight": layer.lora_A, "lora_B.weight": layer.lora_B}


def broken(name, **members):
    """A KitLoRA with ``members`` replaced: its own config class and name, unregistered."""
    cfg = dataclass(type(f"{name}Config", (ll.AdapterConfig,), {
        "__annotations__": {"variant": str}, "variant": name}))
    return type(name, (KitLoRA,), {"name": name, "config": cfg,
                                   **{k: staticmethod(v) for k, v in members.items()}})


def specs_with(**extra):
    def param_specs(d_in, d_out, cfg):
        return {**KitLoRA.param_specs(d_in, d_out, cfg), **extra}
    return param_specs


def random_B(d_in, d_out, cfg):
    return {"lora_A": ll.ParamSpec((cfg.r, d_in), init="kaiming"),
            "lora_B": ll.ParamSpec((d_out, cfg.r), init="normal")}


def leaking_forward(layer, x, y):
    layer.weight.requires_grad_(True)  # lets the base weight collect a gradient
    return KitLoRA.forward(layer, x, y)


def caching_init(layer, cfg):
    layer.register_buffer("kit_cache", torch.zeros(1))  # outlives detach: not lora_*, persistent


def unseeded_specs(d_in, d_out, cfg):
    return {"lora_A": ll.ParamSpec((cfg.r, d_in), trainable=False, persistent=False),
            "lora_B": ll.ParamSpec((d_out, cfg.r), init="zeros")}


DRAWS = itertools.count(1)


def unseeded_init(layer, cfg):  # a fresh draw on every attach: another A after a load
    g = torch.Generator().manual_seed(next(DRAWS))
    layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))


def global_rng_init(layer, cfg):  # the frozen A from the global RNG: another A in a new process
    layer.lora_A.copy_(torch.randn(layer.lora_A.shape))


def base_writing_forward(layer, x, y):
    if layer.training:
        with torch.no_grad():
            layer.weight.data.mul_(1.0001)  # trains the base behind the optimizer's back
    return KitLoRA.forward(layer, x, y)


def silent_rewrite_init(layer, cfg):  # writes the base (the same values) without saying so
    ll.set_dense_weight(layer, ll.dense_weight(layer))


BROKEN = [
    (broken("kit_silent_rewrite", init=silent_rewrite_init),
     "rewrites_weight says False for this config, but attach changed the base weight"),
    (broken("kit_stale_flag", rewrites_weight=lambda cfg: True),  # e.g. stale after an opt-in
     "rewrites_weight says True for this config, but attach did not change the base weight"),
    (broken("kit_not_identity", param_specs=random_B), "not the identity at init"),
    (broken("kit_leak", forward=leaking_forward), "gradient reached base parameter(s)"),
    (broken("kit_dead", param_specs=specs_with(lora_unused=ll.ParamSpec((3,)))),
     "got no gradient after 2 steps on the fp32 base: model.layers.0.self_attn.q_proj.lora_unused"),
    (broken("kit_base_writer", forward=base_writing_forward), "training changed a base tensor"),
    (broken("kit_no_restore", init=caching_init), "detach does not restore the state_dict"),
    (broken("kit_reload", param_specs=unseeded_specs, init=unseeded_init),
     "save -> load does not reproduce the output"),
    (broken("kit_global_rng", param_specs=unseeded_specs, init=global_rng_init),
     "save -> load does not reproduce the output"),
    (broken("kit_bad_peft", peft_state=lambda layer, cfg: {"lora_A.weight": layer.lora_A,
                                                           "lora_B.weight": 2 * layer.lora_B}),
     "PEFT parity: max |logit difference|"),
    (broken("kit_peft_names", peft_state=lambda layer, cfg: {"lora_A.weight": layer.lora_A}),
     "peft_state does not match PEFT's tensors: missing"),
    (broken("kit_bad_merge", merged_weight=lambda layer, cfg: (ll.dense_weight(layer), None)),
     "merged_weight is not the adapted layer"),
    (broken("kit_bad_macs", added_macs=lambda target, cfg: 12), "added_macs must return"),
]


def test_a_correct_unregistered_variant_passes_with_every_check():
    pytest.importorskip("peft")
    assert "kit_lora" not in ll.variants()
    figures = check_variant(KitLoRA)
    assert "kit_lora" not in ll.variants()  # registered only for the check
    fp32 = figures["bases"]["fp32"]
    assert figures["trainable"] == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)
    assert fp32["identity_err"] == 0.0 and fp32["reload_err"] <= 1e-6 and fp32["detach_bitexact"]
    assert figures["peft_parity"] < 1e-5 and figures["merge_err"] < 1e-5


@pytest.mark.parametrize("variant, reason", BROKEN, ids=[v.name for v, _ in BROKEN])
def test_each_broken_variant_is_caught_with_a_one_line_reason(variant, reason):
    if "peft" in variant.name:
        pytest.importorskip("peft")
    with pytest.raises(VariantCheckFailed) as err:
        check_variant(variant)
    assert reason in str(err.value) and "\n" not in str(err.value)
    assert variant.name not in ll.variants()


def test_a_contract_breach_is_refused_before_any_model_is_built():
    no_forward = broken("kit_no_forward")
    no_forward.forward = None
    with pytest.raises(VariantCheckFailed, match=r"^contract: .*must define forward"):
        check_variant(no_forward)


def test_unknown_name_and_base_are_refused():
    with pytest.raises(VariantCheckFailed, match="not registered; pass the class"):
        check_variant("kit_nosuch")
    with pytest.raises(VariantCheckFailed, match="unknown base 'fp8'"):
        check_variant(KitLoRA, bases=("fp8",), peft=False, merge=False)


def test_quantized_bases():
    figures = check_variant(KitLoRA, bases=("4bit", "8bit"), peft=False, merge=False)
    assert set(figures["bases"]) == {"4bit", "8bit"} and figures["merge_err"] is None
    assert all(f["identity_err"] == 0.0 for f in figures["bases"].values())


@pytest.mark.parametrize("variant, figure, caught", [
    (broken("kit_leak", forward=leaking_forward), "base_grad_leaks", 4),
    (broken("kit_dead", param_specs=specs_with(lora_unused=ll.ParamSpec((3,)))),
     "zero_grad_adapters", 4),
    (broken("kit_base_writer", forward=base_writing_forward), "base_changed", True),
])
def test_measure_invariants_detectors_fire(variant, figure, caught):
    """The raw counters themselves (not only check_variant's verdict) see each defect."""
    from lora_lite.testing.conformance import _registered
    with _registered(variant):
        cfg = ll.config(variant.name, r=4, target_names=[r"q_proj$", r"v_proj$"], target_roles=())
        m = measure_invariants(model_maker("fp32"), cfg, make_batch(), steps=2)
    assert m[figure] == caught
