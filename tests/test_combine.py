"""ll.combine against PEFT's add_weighted_adapter with the same adapters, weights and seed."""
import pytest
import torch
from lltest import lora_cfg
from test_multi_adapter import _adapters

import lora_lite as ll
from lora_lite.testing import logits, snapshot_state, state_equal


def _peft_config(model, name):
    """PEFT's LoraConfig of the attached LoRA ``name``: its exact layers, r / alpha per layer."""
    import peft
    cfg, targets = ll.attached(model, name).cfg, [t.name for t in ll.attached(model, name).targets]
    per = {t: cfg.for_target(t) for t in targets}
    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=targets,
                           rank_pattern={t: c.r for t, c in per.items() if c.r != cfg.r},
                           alpha_pattern={t: c.alpha for t, c in per.items() if c.alpha != cfg.alpha})


def _peft_twin(model, names):
    """A PEFT model on a copy of the base holding the same LoRA adapters under the same names."""
    import peft
    base = type(model)(model.config)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
    twin = peft.get_peft_model(base, _peft_config(model, names[0]), adapter_name=names[0])
    for n in names[1:]:
        twin.add_adapter(n, _peft_config(model, n))
    with torch.no_grad():
        for n in names:
            for t in ll.attached(model, n).targets:
                layer = twin.base_model.model.get_submodule(t.name)
                layer.lora_A[n].weight.copy_(getattr(t.layer, f"lora_A__{n}"))
                layer.lora_B[n].weight.copy_(getattr(t.layer, f"lora_B__{n}"))
    return twin


def _seed_peft_pruning(monkeypatch, seed):
    """PEFT's DARE draws its masks from the global generator, after add_weighted_adapter has
    initialised the new adapter from it: reseed it at PEFT's first mask, so both draw the same."""
    from peft.utils import merge_utils
    original, calls = merge_utils.random_pruning, []

    def seeded(tensor, density, rescale):
        if not calls:
            torch.manual_seed(seed)
        calls.append(1)
        return original(tensor, density, rescale)
    monkeypatch.setattr(merge_utils, "random_pruning", seeded)


@pytest.mark.parametrize("how, extra", [
    ("linear", {}), ("cat", {}), ("svd", {"rank": 6}), ("ties", {"density": 0.5}),
    ("dare_linear", {"density": 0.5}), ("dare_ties", {"density": 0.6}),
    ("magnitude_prune", {"density": 0.5}),
])
def test_combine_matches_peft_add_weighted_adapter(model, batch, how, extra, monkeypatch):
    _adapters(model, ("a", "b"))
    twin = _peft_twin(model, ["a", "b"])
    report = ll.combine(model, ["a", "b"], [1.0, 0.5], how=how, name="c", seed=7, **extra)
    _seed_peft_pruning(monkeypatch, 7)
    twin.add_weighted_adapter(["a", "b"], [1.0, 0.5], "c", combination_type=how,
                              svd_rank=extra.get("rank"), density=extra.get("density"))
    twin.set_adapter("c")
    with ll.using(model, "c"):
        ours = logits(model, batch)
    assert (ours - logits(twin, batch)).abs().max() < 1e-5
    assert report["variant"] == ll.attached(model, "c").cfg.variant
    if how == "svd":
        assert set(report["layers"]) == {t.name for t in ll.attached(model, "a").targets}
        assert all(0 <= v["relative_error"] < 1 for v in report["layers"].values())


def test_svd_combines_any_mergeable_variants_and_saves(model, batch, tmp_path):
    ll.attach(model, ll.config("dora", r=4, target_names=[r"q_proj$", r"v_proj$"], target_roles=()),
              name="d")
    _adapters(model, ("a",))
    with torch.no_grad():
        for p in ll.trainable_parameters(model, name="d"):
            p.add_(0.05)
    report = ll.combine(model, ["d", "a"], [0.5, 0.5], how="svd", rank=8, name="c")
    assert report["rank"] == 8 and max(v["relative_error"] for v in report["layers"].values()) < 1
    ll.save(model, tmp_path / "c.safetensors", name="c")
    assert ll.read_header(tmp_path / "c.safetensors")[0]["variant"] == report["variant"]


@pytest.mark.parametrize("kw, match", [
    (dict(names=["a", "zz"], weights=[1, 1]), "no adapter named 'zz'"),
    (dict(names=["a", "a"], weights=[1, 1]), "distinct"),
    (dict(names=["a", "b"], weights=[1, float("inf")]), "finite"),
    (dict(names=["a", "b"], weights=[1]), "one finite weight per adapter"),
    (dict(names=["a", "b"], weights=[1, 1], how="nosuch"), "choose one of"),
    (dict(names=["a", "b"], weights=[1, 1], how="ties"), "needs density"),
    (dict(names=["a", "b"], weights=[1, 1], name="a"), "already has an adapter named 'a'"),
    (dict(names=["a", "r2"], weights=[1, 1], how="linear"), "one rank"),
    (dict(names=["a", "o"], weights=[1, 1], how="linear"), "has no low-rank factors"),
])
def test_bad_combinations_are_refused_with_the_model_unchanged(model, batch, kw, match):
    _adapters(model, ("a", "b"))
    ll.attach(model, lora_cfg(r=2), name="r2")
    ll.attach(model, ll.config("ia3", target_names=[r"q_proj$", r"v_proj$"], target_roles=()), name="o")
    ll.attach(model, lora_cfg(target_names=[r"q_proj$"]), name="q")
    before, names = snapshot_state(model), ll.adapter_names(model)
    with pytest.raises((ll.LoraLiteError, ValueError)) as e:
        ll.combine(model, **{"how": "svd", **kw})
    assert e.match(match) and "\n" not in str(e.value)
    assert state_equal(snapshot_state(model), before) and ll.adapter_names(model) == names


