"""Bad numbers in configs: every bad value of every field of every installed variant's config
is a ConfigError naming the field (never a raw TypeError at attach, never a NaN model), and
EVA refuses calibration data whose activations are not finite, leaving the model untouched."""
import dataclasses
import math
import re

import pytest
import torch
from lltest import QV, assert_untouched

import lora_lite as ll
from lora_lite.testing import logits, make_batch, snapshot_state, tiny_llama

NAN, INF = float("nan"), float("inf")
# the base fields, by name: values that must be refused on every variant
BASE_BAD = {
    "r": [0, -3, 2.5, True, "8", None, NAN],
    "alpha": [INF, -INF, NAN, 1e300, True, False, "16", None, [16]],  # 1e300: inf in the hook
    "dtype": ["int8", torch.int64, 5, None],
    "target_roles": [("reader", "sideways"), 5, (5,), None],
    "target_names": [5, (5,), ("(unclosed",), ("a{99999999999}",), (b"q_proj",), None],
    "exclude_names": [5, (None,), ("(unclosed",), (b"lm_head",)],
    "target_parameters": [5, (5,), ("(unclosed",), ("a{99999999999}",), (b"experts",)],
    "trainable_modules": [5, (5,), ("",), (b"score",), (None,)],
    "layers": [(True,), (-1,), (0.5,), ("0",), 5.0, True],
    "seed": [True, -1, 2 ** 64, 2 ** 70, 1.5, "0", None],
    "overrides": [5, (5,), (("q_proj", 5),), (("(unclosed", {}),), (("a{99999999999}", {}),),
                  ((b"q_proj", {}),), (("q_proj", {"variant": "dora"}),),
                  (("q_proj", {"target_names": ["x"]}),), (("q_proj", {"alpha": float("inf")}),),
                  (("q_proj", {"seed": -1}),)],
}
# a knob's kind (from its default) -> values that are wrong for any knob of that kind
KIND_BAD = {
    bool: [1, 0, "yes", None],
    int: [True, 2.5, "3", None, -1, NAN],
    float: [NAN, INF, -INF, 1e300, -1e300, True, False, "1.0", None],
    str: [5, None, "no-such-choice"],
}
# knobs whose valid range is narrower than their kind's
DOMAIN_BAD = {
    ("pissa", "alpha"): [0, -16, 0.0],  # s = alpha / r enters sqrt(S / s)
    ("dora", "alpha"): [8 * 2e19, -8 * 2e19],  # the factored row norm takes s² in float32
}


def variant_fields():
    """(variant, field, kind) for every field of every installed variant's config."""
    out = []
    for name in sorted(ll.variants()):
        cfg_cls = ll.get_variant(name).config
        for f in dataclasses.fields(cfg_cls):
            if f.name == "variant" or (f.name == "r" and not cfg_cls.uses_rank):
                continue
            default = cfg_cls.knobs().get(f.name)
            kind = "base" if f.name in BASE_BAD else type(default)
            out.append((name, f.name, kind))
    return out


def bad_cases():
    cases = []
    for name, field, kind in variant_fields():
        values = BASE_BAD[field] if kind == "base" else KIND_BAD.get(kind)
        assert values is not None, f"{name}.{field}: add bad values for kind {kind}"
        values = values + DOMAIN_BAD.get((name, field), [])
        cases += [pytest.param(name, field, v, id=f"{name}-{field}={v!r}") for v in values]
    return cases


def test_every_variant_and_field_is_swept():
    names = {n for n, _, _ in variant_fields()}
    assert {"lora", "pissa", "eva"} <= names
    assert len(bad_cases()) > 100


@pytest.mark.parametrize("variant,field,value", bad_cases())
def test_bad_value_is_a_config_error_naming_the_field(variant, field, value):
    with pytest.raises(ll.ConfigError) as info:
        ll.config(variant, **{field: value})
    message = str(info.value)
    assert re.match(rf"{field}\b", message), message
    assert "\n" not in message and len(message) < 300


@pytest.mark.parametrize("variant,field,value", bad_cases()[::7])
def test_bad_value_in_a_stored_config_is_a_config_error(variant, field, value):
    """The same values reaching from_dict (a config file, an adapter file's metadata)."""
    d = ll.config(variant).to_dict()
    d[field] = list(value) if isinstance(value, tuple) else value
    if isinstance(d[field], torch.dtype):
        d[field] = str(d[field])
    with pytest.raises(ll.ConfigError, match=rf"^{field}\b"):
        ll.AdapterConfig.from_dict(d)


@pytest.mark.parametrize("seed", [0, 1, 2 ** 63, 2 ** 64 - 1])
def test_seeds_in_torchs_range_are_accepted(seed, model):
    ll.attach(model, ll.config("lora", r=2, seed=seed, **QV))


@pytest.mark.parametrize("alpha", [1e-3, 0.5, 16, 1e6])
def test_finite_positive_pissa_alpha_gives_a_finite_model(alpha, model, batch):
    ll.attach(model, ll.config("pissa", r=2, alpha=alpha, **QV))
    assert torch.isfinite(logits(model, batch)).all()


# what the tiny model needs besides alpha (antipasto: r directions of 64x32 layers, road: a
# group size dividing d_out = 32); other variants take r=2 and their defaults
TINY_KNOBS = {"antipasto": {"r": 8}, "antipasto_rot": {"r": 8},
              "antipasto_arrow": {"r": 8, "block": 2}, "antipasto_dplr": {"r": 8, "lora_rank": 2},
              "road": {"group_size": 16}}


@pytest.mark.parametrize("variant", sorted(ll.variants()))
def test_the_most_extreme_accepted_alpha_gives_a_finite_model(variant, batch):
    """alpha up to float32's max is accepted (so the scale stays finite in the hook, no inf * 0);
    on every variant the model it gives at init is finite."""
    from lora_lite.config import FLOAT32_MAX
    top = 2 * 1.8e19 if variant == "dora" else FLOAT32_MAX  # dora: |s| <= sqrt(FLOAT32_MAX)
    for alpha in (top, -top, 1e-38):
        kw = {**QV, "r": 2, "alpha": alpha, **TINY_KNOBS.get(variant, {})}
        if variant == "pissa" and alpha < 0:
            continue  # refused above
        model = tiny_llama()
        ll.attach(model, ll.config(variant, **kw), calibration_data=[make_batch(seed=1)])
        assert torch.isfinite(logits(model, batch)).all(), (variant, alpha)


def nan_embeddings(batch):
    """A calibration batch whose inputs_embeds hold a NaN (e.g. an overflowed fp16 model)."""
    model = tiny_llama()
    with torch.no_grad():
        embeds = model.get_input_embeddings()(batch["input_ids"]).clone()
    embeds[0, -1, 3] = math.nan
    return {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"]}


@pytest.mark.parametrize("center", [False, True])
def test_eva_refuses_nan_activations_and_leaves_the_model(model, batch, center):
    before, ref = snapshot_state(model), logits(model, batch)
    calibration = [make_batch(seed=1), nan_embeddings(make_batch(seed=2))]
    with pytest.raises(ll.AttachError, match="NaN or Inf") as info:
        ll.attach(model, ll.config("eva", r=2, center=center, **QV), calibration_data=calibration)
    assert "\n" not in str(info.value) and "calibration" in str(info.value)
    assert_untouched(model, before, ref, batch)
