"""Training and evaluation data: the built-in arithmetic word problems, hub datasets, local files.

Built-in and arithmetic examples are ``(question, answer)`` pairs with the answer in GSM8K's
format: reasoning lines, then ``#### N``. A file or dataset may hold any of the formats in
``FORMATS``, detected from the first record's fields (``--data-format`` overrides):

- ``qa``: question/answer, query/response or input/output - the arithmetic format, put into
  ``PROMPT`` and scored by the number (``#### N``).
- ``chat``: ``messages``, a list of ``{"role", "content"}``; rendered with the tokenizer's chat
  template (a tokenizer without one is refused in one line); the loss is on assistant turns.
- ``alpaca``: ``instruction`` / optional ``input`` / ``output``, rendered with the Alpaca prompt.
- ``prompt_completion``: ``prompt`` / ``completion``, joined verbatim.
- ``text``: plain ``text``; the loss is on all of it.

Sources (``--train-data`` / ``--eval-data``):

- ``generated`` (default): the project's own arithmetic word problems, deterministic from a seed.
  The held-out test split is fixed (it does not depend on ``--seed``) and disjoint from every
  training stream by construction: a problem's split is a function of its question text.
- a local ``.jsonl`` / ``.json`` file, or a local dataset folder (``datasets.save_to_disk`` output,
  or a folder of data files), with question/answer, query/response or prompt/completion fields.
- a hub dataset, ``NAME[:CONFIG][@SPLIT]``, loaded with ``datasets.load_dataset``: e.g.
  ``meta-math/MetaMathQA`` (query/response) and ``openai/gsm8k`` (question/answer, config
  ``main``). The same loader code reads a local folder, which is how it is tested offline.

Answers are scored as GSM8K scoring does (``extract_answer``): the last number after the last
``####``, else the last number of the text; commas stripped.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass

GENERATED = "generated"
TEST_SEED = 20240611           # the fixed held-out split does not depend on --seed
TEST_SIZE = 500                # size of the generated held-out split
PROMPT = "Question: {question} Think step by step.\nAnswer:"

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
# (question field, answer field) pairs recognised in records, in order of preference
FIELD_PAIRS = (("question", "answer"), ("query", "response"), ("input", "output"))
FORMATS = ("qa", "chat", "alpaca", "prompt_completion", "text")
ALPACA_PROMPT = ("Below is an instruction that describes a task{context}. Write a response that "
                 "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                 "{input}### Response:\n")
# hub datasets whose config / splits we know
KNOWN_HUB = {
    "openai/gsm8k": {"config": "main", "train": "train", "eval": "test"},
    "gsm8k": {"config": "main", "train": "train", "eval": "test"},
    "meta-math/MetaMathQA": {"config": None, "train": "train", "eval": "train"},
}


class DataError(ValueError):
    """Data cannot be loaded or used; the message says which source and why."""


@dataclass(frozen=True)
class Example:
    question: str      # qa: the question (put into PROMPT); alpaca / prompt_completion: the
                       # rendered prompt; chat: the last user turn; text: ""
    answer: str        # the completion (qa: ending with the final answer, GSM8K "... #### N")
    fmt: str = "qa"    # one of FORMATS
    messages: tuple = ()  # chat: ((role, content), ...), the whole conversation

    @property
    def reference(self) -> str:
        return reference_answer(self.answer)


def prompt_of(question: str) -> str:
    return PROMPT.format(question=question.strip())


# -- answer extraction (GSM8K scoring) ---------------------------------------------------------

def extract_answer(text: str) -> str | None:
    """The final number of a model's answer: the last number after the last ``####`` (the whole
    text when there is no ``####``), commas and a trailing '.' stripped; None if there is none."""
    tail = text.rsplit("####", 1)[-1]
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return None
    return numbers[-1].replace(",", "").rstrip(".")


def reference_answer(answer: str) -> str:
    """The reference number of a dataset answer (GSM8K '#### N', MetaMathQA 'The answer is: N',
    else the last number). Raises DataError when there is none."""
    if "####" not in answer and "The answer is:" in answer:
        answer = answer.rsplit("The answer is:", 1)[-1]
    ref = extract_answer(answer)
    if ref is None:
        raise DataError(f"reference answer without a number: {answer[-80:]!r}")
    return ref


