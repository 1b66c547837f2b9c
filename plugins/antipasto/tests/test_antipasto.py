"""AntiPaSTO family (antipasto, antipasto_rot, antipasto_arrow): the invariants on fp32, 4bit and
8bit bases (with and without calibration data, rewritten and kept base), the math against an
explicit dense reference W_res + U C diag(S) Vh (PEFT has none of these methods), the residual
rebuilt at load after a data-driven re-selection, the Cayley rotation, the arrow block,
gradients at step 0, config validation."""
import warnings

import pytest
import torch
from lora_lite_antipasto import residual_error
from lora_lite_antipasto.antipasto_rot import cayley_blocks
from lora_lite_antipasto.basis import direction_scores

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

warnings.filterwarnings("ignore", message="MatMul8bitLt")

TARGETS = [r"q_proj$", r"v_proj$"]
R = 8
# tiny_llama: two layers, q_proj 64->64 and v_proj 64->32: 4 targets.
# (knobs, trainable tensors with their per-target sizes)
VARIANTS = {
    "antipasto": ({}, {"lora_g": R}),
    "antipasto_rot": ({"block_size": 4, "rotate_basis": "both"},
                      {"lora_delta_s": R, "lora_rot_T": 2 * 6, "lora_rot_T_u": 2 * 6}),
    "antipasto_arrow": ({"block": 2}, {"lora_M": 4, "lora_g": R - 2}),
}
FACTORS = ("lora_U", "lora_S", "lora_Vh")
MAKERS = {base: model_maker(base) for base in BASES}
# Identity at init, max |logit error| on make_batch() (logits of tiny_llama: |z| <= 0.56):
# fp32: W_res + U diag(S) Vh == W up to fp32 rounding of the subtraction; measured ~2.5e-7.
# 4bit: the requantized residual's nf4 error (Q(W_res) - W_res, up to ~11% of max|W| elementwise);
#       measured 3.1e-2..3.8e-2, vs 7.3e-2 for quantizing the fp32 model to nf4 at all.
# 8bit: int8 error of the residual (~0.4% of max|W|); measured 6.5e-3..7.6e-3, vs 6.2e-3 for
#       quantizing the fp32 model to int8.
# With rewrite_base=False the base is untouched and the hook adds exactly 0 at init: error 0.0.
IDENTITY_TOL = {"fp32": 1e-5, "4bit": 0.06, "8bit": 0.012}


def make_cfg(name, **kw):
    """Upstream's form (rewrite_base=True) unless a test says otherwise; the default is False."""
    knobs = VARIANTS[name][0]
    return ll.config(name, **{"r": R, "target_names": TARGETS, "rewrite_base": True, **knobs, **kw})


def calibration(n=2):
    """Batches with padding (make_batch left-pads the first row)."""
    return [make_batch(seed=10 + i, batch=2, seq=16, pad_first=5) for i in range(n)]


def target_weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if n.endswith(("q_proj", "v_proj"))}


def adapted_layers(model):
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "_lora_variant")]


def conformance(name, kind, calibration_data=None, exact_identity=False, **kw):
    """check_variant's figures on ``kind``, with this family's identity tolerance."""
    tol = 0.0 if exact_identity else IDENTITY_TOL[kind]
    m = check_variant(name, make_cfg(name, **kw), bases=[kind], calibration_data=calibration_data,
                      identity_tol=tol, reload_tol=1e-6)["bases"][kind]
    n_targets = 4
    trainable = VARIANTS[name][1]
    assert m["trainable"] == n_targets * sum(trainable.values())
    assert m["trained_delta"] > 1e-4
    assert m["detach_logits_err"] == 0.0
    # the file holds the factors and the trainable tensors, never a base weight
    suffixes = {k.rsplit(".", 1)[1] for k in m["file_keys"]}
    assert suffixes == set(FACTORS) | set(trainable)
    assert len(m["file_keys"]) == n_targets * len(suffixes)
    assert not any(k.endswith((".weight", ".bias")) for k in m["file_keys"])
    return m


