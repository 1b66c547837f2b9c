"""`lora-lite compare` on a tiny local model: the output files, the stored results reused on a
re-run (nothing re-trained, nothing re-evaluated), a deleted result re-run alone, --force,
--seeds, bad input as one line, and report.html self-contained and shown with its plots."""
import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lora_lite_cli.app import get_app
from lora_lite_cli.compare import htmlcheck
from lora_lite_cli.compare.results import wilson

runner = CliRunner()
VARIANTS = ["lora", "hra", "ia3"]
SMALL = ["--steps", "4", "--batch-size", "4", "--eval-limit", "4", "--max-new-tokens", "6",
         "--eval-batch-size", "4", "--seq-len", "160", "--threads", "1"]
PLOTS = ("accuracy_vs_params.png", "accuracy_vs_step_time.png", "loss_curves.png")
ROOT = Path(__file__).resolve().parents[2]


def compare(*args, expect=0):
    result = runner.invoke(get_app(), ["compare", *args])
    assert result.exit_code == expect, result.output + repr(result.exception)
    return result


def results_json(out):
    return json.loads((out / "results.json").read_text())


def result_files(out):
    return {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}


@pytest.fixture(scope="module")
def first(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    args = ["--variants", *VARIANTS, "--model", str(tiny_dir), *SMALL, "--output", str(out)]
    compare(*args)
    return out, args


def test_writes_results_plots_and_report(first):
    out, _ = first
    for name in ("results.json", "results.md", "report.html", *PLOTS):
        assert (out / name).is_file(), name
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = results_json(out)
    assert [v["variant"] for v in data["variants"]] == VARIANTS
    assert len(data["sweep"]["ran"]) == 3 and data["sweep"]["skipped"] == []
    for run in data["runs"]:
        assert run["status"] == "completed" and len(run["losses"]) == 4
        assert run["trainable_params"] > 0 and run["adapter_bytes"] > 0
        assert run["config"]["variant"] == run["variant"]
        assert run["after"]["n"] == 4 and len(run["after"]["ci95"]) == 2
        assert run["step_time_s"] > 0 and run["peak_rss_mb"] > 0
        assert run["host"]["versions"]["torch"] and run["load_average_1min"]["samples"] >= 2
    # the base model was evaluated once: the first variant's run, the others took it
    assert [r["base_shared"] for r in data["runs"]] == [False, True, True]
    assert len(list((out / "runs").glob("base-*.json"))) == 1
    md = (out / "results.md").read_text()
    assert md.startswith("`lora-lite compare") and "load average" in md
    assert all(f"| {v} |" in md for v in VARIANTS)


def test_rerun_skips_every_stored_result(first):
    out, args = first
    before = result_files(out)
    result = compare(*args)
    data = results_json(out)
    assert data["sweep"]["ran"] == [] and len(data["sweep"]["skipped"]) == 3
    assert result_files(out) == before  # no result (nor the base evaluation) was written again
    assert "reused 3 stored" in result.output


def test_a_deleted_result_reruns_alone_and_force_reruns_one(first):
    out, args = first
    (hra,) = (out / "runs").glob("hra-*.json")
    (ia3,) = (out / "runs").glob("ia3-*.json")
    hra.unlink()
    stamp = json.loads(ia3.read_text())["finished_at"]
    before = result_files(out)
    compare(*args, "--force", "ia3")
    data = results_json(out)
    assert sorted(data["sweep"]["ran"]) == sorted([hra.stem, ia3.stem])
    assert len(data["sweep"]["skipped"]) == 1  # lora: untouched
    after = result_files(out)
    assert {k: v for k, v in after.items() if k not in (hra.name, ia3.name)} == \
        {k: v for k, v in before.items() if k != ia3.name}
    assert json.loads(ia3.read_text())["finished_at"] > stamp
    # neither re-evaluated the base model: the stored evaluation was taken
    assert json.loads(hra.read_text())["base_shared"] is True
    assert json.loads(ia3.read_text())["base_shared"] is True


def test_seeds_give_mean_and_spread_reusing_seed_0(first):
    out, args = first
    args = [a for a in args]
    args[args.index("--variants") + 1:args.index("--variants") + 4] = ["lora"]
    compare(*args, "--seeds", "2", "--markdown")
    data = results_json(out)
    assert len(data["sweep"]["ran"]) == 1 and len(data["sweep"]["skipped"]) == 1  # seed 0 stored
    (lora,) = data["variants"]
    assert lora["seeds"] == [0, 1] and lora["accuracy_after"]["n"] == 2
    assert set(lora["accuracy_after"]) >= {"mean", "std", "min", "max"}
    assert [r["base_shared"] for r in data["runs"]] == [False, True]


@pytest.mark.parametrize("args, message", [
    (["--variants", "lora", "nosuchvariant"], "nosuchvariant"),
    (["--variants", "lora", "--set", "alpha=8"], "expected VARIANT.knob=value"),
    (["--variants", "lora", "--set", "hra.r=4"], "is not one of --variants"),
    (["--variants", "lora", "--set", "lora.nosuchknob=1"], "unknown knob 'nosuchknob'"),
    (["--variants", "lora", "--variant", "hra"], "--variant is not a compare option"),
    (["--variants", "lora", "--bogus-flag", "1"], "No such option"),
    (["--variants", "lora", "--steps", "0"], "--steps 0"),
    (["--variants", "lora", "--force", "hra"], "--force hra: not one of --variants"),
    (["--variants", "lora", "--seeds", "0"], "--seeds 0"),
    (["--variants", "lora", "--set", "lora.lr=fast"], "expected a float for lr"),
    (["--variants", "lora", "--model", "/no/such/model"], "/no/such/model"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, message):
    result = compare(*args, "--output", str(tmp_path / "out"), expect=2)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
    assert not (tmp_path / "out").exists()  # refused before anything ran or was written


def test_per_variant_settings_and_knobs_override_the_common_ones(tmp_path):
    from lora_lite_cli.compare import plan
    sets = plan.per_variant_sets(["hra.lr=0.01", "lora.rank=2", "lora.targets=k_proj$",
                                  "hra.r=2"], ["lora", "hra"])
    jobs = plan.make_jobs(["lora", "hra"], {"lr": 1e-3, "steps": 4}, sets, 2, str(tmp_path))
    lora0, lora1, hra0, hra1 = jobs
    assert (lora0.settings.rank, lora0.settings.lr, lora0.settings.targets) == (2, 1e-3, ("k_proj$",))
    assert (hra0.settings.lr, hra0.settings.knobs["r"]) == (0.01, "2")
    assert (lora0.seed, lora1.seed) == (0, 1) and lora0.fingerprint != lora1.fingerprint
    # the base evaluation does not depend on the variant, its training settings or the seed
    assert len({j.base_fingerprint for j in jobs}) == 1
    assert lora0.settings.output == lora0.run_dir and lora0.result_path.endswith(
        f"runs/lora-{lora0.fingerprint}.json")


def test_wilson_interval():
    lo, hi = wilson(5, 10)
    assert abs(lo - 0.2366) < 1e-3 and abs(hi - 0.7634) < 1e-3
    assert wilson(0, 4)[0] == 0.0 and abs(wilson(0, 4)[1] - 0.4899) < 1e-3
    assert wilson(0, 0) is None


def test_report_html_is_self_contained(first):
    out, _ = first
    text = (out / "report.html").read_text()
    assert htmlcheck.offline_problems(text, expect_images=3) == []
    assert text.count("data:image/png;base64,") == 3


def test_offline_check_catches_network_refs_and_bad_images():
    png = base64.b64encode(b"\x89PNG\r\n\x1a\nbroken").decode()
    bad = ('<link href="https://cdn.example/x.css"><img src="plot.png">'
           f'<img src="data:image/png;base64,{png}"><script src="//cdn.example/a.js"></script>')
    problems = htmlcheck.offline_problems(bad)
    assert any("network reference" in p and "https" in p for p in problems)
    assert any("network reference" in p and "'src=\"//'" in p for p in problems)
    assert any("not an embedded PNG" in p for p in problems)
    assert any("broken PNG" in p for p in problems)
    assert htmlcheck.offline_problems("<p>no plots</p>") == ["0 <img> found, expected at least 1"]


@pytest.mark.skipif(htmlcheck.chromium() is None, reason="chromium is not installed")
def test_report_opens_in_headless_chromium_with_its_plots(first, tmp_path):
    out, _ = first
    script = [sys.executable, str(ROOT / "scripts" / "report-screenshot")]
    shot = tmp_path / "shot.png"
    done = subprocess.run([*script, str(out / "report.html"), "--png", str(shot)],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert htmlcheck.screenshot_problems(str(shot)) == []
    # the check fires on a page whose plots are gone (tables only)
    text = (out / "report.html").read_text()
    plain = tmp_path / "plain.html"
    plain.write_text(text.split("<h2>Accuracy vs trainable")[0] + "</body></html>")
    htmlcheck.screenshot(str(plain), str(tmp_path / "plain.png"))
    assert any("no plot shown" in p for p in htmlcheck.screenshot_problems(str(tmp_path / "plain.png")))


def test_an_interrupted_job_stops_the_sweep_and_keeps_what_finished(tmp_path, monkeypatch):
    """The worker answers Ctrl-C with exit code 130 (its checkpoint kept): the sweep stops
    there, the finished result stays, the later jobs do not start."""
    from lora_lite_cli.compare import plan, sweep
    jobs = plan.make_jobs(["lora", "hra", "ia3"], {"steps": 4}, {}, 1, str(tmp_path))
    started = []

    def fake_run_one(job, ui, fresh=False):
        started.append(job.variant)
        if job.variant == "hra":
            return 130, ""
        os.makedirs(os.path.dirname(job.result_path), exist_ok=True)
        Path(job.result_path).write_text("{}")
        return 0, ""
    monkeypatch.setattr(sweep, "run_one", fake_run_one)
    outcome = sweep.run_jobs(jobs)
    assert outcome.interrupted and started == ["lora", "hra"]
    assert outcome.ran == [jobs[0].name] and os.path.exists(jobs[0].result_path)
    # the same sweep again: lora is reused, hra and ia3 run
    started.clear()
    monkeypatch.setattr(sweep, "run_one", lambda job, ui, fresh=False: (started.append(job.variant), (0, ""))[1])
    outcome = sweep.run_jobs(jobs)
    assert outcome.skipped == [jobs[0].name] and started == ["hra", "ia3"]


def test_a_failed_run_is_reported_and_the_sweep_goes_on(tmp_path, monkeypatch):
    from lora_lite_cli.compare import plan, sweep
    jobs = plan.make_jobs(["lora", "hra"], {"steps": 4}, {}, 1, str(tmp_path))
    monkeypatch.setattr(sweep, "run_one", lambda job, ui, fresh=False: (2, "model not found")
                        if job.variant == "lora" else (0, ""))
    outcome = sweep.run_jobs(jobs)
    assert outcome.failed == {jobs[0].name: "model not found"} and outcome.ran == [jobs[1].name]


def test_a_worker_error_is_one_line_naming_the_run_and_its_log(tiny_dir, tmp_path):
    out = tmp_path / "out"
    result = compare("--variants", "lora", "--model", str(tiny_dir), *SMALL, "--train-data",
                     str(tmp_path / "missing.jsonl"), "--output", str(out), expect=1)
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: 1 run(s) failed, first lora-") and "missing.jsonl" in line
    log = line.split("(log: ")[1].rstrip(")")
    assert os.path.exists(log) and "missing.jsonl" in open(log).read()
    assert results_json(out)["sweep"]["failed"] and not list((out / "runs").glob("lora-*.json"))


def test_every_run_of_a_sweep_gets_one_thread_count():
    from lora_lite_cli.commands.compare import with_sweep_threads
    chosen = with_sweep_threads({"steps": 4})
    assert isinstance(chosen["threads"], int) and chosen["threads"] >= 1
    assert with_sweep_threads({"threads": 3})["threads"] == 3


# Ctrl-C in the worker during step 2 (what the signal handler does), injected with sitecustomize
STOP_DURING_STEP_2 = """
import os
if os.environ.get("LORA_LITE_TEST_STOP_AFTER"):
    from lora_lite_cli.training import loop
    _stop_step, _one_step = int(os.environ["LORA_LITE_TEST_STOP_AFTER"]), loop.Trainer.one_step

    def one_step(self, stop):
        if self.state.step == _stop_step - 1:
            stop.requested = True
        return _one_step(self, stop)
    loop.Trainer.one_step = one_step
"""


def interrupted_lora_run(first, tmp_path, monkeypatch):
    """``first``'s lora job, interrupted during step 2: (output folder, args, its run folder)."""
    _, first_args = first
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(STOP_DURING_STEP_2)
    out = tmp_path / "out"
    args = ["--variants", "lora", *first_args[first_args.index("--model"):-2], "--output", str(out)]
    with monkeypatch.context() as m:
        m.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
        m.setenv("LORA_LITE_TEST_STOP_AFTER", "2")
        result = compare(*args, expect=130)
    assert "interrupted" in result.output
    (run_dir,) = [p for p in (out / "runs").iterdir() if p.is_dir() and p.name.startswith("lora-")]
    assert not list((out / "runs").glob("lora-*.json"))  # no result for an interrupted run
    assert torch.load(run_dir / "checkpoint" / "trainer.pt", weights_only=True)["step"] == 2
    return out, args, run_dir


def stored_run(out, run_dir):
    """The stored result of ``run_dir``'s job (same fingerprint) in the output folder ``out``
    (``first``'s folder also holds other seeds' lora results)."""
    return json.loads((out / "runs" / f"{run_dir.name}.json").read_text())


def test_an_interrupted_variant_resumes_from_its_checkpoint(first, tmp_path, monkeypatch):
    """It restarted from step 0 (the run folder was wiped); now the next compare resumes it
    from the checkpoint (step 2) and ends where the uninterrupted run ended."""
    out, args, run_dir = interrupted_lora_run(first, tmp_path, monkeypatch)
    result = compare(*args)
    got, want = stored_run(out, run_dir), stored_run(first[0], run_dir)
    assert got["fingerprint"] == want["fingerprint"] and got["resumed_from_step"] == 2
    assert "lora seed 0: resuming from step 2" in result.output
    assert got["metrics"]["train"]["losses"] == pytest.approx(want["metrics"]["train"]["losses"], abs=1e-6)
    assert_adapters_close(run_dir, first[0] / "runs" / run_dir.name)


def test_a_checkpoint_of_other_settings_is_not_resumed(first, tmp_path, monkeypatch):
    """The run folder is named by the fingerprint, but the checkpoint's own settings are checked
    too: one whose lr differs is set aside and the variant trains from step 0."""
    out, args, run_dir = interrupted_lora_run(first, tmp_path, monkeypatch)
    state_file = run_dir / "checkpoint" / "trainer.pt"
    state = torch.load(state_file, weights_only=True)
    state["settings"]["lr"] *= 2
    torch.save(state, state_file)
    result = compare(*args)
    got, want = stored_run(out, run_dir), stored_run(first[0], run_dir)
    assert got["resumed_from_step"] is None
    assert "not resuming: the checkpoint was made with other lr" in result.output
    assert got["metrics"]["train"]["losses"] == pytest.approx(want["metrics"]["train"]["losses"], abs=1e-6)
    assert_adapters_close(run_dir, first[0] / "runs" / run_dir.name)


def test_force_starts_an_interrupted_variant_afresh(first, tmp_path, monkeypatch):
    out, args, run_dir = interrupted_lora_run(first, tmp_path, monkeypatch)
    compare(*args, "--force", "lora")
    assert stored_run(out, run_dir)["resumed_from_step"] is None


def assert_adapters_close(run_dir, ref_dir, tol=1e-6):
    from safetensors.torch import load_file
    got, want = load_file(run_dir / "adapter.safetensors"), load_file(ref_dir / "adapter.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], atol=tol, rtol=0), k


def test_metric_loss_reports_heldout_loss_and_plots_it(tiny_dir, tmp_path):
    """With --metric loss (the default for plain text) the table showed empty accuracy columns
    ("-") and the plots were empty; now they hold the held-out loss before and after (and the
    perplexity), and the scatter plots are loss plots."""
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"The number {i} comes after {i - 1} and before {i + 1}."}) + "\n"
                            for i in range(1, 13)))
    out = tmp_path / "out"
    compare("--variants", "lora", "ia3", "--model", str(tiny_dir), *SMALL, "--train-data", str(data),
            "--eval-data", str(data), "--metric", "loss", "--output", str(out))
    got = results_json(out)
    assert got["metric"] == "loss"
    for v in got["variants"]:
        assert v["loss_before"]["mean"] > 0 and v["loss_after"]["mean"] > 0
        assert v["perplexity_after"]["mean"] > 1 and v["accuracy_after"] is None
    for r in got["runs"]:
        assert r["before"]["metric"] == "loss" and r["after"]["tokens"] > 0
    md = (out / "results.md").read_text()
    assert "| held-out loss before | held-out loss after | change | perplexity after |" in md
    lora_row = next(line for line in md.splitlines() if line.startswith("| lora |"))
    cells = [c.strip() for c in re.split(r"(?<!\\)\|", lora_row.strip("|"))]  # not the targets' \|
    assert float(cells[5]) == pytest.approx(got["variants"][0]["loss_before"]["mean"], abs=1e-4)
    assert float(cells[6]) == pytest.approx(got["variants"][0]["loss_after"]["mean"], abs=1e-4)
    for name in ("loss_vs_params.png", "loss_vs_step_time.png", "loss_curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "accuracy_vs_params.png").exists()
    html_text = (out / "report.html").read_text()
    assert "Held-out loss vs trainable parameters" in html_text and "Accuracy vs" not in html_text
