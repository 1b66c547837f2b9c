"""The architecture matrix: 13 tiny models x every installed variant, default targets.

Per cell: identity at init, gradients only on adapter tensors (every trainable one gets one),
one optimizer step moves the output, save -> load on a fresh base reproduces it, the loaded model
survives ``.to(float64)`` and ``.to(bfloat16)``, and detach puts the base back bit for bit.
Models come from ``lora_lite.tiny_models`` (width 32, 2 blocks, built from configs; no download).
"""
import copy

import pytest
import torch

import lora_lite as ll
from lora_lite.arch_matrix import base, calibration, cell_problems, default_config, run_cell
from lora_lite.tiny_models import ARCHS

# knobs that fit width-32 models (a variant not listed gets r=4 and its own defaults)
TINY_KNOBS = {
    "antipasto_rot": dict(block_size=2),
    "antipasto_arrow": dict(block=2),
    "road": dict(group_size=4),
    "antipasto_dplr": dict(lora_rank=2),
    # its default init_alpha (0.05) is not the identity, by design; at 0 a direction whose first
    # step pushes alpha below 0 stays off (clamp), so several directions per target
    "antipasto_ablate": dict(init_alpha=0.0, k=4),
    "oft": dict(block_size=4),
}
VARIANTS = sorted(ll.variants())


@pytest.mark.parametrize("layers", [None, (0,)], ids=["all", "block0"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_cell(arch, variant, layers):
    m = run_cell(arch, variant, layers, TINY_KNOBS.get(variant))
    assert not cell_problems(m, layers), m


# -- PEFT parity on GPT-2 (Conv1D: PEFT's fan_in_fan_out=True) and Qwen2 (tied head) ----------------
def _lora_peft(cfg, names):
    return {"peft_type": "LORA", "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": 0.0,
            "target_modules": names}


def _ia3_peft(feedforward):
    def peft_config(cfg, names):
        return {"peft_type": "IA3", "target_modules": names,
                "feedforward_modules": names if feedforward else []}
    return peft_config


# What the variants' own peft_config/peft_state give, for the two that must match even where the
# interop helpers are absent (names: PEFT's, relative to the layer, without the adapter name).
FALLBACK = {
    "lora": (_lora_peft, lambda layer, cfg: {"lora_A.weight": layer.lora_A, "lora_B.weight": layer.lora_B}),
    "ia3": (_ia3_peft(False), lambda layer, cfg: {"ia3_l": layer.lora_g.reshape(-1, 1)}),
    "ia3_ff": (_ia3_peft(True), lambda layer, cfg: {"ia3_l": layer.lora_g.reshape(1, -1)}),
}


def peft_hooks(variant):
    cls = ll.get_variant(variant)
    if callable(getattr(cls, "peft_config", None)) and callable(getattr(cls, "peft_state", None)):
        return cls.peft_config, cls.peft_state
    return FALLBACK.get(variant)


PARITY = [(a, v) for a in ("gpt2", "qwen2") for v in VARIANTS if peft_hooks(v) is not None]


def peft_twin(arch, model, variant):
    """PEFT's model of the same base, with our adapter's values copied in."""
    import peft
    cfg, targets = ll.attached(model).cfg, ll.attached(model).targets
    make_config, state_of = peft_hooks(variant)
    names = [t.name for t in targets]
    spec = make_config(cfg, names)
    if spec is None:
        pytest.skip(f"PEFT has no {variant}")
    if spec["peft_type"] == "LORA" and any(type(t.layer).__name__ == "Conv1D" for t in targets):
        spec = {**spec, "fan_in_fan_out": True}                 # GPT-2's (d_in, d_out) storage
    twin = peft.get_peft_model(ARCHS[arch].build(), peft.get_peft_config(dict(spec))).eval()
    own = twin.state_dict()
    values = {}
    for t in targets:
        for key, tensor in state_of(t.layer, cfg).items():
            head, _, rest = key.partition(".")
            full = f"base_model.model.{t.name}.{head}.default" + (f".{rest}" if rest else "")
            assert full in own, (full, [k for k in own if t.name in k][:6])
            values[full] = tensor.detach().reshape(own[full].shape)
    twin.load_state_dict(values, strict=False)
    return twin


@pytest.mark.parametrize("arch,variant", PARITY)
def test_matches_peft(arch, variant):
    a = ARCHS[arch]
    pristine, batch, ref = base(arch)
    model = copy.deepcopy(pristine)
    cfg = default_config(variant, model, knobs=TINY_KNOBS.get(variant))
    ll.attach(model, cfg, calibration_data=calibration(variant, batch))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move every trainable tensor off its init so the check means something
        for p in ll.trainable_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    ours = a.outputs(model, batch)
    theirs = a.outputs(peft_twin(arch, model, variant), batch)
    assert (ours - ref).abs().max() > 1e-3                     # the adapter is not a no-op
    assert (ours - theirs).abs().max().item() < 1e-5


# -- the cell checks fire on bad cells ------------------------------------------------------------
def test_cell_problems_catch_a_variant_that_is_not_the_identity_at_init():
    from dataclasses import dataclass

    from lltest import registered

    @dataclass
    class OffConfig(ll.AdapterConfig):
        variant: str = "off_by_default"

    class Off(ll.Variant):
        name, config = "off_by_default", OffConfig

        @staticmethod
        def param_specs(d_in, d_out, cfg):
            return {"lora_s": ll.ParamSpec((d_out,), init="normal")}   # not the identity

        @staticmethod
        def forward(layer, x, y):
            return y * (1 + layer.lora_s)

    with registered(Off):
        problems = cell_problems(run_cell("gpt2", "off_by_default"))
    assert problems == ["identity < 1e-5"]


def test_cell_problems_name_each_broken_invariant():
    good = dict(blocks=[0, 1], identity=0.0, base_grads=[], no_grad=[], grad_norm=1.0, moved=1.0,
                reload=0.0, float64=0.0, bfloat16=0.01, detach_bitexact=True,
                detach_exact_outputs=True)
    assert cell_problems(good) == []
    bad = {"blocks": [0], "base_grads": ["w"], "no_grad": ["lora_A"], "reload": 1.0,
           "float64": float("nan"), "detach_bitexact": False}
    for key, value in bad.items():
        assert len(cell_problems({**good, key: value})) == 1, key
    assert cell_problems({**good, "blocks": [0, 1]}, layers=(0,)) == ["layers"]
