"""attach/detach: hooks only, base frozen, clean errors, and all-or-nothing on failure."""
from dataclasses import dataclass

import pytest
import torch
from lltest import QV, assert_untouched, hooks_count, lora_cfg, registered

import lora_lite as ll
from lora_lite.testing import logits, snapshot_state, state_equal


def test_attach_registers_tensors_and_hooks_without_replacing_modules(model, batch):
    types_before = [type(m) for m in model.modules()]
    ll.attach(model, lora_cfg())
    assert [type(m) for m in model.modules()] == types_before
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A.shape == (4, 64) and q.lora_B.shape == (64, 4)
    assert hooks_count(model) == 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert set(ll.adapter_tensors(model)) == {
        f"model.layers.{i}.self_attn.{p}.lora_{t}" for i in (0, 1) for p in ("q_proj", "v_proj")
        for t in "AB"}


def test_detach_is_bit_exact_and_restores_requires_grad(model, batch):
    model.lm_head.weight.requires_grad_(False)  # a user's own freezing survives attach+detach
    before, ref = snapshot_state(model), logits(model, batch)
    ll.attach(model, lora_cfg())
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B.normal_()
    assert not torch.equal(logits(model, batch), ref)
    ll.detach(model)
    assert state_equal(snapshot_state(model), before) and hooks_count(model) == 0
    assert torch.equal(logits(model, batch), ref)
    assert not model.lm_head.weight.requires_grad
    assert model.model.embed_tokens.weight.requires_grad


def test_attaching_twice_is_a_clear_error(model, batch):
    ll.attach(model, lora_cfg())
    state = snapshot_state(model)
    with pytest.raises(ll.AttachError, match="already has a 'lora' adapter.*detach"):
        ll.attach(model, lora_cfg(r=2))
    assert state_equal(snapshot_state(model), state) and hooks_count(model) == 4
    ll.detach(model)
    with pytest.raises(ll.AttachError, match="no lora-lite adapter"):
        ll.detach(model)


def test_config_of_wrong_type_is_rejected(model):
    cfg = lora_cfg()
    cfg.variant = "nosuch"
    with pytest.raises(ll.VariantNotInstalled):
        ll.attach(model, cfg)
    assert ll.attached(model) is None


@dataclass
class ExplodingConfig(ll.AdapterConfig):
    variant: str = "exploding"
    explode_in: str = "init"


class Exploding(ll.Variant):
    """A variant that fails part-way through attach, after having changed things."""
    name = "exploding"
    config = ExplodingConfig
    calls = 0

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_g": ll.ParamSpec((d_out,), init="ones")}

    @staticmethod
    def init(layer, cfg):
        ll.set_dense_weight(layer, ll.dense_weight(layer) * 2)  # rewrite, then fail later
        Exploding.calls += 1
        if cfg.explode_in == "init" and Exploding.calls % 2 == 0:
            raise RuntimeError("boom in init")

    @staticmethod
    def group_init(model, targets, cfg, calibration_data):
        if cfg.explode_in == "group_init":
            ll.stream_inputs(model, targets, calibration_data, lambda t, rows: None)

    @staticmethod
    def forward(layer, x, y):
        return y * layer.lora_g


@pytest.mark.parametrize("where", ["init", "group_init"])
def test_failure_mid_attach_leaves_the_model_exactly_as_it_was(model, batch, where):
    before, ref = snapshot_state(model), logits(model, batch)
    with registered(Exploding):
        cfg = ll.config("exploding", explode_in=where, **QV)
        bad_calibration = [{"input_ids": torch.full((1, 4), 10_000)}]  # ids out of vocab
        with pytest.raises((RuntimeError, IndexError)):
            ll.attach(model, cfg, calibration_data=bad_calibration)
    assert_untouched(model, before, ref, batch)


