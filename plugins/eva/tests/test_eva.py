"""EVA plugin: invariants (fp32, 4bit, 8bit, calibrating through the quantized model), the
missing-calibration error, padding, exactness against a brute-force SVD, streamed statistics,
PEFT (subspace of EVA's init, forward parity), config validation."""
import copy
import gc
import warnings

import pytest
import torch

import lora_lite as ll
from lora_lite.testing import (
    BASES,
    check_variant,
    logits,
    make_batch,
    model_maker,
    quantize,
    snapshot_state,
    state_equal,
    tiny_llama,
)

TARGETS = [r"q_proj$", r"v_proj$"]
TRAINABLE = 2 * (4 * (64 + 64) + 4 * (64 + 32))  # tiny_llama q_proj 64->64, v_proj 64->32, r=4
CALIB = [make_batch(seed=s) for s in range(2)]     # 2 x (2 x 12) tokens, 3 padded
MAKERS = {base: model_maker(base) for base in BASES}


def make_cfg(**kw):
    return ll.config("eva", **{"r": 4, "target_names": TARGETS, "target_roles": (), **kw})


def invariants(kind):
    return check_variant("eva", make_cfg(), bases=[kind], batch=make_batch(seed=7),
                         calibration_data=CALIB, identity_tol=0.0, reload_tol=1e-6)["bases"][kind]


def aniso_llama(decay=0.5, offset=0.0):
    """tiny_llama whose embeddings have a decaying spectrum (like a trained model's activations,
    unlike random ones, whose flat spectrum leaves the top-r subspace ill-determined), plus an
    optional common offset along a low-variance direction (a large input mean)."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(5)
    gauss = torch.randn(128, 64, generator=g)
    basis, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(
            (gauss * decay ** torch.arange(64.0)) @ basis.T + offset * basis[:, 8])
    return model


def agreement(a1, a2):
    """‖A1 A2ᵀ‖²_F / r for orthonormal rows: mean squared cosine of the principal angles
    between the two row spaces (1 = same subspace, sign and order of rows ignored)."""
    return ((a1.double() @ a2.double().T).norm() ** 2 / a1.shape[0]).item()


def eva_A(model, calibration, **kw):
    model = copy.deepcopy(model)
    ll.attach(model, make_cfg(**kw), calibration_data=calibration)
    return {t.name: t.layer.lora_A.detach().clone() for t in ll.attached(model).targets}


def peft_eva_A(model, calibration, r=4, exact=False):
    """PEFT's EVA init: rho=1 (no rank redistribution, like lora-lite), no label mask.
    exact=True swaps its randomized low-rank SVD for a full one (SVDHook hard-codes lowrank)."""
    import peft.tuners.lora.eva as peft_eva
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import EvaConfig, initialize_lora_eva_weights
    cfg = LoraConfig(r=r, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights="eva",
                     eva_config=EvaConfig(rho=1.0, use_label_mask=False))
    original = peft_eva.IncrementalPCA
    if exact:
        peft_eva.IncrementalPCA = lambda **kw: original(**{**kw, "lowrank": False})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's advice on low_cpu_mem_usage etc.
            peft_model = get_peft_model(copy.deepcopy(model), cfg, low_cpu_mem_usage=True)
            initialize_lora_eva_weights(peft_model, calibration, show_progress_bar=False)
    finally:
        peft_eva.IncrementalPCA = original
    return {name.replace("base_model.model.", ""): m.lora_A["default"].weight.detach().clone()
            for name, m in peft_model.named_modules() if "default" in getattr(m, "lora_A", {})}


def one_batch(calibration):
    return [{k: torch.cat([b[k] for b in calibration]) for k in calibration[0]}]


PEFT_CALIB = [make_batch(seed=s, batch=4, seq=32, pad_first=5) for s in range(3)]


def peft_agreement():
    """(min agreement with PEFT's default EVA init, max |A - A_peft| with PEFT made exact)."""
    model = aniso_llama()
    ours = eva_A(model, PEFT_CALIB, center=True)
    default = peft_eva_A(model, PEFT_CALIB)
    exact = peft_eva_A(model, one_batch(PEFT_CALIB), exact=True)
    return (min(agreement(ours[n], default[n]) for n in ours),
            max((ours[n] - exact[n]).abs().max().item() for n in ours))


def peft_forward_parity_err():
    from peft import LoraConfig, get_peft_model
    base = tiny_llama()
    ours = copy.deepcopy(base)
    ll.attach(ours, make_cfg(alpha=8.0), calibration_data=CALIB)
    g = torch.Generator().manual_seed(3)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, module in theirs.named_modules():
            if "default" not in getattr(module, "lora_A", {}):
                continue
            layer = ours.get_submodule(name.replace("base_model.model.", ""))
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=g))
            module.lora_A["default"].weight.copy_(layer.lora_A)
            module.lora_B["default"].weight.copy_(layer.lora_B)
    batch = make_batch(seed=7)
    a, b, ref = logits(ours, batch), logits(theirs, batch), logits(base, batch)
    return (a - b).abs().max().item(), (a - ref).abs().max().item()