def same_number(pred: str | None, ref: str) -> bool:
    """Exact match of two extracted numbers ('38' == '38.0'; '1234' == '1,234')."""
    if pred is None:
        return False
    try:
        return float(pred) == float(ref)
    except ValueError:
        return pred == ref


# -- the generated arithmetic word problems ----------------------------------------------------

_NAMES = ["Tom", "Ana", "Ben", "Mia", "Leo", "Zoe", "Sam", "Eva", "Max", "Ivy", "Raj", "Kim",
          "Omar", "Lena", "Noah", "Sara", "Yuki", "Paul", "Nina", "Hugo"]
_ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "shells", "stamps",
          "cards", "coins", "eggs", "toys", "beads", "flowers", "candies", "balloons"]


def _problem(rng: random.Random) -> Example:
    name, friend = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    kind = rng.randrange(8)
    if kind == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        q = f"{name} has {a} {item}. {name} gets {b} more. How many {item} does {name} have now?"
        steps, ans = [f"{a} + {b} = {a + b}"], a + b
    elif kind == 1:
        a = rng.randint(10, 80)
        b = rng.randint(1, a - 1)
        q = f"{name} had {a} {item} and gave {b} to {friend}. How many {item} does {name} have left?"
        steps, ans = [f"{a} - {b} = {a - b}"], a - b
    elif kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        q = f"{name} buys {a} bags with {b} {item} in each bag. How many {item} does {name} buy?"
        steps, ans = [f"{a} * {b} = {a * b}"], a * b
    elif kind == 3:
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        q = f"{name} shares {a * b} {item} equally among {a} friends. How many {item} does each friend get?"
        steps, ans = [f"{a * b} / {a} = {b}"], b
    elif kind == 4:
        a, b = rng.randint(2, 40), rng.randint(2, 30)
        q = (f"{name} has {a} {item}. {friend} has {b} more {item} than {name}. "
             f"How many {item} does {friend} have?")
        steps, ans = [f"{a} + {b} = {a + b}"], a + b
    elif kind == 5:
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        q = (f"{name} has {a} {item} and {friend} has {b} {item}. "
             f"How many {item} do they have together?")
        steps, ans = [f"{a} + {b} = {a + b}"], a + b
    elif kind == 6:
        a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 30)
        q = (f"{name} has {a} {item}, finds {b} more and then buys {c} more. "
             f"How many {item} does {name} have now?")
        steps, ans = [f"{a} + {b} = {a + b}", f"{a + b} + {c} = {a + b + c}"], a + b + c
    else:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        c = rng.randint(1, a * b - 1)
        q = (f"{name} packs {a} boxes with {b} {item} each and then gives away {c}. "
             f"How many {item} are left?")
        steps, ans = [f"{a} * {b} = {a * b}", f"{a * b} - {c} = {a * b - c}"], a * b - c
    return Example(q, "\n".join(steps) + f"\n#### {ans}")


def is_test_question(question: str) -> bool:
    """The split of a generated problem: a fixed function of its text (1 in 5 are test)."""
    return hashlib.sha1(question.encode()).digest()[0] % 5 == 0


def generate(n: int, seed: int = 0, split: str = "train") -> list[Example]:
    """``n`` generated problems of ``split`` ('train' or 'test'), deterministic from ``seed``
    (the test split always uses TEST_SEED, so it is the same for every run)."""
    rng = random.Random(TEST_SEED if split == "test" else seed)
    want_test = split == "test"
    out, seen = [], set()
    while len(out) < n:
        ex = _problem(rng)
        if is_test_question(ex.question) != want_test:
            continue
        if want_test and ex.question in seen:  # the test split has no duplicates
            continue
        seen.add(ex.question)
        out.append(ex)
    return out


# -- records from files and datasets -----------------------------------------------------------

def detect_format(keys) -> str | None:
    """The format of a record with fields ``keys`` (None: no known format)."""
    keys = set(keys)
    if "messages" in keys:
        return "chat"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if any(q in keys and a in keys for q, a in FIELD_PAIRS):
        return "qa"
    if "text" in keys:
        return "text"
    return None


EXPECTED = ("messages (chat), instruction/output (alpaca), prompt/completion, text, or "
            + ", ".join("/".join(p) for p in FIELD_PAIRS) + " (qa)")


