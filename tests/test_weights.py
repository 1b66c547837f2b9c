"""Dense-weight access on nn.Linear and bitsandbytes 4bit (nf4, fp4) and 8bit layers, on CPU."""
import pytest
import torch
from lltest import lora_cfg
from torch import nn

import lora_lite as ll
from lora_lite.testing import logits, quantize, snapshot_state, state_equal, tiny_llama


def quantized_linear(kind, seed=0):
    torch.manual_seed(seed)
    holder = nn.Sequential(nn.Linear(128, 64))
    dense = holder[0].weight.detach().clone()
    quantize(holder, kind, skip=())
    return holder[0], dense


def test_dense_linear_is_exact():
    layer = nn.Linear(8, 4)
    assert torch.equal(ll.dense_weight(layer), layer.weight.detach())


@pytest.mark.parametrize("kind,tol", [("4bit", 0.25), ("fp4", 0.3), ("8bit", 0.01)])
def test_dequantized_weight_matches_the_layer(kind, tol):
    layer, dense = quantized_linear(kind)
    assert type(layer).__module__.startswith("bitsandbytes")
    w = ll.dense_weight(layer)
    assert w.dtype == torch.float32 and w.shape == (64, 128)
    # relative to the weight's scale: the quantizer's own rounding, no more
    rel = ((w - dense).abs().max() / dense.abs().max()).item()
    assert rel < tol
    # the dequantized weight is what the layer computes with
    x = torch.randn(3, 128)
    layer.train()  # training kernel (fp32 4-bit path)
    ref = x @ w.T + layer.bias.detach()
    atol = 0.05 if kind == "8bit" else 1e-4  # int8 matmul also quantizes the input
    assert torch.allclose(layer(x), ref, atol=atol)


def test_reading_8bit_after_forward_keeps_the_next_forward_working():
    layer, _ = quantized_linear("8bit")
    x = torch.randn(2, 128)
    before_read = ll.dense_weight(layer)
    y1 = layer(x)                         # moves SCB from the weight to layer.state
    assert layer.weight.SCB is None and layer.state.SCB is not None
    w = ll.dense_weight(layer)
    assert torch.equal(w, before_read)
    y2 = layer(x)
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("kind", ["none", "4bit", "fp4", "8bit"])
def test_write_requantizes_and_restore_is_bit_exact(kind):
    if kind == "none":
        layer, _ = nn.Linear(128, 64), None
    else:
        layer, _ = quantized_linear(kind)
    x = torch.randn(2, 128)
    layer(x)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    w0 = ll.dense_weight(layer)
    target = w0 * 0.5
    ll.set_dense_weight(layer, target)
    err = (ll.dense_weight(layer) - target).abs().max().item()
    assert err <= (0.0 if kind == "none" else 0.25 * target.abs().max().item())
    assert torch.equal(ll.base_dense_weight(layer), w0)
    layer(x)  # still runs after a write
    from lora_lite.layers.weights import restore_base_weight
    restore_base_weight(layer)
    assert state_equal({k: v for k, v in layer.state_dict().items()}, before)
    assert torch.equal(ll.dense_weight(layer), w0)


def test_wrong_shape_write_is_refused():
    layer = nn.Linear(8, 4)
    with pytest.raises(ValueError, match="shape"):
        ll.set_dense_weight(layer, torch.zeros(8, 4))


def test_unsupported_layer_type_says_what_is_supported():
    class Odd(nn.Module):
        in_features, out_features = 4, 4
        weight = None
    with pytest.raises(TypeError, match="Linear4bit and Linear8bitLt"):
        ll.dense_weight(Odd())


def test_4bit_model_evaluated_between_steps_keeps_adapter_gradients(batch):
    """bitsandbytes' CPU inference path (eval + no_grad) repacks 4-bit weights for an AVX512-BF16
    kernel without autograd; without lora-lite's guard the adapter then gets zero gradients."""
    model = quantize(tiny_llama(), "4bit")
    logits(model, batch)                       # the user evaluates the base first (repacks)
    before = snapshot_state(model)
    four_bit = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    flags = [m.support_avx512bf16_for_cpu for m in four_bit]
    ll.attach(model, lora_cfg(target_names=[r"q_proj$", r"v_proj$", r"down_proj$"]))
    params = ll.trainable_parameters(model)
    opt = torch.optim.SGD(params, lr=0.1)
    for _ in range(3):
        model.train()
        opt.zero_grad()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        b_grads = [p.grad.abs().sum().item() for n, p in ll.adapter_tensors(model).items()
                   if n.endswith("lora_B")]
        assert all(g > 0 for g in b_grads)     # every adapter gets a gradient, every step
        opt.step()
        model.eval()
        logits(model, batch)                   # evaluation between training steps
    ll.detach(model)
    assert state_equal(snapshot_state(model), before)
    assert four_bit and [m.support_avx512bf16_for_cpu for m in four_bit] == flags  # restored