# ---------------------------------------------------------------- registration, invariants

def test_registered_through_entry_point():
    v = ll.variants()["eva"]
    assert v.needs_calibration is True and v.config.knobs() == {"center": False}
    assert v.paper.endswith("2410.07170")


@pytest.mark.parametrize("kind", ["fp32", "4bit", "8bit"])
def test_invariants(kind):
    out = invariants(kind)  # calibration runs through the (quantized) model itself
    assert out["identity_err"] == 0.0  # B = 0: the added term is exactly zero
    assert out["trainable"] == TRAINABLE  # A and B both trainable
    assert out["trained_delta"] > 1e-3
    assert out["reload_err"] <= 1e-6  # load needs no calibration data: A comes from the file
    assert {k.rsplit(".", 1)[1] for k in out["file_keys"]} == {"lora_A", "lora_B"}
    assert len(out["file_keys"]) == 8  # no base weights (upstream saved them after calibration)
    assert out["detach_logits_err"] == 0.0


def test_A_is_orthonormal_and_trainable():
    model = tiny_llama()
    ll.attach(model, make_cfg(), calibration_data=CALIB)
    for t in ll.attached(model).targets:
        A = t.layer.lora_A
        assert isinstance(A, torch.nn.Parameter) and A.requires_grad
        assert torch.allclose(A @ A.T, torch.eye(4), atol=1e-5)
        assert not t.layer.lora_B.any()


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_quantized_calibration_finds_the_same_subspace(kind):
    fp32 = eva_A(aniso_llama(), CALIB)
    quant = eva_A(quantize(aniso_llama(), kind), CALIB)
    for name in fp32:  # the quantizer perturbs the activations a little, nothing more
        assert agreement(fp32[name], quant[name]) > 0.95


# ---------------------------------------------------------------- calibration required

def test_attach_without_calibration_fails_before_touching_the_model():
    model = tiny_llama()
    before = snapshot_state(model)
    grads = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match=r"calibration_data=\[batch, \.\.\.\]"):
        ll.attach(model, make_cfg())
    assert state_equal(snapshot_state(model), before)
    assert [p.requires_grad for p in model.parameters()] == grads
    assert ll.attached(model) is None
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not any(k.startswith("lora_") for k in vars(module))
        assert not any(k.startswith("lora_") for k in list(module._parameters) + list(module._buffers))
    ll.attach(model, make_cfg(), calibration_data=CALIB)  # and it still attaches normally


def test_group_init_itself_refuses_missing_data():
    with pytest.raises(ValueError, match="calibration_data"):
        ll.variants()["eva"].group_init(tiny_llama(), [], make_cfg(), None)


def test_too_few_rows_raises_and_leaves_the_model_as_it_was():
    model = tiny_llama()
    before = snapshot_state(model)
    batch = make_batch(batch=1, seq=12, pad_first=9)  # 3 real tokens < r = 4
    with pytest.raises(ValueError, match=r"saw 3 non-padding input rows.*r=4"):
        ll.attach(model, make_cfg(), calibration_data=[batch])
    assert ll.attached(model) is None and state_equal(snapshot_state(model), before)


def test_rank_above_input_width_raises():
    with pytest.raises(ValueError, match="exceeds d_in"):
        ll.attach(tiny_llama(), make_cfg(r=65), calibration_data=CALIB)


# ---------------------------------------------------------------- what A is

def captured_rows(model, calibration, name, keep_padding=False):
    rows = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda m, args: rows.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for batch in calibration:
            model(**batch)
    handle.remove()
    x = torch.cat(rows).double()
    if keep_padding:
        return x
    return x[torch.cat([b["attention_mask"].reshape(-1) for b in calibration]).bool()]


def test_A_is_the_exact_top_singular_subspace_of_the_non_padding_rows():
    model = aniso_llama()
    calib = [make_batch(seed=s, batch=3, seq=16, pad_first=6) for s in range(3)]
    for center in (False, True):
        ours = eva_A(model, calib, center=center)
        for name, A in ours.items():
            X = captured_rows(model, calib, name)
            if center:
                X = X - X.mean(dim=0)
            ref = torch.linalg.svd(X, full_matrices=False).Vh[:4]
            assert agreement(A, ref) > 1 - 1e-6
            sign = torch.sign((A.double() * ref).sum(dim=1, keepdim=True))
            assert (A.double() - sign * ref).abs().max() < 1e-4  # same vectors, in order


