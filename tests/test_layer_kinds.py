"""nn.Embedding and nn.Conv1d/Conv2d as targets (PEFT's LoRA layouts), the variants' layer_kinds
refusal, the refusal of an nn.MultiheadAttention's out_proj alone, and the default targets
staying "all-linear"."""
import copy
import tempfile

import pytest
import torch
from tiny_knobs import TINY_KNOBS
from torch import nn

import lora_lite as ll
from lora_lite.layers.kinds import features
from lora_lite.testing import snapshot_state, state_equal
from lora_lite.testing.arch_matrix import calibration, tiny_config
from lora_lite.testing.tiny_models import ARCHS

KIND_TARGETS = [r"^emb$", r"^conv1$", r"^conv2$", r"^fc$"]


class KindsToy(nn.Module):
    """Embedding (with a padding index) -> Conv1d over time -> Conv2d (stride 2) -> Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.conv1 = nn.Conv1d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * 2 * 4, 5)

    def forward(self, input_ids):
        h = self.conv1(self.emb(input_ids).transpose(1, 2))          # (B, 8, 8)
        h = self.conv2(h.reshape(len(h), 2, 4, 8))                    # (B, 4, 2, 4)
        return self.fc(h.flatten(1))


def toy(seed=0):
    torch.manual_seed(seed)
    return KindsToy().eval()


IDS = torch.tensor([[0, 3, 5, 7, 9, 11, 0, 2], [4, 4, 19, 1, 0, 6, 8, 10]])


def perturbed(model, seed=1, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ll.trainable_parameters(model) if ll.attached(model) else model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("variant,knobs", [("lora", {}), ("pissa", {}),
                                           ("pissa", {"rewrite_base": True})],
                         ids=["lora", "pissa", "pissa-rewrite"])
def test_on_embedding_and_conv_exports_to_peft_within_1e_5(variant, knobs):
    import peft
    model = toy()
    ref = model(IDS)
    ll.attach(model, ll.config(variant, r=2, alpha=4, target_names=KIND_TARGETS, **knobs))
    assert (model(IDS) - ref).abs().max() < 1e-5                    # the identity at init
    ours = perturbed(model)(IDS)
    with tempfile.TemporaryDirectory() as folder:
        ll.export_peft(model, folder)
        from safetensors.torch import load_file
        stored = load_file(f"{folder}/adapter_model.safetensors")
        twin = peft.PeftModel.from_pretrained(toy(), folder).eval()
        theirs = twin(IDS)
    r = 2 if variant == "lora" else 4                               # PiSSA: [A; A0], rank 2r
    assert stored["base_model.model.emb.lora_embedding_A"].shape == (r, 20)
    assert stored["base_model.model.emb.lora_embedding_B"].shape == (8, r)
    assert stored["base_model.model.conv2.lora_A.weight"].shape == (r, 2, 3, 3)
    assert stored["base_model.model.conv2.lora_B.weight"].shape == (4, r, 1, 1)
    assert (ours - ref).abs().max() > 1e-2
    assert (ours - theirs).abs().max().item() < 1e-5


def test_a_peft_folder_with_embedding_and_conv_lora_imports_within_1e_5():
    import peft
    twin = peft.get_peft_model(toy(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=[
        "emb", "conv1", "conv2", "fc"]))
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if "lora_" in n:
                p.add_(0.1 * torch.randn_like(p))
    twin.eval()
    theirs = twin(IDS)
    model = toy()
    with tempfile.TemporaryDirectory() as folder:
        twin.save_pretrained(folder)
        ll.load(model, folder)
    assert len(ll.attached(model).targets) == 4
    assert (model(IDS) - theirs).abs().max().item() < 1e-5


@pytest.mark.parametrize("variant,knobs", [("lora", {}), ("pissa", {"rewrite_base": True})])
def test_merge_and_detach_on_embedding_and_conv(variant, knobs):
    model = toy()
    ref, before = model(IDS), snapshot_state(model)
    ll.attach(model, ll.config(variant, r=2, alpha=4, target_names=KIND_TARGETS, **knobs))
    hooked = perturbed(model)(IDS)
    merged = copy.deepcopy(model)
    ll.merge(merged)
    assert (merged(IDS) - hooked).abs().max().item() < 1e-5
    with tempfile.TemporaryDirectory() as d:      # save -> load on a fresh base
        ll.save(model, f"{d}/a.safetensors")
        fresh = toy()
        ll.load(fresh, f"{d}/a.safetensors")
    assert (fresh(IDS) - hooked).abs().max().item() < 1e-5
    ll.detach(model)
    assert state_equal(snapshot_state(model), before) and torch.equal(model(IDS), ref)


def test_gradients_reach_embedding_and_conv_adapters_only():
    model = toy()
    ll.attach(model, ll.config("lora", r=2, target_names=KIND_TARGETS))
    perturbed(model)
    model(IDS).pow(2).mean().backward()
    grads = {n: p.grad for n, p in ll.adapter_tensors(model).items()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), grads.keys()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("arch,name,kind", [
    ("vit", "vit.embeddings.patch_embeddings.projection", nn.Conv2d),   # stride 4
    ("clip", "vision_model.embeddings.patch_embedding", nn.Conv2d)])
def test_a_real_model_conv_matches_peft(arch, name, kind):
    import peft
    a = ARCHS[arch]
    model, batch = a.build(), a.batch()
    assert isinstance(dict(model.named_modules())[name], kind)
    ll.attach(model, ll.config("lora", r=2, alpha=4, target_names=[f"^{name}$"]))
    ours = a.outputs(perturbed(model), batch)
    with tempfile.TemporaryDirectory() as folder:
        ll.export_peft(model, folder)
        theirs = a.outputs(peft.PeftModel.from_pretrained(a.build(), folder).eval(), batch)
    assert (ours - a.outputs(a.build(), batch)).abs().max() > 1e-4
    assert (ours - theirs).abs().max().item() < 1e-5


def test_whisper_conv_lora_equals_its_merge():
    """PEFT cannot run Whisper with a LoRA conv (Whisper reads conv1.stride, which PEFT's wrapper
    lacks); the merged kernel (the dense math) is the reference instead."""
    a = ARCHS["whisper"]
    model, batch = a.build(), a.batch()
    names = [r"^model\.encoder\.conv[12]$"]                        # stride 1 and 2, padding 1
    ll.attach(model, ll.config("lora", r=2, alpha=4, target_names=names))
    ours = a.outputs(perturbed(model), batch)
    assert ll.merge(model)["max_write_error"] == 0 and ll.attached(model) is None
    assert (ours - a.outputs(a.build(), batch)).abs().max() > 1e-4
    assert (ours - a.outputs(model, batch)).abs().max().item() < 1e-5


# -- every installed variant either adapts these kinds or refuses in one line ----------------------
@pytest.mark.parametrize("kind,target", [("embedding", "^emb$"), ("conv", "^conv2$")])
@pytest.mark.parametrize("variant", sorted(ll.variants()))
def test_every_variant_adapts_the_kind_or_refuses_in_one_line(variant, kind, target):
    model = toy()
    ref, before = model(IDS), snapshot_state(model)
    cfg = tiny_config(variant, TINY_KNOBS.get(variant), target_names=[target])
    batch = {"input_ids": IDS}
    if kind not in ll.get_variant(variant).layer_kinds:
        with pytest.raises(ll.AttachError) as e:
            ll.attach(model, cfg, calibration_data=calibration(variant, batch))
        message = str(e.value)
        assert "\n" not in message and target.strip("^$") in message and repr(kind) in message
        assert ll.attached(model) is None and state_equal(snapshot_state(model), before)
        return
    ll.attach(model, cfg, calibration_data=calibration(variant, batch))
    perturbed(model)
    out = model(IDS)
    assert torch.isfinite(out).all() and (out - ref).abs().max() > 0
    ll.detach(model)
    assert state_equal(snapshot_state(model), before)


def test_the_refusal_fires_for_a_linear_only_variant():
    from lora_lite.testing import gain_variant, registered
    with registered(gain_variant("linear_only_gain")):
        model = toy()
        with pytest.raises(ll.AttachError, match=r"cannot adapt emb \(Embedding, layer kind 'embedding'\)"):
            ll.attach(model, ll.config("linear_only_gain", target_names=["^emb$"]))
        ll.attach(model, ll.config("linear_only_gain", target_names=["^fc$"]))  # linear: fine


def test_multihead_attention_out_proj_alone_is_refused_in_one_line():
    """Naming the attention adapts its weights (tests/test_mha.py); naming only its out_proj,
    whose forward never runs, is refused."""
    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(self.attn(x, x, x)[0])
    with pytest.raises(ll.AttachError, match="nn.MultiheadAttention.*multihead_attention") as e:
        ll.attach(WithMHA(), ll.config("lora", r=2, target_names=[r"attn\.out_proj"]))
    assert "\n" not in str(e.value)
    state = ll.attach(WithMHA(), ll.config("lora", r=2, target_names=["^attn$"]))
    assert [pt.name for pt in state.param_targets] == ["attn.in_proj_weight", "attn.out_proj.weight"]
    ll.attach(WithMHA(), ll.config("lora", r=2))  # defaults: fc only, as before


@pytest.mark.parametrize("arch", ["vit", "whisper", "clip"])
def test_default_targets_leave_embeddings_and_convolutions_alone(arch):
    model = ARCHS[arch].build()
    found = ll.find_targets(model, ll.config("lora", r=2))
    assert found and all(ll.kind_family(t.layer) == "linear" for t in found)
    assert any(isinstance(m, (nn.Conv1d, nn.Conv2d)) for m in model.modules())


def test_dense_view_of_each_kind_round_trips():
    model = toy()
    for name in ("emb", "conv1", "conv2"):
        layer = getattr(model, name)
        W = ll.dense_weight(layer)
        d_in, d_out = features(layer)
        assert W.shape == (d_out, d_in) == {"emb": (8, 20), "conv1": (8, 24), "conv2": (4, 18)}[name]
        before = layer.weight
        ll.set_dense_weight(layer, W + 1)
        assert torch.equal(ll.dense_weight(layer), W + 1)
        from lora_lite.layers.weights import restore_base_weight
        restore_base_weight(layer)
        assert layer.weight is before


def test_a_peft_lora_on_llama_embed_tokens_imports_within_1e_5():
    import peft
    arch = ARCHS["llama"]
    twin = peft.get_peft_model(arch.build(), peft.LoraConfig(r=2, target_modules=[
        "embed_tokens", "q_proj"]))
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if "lora_" in n:
                p.add_(0.1 * torch.randn_like(p))
    batch = arch.batch()
    theirs = arch.outputs(twin.eval(), batch)
    model = arch.build()
    with tempfile.TemporaryDirectory() as folder:
        twin.save_pretrained(folder)
        ll.load(model, folder)
    assert any(ll.kind_family(t.layer) == "embedding" for t in ll.attached(model).targets)
    assert (arch.outputs(model, batch) - theirs).abs().max().item() < 1e-5


def test_as_lora_rank_export_writes_peft_layouts_for_embedding_and_conv():
    import peft
    model = toy()
    ll.attach(model, ll.config("lora", r=2, alpha=4, target_names=KIND_TARGETS))
    ours = perturbed(model)(IDS)
    with tempfile.TemporaryDirectory() as folder:
        report = ll.export_peft(model, folder, as_lora_rank=2)   # rank 2 holds a rank-2 delta
        theirs = peft.PeftModel.from_pretrained(toy(), folder).eval()(IDS)
    assert report["max_relative_error"] < 1e-5
    assert (ours - theirs).abs().max().item() < 1e-5


@pytest.mark.parametrize("conv", [nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, padding_mode="reflect"),
                                  nn.ConvTranspose2d(4, 4, 3)], ids=["grouped", "reflect", "transposed"])
def test_a_named_convolution_outside_the_conv_kind_is_refused_not_skipped(conv):
    model = nn.Sequential(nn.Conv2d(4, 4, 3), conv)   # "0" adaptable, "1" not; both named
    with pytest.raises(ll.AttachError, match=r"^1 is a Conv(Transpose)?2d with groups=.*leave it out") as e:
        ll.attach(model, ll.config("lora", r=2, target_names=[r"^\d$"]))
    assert "\n" not in str(e.value) and ll.attached(model) is None
    ll.attach(model, ll.config("lora", r=2, target_names=[r"^0$"]))   # the plain one: fine


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_embedding_lora_on_a_quantized_base(bits):
    """bitsandbytes quantizes the linear layers; the embedding stays float and takes LoRA."""
    pytest.importorskip("bitsandbytes")
    from lora_lite.testing import loss_of, make_batch, quantize, tiny_llama
    model, batch = quantize(tiny_llama(), bits), make_batch()
    # the reference: attached to q_proj alone (bitsandbytes' CPU path differs once attached)
    ll.attach(model, ll.config("lora", r=2, target_names=[r"q_proj$"]))
    with torch.no_grad():
        ref = model(**batch).logits
    ll.detach(model)
    ll.attach(model, ll.config("lora", r=2, target_names=[r"embed_tokens$", r"q_proj$"]))
    assert {ll.kind_family(t.layer) for t in ll.attached(model).targets} == {"embedding", "linear"}
    with torch.no_grad():
        assert (model(**batch).logits - ref).abs().max() == 0
    perturbed(model)
    model.train()
    loss_of(model, batch).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ll.trainable_parameters(model))


@pytest.mark.parametrize("make, x_of", [
    (lambda: torch.nn.Linear(6, 5), lambda g: torch.randn(2, 3, 6, generator=g)),
    (lambda: torch.nn.Linear(6, 5), lambda g: torch.randn(6, generator=g)),
    (lambda: torch.nn.Embedding(7, 5), lambda g: torch.randint(0, 7, (2, 3), generator=g)),
    (lambda: torch.nn.Conv1d(6, 5, 3), lambda g: torch.randn(2, 6, 8, generator=g)),
])
@pytest.mark.parametrize("y_dtype", [torch.float32, torch.bfloat16])
def test_project_out_add_is_y_plus_scaled_project_out(make, x_of, y_dtype):
    """The fused form (linear / embedding, same dtypes) and the general one agree with
    y + s · project_out(project_in(x)) in y's dtype."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    layer = make()
    emb = isinstance(layer, torch.nn.Embedding)
    d_in, d_out = (layer.num_embeddings, layer.embedding_dim) if emb else layer.weight.shape[1::-1]
    A, B = torch.randn(3, d_in, generator=g), torch.randn(d_out, 3, generator=g)
    if isinstance(layer, torch.nn.Conv1d):
        A = torch.randn(3, 6, 3, generator=g)
    x = x_of(g)
    y = layer(x).detach().to(y_dtype)
    h = ll.project_in(layer, x, A)
    out = ll.project_out_add(layer, h, B, y, 0.5)
    expected = y + 0.5 * ll.project_out(layer, h, B).to(y_dtype)
    assert out.dtype == y_dtype and out.shape == y.shape
    torch.testing.assert_close(out, expected, atol=1e-5 if y_dtype == torch.float32 else 2e-2, rtol=1e-5)
