"""The jobs of a comparison: one per (variant, seed), each with a settings fingerprint.

A job's result lives at ``runs/<variant>-<fingerprint>.json``; the fingerprint hashes every
setting that changes the run (not the output folder or the thread count) and the version of the
plugin providing the variant, so the same command finds its finished results again. The base model's evaluation is
stored per *base* fingerprint (the settings the base model's accuracy depends on), shared by every variant and seed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

from ..errors import CLIError
from ..training.settings import Settings

RUNS_DIR = "runs"
# settings that never change a run's result
NOT_FINGERPRINTED = {"output", "threads"}
# settings the base model's evaluation does not depend on (a new setting counts by default)
NOT_IN_BASE = NOT_FINGERPRINTED | {
    "variant", "train_data", "steps", "batch_size", "grad_accum", "lr", "schedule", "warmup",
    "weight_decay", "grad_clip", "seq_len", "targets", "layers", "rank", "alpha", "knobs",
    "compile", "seed", "calibration", "mixed_precision"}


def fingerprint(values: dict) -> str:
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Job:
    variant: str
    seed: int
    settings: Settings
    fingerprint: str
    base_fingerprint: str
    out_dir: str

    @property
    def name(self) -> str:
        return f"{self.variant}-{self.fingerprint}"

    @property
    def result_path(self) -> str:
        return os.path.join(self.out_dir, RUNS_DIR, self.name + ".json")

    @property
    def run_dir(self) -> str:
        return os.path.join(self.out_dir, RUNS_DIR, self.name)

    @property
    def base_path(self) -> str:
        return os.path.join(self.out_dir, RUNS_DIR, f"base-{self.base_fingerprint}.json")


# training settings one variant may set for itself with --set VARIANT.name=value (the data,
# budget and seed stay common to all)
PER_VARIANT_SETTINGS = ("lr", "rank", "alpha", "targets", "layers", "calibration", "schedule",
                        "warmup", "weight_decay", "grad_clip")


def per_variant_sets(pairs, variants) -> dict[str, dict]:
    """['hra.r=4', 'ia3.lr=5e-3'] -> {'hra': {'knobs': {'r': '4'}, 'settings': {}},
    'ia3': {'knobs': {}, 'settings': {'lr': 0.005}}, ...}: a training setting of
    PER_VARIANT_SETTINGS (typed here), else a knob of the variant's config (typed later)."""
    out = {v: {"knobs": {}, "settings": {}} for v in variants}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        variant, dot, knob = key.strip().partition(".")
        knob = knob.strip().replace("-", "_")
        if not sep or not dot or not variant or not knob:
            raise CLIError(f"--set {pair!r}: expected VARIANT.knob=value, e.g. --set "
                           f"{list(variants)[0]}.alpha=8", 2)
        if variant not in out:
            raise CLIError(f"--set {pair!r}: {variant!r} is not one of --variants "
                           f"({', '.join(variants)})", 2)
        if knob in PER_VARIANT_SETTINGS:
            out[variant]["settings"][knob] = _setting(knob, value.strip(), pair)
        else:
            out[variant]["knobs"][knob] = value.strip()
    return out


def _setting(name: str, text: str, pair: str):
    from ..configs import parse_layers
    if name == "targets":
        return (text,)
    if name == "layers":
        return parse_layers(text)
    default = next(f.default for f in dataclasses.fields(Settings) if f.name == name)
    try:
        return type(default)(text)
    except ValueError:
        raise CLIError(f"--set {pair!r}: expected a {type(default).__name__} for {name}",
                       2) from None


def make_jobs(variants, given: dict, sets: dict, seeds: int, out_dir: str) -> list[Job]:
    """Resolved, checked settings for every (variant, seed): a bad knob or option fails here,
    before anything trains (ConfigError / TrainError, exit 2)."""
    from .. import training
    from ..models import resolve
    from ..training import runtime
    first_seed = given.get("seed") or 0
    device = runtime.pick_device(given.get("device"))
    jobs = []
    resolve(given.get("model") or Settings.model)  # a missing model fails here, once
    for variant in variants:
        for seed in range(first_seed, first_seed + seeds):
            own = sets.get(variant) or {}
            values = {**given, **own.get("settings", {}), "seed": seed, "device": device,
                      "knobs": own.get("knobs") or None,
                      "output": os.path.join(out_dir, RUNS_DIR, "pending")}
            s = training.resolve_settings(variant, values)
            training.build_config(s)
            d = s.to_dict()
            fp = fingerprint({**{k: v for k, v in d.items() if k not in NOT_FINGERPRINTED},
                              "plugin": _plugin_of(variant)})
            base_fp = fingerprint({k: v for k, v in d.items() if k not in NOT_IN_BASE})
            job = Job(variant, seed, s, fp, base_fp, out_dir)
            s.output = job.run_dir
            jobs.append(job)
    return jobs


def _plugin_of(variant: str) -> list:
    """The distribution and version providing ``variant``: upgrading it re-runs the variant."""
    import lora_lite as ll
    origin = ll.plugins.variant_origin(variant)
    return [origin.distribution, origin.version]
