"""``lora-lite train``, one module per job:

- ``settings``: the run's settings, their checks and the variant's own defaults
- ``runtime``: device, CPU threads, processes (an ``accelerate`` Accelerator)
- ``batching``: tokenising, left-padded batches, the token-summed loss
- ``loop``: the optimizer steps (``Trainer``) and the sanity counters
- ``signals``: Ctrl-C / SIGTERM handling that keeps checkpoints consistent
- ``checkpoints``: writing and reading checkpoints, settings of a resumed run
- ``reporting``: progress callbacks and the run folder's files
- ``run``: one run from start to end
"""
from .checkpoints import CHECKPOINT_DIR, TRAINER_STATE, read_checkpoint, settings_for_resume
from .reporting import Reporter
from .run import RunResult, run
from .runtime import auto_threads, busy_cores, pick_device, set_threads
from .settings import Settings, TrainError, build_config, check_settings, resolve_settings

__all__ = ["CHECKPOINT_DIR", "TRAINER_STATE", "Reporter", "RunResult", "Settings", "TrainError",
           "auto_threads", "build_config", "busy_cores", "check_settings", "pick_device",
           "read_checkpoint", "resolve_settings", "run", "set_threads", "settings_for_resume"]
