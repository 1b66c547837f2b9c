"""ll.combine against PEFT's add_weighted_adapter with the same adapters, weights and seed."""
import pytest
import torch
from lltest import lora_cfg
from test_multi_adapter import _adapters

import lora_lite as ll
from lora_lite.testing import logits, snapshot_state, state_equal


def _peft_twin(model, names):
    """A PEFT model on a copy of the base holding the same LoRA adapters under the same names."""
    import peft
    base = type(model)(model.config)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    twin = peft.get_peft_model(base, cfg, adapter_name=names[0])
    for n in names[1:]:
        twin.add_adapter(n, cfg)
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
    (dict(names=["a", "q"], weights=[1, 1], how="linear"), "different layers"),
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
