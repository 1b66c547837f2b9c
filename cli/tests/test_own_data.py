"""The user's own data for `train` / `eval`: chat, alpaca, prompt/completion and text files,
format detection and refusals, the loss mask (labels, and a loss test on a prompt-only change),
packing, and the evaluation metrics (numeric, exact, held-out loss)."""
import json
import shutil

import pytest
import torch
from tinymodel import save_tiny_model
from typer.testing import CliRunner

from lora_lite_cli import data, evaluate, models
from lora_lite_cli.app import get_app
from lora_lite_cli.training import batching
from lora_lite_cli.training.settings import TrainError

runner = CliRunner()
# a ChatML-like template (the tiny tokenizer has none of its own)
CHATML = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CHAT = [{"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": f"Say {w}."},
                      {"role": "assistant", "content": w}]} for w in ("yes", "no", "maybe", "ok")]
ALPACA = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
          {"instruction": "Say hi.", "input": None, "output": "hi"}]
PROMPT_COMPLETION = [{"prompt": "The sky is", "completion": " blue."},
                     {"prompt": "Grass is", "completion": " green."}]
TEXT = [{"text": "Once upon a time there was a cat."}, {"text": "The end."}]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="module")
def chat_dir(tiny_dir, tmp_path_factory):
    """The tiny model with a chat template in its tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("tiny_chat") / "m"
    shutil.copytree(tiny_dir, folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHATML
    cfg_path.write_text(json.dumps(cfg))
    return str(folder)


@pytest.fixture(scope="module")
def chat_tok(chat_dir):
    return models.load_model(chat_dir)[1]


# -- formats and refusals (model-free) --------------------------------------------------------

def test_formats_are_detected_from_fields(tmp_path):
    for records, fmt in ((CHAT, "chat"), (ALPACA, "alpaca"), (PROMPT_COMPLETION,
                         "prompt_completion"), (TEXT, "text"),
                         ([{"question": "1 + 1?", "answer": "#### 2"}], "qa")):
        src = data.train_data(write_jsonl(tmp_path / f"{fmt}.jsonl", records), 4, seed=0)
        assert src.format == fmt and src.fingerprint()["format"] == fmt
    chat = data.eval_data(str(tmp_path / "chat.jsonl"), None).examples[0]
    assert chat.messages[-1] == ("assistant", "yes") and chat.answer == "yes"
    alpaca = data.eval_data(str(tmp_path / "alpaca.jsonl"), None).examples
    assert "### Input:\n2 and 3" in alpaca[0].question and "### Input" not in alpaca[1].question
    assert alpaca[0].question.endswith("### Response:\n") and alpaca[0].answer == "5"
    # --data-format overrides detection: prompt/completion records read as question/answer
    numeric = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "1 + 1?", "completion": "#### 2"}])
    assert data.eval_data(numeric, None).format == "prompt_completion"
    forced = data.eval_data(numeric, None, fmt="qa").examples[0]
    assert forced.fmt == "qa" and forced.question == "1 + 1?" and forced.reference == "2"


@pytest.mark.parametrize("content, needle", [
    ("", "no records"),
    ('{"text": "a"}\n{"text": \n', r"bad.jsonl:2: not JSON"),
    ('{"messages": "hi"}\n', "'messages' must be a non-empty list"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "last message must be the assistant"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}\n',
     "message 0 needs a string 'role' and 'content'"),
    ('{"instruction": "x", "output": 5}\n', "record 0 has no text in 'output' \\(found int\\)"),
    ('{"text": "a"}\n{"text": null}\n', "record 1 has no text in 'text'"),
    ('[1, 2]\n', "record 0 is a list, not an object"),
])
def test_bad_files_are_one_line(tmp_path, content, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(data.DataError, match=needle) as err:
        data.train_data(str(path), 4, seed=0)
    assert "\n" not in str(err.value)


def test_bad_file_on_the_command_line_exits_2(tiny_dir, tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1, "bar": 2}])
    for cmd in (["train", "--variant", "lora", "--model", tiny_dir, "--train-data", path],
                ["train", "--variant", "lora", "--model", tiny_dir, "--train-data",
                 str(tmp_path / "missing.jsonl")],
                ["train", "--variant", "lora", "--model", tiny_dir, "--metric", "bleu"],
                ["train", "--variant", "lora", "--model", tiny_dir, "--loss-on", "prompt"],
                ["train", "--variant", "lora", "--model", tiny_dir, "--data-format", "csv"]):
        result = runner.invoke(get_app(), cmd)
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and result.output.strip().endswith(errors[0]), result.output
    assert "found fields ['bar', 'foo']" in runner.invoke(get_app(), [
        "train", "--variant", "lora", "--model", tiny_dir, "--train-data", path]).output


def test_text_data_refuses_generation_metrics(tmp_path):
    with pytest.raises(data.DataError, match="use --metric loss"):
        data.check_metric("exact", "text")
    assert data.check_metric(None, "text") == "loss" and data.check_metric(None, "qa") == "numeric"
    assert data.check_metric(None, "chat") == "loss" and data.check_metric("exact", "chat") == "exact"


# -- the loss mask ----------------------------------------------------------------------------

def test_arithmetic_encoding_is_unchanged(chat_tok):
    """qa examples encode exactly as before: PROMPT, ' ' + answer + EOS, the prompt masked."""
    ex = data.generate(1, seed=3)[0]
    enc = batching.encode_one(chat_tok, ex, 256)
    prompt = chat_tok(data.prompt_of(ex.question), add_special_tokens=False)["input_ids"]
    answer = chat_tok(" " + ex.answer.strip(), add_special_tokens=False)["input_ids"] + [
        chat_tok.eos_token_id]
    assert enc.input_ids == prompt + answer
    assert enc.labels == [-100] * len(prompt) + answer


def supervised_text(tok, enc):
    return tok.decode([t for t in enc.labels if t != -100])


def test_labels_cover_the_completion_only(chat_tok):
    alpaca = data.examples_from_records(ALPACA, "x")[0]
    enc = batching.encode_one(chat_tok, alpaca, 512)
    n_prompt = len(chat_tok(alpaca.question, add_special_tokens=False)["input_ids"])
    assert enc.labels[:n_prompt] == [-100] * n_prompt
    assert supervised_text(chat_tok, enc) == "5<eos>"
    everything = batching.encode_one(chat_tok, alpaca, 512, loss_on="all")
    assert everything.labels == everything.input_ids
    pc = data.examples_from_records(PROMPT_COMPLETION, "x")[0]
    assert supervised_text(chat_tok, batching.encode_one(chat_tok, pc, 512)) == " blue.<eos>"
    text = data.examples_from_records(TEXT, "x")[0]
    enc = batching.encode_one(chat_tok, text, 512)
    assert enc.labels == enc.input_ids


def test_chat_labels_are_the_assistant_turns(chat_tok):
    two_turns = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "B1"},
                              {"role": "user", "content": "c"}, {"role": "assistant", "content": "D2"}]}
    ex = data.examples_from_records([two_turns], "x")[0]
    enc = batching.encode_one(chat_tok, ex, 512)
    assert chat_tok.decode(enc.input_ids) == batching.render_chat(chat_tok, ex.messages)
    # the template's role headers and the user turns are masked; assistant content + end trained
    assert supervised_text(chat_tok, enc) == "B1<eos>\nD2<eos>\n"


def test_chat_without_a_template_is_refused(tiny_dir):
    tok = models.load_model(tiny_dir)[1]
    ex = data.examples_from_records(CHAT, "x")[0]
    with pytest.raises(TrainError, match="needs a tokenizer with a chat template"):
        batching.encode_one(tok, ex, 256)


def context_free(model):
    """Zero every attention output: each position's logits then depend on its own token only,
    so the loss at a completion token depends on the prompt only through the last prompt token."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    return model


