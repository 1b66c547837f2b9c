"""Plugin isolation: a plugin that fails to import, a variant that breaks the
contract, two plugins registering one variant name, and the LORA_LITE_PLUGINS allow-list.

In each case the other plugins keep working (the built-in ``lora`` attaches, runs and detaches)
and ``ll.problems()`` names the culprit distribution and what to do about it. Contract breaches
and clashes are staged in-process with ``register_plugin``; the import failure and a clash
between real entry points are staged in a subprocess, with throwaway ``*.dist-info`` folders on
its ``sys.path`` so that ``importlib.metadata`` finds them like installed distributions.
"""
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch

import lora_lite as ll
from lora_lite import plugins
from lora_lite.testing import gain_variant, plugin_of


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    """Every test starts and ends with plugins reloaded from the real entry points."""
    monkeypatch.delenv(plugins.ALLOW_ENV, raising=False)
    plugins.reset()
    yield
    plugins.reset()


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj = torch.nn.Linear(8, 8)
        self.o_proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.o_proj(self.q_proj(x))


def assert_works(variant, **knobs):
    """The variant attaches, is the identity at init, and detaches leaving the model as it was."""
    model, x = Tiny(), torch.randn(3, 8)
    with torch.no_grad():
        ref = model(x)
        ll.attach(model, ll.config(variant, r=2, target_names=[r"q_proj$"], **knobs))
        assert torch.allclose(model(x), ref, atol=1e-6)
        ll.detach(model)
        assert torch.equal(model(x), ref)


def problems_of(distribution):
    return [str(p) for p in ll.problems() if p.distribution == distribution]


Scale = gain_variant("iso_scale")  # a well-behaved variant: y * g, g = 1 at init
ScaleConfig = Scale.config


# -- a variant that breaks the contract ------------------------------------------------------

@dataclass
class NoForwardConfig(ll.AdapterConfig):
    variant: str = "iso_noforward"


class NoForward(ll.Variant):
    name, config = "iso_noforward", NoForwardConfig

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_s": ll.ParamSpec((d_out,))}


@dataclass
class PlainConfig:  # not an AdapterConfig
    variant: str = "iso_plainconfig"
    r: int = 8


class PlainConfigVariant(Scale):
    name, config = "iso_plainconfig", PlainConfig


class WrongDefaultVariant(Scale):
    name, config = "iso_wrongdefault", ScaleConfig  # config.variant defaults to "iso_scale"


@pytest.mark.parametrize("culprit, expected", [
    (NoForward, "must define forward(layer, x, y, cfg) or forward_input(layer, x, cfg) (or both)"),
    (PlainConfigVariant, ".config must be a dataclass subclassing lora_lite.AdapterConfig"),
    (WrongDefaultVariant, "its config's `variant` field must default to 'iso_wrongdefault'"),
])
def test_contract_breaking_variant_is_skipped_and_reported(culprit, expected):
    plugins.register_plugin(plugin_of(culprit, Scale), "acme", distribution="acme-adapters")
    found = ll.variants()
    assert culprit.name not in found
    assert "iso_scale" in found and "lora" in found  # the same plugin's good variant stays
    [problem] = problems_of("acme-adapters")
    assert expected in problem
    assert "report it to the plugin's author or uninstall acme-adapters" in problem
    with pytest.raises(ll.VariantNotInstalled, match=rf"{culprit.name!r} is unavailable because "
                                                      r"plugin 'acme-adapters'"):
        ll.config(culprit.name)
    assert_works("lora")
    assert_works("iso_scale")


@dataclass
class BadNamesConfig(ll.AdapterConfig):
    variant: str = "iso_badnames"


class BadNames(Scale):
    name, config = "iso_badnames", BadNamesConfig

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_scale": ll.ParamSpec((d_out,), init="ones"), "gain": ll.ParamSpec((d_out,))}


