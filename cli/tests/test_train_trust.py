"""`lora-lite train` against bad numbers, bad files and interruptions (issue 11, CLI and
training): every bad value is one line and exit 2 before any training; an interrupted run
(SIGINT or SIGTERM, at any point) resumes to the uninterrupted run's adapter bit for bit, from
any working directory; the base-gradient leak counter fires on a leak."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from lora_lite.testing import gain_variant, registered
from lora_lite_cli.app import get_app

runner = CliRunner()
SMALL = ["--steps", "4", "--batch-size", "4", "--eval-limit", "0", "--seq-len", "160",
         "--threads", "1", "--rank", "4"]


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "run"
    result = runner.invoke(get_app(), ["train", "--variant", "lora", "--model", tiny_dir,
                                       *SMALL, "--output", str(out)])
    assert result.exit_code == 0, result.output
    return out


def tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_bit_identical(out, ref):
    got, want = tensors(out / "adapter.safetensors"), tensors(ref / "adapter.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k]), k
    m, r = (json.loads((p / "metrics.json").read_text()) for p in (out, ref))
    assert m["status"] == "completed" and m["train"]["losses"] == r["train"]["losses"]


def one_error_line(result, code, needle):
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output


@pytest.mark.parametrize("option, value", [
    ("--grad-clip", "-1"), ("--eval-batch-size", "0"), ("--threads", "-1"),
    ("--weight-decay", "-1"), ("--lr", "inf"), ("--lr", "nan"), ("--grad-clip", "inf"),
])
def test_bad_numbers_fail_before_anything_loads(tiny_dir, tmp_path, option, value):
    out = tmp_path / "run"
    result = runner.invoke(get_app(), ["train", "--variant", "lora", "--model", tiny_dir,
                                       *SMALL, option, value, "--output", str(out)])
    one_error_line(result, 2, option)
    assert not out.exists()  # refused before any training or file


@pytest.mark.parametrize("content, needle", [
    (b"1\n2\n", "record 0 is a int"),
    (b'{"question": "a", "answer": "#### 1"}\n"text"\n', "record 1 is a str"),
    (b'{"question": "caf\xe9", "answer": "#### 1"}\n', "not UTF-8"),
])
def test_bad_jsonl_is_one_line(tiny_dir, tmp_path, content, needle):
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    result = runner.invoke(get_app(), ["train", "--variant", "lora", "--model", tiny_dir,
                                       *SMALL, "--train-data", str(path),
                                       "--output", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in result.output
    assert result.output.rstrip().splitlines()[-1] == errors[0]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not_a_dict", "missing_keys"])
def test_malformed_checkpoint_is_one_line(reference, tmp_path, damage):
    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    (ckpt / "adapter.safetensors").write_bytes((reference / "adapter.safetensors").read_bytes())
    state = ckpt / "trainer.pt"
    if damage == "garbage":
        state.write_bytes(b"\x00not a torch file")
    elif damage == "truncated":
        torch.save({"step": 1, "blob": torch.zeros(1000)}, state)
        state.write_bytes(state.read_bytes()[:300])
    elif damage == "not_a_dict":
        torch.save([1, 2, 3], state)
    else:
        torch.save({"step": 1}, state)
    result = runner.invoke(get_app(), ["train", "--resume", str(ckpt)])
    one_error_line(result, 2, "--resume")
    assert "start the run again" in result.output


class _Payload:
    """Unpickling this creates a marker file: proof that code from the checkpoint ran."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_pickle_in_a_checkpoint_never_runs(reference, tmp_path):
    """Checkpoints are read with torch.load(weights_only=True): a pickle that would run code
    is refused in one line and the payload never runs (the adapter is safetensors)."""
    import pickle
    pickle.loads(pickle.dumps(_Payload(tmp_path / "selftest")))  # the payload does work
    assert (tmp_path / "selftest").exists()
    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    (ckpt / "adapter.safetensors").write_bytes((reference / "adapter.safetensors").read_bytes())
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "x": _Payload(marker)}, ckpt / "trainer.pt")
    result = runner.invoke(get_app(), ["train", "--resume", str(ckpt)])
    one_error_line(result, 2, "--resume")
    assert not marker.exists()


