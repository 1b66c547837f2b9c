"""One ``lora-lite train`` run, start to end.

Load the model, evaluate the base model on the held-out split, attach the adapter (calibrating
from the first training batches when the variant needs data), train the adapter tensors with
AdamW (``loop.Trainer``), save the adapter, check that it reloads, evaluate the adapted model,
and write ``adapter.safetensors``, ``metrics.json``, ``predictions.jsonl`` and ``loss.png``.
Ctrl-C or SIGTERM writes a checkpoint instead (``checkpoints``); ``--resume`` continues it.
Under FSDP2 the model stays on the CPU until ``fully_shard`` shards it, and the base model is
evaluated after wrapping, through the wrapped model with the adapter's hooks off.
"""
from __future__ import annotations

import contextlib
import os
import random
import time
from dataclasses import dataclass

import torch

import lora_lite as ll

from .. import data as data_mod
from .. import evaluate as eval_mod
from ..models import describe, load_model
from . import fsdp as fsdp_mod
from . import runtime
from .batching import Batches, count_supervised, encode, loss_sum, model_inputs, pack
from .checkpoints import (
    CHECKPOINT_DIR,
    PORTABLE,
    load_portable_optimizer_state,
    portable_optimizer_state,
    save_checkpoint,
)
from .loop import Outcome, Trainer, TrainState, adapter_snapshot
from .reporting import Reporter, eval_summary, train_metrics, write_json, write_run_files
from .settings import Settings, TrainError, build_config
from .signals import StopRequest


@dataclass
class RunResult:
    status: str                 # completed | nonfinite | interrupted
    output: str
    metrics: dict
    message: str = ""


