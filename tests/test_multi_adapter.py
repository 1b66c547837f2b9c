"""Several named adapters on one model: attach / load by name, the active set, weights, mixed
batches (also under generate), training one adapter, save / load by name, and the refusals."""
import pytest
import torch
from lltest import QV as _QV
from lltest import hooks_count, lora_cfg

import lora_lite as ll
from lora_lite.testing import logits, snapshot_state, state_equal

ROWS = ["a", "b", None, "c", "d", "a", None, "b"]


def _batch(rows=8):
    from lora_lite.testing import make_batch
    return make_batch(batch=rows, seed=5)


def _adapters(model, names=("a", "b", "c", "d")):
    for i, name in enumerate(names):
        ll.attach(model, lora_cfg(seed=i), name=name)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in ll.trainable_parameters(model, name=name):
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_default_adapter_keeps_its_tensor_names_and_file(model, tmp_path):
    ll.attach(model, lora_cfg())
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A.shape == (4, 64) and ll.adapter_names(model) == ["default"]
    ll.save(model, tmp_path / "a.safetensors")
    assert {k.split(".")[-1] for k in ll.read_header(tmp_path / "a.safetensors")[1]} == {"lora_A", "lora_B"}


def test_named_adapters_are_kept_apart_and_switch(model, batch, tmp_path):
    base = logits(model, batch)
    _adapters(model, ("a", "b"))
    q = model.model.layers[0].self_attn.q_proj
    assert not hasattr(q, "lora_A") and q.lora_A__a.shape == q.lora_A__b.shape == (4, 64)
    assert hooks_count(model) == 4  # one hook per target, whatever the number of adapters
    out_a = logits(model, batch)  # the first attached is active
    with ll.using(model, "b"):
        out_b = logits(model, batch)
    assert torch.equal(logits(model, batch), out_a)
    assert (out_a - base).abs().max() > 1e-3 and (out_b - out_a).abs().max() > 1e-3
    with ll.disabled(model):
        assert torch.equal(logits(model, batch), base)
    ll.use(model, [])
    assert torch.equal(logits(model, batch), base)
    ll.save(model, tmp_path / "b.safetensors", name="b")
    fresh = type(model)(model.config)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
    ll.load(fresh, tmp_path / "b.safetensors")  # a named adapter's file loads as a default one
    assert (logits(fresh, batch) - out_b).abs().max() < 1e-6


def test_weighted_active_set_is_the_sum_of_lora_deltas(model, batch):
    """LoRA is linear in its delta: a (1.0) + b (0.5) is one rank-8 LoRA [A_a; A_b], [B_a, .5 B_b]."""
    _adapters(model, ("a", "b"))
    with ll.using(model, ["a", "b"], weights=[1.0, 0.5]):
        got = logits(model, batch)
    ref = type(model)(model.config)
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
    ll.attach(ref, lora_cfg(r=8, alpha=32.0))  # the same scale, 4
    with torch.no_grad():
        for t in ll.attached(model, "a").targets:
            layer, other = t.layer, ref.get_submodule(t.name)
            other.lora_A.copy_(torch.cat([layer.lora_A__a, layer.lora_A__b]))
            other.lora_B.copy_(torch.cat([layer.lora_B__a, 0.5 * layer.lora_B__b], dim=1))
    assert (got - logits(ref, batch)).abs().max() < 1e-5


def test_mixed_batch_of_four_adapters_equals_each_row_alone(model):
    batch = _batch()
    _adapters(model)
    mixed = ll.forward_mixed(model, batch, adapter_per_row=ROWS).logits
    for b, name in enumerate(ROWS):
        row = {k: v[b:b + 1] for k, v in batch.items()}
        with (ll.disabled(model) if name is None else ll.using(model, name)):
            alone = logits(model, row)
        assert (mixed[b:b + 1] - alone).abs().max() <= 1e-6, (b, name)


def _each_row_alone(model, batch, assign, tol=1e-6):
    mixed = ll.forward_mixed(model, batch, adapter_per_row=assign).logits
    for b, name in enumerate(assign):
        row = {k: v[b:b + 1] for k, v in batch.items()}
        with (ll.disabled(model) if name is None else ll.using(model, name)):
            alone = logits(model, row)
        assert (mixed[b:b + 1] - alone).abs().max() <= tol, (b, name)


@pytest.mark.parametrize("assign", [
    ["b", "a", "a", "c", "b", "d", "a", "b"],   # every row an adapter, unevenly spaced rows
    ["c"] * 8,                                  # one adapter on every row: its plain path
    ["a", None, "a", "a", None, "a", "a", "a"],  # one adapter and base rows
    [None] * 8,
])
def test_mixed_batch_layouts_equal_each_row_alone(model, assign):
    _adapters(model)
    _each_row_alone(model, _batch(), assign)


