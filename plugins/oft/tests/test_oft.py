"""OFT and BOFT: invariants (fp32, 4bit, 8bit), PEFT parity both ways (PEFT-written adapters
load into lora-lite and reproduce PEFT's logits; lora-lite's tensors load into PEFT), gradients,
merged_weight, the butterfly's permutations as views (= PEFT's permutation), its fused and
factor-by-factor paths, never a d_in × d_in matrix in the hook, config validation."""
import copy
import warnings

import lora_lite_oft.boft as boft_module
import pytest
import torch
from lora_lite_oft.rotations import rotate_blocks

import lora_lite as ll
from lora_lite.testing import check_variant, logits, make_batch, quantize, tiny_llama

warnings.filterwarnings("ignore", message="MatMul8bitLt")

TARGETS = [r"q_proj$", r"v_proj$"]          # tiny_llama: d_in 64 for both
PEFT_TARGETS = ["q_proj", "v_proj"]
MAKERS = {
    "fp32": tiny_llama,
    "4bit": lambda: quantize(tiny_llama(), "4bit"),
    "8bit": lambda: quantize(tiny_llama(), "8bit"),
}
OFT_CASES = {
    "default": {},
    "exact": {"use_cayley_neumann": False},
    "share": {"block_share": True},
    "coft": {"coft": True, "eps": 0.5},
    "blocks": {"block_size": 0, "blocks": 4},
}
BOFT_CASES = {"m1": {"block_size": 8}, "m2": {"block_size": 4, "n_butterfly_factor": 2},
              "m3": {"block_num": 8, "block_size": 0, "n_butterfly_factor": 3}}


def oft_cfg(**kw):
    return ll.config("oft", **{"block_size": 16, "target_names": TARGETS, **kw})


def boft_cfg(**kw):
    return ll.config("boft", **{"block_size": 4, "n_butterfly_factor": 2, "target_names": TARGETS, **kw})


class FakeFastBlockDiag:
    """Stands in for PEFT's CUDA block-diagonal extension so PEFT runs m > 1 butterfly factors
    on CPU (without it PEFT silently forces boft_n_butterfly_factor = 1)."""

    @staticmethod
    def forward(blocks):                     # (N, D, b, b) -> [(N, D·b, D·b)]
        return [torch.stack([torch.block_diag(*torch.unbind(f)) for f in blocks])]

    @staticmethod
    def backward(grad, blocks):
        n, d, b, _ = blocks.shape
        g = torch.stack([torch.stack([grad[i, j * b:(j + 1) * b, j * b:(j + 1) * b]
                                      for j in range(d)]) for i in range(n)])
        return [g]


@pytest.fixture(params=["fused", "factors"])
def butterfly_path(request, monkeypatch):
    """Run the test on both of BOFT's paths: M's fused blocks, and the factors one by one."""
    if request.param == "factors":
        monkeypatch.setattr(boft_module, "FUSE_MAX_BLOCK", 0)
    return request.param


@pytest.fixture
def peft_butterfly(monkeypatch):
    import peft.tuners.boft.layer as boft_layer
    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: FakeFastBlockDiag)


def peft_model(base, variant, cfg):
    """A PEFT model built from the variant's own peft_config, with random (non-identity) values."""
    import peft
    d = ll.get_variant(variant).peft_config(cfg, PEFT_TARGETS)
    d = {**d, "init_weights": False}
    model = peft.get_peft_model(copy.deepcopy(base), peft.get_peft_config(d))
    if variant == "oft":     # PEFT's init_weights=False std 0.1 would be too far for Neumann
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "oft_R" in n:
                    p.mul_(0.3)
    return model.eval()


def import_peft(base, theirs, folder):
    """lora-lite model loaded from the folder PEFT saved (ll.load: from_peft, load_peft_state)."""
    theirs.save_pretrained(folder)
    ours = copy.deepcopy(base)
    ll.load(ours, str(folder))
    return ours.eval()


def test_registered_through_entry_point():
    found = ll.variants()
    assert {"oft", "boft"} <= set(found)
    assert ll.hook_kind(found["oft"]) == "input" and ll.hook_kind(found["boft"]) == "input+output"
    assert ll.plugins.variant_origin("boft").distribution == "lora-lite-oft"


@pytest.mark.parametrize("kind", list(MAKERS))
@pytest.mark.parametrize("variant", ["oft", "boft"])
def test_conformance(variant, kind, peft_butterfly):
    """The conformance kit on each base (on fp32 also PEFT parity and merge exactness)."""
    cfg = oft_cfg() if variant == "oft" else boft_cfg()
    out = check_variant(variant, cfg, bases=[kind], identity_tol=0.0, reload_tol=0.0,
                        peft=kind == "fp32", merge=kind == "fp32")
    m = out["bases"][kind]
    assert m["identity_err"] == 0.0 and m["detach_logits_err"] == 0.0   # R = I, s = 1 exactly
    if kind == "fp32":
        assert out["peft_parity"] < 1e-5 and out["merge_err"] < 1e-5