def batch_loss(model, tok, records, loss_on):
    examples = data.examples_from_records(records, "x")
    encoded, _ = batching.encode(tok, examples, 512, loss_on)
    batch = batching.collate(encoded, tok.pad_token_id, "cpu")
    with torch.no_grad():
        return batching.loss_sum(model, batch)[0].item()


@pytest.mark.parametrize("records, changed", [
    (ALPACA[:1], [{**ALPACA[0], "instruction": "Sum these numbers"}]),
    (CHAT[:1], [{"messages": [CHAT[0]["messages"][0], {"role": "user", "content": "Tell yes."},
                              CHAT[0]["messages"][2]]}]),
])
def test_a_prompt_only_change_leaves_the_masked_loss(chat_dir, records, changed):
    """With the prompt masked the loss is the completion's: a change to the prompt (not its
    last token) leaves it exactly; with --loss-on all the same change moves the loss. Under a
    context-free model, so the only way the prompt could enter the masked loss is as a target."""
    model, tok = models.load_model(chat_dir)
    context_free(model)
    masked = batch_loss(model, tok, records, "completion")
    assert batch_loss(model, tok, changed, "completion") == pytest.approx(masked, rel=1e-6)
    full = batch_loss(model, tok, records, "all")
    assert abs(batch_loss(model, tok, changed, "all") - full) > 1e-3 * full
    assert full > masked


