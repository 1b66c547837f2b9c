"""Plugin discovery: entry points, lazy loading, the LORA_LITE_PLUGINS allow-list, in-process
registration, and broken plugins reported and skipped."""
import json
import os
import subprocess
import sys

import pytest
from lltest import QV

import lora_lite as ll
import lora_lite.plugins as plugins
from lora_lite.testing import gain_variant, registered


def variants_in_subprocess(env_value):
    env = dict(os.environ)
    env.pop(plugins.ALLOW_ENV, None)
    if env_value is not None:
        env[plugins.ALLOW_ENV] = env_value
    out = subprocess.run([sys.executable, "-c",
                          "import json, lora_lite as ll; print(json.dumps(sorted(ll.variants())))"],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_lora_is_found_through_its_entry_point_and_the_allow_list_hides_it():
    assert "lora" in variants_in_subprocess(None)
    assert variants_in_subprocess("") == []
    assert variants_in_subprocess("lora-lite-lora") == ["lora"]
    assert variants_in_subprocess("lora_lite_lora") == ["lora"]  # names are normalised


def test_core_works_with_zero_plugins(only_plugins, model, batch):
    only_plugins("")
    assert ll.variants() == {}
    assert [p.name for p in ll.installed_plugins()] == ["bnb_backend"]  # core's own backend
    with pytest.raises(ll.VariantNotInstalled, match="LORA_LITE_PLUGINS=''") as err:
        ll.config("lora")
    assert "pip install" not in str(err.value)  # no package is known to provide it here


def test_loading_is_lazy():
    code = ("import lora_lite, lora_lite.plugins.manager as p; assert p._registry is None; "
            "lora_lite.variants(); assert p._registry is not None; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


Gate = gain_variant("test_gate")
GateConfig = Gate.config


def test_in_process_registration_and_unregistration(model):
    with registered(Gate, name="gate-plugin"):
        assert "test_gate" in ll.variants()
        info = {p.name: p for p in ll.installed_plugins()}["gate-plugin"]
        assert info.variants == ["test_gate"] and "register_variants" in info.hooks
        ll.attach(model, ll.config("test_gate", **QV))
        ll.detach(model)
    assert "test_gate" not in ll.variants()


def test_broken_plugins_are_reported_and_skipped():
    class Crashing:
        @staticmethod
        @ll.hookimpl
        def register_variants(register):
            raise RuntimeError("plugin bug")

    class NoForward(ll.Variant):
        name, config = "noforward", GateConfig

        @staticmethod
        def param_specs(d_in, d_out, cfg):
            return {}

    with registered(Gate, NoForward, name="mixed"):
        plugins.register_plugin(Crashing, name="crashing", distribution="lora-lite-crashing")
        try:
            found = ll.variants()
            assert "lora" in found and "test_gate" in found and "noforward" not in found
            problems = {p.distribution: str(p) for p in ll.problems()}
            assert "register_variants raised RuntimeError: plugin bug" in problems["lora-lite-crashing"]
            assert "uninstall lora-lite-crashing" in problems["lora-lite-crashing"]
            assert "must default to 'noforward'" in problems["mixed"] or "must define forward" in problems["mixed"]
        finally:
            plugins.unregister_plugin("crashing")
    assert not [p for p in ll.problems() if p.distribution in ("lora-lite-crashing", "mixed")]


def test_builtin_distributions_are_exactly_the_ones_this_repository_ships():
    """The clash rule trusts BUILTIN_DISTRIBUTIONS; it must list every plugins/*/ distribution
    (and core), and not the third-party example, which is written as a stranger would."""
    import pathlib

    import tomllib
    root = pathlib.Path(__file__).resolve().parents[1]
    shipped = {plugins.normalize_distribution(
        tomllib.loads(p.read_text())["project"]["name"]) for p in root.glob("plugins/*/pyproject.toml")}
    assert shipped and plugins.BUILTIN_DISTRIBUTIONS == shipped | {"lora-lite"}
    example = tomllib.loads((root / "third_party_example" / "pyproject.toml").read_text())
    assert not plugins.is_builtin(example["project"]["name"])  # lora-lite-vera: a stranger


def test_builtin_distributions_come_from_cores_all_extra(monkeypatch):
    from lora_lite.plugins import names
    requires = ['lora-lite-foo; extra == "all"', "lora_lite.Bar[x]>=1 ; extra == 'all'",
                'lora-lite-baz; extra == "dev"', "torch>=2.1"]
    monkeypatch.setattr(names.md, "requires", lambda dist: requires if dist == "lora-lite" else None)
    assert names.builtin_distributions() == {"lora-lite", "lora-lite-foo", "lora-lite-bar"}

    def missing(dist):
        raise names.md.PackageNotFoundError(dist)
    monkeypatch.setattr(names.md, "requires", missing)  # core run from a source tree: only itself
    assert names.builtin_distributions() == {"lora-lite"}