@pytest.mark.parametrize("default, named", [("dora", "lora"), ("lora", "dora")])
def test_mixed_batch_next_to_a_default_adapter_of_another_variant(model, default, named):
    """A named adapter runs with the default's tensors out of sight (DoRA has one LoRA lacks)."""
    ll.attach(model, ll.config(default, r=4, **_QV))
    ll.attach(model, ll.config(named, r=4, **_QV), name="n")
    for name in ("default", "n"):
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in ll.trainable_parameters(model, name=name):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    _each_row_alone(model, _batch(), ["n", "default", None, "n", "n", "default", "n", "n"])


def test_gradients_through_a_mixed_batch_are_the_rows_alone(model):
    """Training through ll.rows: each adapter's gradient is the sum over its rows run alone."""
    batch, assign = _batch(), ["b", "a", "a", "c", "b", None, "a", "b"]
    _adapters(model, ("a", "b", "c"))
    ll.set_trainable(model, ["a", "b", "c"])
    params = ll.trainable_parameters(model)
    with ll.rows(model, assign):
        model(**batch).logits.square().mean().backward()
    mixed = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    for b, name in enumerate(assign):
        if name is not None:  # a base row adds no gradient
            with ll.using(model, name):
                (model(**{k: v[b:b + 1] for k, v in batch.items()}).logits.square().mean() / 8).backward()
    for got, p in zip(mixed, params, strict=True):
        want = p.grad if p.grad is not None else torch.zeros_like(got)
        assert (got - want).abs().max() <= 1e-6


def test_rows_work_with_generate(model):
    batch = _batch(4)
    _adapters(model, ("a", "b"))
    assign = ["a", "b", None, "a"]
    with ll.rows(model, assign):
        out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for b, name in enumerate(assign):
        row = {k: v[b:b + 1] for k, v in batch.items()}
        with (ll.disabled(model) if name is None else ll.using(model, name)):
            alone = model.generate(**row, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(out[b:b + 1], alone)


def test_training_one_adapter_leaves_the_others_unchanged(model, batch):
    _adapters(model, ("a", "b"))
    ll.use(model, ["a", "b"])
    ll.set_trainable(model, "a")
    assert ll.trainable_parameters(model, name="b") == []
    frozen = {k: v.clone() for k, v in ll.adapter_tensors(model, name="b").items()}
    opt = torch.optim.SGD(ll.trainable_parameters(model), lr=0.1)
    model(**batch).logits.square().mean().backward()
    opt.step()
    assert all(torch.equal(v, ll.adapter_tensors(model, name="b")[k]) for k, v in frozen.items())
    assert all(p.grad is not None for p in ll.trainable_parameters(model, name="a"))


def test_detach_one_then_all_restores_the_base_bit_for_bit(model, batch):
    before, base = snapshot_state(model), logits(model, batch)
    _adapters(model, ("a", "b"))
    with ll.using(model, "b"):
        out_b = logits(model, batch)
    ll.detach(model, name="a")
    assert ll.adapter_names(model) == ["b"]
    assert torch.equal(logits(model, batch), base)  # a was the active set; b waits for use()
    with ll.using(model, "b"):
        assert torch.equal(logits(model, batch), out_b)
    ll.detach(model)
    assert state_equal(snapshot_state(model), before) and hooks_count(model) == 0
    assert torch.equal(logits(model, batch), base) and ll.attached(model) is None


def test_load_by_name_next_to_another(model, batch, tmp_path):
    _adapters(model, ("a",))
    out_a = logits(model, batch)
    ll.save(model, tmp_path / "a.safetensors")
    ll.load(model, tmp_path / "a.safetensors", name="again")
    with ll.using(model, "again"):
        assert torch.equal(logits(model, batch), out_a)


@pytest.mark.parametrize("bad, match", [
    (lambda m: ll.use(m, "nosuch"), "no adapter named 'nosuch'"),
    (lambda m: ll.use(m, ["a", "a"]), "repeat"),
    (lambda m: ll.use(m, ["a", "b"], weights=[1.0]), "2 adapters but 1 weights"),
    (lambda m: ll.use(m, ["a", "b"], weights=[1.0, float("nan")]), "finite"),
    (lambda m: ll.attach(m, lora_cfg(), name="a"), "already has an adapter named 'a'"),
    (lambda m: ll.attach(m, lora_cfg(), name="no.dots"), "not usable"),
    (lambda m: ll.rows(m, ["a", "zz"]).__enter__(), "no adapter named 'zz'"),
    (lambda m: ll.rows(m, []).__enter__(), "empty"),
    (lambda m: ll.forward_mixed(m, _batch(8), ["a"] * 4), "assigned 4 rows, this forward has a batch of 8"),
    (lambda m: ll.save(m, "x.safetensors"), "several adapters.*name="),
    (lambda m: ll.merge(m), "several adapters"),
    (lambda m: ll.detach(m, name="zz"), "no adapter named 'zz'"),
    (lambda m: ll.trainable_parameters(m, name="zz"), "no adapter named 'zz'"),
])
def test_bad_input_is_one_line_and_changes_nothing(model, bad, match):
    batch = _batch(8)
    _adapters(model, ("a", "b"))
    before, out = snapshot_state(model), logits(model, batch)
    with pytest.raises((ll.LoraLiteError, ValueError)) as e:
        bad(model)
    assert e.match(match) and "\n" not in str(e.value)
    assert state_equal(snapshot_state(model), before) and ll.adapter_names(model) == ["a", "b"]
    assert torch.equal(logits(model, batch), out)


def test_base_rewriting_adapter_refuses_company(model):
    ll.attach(model, ll.config("pissa", r=4, rewrite_base=True, **{k: v for k, v in
                                                                   lora_cfg().to_dict().items()
                                                                   if k in ("target_names", "target_roles")}))
    before = snapshot_state(model)
    with pytest.raises(ll.AttachError, match="rewrites the base weight.*separate copy"):
        ll.attach(model, lora_cfg(), name="b")
    assert state_equal(snapshot_state(model), before) and ll.adapter_names(model) == ["default"]


def test_input_changing_adapters_refuse_a_weighted_set(model):
    cfg = ll.config("oft", target_names=[r"q_proj$"], target_roles=())
    ll.attach(model, cfg, name="a")
    ll.attach(model, cfg, name="b")
    with pytest.raises(ll.AttachError, match="changes its layers' input.*alone"):
        ll.use(model, ["a", "b"])
    with pytest.raises(ll.AttachError, match="weight 1"):
        ll.use(model, "a", weights=[0.5])


def test_a_peft_folder_with_several_adapters_loads_each_under_its_name(model, batch, tmp_path):
    import peft
    base = type(model)(model.config)
    base.load_state_dict(model.state_dict())
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    twin = peft.get_peft_model(base, cfg)
    twin.add_adapter("chat", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                             init_lora_weights=False))
    twin.save_pretrained(tmp_path)  # default at the top, chat/ in a subfolder
    assert (tmp_path / "chat" / "adapter_config.json").is_file()
    assert ll.load_peft_adapters(model, tmp_path) == ["default", "chat"]
    for name in ("default", "chat"):
        twin.set_adapter(name)
        with ll.using(model, name):
            assert (logits(model, batch) - logits(twin, batch)).abs().max() < 1e-5