def test_padding_positions_are_excluded():
    model = tiny_llama()  # flat spectrum: a repeated padded token would take over A's top row
    calib = [make_batch(seed=s, batch=3, seq=16, pad_first=10) for s in range(2)]
    odd = copy.deepcopy(calib)
    for b in odd:  # other token ids under the padding: one repeated token
        b["input_ids"][b["attention_mask"] == 0] = 5
    A, A_odd = eva_A(model, calib), eva_A(model, odd)
    for name in A:
        assert (A[name] - A_odd[name]).abs().max() < 1e-6
        # the test can fail: counting the padded rows would move A (the repeated token dominates)
        with_pad = captured_rows(model, odd, name, keep_padding=True)
        ref_with_pad = torch.linalg.svd(with_pad, full_matrices=False).Vh[:4]
        assert agreement(A_odd[name], ref_with_pad) < 0.9


def test_layers_fed_the_same_input_get_the_same_A():
    A = eva_A(tiny_llama(), CALIB)  # q_proj and v_proj read the same normed hidden state
    for layer in (0, 1):
        q, v = (A[f"model.layers.{layer}.self_attn.{p}_proj"] for p in "qv")
        assert torch.equal(q, v)


# ---------------------------------------------------------------- statistics are streamed

def live_tensor_bytes():
    """Bytes of every tensor storage reachable from Python (each storage counted once)."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if type(obj) in (torch.Tensor, torch.nn.Parameter):
            try:
                st = obj.untyped_storage()
                storages[(st.device.type, st.data_ptr())] = st.nbytes()
            except (RuntimeError, NotImplementedError):
                pass
    return sum(storages.values())


def recording_stream(n, record):
    """Calibration batches; record the bytes held after the first and after the next-to-last
    batch was processed (a gc scan is slow, so only two)."""
    for i in range(n):
        if i in (1, n - 1):
            record.append(live_tensor_bytes())
        yield make_batch(seed=i, batch=4, seq=64, pad_first=8)


ROWS_PER_BATCH_BYTES = (4 * 64 - 8) * 64 * 4  # one target's fp32 input rows of one batch


def test_statistics_are_streamed_not_stored():
    model = tiny_llama()
    record = []
    ll.attach(model, make_cfg(), calibration_data=recording_stream(8, record))
    growth = record[1] - record[0]  # across 6 batches
    assert growth < ROWS_PER_BATCH_BYTES  # memory does not grow with the number of batches

    # the measurement can fail: a calibration that keeps every row shows up at once
    hoard, record_hoard = [], []
    ll.stream_inputs(model, ll.attached(model).targets, recording_stream(8, record_hoard),
                     lambda target, rows: hoard.append(rows))
    assert record_hoard[1] - record_hoard[0] >= 4 * 6 * ROWS_PER_BATCH_BYTES  # 4 targets x 6


# ---------------------------------------------------------------- PEFT

def test_peft_eva_init_spans_the_same_subspace():
    # PEFT subtracts the mean (IncrementalPCA), so compare with center=True
    default_agreement, exact_err = peft_agreement()
    # PEFT's default is approximate (per-batch truncation, randomized SVD, stops at tau=0.99)
    assert default_agreement > 0.99  # measured 0.996
    # with one batch and a full SVD its components are the exact ones: same vectors, same signs
    assert exact_err < 1e-5  # measured 3e-7


def test_uncentred_default_differs_from_peft_where_the_mean_matters():
    model = aniso_llama(offset=3.0)  # large input mean along a low-variance direction
    calib = PEFT_CALIB[:1]
    peft_A = peft_eva_A(model, calib, r=1, exact=True)
    centred, uncentred = eva_A(model, calib, r=1, center=True), eva_A(model, calib, r=1)
    for name, A in peft_A.items():
        mean = captured_rows(model, calib, name).mean(dim=0, keepdim=True).float()
        mean = mean / mean.norm()
        assert agreement(centred[name], A) > 1 - 1e-6
        assert agreement(uncentred[name], A) < 0.1       # a different direction altogether:
        assert agreement(uncentred[name], mean) > 0.99   # the mean, which x·Aᵀ sees in full


def test_peft_forward_parity():
    err, effect = peft_forward_parity_err()
    assert effect > 1e-2  # non-zero B: the adapters act, parity is not trivial
    assert err < 1e-5  # same LoRA math, fp32 rounding only


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("value", ["yes", 1, None])
def test_bad_center_names_the_field(value):
    with pytest.raises(ll.ConfigError, match="^center:"):
        make_cfg(center=value)


def test_bad_rank_names_the_field():
    with pytest.raises(ll.ConfigError, match="^r:"):
        make_cfg(r=0)


def test_config_round_trips_through_json():
    cfg = make_cfg(center=True, alpha=8.0)
    back = ll.AdapterConfig.from_json(cfg.to_json())
    assert back == cfg and type(back) is type(cfg)
