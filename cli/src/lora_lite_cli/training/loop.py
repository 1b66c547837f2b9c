"""The optimisation loop: one optimizer step after another, through an ``accelerate`` Accelerator.

The loss of an optimizer step is the mean over every supervised token of the step (all
micro-batches, all processes): each process back-propagates its summed token loss times
``world_size / step_tokens``, DDP averages the gradients over processes, so the number of
processes and the gradient accumulation do not change the result. Micro-batches before the
last of a step run under ``accelerator.no_sync`` (one gradient all-reduce per step).

Sanity figures: the first step's adapter gradient norm (> 0) and the number of base-parameter
gradients seen over all steps (``base_grad_leaks``, must be 0). A non-finite loss or update
stops the run and keeps the last adapter with a finite loss; under fp16 a non-finite gradient is
the loss scaler's business (the step is skipped and counted, as every fp16 trainer does).
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field

import torch

import lora_lite as ll

from .batching import loss_sum
from .runtime import clip_grad_norm


@dataclass
class TrainState:
    """What a checkpoint must hold to continue exactly: everything as of a step boundary."""
    step: int = 0
    losses: list = field(default_factory=list)
    lrs: list = field(default_factory=list)
    sanity: dict = field(default_factory=lambda: {"first_grad_norm": None, "base_grad_leaks": 0,
                                                  "train_tokens": 0, "skipped_steps": 0})
    train_s: float = 0.0
    step_times: list = field(default_factory=list)   # seconds per step (compile: the first)
    rng: tuple = ()      # (torch, python) RNG states at the start of step ``step``

    def capture_rng(self):
        self.rng = (torch.get_rng_state(), random.getstate())


@dataclass
class Outcome:
    status: str          # completed | nonfinite
    message: str = ""
    kept_step: int = 0


def adapter_snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in ll.adapter_tensors(model).items()}


def restore_adapter(model, snapshot) -> None:
    with torch.no_grad():
        for k, v in ll.adapter_tensors(model).items():
            v.copy_(snapshot[k])


def base_grad_leaks(model) -> int:
    """Base (non-adapter) parameters holding a gradient: every one is a leak."""
    adapter = {id(t) for t in ll.adapter_tensors(model).values()}
    return sum(1 for p in model.parameters() if p.grad is not None and id(p) not in adapter)


class Trainer:
    """Runs the steps of ``state.step`` .. ``s.steps`` on a prepared model and optimizer."""

    def __init__(self, s, accelerator, model, plain, optimizer, scheduler, batches, reporter,
                 state: TrainState):
        self.s, self.acc, self.model, self.plain = s, accelerator, model, plain
        self.optimizer, self.scheduler, self.batches = optimizer, scheduler, batches
        self.reporter, self.state = reporter, state
        self.params = ll.trainable_parameters(plain)
        self.last_good, self.kept_step = adapter_snapshot(plain), state.step

    def run(self, stop) -> Outcome:
        """Train to the last step; raises KeyboardInterrupt (at a step boundary, or at once on a
        second signal) with ``state`` as of the last completed step."""
        while self.state.step < self.s.steps:
            self._stop_if_asked(stop)  # a signal during setup: checkpoint at step 0
            outcome = self.one_step(stop)
            if outcome is not None:
                return outcome
        self._stop_if_asked(stop)  # during the last step: its checkpoint, before the evaluation
        return Outcome("completed", kept_step=self.state.step)

    def _stop_if_asked(self, stop):
        """One process: stop at this step boundary as soon as a signal asked (several processes
        stop together, at the boundary where the step's all-reduce carried the flag)."""
        if stop.requested and self.acc.num_processes == 1:
            raise KeyboardInterrupt

    def _backward(self, n_tokens) -> tuple[torch.Tensor, int]:
        s, st = self.s, self.state
        total = torch.zeros((), dtype=torch.float64, device=self.acc.device)
        seen = 0
        for a in range(s.grad_accum):
            batch = self.batches.local(st.step * s.grad_accum + a)
            seen += int(batch["attention_mask"].sum())
            last = a == s.grad_accum - 1
            with contextlib.nullcontext() if last else self.acc.no_sync(self.model):
                loss, _ = loss_sum(self.model, batch, keep_logits=False, plain=self.plain)
                self.acc.backward(loss * (self.acc.num_processes / n_tokens))
            total += loss.detach().double()
        return total, seen

    def one_step(self, stop) -> Outcome | None:
        s, st = self.s, self.state
        t_step = time.perf_counter()
        n_tokens = self.batches.step_tokens(st.step, s.grad_accum)
        self.optimizer.zero_grad(set_to_none=True)
        total, seen = self._backward(n_tokens)
        leaks = base_grad_leaks(self.plain)
        flag = 1.0 if stop.requested else 0.0
        summed = self.acc.reduce(torch.stack([total, torch.tensor(float(seen), dtype=torch.float64,
                                              device=total.device),
                                              torch.tensor(flag, dtype=torch.float64,
                                                           device=total.device)]), "sum")
        step_loss, seen_all, stop_now = float(summed[0]) / n_tokens, float(summed[1]), summed[2] > 0
        if not math.isfinite(step_loss):
            restore_adapter(self.plain, self.last_good)
            return Outcome("nonfinite", f"loss is {step_loss} at step {st.step + 1}: training "
                           f"stopped; kept the adapter of the last step with a finite loss (after "
                           f"{self.kept_step} steps); try a lower --lr than {s.lr:g}", self.kept_step)
        self.last_good, self.kept_step = adapter_snapshot(self.plain), st.step
        grad_norm = float(clip_grad_norm(self.acc, self.params,
                                         s.grad_clip or math.inf))
        scaled = self.acc.scaler is not None
        if not math.isfinite(grad_norm) and not scaled:
            return Outcome("nonfinite", f"gradient norm is {grad_norm} at step {st.step + 1}: "
                           f"training stopped; kept the adapter before this step (after "
                           f"{self.kept_step} steps)", self.kept_step)
        with stop.commit():  # a signal here waits until the step is applied and recorded
            st.lrs.append(self.scheduler.get_last_lr()[0])
            self.optimizer.step()
            skipped = self.acc.optimizer_step_was_skipped
            if not skipped:
                self.scheduler.step()
            st.losses.append(step_loss)
            st.sanity["base_grad_leaks"] += leaks
            st.sanity["skipped_steps"] += int(skipped)
            if st.sanity["first_grad_norm"] is None and math.isfinite(grad_norm):
                st.sanity["first_grad_norm"] = grad_norm
            st.sanity["train_tokens"] += n_tokens
            st.step += 1
            dt = time.perf_counter() - t_step
            st.train_s += dt
            st.step_times.append(round(dt, 4))
            st.capture_rng()
        if not all(bool(torch.isfinite(p).all()) for p in self.params):
            restore_adapter(self.plain, self.last_good)
            return Outcome("nonfinite", f"the update of step {st.step} made adapter values "
                           f"non-finite: training stopped; kept the adapter before it (after "
                           f"{self.kept_step} steps); try a lower --lr than {s.lr:g}", self.kept_step)
        self.reporter.step(st.step, step_loss, st.lrs[-1], seen_all / max(dt, 1e-9))
        if stop_now:  # every process saw the same sum: all stop at this boundary
            raise KeyboardInterrupt
        self._stop_if_asked(stop)  # asked after the all-reduce: not one more step
        return None