# -- packing ----------------------------------------------------------------------------------

def test_pack_keeps_every_example_mask_and_restarts_positions(chat_tok):
    examples = data.examples_from_records(PROMPT_COMPLETION * 3, "x")
    encoded, _ = batching.encode(chat_tok, examples, 64)
    rows = batching.pack(encoded, 64)
    assert len(rows) < len(encoded) and all(len(r.input_ids) <= 64 for r in rows)
    assert sum(len(r.input_ids) for r in rows) == sum(len(e.input_ids) for e in encoded)
    flat_labels = [t for r in rows for t in r.labels]
    # the supervised tokens are the examples' own (no example's first token is a target)
    assert [t for t in flat_labels if t != -100] == [t for e in encoded for t in e.labels
                                                    if t != -100]
    first = rows[0]
    n0 = len(encoded[0].input_ids)
    assert first.positions[:n0] == list(range(n0)) and first.positions[n0] == 0
    assert first.labels[n0] == -100
    batch = batching.collate(rows, chat_tok.pad_token_id, "cpu")
    assert batch["position_ids"][0, -len(first.positions):].tolist() == first.positions


# -- train and eval on own data (tiny model) --------------------------------------------------

SMALL = ["--steps", "2", "--batch-size", "2", "--eval-limit", "2", "--max-new-tokens", "4",
         "--eval-batch-size", "2", "--seq-len", "320", "--threads", "1", "--rank", "2"]


def train(*args, expect=0):
    result = runner.invoke(get_app(), ["train", *args])
    assert result.exit_code == expect, result.output + repr(result.exception)
    return result


