"""Parameter targets (fused MoE experts): default placement, identity, gradients, save/load,
detach, merge, orientation, refusals - on tiny Qwen3-MoE, Mixtral and OLMoE built from configs."""
import json

import pytest
import torch
from moe_models import MOE_MODELS, ids, tiny_qwen3_moe
from torch import nn

import lora_lite as ll
from lora_lite.errors import AdapterFileError, AttachError
from lora_lite.testing.toy_plugins import gain_variant, registered

ARCHS = sorted(MOE_MODELS)


def logits(model, x=None):
    with torch.no_grad():
        return model(ids() if x is None else x).logits


def randomize(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in ll.adapter_tensors(model).values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)


@pytest.mark.parametrize("arch", ARCHS)
def test_default_targets_every_routed_expert_not_the_router_and_identity(arch):
    model = MOE_MODELS[arch]()
    before = logits(model)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    state = ll.attach(model, ll.config("lora", r=2))
    fused = sorted(n for n, p in model.named_parameters() if p.dim() == 3 and "lora_" not in n)
    assert sorted(pt.name for pt in state.param_targets) == fused
    assert len(fused) == 2 * model.config.num_hidden_layers  # gate_up_proj + down_proj per block
    assert not any("gate" in pt.name.split(".")[-2] for pt in state.param_targets)  # no router
    assert not any(t.name.endswith("mlp.gate") for t in state.targets)
    assert all(pt.experts == 4 for pt in state.param_targets)
    assert state.targets  # attention projections too (all-linear)
    assert torch.equal(logits(model), before)
    ll.detach(model)
    after = model.state_dict()
    assert after.keys() == base.keys() and all(torch.equal(after[k], base[k]) for k in base)
    assert torch.equal(logits(model), before)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_step_gives_every_expert_adapter_gradients(arch):
    model = MOE_MODELS[arch]()
    ll.attach(model, ll.config("lora", r=2, target_parameters=[r"experts\.(gate_up|down)_proj$"]))
    tensors = {k: v for k, v in ll.adapter_tensors(model).items()}
    assert tensors and all("experts" in k for k in tensors)
    opt = torch.optim.SGD(ll.trainable_parameters(model), lr=0.1)
    for _ in range(2):  # B gets a gradient at once (B = 0), A from the second step on
        opt.zero_grad()
        model(ids(), labels=ids()).loss.backward()
        opt.step()
    for k, t in tensors.items():
        assert t.grad is not None and t.grad.abs().sum() > 0, k
        # one adapter per expert: every routed expert's slice learns
        assert (t.grad.flatten(1).abs().sum(1) > 0).sum() >= 3, k


def manual_reference(model, x):
    """The adapted output computed by hand: W_e + s B_e A_e written into a copy's parameters."""
    state = ll.attached(model)
    merged = {}
    for pt in state.param_targets:
        A = getattr(pt.module, pt.tensor_name("lora_A")).detach()
        B = getattr(pt.module, pt.tensor_name("lora_B")).detach()
        merged[pt.name] = getattr(pt.module, pt.param).detach() + state.cfg.scale * (B @ A)
    with ll.disabled(model):
        with torch.no_grad():
            originals = {}
            for pt in state.param_targets:
                p = pt.module._parameters[pt.param]
                originals[pt.name] = p.clone()
                p.copy_(merged[pt.name])
            out = model(x).logits
            for pt in state.param_targets:
                pt.module._parameters[pt.param].copy_(originals[pt.name])
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_adapted_output_is_w_plus_s_b_a_per_expert_and_disabled_is_the_base(arch):
    model = MOE_MODELS[arch]()
    before = logits(model)
    ll.attach(model, ll.config("lora", r=2, target_parameters=[r"experts\.(gate_up|down)_proj$"]))
    randomize(model)
    adapted = logits(model)
    assert not torch.allclose(adapted, before, atol=1e-4)
    torch.testing.assert_close(adapted, manual_reference(model, ids()), atol=1e-5, rtol=1e-5)
    with ll.disabled(model):
        assert torch.equal(logits(model), before)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_detach_bit_exact(arch, tmp_path):
    model = MOE_MODELS[arch]()
    before = logits(model)
    ll.attach(model, ll.config("lora", r=2))
    randomize(model)
    adapted = logits(model)
    ll.save(model, tmp_path / "a.safetensors")
    ll.detach(model)
    assert torch.equal(logits(model), before)
    fresh = MOE_MODELS[arch]()
    ll.load(fresh, tmp_path / "a.safetensors")
    assert torch.equal(logits(fresh), adapted)
    assert any("experts.lora_A__gate_up_proj" in k for k in ll.adapter_tensors(fresh))
    ll.detach(fresh)
    assert torch.equal(logits(fresh), before)