def test_exit_codes_are_documented():
    result = runner.invoke(get_app(), ["--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for code, meaning in [("0", "ok"), ("1", "failed"), ("2", "bad input"), ("3", "non-finite"),
                          ("130", "interrupted")]:
        assert f"{code} {meaning}" in text, text


def interrupt_after_optimizer_step(monkeypatch, at_step, signum):
    """Two signals delivered right after optimizer.step() of step ``at_step`` (1-based): the
    second one 'lands' between the update and its bookkeeping."""
    original = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *a, **kw):
        result = original(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == at_step:
            os.kill(os.getpid(), signum)
            os.kill(os.getpid(), signum)
        return result
    monkeypatch.setattr(torch.optim.AdamW, "step", step)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_right_after_optimizer_step_resumes_bit_for_bit(reference, tiny_dir, tmp_path,
                                                                monkeypatch, signum):
    out = tmp_path / "run"
    interrupt_after_optimizer_step(monkeypatch, 2, signum)
    result = runner.invoke(get_app(), ["train", "--variant", "lora", "--model", tiny_dir,
                                       *SMALL, "--output", str(out)])
    assert result.exit_code == 130, result.output
    assert "checkpoint saved" in result.output
    state = torch.load(out / "checkpoint" / "trainer.pt", weights_only=True)
    # the checkpoint marked N holds N updates: AdamW's own step count says so
    adam_steps = {int(v["step"]) for v in state["optimizer"]["state"].values()}
    assert adam_steps == {state["step"]} and state["step"] == 2 == len(state["losses"])
    monkeypatch.undo()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # resume from another working directory
    result = runner.invoke(get_app(), ["train", "--resume", str(out / "checkpoint")])
    assert result.exit_code == 0, result.output
    assert not (elsewhere / "lora-lite-runs").exists()
    assert_bit_identical(out, reference)


def sigterm_on_call(monkeypatch, owner, attr, at_call, before=True):
    """SIGTERM to this process on the ``at_call``-th call of ``owner.attr`` (before or after the
    original runs): the handler only sets a flag, the run goes on to the next step boundary."""
    original = getattr(owner, attr)
    calls = {"n": 0}

    def wrapped(*a, **kw):
        calls["n"] += 1
        if before and calls["n"] == at_call:
            os.kill(os.getpid(), signal.SIGTERM)
        result = original(*a, **kw)
        if not before and calls["n"] == at_call:
            os.kill(os.getpid(), signal.SIGTERM)
        return result
    monkeypatch.setattr(owner, attr, wrapped)


def _points():
    import importlib
    loop, run = (importlib.import_module(f"lora_lite_cli.training.{m}") for m in ("loop", "run"))
    from lora_lite_cli.commands.train import RichReporter
    return {  # where SIGTERM lands -> (patch, the step the checkpoint must be at)
        "loading the model": ((run.Run, "load", 1), 0),
        "forward of step 1": ((loop, "loss_sum", 1), 1),
        "optimizer.step of step 2": ((torch.optim.AdamW, "step", 2, False), 2),
        "forward of step 3": ((loop, "loss_sum", 3), 3),
        # after the last step's all-reduce carried no flag: still no step more, no evaluation
        "progress line of the last step": ((RichReporter, "step", 4), 4),
    }


@pytest.mark.parametrize("point", ["loading the model", "forward of step 1",
                                   "optimizer.step of step 2", "forward of step 3",
                                   "progress line of the last step"])
def test_sigterm_at_five_points_checkpoints_and_resumes_exactly(reference, tiny_dir, tmp_path,
                                                                monkeypatch, point):
    """Issue 24: wherever SIGTERM lands, the run stops at the next step boundary (never one
    step later), writes a checkpoint, and --resume finishes bit for bit as the uninterrupted run."""
    patch, expected_step = _points()[point]
    out = tmp_path / "run"
    sigterm_on_call(monkeypatch, *patch)
    result = runner.invoke(get_app(), ["train", "--variant", "lora", "--model", tiny_dir,
                                       *SMALL, "--output", str(out)])
    assert result.exit_code == 130, result.output
    assert "SIGTERM: stopping after this step" in result.output
    state = torch.load(out / "checkpoint" / "trainer.pt", weights_only=True)
    assert state["step"] == expected_step == len(state["losses"]), point
    monkeypatch.undo()
    result = runner.invoke(get_app(), ["train", "--resume", str(out / "checkpoint")])
    assert result.exit_code == 0, result.output
    assert_bit_identical(out, reference)


def test_relative_output_resumes_into_the_original_folder(tiny_dir, tmp_path, monkeypatch):
    first = tmp_path / "first"
    first.mkdir()
    monkeypatch.chdir(first)
    interrupt_after_optimizer_step(monkeypatch, 1, signal.SIGINT)
    result = runner.invoke(get_app(), ["train", "--variant", "lora", "--model", tiny_dir,
                                       *SMALL, "--output", "rel_run"])
    assert result.exit_code == 130, result.output
    monkeypatch.undo()
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    result = runner.invoke(get_app(), ["train", "--resume", str(first / "rel_run")])
    assert result.exit_code == 0, result.output
    m = json.loads((first / "rel_run" / "metrics.json").read_text())
    assert m["status"] == "completed" and not (other / "rel_run").exists()


def lora_lite_script():
    path = os.path.join(os.path.dirname(sys.executable), "lora-lite")
    assert os.path.isfile(path), "the lora-lite console script is not installed"
    return path


LONG = ["--steps", "40", "--batch-size", "2", "--eval-limit", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def long_reference(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("long_ref") / "run"
    result = runner.invoke(get_app(), ["train", "--variant", "lora", "--model", tiny_dir, *LONG,
                                       "--output", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("signals", [(signal.SIGTERM,), (signal.SIGINT, signal.SIGINT)])
def test_console_script_signals_checkpoint_without_traceback(tiny_dir, long_reference, tmp_path,
                                                             monkeypatch, signals):
    """A real process: SIGTERM behaves like Ctrl-C; a second Ctrl-C stops at once, quietly.
    Either way the checkpoint resumes (from another directory) to the uninterrupted adapter."""
    out = tmp_path / "run"
    proc = subprocess.Popen([lora_lite_script(), "train", "--variant", "lora", "--model", tiny_dir,
                             *LONG, "--output", str(out), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    for line in proc.stderr:  # with --json, progress lines go to stderr
        lines.append(line)
        if line.startswith("step "):
            for signum in signals:
                proc.send_signal(signum)
            break
    rest_out, rest_err = proc.communicate(timeout=300)
    err = "".join(lines) + rest_err
    assert proc.returncode == 130, err[-3000:]
    assert "checkpoint saved" in err and "Traceback" not in err and rest_out == ""
    name = "SIGTERM" if signals[0] == signal.SIGTERM else "Ctrl-C"
    assert f"{name}: stopping after this step" in err
    state = torch.load(out / "checkpoint" / "trainer.pt", weights_only=True)
    assert 1 <= state["step"] < 40 and len(state["losses"]) == state["step"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = runner.invoke(get_app(), ["train", "--resume", str(out / "checkpoint")])
    assert result.exit_code == 0, result.output
    assert_bit_identical(out, long_reference)


def leaky_forward(layer, x, y):
    """A broken variant's hook: it turns on the gradient of the base weight it adapts."""
    layer.weight.requires_grad_(True)
    return y * layer.lora_g


def test_the_leak_counter_fires_on_a_base_gradient_leak(tiny_dir, tmp_path):
    with registered(gain_variant("cli_leaky", forward=leaky_forward), name="cli_leaky",
                    distribution="cli-leaky"):
        result = runner.invoke(get_app(), ["train", "--variant", "cli_leaky", "--model", tiny_dir,
                                           *SMALL, "--steps", "2", "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["sanity"]["base_grad_leaks"] > 0 and m["sanity"]["ok"] is False
    assert "FAILED" in result.output


def test_sigterm_while_finishing_does_not_claim_a_checkpoint(tiny_dir, tmp_path, monkeypatch):
    """After the last step there is nothing to checkpoint: the run finishes (exit 0) and the
    message says so instead of promising a checkpoint."""
    import importlib
    run = importlib.import_module("lora_lite_cli.training.run")
    sigterm_on_call(monkeypatch, run.Run, "finish", 1)
    result = runner.invoke(get_app(), ["train", "--variant", "lora", "--model", tiny_dir,
                                       *SMALL, "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "SIGTERM: training is done, the run is being finished" in result.output
    assert not (tmp_path / "run" / "checkpoint").exists()
