"""One variant of a comparison, in its own process: ``python -m lora_lite_cli.compare.worker
JOB.json``.

Runs ``training.run`` on the job's settings; when the base model's evaluation is already stored
(another variant or seed made it) the run takes it instead of evaluating the base again, else
it stores the one it made. A checkpoint left in the run folder by an interrupted attempt at
the same settings is resumed (``resumable``); one of other settings is never used.
Progress goes to stdout as JSON lines (``EventReporter``), read by
``sweep``. On success the job's result file is written (atomically); on Ctrl-C nothing is
(the run folder keeps its checkpoint) and the exit code is 130.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time

import lora_lite as ll

from ..training import runtime
from ..training.reporting import Reporter, write_json
from ..training.run import Run, _run
from ..training.settings import Settings
from ..training.signals import StopRequest


class EventReporter(Reporter):
    """Progress as JSON lines on stdout."""

    def _emit(self, **event):
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    def status(self, text):
        self._emit(event="status", text=text)

    def start_train(self, steps, done):
        self._emit(event="start", phase="train", total=steps, done=done)

    def step(self, step, loss, lr, tokens_per_s):
        self._emit(event="step", step=step, loss=loss)

    def start_eval(self, label, n):
        self._emit(event="start", phase=f"eval {label}", total=n, done=0)

    def eval_advance(self, k):
        self._emit(event="advance", k=k)


class SharedBaseRun(Run):
    """A run that takes the base model's evaluation from ``shared`` when there is one."""

    def __init__(self, *args, shared=None):
        super().__init__(*args)
        self.shared, self.made_base = shared, None

    def evaluate(self, label, base=False):
        is_base = base or ll.attached(self.model) is None
        if is_base and self.shared is not None:
            return {**self.shared, "time_s": 0.0}
        result = super().evaluate(label, base)
        if is_base:
            self.made_base = result
        return result


def host() -> dict:
    import torch
    import transformers

    from .. import __version__ as cli_version
    info = {"node": platform.node(), "platform": platform.platform(),
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "lora_lite": ll.__version__, "lora_lite_cli": cli_version}}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def resumable(job: dict, s: Settings, reporter: Reporter):
    """(checkpoint folder, trainer state) of an interrupted attempt at exactly ``s``'s training
    settings, else None (a missing, unreadable or foreign checkpoint is set aside, not used)."""
    from ..training.checkpoints import CHECKPOINT_DIR, read_checkpoint
    from ..training.settings import RESUME_FREE, TrainError
    folder = os.path.join(s.output, CHECKPOINT_DIR)  # s.output is the job's run folder
    if not os.path.isdir(folder):
        return None
    try:
        folder, state = read_checkpoint(folder)
    except TrainError as e:
        reporter.status(f"not resuming: {e}")
        return None
    stored = Settings.from_dict(dict(state["settings"])).to_dict()
    wanted = s.to_dict()
    differ = sorted(k for k in wanted if k not in RESUME_FREE and stored.get(k) != wanted[k])
    if differ:
        reporter.status(f"not resuming: the checkpoint was made with other {', '.join(differ)}")
        return None
    reporter.status(f"resuming from step {state['step']}")
    return folder, state


def work(job: dict) -> int:
    s = Settings.from_dict(job["settings"])
    s.device = runtime.pick_device(s.device)
    s.threads = runtime.set_threads(s.threads)
    reporter = EventReporter()
    resume = resumable(job, s, reporter)
    shared = None
    if os.path.exists(job["base_path"]):
        with open(job["base_path"], encoding="utf-8") as f:
            shared = json.load(f)
    acc = runtime.make_accelerator(s)
    try:
        with StopRequest() as stop:  # Ctrl-C/SIGTERM: the run checkpoints, the sweep keeps the rest
            r = SharedBaseRun(s, reporter, resume, acc, shared=shared)
            result = _run(r, stop)
    finally:
        runtime.finish(acc)
    if result.status == "interrupted":
        return 130
    if r.made_base is not None:
        write_json(job["base_path"], r.made_base)
    adapter = result.metrics.get("files", {}).get("adapter")
    write_json(job["result_path"], {
        "variant": s.variant, "seed": s.seed, "fingerprint": job["fingerprint"],
        "status": result.status, "message": result.message,
        "base_shared": shared is not None, "resumed_from_step": resume[1]["step"] if resume else None,
        "finished_at": time.time(), "host": host(),
        "adapter_bytes": os.path.getsize(adapter) if adapter and os.path.exists(adapter) else None,
        "metrics": result.metrics})
    return 0 if result.status == "completed" else 3


def main(argv=None) -> int:
    from ..app import quiet_library_notices
    from ..data import DataError
    from ..errors import CLIError, one_line
    from ..models import ModelNotFound
    quiet_library_notices()
    (path,) = argv if argv is not None else sys.argv[1:]
    with open(path, encoding="utf-8") as f:
        job = json.load(f)
    try:
        return work(job)
    except KeyboardInterrupt:
        return 130
    except CLIError as e:
        sys.stderr.write(f"error: {one_line(e)}\n")
        return e.code
    except (ll.LoraLiteError, DataError, ModelNotFound, FileNotFoundError) as e:
        sys.stderr.write(f"error: {one_line(e)}\n")
        return 2
    except Exception as e:
        if os.environ.get("LORA_LITE_DEBUG"):
            raise
        sys.stderr.write(f"error: {type(e).__name__}: {one_line(e)}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
