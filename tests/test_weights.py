"""Dense-weight access on nn.Linear and bitsandbytes 4bit (nf4, fp4) and 8bit layers, on CPU."""
import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.testing import logits, quantize, snapshot_state, state_equal, tiny_llama

from lltest import lora_cfg


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
    from lora_lite.weights import restore_base_weight
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
