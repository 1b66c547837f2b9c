"""The core's layers: the runtime (lora_lite/*.py, lora_lite/layers/, lora_lite/plugins/) imports
nothing from lora_lite.testing or lora_lite.peft at module level, and `import lora_lite` (then
attach, save, load, detach on a plain torch model) loads no transformers, no peft, and none of
lora_lite.testing / lora_lite.peft. Each check is shown firing on a bad case."""
import ast
import json
import pathlib
import subprocess
import sys

import pytest

CORE = pathlib.Path(__file__).resolve().parents[1] / "core" / "src" / "lora_lite"
RUNTIME_DIRS = (CORE, CORE / "layers", CORE / "plugins")
FORBIDDEN = ("lora_lite.testing", "lora_lite.peft")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(CORE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(source: str, module: str, is_package: bool) -> set[str]:
    """Absolute names of the modules ``source`` imports at module level (not inside functions)."""
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{a.name}" for a in node.names)
    return names


def layering_violations(files) -> list[str]:
    out = []
    for path in files:
        mod = module_name(path)
        for name in sorted(top_level_imports(path.read_text(), mod, path.name == "__init__.py")):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN):
                out.append(f"{mod} imports {name}")
    return out


def runtime_files():
    return [p for d in RUNTIME_DIRS for p in sorted(d.glob("*.py"))]


def test_runtime_modules_import_nothing_from_testing_or_peft():
    assert len(runtime_files()) > 20
    assert layering_violations(runtime_files()) == []


def test_the_layering_check_fires_on_a_bad_module(tmp_path):
    bad = CORE / "layers" / "_layering_probe.py"
    bad.write_text("from ..testing import tiny_models\nfrom lora_lite.peft.export import export_peft\n")
    try:
        found = layering_violations([bad])
    finally:
        bad.unlink()
    assert found == ["lora_lite.layers._layering_probe imports lora_lite.peft.export",
                     "lora_lite.layers._layering_probe imports lora_lite.peft.export.export_peft",
                     "lora_lite.layers._layering_probe imports lora_lite.testing",
                     "lora_lite.layers._layering_probe imports lora_lite.testing.tiny_models"]


USE_THE_RUNTIME = r"""
import json, sys, tempfile, os
import torch
import lora_lite as ll
{extra}
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
ll.attach(model, ll.config("lora", r=2, target_names=[r"^0$", r"^2$"]))
path = os.path.join(tempfile.mkdtemp(), "a.safetensors")
ll.save(model, path)
ll.detach(model)
ll.load(model, path)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "peft")
                        or m.startswith(("lora_lite.testing", "lora_lite.peft")))))
"""


def loaded_modules(extra=""):
    proc = subprocess.run([sys.executable, "-c", USE_THE_RUNTIME.format(extra=extra)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_runtime_loads_no_transformers_peft_testing_or_interop():
    assert loaded_modules() == []


@pytest.mark.parametrize("extra, expected", [
    ("import lora_lite.testing.tiny_models", "lora_lite.testing"),
    ("ll.export_peft", "lora_lite.peft"),
])
def test_the_loaded_modules_check_fires(extra, expected):
    assert expected in loaded_modules(extra)


def test_old_module_paths_import_the_moved_module_with_a_deprecation_warning():
    import importlib
    import warnings

    from lora_lite._moved import MOVED
    assert len(MOVED) == 19
    for old, new in MOVED.items():
        sys.modules.pop(old, None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(old)
        assert module is importlib.import_module(new)
        assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught), old
    with pytest.raises(ModuleNotFoundError):  # only the moved names resolve
        importlib.import_module("lora_lite.never_existed")


def test_the_former_dense_backend_name_warns_and_is_dense_kind():
    from lora_lite.layers import weights
    from lora_lite.layers.kinds import DenseKind
    with pytest.warns(DeprecationWarning, match="DenseKind"):
        assert weights.DenseBackend is DenseKind
    with pytest.raises(AttributeError):
        weights.NoSuchName  # noqa: B018