def test_variant_with_bad_tensor_names_is_reported_and_refused_by_attach():
    plugins.register_plugin(plugin_of(BadNames), "acme", distribution="acme-adapters")
    [problem] = problems_of("acme-adapters")
    assert "param_specs names tensor(s) ['gain']" in problem and "must start with 'lora_'" in problem
    assert "report it to the plugin's author or uninstall acme-adapters" in problem
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ll.AttachError, match=r"acme-adapters.*'gain'.*must start with 'lora_'"):
        ll.attach(model, ll.config("iso_badnames", target_names=[r"q_proj$"]))
    assert ll.attached(model) is None and not hasattr(model.q_proj, "lora_scale")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert_works("lora")


# -- two plugins registering the same variant name ---------------------------------------------

class OtherScale(Scale):
    """Same name as Scale, from another distribution."""


@pytest.mark.parametrize("order", ["acme first", "other first"])
def test_a_clash_of_two_strangers_is_never_settled_silently(order):
    pair = [(Scale, "first", "acme-scale"), (OtherScale, "second", "Other_Scale")]
    for cls, name, dist in (pair if order == "acme first" else pair[::-1]):
        plugins.register_plugin(plugin_of(cls), name, distribution=dist)
    assert "iso_scale" not in ll.variants()  # neither sorting first nor registering first wins
    [acme] = problems_of("acme-scale")
    [other] = problems_of("Other_Scale")
    for problem, mine in ((acme, "acme-scale"), (other, "other-scale")):
        assert "variant name 'iso_scale' is registered by both" in problem
        assert "acme-scale" in problem and "Other_Scale" in problem  # both named
        assert f"'{mine}:iso_scale'" in problem and f"{plugins.ALLOW_ENV}=" in problem
    with pytest.raises(ll.VariantNotInstalled, match="registered by both"):
        ll.config("iso_scale")
    # the qualified name chooses one, whatever the case and punctuation of the distribution
    assert plugins.get_variant("acme-scale:iso_scale") is Scale
    assert plugins.get_variant("OTHER.scale:iso_scale") is OtherScale
    assert ll.config("Other_Scale:iso_scale").variant == "other-scale:iso_scale"
    assert_works("acme-scale:iso_scale")
    assert_works("lora")


SHADOW = "aaa-shadow"  # sorts before every lora-lite-* name


@pytest.mark.parametrize("order", ["built-in first", "shadow first"])
def test_a_builtin_keeps_its_name_over_a_stranger_that_sorts_first(order):
    """In-process stand-ins for both (the built-in's label is one of BUILTIN_DISTRIBUTIONS), so
    both registration orders can be staged; the real entry points are tested below."""
    builtin = (Scale, "builtin", "lora-lite-hra")
    shadow = (OtherScale, "shadow", SHADOW)
    for cls, name, dist in ([builtin, shadow] if order == "built-in first" else [shadow, builtin]):
        plugins.register_plugin(plugin_of(cls), name, distribution=dist)
    assert ll.variants()["iso_scale"] is Scale
    assert plugins.variant_origin("iso_scale").distribution == "lora-lite-hra"
    [problem] = problems_of(SHADOW)
    assert ("variant name 'iso_scale' is also registered by lora-lite-hra (built in), which keeps "
            f"it; {SHADOW}'s 'iso_scale' was not registered under that name") in problem
    assert f"'{SHADOW}:iso_scale'" in problem and f"{plugins.ALLOW_ENV}={SHADOW}" in problem
    info = {p.name: p for p in ll.installed_plugins()}
    assert info["shadow"].variants == [f"{SHADOW}:iso_scale"] and info["builtin"].variants == ["iso_scale"]
    assert plugins.get_variant(f"{SHADOW}:iso_scale") is OtherScale  # chosen explicitly: reachable
    # a name like ours is not enough: lora-lite-x is not one of the distributions we ship
    assert not plugins.is_builtin("lora-lite-x") and plugins.is_builtin("Lora_Lite.HRA")


def test_a_preferred_in_process_plugin_is_an_explicit_choice_over_a_builtin():
    plugins.register_plugin(plugin_of(Scale), "builtin", distribution="lora-lite-hra")
    plugins.register_plugin(plugin_of(OtherScale), "mine", distribution="notebook", preferred=True)
    assert ll.variants()["iso_scale"] is OtherScale
    assert "registered by notebook, which keeps it" in problems_of("lora-lite-hra")[0]