@pytest.mark.parametrize("case", list(OFT_CASES))
def test_oft_peft_adapter_reproduces(case, tmp_path):
    base = tiny_llama()
    theirs = peft_model(base, "oft", oft_cfg(**OFT_CASES[case]))
    ours = import_peft(base, theirs, tmp_path)
    batch = make_batch()
    want = logits(theirs, batch)
    assert (want - logits(base, batch)).abs().max() > 1e-2     # a real rotation
    assert (logits(ours, batch) - want).abs().max() < 1e-5


@pytest.mark.parametrize("case", list(BOFT_CASES))
def test_boft_peft_adapter_reproduces(case, peft_butterfly, butterfly_path, tmp_path):
    base = tiny_llama()
    theirs = peft_model(base, "boft", boft_cfg(**BOFT_CASES[case]))
    ours = import_peft(base, theirs, tmp_path)
    batch = make_batch()
    want = logits(theirs, batch)
    assert (want - logits(base, batch)).abs().max() > 1e-2
    assert (logits(ours, batch) - want).abs().max() < 1e-5


def test_a_peft_boft_folder_saying_two_factors_with_one_factor_tensors_loads(tmp_path):
    """PEFT without its CUDA extension (here: CPU, no fake) runs m = 1 whatever the config says
    and saves boft_n_butterfly_factor=2 with (1, D, b, b) tensors; its own loader, on the same
    machine, follows them. So does lora-lite's import (m read from the tensors)."""
    base = tiny_llama()
    with pytest.warns(UserWarning, match="boft_n_butterfly_factor to 1"):
        theirs = peft_model(base, "boft", boft_cfg(block_size=4, n_butterfly_factor=2))
    assert not any(getattr(m, "fbd_cuda_available", False) for m in theirs.modules())
    theirs.save_pretrained(tmp_path)
    import json
    assert json.loads((tmp_path / "adapter_config.json").read_text())["boft_n_butterfly_factor"] == 2
    from safetensors.torch import load_file
    assert {tuple(t.shape) for k, t in load_file(tmp_path / "adapter_model.safetensors").items()
            if k.endswith("boft_R")} == {(1, 16, 4, 4)}
    ours = copy.deepcopy(base)
    with pytest.warns(UserWarning, match="one butterfly factor"):
        ll.load(ours, str(tmp_path))
    assert ll.attached(ours).cfg.n_butterfly_factor == 1
    batch = make_batch()
    want = logits(theirs, batch)
    assert (want - logits(base, batch)).abs().max() > 1e-2
    assert (logits(ours.eval(), batch) - want).abs().max() < 1e-5


def test_a_peft_boft_folder_whose_tensors_fit_no_factor_count_is_refused(tmp_path):
    """Tensors of m = 3 under a config of m = 2: no PEFT build writes that; refused in one line."""
    base = tiny_llama()
    with pytest.warns(UserWarning):
        theirs = peft_model(base, "boft", boft_cfg(block_size=4, n_butterfly_factor=2))
    theirs.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file
    path = tmp_path / "adapter_model.safetensors"
    tensors = {k: (t.repeat(3, 1, 1, 1) if k.endswith("boft_R") else t)
               for k, t in load_file(path).items()}
    save_file(tensors, path)
    ours = copy.deepcopy(base)
    with pytest.raises(ll.AdapterFileError, match="boft_R has shape") as e:
        ll.load(ours, str(tmp_path))
    assert "\n" not in str(e.value) and ll.attached(ours) is None


@pytest.mark.parametrize("variant", ["oft", "boft"])
def test_export_to_peft_and_gradients(variant, peft_butterfly, tmp_path):
    """lora-lite's trained adapter, exported with ll.export_peft and loaded by PEFT, gives
    PEFT's logits; and both give the same gradients."""
    from peft import PeftModel
    base = tiny_llama()
    cfg = oft_cfg() if variant == "oft" else boft_cfg()
    ours = copy.deepcopy(base)
    ll.attach(ours, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in ll.adapter_tensors(ours).values():
            t.add_(0.05 * torch.randn(t.shape, generator=g))
    ll.export_peft(ours, str(tmp_path))
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path), is_trainable=True).eval()
    batch = make_batch()
    assert (logits(ours, batch) - logits(base, batch)).abs().max() > 1e-2
    assert (logits(ours, batch) - logits(theirs, batch)).abs().max() < 1e-5
    for model in (ours, theirs):
        model(**batch, labels=batch["input_ids"]).loss.backward()
    mine = [p.grad for p in ll.trainable_parameters(ours)]
    peft_grads = [p.grad for n, p in theirs.named_parameters() if p.requires_grad]
    assert len(mine) == len(peft_grads)
    for a, b in zip(mine, peft_grads, strict=True):
        assert (a.reshape(-1) - b.reshape(-1)).abs().max() <= 1e-5 * b.abs().max() + 1e-9


