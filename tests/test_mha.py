"""nn.MultiheadAttention as a target (lora_lite.layers.mha): LoRA on in_proj_weight and out_proj.weight,
PEFT parity (batch_first True and False), identity, gradients, save/load, detach, merge, PEFT
export/import, refusals, and every installed variant either adapting it or refusing in one line."""
import copy

import pytest
import torch
from safetensors.torch import load_file
from tiny_knobs import TINY_KNOBS
from torch import nn

import lora_lite as ll
from lora_lite.testing import snapshot_state, state_equal
from lora_lite.testing.arch_matrix import tiny_config

WIDTH, HEADS = 8, 2
PAIR = ["attn.lora_A__in_proj_weight", "attn.lora_B__in_proj_weight",
        "attn.out_proj.lora_A__weight", "attn.out_proj.lora_B__weight"]


class AttnToy(nn.Module):
    """Embedding-free toy: x -> nn.MultiheadAttention (self-attention) -> Linear."""

    def __init__(self, batch_first=True, kdim=None):
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.fc = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):  # x: (batch, seq, width) either way
        h = x if self.batch_first else x.transpose(0, 1)
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.fc(h if self.batch_first else h.transpose(0, 1))


def toy(batch_first=True, seed=0):
    torch.manual_seed(seed)
    return AttnToy(batch_first).eval()


X = torch.randn(2, 5, WIDTH, generator=torch.Generator().manual_seed(7))


def randomize(model, seed=1, only=None):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, t in ll.adapter_tensors(model).items():
            if only is None or k in only:
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)


def lora(model, **kw):
    return ll.attach(model, ll.config("lora", r=2, alpha=4, target_names=["^attn$"], **kw))


def peft_lora(base):
    from peft import LoraConfig, get_peft_model
    return get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["attn"]))


def copy_into_peft(peft_model, tensors, out_proj_factor=1.0):
    attn = peft_model.base_model.model.attn
    out = attn.base_layer.out_proj
    with torch.no_grad():
        attn.lora_A["default"].weight.copy_(tensors[PAIR[0]][0])
        attn.lora_B["default"].weight.copy_(tensors[PAIR[1]][0])
        out.lora_A["default"].weight.copy_(tensors[PAIR[2]][0])
        out.lora_B["default"].weight.copy_(tensors[PAIR[3]][0] / out_proj_factor)


def peft_out_proj_factor():
    """How often PEFT's MultiheadAttention applies the out_proj delta per call: 2 in PEFT 0.21.2
    (merge() writes W + dW, then out_proj.merge() adds dW again; huggingface/peft#3774), 1 once
    fixed. Measured: PEFT's output against the base's with W + k*dW for k = 1, 2."""
    base = toy()
    model = copy.deepcopy(base)
    lora(model)
    randomize(model, only=PAIR[2:])
    p = peft_lora(base)
    copy_into_peft(p, ll.adapter_tensors(model))
    t = ll.adapter_tensors(model)
    delta = 2 * t[PAIR[3]][0] @ t[PAIR[2]][0]
    errors = {}
    for k in (1, 2):
        ref = copy.deepcopy(base)
        with torch.no_grad():
            ref.attn.out_proj.weight += k * delta
            errors[k] = (p(X) - ref(X)).abs().max().item()
    factor = min(errors, key=errors.get)
    assert errors[factor] < 1e-5, errors
    return factor


def randomize_peft(p, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, t in p.named_parameters():
            if "lora_" in n:
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)