def test_a_qualified_name_that_nobody_provides_says_who_does():
    plugins.register_plugin(plugin_of(Scale), "first", distribution="acme-scale")
    with pytest.raises(ll.VariantNotInstalled, match=r"no installed distribution 'nobody' provides "
                                                      r"variant 'iso_scale'; it is provided as "
                                                      r"'acme-scale:iso_scale'"):
        ll.config("nobody:iso_scale")


def test_a_file_is_not_run_by_another_distribution_than_the_one_that_wrote_it(tmp_path):
    plugins.register_plugin(plugin_of(OtherScale), "second", distribution="other-scale")
    model = Tiny()
    ll.attach(model, ll.config("iso_scale", target_names=[r"q_proj$"]))
    path = tmp_path / "scale.safetensors"
    ll.save(model, path)
    assert ll.read_header(path)[0]["plugin"] == "other-scale"
    # a (stand-in) built-in now holds the name: the file refuses to run it
    plugins.register_plugin(plugin_of(Scale), "first", distribution="lora-lite-hra")
    fresh, x = Tiny(), torch.randn(3, 8)
    with torch.no_grad():
        ref = fresh(x)
    with pytest.raises(ll.AdapterFileError, match=r"written by variant 'iso_scale' of other-scale, "
                                                  r"but 'iso_scale' is provided here by lora-lite-hra"):
        ll.load(fresh, path)
    assert ll.attached(fresh) is None and torch.equal(fresh(x), ref)
    # saved under the qualified name, the file names its distribution and loads under it only
    chosen = Tiny()
    ll.attach(chosen, ll.config("other-scale:iso_scale", target_names=[r"q_proj$"]))
    qualified = tmp_path / "qualified.safetensors"
    ll.save(chosen, qualified)
    assert ll.read_header(qualified)[0]["variant"] == "other-scale:iso_scale"
    ll.load(Tiny(), qualified)
    plugins.unregister_plugin("first")
    ll.load(fresh, path)  # its own distribution again: loads
    plugins.unregister_plugin("second")
    with pytest.raises(ll.AdapterFileError, match="other-scale"):
        ll.load(Tiny(), qualified)  # its distribution is gone: refused, not run by another


def exits(register):
    raise SystemExit(3)


def interrupts(register):
    raise KeyboardInterrupt


@pytest.mark.parametrize("hook_body, expected", [
    (exits, "register_variants raised SystemExit: 3"),
    (lambda register: register(5), "5 is not a variant: variant classes must subclass lora_lite.Variant"),
    (lambda register: 1 / 0, "register_variants raised ZeroDivisionError"),
])
def test_a_hook_that_exits_raises_or_registers_junk_is_reported(hook_body, expected):
    class Plugin:
        register_variants = staticmethod(ll.hookimpl(hook_body))
    plugins.register_plugin(Plugin, "bad", distribution="acme-bad")
    assert "lora" in ll.variants()
    [problem] = problems_of("acme-bad")
    assert expected in problem
    assert_works("lora")


def test_ctrl_c_in_a_hook_still_interrupts():
    class Plugin:
        register_variants = staticmethod(ll.hookimpl(interrupts))
    plugins.register_plugin(Plugin, "bad", distribution="acme-bad")
    with pytest.raises(KeyboardInterrupt):
        ll.variants()


# -- the LORA_LITE_PLUGINS allow-list -------------------------------------------------------------

def test_allow_list_empty_hides_every_plugin(monkeypatch):
    monkeypatch.setenv(plugins.ALLOW_ENV, "")
    plugins.reset()
    assert ll.variants() == {} and ll.problems() == []
    assert [p.distribution for p in ll.installed_plugins()] == ["lora-lite"]  # core's backend
    with pytest.raises(ll.VariantNotInstalled) as err:
        ll.config("lora")
    assert "pip install" not in str(err.value)  # nothing installed is known to provide it
    assert f"{plugins.ALLOW_ENV}=''" in str(err.value)  # the message points at the allow-list


