"""Evaluation of a model on held-out examples, by one of three metrics (``--metric``):

- ``numeric`` (the arithmetic / GSM8K default): greedy generation, the answer's number compared.
- ``exact``: greedy generation; the continuation, stripped, equals the reference completion.
- ``loss``: the held-out loss on the completion tokens (the prompt masked, as in training) and
  its perplexity, exp(loss per token); no generation.

Generation is batched and left-padded; the prompt is the example's rendered prompt (arithmetic:
``data.PROMPT``; chat: the chat template up to the last assistant turn).

Only the continuation is decoded and scored. A row stops at EOS, or at the end of the line that
holds its final answer (``#### N`` or ``The answer is: N``), or after ``max_new_tokens``. The
answer is extracted as GSM8K scoring does (``data.extract_answer``) and compared as a number.
Under torch.distributed each rank evaluates a strided share and the results are gathered.
Under FSDP (``synced=True``) every rank's share is padded to the same length, so all ranks make
the same number of ``generate`` calls, and ``generate`` runs with ``synced_gpus=True``: a rank
whose rows are done keeps stepping until every rank is (each step gathers the sharded layers,
which needs every rank).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

from .data import Example, extract_answer, prompt_of, same_number


def prompt_text(tokenizer, ex: Example) -> str:
    """The text the model continues for ``ex`` (the prompt of its completion)."""
    if ex.fmt == "qa":
        return prompt_of(ex.question)
    if ex.fmt == "chat":
        from .training.batching import render_chat
        return render_chat(tokenizer, ex.messages[:-1], add_generation_prompt=True)
    return ex.question

# a finished answer line: "#### 42" or "The answer is: 42", followed by a newline
_DONE = re.compile(r"(####|The answer is:?)\s*-?[\d,.]+[^\n]*\n")


@dataclass
class Prediction:
    index: int
    question: str
    reference: str
    output: str          # the decoded continuation
    prediction: str | None
    correct: bool


class AnswerLineStop:
    """Stopping criterion: per row, True once the continuation holds a finished answer line."""

    def __init__(self, tokenizer, prompt_len):
        self.tokenizer, self.prompt_len = tokenizer, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        return torch.tensor([bool(_DONE.search(t)) for t in texts], device=input_ids.device)


def cut_after_answer(text: str) -> str:
    m = _DONE.search(text)
    return text[: m.end()].rstrip("\n") if m else text


@torch.no_grad()
def generate_answers(model, tokenizer, questions, batch_size=50, max_new_tokens=32,
                     on_batch=None, synced=False, rendered=False) -> list[str]:
    """Greedy continuations of the prompts of ``questions`` (left padding, batched).
    ``rendered``: ``questions`` are prompts already, continued until EOS (no answer-line stop)."""
    from transformers import StoppingCriteriaList
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs = []
    try:
        for start in range(0, len(questions), batch_size):
            chunk = questions[start:start + batch_size]
            prompts = list(chunk) if rendered else [prompt_of(q) for q in chunk]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            prompt_len = enc["input_ids"].shape[1]
            out = model.generate(
                **enc, do_sample=False, max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                stopping_criteria=StoppingCriteriaList(
                    [] if rendered else [AnswerLineStop(tokenizer, prompt_len)]),
                temperature=None, top_p=None, top_k=None, synced_gpus=synced)
            texts = tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
            outputs.extend(t if rendered else cut_after_answer(t) for t in texts)
            if on_batch is not None:
                on_batch(len(prompts))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def predict(index: int, example: Example, output: str, metric: str = "numeric") -> Prediction:
    """Score one continuation against the example's reference."""
    if metric == "exact":
        return Prediction(index, example.question, example.answer.strip(), output,
                          output.strip(), output.strip() == example.answer.strip())
    pred = extract_answer(output)
    return Prediction(index, example.question, example.reference, output, pred,
                      same_number(pred, example.reference))


def evaluate(model, tokenizer, examples, batch_size=50, max_new_tokens=32, on_batch=None,
             rank=0, world_size=1, synced=False, metric="numeric", seq_len=256) -> dict:
    """{'metric', 'accuracy', 'correct', 'n', 'predictions': [Prediction as dict]} over
    ``examples`` (``metric`` 'loss': see ``heldout_loss``). ``synced``: every rank generates
    for the same number of rows (see the module docstring)."""
    if metric == "loss":
        return heldout_loss(model, tokenizer, examples, batch_size, seq_len, on_batch, rank,
                            world_size, synced)
    mine = list(range(rank, len(examples), world_size))
    rendered = metric != "numeric" or any(e.fmt != "qa" for e in examples)
    questions = [prompt_text(tokenizer, examples[i]) if rendered else examples[i].question
                 for i in mine]
    if synced and examples:  # pad with the first question; its answers are dropped below
        share = -(-len(examples) // world_size)
        questions += [questions[0] if questions else prompt_text(tokenizer, examples[0])
                      if rendered else examples[0].question] * (share - len(questions))
    outputs = generate_answers(model, tokenizer, questions, batch_size, max_new_tokens, on_batch,
                               synced, rendered)[:len(mine)]
    preds = [predict(i, examples[i], text, metric) for i, text in zip(mine, outputs, strict=False)]
    if world_size > 1:
        import torch.distributed as dist
        gathered = [None] * world_size
        dist.all_gather_object(gathered, preds)
        preds = sorted((p for part in gathered for p in part), key=lambda p: p.index)
    correct = sum(p.correct for p in preds)
    return {"metric": metric, "accuracy": correct / max(len(preds), 1), "correct": correct,
            "n": len(preds), "predictions": [asdict(p) for p in preds]}


@torch.no_grad()
def heldout_loss(model, tokenizer, examples, batch_size=50, seq_len=256, on_batch=None, rank=0,
                 world_size=1, synced=False) -> dict:
    """{'metric': 'loss', 'loss', 'perplexity', 'tokens', 'n'}: the mean cross-entropy per
    completion token (the prompt masked, as training masks it) over ``examples``, and its
    exp. Each rank takes a strided share; under ``synced`` the shares are padded with rows
    that have no target, so every rank makes the same number of forwards."""
    import math

    from .training.batching import Encoded, collate, encode, loss_sum
    device = next(model.parameters()).device
    mine = [examples[i] for i in range(rank, len(examples), world_size)]
    encoded, skipped = encode(tokenizer, mine, seq_len)
    if synced and examples:
        share = -(-len(examples) // world_size)
        pad = Encoded([tokenizer.pad_token_id or 0] * 2, [-100, -100])
        encoded += [pad] * (share - len(encoded))
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    try:
        for start in range(0, len(encoded), batch_size):
            batch = collate(encoded[start:start + batch_size], tokenizer.pad_token_id or 0, device)
            total[0] += float(loss_sum(model, batch, keep_logits=False)[0])
            total[1] += int((batch["labels"][:, 1:] != -100).sum())
            if on_batch is not None:
                on_batch(min(batch_size, len(encoded) - start))
    finally:
        model.train(was_training)
    if world_size > 1:
        import torch.distributed as dist
        total = total.to(device)
        dist.all_reduce(total)
        total = total.cpu()
    loss = float(total[0] / total[1]) if total[1] else float("nan")
    return {"metric": "loss", "loss": loss, "perplexity": math.exp(loss) if total[1] else None,
            "tokens": int(total[1]), "n": len(examples), "skipped": skipped,
            "accuracy": None, "correct": None, "predictions": []}