# -- adapters on different layers: the result sits on the union, each layer combines the adapters
#    present there (as PEFT's add_weighted_adapter does) ------------------------------------------
QV, VO = [r"q_proj$", r"v_proj$"], [r"v_proj$", r"o_proj$"]
V0 = ((r"layers\.0\.self_attn\.v_proj$", {"r": 2}),)       # rank 2 on one layer, 4 elsewhere
LAYOUTS = {
    "overlap": {"a": dict(target_names=QV), "b": dict(target_names=VO)},
    "three": {"a": dict(target_names=QV), "b": dict(target_names=VO, layers=[1]),
              "c": dict(target_names=[r"q_proj$", r"o_proj$"], layers=[0])},
    "disjoint": {"a": dict(target_names=[r"q_proj$"], layers=[0]),
                 "b": dict(target_names=[r"o_proj$"], layers=[1])},
    "per_layer_rank": {"a": dict(target_names=QV, overrides=V0),
                       "b": dict(target_names=VO, overrides=V0)},
}
WEIGHTS = [1.0, -0.5, 0.7]
UNION_HOWS = [("linear", {}), ("cat", {}), ("svd", {"rank": 6}), ("svd", {}),
              ("ties", {"density": 0.5}), ("dare_linear", {"density": 0.5}),
              ("dare_ties", {"density": 0.6}), ("magnitude_prune", {"density": 0.5})]


def _attach_layout(model, layout):
    for i, (name, kw) in enumerate(LAYOUTS[layout].items()):
        ll.attach(model, lora_cfg(seed=i, **kw), name=name)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in ll.trainable_parameters(model, name=name):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return list(LAYOUTS[layout])


def _union(model, names):
    return {t.name for n in names for t in ll.attached(model, n).targets}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("how, extra", UNION_HOWS)
def test_combine_on_different_layers_matches_peft(model, batch, layout, how, extra, monkeypatch):
    names = _attach_layout(model, layout)
    weights = WEIGHTS[:len(names)]
    twin = _peft_twin(model, names)
    report = ll.combine(model, names, weights, how=how, name="m", seed=3, **extra)
    _seed_peft_pruning(monkeypatch, 3)
    twin.add_weighted_adapter(names, weights, "m", combination_type=how,
                              svd_rank=extra.get("rank"), density=extra.get("density"))
    twin.set_adapter("m")
    with ll.using(model, "m"):
        ours = logits(model, batch)
    assert (ours - logits(twin, batch)).abs().max() < 1e-5
    assert {t.name for t in ll.attached(model, "m").targets} == _union(model, names)
    if how == "svd":
        assert set(report["layers"]) == _union(model, names)


@pytest.mark.parametrize("how", ["cat", "linear", "svd"])
def test_union_result_saves_loads_merges_and_exports_to_peft(model, batch, tmp_path, how):
    import peft
    names = _attach_layout(model, "three" if how != "linear" else "overlap")
    ll.combine(model, names, WEIGHTS[:len(names)], how=how, name="m", rank=5)
    with ll.using(model, "m"):
        want = logits(model, batch)
    ll.save(model, tmp_path / "m.safetensors", name="m")
    ll.export_peft(model, tmp_path / "peft", name="m")

    def fresh():
        base = type(model)(model.config)
        base.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
        return base
    reloaded = fresh()
    ll.load(reloaded, tmp_path / "m.safetensors")
    assert {t.name for t in ll.attached(reloaded).targets} == _union(model, names)
    assert (logits(reloaded, batch) - want).abs().max() < 1e-6
    ll.merge(reloaded)
    assert ll.attached(reloaded) is None and (logits(reloaded, batch) - want).abs().max() < 1e-5
    twin = peft.PeftModel.from_pretrained(fresh(), str(tmp_path / "peft")).eval()
    assert (logits(twin, batch) - want).abs().max() < 1e-5


@pytest.mark.parametrize("other", [
    dict(variant="hra", r=4), dict(variant="oft", block_size=8)])
