"""antipasto_corda, antipasto_asvd, antipasto_ablate, antipasto_dplr: invariants on fp32, 4bit and
8bit bases (the kept base, the default, is exact at init), calibration required where the basis
comes from data, the oriented bases against independent formulas (CorDA's Cholesky form, ASVD's
column scaling), each forward and merged_weight against a dense reference, the ablation core a
contraction, rewrite_base=True round trips, config validation."""
import warnings

import pytest
import torch

import lora_lite as ll
from lora_lite.testing import check_variant, logits, make_batch, measure_invariants, quantize, tiny_llama

warnings.filterwarnings("ignore", message="MatMul8bitLt")

TARGETS = [r"q_proj$", r"v_proj$"]
R = 8
MAKERS = {"fp32": tiny_llama, "4bit": lambda: quantize(tiny_llama(), "4bit"),
          "8bit": lambda: quantize(tiny_llama(), "8bit")}
# (knobs, calibrated, trainable numbers per target)
VARIANTS = {
    "antipasto_corda": ({}, True, R),
    "antipasto_asvd": ({}, True, R),
    "antipasto_dplr": ({"lora_rank": 2}, False, R + 2 * 2 * R),
    "antipasto_ablate": ({"k": 2}, False, 2 * R + 2),   # init_alpha 0.05: not the identity
}


def make_cfg(name, **kw):
    return ll.config(name, **{"r": R, "target_names": TARGETS, **VARIANTS[name][0], **kw})


def calibration(n=2):
    return [make_batch(seed=10 + i, batch=2, seq=16, pad_first=5) for i in range(n)]


