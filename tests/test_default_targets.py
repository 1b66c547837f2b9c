"""The default targets (the q/v projections) are written once, ``lora_lite.targets.DEFAULT_TARGET_NAMES``:
the CLI's defaults, its help texts and the conformance suite read that constant. This test scans
the string literals of core/src and cli/src (docstrings, usage examples, are exempt) for a
q_proj regex anywhere else."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from lora_lite.targets import DEFAULT_TARGET_NAMES

ROOT = Path(__file__).resolve().parents[1]
DEFINITION = ("core/src/lora_lite/targets.py", "DEFAULT_TARGET_NAMES")
Q_PROJ_REGEX = re.compile(r"q_proj\s*[$|)]|[(|]\s*q_proj")  # q_proj$, (q_proj|v_proj)$, ...


def _docstrings(tree) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _defined_here(tree, name) -> set[int]:
    """The string constants of the assignment ``name = ...`` (the one definition)."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            ids |= {id(c) for c in ast.walk(node.value) if isinstance(c, ast.Constant)}
    return ids


def q_proj_literals(source: str, filename: str, allowed: str | None = None) -> list[str]:
    """'file:line text' of each string literal of ``source`` holding a q_proj regex, docstrings and
    the assignment to ``allowed`` left out."""
    tree = ast.parse(source, filename)
    skip = _docstrings(tree) | (_defined_here(tree, allowed) if allowed else set())
    return [f"{filename}:{node.lineno} {node.value!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
            and Q_PROJ_REGEX.search(node.value)]


def test_the_default_targets_are_written_in_one_place():
    found = []
    for root in (ROOT / "core" / "src", ROOT / "cli" / "src"):
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            allowed = DEFINITION[1] if rel == DEFINITION[0] else None
            found += q_proj_literals(path.read_text(encoding="utf-8"), rel, allowed)
    assert not found, "q_proj regexes outside lora_lite.targets.DEFAULT_TARGET_NAMES:\n" + "\n".join(found)


def test_the_definition_is_the_q_and_v_projections():
    source = (ROOT / DEFINITION[0]).read_text(encoding="utf-8")
    assert q_proj_literals(source, DEFINITION[0]) != []  # it is there, and only the exemption hides it
    assert q_proj_literals(source, DEFINITION[0], DEFINITION[1]) == []
    assert all(Q_PROJ_REGEX.search(t) or "v_proj" in t for t in DEFAULT_TARGET_NAMES)


def test_the_check_fires_on_a_probe():
    probe = ('"""Docstring: target_names=[r"q_proj$"] is an example."""\n'
             'DEFAULT_TARGET_NAMES = (r"q_proj$", r"v_proj$")\n'
             'GENERIC = dict(targets=(r"(q_proj|v_proj)$",))\n'
             'def f():\n'
             '    return f"Regex (default: the variant\'s own, else q_proj$ and v_proj$)."\n'
             'NAMES = ("q_proj", "k_proj")  # plain names, no regex\n')
    found = q_proj_literals(probe, "probe.py", "DEFAULT_TARGET_NAMES")
    assert sorted(f.split()[0] for f in found) == ["probe.py:3", "probe.py:5"], found