def merged_reference(base, tensors):
    """The base with W + s·B·A folded into in_proj_weight and out_proj.weight by hand."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        ref.attn.in_proj_weight += 2 * tensors[PAIR[1]][0] @ tensors[PAIR[0]][0]
        ref.attn.out_proj.weight += 2 * tensors[PAIR[3]][0] @ tensors[PAIR[2]][0]
    return ref


@pytest.mark.parametrize("batch_first", [True, False])
def test_lora_is_w_plus_sba_on_both_projections_and_matches_peft(batch_first):
    base = toy(batch_first)
    model = copy.deepcopy(base)
    state = lora(model)
    assert [(pt.name, pt.d_in, pt.d_out) for pt in state.param_targets] == [
        ("attn.in_proj_weight", WIDTH, 3 * WIDTH), ("attn.out_proj.weight", WIDTH, WIDTH)]
    assert state.targets == [] and sorted(ll.adapter_tensors(model)) == sorted(PAIR)
    randomize(model)
    ours = model(X)
    assert (ours - base(X)).abs().max() > 1e-2
    tensors = ll.adapter_tensors(model)
    assert (ours - merged_reference(base, tensors)(X)).abs().max() < 1e-5
    factor = peft_out_proj_factor()  # PEFT 0.21.2 doubles the out_proj delta (see there)
    p = peft_lora(base)
    copy_into_peft(p, tensors, out_proj_factor=factor)
    assert (p(X) - ours).abs().max() < 1e-5
    only_in = copy.deepcopy(base)   # in_proj alone: the very same tensors, no correction needed
    lora(only_in)
    randomize(only_in, only=PAIR[:2])
    p = peft_lora(base)
    copy_into_peft(p, ll.adapter_tensors(only_in))
    assert (p(X) - only_in(X)).abs().max() < 1e-5


def test_peft_applies_the_out_proj_delta_once():
    """PEFT 0.21.2 applied it twice (huggingface/peft#3774); the pinned PEFT (>= 0.22) once."""
    assert peft_out_proj_factor() == 1


@pytest.mark.parametrize("batch_first", [True, False])
def test_identity_gradients_disabled_and_detach_bit_exact(batch_first):
    model = toy(batch_first)
    ref, before = model(X), snapshot_state(model)
    lora(model)
    assert torch.equal(model(X), ref) or (model(X) - ref).abs().max() < 1e-6  # B = 0
    randomize(model)
    model.train()
    model(X).pow(2).sum().backward()
    grads = sorted(n for n, p in model.named_parameters() if p.grad is not None)
    assert grads == sorted(PAIR)
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in PAIR)
    model.eval()
    with ll.disabled(model):
        assert (model(X) - ref).abs().max() < 1e-6
    assert (model(X) - ref).abs().max() > 1e-2
    ll.detach(model)
    assert state_equal(snapshot_state(model), before)
    assert "in_proj_weight" not in vars(model.attn) and "weight" not in vars(model.attn.out_proj)
    assert not model.attn._forward_pre_hooks and not model.attn._forward_hooks
    assert torch.equal(model(X), ref)


def test_save_load_reproduces_outputs(tmp_path):
    model = toy()
    lora(model)
    randomize(model)
    adapted = model(X)
    ll.save(model, tmp_path / "a.safetensors")
    fresh = toy()
    ll.load(fresh, tmp_path / "a.safetensors")
    assert torch.equal(fresh(X), adapted)


def test_merge_folds_into_in_proj_and_out_proj_weight():
    model = toy()
    lora(model)
    randomize(model)
    adapted = model(X)
    params = (model.attn.in_proj_weight, model.attn.out_proj.weight)
    ll.merge(model)
    assert ll.attached(model) is None
    assert (model.attn.in_proj_weight, model.attn.out_proj.weight) == params  # same Parameters
    assert not any("lora_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(X), adapted, atol=1e-5, rtol=1e-5)


def test_export_is_peft_layout_and_peft_loads_it(tmp_path):
    from peft import PeftModel
    base = toy()
    model = copy.deepcopy(base)
    ll.attach(model, ll.config("lora", r=2, alpha=4, target_names=["^attn$", "^fc$"]))
    randomize(model)
    ll.export_peft(model, tmp_path)
    import json
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["attn", "fc"] and "target_parameters" not in config
    saved = load_file(tmp_path / "adapter_model.safetensors")
    t = ll.adapter_tensors(model)
    assert torch.equal(saved["base_model.model.attn.lora_B.weight"], t[PAIR[1]][0])
    assert torch.equal(saved["base_model.model.attn.base_layer.out_proj.lora_A.weight"], t[PAIR[2]][0])
    assert sorted(saved) == sorted(
        [f"base_model.model.{m}.lora_{x}.weight" for m in ("attn", "attn.base_layer.out_proj", "fc")
         for x in "AB"])
    assert config["peft_version"] == "0.22.0"  # else PEFT >= 0.22 doubles out_proj's lora_B on load
    p = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert (p(X) - model(X)).abs().max() < 1e-5


def test_import_of_a_folder_written_by_peft(tmp_path):
    base = toy()
    p = peft_lora(base)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, t in p.named_parameters():
            if "lora_" in n:
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    p.save_pretrained(tmp_path)
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == sorted(f"base_model.model.{m}.lora_{x}.weight"
                          for m in ("attn", "attn.base_layer.out_proj") for x in "AB")
    model = toy()
    report = ll.load(model, tmp_path)
    assert report["variant"] == "lora" and report["targets"] == 2
    assert (p(X) - model(X)).abs().max() < 1e-5


@pytest.mark.parametrize("version", [None, "0.21.2", "0.17.0"])
def test_a_folder_saved_before_peft_0_22_loads_as_peft_loads_it(tmp_path, version):
    """PEFT < 0.22 applied out_proj's delta twice; PEFT >= 0.22 doubles that lora_B on load of
    such a folder (no peft_version: older than 0.18), and lora-lite does the same."""
    import json

    from peft import PeftModel
    base = toy()
    p = peft_lora(base)
    randomize_peft(p)
    p.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config.pop("peft_version", None)
    if version:
        config["peft_version"] = version
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="twice"):
        q = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    model = toy()
    ll.load(model, tmp_path)
    assert (q(X) - model(X)).abs().max() < 1e-5
    assert (p(X) - model(X)).abs().max() > 1e-3  # the doubling did happen


