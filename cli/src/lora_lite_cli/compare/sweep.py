"""Run the jobs of a comparison back to back, each in its own process (``worker``).

A job whose result file exists is skipped unless its variant is in ``force``; the others run
one after the other under the same settings, so their times compare. While each runs, the
machine's 1-minute load average is sampled (``LoadSampler``) and stored with its result. Ctrl-C
stops the running job (it keeps a checkpoint in its run folder) and the sweep: every finished
result stays on disk, and the next sweep resumes the interrupted job from its checkpoint (the
run folder is named by the settings fingerprint; ``--force`` starts it afresh).
Progress: one bar for the sweep and one for the running phase.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field

from ..training.reporting import write_json
from .plan import Job


class LoadSampler(threading.Thread):
    """The 1-minute load average every ``every`` seconds while a job runs."""

    def __init__(self, every=2.0):
        super().__init__(daemon=True)
        self.every, self.samples, self.stop_event = every, [os.getloadavg()[0]], threading.Event()

    def run(self):
        while not self.stop_event.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict:
        self.stop_event.set()
        self.samples.append(os.getloadavg()[0])
        s = self.samples
        return {"start": s[0], "end": s[-1], "mean": round(sum(s) / len(s), 2), "max": max(s),
                "samples": len(s)}


@dataclass
class SweepOutcome:
    ran: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)   # job name -> one-line message
    interrupted: bool = False


def run_jobs(jobs: list[Job], force=(), ui=None) -> SweepOutcome:
    out = SweepOutcome()
    ui = ui or NullUI()
    todo = []
    for job in jobs:
        if os.path.exists(job.result_path) and job.variant not in force:
            out.skipped.append(job.name)
        else:
            todo.append(job)
    ui.start_sweep(len(jobs), len(out.skipped))
    try:
        for job in todo:
            ui.start_job(job)
            rc, message = run_one(job, ui, fresh=job.variant in force)
            if rc == 130:
                out.interrupted = True
                break
            if rc in (0, 3):
                out.ran.append(job.name)
            else:
                out.failed[job.name] = message or f"exit code {rc}"
            ui.end_job(job, rc, message)
    except KeyboardInterrupt:
        out.interrupted = True
    finally:
        ui.end_sweep()
    return out


def keeps_checkpoint(job: Job) -> bool:
    """Whether ``job``'s run folder holds the checkpoint of an interrupted attempt at the same
    settings (the worker checks the checkpoint's own settings again before resuming)."""
    from ..training.checkpoints import ADAPTER_FILE, CHECKPOINT_DIR, TRAINER_STATE
    folder = os.path.join(job.run_dir, CHECKPOINT_DIR)
    return all(os.path.isfile(os.path.join(folder, f)) for f in (TRAINER_STATE, ADAPTER_FILE))


def run_one(job: Job, ui, fresh: bool = False) -> tuple[int, str]:
    """Run ``job`` in a worker process; (exit code, last error line). An interrupted attempt's
    checkpoint is resumed unless ``fresh``; anything else left in the run folder is removed."""
    if os.path.isdir(job.run_dir) and (fresh or not keeps_checkpoint(job)):
        shutil.rmtree(job.run_dir)  # a forced re-run, or an attempt that left no checkpoint
    os.makedirs(job.run_dir, exist_ok=True)
    if os.path.exists(job.result_path):
        os.remove(job.result_path)
    job_file = os.path.join(job.run_dir, "job.json")
    write_json(job_file, {"settings": job.settings.to_dict(), "fingerprint": job.fingerprint,
                          "result_path": job.result_path, "base_path": job.base_path})
    sampler = LoadSampler()
    sampler.start()
    proc = subprocess.Popen([sys.executable, "-m", "lora_lite_cli.compare.worker", job_file],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            bufsize=1)
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        for line in proc.stdout:
            _event(line, ui)
        rc = proc.wait()
    except KeyboardInterrupt:  # the worker got the same Ctrl-C: let it write its checkpoint
        rc = _wait_after_interrupt(proc)
    reader.join(timeout=5)
    with open(os.path.join(job.run_dir, "worker.log"), "w", encoding="utf-8") as f:
        f.writelines(errors)  # the worker's stderr: warnings, the error, a traceback if any
    load = sampler.summary()
    if rc in (0, 3) and os.path.exists(job.result_path):
        with open(job.result_path, encoding="utf-8") as f:
            result = json.load(f)
        result["load_average_1min"] = load
        write_json(job.result_path, result)
    last = [e.strip() for e in errors if e.strip()]
    message = next((e for e in reversed(last) if e.startswith("error:")), last[-1] if last else "")
    message = message.removeprefix("error:").strip()
    if rc not in (0, 3, 130):
        message += f" (log: {os.path.join(job.run_dir, 'worker.log')})"
    return rc, message


def _wait_after_interrupt(proc) -> int:
    try:
        proc.wait(timeout=120)
    except (KeyboardInterrupt, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()
    return 130


def _event(line: str, ui) -> None:
    try:
        event = json.loads(line)
    except ValueError:
        return
    if isinstance(event, dict):
        ui.event(event)


class NullUI:
    def start_sweep(self, total, skipped): pass
    def start_job(self, job): pass
    def event(self, event): pass
    def end_job(self, job, rc, message): pass
    def end_sweep(self): pass