def test_registered_through_entry_point():
    found = ll.variants()
    for name in VARIANTS:
        assert name in found
        assert ll.plugins.variant_origin(name).distribution == "lora-lite-antipasto"
        assert found[name].supports_quantized
        # the base is rewritten only with the opt-in rewrite_base=True
        assert not ll.rewrites_base(found[name], found[name].config())
        assert ll.rewrites_base(found[name], found[name].config(rewrite_base=True))
        assert not found[name].needs_calibration


@pytest.mark.parametrize("kind", ["fp32", "4bit", "8bit"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_conformance(name, kind):
    m = conformance(name, kind)
    assert m["base_changed"] is None  # the base weight is rewritten (restored at detach)


@pytest.mark.parametrize("name,kind", [("antipasto", "fp32"), ("antipasto", "4bit"),
                                       ("antipasto", "8bit"), ("antipasto_rot", "fp32"),
                                       ("antipasto_arrow", "4bit")])
def test_conformance_with_calibration(name, kind):
    conformance(name, kind, calibration_data=calibration())


@pytest.mark.parametrize("name,kind", [("antipasto", "4bit"), ("antipasto_rot", "8bit"),
                                       ("antipasto_arrow", "fp32")])
def test_conformance_base_kept(name, kind):
    conformance(name, kind, calibration_data=calibration(1), exact_identity=True,
                rewrite_base=False)


# -- the math against an explicit dense reference --------------------------------------------

def effective_weight(layer):
    """The (d_out, d_in) map the hooked layer computes (tiny_llama's projections have no bias)."""
    with torch.no_grad():
        return layer(torch.eye(layer.in_features)).T


def randomize(layer, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def reference_rotation(params, bs, max_angle):
    """Block-diagonal Cayley rotation built with an explicit inverse, block by block."""
    a = 2 * torch.tan(torch.tensor(max_angle / 2, dtype=torch.float64))
    blocks = []
    for row in params.double():
        T = torch.zeros(bs, bs, dtype=torch.float64)
        T[tuple(torch.triu_indices(bs, bs, 1))] = row
        K = a * torch.tanh(0.5 * (T - T.T) / a)
        eye = torch.eye(bs, dtype=torch.float64)
        blocks.append(torch.linalg.inv(eye - K / 2) @ (eye + K / 2))
    return torch.block_diag(*blocks)


def reference_core(layer, cfg):
    """U_eff C diag(S) Vh_eff of each variant, in fp64."""
    U, S, Vh = layer.lora_U.double(), layer.lora_S.double(), layer.lora_Vh.double()
    elu = torch.nn.functional.elu
    if cfg.variant == "antipasto":
        g = layer.lora_g.double().clamp(max=0) if cfg.suppress_only else layer.lora_g.double()
        return U @ torch.diag(S * (1 + elu(cfg.coeff * g))) @ Vh
    if cfg.variant == "antipasto_arrow":
        b = cfg.block
        g = layer.lora_g.double().clamp(max=0) if cfg.suppress_only else layer.lora_g.double()
        C = torch.block_diag(torch.eye(b, dtype=torch.float64) + cfg.coeff * layer.lora_M.double(),
                             torch.diag(1 + elu(cfg.coeff * g)))
        return U @ C @ torch.diag(S) @ Vh
    S_eff = torch.diag(S + layer.lora_delta_s.double())
    bs, angle = cfg.block_size, cfg.max_rotation_angle
    if cfg.rotate_basis in ("V", "both"):
        Vh = reference_rotation(layer.lora_rot_T, bs, angle) @ Vh
    if cfg.rotate_basis == "U":
        U = U @ reference_rotation(layer.lora_rot_T, bs, angle).T
    if cfg.rotate_basis == "both":
        U = U @ reference_rotation(layer.lora_rot_T_u, bs, angle).T
    return U @ S_eff @ Vh


MATH_CASES = [
    ("antipasto", {}), ("antipasto", {"suppress_only": True}), ("antipasto", {"coeff": -0.7}),
    ("antipasto_rot", {"rotate_basis": "V", "block_size": 4}),
    ("antipasto_rot", {"rotate_basis": "U", "block_size": 2}),
    ("antipasto_rot", {"rotate_basis": "both", "block_size": 8, "max_rotation_angle": 1.2}),
    ("antipasto_rot", {"rotate_basis": "none"}),
    ("antipasto_arrow", {"block": 3}), ("antipasto_arrow", {"block": 1, "suppress_only": True,
                                                            "coeff": 2.0}),
]


@pytest.mark.parametrize("rewrite_base", [True, False])
@pytest.mark.parametrize("name,knobs", MATH_CASES)
def test_matches_dense_reference(name, knobs, rewrite_base):
    model = tiny_llama()
    originals = {n: w.double() for n, w in target_weights(model).items()}
    cfg = make_cfg(name, rewrite_base=rewrite_base, **knobs)
    ll.attach(model, cfg)
    for n, layer in adapted_layers(model):
        W = originals[n]
        U, S, Vh = layer.lora_U.double(), layer.lora_S.double(), layer.lora_Vh.double()
        # the factors are the top-r SVD of the original weight
        torch.testing.assert_close(S, torch.linalg.svdvals(W)[:R], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(U.T @ W @ Vh.T, torch.diag(S), rtol=1e-4, atol=1e-5)
        residual = W - U @ torch.diag(S) @ Vh
        expected_base = residual if rewrite_base else W
        assert (layer.weight.double() - expected_base).abs().max() < 1e-6
        randomize(layer)
        expected = residual + reference_core(layer, cfg)
        torch.testing.assert_close(effective_weight(layer).double(), expected, rtol=1e-5, atol=1e-5)
        assert (expected - W).abs().max() > 1e-3  # the randomized adapter really moves W


def test_neutral_points_are_the_identity():
    """coeff = 0 (any g, M), and suppress_only with g > 0, give back W."""
    model = tiny_llama()
    originals = target_weights(model)
    ll.attach(model, make_cfg("antipasto_arrow", coeff=0.0))
    for n, layer in adapted_layers(model):
        randomize(layer)
        torch.testing.assert_close(effective_weight(layer), originals[n], rtol=0, atol=1e-5)
    ll.detach(model)
    ll.attach(model, make_cfg("antipasto", suppress_only=True))
    for n, layer in adapted_layers(model):
        with torch.no_grad():
            layer.lora_g.fill_(3.0)  # only attenuation allowed: positive g is clamped to 0
        torch.testing.assert_close(effective_weight(layer), originals[n], rtol=0, atol=1e-5)


def test_rotation_is_orthogonal():
    cfg = make_cfg("antipasto_rot", block_size=4, max_rotation_angle=0.5)
    params = torch.randn(5, 6, generator=torch.Generator().manual_seed(0)) * 5.0
    blocks = cayley_blocks(params, cfg).double()
    eye = torch.eye(4, dtype=torch.float64).expand_as(blocks)
    torch.testing.assert_close(blocks @ blocks.transpose(-1, -2), eye, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.linalg.det(blocks), torch.ones(5, dtype=torch.float64),
                               rtol=0, atol=1e-6)
    assert torch.equal(cayley_blocks(torch.zeros(3, 6), cfg), torch.eye(4).expand(3, 4, 4))
    # 2x2 blocks: the soft clamp bounds the rotation angle by max_rotation_angle
    cfg2 = make_cfg("antipasto_rot", block_size=2, max_rotation_angle=0.5)
    angles = torch.tensor([[-100.0], [-1.0], [0.3], [100.0]])
    R2 = cayley_blocks(angles, cfg2)
    theta = torch.atan2(R2[:, 1, 0], R2[:, 0, 0]).abs()
    assert (theta <= 0.5 + 1e-6).all() and theta[-1] > 0.49


def test_arrow_block_acts_on_the_top_directions_only():
    model = tiny_llama()
    b = 3
    ll.attach(model, make_cfg("antipasto_arrow", block=b, coeff=0.5))
    for _, layer in adapted_layers(model):
        W0 = effective_weight(layer).double()
        U, S, Vh = layer.lora_U.double(), layer.lora_S.double(), layer.lora_Vh.double()
        with torch.no_grad():
            layer.lora_M.copy_(torch.randn(b, b))
        dW = effective_weight(layer).double() - W0
        expected = U[:, :b] @ (0.5 * layer.lora_M.double()) @ torch.diag(S[:b]) @ Vh[:b]
        torch.testing.assert_close(dW, expected, rtol=1e-4, atol=1e-5)
        assert (dW @ Vh[b:].T).abs().max() < 1e-5      # tail input directions untouched
        assert (U[:, b:].T @ dW).abs().max() < 1e-5    # tail output directions untouched
        with torch.no_grad():
            layer.lora_M.zero_()
            layer.lora_g.copy_(torch.linspace(-1, 1, R - b))
        dW = effective_weight(layer).double() - W0
        assert (dW @ Vh[:b].T).abs().max() < 1e-5      # the block's directions untouched


@pytest.mark.parametrize("name,knobs", [
    ("antipasto", {}), ("antipasto", {"suppress_only": True}),
    ("antipasto_rot", {"rotate_basis": "V"}), ("antipasto_rot", {"rotate_basis": "U"}),
    ("antipasto_rot", {"rotate_basis": "both", "block_size": 2}),
    ("antipasto_arrow", {}), ("antipasto_arrow", {"rewrite_base": False}),
])
def test_gradients_are_alive_at_step_0(name, knobs):
    """Exact-zero inits (rot's delta_s included) still give every adapter element a gradient."""
    model = tiny_llama()
    ll.attach(model, make_cfg(name, **knobs))
    batch = make_batch()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    params = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    assert params and all(".lora_" in n for n in params)
    for n, p in params.items():
        assert p.grad is not None and (p.grad != 0).all(), n


# -- data-driven re-selection -----------------------------------------------------------------

def test_no_calibration_keeps_plain_top_r():
    model = tiny_llama()
    originals = target_weights(model)
    ll.attach(model, make_cfg("antipasto"), calibration_data=None)
    for n, layer in adapted_layers(model):
        U, S, Vh = torch.linalg.svd(originals[n], full_matrices=False)
        assert torch.equal(layer.lora_S, S[:R]) and torch.equal(layer.lora_Vh, Vh[:R])


@pytest.mark.parametrize("act_pool", ["rms", "mean_abs"])
def test_streamed_scores_match_all_rows_at_once(act_pool):
    """Scores accumulated batch by batch equal S_i * pool(x·v_i) over every non-padding row."""
    model = tiny_llama()
    cfg = make_cfg("antipasto", act_pool=act_pool)
    state = ll.attach(model, cfg)
    data = calibration(3)
    rows = {t.name: [] for t in state.targets}
    handles = []
    for t in state.targets:
        def grab(layer, args, name=t.name):
            rows[name].append(args[0].reshape(-1, args[0].shape[-1]))
        handles.append(t.layer.register_forward_pre_hook(grab))
    with torch.no_grad():
        for b in data:
            model(**b)
    for h in handles:
        h.remove()
    keep = torch.cat([b["attention_mask"].reshape(-1).bool() for b in data])
    scores = direction_scores(model, state.targets, cfg, data)
    for t in state.targets:
        X = torch.cat(rows[t.name])[keep]
        _, S, Vh = torch.linalg.svd(ll.base_dense_weight(t.layer), full_matrices=False)
        P = X @ Vh.T
        pool = P.square().mean(0).sqrt() if act_pool == "rms" else P.abs().mean(0)
        torch.testing.assert_close(scores[t.name][0], S * pool, rtol=1e-5, atol=1e-7)


def reselected_model(name="antipasto", **kw):
    """A model whose re-selected directions differ from the plain top-r on at least one target."""
    model = tiny_llama()
    originals = target_weights(model)
    ll.attach(model, make_cfg(name, **kw), calibration_data=calibration())
    changed = 0
    for n, layer in adapted_layers(model):
        S_all = torch.linalg.svdvals(originals[n])
        # stored in descending S; each kept S is a singular value of the original weight
        assert (layer.lora_S[:-1] >= layer.lora_S[1:]).all()
        assert all(torch.isclose(S_all, s, rtol=1e-6).any() for s in layer.lora_S)
        changed += not torch.allclose(layer.lora_S, S_all[:R])
    assert changed > 0, "calibration data did not change any selection: the test proves nothing"
    return model


def test_group_init_resets_stale_trainable_values():
    model = tiny_llama()
    cfg = make_cfg("antipasto_rot", rotate_basis="both")
    state = ll.attach(model, cfg)
    for _, layer in adapted_layers(model):
        randomize(layer)
    state.variant.group_init(model, state.targets, cfg, calibration())
    for _, layer in adapted_layers(model):
        trainable = [(n, p) for n, p in layer.named_parameters() if n.startswith("lora_")]
        assert len(trainable) == 3  # delta_s, rot_T, rot_T_u
        for n, p in trainable:
            assert torch.equal(p, torch.zeros_like(p)), n
    # and the re-selected model is the identity again
    reference = logits(tiny_llama(), make_batch())
    assert (logits(model, make_batch()) - reference).abs().max() < IDENTITY_TOL["fp32"]


@pytest.mark.parametrize("name", ["antipasto", "antipasto_arrow"])
def test_after_load_rebuilds_the_residual_of_reselected_directions(name, tmp_path):
    model = reselected_model(name)
    for i, (_, layer) in enumerate(adapted_layers(model)):
        randomize(layer, scale=0.1, seed=i)
    batch = make_batch()
    trained = logits(model, batch)
    path = tmp_path / "adapter.safetensors"
    ll.save(model, path)

    plain = tiny_llama()           # what init alone gives on a fresh base: the plain top-r crop
    ll.attach(plain, make_cfg(name))
    fresh = tiny_llama()
    ll.load(fresh, path)
    assert (logits(fresh, batch) - trained).abs().max() < 1e-6
    differs = 0
    for (_, ours), (_, theirs), (_, crop) in zip(adapted_layers(model), adapted_layers(fresh),
                                                 adapted_layers(plain), strict=True):
        for t in FACTORS:
            assert torch.equal(getattr(ours, t), getattr(theirs, t))
        assert torch.equal(theirs.weight, ours.weight)  # the residual, rebuilt bit for bit
        differs += not torch.equal(theirs.weight, crop.weight)
    assert differs > 0  # without after_load the fresh base would keep the plain crop's residual


def test_after_load_on_4bit_base_after_reselection(tmp_path):
    model = quantize(tiny_llama(), "4bit")
    ll.attach(model, make_cfg("antipasto"), calibration_data=calibration())
    for i, (_, layer) in enumerate(adapted_layers(model)):
        randomize(layer, scale=0.1, seed=i)
    batch = make_batch()
    trained = logits(model, batch)
    ll.save(model, tmp_path / "a.safetensors")
    fresh = quantize(tiny_llama(), "4bit")
    ll.load(fresh, tmp_path / "a.safetensors")
    assert (logits(fresh, batch) - trained).abs().max() < 1e-6
    for (_, ours), (_, theirs) in zip(adapted_layers(model), adapted_layers(fresh), strict=True):
        assert torch.equal(ll.dense_weight(theirs), ll.dense_weight(ours))
        assert residual_error(theirs) < 0.15  # nf4 error of the residual, relative to max|W|


def test_residual_error_figures():
    """fp32: rounding only. Quantized: the requantization error, ~0 when the base is kept."""
    for kind, low, high in [("fp32", 0.0, 1e-6), ("4bit", 0.01, 0.15), ("8bit", 1e-4, 0.01)]:
        for rewrite in (True, False):
            model = MAKERS[kind]()
            ll.attach(model, make_cfg("antipasto", rewrite_base=rewrite))
            errs = [residual_error(layer) for _, layer in adapted_layers(model)]
            if rewrite:
                assert low <= max(errs) <= high, (kind, errs)
            else:
                assert max(errs) == 0.0


# -- config validation --------------------------------------------------------------------------

@pytest.mark.parametrize("name,kw,field", [
    ("antipasto", {"r": 0}, "r"),
    ("antipasto", {"act_pool": "max"}, "act_pool"),
    ("antipasto", {"coeff": float("nan")}, "coeff"),
    ("antipasto", {"coeff": "1"}, "coeff"),
    ("antipasto", {"suppress_only": 1}, "suppress_only"),
    ("antipasto", {"rewrite_base": "no"}, "rewrite_base"),
    ("antipasto_rot", {"block_size": 3}, "block_size"),       # does not divide r = 8
    ("antipasto_rot", {"block_size": 1}, "block_size"),
    ("antipasto_rot", {"block_size": 16}, "block_size"),
    ("antipasto_rot", {"rotate_basis": "v"}, "rotate_basis"),
    ("antipasto_rot", {"max_rotation_angle": 3.2}, "max_rotation_angle"),
    ("antipasto_rot", {"max_rotation_angle": 0}, "max_rotation_angle"),
    ("antipasto_rot", {"act_pool": "l2"}, "act_pool"),
    ("antipasto_arrow", {"block": 0}, "block"),
    ("antipasto_arrow", {"block": 8}, "block"),              # must be < r = 8
    ("antipasto_arrow", {"block": 2.0}, "block"),
])
def test_bad_config_names_the_field(name, kw, field):
    with pytest.raises(ll.ConfigError, match=rf"^{field}:"):
        make_cfg(name, **kw)


def test_rotate_basis_none_ignores_block_size():
    cfg = make_cfg("antipasto_rot", rotate_basis="none", block_size=3)
    assert cfg.block_size == 3
    specs = ll.get_variant("antipasto_rot").param_specs(64, 32, cfg)
    assert set(specs) == set(FACTORS) | {"lora_delta_s"}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_rank_larger_than_a_target_is_refused_at_attach(name):
    """v_proj is 64->32: r = 48 fits q_proj but not v_proj; attach refuses, model untouched."""
    assert ll.config(name, target_names=TARGETS).r == 128  # the default: fits models >= 128 wide
    model = tiny_llama()
    before = snapshot_state(model)
    cfg = ll.config(name, r=48, target_names=TARGETS, **({"block": 2} if name == "antipasto_arrow" else {}))
    with pytest.raises(ll.ConfigError, match=r"^r: got 48, expected at most min\(d_in, d_out\) = 32"):
        ll.attach(model, cfg)
    assert state_equal(snapshot_state(model), before)
    assert ll.attached(model) is None and not adapted_layers(model)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_bf16_adapter_dtype(name):
    """bf16 factors: the top-r part is computed in bf16 when the base is rewritten (identity within
    bf16 rounding, measured 1.2e-3..1.5e-3); only the (zero) change when the base is kept."""
    batch = make_batch()
    reference = logits(tiny_llama(), batch)
    for rewrite, tol in ((True, 5e-3), (False, 0.0)):
        model = tiny_llama()
        ll.attach(model, make_cfg(name, dtype=torch.bfloat16, rewrite_base=rewrite))
        assert (logits(model, batch) - reference).abs().max() <= tol
        model(**batch, labels=batch["input_ids"]).loss.backward()
        assert all(p.grad is not None and p.grad.any() for p in ll.trainable_parameters(model))