@pytest.mark.parametrize("version, factor", [
    (None, 2.0), ("", 2.0), ("0.17.1", 2.0), ("0.21.2", 2.0), ("0.21.0.dev0", 2.0),
    ("0.21.1.dev0", 1.0), ("0.22.0", 1.0), ("0.22.0@abc123", 1.0), ("1.0", 1.0), ("junk", 2.0)])
def test_legacy_out_proj_factor_follows_peft_rule(version, factor):
    from lora_lite.layers.mha import legacy_out_proj_factor
    assert legacy_out_proj_factor(version) == factor


def test_separate_qkv_weights_are_refused_in_one_line():
    torch.manual_seed(0)
    model = AttnToy(kdim=4)
    before = snapshot_state(model)
    with pytest.raises(ll.AttachError, match=r"attn is an nn.MultiheadAttention \(layer kind "
                                             r"'multihead_attention'\) with separate q/k/v") as e:
        ll.attach(model, ll.config("lora", r=2, target_names=["^attn$"]))
    assert "\n" not in str(e.value) and ll.attached(model) is None
    assert state_equal(snapshot_state(model), before)


def test_naming_only_out_proj_is_refused_and_defaults_leave_the_attention_alone():
    model = toy()
    with pytest.raises(ll.AttachError, match=r"attn.out_proj .*multihead_attention.*name 'attn'") as e:
        ll.attach(model, ll.config("lora", r=2, target_names=[r"attn\.out_proj"]))
    assert "\n" not in str(e.value) and ll.attached(model) is None
    state = ll.attach(model, ll.config("lora", r=2))
    assert [t.name for t in state.targets] == ["fc"] and state.param_targets == []


def test_out_proj_weight_as_a_target_parameter_is_read_by_the_attention_call():
    """target_parameters on out_proj.weight: the substitution wraps the attention's call (the
    out_proj's own forward never runs), so the adapter does change the output."""
    model = toy()
    ref = model(X)
    state = ll.attach(model, ll.config("lora", r=2, target_parameters=[r"^attn\.out_proj\.weight$"]))
    assert [pt.name for pt in state.param_targets] == ["attn.out_proj.weight"]
    randomize(model)
    assert (model(X) - ref).abs().max() > 1e-2


@pytest.mark.parametrize("variant", sorted(ll.variants()))
def test_every_variant_adapts_the_attention_or_refuses_in_one_line(variant):
    from lora_lite.param_targets import refusal_reason
    model = toy()
    ref, before = model(X), snapshot_state(model)
    cfg = tiny_config(variant, TINY_KNOBS.get(variant), target_names=["^attn$"])
    if refusal_reason(ll.get_variant(variant)):
        with pytest.raises(ll.AttachError) as e:
            ll.attach(model, cfg, calibration_data=[X])
        message = str(e.value)
        assert "\n" not in message and "cannot adapt attn (nn.MultiheadAttention, layer kind " \
            "'multihead_attention')" in message
        assert ll.attached(model) is None and state_equal(snapshot_state(model), before)
        return
    ll.attach(model, cfg)
    assert (model(X) - ref).abs().max() < 1e-5  # identity at init
    randomize(model)
    out = model(X)
    assert torch.isfinite(out).all() and (out - ref).abs().max() > 0
    ll.detach(model)
    assert state_equal(snapshot_state(model), before) and torch.equal(model(X), ref)