def test_variant_with_bad_tensor_names_is_rejected_cleanly(model, batch):
    @dataclass
    class BadConfig(ll.AdapterConfig):
        variant: str = "badnames"

    class BadNames(ll.Variant):
        name, config = "badnames", BadConfig

        @staticmethod
        def param_specs(d_in, d_out, cfg):
            return {"lora_ok": ll.ParamSpec((d_out,)), "scale": ll.ParamSpec((d_out,))}

        @staticmethod
        def forward(layer, x, y):
            return y

    before, ref = snapshot_state(model), logits(model, batch)
    with registered(BadNames):
        with pytest.raises(ll.AttachError, match="'scale'.*must start with 'lora_'"):
            ll.attach(model, ll.config("badnames", **QV))
    assert_untouched(model, before, ref, batch)


def test_output_hook_casts_to_adapter_dtype_and_back(model, batch):
    ll.attach(model, lora_cfg(dtype="bfloat16"))
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A.dtype == torch.bfloat16
    out = model(**batch).logits
    assert out.dtype == torch.float32
    ll.detach(model)


def test_seed_makes_init_reproducible(batch):
    from lora_lite.testing import tiny_llama
    a, b = tiny_llama(), tiny_llama()
    ll.attach(a, lora_cfg(seed=7))
    ll.attach(b, lora_cfg(seed=7))
    ta, tb = ll.adapter_tensors(a), ll.adapter_tensors(b)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_disabled_runs_the_base_and_keeps_the_adapter(model, batch):
    """ll.disabled: inside, the base function bit for bit (the hooks pass through); after it,
    the adapter computes again; a model without an adapter is a clear error."""
    with pytest.raises(ll.AttachError, match="no lora-lite adapter"):
        with ll.disabled(model):
            pass
    ref = logits(model, batch)
    ll.attach(model, lora_cfg())
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B.normal_()
    adapted = logits(model, batch)
    assert not torch.equal(adapted, ref)
    with ll.disabled(model):
        assert torch.equal(logits(model, batch), ref)
        assert set(ll.adapter_tensors(model)) and hooks_count(model) == 4
    assert torch.equal(logits(model, batch), adapted)
    with pytest.raises(RuntimeError, match="inside"):  # left on an error too
        with ll.disabled(model):
            raise RuntimeError("inside")
    assert torch.equal(logits(model, batch), adapted)


def test_a_taken_name_is_refused_with_one_message_everywhere(tmp_path):
    """attach, ll.load and ll.combine each wrote their own "already attached" text; now one
    function says it, and every path leaves the model as it was."""
    from lora_lite.testing import tiny_llama
    model = tiny_llama()
    ll.attach(model, lora_cfg())
    ll.save(model, tmp_path / "a.safetensors")
    before = snapshot_state(model)
    messages = []
    for call in (lambda: ll.attach(model, lora_cfg()), lambda: ll.load(model, tmp_path / "a.safetensors")):
        with pytest.raises(ll.AttachError) as e:
            call()
        messages.append(str(e.value))
    ll.attach(model, lora_cfg(), name="b")
    with pytest.raises(ll.AttachError) as e:
        ll.combine(model, ["default", "b"], [1.0, 1.0], how="linear", name="b")
    assert len(set(messages)) == 1 and "already has a 'lora' adapter attached" in messages[0]
    assert "already has an adapter named 'b'" in str(e.value)
    ll.detach(model, name="b")
    assert state_equal(before, snapshot_state(model))


def test_missing_calibration_data_is_a_lora_lite_error():
    """A bare ValueError before; now ll.CalibrationError (a LoraLiteError, still a ValueError),
    one line, the model unchanged."""
    from lora_lite.testing import tiny_llama
    from lora_lite.testing.toy_plugins import gain_variant, registered
    model = tiny_llama()
    before = snapshot_state(model)
    with registered(gain_variant("calgain", needs_calibration=True)):
        with pytest.raises(ll.CalibrationError, match="initialises from data: pass calibration_data"):
            ll.attach(model, ll.config("calgain", target_names=[r"q_proj$"]))
    assert issubclass(ll.CalibrationError, ValueError) and ll.attached(model) is None
    assert state_equal(before, snapshot_state(model))