class Run:
    """The pieces of one run that its phases share."""

    def __init__(self, s: Settings, reporter: Reporter, resume, accelerator):
        self.s, self.reporter, self.resume, self.acc = s, reporter, resume, accelerator
        self.times: dict = {}
        self.t_start = time.perf_counter()

    # -- setup ---------------------------------------------------------------------------
    def load(self):
        s, acc = self.s, self.acc
        self.cfg = build_config(s)  # fails fast on a bad variant / knob, before loading anything
        self.variant = ll.get_variant(s.variant)
        self.reporter.status("reading data ...")  # a bad file fails before the model loads
        n_train = s.steps * s.grad_accum * s.batch_size
        self.train_src = data_mod.train_data(s.train_data, n_train, s.seed, s.data_format)
        self.eval_src = (data_mod.eval_data(s.eval_data, s.eval_limit, s.data_format, s.metric)
                         if s.eval_limit else None)
        self.metric = data_mod.check_metric(s.metric, self.eval_src.format) if self.eval_src else None
        self.fsdp, self.meta = runtime.is_fsdp(acc), runtime.meta_loading(acc)
        if self.meta:
            fsdp_mod.refuse_on_meta(s, self.variant)
        self.reporter.status(f"loading model {s.model} ...")
        t0 = time.perf_counter()
        # under FSDP the model stays on the CPU until FSDP moves each shard to the device
        where = "cpu" if self.fsdp and not s.quantize else str(acc.device)
        self.model, self.tokenizer = load_model(s.model, s.dtype, s.quantize, where,
                                                empty=self.meta and not acc.is_main_process,
                                                quant_storage=self.fsdp)
        self.times["load_model_s"] = time.perf_counter() - t0
        encoded, skipped = encode(self.tokenizer, self.train_src.examples, s.seq_len, s.loss_on)
        if s.pack:
            encoded = pack(encoded, s.seq_len)
        self.batches = Batches(encoded, s.batch_size, self.tokenizer.pad_token_id, acc.device,
                               acc.process_index, acc.num_processes)
        self.metrics = self._first_metrics(skipped, n_train)

    def _first_metrics(self, skipped, n_train) -> dict:
        s, origin = self.s, ll.plugins.variant_origin(self.s.variant)
        return {
            "status": "running", "variant": s.variant,
            "plugin": {"distribution": origin.distribution, "version": origin.version},
            "settings": s.to_dict(), "world_size": self.acc.num_processes,
            "distributed": str(self.acc.distributed_type).split(".")[-1],
            "model": {"name": s.model, "dtype": s.dtype, "quantize": s.quantize,
                      **describe(self.model)},
            "fsdp": self._fsdp_settings(),
            "data": {"train": {**self.train_src.fingerprint(), "skipped_prompt_too_long": skipped,
                               "examples_used": n_train},
                     "eval": self.eval_src.fingerprint() if self.eval_src else None,
                     "prompt": data_mod.PROMPT, "format": self.train_src.format,
                     "loss_on": s.loss_on, "packed_rows": len(self.batches.encoded)
                     if s.pack else None},
            "metric": self.metric,
            "versions": {"torch": torch.__version__, "lora_lite": ll.__version__},
            "torch_threads": torch.get_num_threads(),
        }

    def _fsdp_settings(self) -> dict | None:
        plugin = runtime.fsdp_plugin(self.acc)
        if plugin is None:
            return None
        return {"fsdp_version": getattr(plugin, "fsdp_version", 1),
                "sync_module_states": bool(plugin.sync_module_states),
                "cpu_ram_efficient_loading": bool(plugin.cpu_ram_efficient_loading),
                "sharding_strategy": str(plugin.sharding_strategy).split(".")[-1]}

    def evaluate(self, label, base=False):
        """Accuracy on the held-out split. Under FSDP through the wrapped model (every rank
        generates in step, see ``evaluate``); ``base``: with the adapter's hooks off."""
        if self.eval_src is None:
            return None
        acc = self.acc
        n = len(range(acc.process_index, len(self.eval_src.examples), acc.num_processes))
        self.reporter.start_eval(label, n)
        t = time.perf_counter()
        with contextlib.ExitStack() as stack:
            if self.fsdp:  # the root's own tensors (embeddings, head); the layers gather theirs
                stack.enter_context(runtime.full_params(acc, self.wrapped, recurse=False))
            if base and ll.attached(self.model) is not None and not base_rewritten(self.model):
                stack.enter_context(ll.disabled(self.model))
            result = eval_mod.evaluate(self.model, self.tokenizer, self.eval_src.examples,
                                       self.s.eval_batch_size, self.s.max_new_tokens,
                                       self.reporter.eval_advance, acc.process_index,
                                       acc.num_processes, synced=self.fsdp,
                                       metric=self.metric, seq_len=self.s.seq_len)
        result["time_s"] = round(time.perf_counter() - t, 2)
        self.reporter.end_eval()
        return result

    def attach(self):
        s, model = self.s, self.model
        t0 = time.perf_counter()
        error = None
        try:
            self._attach_or_load()
        except Exception as e:  # under FSDP every rank must hear of it (the next step gathers)
            if not self.fsdp:
                raise
            error = fsdp_mod.first_line(e)
        if self.fsdp:
            fsdp_mod.agree_on_adapter(self.acc, model, error, self.meta)
        if s.gradient_checkpointing:
            enable_gradient_checkpointing(model)
            self.metrics["checkpointed_blocks"] = sum(
                getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
        self.times["attach_s"] = time.perf_counter() - t0
        params = ll.trainable_parameters(model)
        adapter = {id(t) for t in ll.adapter_tensors(model).values()}
        stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapter]
        if stray or not params:
            raise TrainError(f"only adapter tensors may be trainable: found "
                             f"{stray[:3] or 'none trainable'}", 1)
        self.metrics["adapter"] = {
            "config": self.cfg.to_dict(), "targets": len(ll.attached(model).targets),
            "trainable_params": sum(p.numel() for p in params),
            "dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in params}),
            "calibration_batches": s.calibration if self.resume is None else None}
        return params

    def _attach_or_load(self):
        s, model = self.s, self.model
        if self.resume is not None:
            ll.load(model, os.path.join(self.resume[0], "adapter.safetensors"))
            return
        calib = None
        if s.calibration or self.variant.needs_calibration:
            device = next(model.parameters()).device  # the CPU under FSDP, before wrapping
            calib = [{k: v.to(device) for k, v in model_inputs(self.batches.whole(j)).items()}
                     for j in range(max(s.calibration, 1))]
        ll.attach(model, self.cfg, calibration_data=calib)

    def prepare(self, params) -> TrainState:
        """AdamW + the schedule, through accelerate; the state fresh or from the checkpoint.
        Under FSDP the model is wrapped first and AdamW gets the wrapped model's adapter
        tensors (accelerate maps AdamW onto FSDP2's sharded DTensors)."""
        from transformers import get_scheduler
        s = self.s
        if self.fsdp:
            self.metrics["loading"] = fsdp_mod.loading_figures(self.acc, self.model, self.meta)
        optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
        kind = {"constant": "constant_with_warmup"}.get(s.schedule, s.schedule)
        self.scheduler = get_scheduler(kind, optimizer, num_warmup_steps=s.warmup,
                                       num_training_steps=s.steps)
        self.probe = self.batches.whole(0)
        self.wrapped, self.optimizer = runtime.prepare(self.acc, self.model, optimizer)
        # DDP, FSDP2, OptimizedModule (the whole model compiled, under FSDP), else the model
        self.metrics["trained_as"] = type(self.wrapped).__name__
        if s.compile:  # regional: one compiled module per repeated block, the rest apart
            from torch._dynamo.eval_frame import OptimizedModule
            self.metrics["compiled_regions"] = sum(isinstance(m, OptimizedModule)
                                                   for m in self.wrapped.modules())
        # what this rank holds: every parameter under DDP, about 1/N of them under FSDP
        self.metrics["parameters_on_rank0"] = sum(runtime.local_numel(p)
                                                  for p in self.wrapped.parameters())
        if self.resume is None:
            state = TrainState()
            state.capture_rng()
            self.before = self.full_adapter()
            self.probe_before = self.probe_loss()
            return state
        saved = self.resume[1]
        if saved.get("optimizer_format") == PORTABLE:
            load_portable_optimizer_state(self.optimizer, ll.adapter_tensors(self.model),
                                          saved["optimizer"])
        else:  # an older checkpoint: indices of this run's parameters
            self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.acc.scaler is not None and saved.get("scaler"):
            self.acc.scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["torch_rng"])
        random.setstate(saved["python_rng"])
        state = TrainState(saved["step"], list(saved["losses"]), list(saved["lrs"]),
                           dict(saved["sanity"]), saved.get("train_s", 0.0),
                           list(saved.get("step_times", [])),
                           (saved["torch_rng"], saved["python_rng"]))
        state.sanity.setdefault("skipped_steps", 0)
        self.before, self.probe_before = saved["adapter_before"], saved["probe_before"]
        return state

    def probe_loss(self):
        # under FSDP only the wrapped model's forward gathers the sharded layers
        model = self.wrapped if self.fsdp else self.model
        with torch.no_grad():
            loss = loss_sum(model, self.probe, plain=self.model)[0].item()
        return loss / max(count_supervised(self.probe), 1)

    def full_adapter(self) -> dict:
        """The adapter tensors, whole even when FSDP shards them (every rank must call it)."""
        with runtime.full_params(self.acc, self.wrapped):
            return adapter_snapshot(self.model)

    def save_adapter(self, path) -> None:
        """Rank 0 writes the whole adapter (under FSDP every rank joins the gathering)."""
        with runtime.full_params(self.acc, self.wrapped):
            if self.acc.is_main_process:
                ll.save(self.model, path)
        self.acc.wait_for_everyone()

    # -- the two endings ------------------------------------------------------------------
    def checkpoint(self, state: TrainState, base_eval) -> RunResult:
        s, out_dir = self.s, self.s.output
        folder = os.path.join(out_dir, CHECKPOINT_DIR)
        # whole tensors by name, whatever the processes (every rank gathers)
        optimizer = portable_optimizer_state(self.optimizer, ll.adapter_tensors(self.model))
        with runtime.full_params(self.acc, self.wrapped):
            if self.acc.is_main_process:
                self._write_checkpoint(folder, state, base_eval, optimizer)
        self.acc.wait_for_everyone()
        return RunResult("interrupted", out_dir, self.metrics,
                         f"interrupted at step {state.step}/{s.steps}: checkpoint saved to "
                         f"{folder}; resume with: lora-lite train --resume {folder}")

    def _write_checkpoint(self, folder, state: TrainState, base_eval, optimizer) -> None:
        s, out_dir = self.s, self.s.output
        torch_rng, python_rng = state.rng
        save_checkpoint(folder, self.model, {
            "optimizer_shards": 0, "optimizer_format": PORTABLE,
            "world_size": self.acc.num_processes,
            "step": state.step, "settings": s.to_dict(), "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else None,
            "torch_rng": torch_rng, "python_rng": python_rng, "losses": state.losses,
            "lrs": state.lrs, "sanity": state.sanity, "adapter_before": self.before,
            "probe_before": self.probe_before, "base_eval": base_eval,
            "train_s": state.train_s, "step_times": state.step_times})
        self.metrics.update(status="interrupted", checkpoint=folder, step=state.step)
        self.metrics["train"] = {"losses": state.losses, "lrs": state.lrs,
                                 "steps_done": state.step}
        write_json(os.path.join(out_dir, "metrics.json"), self.metrics)

    def finish(self, state: TrainState, outcome: Outcome, base_eval) -> RunResult:
        s, model = self.s, self.model
        model.eval()
        self.times["train_s"] = state.train_s
        sanity = state.sanity
        after = self.full_adapter()
        sanity["adapter_delta"] = float(sum((after[k].double() - self.before[k].double()).norm()
                                            .item() for k in after))
        probe_after = self.probe_loss()
        adapter_path = os.path.join(s.output, "adapter.safetensors")
        if self.fsdp:
            self.save_adapter(adapter_path)
            sanity["reload_err"] = file_vs_tensors(adapter_path, after)
        else:
            sanity["reload_err"] = self.save_and_reload(adapter_path)
        sanity["ok"] = bool(outcome.status == "completed" and (sanity["first_grad_norm"] or 0) > 0
                            and sanity["adapter_delta"] > 0 and sanity["base_grad_leaks"] == 0)
        adapted_eval = self.evaluate("adapted model") if outcome.status == "completed" else None
        return self._result(state, outcome, base_eval, adapted_eval, probe_after, adapter_path)

    def save_and_reload(self, adapter_path) -> float:
        """Save, detach (the model is the base again, bit for bit), reload the file: the largest
        change of the probe batch's logits."""
        model = self.model
        with torch.no_grad():
            trained = model(**model_inputs(self.probe)).logits.float()
        self.save_adapter(adapter_path)
        ll.detach(model)
        ll.load(model, adapter_path)
        with torch.no_grad():
            reloaded = model(**model_inputs(self.probe)).logits.float()
        return (reloaded - trained).abs().max().item()

    def _result(self, state, outcome, base_eval, adapted_eval, probe_after, adapter_path):
        s, acc, m, times = self.s, self.acc, self.metrics, self.times
        times["eval_adapted_s"] = adapted_eval["time_s"] if adapted_eval else 0.0
        times["total_s"] = time.perf_counter() - self.t_start + times.get("train_s_before_resume", 0)
        mem = runtime.peak_memory_mb(str(acc.device))
        if acc.num_processes > 1:
            per_rank = fsdp_mod.gather(acc, mem["peak_rss_mb"])
            mem["peak_rss_mb_per_rank"] = per_rank
            mem["peak_rss_mb_max_rank"] = float(max(per_rank))
        m.update(status=outcome.status)
        if outcome.message:
            m["message"] = outcome.message
        m["train"] = train_metrics(state, outcome, self.probe_before, probe_after)
        m["sanity"] = state.sanity
        m["eval"] = {"base": eval_summary(base_eval), "adapted": eval_summary(adapted_eval),
                     "max_new_tokens": s.max_new_tokens, "metric": self.metric}
        m["accuracy_before"] = base_eval["accuracy"] if base_eval else None
        m["accuracy_after"] = adapted_eval["accuracy"] if adapted_eval else None
        if self.metric == "loss":
            m["loss_before"] = base_eval["loss"] if base_eval else None
            m["loss_after"] = adapted_eval["loss"] if adapted_eval else None
        m["time"] = {k: round(v, 2) for k, v in times.items()}
        m["memory"] = mem
        m["files"] = {"adapter": adapter_path}
        if acc.is_main_process:
            write_run_files(s.output, s, m, state.losses, state.lrs, base_eval, adapted_eval)
        return RunResult(outcome.status, s.output, m, outcome.message)


