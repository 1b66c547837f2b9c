"""The third-party example as a user gets it: build its wheel, pip-install it into a throwaway
environment, find ``vera`` through the real entry-point machinery in fresh interpreters, save a
VeRA adapter, reload it elsewhere, ``pip uninstall`` it, and check that loading the saved adapter
then fails with a message naming the distribution to install. Offline: no index is contacted.

The throwaway environment is a venv (no pip of its own) whose site-packages links every entry of
the test environment's site-packages except any lora-lite-vera already installed there, so torch
and friends are available without copies or downloads, and the example starts out not installed.
"""
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "third_party_example"
DIST, PACKAGE = "lora-lite-vera", "lora_lite_vera"


def run(cmd, **kw):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LORA_LITE_PLUGINS")}
    env["PIP_NO_INDEX"] = env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env,
                         timeout=120, **kw)
    assert out.returncode == 0, f"{cmd}\n{out.stdout}\n{out.stderr}"
    return out.stdout


def is_example(entry: str) -> bool:
    name = entry.lower().replace("-", "_")
    return PACKAGE in name  # the package, its dist-info, an editable install's .pth / finder


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", out, EXAMPLE])
    [whl] = out.glob("lora_lite_vera-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("env") / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", root])
    python = root / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                .strip())
    ours = {Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
    for folder in ours:
        for entry in folder.iterdir():
            if not is_example(entry.name) and not (site / entry.name).exists():
                (site / entry.name).symlink_to(entry)
    return python


# A small torch model keeps each fresh interpreter quick (no transformers import).
MODEL = '''
import json, sys, torch, lora_lite as ll
from safetensors.torch import load_file, save_file

class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj, self.v_proj = torch.nn.Linear(16, 16), torch.nn.Linear(16, 32)
        self.o_proj = torch.nn.Linear(32, 16)
    def forward(self, x):
        return self.o_proj(self.v_proj(torch.tanh(self.q_proj(x))))

x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
def out(model):
    with torch.no_grad():
        return model(x)
'''

PROBE_SAVE = MODEL + '''
from lora_lite import plugins
found = "vera" in ll.variants()
origin = plugins.variant_origin("vera")
model = Block()
ll.attach(model, ll.config("vera", r=4, target_names=["q_proj$", "v_proj$"], projection_seed=7))
with torch.no_grad():  # a "trained" adapter
    for name, p in model.named_parameters():
        if "lora_lambda" in name:
            p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
ll.save(model, sys.argv[1])
save_file({"out": out(model)}, sys.argv[2])
vera = ll.variants()["vera"]
print(json.dumps({"distribution": origin.distribution, "version": origin.version, "found": found,
                  "module": vera.__module__, "file": sys.modules[vera.__module__].__file__,
                  "effect": (out(model) - out(Block())).abs().max().item()}))
'''

PROBE_LOAD = MODEL + '''
model = Block()
before = out(model)
result = {"variants": sorted(ll.variants())}
try:
    ll.load(model, sys.argv[1])
    result["reload_err"] = (out(model) - load_file(sys.argv[2])["out"]).abs().max().item()
except ll.AdapterFileError as e:
    result["error"] = str(e)
    result["untouched"] = ll.attached(model) is None and torch.equal(out(model), before)
try:
    ll.config("vera")
except ll.VariantNotInstalled as e:
    result["config_error"] = str(e)
print(json.dumps(result))
'''


def probe(python, code, *args):
    return json.loads(run([python, "-c", code, *args]).strip().splitlines()[-1])


def test_wheel_install_discover_save_uninstall(wheel, venv, tmp_path):
    adapter, outputs = tmp_path / "vera.safetensors", tmp_path / "outputs.safetensors"
    run([venv, "-m", "pip", "install", "--no-deps", "--no-cache-dir", wheel])
    saved = probe(venv, PROBE_SAVE, adapter, outputs)
    assert saved["found"] and (saved["distribution"], saved["version"]) == (DIST, "0.1.0")
    assert saved["module"] == "lora_lite_vera.vera"
    assert Path(saved["file"]).is_relative_to(venv.parent.parent)  # the wheel's copy, not src/
    assert saved["effect"] > 1e-3

    # a fresh interpreter regenerates A and B from the stored seed: same outputs
    reloaded = probe(venv, PROBE_LOAD, adapter, outputs)
    assert "vera" in reloaded["variants"] and "config_error" not in reloaded
    assert reloaded["reload_err"] <= 1e-6

    run([venv, "-m", "pip", "uninstall", "-y", DIST])
    after = probe(venv, PROBE_LOAD, adapter, outputs)
    assert "vera" not in after["variants"] and "lora" in after["variants"]
    assert "needs variant 'vera', which is not installed" in after["error"]
    assert "the file says it was written by lora-lite-vera" in after["error"]
    assert after["error"].endswith(": pip install lora-lite-vera")
    assert after["untouched"] is True
    # ll.config("vera"): nothing installed is known to provide it, so no package is guessed
    assert "no installed plugin provides it" in after["config_error"]
    assert "pip install" not in after["config_error"]