@pytest.mark.parametrize("variant", ["oft", "boft"])
def test_merged_weight_matches_forward(variant):
    model = tiny_llama()
    cfg = oft_cfg() if variant == "oft" else boft_cfg()
    ll.attach(model, cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for t in ll.adapter_tensors(model).values():
            t.add_(0.1 * torch.randn(t.shape, generator=g))
    layer = ll.attached(model).targets[0].layer
    layer.bias = torch.nn.Parameter(torch.randn(layer.out_features))
    x = torch.randn(5, layer.in_features)
    W, b = ll.get_variant(variant).merged_weight(layer, cfg)
    with torch.no_grad():
        assert b is None and (layer(x) - (x @ W.T + layer.bias)).abs().max() < 1e-5


@pytest.mark.parametrize("variant", ["oft", "boft"])
def test_forward_builds_no_square_matrix(variant, butterfly_path):
    """No tensor the size of a d_in × d_in matrix is made in the hook, on either BOFT path (PEFT's
    BOFT makes several on every call). The policy: fused blocks K ≤ d_in / 2."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sizes(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Sizes.largest = max(Sizes.largest, t.numel())
            return out
    if variant == "oft" and butterfly_path == "factors":
        pytest.skip("OFT has one path")
    model = tiny_llama()
    cfg = oft_cfg() if variant == "oft" else boft_cfg(block_size=4, n_butterfly_factor=3)
    ll.attach(model, cfg)
    layer = ll.attached(model).targets[0].layer
    x = torch.randn(3, layer.in_features, requires_grad=True)
    with Sizes():   # the hook's own work, forward and backward (the base's W is d_out × d_in)
        ll.get_variant(variant).forward_input(layer, x, layer._lora_cfg).sum().backward()
    assert 0 < Sizes.largest < layer.in_features ** 2


@pytest.mark.parametrize("d_in, b, m", [(64, 4, 2), (64, 8, 3), (64, 2, 5), (96, 4, 3), (128, 2, 7)])
def test_butterfly_factor_view_is_peft_permutation(d_in, b, m):
    """apply_factor's view (x as (G, 2, 2^i, b/2)) is x P_i B_i P_iᵀ with PEFT's own
    block_butterfly_perm as gathers, for every factor i; the fused path equals the factors."""
    from peft.tuners.boft.layer import BOFTLayer
    n_blocks = d_in // b
    blocks = boft_module.cayley_blocks(0.3 * torch.randn(m, n_blocks, b, b))
    x = torch.randn(2, 3, d_in)
    for i in range(m):
        perm = BOFTLayer.block_butterfly_perm(None, d_in, n_blocks // 2 ** i, b // 2, m - 1)
        want = rotate_blocks(x[..., torch.argsort(perm)], blocks[i])[..., perm]
        assert torch.equal(boft_module.apply_factor(x, blocks[i], 2 ** i), want)
    k = boft_module.fused_block_size(d_in, m, b)
    if k:
        fused = boft_module.rotate_blocks(x, boft_module.fused_blocks(blocks, d_in, k))
        assert (fused - boft_module.apply_factors(x, blocks)).abs().max() < 1e-5


def test_fused_block_size_policy():
    """K = b·2^(m−1) grouped up to ≥ 32 while d_in keeps two blocks; 0 (factors one by one)
    when the product's blocks would pass FUSE_MAX_BLOCK or half of d_in."""
    size = boft_module.fused_block_size
    assert size(1024, 2, 4) == 32 and size(1024, 1, 64) == 64 and size(1024, 3, 4) == 32
    assert size(64, 2, 4) == 32 and size(32, 2, 4) == 16 and size(48, 1, 8) == 16
    assert size(1024, 2, 64) == 0 and size(1024, 4, 16) == 0 and size(16, 2, 8) == 0


def test_layout_errors_are_clear():
    model = tiny_llama()
    with pytest.raises(ValueError, match="not divisible by block_size=24"):
        ll.attach(model, oft_cfg(block_size=24))
    with pytest.raises(ValueError, match="n_butterfly_factor=6"):
        ll.attach(model, boft_cfg(block_size=4, n_butterfly_factor=6))
    assert ll.attached(model) is None


@pytest.mark.parametrize("make, field, value", [
    (oft_cfg, "block_size", 0), (oft_cfg, "module_dropout", 1.5), (oft_cfg, "coft", "yes"),
    (oft_cfg, "eps", -1.0), (boft_cfg, "n_butterfly_factor", 0), (boft_cfg, "dropout", -0.1),
    (boft_cfg, "block_size", 0),
])
def test_config_validation(make, field, value):
    with pytest.raises(ll.ConfigError, match=field):
        make(**{field: value})
