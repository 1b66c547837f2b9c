"""scripts/gpu-check, what a CPU can check: it parses, plans every variant x setting, and
refuses clearly without CUDA."""
import os
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "gpu-check")


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_gpu_check_plans_and_refuses_without_cuda():
    import lora_lite as ll
    assert run("--help").returncode == 0
    dry = run("--dry-run", "--steps", "3")
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[-1] == "cost-report --device cuda --compare peft"
    assert len(lines) - 1 == 3 * len(ll.variants())  # bf16, 4bit, 8bit per variant
    assert any("lora [4bit] 3 steps" in line and "'quantize': '4bit'" in line for line in lines)
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal cannot be seen here")
    refused = run("--variants", "lora")
    assert refused.returncode == 2 and "no CUDA device" in refused.stderr
    assert "Traceback" not in refused.stderr
    bad = run("--steps", "0")
    assert bad.returncode == 2 and "--steps" in bad.stderr


def test_gpu_check_plans_fsdp2_and_qlora_fsdp2():
    """--fsdp adds LoRA and QLoRA under FSDP2, launched by accelerate on every GPU; without
    2 GPUs it stops in one line."""
    dry = run("--dry-run", "--variants", "lora", "--fsdp")
    assert dry.returncode == 0, dry.stderr
    fsdp = [line for line in dry.stdout.splitlines() if "fsdp2" in line]
    assert [line.split()[0] for line in fsdp] == ["fsdp2-bf16", "qlora-fsdp2"]
    assert all("--use_fsdp --fsdp_version 2" in line and "--num_processes 2" in line
               for line in fsdp)
    assert "--quantize 4bit" in fsdp[1] and "--quantize" not in fsdp[0]
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has 2+ GPUs: the refusal cannot be seen here")
    refused = run("--variants", "lora", "--fsdp")
    assert refused.returncode == 2 and "2+ CUDA devices" in refused.stderr