# -- layer kinds: transformers' Conv1D (weight stored (d_in, d_out)) and plugin-registered kinds ----
def conv1d(d_in=6, d_out=4, seed=0):
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(seed)
    layer = Conv1D(d_out, d_in)                       # Conv1D(nf=d_out, nx=d_in)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    return layer


def test_conv1d_reads_as_d_out_by_d_in_and_writes_its_own_layout():
    from lora_lite.layers.kinds import features, kind_of
    from lora_lite.layers.weights import restore_base_weight
    layer = conv1d()
    assert kind_of(layer).name == "conv1d" and features(layer) == (6, 4)
    w = ll.dense_weight(layer)
    assert w.shape == (4, 6) and torch.equal(w, layer.weight.detach().T)
    x = torch.randn(3, 6)
    assert torch.allclose(layer(x), x @ w.T + layer.bias, atol=1e-6)  # y = x Wᵀ + b, W (d_out, d_in)
    original = layer.weight
    new = torch.randn(4, 6)
    ll.set_dense_weight(layer, new)
    assert layer.weight.shape == (6, 4) and torch.equal(ll.dense_weight(layer), new)
    assert torch.allclose(layer(x), x @ new.T + layer.bias, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        ll.set_dense_weight(layer, new.T)             # (d_in, d_out) is the storage, not the API
    restore_base_weight(layer)
    assert layer.weight is original


class Transposed(nn.Module):
    """A layer type no built-in kind knows: weight stored (d_in, d_out) under another name."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out))
        self.size = (d_in, d_out)

    def forward(self, x):
        return x @ self.weight


class TransposedKind:
    name = "transposed-test"
    handles = staticmethod(lambda layer: isinstance(layer, Transposed))
    features = staticmethod(lambda layer: layer.size)
    read = staticmethod(lambda layer: layer.weight.detach().float().T.contiguous())
    snapshot = staticmethod(lambda layer: layer.weight)

    @staticmethod
    def write(layer, dense):
        layer.weight = nn.Parameter(dense.T.contiguous(), requires_grad=False)

    @staticmethod
    def restore(layer, snap):
        layer.weight = snap


def test_a_plugin_kind_makes_a_new_layer_type_adaptable():
    import lora_lite.plugins as plugins

    class KindPlugin:
        @staticmethod
        @ll.hookimpl
        def register_weight_backends(register):
            register(TransposedKind)
    model = nn.Sequential(Transposed(6, 5), nn.ReLU(), Transposed(5, 6))
    with pytest.raises(ll.AttachError, match="no linear-like layers|no layer matched"):
        ll.attach(model, ll.config("lora", r=2))      # unknown type: not a candidate
    plugins.register_plugin(KindPlugin, name="kind-test")
    try:
        x = torch.randn(2, 6)
        ref = model(x)
        ll.attach(model, ll.config("lora", r=2))
        assert [t.name for t in ll.attached(model).targets] == ["0", "2"]
        assert model[0].lora_A.shape == (2, 6) and model[0].lora_B.shape == (5, 2)
        assert torch.equal(model(x), ref)
        ll.detach(model)
    finally:
        plugins.unregister_plugin("kind-test")


def test_gpt2_weight_reading_variants_see_the_dense_layout():
    """pissa / dora / delora read W: on GPT-2 they must get (d_out, d_in), not Conv1D's storage."""
    from lora_lite.testing.tiny_models import ARCHS
    model = ARCHS["gpt2"].build()
    layer = model.transformer.h[0].mlp.c_fc           # Conv1D 32 -> 128, stored (32, 128)
    W = layer.weight.detach().T
    ll.attach(model, ll.config("dora", r=2, target_names=[r"mlp\.c_fc$"]))
    assert layer.lora_m.shape == (128,)               # ‖W‖ per output row
    assert torch.allclose(layer.lora_m, torch.linalg.norm(W, dim=1), rtol=1e-6)
    ll.detach(model)
    ll.attach(model, ll.config("pissa", r=2, target_names=[r"mlp\.c_fc$"]))
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    assert torch.allclose(layer.lora_B @ layer.lora_A * ll.attached(model).cfg.scale,
                          (U[:, :2] * S[:2]) @ Vh[:2], atol=1e-5)
    ll.detach(model)
