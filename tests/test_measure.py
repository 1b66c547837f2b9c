"""lora_lite.testing.measure: the measuring shared by cost-report and the benchmarks."""
import pytest
import torch

from lora_lite.testing import bench, measure


def test_token_batch_is_fixed_by_its_seed_and_fully_masked():
    a, b = measure.token_batch(50, 2, 7, seed=3), measure.token_batch(50, 2, 7, seed=3)
    assert torch.equal(a["input_ids"], b["input_ids"]) and a["input_ids"].shape == (2, 7)
    assert int(a["input_ids"].max()) < 50 and bool(a["attention_mask"].eq(1).all())
    assert not torch.equal(a["input_ids"], measure.token_batch(50, 2, 7, seed=4)["input_ids"])


def test_interleaved_phases_rotate_the_turn_order():
    calls = []
    phases = {phase: {name: (lambda p=phase, n=name: calls.append((p, n))) for name in "ab"}
              for phase in ("fwd", "step")}
    times = measure.interleaved(phases, 2, "cpu")
    assert calls == [("fwd", "a"), ("fwd", "b"), ("step", "a"), ("step", "b"),
                     ("fwd", "b"), ("fwd", "a"), ("step", "b"), ("step", "a")]
    assert all(len(times[p][n]["wall"]) == 2 for p in phases for n in "ab")


def test_peak_memory_both_cpu_methods_see_an_allocation():
    with measure.PeakMemory("cpu", cpu="tensors") as tensors:
        block = torch.ones(1 << 20)  # 4 MiB
        del block
    assert 4 <= tensors.peak_mb < 5
    with measure.PeakMemory("cpu") as process:
        block = torch.ones(16 * 2**20)  # 64 MiB, every page touched
        del block
    assert process.peak_mb is None or 60 < process.peak_mb < 100


def test_bench_reuses_the_measure_helpers():
    assert bench.sync is measure.sync and bench.timed is measure.timed and bench.turn_order is measure.turn_order


def test_a_bad_cpu_method_is_one_line():
    with pytest.raises(ValueError, match=r"^PeakMemory: cpu='rss', expected one of tensors, process$"):
        measure.PeakMemory("cpu", cpu="rss")