def test_merge_folds_into_the_fused_parameter():
    model = tiny_qwen3_moe()
    ll.attach(model, ll.config("lora", r=2))
    randomize(model)
    adapted = logits(model)
    param = model.model.layers[0].mlp.experts.gate_up_proj
    report = ll.merge(model)
    assert ll.attached(model) is None
    assert model.model.layers[0].mlp.experts.gate_up_proj is param  # the same Parameter, folded
    assert report["layers"]["model.layers.0.mlp.experts.gate_up_proj"]["backend"] == "parameter"
    assert not any("lora_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=1e-5)


def test_target_parameters_alone_adapts_those_only_and_empty_tuple_none():
    model = tiny_qwen3_moe()
    state = ll.attach(model, ll.config("lora", r=2, target_parameters=[r"layers\.1\.mlp\.experts\.down_proj$"]))
    assert [pt.name for pt in state.param_targets] == ["model.layers.1.mlp.experts.down_proj"]
    assert state.targets == []
    ll.detach(model)
    state = ll.attach(model, ll.config("lora", r=2, target_parameters=()))
    assert state.param_targets == [] and state.targets
    ll.detach(model)
    state = ll.attach(model, ll.config("lora", r=2, target_names=[r"q_proj$"]))
    assert state.param_targets == []  # naming layers: no default experts


def test_no_matching_parameter_is_refused_in_one_line():
    model = tiny_qwen3_moe()
    with pytest.raises(AttachError, match="no parameter matched") as e:
        ll.attach(model, ll.config("lora", target_parameters=[r"nothing_like_this$"]))
    assert "\n" not in str(e.value) and ll.attached(model) is None


def test_a_1d_parameter_is_refused_and_the_model_is_unchanged():
    model = tiny_qwen3_moe()
    before = logits(model)
    with pytest.raises(AttachError, match="2-D or 3-D floating"):
        ll.attach(model, ll.config("lora", target_parameters=[r"layers\.0\.input_layernorm\.weight$"]))
    assert ll.attached(model) is None and torch.equal(logits(model), before)


def test_variant_without_weight_space_form_is_refused_in_one_line():
    toy = gain_variant("toygain")
    with registered(toy):
        model = tiny_qwen3_moe()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(AttachError, match="cannot adapt parameter targets .*merged_weight") as e:
            ll.attach(model, ll.config("toygain", target_parameters=[r"experts\.down_proj$"]))
        assert "\n" not in str(e.value) and ll.attached(model) is None
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
        # by default such a variant adapts the linear layers only, never silently half the experts
        state = ll.attach(model, ll.config("toygain"))
        assert state.param_targets == []


def test_variant_that_initialises_from_the_weight_is_refused():
    model = tiny_qwen3_moe()
    if "pissa" not in ll.variants():
        pytest.skip("pissa plugin not installed")
    with pytest.raises(AttachError, match="initialises from the base weight"):
        ll.attach(model, ll.config("pissa", target_parameters=[r"experts\.down_proj$"]))
    assert ll.attached(model) is None


class Transposed(nn.Module):
    """A GPT-OSS-like experts module: (E, d_in, d_out) storage, is_transposed = True, plus a
    plain 2-D (d_out, d_in) parameter."""
    is_transposed = True

    def __init__(self, E=3, d_in=5, d_out=7):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(E, d_in, d_out, generator=g))
        self.flat = nn.Parameter(torch.randn(d_out, d_in, generator=g))

    def forward(self, x):  # x (E, n, d_in)
        return torch.bmm(x, self.w) + x @ self.flat.T


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = Transposed()

    def forward(self, x):
        return self.experts(x)


def test_transposed_and_2d_parameters_orientation():
    model = Holder()
    x = torch.randn(3, 4, 5)
    state = ll.attach(model, ll.config("lora", r=2, target_parameters=[r"experts\.(w|flat)$"]))
    assert {(pt.param, pt.experts, pt.d_in, pt.d_out) for pt in state.param_targets} == {
        ("w", 3, 5, 7), ("flat", 1, 5, 7)}
    randomize(model)
    e = model.experts
    s = state.cfg.scale
    dw = (e.lora_B__w @ e.lora_A__w).transpose(-2, -1)          # (E, d_in, d_out)
    dflat = (e.lora_B__flat @ e.lora_A__flat)[0]                  # (d_out, d_in)
    with torch.no_grad():
        want = torch.bmm(x, e.w + s * dw) + x @ (e.flat + s * dflat).T
        torch.testing.assert_close(model(x), want)


