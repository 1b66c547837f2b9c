"""The benchmark scripts still run end to end (a tiny shape, one round): they back figures in
the READMEs, so a change that breaks one must fail here, not when someone re-measures."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--hidden", "128", "--batch", "1", "--seq", "8", "--warmup", "0", "--rounds", "1"]
SIDE_BY_SIDE = [
    ("plugins/oft/benchmarks/oft_vs_peft.py", ["--floor"]),
    ("plugins/oft/benchmarks/oft_vs_peft.py", ["--layer", "--only", "boft", "--factors", "2"]),
    ("plugins/hra/benchmarks/hra_vs_peft.py", []),
    ("benchmarks/moe_vs_peft.py", []),
    ("plugins/dora/benchmarks/dora_vs_peft.py", []),
    ("plugins/lora/benchmarks/mixed_batch_vs_peft.py", ["--random", "--ks", "1,2", "--batch", "2"]),
    # bitsandbytes' CPU 4bit kernel needs widths that are multiples of 64 (intermediate 11/4·h)
    ("plugins/dora/benchmarks/dora_vs_peft.py", ["--quantize", "4bit", "--hidden", "256"]),
]


def run(script, args):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)


def _case_id(v):
    return " ".join(v) if isinstance(v, list) else Path(v).stem


@pytest.mark.parametrize("script,extra", SIDE_BY_SIDE, ids=_case_id)
def test_side_by_side_benchmark_runs(script, extra):
    out = run(script, TINY + extra)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lora-lite" in out.stdout and "peft" in out.stdout
    assert "same function" in out.stdout        # each checks both sides compute the same thing
    assert ("adapter alone (layer - base layer)" if "--layer" in extra
            else "ratios (lora-lite / peft)") in out.stdout


def test_interop_figures_runs(tmp_path):
    out = run("benchmarks/interop_figures.py", ["--json", str(tmp_path / "figures.json")])
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "figures.json").stat().st_size > 0 and "| lora |" in out.stdout


def test_a_broken_benchmark_fails_here(tmp_path):
    """The check can fail: a script that raises gives a non-zero exit code."""
    bad = tmp_path / "bad.py"
    bad.write_text("from lora_lite import bench\nbench.arg_parser('x').parse_args()\n"
                   "raise RuntimeError('broken')\n")
    assert run(str(bad), TINY).returncode != 0
