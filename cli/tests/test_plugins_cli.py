"""``lora-lite plugins``, ``install``, ``uninstall``.

The real install/uninstall runs in a throwaway virtual environment layered on this one (a .pth
file adds this environment's site-packages), so the dummy plugin never appears in the shared
environment other tests use. No network: the plugin is a wheel built here, pip runs --no-index.
"""
import base64
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

import lora_lite as ll
import lora_lite_cli.commands.plugins as plugins_module
from lora_lite.plugins import register_plugin, unregister_plugin
from lora_lite_cli.app import get_app

runner = CliRunner()

DUMMY_MODULE = '''"""A dummy lora-lite plugin built by the CLI tests: an elementwise output gain."""
from dataclasses import dataclass

import lora_lite as ll


@dataclass
class DummyConfig(ll.AdapterConfig):
    variant: str = "clitest_dummy"
    boost: float = 1.0


class Dummy(ll.Variant):
    name = "clitest_dummy"
    config = DummyConfig

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_g": ll.ParamSpec((d_out,), init="ones")}

    @staticmethod
    def forward(layer, x, y):
        return y * layer.lora_g


@ll.hookimpl
def register_variants(register):
    register(Dummy)
'''


def build_wheel(folder) -> str:
    """lora-lite-clitest-dummy 0.1.0 as a pure-Python wheel (written by hand: no build backend)."""
    dist, version = "lora_lite_clitest_dummy", "0.1.0"
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{dist}/__init__.py": DUMMY_MODULE,
        f"{info}/METADATA": ("Metadata-Version: 2.1\nName: lora-lite-clitest-dummy\n"
                             f"Version: {version}\nRequires-Dist: lora-lite\n"),
        f"{info}/WHEEL": ("Wheel-Version: 1.0\nGenerator: lora-lite-cli-tests\n"
                          "Root-Is-Purelib: true\nTag: py3-none-any\n"),
        f"{info}/entry_points.txt": f"[lora_lite]\nclitest_dummy = {dist}\n",
    }
    record = []
    path = os.path.join(folder, f"{dist}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as whl:
        for name, text in files.items():
            data = text.encode()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={digest},{len(data)}")
            whl.writestr(name, data)
        record.append(f"{info}/RECORD,,")
        whl.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


def layered_venv(folder) -> str:
    """A venv without pip whose interpreter also sees this environment's packages; returns its
    python. pip itself comes from this environment but installs into the new venv."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", folder], check=True)
    python = os.path.join(folder, "bin", "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]
    with open(os.path.join(purelib, "_lora_lite_outer_env.pth"), "w") as f:
        f.write(f"import site; site.addsitedir({ours!r})\n")
    return python


def lora_lite(python, *args):
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "COLUMNS": "200"}
    return subprocess.run([python, "-c", "from lora_lite_cli.app import main; main()", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_plugins_json_lists_distributions_hooks_variants():
    result = runner.invoke(get_app(), ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["python"] == sys.executable
    by_dist = {p["distribution"]: p for p in data["plugins"]}
    assert by_dist["lora-lite-lora"]["variants"][:1] == ["lora"] or \
        "lora" in by_dist["lora-lite-lora"]["variants"]
    assert by_dist["lora-lite-lora"]["hooks"] == ["register_variants"]
    assert "register_weight_backends" in by_dist["lora-lite"]["hooks"]  # core's bnb backend
    result = runner.invoke(get_app(), ["plugins"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "lora-lite-lora" in result.stdout


def test_install_and_uninstall_in_lora_lites_own_environment(tmp_path):
    wheel = build_wheel(str(tmp_path))
    python = layered_venv(str(tmp_path / "venv"))
    result = lora_lite(python, "install", wheel)  # lists the plugins before and after
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{python} -m pip install {wheel}" in result.stderr  # pip of lora-lite's interpreter
    assert "plugin lora-lite-clitest-dummy 0.1.0: variants clitest_dummy" in result.stdout

    after = json.loads(lora_lite(python, "plugins", "--json").stdout)  # a fresh process
    assert after["python"] == python
    dummy = next(p for p in after["plugins"] if p["distribution"] == "lora-lite-clitest-dummy")
    assert dummy["version"] == "0.1.0" and dummy["variants"] == ["clitest_dummy"]
    assert dummy["hooks"] == ["register_variants"]
    variants = json.loads(lora_lite(python, "variants", "--json").stdout)["variants"]
    assert next(v for v in variants if v["name"] == "clitest_dummy")["knobs"] == {"boost": 1.0}
    # ... and not in this (the shared) environment
    assert "clitest_dummy" not in runner.invoke(get_app(), ["variants", "--json"]).stdout

    result = lora_lite(python, "uninstall", "lora-lite-clitest-dummy")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "removed plugin lora-lite-clitest-dummy" in result.stdout  # from a fresh listing


def test_install_passes_options_to_pip(monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return SimpleNamespace(returncode=0, stdout=json.dumps({"plugins": [], "problems": []}))

    monkeypatch.setattr(plugins_module, "subprocess", SimpleNamespace(run=fake_run))
    app = get_app()
    result = runner.invoke(app, ["install", "-U", "--force-reinstall", "-e", "./my_plugin",
                                 "lora-lite-hra"])
    assert result.exit_code == 0, result.output
    assert calls[0] == [sys.executable, "-m", "pip", "install", "--upgrade", "--force-reinstall",
                        "--editable", "./my_plugin", "lora-lite-hra"]
    calls.clear()
    result = runner.invoke(app, ["uninstall", "lora-lite-hra", "lora-lite-road"])
    assert result.exit_code == 0, result.output
    assert calls[0] == [sys.executable, "-m", "pip", "uninstall", "-y", "lora-lite-hra",
                        "lora-lite-road"]


def test_install_errors(monkeypatch):
    monkeypatch.setattr(plugins_module, "subprocess",
                        SimpleNamespace(run=lambda cmd, **kw: SimpleNamespace(returncode=1, stdout="")))
    app = get_app()
    result = runner.invoke(app, ["install", "lora-lite-nonexistent"])
    assert result.exit_code == 1 and "pip install failed" in result.stderr
    result = runner.invoke(app, ["install"])
    assert result.exit_code == 2 and "name at least one package" in result.stderr
    for name in ("lora_lite", "lora.lite", "Lora--Lite", "lora-lite==0.1.0", "LORA_LITE.CLI"):
        result = runner.invoke(app, ["uninstall", "lora-lite-hra", name])
        assert result.exit_code == 2 and "refusing to uninstall lora-lite" in result.stderr, name


# -- commands keep working with a broken plugin of any kind; `plugins` reports it --------------

def _exits(register):
    raise SystemExit(5)


def _raises(register):
    raise RuntimeError("plugin bug")


def _junk(register):
    register(object)          # a malformed variant: no name, no config


def _clash(register):
    register(type("Impostor", (ll.get_variant("lora"),), {}))  # the name 'lora' again


def _exits_in_commands(app):
    raise SystemExit(6)


BROKEN_HOOKS = {
    "sys.exit in register_variants": ("register_variants", _exits, "register_variants raised SystemExit: 5"),
    "raising register_variants": ("register_variants", _raises, "register_variants raised RuntimeError"),
    "malformed variant": ("register_variants", _junk, "is not a variant: variant classes must subclass"),
    "name clash": ("register_variants", _clash,
                   "variant name 'lora' is also registered by lora-lite-lora (built in), which keeps it"),
    "sys.exit in register_commands": ("register_commands", _exits_in_commands,
                                      "failed to add commands: SystemExit: 6"),
}


@pytest.mark.parametrize("kind", list(BROKEN_HOOKS))
def test_commands_keep_working_and_plugins_reports_a_broken_plugin(kind):
    hook_name, body, expected = BROKEN_HOOKS[kind]
    plugin = SimpleNamespace(**{hook_name: ll.hookimpl(body)})
    # on a clash the built-in keeps its name (whatever "zz-broken" sorts as)
    register_plugin(plugin, "zz-broken", distribution="zz-broken")
    try:
        app = get_app()
        listing = runner.invoke(app, ["plugins", "--json"])
        variants = runner.invoke(app, ["variants", "--json"])
        attach = runner.invoke(app, ["check", "lora", "--json"])
    finally:
        unregister_plugin("zz-broken")
    assert listing.exit_code == variants.exit_code == 0, listing.output + variants.output
    problems = json.loads(listing.stdout)["problems"]
    assert any(expected in p["error"] for p in problems), problems
    assert "lora" in {v["name"] for v in json.loads(variants.stdout)["variants"]}
    assert attach.exit_code == 0, attach.output
    assert json.loads(attach.stdout)["variants"][0]["bases"]["fp32"]["identity_err"] == 0.0


def test_a_plugin_that_fails_or_exits_at_import_is_reported_by_plugins(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    for dist, module, source in (("zz-missing", "zz_missing_nowhere", None),
                                 ("zz-exits", "zz_exits_plugin", "import sys\nsys.exit(7)\n")):
        info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[lora_lite]\n{dist} = {module}\n")
        if source:
            (site / f"{module}.py").write_text(source)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site),
                                                                    os.environ.get("PYTHONPATH")]))}
    env.pop("LORA_LITE_PLUGINS", None)
    code = "from lora_lite_cli.app import main; main()"
    out = subprocess.run([sys.executable, "-c", code, "plugins", "--json"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    problems = {p["distribution"]: p["error"] for p in json.loads(out.stdout)["problems"]}
    assert "ModuleNotFoundError" in problems["zz-missing"]
    assert "SystemExit: 7" in problems["zz-exits"]
    assert "lora-lite-lora" in {p["distribution"] for p in json.loads(out.stdout)["plugins"]}


def test_a_strangers_clashing_variant_is_chosen_by_its_qualified_name(tiny_dir, tmp_path):
    """Issue 24: `lora` stays the built-in; `plugins` names the clash and the way to choose;
    `--variant acme-lora:lora` trains the stranger's class, whose file records its distribution."""
    from lora_lite.testing import registered
    builtin = ll.get_variant("lora")
    stranger = type("StrangerLora", (builtin,), {})
    with registered(stranger, name="acme", distribution="acme-lora"):
        assert ll.get_variant("lora") is builtin
        listing = runner.invoke(get_app(), ["plugins", "--json"])
        [problem] = [p for p in json.loads(listing.stdout)["problems"]
                     if p["distribution"] == "acme-lora"]
        assert "also registered by lora-lite-lora (built in), which keeps it" in problem["error"]
        assert "'acme-lora:lora'" in problem["fix"] and "LORA_LITE_PLUGINS=acme-lora" in problem["fix"]
        out = tmp_path / "run"
        result = runner.invoke(get_app(), [
            "train", "--variant", "acme-lora:lora", "--model", tiny_dir, "--steps", "1",
            "--batch-size", "2", "--eval-limit", "0", "--seq-len", "160", "--threads", "1",
            "--output", str(out)])
        assert result.exit_code == 0, result.output
        header = ll.read_header(out / "adapter.safetensors")[0]
        assert header["variant"] == "acme-lora:lora" and header["plugin"] == "acme-lora"
    # the stranger gone, its file is refused rather than run by the built-in
    model, _ = __import__("lora_lite_cli.models", fromlist=["_"]).load_model(tiny_dir)
    with pytest.raises(ll.AdapterFileError, match="needs variant .acme-lora:lora., which is not installed"):
        ll.load(model, out / "adapter.safetensors")
