"""One version for every distribution of this repository: the VERSION file at its root. Each
pyproject reads it (hatch's version source), each declares a lora-lite range that admits it, and
the installed metadata and ``__version__`` agree with it."""
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import tomllib

import lora_lite
import lora_lite_cli

ROOT = Path(__file__).resolve().parents[1]
VERSION = (ROOT / "VERSION").read_text().strip()
PROJECTS = sorted([ROOT / "core", ROOT / "cli", *(p.parent for p in ROOT.glob("plugins/*/pyproject.toml"))])


def pyproject(folder):
    return tomllib.loads((folder / "pyproject.toml").read_text())


def admits(spec, v):
    """Whether a ">=a,<b" range (the only form used here) admits version v."""
    def key(s):
        return tuple(int(x) for x in s.split("."))
    for part in spec.split(","):
        op, bound = re.fullmatch(r"(>=|<)([\d.]+)", part.strip()).groups()
        if (op == ">=" and key(v) < key(bound)) or (op == "<" and key(v) >= key(bound)):
            return False
    return True


@pytest.mark.parametrize("folder", PROJECTS, ids=lambda p: p.name)
def test_every_distribution_takes_its_version_from_the_version_file(folder):
    data = pyproject(folder)
    assert "version" not in data["project"] and "version" in data["project"]["dynamic"]
    source = data["tool"]["hatch"]["version"]
    assert (folder / source["path"]).resolve() == ROOT / "VERSION"
    assert version(data["project"]["name"]) == VERSION
    for dep in data["project"].get("dependencies", []):
        if dep.startswith("lora-lite>") or dep.startswith("lora-lite<"):
            assert admits(dep.removeprefix("lora-lite"), VERSION), (folder.name, dep)


def test_dunder_versions_are_the_installed_ones():
    assert lora_lite.__version__ == lora_lite_cli.__version__ == VERSION


def test_the_range_check_can_fail():
    assert admits(">=0.1,<0.2", "0.1.0") and not admits(">=0.1,<0.2", "0.2.0")
    assert not admits(">=0.1,<0.2", "0.0.9")
