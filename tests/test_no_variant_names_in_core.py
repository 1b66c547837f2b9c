"""Core and the CLI keep no tables of built-in variants: no string literal in their code (docstrings
aside) names a variant that a plugin of this repository provides."""
import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def builtin_variant_names() -> set[str]:
    names = set()
    for plugin in (ROOT / "plugins").glob("*/src/*/*.py"):
        names |= set(re.findall(r'^\s+name = "([a-z0-9_]+)"', plugin.read_text(), re.M))
    return names


def code_strings(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                       ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docstrings:
            yield node.lineno, node.value


def offenders(paths, names):
    pattern = re.compile(r"\b(" + "|".join(sorted(names, key=len, reverse=True)) + r")\b")
    return [f"{p}:{line}: {text!r}" for p in paths
            for line, text in code_strings(p) if pattern.fullmatch(text.strip())]


def test_the_scan_knows_the_builtins_and_catches_a_literal(tmp_path):
    names = builtin_variant_names()
    assert {"lora", "dora", "hra", "boft"} <= names
    bad = tmp_path / "bad.py"
    bad.write_text('"""a docstring naming lora is fine"""\nDEFAULTS = {"hra": 1e-3}\n')
    assert [t for _, t in code_strings(bad)] == ["hra"]
    assert len(offenders([bad], names)) == 1 and "'hra'" in offenders([bad], names)[0]


def test_core_and_cli_name_no_builtin_variant():
    paths = sorted((ROOT / "core" / "src").rglob("*.py")) + sorted((ROOT / "cli" / "src").rglob("*.py"))
    assert paths
    assert offenders(paths, builtin_variant_names()) == []


def shipped_distributions() -> set[str]:
    import tomllib
    return {tomllib.loads(p.read_text())["project"]["name"] for p in (ROOT / "plugins").glob("*/pyproject.toml")}


def distribution_offenders(paths, dists):
    """Code strings (docstrings aside) that hold a shipped plugin distribution's name."""
    pattern = re.compile(r"(?<![\w-])(" + "|".join(sorted(map(re.escape, dists), key=len, reverse=True))
                         + r")(?![\w-])")
    return [f"{p}:{line}: {text!r}" for p in paths
            for line, text in code_strings(p) if pattern.search(text)]


def test_the_distribution_scan_catches_a_table_of_plugin_packages(tmp_path):
    dists = shipped_distributions()
    assert {"lora-lite-lora", "lora-lite-hra"} <= dists
    bad = tmp_path / "bad.py"
    bad.write_text('"""lora-lite-hra in a docstring is fine"""\n'
                   'BUILTINS = frozenset({"lora-lite", "lora-lite-hra"})\nOTHER = "lora-lite-hrax"\n')
    assert distribution_offenders([bad], dists) == [f"{bad}:2: 'lora-lite-hra'"]


def test_core_and_cli_keep_no_table_of_plugin_distributions():
    """Which distributions are built in is read from core's metadata (its [all] extra)."""
    paths = sorted((ROOT / "core" / "src").rglob("*.py")) + sorted((ROOT / "cli" / "src").rglob("*.py"))
    assert distribution_offenders(paths, shipped_distributions()) == []