def test_a_multi_adapter_folder_with_a_taken_name_changes_nothing(model, tmp_path):
    import peft
    base = type(model)(model.config)
    base.load_state_dict(model.state_dict())
    twin = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    twin.save_pretrained(tmp_path)
    _adapters(model, ("a",))
    ll.attach(model, lora_cfg())
    before = snapshot_state(model)
    with pytest.raises(ll.AdapterFileError, match="already has an adapter named 'default'"):
        ll.load_peft_adapters(model, tmp_path)
    assert state_equal(snapshot_state(model), before)


def test_export_peft_by_name_is_that_adapter(model, batch, tmp_path):
    import peft
    _adapters(model, ("a", "b"))
    base = type(model)(model.config)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
    with pytest.raises(ll.AttachError, match="several adapters.*name="):
        ll.export_peft(model, tmp_path / "x")
    ll.export_peft(model, tmp_path / "b", name="b")
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "b")
    with ll.using(model, "b"):
        assert (logits(model, batch) - logits(theirs, batch)).abs().max() < 1e-5


def test_a_forward_that_raises_inside_rows_leaves_the_layers_as_they_were(model, monkeypatch):
    """ll.rows shows an adapter's tensors through the layer's __dict__ for the call; a variant
    forward that raises must not leave them there (they would shadow the module's own)."""
    _adapters(model, ("a", "b"))
    batch = _batch(4)
    with ll.using(model, "b"):
        before_b = logits(model, batch)
    layers = [t.layer for t in ll.attached(model, "a").targets]
    keys = [set(layer.__dict__) for layer in layers]
    variant = ll.attached(model, "a").variant

    def broken(layer, x, y, cfg):
        raise RuntimeError("boom")
    monkeypatch.setattr(variant, "forward", broken)
    with pytest.raises(RuntimeError, match="boom"), ll.rows(model, ["a", "b", None, "a"]):
        logits(model, batch)
    monkeypatch.undo()
    assert [set(layer.__dict__) for layer in layers] == keys
    assert not any(k.startswith("lora_") for layer in layers for k in layer.__dict__)
    with ll.using(model, "b"):
        assert torch.equal(logits(model, batch), before_b)
