"""lora_lite.testing.bench, the benchmark scaffolding: interleaving, peak memory, the frozen-base floor."""
import argparse

import pytest
import torch

from lora_lite.testing import bench, make_batch, tiny_llama


def test_interleaved_calls_rotate_who_goes_first():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = bench.interleaved_calls(fns, warmup=1, rounds=3, device="cpu")
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert all(len(t["wall"]) == len(t["cpu"]) == 3 for t in times.values())


def test_peak_step_memory_sees_the_step_allocation():
    def step(_):
        big = torch.ones(1 << 20)          # 4 MiB alive at once, then freed
        return big.sum()
    peak = bench.peak_step_memory(step, None, "cpu")
    assert 4 << 20 <= peak < 5 << 20


def test_floor_model_keeps_the_function_and_trains_one_scalar_per_target():
    base = tiny_llama()
    floor = bench.floor_model(base, r"(q_proj|v_proj)$")
    trainable = [p for p in floor.parameters() if p.requires_grad]
    assert len(trainable) == 2 * base.config.num_hidden_layers and all(p.numel() == 1 for p in trainable)
    batch = make_batch()
    with torch.no_grad():
        assert torch.equal(floor(**batch).logits, base(**batch).logits)
    step, n_params = bench.trainer(floor)
    step(batch)
    assert n_params == len(trainable) and all(p.grad is not None for p in trainable)
    with pytest.raises(ValueError, match="no module name matches"):
        bench.floor_model(base, r"nothing_here$")


def test_print_table_ratios(capsys):
    times = {"ours": {"wall": [1.0, 2.0, 3.0], "cpu": [1.0, 1.0, 1.0]},
             "peft": {"wall": [4.0, 4.0, 4.0], "cpu": [2.0, 2.0, 2.0]}}
    args = argparse.Namespace(device="cpu", rounds=3, warmup=0)
    med = bench.print_table(times, {"ours": 1 << 20, "peft": 2 << 20}, args)
    out = capsys.readouterr().out
    assert med == {"ours": 2.0, "peft": 4.0}
    assert "ratios (ours / peft): time 0.50x (inverse 2.00x), CPU time 0.50x, peak step memory 0.50x" in out
