"""Tokenising, batching and the training loss.

An example is a list of text segments, each trained on or not (``segments``): the arithmetic
format is ``prompt + ' ' + answer + EOS`` with labels -100 over the prompt; alpaca and
prompt/completion are ``prompt + completion + EOS``; chat is the conversation rendered by the
tokenizer's chat template, trained on the assistant turns; text is all trained. ``loss_on="all"``
trains on every segment. ``pack`` (``--pack``) concatenates encoded examples into rows of up to
``seq_len`` tokens: labels keep each example's mask, position ids restart at 0 for every example,
but attention is not blocked between the examples of one row (each example may attend to the
earlier examples of its row, as in plain concatenation packing; no label crosses a boundary). Batches are
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

LOSS_ON = ("completion", "all")


@dataclass
class Encoded:
    input_ids: list
    labels: list
    positions: list | None = None   # packed rows: position ids restarting per example


def render_chat(tokenizer, messages, add_generation_prompt=False) -> str:
    """The chat template's text of ``messages`` (a TrainError when the tokenizer has none)."""
    if not getattr(tokenizer, "chat_template", None):
        raise TrainError("chat-format data needs a tokenizer with a chat template; this model's "
                         "has none: use a chat/instruct model, set tokenizer_config.json's "
                         "chat_template, or convert the data to prompt/completion")
    return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                         tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_segments(tokenizer, messages) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is assistant content) segments: each
    assistant turn's text after the template's generation prompt is trained on."""
    out, done = [], ""
    for i, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        head = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        full = render_chat(tokenizer, messages[:i + 1])
        if not (head.startswith(done) and full.startswith(head)):
            raise TrainError("the chat template does not render a conversation's turns as "
                             "prefixes of each other; its assistant turns cannot be masked")
        out += [(head[len(done):], False), (full[len(head):], True)]
        done = full
    return out


def segments(tokenizer, ex) -> list[tuple[str, bool]]:
    """(text, trained) segments of one example (see the module docstring)."""
    if ex.fmt == "chat":
        return chat_segments(tokenizer, ex.messages)
    if ex.fmt == "text":
        return [(ex.answer, True)]
    if ex.fmt == "qa":
        return [(data_mod.prompt_of(ex.question), False), (" " + ex.answer.strip(), True)]
    return [(ex.question, False), (ex.answer, True)]


def encode_one(tokenizer, ex, seq_len, loss_on="completion") -> Encoded | None:
    """The example as ids and labels (-100 where not trained), truncated to ``seq_len``; None
    when no trained token is left (e.g. the prompt alone fills seq_len)."""
    ids, labels = [], []
    parts = segments(tokenizer, ex)
    for k, (text, trained) in enumerate(parts):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if k == len(parts) - 1 and ex.fmt != "chat" and tokenizer.eos_token_id is not None:
            piece = piece + [tokenizer.eos_token_id]
        ids += piece
        labels += piece if trained or loss_on == "all" else [-100] * len(piece)
    ids, labels = ids[:seq_len], labels[:seq_len]
    if all(t == -100 for t in labels[1:]):
        return None
    return Encoded(ids, labels)


def encode(tokenizer, examples, seq_len, loss_on="completion") -> tuple[list[Encoded], int]:
    """(encoded, skipped) where skipped counts examples with no trained token within seq_len."""
    out, skipped = [], 0
    for ex in examples:
        e = encode_one(tokenizer, ex, seq_len, loss_on)
        if e is None:
            skipped += 1
        else:
            out.append(e)
    return out, skipped


def pack(encoded: list[Encoded], seq_len) -> list[Encoded]:
    """Greedy packing in order: each row holds whole examples up to ``seq_len`` tokens. The
    first token of every example is not a target (nothing of the previous example predicts it);
    positions restart at 0 per example."""
    rows, cur = [], None
    for e in encoded:
        if cur is not None and len(cur.input_ids) + len(e.input_ids) <= seq_len:
            cur.input_ids += e.input_ids
            cur.labels += [-100] + e.labels[1:]
            cur.positions += list(range(len(e.input_ids)))
        else:
            cur = Encoded(list(e.input_ids), list(e.labels), list(range(len(e.input_ids))))
            rows.append(cur)
    return rows


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
    for i, e in enumerate(items):
        if e.positions is not None:
            positions[i, width - len(e.positions):] = torch.tensor(e.positions)
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