def test_allow_list_shows_only_the_named_distribution(monkeypatch):
    plugins.reset()
    assert len(ll.variants()) >= 1  # whatever is installed
    monkeypatch.setenv(plugins.ALLOW_ENV, "lora-lite-lora")
    plugins.reset()
    assert list(ll.variants()) == ["lora"]
    assert {p.distribution for p in ll.installed_plugins()} == {"lora-lite", "lora-lite-lora"}
    assert ll.problems() == []
    assert_works("lora")


# -- real entry points, in a subprocess ----------------------------------------------------------

SCALE_PLUGIN = '''
from dataclasses import dataclass
import lora_lite as ll

@dataclass
class ScaleConfig(ll.AdapterConfig):
    variant: str = "scale"

class Scale(ll.Variant):
    name, config = "scale", ScaleConfig
    origin = {origin!r}

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {{"lora_scale": ll.ParamSpec((d_out,), init="ones")}}

    @staticmethod
    def forward(layer, x, y):
        return y * layer.lora_scale

@ll.hookimpl
def register_variants(register):
    register(Scale)
'''

PROBE = textwrap.dedent('''
    import json, torch, lora_lite as ll
    from lora_lite import plugins

    def works(variant):
        model = torch.nn.Module()
        model.q_proj = torch.nn.Linear(8, 8)
        x = torch.randn(3, 8)
        with torch.no_grad():
            ref = model.q_proj(x)
            ll.attach(model, ll.config(variant, r=2, target_names=["q_proj$"]))
            same = torch.allclose(model.q_proj(x), ref, atol=1e-6)
            ll.detach(model)
            return same and torch.equal(model.q_proj(x), ref)

    import os
    qualified = json.loads(os.environ.get("PROBE_QUALIFIED", "[]"))
    try:
        ll.config("broken")
        broken_message = None
    except ll.VariantNotInstalled as e:
        broken_message = str(e)
    print(json.dumps({
        "variants": {n: plugins.variant_origin(n).distribution for n in ll.variants()},
        "scale_origin": getattr(ll.variants().get("scale"), "origin", None),
        "problems": [{"distribution": p.distribution, "text": str(p)} for p in ll.problems()],
        "works": {n: works(n) for n in ("lora", "scale") if n in ll.variants()},
        "qualified": {n: [works(n), plugins.get_variant(n).__module__] for n in qualified},
        "broken_message": broken_message,
    }))
''')