def test_svd_over_variants_on_different_layers(model, batch, other):
    """A LoRA on q_proj and an HRA / OFT on v_proj (layer 1 only): at full rank the combination is
    the two adapters active together; at low rank, each layer's best rank-k approximation of
    Σ w ΔW, with its relative Frobenius error reported."""
    ll.attach(model, lora_cfg(target_names=[r"q_proj$"]), name="a")
    kw = {k: v for k, v in other.items() if k != "variant"}
    ll.attach(model, ll.config(other["variant"], target_names=[r"v_proj$"], target_roles=(),
                               layers=[1], **kw), name="h")
    with torch.no_grad():
        for n in ("a", "h"):
            for p in ll.trainable_parameters(model, name=n):
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(9)))
    with ll.using(model, ["a", "h"], weights=[1.0, 1.0]):
        together = logits(model, batch)
    full = ll.combine(model, ["a", "h"], [1.0, 1.0], how="svd", rank=64, name="full")
    with ll.using(model, "full"):
        assert (logits(model, batch) - together).abs().max() < 1e-4
    assert set(full["layers"]) == _union(model, ["a", "h"])
    assert max(v["relative_error"] for v in full["layers"].values()) < 1e-5
    low = ll.combine(model, ["a", "h"], [1.0, 0.5], how="svd", rank=2, name="low")
    from lora_lite.layers.weights import base_dense_weight
    from lora_lite.merge import merged_weights
    deltas = {}
    for n, w in (("a", 1.0), ("h", 0.5)):
        for t, (W, _) in merged_weights(model, name=n).items():
            deltas[t] = deltas.get(t, 0) + w * (W - base_dense_weight(model.get_submodule(t)))
    got = merged_weights(model, name="low")
    for t, delta in deltas.items():
        S = torch.linalg.svdvals(delta)
        want = (S[2:].square().sum().sqrt() / S.square().sum().sqrt()).item()
        assert abs(low["layers"][t]["relative_error"] - want) < 1e-4
        approx = got[t][0] - base_dense_weight(model.get_submodule(t))
        assert abs((delta - approx).norm() / delta.norm() - want) < 1e-4


def _gainless():
    from lora_lite.testing import gain_variant
    return gain_variant("nomerge_gain")


@pytest.mark.parametrize("case, how, match", [
    ("rank", "linear", r"how='linear'.*'b'.*rank 2.*model\.layers\.0\.self_attn\.v_proj"),
    ("rank", "ties", r"'b'.*model\.layers\.0\.self_attn\.v_proj.*how='svd' or 'cat'"),
    ("nomerge", "svd", r"adapter 'g'.*cannot be merged.*model\.layers\.\d\.self_attn\.v_proj"),
    ("nofactors", "cat", r"adapter 'g'.*no low-rank factors.*self_attn\.v_proj.*how='svd'"),
    ("nofactors", "dare_linear", r"adapter 'g'.*no low-rank factors.*how='svd'"),
])
def test_incompatible_union_is_refused_with_the_model_unchanged(model, case, how, match):
    from lora_lite.testing import registered
    with registered(_gainless()):
        ll.attach(model, lora_cfg(target_names=QV), name="a")
        if case == "rank":
            ll.attach(model, lora_cfg(target_names=VO, overrides=V0), name="b")
        elif case == "nomerge":
            ll.attach(model, ll.config("nomerge_gain", target_names=[r"v_proj$"], target_roles=()),
                      name="g")
        else:
            ll.attach(model, ll.config("ia3", target_names=[r"v_proj$"], target_roles=()), name="g")
        names, before = ll.adapter_names(model), snapshot_state(model)
        with pytest.raises((ll.LoraLiteError, ValueError)) as e:
            ll.combine(model, names, [1.0, 0.5], how=how, name="m", density=0.5)
        assert e.match(match) and "\n" not in str(e.value)
        assert state_equal(snapshot_state(model), before) and ll.adapter_names(model) == names
        ll.detach(model)


@pytest.mark.parametrize("how", ["linear", "ties", "cat"])
def test_different_ranks_on_different_layers_combine_per_layer(model, batch, tmp_path, how):
    """PEFT refuses linear-family combinations of adapters of different r even when they share no
    layer; each layer has one rank here, so lora-lite combines them (the narrower layer padded)."""
    ll.attach(model, lora_cfg(target_names=[r"q_proj$"]), name="a")
    ll.attach(model, lora_cfg(r=2, target_names=[r"o_proj$"]), name="b")
    with torch.no_grad():
        for p in ll.trainable_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    with ll.using(model, ["a", "b"], weights=[1.0, -0.5]):
        together = logits(model, batch)
    report = ll.combine(model, ["a", "b"], [1.0, -0.5], how=how, name="m", density=1.0)
    assert report["rank"] == (6 if how == "cat" else 4)
    with ll.using(model, "m"):
        assert (logits(model, batch) - together).abs().max() < 1e-5
    ll.save(model, tmp_path / "m.safetensors", name="m")
    base = type(model)(model.config)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
    ll.load(base, tmp_path / "m.safetensors")
    assert (logits(base, batch) - together).abs().max() < 1e-5


def test_an_adapter_with_trained_modules_is_refused(model):
    ll.attach(model, lora_cfg(trainable_modules=["lm_head"]))
    before = snapshot_state(model)
    with pytest.raises(ll.LoraLiteError, match="adapter 'default' adapts parameters or trains"):
        ll.combine(model, ["default"], [1.0], how="linear", name="m")
    assert state_equal(snapshot_state(model), before) and ll.adapter_names(model) == ["default"]