def _text(rec, key, source, i, optional=False):
    value = rec.get(key)
    if value is None and optional:  # alpaca's input: absent, null or ""
        value = ""
    if not isinstance(value, str):
        raise DataError(f"{source}: record {i} has no text in {key!r} "
                        f"(found {type(value).__name__})")
    return value


def _chat_example(rec, source, i) -> Example:
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{source}: record {i}: 'messages' must be a non-empty list of "
                        "{'role', 'content'} objects")
    turns = []
    for j, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise DataError(f"{source}: record {i} message {j} needs a string 'role' and "
                            "'content'")
        turns.append((m["role"], m["content"]))
    if turns[-1][0] != "assistant":
        raise DataError(f"{source}: record {i}: the last message must be the assistant's "
                        f"(it is {turns[-1][0]!r})")
    last_user = next((c for r, c in reversed(turns[:-1]) if r == "user"), "")
    return Example(last_user, turns[-1][1], "chat", tuple(turns))


def record_example(rec, fmt: str, source: str, i: int) -> Example:
    """One record as an Example of format ``fmt`` (a DataError naming the record if it has
    the wrong fields or types)."""
    if fmt == "chat":
        return _chat_example(rec, source, i)
    if fmt == "alpaca":
        instruction, extra = _text(rec, "instruction", source, i), _text(rec, "input", source, i, True)
        prompt = ALPACA_PROMPT.format(
            context=", paired with an input that provides further context" if extra else "",
            instruction=instruction, input=f"### Input:\n{extra}\n\n" if extra else "")
        return Example(prompt, _text(rec, "output", source, i), "alpaca")
    if fmt == "prompt_completion":
        return Example(_text(rec, "prompt", source, i), _text(rec, "completion", source, i),
                       "prompt_completion")
    if fmt == "text":
        return Example("", _text(rec, "text", source, i), "text")
    # --data-format qa also reads prompt/completion records as question/answer (as before)
    pairs = FIELD_PAIRS + (("prompt", "completion"),)
    q_key, a_key = next((p for p in pairs if p[0] in rec and p[1] in rec), FIELD_PAIRS[0])
    q, a = rec.get(q_key), rec.get(a_key)
    if not isinstance(q, str) or not isinstance(a, str):
        raise DataError(f"{source}: record {i} has no text in {q_key!r}/{a_key!r}")
    return Example(q, a)