def enable_gradient_checkpointing(model) -> None:
    """transformers' activation checkpointing, non-reentrant (the reentrant one needs inputs
    that require grad; transformers also turns on enable_input_require_grads)."""
    enable = (getattr(model, "activation_checkpointing_enable", None)
              or getattr(model, "gradient_checkpointing_enable", None))
    if not callable(enable) or not getattr(model, "supports_gradient_checkpointing", False):
        raise TrainError(f"--gradient-checkpointing: {type(model).__name__} does not support "
                         "gradient checkpointing; drop the flag", 2)
    kwargs = {"use_reentrant": False}
    if enable.__name__ == "activation_checkpointing_enable":
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        enable(gradient_checkpointing_kwargs=kwargs)


def base_rewritten(model) -> bool:
    """A variant rewrote a base weight at attach (rewrite_base=True): turning the hooks off then
    leaves the rewritten weight, so the base is evaluated as the initial adapter on it (the same
    function up to rounding)."""
    from lora_lite.layers.weights import weight_was_rewritten
    return any(weight_was_rewritten(t.layer) for t in ll.attached(model).targets)


def file_vs_tensors(path, tensors: dict) -> float:
    """The largest difference between the adapter file at ``path`` and ``tensors``."""
    from safetensors.torch import load_file
    saved = load_file(path)
    if saved.keys() != tensors.keys():
        return float("inf")
    return max((saved[k].float() - tensors[k].float().cpu()).abs().max().item() for k in saved)


