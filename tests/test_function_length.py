"""No function or method in the shipped source is longer than MAX_LINES lines: a long body is
split into small functions with one job each. Walks core, cli, plugins and the third-party
example with ``ast`` (end_lineno - lineno + 1, decorators not counted)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 80


def source_roots() -> list[Path]:
    return [ROOT / "core" / "src", ROOT / "cli" / "src", *sorted(ROOT.glob("plugins/*/src")),
            ROOT / "third_party_example" / "src"]


def long_functions(source: str, filename: str = "<source>", limit: int = MAX_LINES) -> list[str]:
    """'file:line name (N lines)' for each function or method of ``source`` over ``limit`` lines."""
    out = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                out.append(f"{filename}:{node.lineno} {node.name} ({length} lines)")
    return out


def test_no_function_over_the_limit():
    found = []
    for root in source_roots():
        assert root.is_dir(), root
        for path in sorted(root.rglob("*.py")):
            found += long_functions(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert not found, f"functions over {MAX_LINES} lines (split them):\n" + "\n".join(found)


def _generated(lines: int) -> str:
    body = "".join(f"    x{i} = {i}\n" for i in range(lines - 2))
    return f"class C:\n    def method(self):\n        pass\n\n\ndef long_one():\n{body}    return 0\n"


def test_the_check_fires_on_an_81_line_function():
    source = _generated(MAX_LINES + 1)
    assert long_functions(source, "probe.py") == ["probe.py:6 long_one (81 lines)"]
    assert long_functions(_generated(MAX_LINES), "probe.py") == []  # 80 lines pass