def test_other_variants_with_merged_weight_work_on_experts():
    """Every installed variant either adapts parameter targets (identity at init, merge equals
    the adapted forward) or refuses in one line."""
    worked = []
    for name in sorted(ll.variants()):
        model = tiny_qwen3_moe()
        before = logits(model)
        try:
            cfg = ll.config(name, target_parameters=[r"layers\.0\.mlp\.experts\.down_proj$"])
            ll.attach(model, cfg)
        except (AttachError, ValueError) as e:
            assert "\n" not in str(e), name
            assert ll.attached(model) is None
            continue
        torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            for t in ll.trainable_parameters(model):
                t.add_(0.05 * torch.randn_like(t))
        adapted = logits(model)
        ll.merge(model)
        torch.testing.assert_close(logits(model), adapted, atol=1e-4, rtol=1e-4)
        worked.append(name)
    assert "lora" in worked


def test_file_with_wrong_param_target_shape_is_refused(tmp_path):
    model = tiny_qwen3_moe()
    ll.attach(model, ll.config("lora", r=2))
    ll.save(model, tmp_path / "a.safetensors")
    other = tiny_qwen3_moe(experts=6)
    with pytest.raises(AdapterFileError, match="shape mismatch at 'model.layers.0.mlp.experts"):
        ll.load(other, tmp_path / "a.safetensors")
    assert ll.attached(other) is None
    meta, _ = ll.read_header(tmp_path / "a.safetensors")
    assert json.loads(meta["param_targets"])[0] == ["model.layers.0.mlp.experts.gate_up_proj", 4, 32, 48]


def test_config_round_trips_target_parameters():
    cfg = ll.config("lora", target_parameters=[r"experts\.down_proj$"])
    assert cfg.target_parameters == (r"experts\.down_proj$",)
    assert ll.AdapterConfig.from_json(cfg.to_json()) == cfg
    assert ll.AdapterConfig.from_json(ll.config("lora").to_json()).target_parameters is None
    with pytest.raises(ll.ConfigError, match="target_parameters"):
        ll.config("lora", target_parameters=["(unclosed"])


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_quantized_base_experts_stay_full_precision(kind, tmp_path):
    """bitsandbytes quantizes nn.Linear only: the attention projections become Linear4bit /
    Linear8bitLt, the fused experts stay fp32 parameters, and both get adapters."""
    pytest.importorskip("bitsandbytes")
    from lora_lite.layers.quantize import quantize_model

    def make():
        return quantize_model(tiny_qwen3_moe(hidden=64), kind)
    model = make()
    before = logits(model)
    fused = {n: p.clone() for n, p in model.named_parameters() if p.dim() == 3}
    state = ll.attach(model, ll.config("lora", r=2))
    assert len(state.param_targets) == 4
    assert all(type(t.layer).__name__ in ("Linear4bit", "Linear8bitLt") for t in state.targets)
    assert all(getattr(pt.module, pt.param).dtype == torch.float32 for pt in state.param_targets)
    with ll.disabled(model):  # (bnb's CPU 4bit inference kernel is off while attached)
        base_attached = logits(model)
    assert torch.equal(logits(model), base_attached)
    model(ids(), labels=ids()).loss.backward()
    assert all(getattr(pt.module, pt.tensor_name("lora_B")).grad.abs().sum() > 0
               for pt in state.param_targets)
    randomize(model)
    adapted = logits(model)
    ll.save(model, tmp_path / "q.safetensors")
    ll.detach(model)
    assert all(torch.equal(model.get_parameter(n), p) for n, p in fused.items())
    assert not any("lora_" in n for n, _ in model.named_parameters())
    if kind == "8bit":  # (4bit on CPU: attach turns bnb's repacked AVX512-BF16 inference path
        assert torch.equal(logits(model), before)  # off and detach does not repack, as without MoE)
    fresh = make()
    logits(fresh)  # as the first model: bnb's CPU 4bit path repacks the weight on first use
    ll.load(fresh, tmp_path / "q.safetensors")
    got = logits(fresh)
    assert torch.equal(got, adapted), (got - adapted).abs().max()


def test_gradient_checkpointing_same_loss_and_expert_gradients():
    def run(checkpointing):
        model = tiny_qwen3_moe().train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ll.attach(model, ll.config("lora", r=2, target_parameters=[r"experts\.(gate_up|down)_proj$"]))
        randomize(model)
        loss = model(ids(), labels=ids()).loss
        loss.backward()
        return loss.detach(), {k: v.grad.clone() for k, v in ll.adapter_tensors(model).items()}
    loss, grads = run(False)
    loss_ckpt, grads_ckpt = run(True)
    torch.testing.assert_close(loss_ckpt, loss, atol=1e-6, rtol=0)
    assert grads.keys() == grads_ckpt.keys() and all(g.abs().sum() > 0 for g in grads.values())
    for k in grads:
        torch.testing.assert_close(grads_ckpt[k], grads[k], atol=1e-5, rtol=1e-5)