def run(s: Settings, reporter: Reporter | None = None, resume: tuple[str, dict] | None = None,
        accelerator=None) -> RunResult:
    """Train and evaluate as described by ``s``. Raises TrainError / lora-lite errors."""
    acc = accelerator or runtime.make_accelerator(s)
    try:
        with StopRequest() as stop:  # from the start: a signal during loading still checkpoints
            return _run(Run(s, reporter or Reporter(), resume, acc), stop)
    finally:
        if accelerator is None:
            runtime.finish(acc)


def _run(r: Run, stop: StopRequest) -> RunResult:
    s = r.s
    torch.manual_seed(s.seed)
    random.seed(s.seed)
    r.load()
    # under FSDP the base is evaluated once the model is wrapped (below)
    fresh = r.resume is None
    base_eval = r.resume[1].get("base_eval") if not fresh else None
    if fresh and not r.fsdp:
        base_eval = r.evaluate("base model")
    if r.resume is not None:
        r.times["train_s_before_resume"] = r.resume[1].get("train_s", 0.0)
    params = r.attach()
    state = r.prepare(params)
    if fresh and r.fsdp:
        base_eval = r.evaluate("base model", base=True)
    r.times["eval_base_s"] = base_eval["time_s"] if base_eval else 0.0
    if r.acc.is_main_process:
        os.makedirs(s.output, exist_ok=True)
    trainer = Trainer(s, r.acc, r.wrapped, r.model, r.optimizer, r.scheduler, r.batches,
                      r.reporter, state)
    r.reporter.start_train(s.steps, state.step)
    r.model.train()
    try:
        outcome = trainer.run(stop)
    except KeyboardInterrupt:
        stop.saving = True  # further signals wait for the checkpoint
        r.reporter.end_train()
        r.optimizer.zero_grad(set_to_none=True)
        return r.checkpoint(state, base_eval)
    stop.finishing = True
    r.reporter.end_train()
    return r.finish(state, outcome, base_eval)
