"""`lora-lite eval` and the evaluation code: batched left-padded greedy generation matches
one-by-one generation, continuation-only scoring, the answer-line stop, per-item predictions."""
import json

import pytest
import torch
from tinymodel import save_tiny_model
from typer.testing import CliRunner

import lora_lite as ll
from lora_lite_cli import evaluate, models
from lora_lite_cli.app import get_app
from lora_lite_cli.data import Example

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="module")
def adapter_file(tiny_dir, tmp_path_factory):
    """A LoRA adapter with non-zero B (so it changes the model), saved from the tiny model."""
    model, _ = models.load_model(tiny_dir)
    ll.attach(model, ll.config("lora", r=4, target_names=[r"(q_proj|v_proj)$"], target_roles=()))
    with torch.no_grad():
        for name, t in ll.adapter_tensors(model).items():
            if name.endswith("lora_B"):
                t.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    path = tmp_path_factory.mktemp("adapter") / "adapter.safetensors"
    ll.save(model, path)
    return path


def test_answer_line_stop_and_cut():
    assert evaluate.cut_after_answer("2 + 3 = 5\n#### 5\nQuestion: next") == "2 + 3 = 5\n#### 5"
    assert evaluate.cut_after_answer("so... The answer is: 18\nmore") == "so... The answer is: 18"
    assert evaluate.cut_after_answer("no end yet #### 4") == "no end yet #### 4"

    class Tok:
        def batch_decode(self, ids, skip_special_tokens=True):
            return ["#### 5\n" if row[0] == 1 else "#### 5" for row in ids.tolist()]
    stop = evaluate.AnswerLineStop(Tok(), prompt_len=0)
    assert stop(torch.tensor([[1], [2]]), None).tolist() == [True, False]


def test_predictions_score_only_the_continuation():
    ex = Example("What is 2 + 3? Tom had 7.", "2 + 3 = 5\n#### 5")
    assert evaluate.predict(0, ex, "2 + 3 = 5\n#### 5").correct
    wrong = evaluate.predict(1, ex, "#### 5. Wait, it is 6.")
    assert wrong.prediction == "6" and not wrong.correct
    assert evaluate.predict(2, ex, "I don't know").prediction is None


def test_batched_left_padded_generation_equals_one_by_one(tiny_dir):
    model, tok = models.load_model(tiny_dir)
    with torch.no_grad():  # decisive logits, so float noise cannot flip a greedy choice
        model.lm_head.weight.mul_(50)
    questions = ["Tom has 3 apples. How many?", "A much longer question about 12 marbles and 5 "
                 "more marbles that Ana finds, how many now?", "7 + 8?"]
    batched = evaluate.generate_answers(model, tok, questions, batch_size=3, max_new_tokens=8)
    single = [evaluate.generate_answers(model, tok, [q], batch_size=1, max_new_tokens=8)[0]
              for q in questions]
    assert batched == single
    assert tok.padding_side == "right" or tok.padding_side == "left"  # restored, whatever it was
    # continuation only: the prompt is not part of the decoded text
    assert all("Question:" not in text for text in batched)


def test_eval_command_json_and_predictions(tiny_dir, adapter_file, tmp_path):
    preds = tmp_path / "preds.jsonl"
    result = runner.invoke(get_app(), ["eval", "--adapter", str(adapter_file), "--model", tiny_dir,
                                       "--eval-limit", "3", "--max-new-tokens", "5",
                                       "--predictions", str(preds), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["variant"] == "lora" and out["model"] == tiny_dir
    assert out["base"]["n"] == out["adapted"]["n"] == 3
    assert 0 <= out["base"]["accuracy"] <= 1 and 0 <= out["adapted"]["accuracy"] <= 1
    assert out["gain"] == pytest.approx(out["adapted"]["accuracy"] - out["base"]["accuracy"])
    assert out["eval_data"]["source"] == "generated" and out["eval_data"]["n"] == 3
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert {"question", "reference", "base", "adapted"} <= set(r)
        assert set(r["adapted"]) == {"output", "prediction", "correct"}
    # the adapter changes the model: at least one continuation differs from the base's
    assert any(r["base"]["output"] != r["adapted"]["output"] for r in rows)


def test_eval_model_from_metadata_and_local_jsonl(tiny_dir, adapter_file, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) + "\n"
                            for i in range(4)))
    result = runner.invoke(get_app(), ["eval", "--adapter", str(adapter_file), "--eval-data",
                                       str(data), "--limit", "0", "--max-new-tokens", "4", "--no-base"])
    assert result.exit_code == 0, result.output
    assert "adapted" in result.output and "/4" in result.output  # all 4 rows, base skipped
    written = adapter_file.with_name("eval_predictions.jsonl")
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    assert len(rows) == 4 and "base" not in rows[0] and rows[3]["reference"] == "4"


@pytest.mark.parametrize("make, needle", [
    (lambda p: p / "missing.safetensors", "no such adapter file"),
    (lambda p: (p / "junk.safetensors").write_bytes(b"not a file") and p / "junk.safetensors",
     "not a"),
])
def test_eval_bad_adapter_is_one_line(tmp_path, make, needle):
    path = make(tmp_path)
    result = runner.invoke(get_app(), ["eval", "--adapter", str(path)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0]
