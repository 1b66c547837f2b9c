"""Accuracy of a model on question/answer examples: greedy, batched, left-padded generation.

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
                     on_batch=None, synced=False) -> list[str]:
    """Greedy continuations of the prompts of ``questions`` (left padding, batched)."""
    from transformers import StoppingCriteriaList
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs = []
    try:
        for start in range(0, len(questions), batch_size):
            prompts = [prompt_of(q) for q in questions[start:start + batch_size]]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            prompt_len = enc["input_ids"].shape[1]
            out = model.generate(
                **enc, do_sample=False, max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                stopping_criteria=StoppingCriteriaList([AnswerLineStop(tokenizer, prompt_len)]),
                temperature=None, top_p=None, top_k=None, synced_gpus=synced)
            texts = tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
            outputs.extend(cut_after_answer(t) for t in texts)
            if on_batch is not None:
                on_batch(len(prompts))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def predict(index: int, example: Example, output: str) -> Prediction:
    """Score one continuation against the example's reference."""
    pred = extract_answer(output)
    return Prediction(index, example.question, example.reference, output, pred,
                      same_number(pred, example.reference))


def evaluate(model, tokenizer, examples, batch_size=50, max_new_tokens=32, on_batch=None,
             rank=0, world_size=1, synced=False) -> dict:
    """{'accuracy', 'correct', 'n', 'predictions': [Prediction as dict]} over ``examples``.
    ``synced``: every rank generates for the same number of rows (see the module docstring)."""
    mine = list(range(rank, len(examples), world_size))
    questions = [examples[i].question for i in mine]
    if synced and examples:  # pad with the first question; its answers are dropped below
        share = -(-len(examples) // world_size)
        questions += [examples[0].question] * (share - len(questions))
    outputs = generate_answers(model, tokenizer, questions, batch_size, max_new_tokens, on_batch,
                               synced)[:len(mine)]
    preds = [predict(i, examples[i], text) for i, text in zip(mine, outputs)]
    if world_size > 1:
        import torch.distributed as dist
        gathered = [None] * world_size
        dist.all_gather_object(gathered, preds)
        preds = sorted((p for part in gathered for p in part), key=lambda p: p.index)
    correct = sum(p.correct for p in preds)
    return {"accuracy": correct / max(len(preds), 1), "correct": correct, "n": len(preds),
            "predictions": [asdict(p) for p in preds]}
