"""Tokenising, batching and the training loss.

An example is ``prompt + ' ' + answer + EOS`` with labels -100 over the prompt. Batches are
left-padded, so every row's answer sits at the right edge and the loss needs the logits of the
last positions only. Micro-batch ``j`` of the run is examples ``[j*B, (j+1)*B)`` (cycling); with
several processes each takes a strided share of it, so the global batch does not depend on the
number of processes.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .. import data as data_mod
from .settings import TrainError


@dataclass
class Encoded:
    input_ids: list
    labels: list


def encode(tokenizer, examples, seq_len) -> tuple[list[Encoded], int]:
    """(encoded, skipped) where skipped counts examples whose prompt alone fills seq_len."""
    out, skipped = [], 0
    eos = tokenizer.eos_token_id
    for ex in examples:
        prompt = tokenizer(data_mod.prompt_of(ex.question), add_special_tokens=False)["input_ids"]
        answer = tokenizer(" " + ex.answer.strip(), add_special_tokens=False)["input_ids"]
        if eos is not None:
            answer = answer + [eos]
        if len(prompt) >= seq_len:
            skipped += 1
            continue
        ids = (prompt + answer)[:seq_len]
        labels = ([-100] * len(prompt) + answer)[:seq_len]
        out.append(Encoded(ids, labels))
    return out, skipped


def collate(items: list[Encoded], pad_id: int, device) -> dict:
    """Left-padded batch: input_ids, attention_mask, labels (-100 on padding), position_ids
    counted from each row's first real token (as generate() does)."""
    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, e in enumerate(items):
        n = len(e.input_ids)
        ids[i, width - n:] = torch.tensor(e.input_ids)
        labels[i, width - n:] = torch.tensor(e.labels)
        mask[i, width - n:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "position_ids": positions.to(device), "labels": labels.to(device)}


def model_inputs(batch: dict) -> dict:
    """The batch without labels (what the model takes for a plain forward)."""
    return {k: v for k, v in batch.items() if k != "labels"}


def supervised_tokens(items: list[Encoded]) -> int:
    """Tokens that contribute to the loss (label positions after the causal shift)."""
    return sum(sum(1 for t in e.labels[1:] if t != -100) for e in items)


def count_supervised(batch) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


class Batches:
    """The run's micro-batches; ``local`` is this process's strided share of micro-batch j."""

    def __init__(self, encoded, batch_size, pad_id, device, rank=0, world_size=1):
        if not encoded:
            raise TrainError("no training example fits in --seq-len; raise it")
        self.encoded, self.batch_size, self.pad_id, self.device = encoded, batch_size, pad_id, device
        self.rank, self.world_size = rank, world_size

    def global_items(self, j):
        n = len(self.encoded)
        return [self.encoded[(j * self.batch_size + i) % n] for i in range(self.batch_size)]

    def local(self, j) -> dict:
        return collate(self.global_items(j)[self.rank::self.world_size], self.pad_id, self.device)

    def whole(self, j) -> dict:
        return collate(self.global_items(j), self.pad_id, self.device)

    def step_tokens(self, step, grad_accum) -> int:
        """Supervised tokens of optimizer step ``step`` over all micro-batches and processes."""
        return sum(supervised_tokens(self.global_items(step * grad_accum + a))
                   for a in range(grad_accum))


def accepts(model, name) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def loss_sum(model, batch, keep_logits: bool = True, plain=None):
    """(summed token cross-entropy over supervised positions, the logits used). Only the logits
    from the first supervised position on are computed (``logits_to_keep``) where the model
    supports it. ``plain``: the unwrapped model, whose signature says what it accepts (``model``
    may be a DDP or compiled wrapper)."""
    plain = plain if plain is not None else model
    labels = batch["labels"][:, 1:]
    supervised = (labels != -100).any(0).nonzero()
    first = int(supervised[0]) if len(supervised) else labels.shape[1] - 1
    keep = labels.shape[1] - first + 1      # logits of positions first .. L-1
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "use_cache": False}
    if "position_ids" in batch and accepts(plain, "position_ids"):
        kwargs["position_ids"] = batch["position_ids"]
    if accepts(plain, "logits_to_keep"):
        logits = model(**kwargs, logits_to_keep=keep).logits
    else:
        logits = model(**kwargs).logits[:, -keep:]
    logits = logits[:, :-1].float()            # position t predicts token t + 1
    target = labels[:, first:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             target.reshape(-1), ignore_index=-100,
                                             reduction="sum")
    return loss, (logits if keep_logits else None)