def fake_distribution(site, name, version, entry_points, module=None, source=""):
    """A minimal installed distribution: NAME-VERSION.dist-info/{METADATA,entry_points.txt}."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(
        "[lora_lite]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    if module:
        (site / f"{module}.py").write_text(source)


@pytest.fixture(scope="module")
def fake_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    fake_distribution(site, "lora-lite-broken", "0.1.0", {"broken": "lora_lite_broken_missing.plugin"})
    fake_distribution(site, "lora-lite-exits", "0.1.0", {"exits": "lora_lite_exits_plugin"},
                      "lora_lite_exits_plugin", "import sys\nsys.exit(4)\n")
    fake_distribution(site, "acme-scale", "1.0", {"acme_scale": "acme_scale_plugin"},
                      "acme_scale_plugin", SCALE_PLUGIN.format(origin="acme-scale"))
    fake_distribution(site, "other-scale", "2.0", {"other_scale": "other_scale_plugin"},
                      "other_scale_plugin", SCALE_PLUGIN.format(origin="other-scale"))
    return site


def probe(site, allow=None, last=False, qualified=()):
    """PROBE in a fresh interpreter with ``site`` first on the path (found before the real
    site-packages) or, ``last``, appended after it: both orders of discovery."""
    env = {k: v for k, v in os.environ.items() if k != plugins.ALLOW_ENV}
    code = PROBE
    if last:
        code = f"import sys; sys.path.append({str(site)!r})\n" + PROBE
    else:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    if allow is not None:
        env[plugins.ALLOW_ENV] = allow
    env["PROBE_QUALIFIED"] = json.dumps(list(qualified))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_real_entry_points_broken_import_and_clash_are_isolated(fake_site):
    result = probe(fake_site)
    problems = {p["distribution"]: p["text"] for p in result["problems"]}
    # the plugin that fails to import: named, with the error and what to do
    broken = problems.pop("lora-lite-broken")
    assert "failed to import 'lora_lite_broken_missing.plugin': ModuleNotFoundError" in broken
    assert "pip install --force-reinstall lora-lite-broken" in broken
    assert plugins.ALLOW_ENV in broken
    # ...and a command that needs it says why it is unavailable and how to fix it
    assert result["broken_message"].startswith(
        "variant 'broken' is unavailable because plugin 'lora-lite-broken': failed to import")
    # the clash of two strangers: neither keeps the name, both are reported with the way to choose
    assert "scale" not in result["variants"]
    for dist in ("acme-scale", "other-scale"):
        text = problems.pop(dist)
        assert "variant name 'scale' is registered by both" in text and f"'{dist}:scale'" in text
    # sys.exit() at import is one more reported problem, not the end of the process
    assert "failed to import 'lora_lite_exits_plugin': SystemExit: 4" in problems.pop("lora-lite-exits")
    assert problems == {}
    # everything else keeps working
    assert result["variants"]["lora"] == "lora-lite-lora"
    assert result["works"] == {"lora": True}


SHADOW_LORA = '''
import lora_lite as ll
from lora_lite_lora.lora import LoRA

class ShadowLora(LoRA):  # named 'lora' too; its outputs differ from the built-in's
    @staticmethod
    def forward(layer, x, y):
        return y + 1.0

@ll.hookimpl
def register_variants(register):
    register(ShadowLora)
'''


@pytest.fixture(scope="module")
def shadow_site(tmp_path_factory):
    """Strangers whose names sort before lora-lite-lora: one registers a variant 'lora', one
    reuses the built-in's entry-point name 'lora'."""
    site = tmp_path_factory.mktemp("shadow")
    fake_distribution(site, "llbad-shadowb", "9.0", {"shadowb": "llbad_shadowb"},
                      "llbad_shadowb", SHADOW_LORA)
    fake_distribution(site, "llbad-epname", "9.0", {"lora": "llbad_epname"},
                      "llbad_epname", SHADOW_LORA)
    return site


@pytest.mark.parametrize("last", [False, True], ids=["shadow found first", "shadow found last"])
def test_real_entry_points_a_stranger_never_takes_over_the_builtin_lora(shadow_site, last):
    result = probe(shadow_site, last=last, qualified=["llbad-shadowb:lora"])
    assert result["variants"]["lora"] == "lora-lite-lora"
    assert result["works"]["lora"] is True  # the built-in's identity at init, not y + 1
    problems = {p["distribution"]: p["text"] for p in result["problems"]}
    shadow = problems.pop("llbad-shadowb")
    assert "variant name 'lora' is also registered by lora-lite-lora (built in), which keeps it" in shadow
    assert "'llbad-shadowb:lora'" in shadow and "LORA_LITE_PLUGINS=llbad-shadowb" in shadow
    assert "entry point name 'lora' is already used" in problems.pop("llbad-epname")
    assert problems == {}
    # chosen by its qualified name, the stranger's class runs (and is not the identity)
    assert result["qualified"] == {"llbad-shadowb:lora": [False, "llbad_shadowb"]}


def test_real_entry_points_allow_list_excludes_the_culprits(fake_site):
    result = probe(fake_site, allow="lora-lite-lora, acme-scale")
    assert result["variants"] == {"lora": "lora-lite-lora", "scale": "acme-scale"}
    assert result["problems"] == []
    assert result["works"] == {"lora": True, "scale": True}
    assert "LORA_LITE_PLUGINS" in result["broken_message"]  # not loaded: the message says why
    nothing = probe(fake_site, allow="")
    assert nothing["variants"] == {} and nothing["problems"] == [] and nothing["works"] == {}