def randomize(model, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ll.trainable_parameters(model):
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kind", list(MAKERS))
@pytest.mark.parametrize("name", list(VARIANTS))
def test_invariants(name, kind):
    knobs, calibrated, per_target = VARIANTS[name]
    ablate = name == "antipasto_ablate"             # deliberately not the identity at init
    out = check_variant(name, make_cfg(name), bases=[kind], identity_tol=0.05 if ablate else 0.0,
                        reload_tol=0.0, calibration_data=calibration() if calibrated else None,
                        merge=kind == "fp32")
    m = out["bases"][kind]
    if ablate:
        assert 0 < m["identity_err"] < 0.05
        check = measure_invariants(MAKERS[kind], make_cfg(name, init_alpha=0.0), make_batch())
        assert check["identity_err"] == 0.0         # init_alpha = 0: the exact identity
    else:
        assert m["identity_err"] == 0.0             # rewrite_base=False: the hook adds exactly 0
    assert m["trainable"] == 4 * per_target
    assert m["trained_delta"] > 1e-3 and m["detach_logits_err"] == 0.0


@pytest.mark.parametrize("name", ["antipasto_corda", "antipasto_asvd"])
def test_calibration_is_required(name):
    model = tiny_llama()
    with pytest.raises(ValueError, match="calibration_data"):
        ll.attach(model, make_cfg(name))
    assert ll.attached(model) is None
    with pytest.raises(ValueError, match="fewer than r"):
        ll.attach(model, make_cfg(name), calibration_data=[make_batch(batch=1, seq=4, pad_first=0)])
    assert ll.attached(model) is None


def captured_inputs(model, batches):
    """Every target's non-padding input rows, all at once (the reference for the moments)."""
    rows = {}
    ll.stream_inputs(model, ll.find_targets(model, make_cfg("antipasto_corda")), batches,
                     lambda t, x: rows.setdefault(t.name, []).append(x))
    return {k: torch.cat(v) for k, v in rows.items()}


@pytest.mark.parametrize("name", ["antipasto_corda", "antipasto_asvd"])
def test_oriented_basis_matches_independent_formula(name):
    model, data = tiny_llama(), calibration()
    rows = captured_inputs(model, data)
    ll.attach(model, make_cfg(name), calibration_data=data)
    for t in ll.attached(model).targets:
        X, W, eps = rows[t.name].double(), t.layer.weight.double(), 1e-3
        C = X.T @ X / X.shape[0]
        if name == "antipasto_corda":      # PEFT's Cholesky form: SVD(W L), P = Vh L⁻¹
            L = torch.linalg.cholesky(C + eps * torch.eye(C.shape[0], dtype=C.dtype))
            U, S, Vh = torch.linalg.svd(W @ L, full_matrices=False)
            P = torch.linalg.solve_triangular(L, Vh[:R], upper=False, left=False)
        else:                               # column scaling by sqrt(E[x_j²])
            c = C.diagonal() + eps
            U, S, Vh = torch.linalg.svd(W * c.sqrt(), full_matrices=False)
            P = Vh[:R] / c.sqrt()
        want = (U[:, :R] * S[:R]) @ P                                  # the rank-r part of W
        got = (t.layer.lora_U.double() * t.layer.lora_S.double()) @ t.layer.lora_P.double()
        assert (got - want).abs().max() < 1e-4 * want.abs().max()
        assert (t.layer.lora_S.double() - S[:R]).abs().max() < 1e-4 * S[0]


def dense_core(layer, cfg, name):
    """The adapted layer's effective weight from the explicit formula (fp32)."""
    W = layer.weight.float()
    g = layer.lora_g.float() if hasattr(layer, "lora_g") else None
    phi_minus_1 = torch.nn.functional.elu(cfg.coeff * g) if g is not None else None
    if name in ("antipasto_corda", "antipasto_asvd"):
        return W + layer.lora_U @ torch.diag(layer.lora_S * phi_minus_1) @ layer.lora_P
    base = torch.diag(layer.lora_S) @ layer.lora_Vh                    # S Vh
    if name == "antipasto_dplr":
        core = torch.diag(phi_minus_1 * layer.lora_S) + cfg.coeff * (layer.lora_B @ layer.lora_A).T
        return W + layer.lora_U @ core.T @ layer.lora_Vh
    Q = torch.linalg.qr(layer.lora_c.float(), mode="reduced").Q
    a = layer.lora_alpha.clamp(0, 1)
    return W - cfg.coeff * layer.lora_U @ (Q @ torch.diag(a) @ Q.T) @ base


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_and_merged_weight_match_dense_reference(name):
    model = tiny_llama()
    calibrated = VARIANTS[name][1]
    ll.attach(model, make_cfg(name), calibration_data=calibration() if calibrated else None)
    randomize(model)
    with torch.no_grad():
        for t in ll.attached(model).targets:
            layer, cfg = t.layer, t.layer._lora_cfg
            x = torch.randn(5, layer.in_features)
            want = x @ dense_core(layer, cfg, name).T
            assert (layer(x) - want).abs().max() < 1e-4
            W, b = ll.get_variant(name).merged_weight(layer, cfg)
            assert b is None and (x @ W.T - want).abs().max() < 1e-4


@pytest.mark.parametrize("name", list(VARIANTS))
def test_rewrite_base_opt_in(name):
    """rewrite_base=True: identity up to the residual's rounding, same function as the kept
    base once trained values are copied over, detach restores W."""
    calibrated = VARIANTS[name][1]
    data = calibration() if calibrated else None
    kept, rewritten = tiny_llama(), tiny_llama()
    before = rewritten.model.layers[0].self_attn.q_proj.weight.clone()
    batch = make_batch()
    ll.attach(kept, make_cfg(name), calibration_data=data)
    ll.attach(rewritten, make_cfg(name, rewrite_base=True), calibration_data=data)
    assert (logits(rewritten, batch) - logits(kept, batch)).abs().max() < 1e-5   # same at init
    randomize(kept)
    with torch.no_grad():
        for a, b in zip(ll.trainable_parameters(kept), ll.trainable_parameters(rewritten), strict=True):
            b.copy_(a)
    assert (logits(rewritten, batch) - logits(kept, batch)).abs().max() < 1e-4
    ll.detach(rewritten)
    assert torch.equal(rewritten.model.layers[0].self_attn.q_proj.weight, before)


def test_ablate_default_is_a_deliberate_small_contraction():
    model = tiny_llama()
    batch = make_batch()
    ref = logits(model, batch)
    ll.attach(model, make_cfg("antipasto_ablate", init_alpha=0.05, k=1))
    assert 0 < (logits(model, batch) - ref).abs().max() < 0.05        # not identity, by design
    layer = ll.attached(model).targets[0].layer
    randomize(model, scale=2.0)
    with torch.no_grad():
        from lora_lite_antipasto.antipasto_ablate import orthonormal
        C, a = orthonormal(layer.lora_c), layer.lora_alpha.clamp(0, 1)
        eig = torch.linalg.eigvalsh(torch.eye(R) - (C * a) @ C.T)
    assert eig.min() >= -1e-6 and eig.max() <= 1 + 1e-6


def test_dplr_group_init_reselects_and_stays_identity():
    model = tiny_llama()
    batch = make_batch()
    ref = logits(model, batch)
    ll.attach(model, make_cfg("antipasto_dplr"), calibration_data=calibration())
    assert torch.equal(logits(model, batch), ref)


@pytest.mark.parametrize("name, field, value", [
    ("antipasto_corda", "cov_eps", 0.0), ("antipasto_asvd", "cov_eps", "x"),
    ("antipasto_dplr", "lora_rank", 0), ("antipasto_dplr", "lora_rank", R + 1),
    ("antipasto_ablate", "k", 0), ("antipasto_ablate", "init_alpha", 1.5),
    ("antipasto_ablate", "cov_orient", "yes"),
])
def test_config_validation(name, field, value):
    with pytest.raises(ll.ConfigError, match=field):
        make_cfg(name, **{field: value})
