"""The variant contract as code states it: Variant is required and defaults every optional
member, members are plain defs, forward / forward_input get cfg (the old arity still works, with
a DeprecationWarning), config fields are checked from their annotations and ``ll.knob``, and
core and the CLI read variant members directly (an AST scan refuses getattr/hasattr defaulting)."""
import ast
import dataclasses
import pathlib
import re
import warnings

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite import plugins
from lora_lite.config import FLOAT32_MAX, is_finite_number
from lora_lite.testing import plugin_of, registered

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class ToyConfig(ll.AdapterConfig):
    variant: str = "contract_toy"
    gain: float = ll.knob(1.0, "[0, inf)")


def _specs(d_in, d_out, cfg):
    return {"lora_g": ll.ParamSpec((d_out,), init="ones")}


def two_linears():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))


# -- Variant is required ----------------------------------------------------------------------

class NotAVariant:  # everything a variant has, but not the base class
    name, config = "contract_toy", ToyConfig
    param_specs = staticmethod(_specs)

    @staticmethod
    def forward(layer, x, y, cfg):
        return y


def test_a_class_that_is_not_a_variant_is_refused_in_one_line():
    plugins.register_plugin(plugin_of(NotAVariant), "not-a-variant", distribution="acme-nv")
    try:
        assert "contract_toy" not in ll.variants()
        [problem] = [str(p) for p in ll.problems() if p.distribution == "acme-nv"]
        assert "is not a variant: variant classes must subclass lora_lite.Variant" in problem
        assert "\n" not in problem
    finally:
        plugins.unregister_plugin("not-a-variant")


def test_every_optional_member_is_defaulted_on_variant():
    class Bare(ll.Variant):
        name, config = "contract_toy", ToyConfig
        param_specs = _specs

        def forward(layer, x, y, cfg):
            return y
    for member in ("init", "group_init", "after_load", "merged_weight", "peft_config", "from_peft",
                   "added_macs", "default_target_names", "forward_input", "lowrank_factors"):
        assert getattr(Bare, member) is None, member
    assert (Bare.mergeable, Bare.needs_calibration, Bare.layer_kinds) == (True, False, ("linear",))
    assert ll.hook_kind(Bare) == "output"


# -- plain defs, cfg passed to the hooks --------------------------------------------------------

class Scaled(ll.Variant):
    name, config = "contract_toy", ToyConfig
    seen: list = []

    def param_specs(d_in, d_out, cfg):
        return _specs(d_in, d_out, cfg)

    def forward(layer, x, y, cfg):  # a plain def: no self, no @staticmethod
        Scaled.seen.append(cfg.gain)
        return y * layer.lora_g * cfg.gain


def test_plain_defs_are_static_members_and_forward_gets_the_targets_cfg():
    assert isinstance(vars(Scaled)["forward"], staticmethod)
    model, x = two_linears(), torch.randn(2, 4)
    want = model[1](model[0](x) * 2.0) * 3.0
    Scaled.seen.clear()
    with registered(Scaled, name="contract-scaled"):
        cfg = ll.config("contract_toy", gain=2.0, overrides=((r"^1$", {"gain": 3.0}),))
        ll.attach(model, cfg)
        assert torch.allclose(model(x), want)
        ll.detach(model)
    assert Scaled.seen == [2.0, 3.0]  # each target's own config (its override applied)


def test_an_old_signature_forward_still_works_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match=r"forward\(layer, x, y\) without cfg is deprecated"):
        class Old(ll.Variant):
            name, config = "contract_toy", ToyConfig
            param_specs = staticmethod(_specs)

            @staticmethod
            def forward(layer, x, y):
                return y * 2 * layer.lora_g
    with pytest.warns(DeprecationWarning, match=r"forward_input\(layer, x\) without cfg"):
        class OldInput(Old):
            forward = None

            def forward_input(layer, x):
                return x * 3
    model, x = two_linears(), torch.randn(2, 4)
    want = model[1](model[0](x) * 2) * 2
    with registered(Old, name="contract-old"):
        ll.attach(model, ll.config("contract_toy"))
        assert torch.allclose(model(x), want)
        ll.detach(model)
    assert torch.equal(OldInput.forward_input(None, x, ToyConfig()), x * 3)  # new call, old def
    assert torch.equal(OldInput.forward_input(None, x), x * 3)  # and direct old-style calls


def test_a_new_signature_forward_gives_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)

        class New(ll.Variant):
            name, config = "contract_toy", ToyConfig
            param_specs = _specs

            def forward(layer, x, y, cfg):
                return y
    assert New.forward(None, 1, 2, None) == 2


# -- annotation-driven field checks -------------------------------------------------------------