def examples_from_records(records, source: str, fmt: str | None = None) -> list[Example]:
    """Examples of ``records`` in format ``fmt`` (None: detected from the first record)."""
    records = list(records)
    if not records:
        raise DataError(f"{source}: no records")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{source}: record {i} is a {type(rec).__name__}, not an object "
                            f"with the fields of one format: {EXPECTED}")
    if fmt is None:
        fmt = detect_format(records[0])
        if fmt is None:
            raise DataError(f"{source}: records in no known format: found fields "
                            f"{sorted(records[0])}; expected {EXPECTED}")
    elif fmt not in FORMATS:
        raise DataError(f"--data-format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return [record_example(rec, fmt, source, i) for i, rec in enumerate(records)]


def read_jsonl(path: str, fmt: str | None = None) -> list[Example]:
    """Examples of a .jsonl file (one JSON object a line) or a .json file (a list of objects,
    or {"data": [...]}); a DataError naming the file and line for anything else."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    records = []
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None
        records = data if isinstance(data, list) else (
            data.get("data", []) if isinstance(data, dict) else [data])
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not JSON ({e.msg})") from None
    return examples_from_records(records, path, fmt)


def parse_hub_spec(spec: str) -> tuple[str, str | None, str | None]:
    """'NAME[:CONFIG][@SPLIT]' -> (name, config, split)."""
    split = None
    if "@" in spec:
        spec, split = spec.rsplit("@", 1)
    config = None
    if ":" in spec:
        spec, config = spec.split(":", 1)
    return spec, config, split


def load_hub(spec: str, purpose: str):
    """A ``datasets`` split for ``spec`` (hub name, local dataset folder); ``purpose`` is
    'train' or 'eval' and picks the default split. Imports ``datasets`` lazily."""
    name, config, split = parse_hub_spec(spec)
    known = KNOWN_HUB.get(name, {})
    config = config or known.get("config")
    split = split or known.get(purpose)
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading {spec!r} needs the `datasets` package: "
                        "pip install 'lora-lite-cli[hub]'") from None
    datasets.disable_progress_bars()
    try:
        if os.path.isdir(name) and (os.path.isfile(os.path.join(name, "dataset_dict.json"))
                                    or os.path.isfile(os.path.join(name, "state.json"))):
            ds = datasets.load_from_disk(name)      # a save_to_disk folder
        else:
            ds = datasets.load_dataset(name, config)  # hub name or a folder of data files
    except Exception as e:  # offline hub, missing name, bad config: one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"could not load dataset {spec!r}: {first}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            split = purpose if purpose in ds else ("test" if purpose == "eval" and "test" in ds
                                                    else next(iter(ds)))
        if split not in ds:
            raise DataError(f"dataset {spec!r} has no split {split!r}; it has {sorted(ds)}")
        ds = ds[split]
    return ds, split


@dataclass
class DataSource:
    spec: str                      # what the user gave
    kind: str                      # generated | jsonl | hub
    examples: list[Example]
    split: str | None = None

    @property
    def format(self) -> str:
        return self.examples[0].fmt if self.examples else "qa"

    def fingerprint(self) -> dict:
        digest = hashlib.sha256()
        for ex in self.examples:
            digest.update(ex.question.encode())
            digest.update(b"\x00")
            digest.update(ex.answer.encode())
            if ex.messages:
                digest.update(json.dumps(ex.messages).encode())
            digest.update(b"\x01")
        first = self.examples[0].question if self.examples else ""
        return {"source": self.spec, "kind": self.kind, "split": self.split,
                "format": self.format,
                "n": len(self.examples), "distinct": len({ex.question for ex in self.examples}),
                "sha256": digest.hexdigest()[:16],
                "first_question_sha1": hashlib.sha1(first.encode()).hexdigest()[:12]}


def _load_all(spec: str, purpose: str, fmt=None) -> tuple[str, list[Example], str | None]:
    if os.path.isfile(spec):
        return "jsonl", read_jsonl(spec, fmt), None
    if spec.endswith((".jsonl", ".json")):
        raise DataError(f"data file {spec!r} not found")
    ds, split = load_hub(spec, purpose)
    return "hub", examples_from_records(ds, spec, fmt), split


def train_data(spec: str, n: int, seed: int, fmt: str | None = None) -> DataSource:
    """``n`` training examples in training order: generated from ``seed``, or read and shuffled
    with ``seed`` (cycling through reshuffled epochs if the source has fewer than ``n``)."""
    if spec in (GENERATED, "", None):
        return DataSource(GENERATED, "generated", generate(n, seed, "train"), "train")
    kind, pool, split = _load_all(spec, "train", fmt)
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        order = list(range(len(pool)))
        rng.shuffle(order)
        out.extend(pool[i] for i in order[: n - len(out)])
    return DataSource(spec, kind, out, split)


def eval_data(spec: str, limit: int | None, fmt: str | None = None,
              metric: str | None = None) -> DataSource:
    """The evaluation examples in file order (the first ``limit``): the fixed generated test
    split, or a file / dataset split (GSM8K: test)."""
    if spec in (GENERATED, "", None):
        n = TEST_SIZE if not limit else min(limit, TEST_SIZE)
        return DataSource(GENERATED, "generated", generate(n, split="test"), "test")
    kind, pool, split = _load_all(spec, "eval", fmt)
    if limit:
        pool = pool[:limit]
    if (metric or default_metric(pool[0].fmt)) == "numeric":
        for ex in pool:  # fail early on an unscoreable reference
            _ = ex.reference
    return DataSource(spec, kind, pool, split)


METRICS = ("numeric", "exact", "loss")


def default_metric(fmt: str) -> str:
    """qa (arithmetic, GSM8K): the number; every other format: held-out loss (free-form
    answers rarely match exactly; ``--metric exact`` asks for it)."""
    return "numeric" if fmt == "qa" else "loss"


def check_metric(metric: str | None, fmt: str) -> str:
    """The metric to use for data of format ``fmt`` (a DataError for a bad one)."""
    metric = metric or default_metric(fmt)
    if metric not in METRICS:
        raise DataError(f"--metric {metric!r}: expected one of {', '.join(METRICS)}")
    if fmt == "text" and metric != "loss":
        raise DataError(f"--metric {metric}: plain text data has no reference answer; "
                        "use --metric loss")
    return metric





def write_jsonl(examples, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps({"question": ex.question, "answer": ex.answer}) + "\n")