def test_an_out_proj_that_is_no_linear_is_refused_in_one_line():
    model = toy()
    model.attn.out_proj = nn.Identity()
    with pytest.raises(ll.AttachError, match=r"attn is an nn.MultiheadAttention .* out_proj is a "
                                             r"Identity, not an nn.Linear") as e:
        ll.attach(model, ll.config("lora", r=2, target_names=["^attn$"]))
    assert "\n" not in str(e.value) and ll.attached(model) is None


def test_exclude_names_and_layers_filter_attentions():
    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(AttnToy() for _ in range(2))

        def forward(self, x):
            for block in self.layers:
                x = block(x)
            return x
    names = lambda **kw: [pt.name for pt in ll.attach(Blocks(), ll.config(  # noqa: E731
        "lora", r=2, target_names=["attn$"], **kw)).param_targets]
    assert names(layers=[1]) == ["layers.1.attn.in_proj_weight", "layers.1.attn.out_proj.weight"]
    assert names(exclude_names=[r"layers\.0\."]) == names(layers=[1])
    assert len(names()) == 4


def peft_folder(tmp_path, base=None):
    p = peft_lora(base or toy())
    p.save_pretrained(tmp_path)
    return tmp_path


def test_a_peft_attention_folder_for_a_separate_qkv_model_is_refused(tmp_path):
    folder = peft_folder(tmp_path)
    torch.manual_seed(0)
    model = AttnToy(kdim=4)
    before = snapshot_state(model)
    with pytest.raises(ll.AdapterFileError, match="separate q/k/v") as e:
        ll.load(model, folder)
    assert "\n" not in str(e.value) and ll.attached(model) is None
    assert state_equal(snapshot_state(model), before)


def test_a_peft_attention_tensor_of_the_wrong_shape_is_refused(tmp_path):
    from safetensors.torch import save_file
    folder = peft_folder(tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.attn.lora_B.weight"] = torch.zeros(2 * WIDTH, 2)  # (3E, r) expected
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    model = toy()
    before = snapshot_state(model)
    with pytest.raises(ll.AdapterFileError, match="lora_B.weight") as e:
        ll.load(model, folder)
    assert "\n" not in str(e.value) and ll.attached(model) is None
    assert state_equal(snapshot_state(model), before)


def test_inference_fast_path_sees_the_adapted_weights():
    """Under no_grad in eval, torch takes MultiheadAttention's fused fast path; it reads the
    same attributes, so it computes the adapted attention too."""
    model = toy()
    lora(model)
    randomize(model)
    adapted = model(X)
    calls, native = [], torch._native_multi_head_attention
    try:
        torch._native_multi_head_attention = lambda *a, **k: calls.append(1) or native(*a, **k)
        with torch.no_grad():
            fast = model(X)
    finally:
        torch._native_multi_head_attention = native
    assert calls and (fast - adapted).abs().max() < 1e-5


def test_docs_name_the_variants_that_adapt_the_attention():
    """docs/models.md lists the built-in variants that adapt an nn.MultiheadAttention."""
    import pathlib

    from lora_lite.param_targets import refusal_reason
    adapting = sorted(v for v in ll.variants() if not refusal_reason(ll.get_variant(v)))
    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    assert f"({', '.join(adapting)})" in " ".join(doc.split())


def test_transformer_encoder_layer_under_no_grad_runs_the_adapted_attention():
    """nn.TransformerEncoderLayer's inference fast path reads self_attn's weights without calling
    it; torch skips that path when a submodule has hooks, so the adapter is seen there too."""
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(WIDTH, HEADS, 16, dropout=0.0, batch_first=True).eval()
    with torch.no_grad():
        ref = model(X)
    state = ll.attach(model, ll.config("lora", r=2, target_names=["self_attn$"]))
    assert [pt.name for pt in state.param_targets] == ["self_attn.in_proj_weight", "self_attn.out_proj.weight"]
    randomize(model)
    adapted = model(X)
    with torch.no_grad():
        fast = model(X)
    assert (adapted - ref).abs().max() > 1e-2 and (fast - adapted).abs().max() < 1e-5


def test_attention_adapters_are_the_models_one_default_adapter(tmp_path):
    folder = peft_folder(tmp_path)
    model = toy()
    with pytest.raises(ll.AttachError, match="nn.MultiheadAttention loads as the model's one adapter"):
        ll.load(model, folder, name="other")
    with pytest.raises(ll.AttachError, match="one adapter per model"):
        ll.attach(model, ll.config("lora", r=2, target_names=["^attn$"]), name="other")
    assert ll.attached(model) is None