@dataclasses.dataclass
class KnobConfig(ll.AdapterConfig):
    variant: str = "contract_knobs"
    flag: bool = False
    count: int = ll.knob(1, "[0, 20]")
    rate: float = ll.knob(0.0, "[0, 1)", why="a probability")
    mode: str = ll.knob("a", choices=("a", "b"))
    label: str = "free"
    limit: int | None = ll.knob(None, "(0, inf)")
    loose: float = 0.5


@pytest.mark.parametrize("field, value, expected", [
    ("flag", 1, "flag: got 1, expected True or False"),
    ("count", True, "count: got True, expected an integer in [0, 20]"),
    ("count", 21, "count: got 21, expected an integer in [0, 20]"),
    ("count", 2.0, "count: got 2.0, expected an integer in [0, 20]"),
    ("rate", 1.0, "rate: got 1.0, expected a finite number in [0, 1) (a probability)"),
    ("rate", float("nan"), "rate: got nan, expected a finite number in [0, 1) (a probability)"),
    ("mode", "c", "mode: got 'c', expected one of ['a', 'b']"),
    ("label", 5, "label: got 5, expected a string"),
    ("limit", 0, "limit: got 0, expected an integer in (0, inf), or None"),
    ("loose", 1e300, "loose: got 1e+300, expected a finite number"),
    ("loose", "0.5", "loose: got '0.5', expected a finite number"),
])
def test_a_bad_value_is_refused_from_the_annotation_and_knob(field, value, expected):
    with pytest.raises(ll.ConfigError) as info:
        KnobConfig(**{field: value})
    assert str(info.value) == expected


def test_good_values_pass_and_none_is_allowed_where_annotated():
    cfg = KnobConfig(flag=True, count=20, rate=0.5, mode="b", label="x", limit=None, loose=-3)
    assert (cfg.count, cfg.limit) == (20, None)
    assert KnobConfig(limit=7).limit == 7


@pytest.mark.parametrize("within", ["0, 1", "[0; 1]", "[0, one]", "[0, 1"])
def test_a_badly_written_interval_fails_when_declared(within):
    with pytest.raises(ValueError, match="knob"):
        ll.knob(0, within)


def test_the_helpers_plugins_use_are_public_and_the_old_names_still_import():
    assert ll.is_finite_number is is_finite_number and ll.FLOAT32_MAX == FLOAT32_MAX
    assert ll.is_finite_number(1.0) and not ll.is_finite_number(float("inf"))
    assert callable(ll.linear_layers) and callable(ll.describe_candidates) and callable(ll.check)


def test_no_plugin_imports_a_private_lora_lite_module():
    sources = [*ROOT.glob("plugins/*/src/**/*.py"), *ROOT.glob("third_party_example/src/**/*.py")]
    private = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in sources
               for m in re.finditer(r"^from lora_lite\.\w+ import .*$", p.read_text(), re.M)]
    assert private == []


# -- core and the CLI read variant members directly ---------------------------------------------

def _variant_members() -> set:
    names = {n for cls in ll.Variant.__mro__ for n in vars(cls) if not n.startswith("__")}
    return names | {"uses_rank"}


_VARIANTISH = re.compile(r"(^|[._])(variant|cls|v)(\b|_)|get_variant\(|\.config$")


def defaulted_member_reads(source: str, filename="<src>") -> list[str]:
    """getattr(<a variant>, "<member>", default) / hasattr(<a variant>, "<member>") in
    ``source``: a member read that defaults what Variant already defaults."""
    members, found = _variant_members(), []
    for node in ast.walk(ast.parse(source, filename)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr") and len(node.args) >= 2):
            continue
        receiver, attr = node.args[0], node.args[1]
        if not (isinstance(attr, ast.Constant) and attr.value in members):
            continue
        defaulting = node.func.id == "hasattr" or len(node.args) == 3
        if defaulting and _VARIANTISH.search(ast.unparse(receiver)):
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_core_and_cli_never_default_a_variant_member_with_getattr():
    files = [*ROOT.glob("core/src/**/*.py"), *ROOT.glob("cli/src/**/*.py")]
    assert len(files) > 20
    found = [hit for p in files for hit in defaulted_member_reads(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == []


@pytest.mark.parametrize("snippet", [
    'getattr(variant, "init", None)',
    'callable(getattr(cls, "merged_weight", None))',
    'hasattr(variant_cls, "peft_config")',
    'getattr(get_variant(name), "from_peft", None)',
    'getattr(cls.config, "uses_rank", True)',
    'getattr(state.variant, "mixed_batch", True)',
])
def test_the_scan_finds_a_defaulted_member_read(snippet):
    assert len(defaulted_member_reads(snippet)) == 1


@pytest.mark.parametrize("snippet", [
    'getattr(model, "config", None)', 'getattr(layer, "bias", None)', 'getattr(cls, attr)',
    'variant.init is not None',
])
def test_the_scan_leaves_other_getattrs_alone(snippet):
    assert defaulted_member_reads(snippet) == []