def test_train_on_chat_uses_the_template_and_reports_heldout_loss(chat_dir, tiny_dir, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    out = tmp_path / "run"
    train("--variant", "lora", "--model", chat_dir, "--train-data", path, "--eval-data", path,
          *SMALL, "--output", str(out))
    m = json.loads((out / "metrics.json").read_text())
    assert m["data"]["train"]["format"] == "chat" and m["data"]["loss_on"] == "completion"
    assert m["metric"] == "loss" and m["eval"]["metric"] == "loss"
    assert m["eval"]["adapted"]["loss"] > 0 and m["eval"]["adapted"]["perplexity"] > 1
    assert m["loss_after"] == m["eval"]["adapted"]["loss"] and m["accuracy_after"] is None
    # the tiny tokenizer without a template: one line, exit 2, before training
    result = train("--variant", "lora", "--model", tiny_dir, "--train-data", path, *SMALL,
                   "--output", str(tmp_path / "nope"), expect=2)
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error:") and "chat template" in last
    # eval --metric loss on the saved adapter: base and adapted held-out loss
    result = runner.invoke(get_app(), ["eval", "--adapter", str(out / "adapter.safetensors"),
                                       "--model", chat_dir, "--eval-data", path, "--metric",
                                       "loss", "--eval-limit", "2", "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout)
    assert res["metric"] == "loss" and res["adapted"]["loss"] == pytest.approx(
        m["eval"]["adapted"]["loss"], rel=1e-4)
    assert res["base"]["tokens"] == res["adapted"]["tokens"] > 0
    table = runner.invoke(get_app(), ["eval", "--adapter", str(out / "adapter.safetensors"),
                                      "--model", chat_dir, "--eval-data", path, "--metric", "loss",
                                      "--eval-limit", "2", "--threads", "1"])
    assert table.exit_code == 0 and "held-out loss" in table.output and "perplexity" in table.output


@pytest.mark.parametrize("records, extra", [
    (ALPACA, ["--metric", "exact"]), (PROMPT_COMPLETION, ["--pack"]), (TEXT, []),
])
def test_alpaca_prompt_completion_and_text_files_train(tiny_dir, tmp_path, records, extra):
    path = write_jsonl(tmp_path / "d.jsonl", records)
    out = tmp_path / "run"
    train("--variant", "lora", "--model", tiny_dir, "--train-data", path, "--eval-data", path,
          *SMALL, *extra, "--output", str(out))
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "completed" and m["train"]["loss_last"] > 0
    assert m["metric"] == ("exact" if "--metric" in extra else "loss")
    if "--pack" in extra:
        assert m["data"]["packed_rows"] == 1 and m["settings"]["pack"] is True
    if m["metric"] == "exact":
        preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        assert [p["reference"] for p in preds] == ["5", "hi"]
        assert all(p["adapted"]["correct"] == (p["adapted"]["prediction"] == p["reference"])
                   for p in preds)


def test_exact_metric_scores_the_stripped_completion():
    ex = data.Example("p", " blue. ", "prompt_completion")
    assert evaluate.predict(0, ex, "blue.\n", "exact").correct
    assert not evaluate.predict(0, ex, "blue!", "exact").correct


def test_a_dataset_folder_of_chat_records_goes_through_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(CHAT)}).save_to_disk(
        str(tmp_path / "chatds"))
    src = data.train_data(str(tmp_path / "chatds"), 4, seed=0)
    assert src.kind == "hub" and src.format == "chat"
    assert {e.messages[-1] for e in src.examples} == {("assistant", w) for w in
                                                      ("yes", "no", "maybe", "ok")}


def test_two_processes_give_the_same_heldout_loss(chat_dir, tmp_path):
    """torchrun, 2 processes (gloo): each rank scores a strided share of the held-out chat
    examples and the sums are all-reduced: the one-process loss and train losses."""
    import os
    import subprocess
    import sys
    path = write_jsonl(tmp_path / "chat.jsonl", CHAT * 2)
    args = ["--variant", "lora", "--model", chat_dir, "--train-data", path,
            "--eval-data", path, *[("5" if a == "2" and SMALL[i - 1] == "--eval-limit" else a)
                                   for i, a in enumerate(SMALL)]]
    one = tmp_path / "one"
    train(*args, "--output", str(one))
    two = tmp_path / "two"
    script = os.path.join(os.path.dirname(sys.executable), "lora-lite")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", script, "train", *args, "--output", str(two)],
                          capture_output=True, text=True, timeout=400,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m2["world_size"] == 2 and m2["metric"] == "loss"
    assert m2["train"]["losses"] == pytest.approx(m1["train"]["losses"], rel=1e-5)
    for label in ("base", "adapted"):
        assert m2["eval"][label]["tokens"] == m1["eval"][label]["tokens"]
        assert m2["eval"][label]["loss"] == pytest.approx(m1["eval"][label]["loss"], rel=1e-4)
