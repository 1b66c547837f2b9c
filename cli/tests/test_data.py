"""Data: GSM8K answer extraction, the generated problems and their fixed held-out split, JSONL
files, and the `datasets` loader exercised offline on local folders (the hub code path)."""
import json
import re

import pytest

from lora_lite_cli import data

# -- answer extraction -------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("#### 42", "42"),
    ("1,234.", "1234"),
    ("x = -17", "-17"),
    ("3 + 4 = 7\n#### 7", "7"),
    ("#### 1,000,000", "1000000"),
    ("so 2.5 apples", "2.5"),
    ("#### 12 apples, not 13", "13"),   # the last number after the last ####
    ("#### 3\n#### 4", "4"),
])
def test_extract_answer_follows_gsm8k_scoring(text, expected):
    assert data.extract_answer(text) == expected


def test_only_the_last_number_after_the_last_marker_counts():
    out = "#### 5. Wait, the answer is 6."
    assert data.extract_answer(out) == "6"
    assert not data.same_number(data.extract_answer(out), "5")


def test_no_number_is_no_answer_and_a_reference_needs_one():
    assert data.extract_answer("I do not know") is None
    assert not data.same_number(None, "3")
    with pytest.raises(data.DataError, match="without a number"):
        data.reference_answer("no number here")


def test_reference_forms():
    assert data.reference_answer("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert data.reference_answer("so she has 18 left. The answer is: 18") == "18"
    assert data.reference_answer("The answer is: 1,250.") == "1250"
    assert data.same_number("38.0", "38") and data.same_number("1250", "1250")
    assert not data.same_number("38", "39")


# -- generated problems ------------------------------------------------------------------------

def _check_arithmetic(ex):
    """Every reasoning line 'a op b = c' is right and the final answer is the last result."""
    lines = ex.answer.split("\n")
    assert lines[-1].startswith("#### ")
    result = None
    for line in lines[:-1]:
        m = re.fullmatch(r"(\d+) ([-+*/]) (\d+) = (-?\d+)", line)
        assert m, line
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]
        assert value == c, line
        result = c
    assert lines[-1] == f"#### {result}" and ex.reference == str(result)
    assert result >= 0


def test_generated_problems_are_correct_and_short():
    examples = data.generate(400, seed=3)
    for ex in examples:
        _check_arithmetic(ex)
        assert ex.question.endswith("?") and len(ex.question) < 160
    assert len({ex.question for ex in examples}) > 350  # varied


def test_generation_is_deterministic_from_the_seed():
    assert data.generate(50, seed=1) == data.generate(50, seed=1)
    assert data.generate(50, seed=1) != data.generate(50, seed=2)
    # the held-out split is fixed: it ignores the seed
    assert data.generate(30, seed=1, split="test") == data.generate(30, seed=9, split="test")


def test_held_out_split_is_disjoint_from_training_streams():
    test = data.generate(data.TEST_SIZE, split="test")
    test_questions = {ex.question for ex in test}
    assert len(test_questions) == data.TEST_SIZE  # no duplicates in the test split
    assert all(data.is_test_question(q) for q in test_questions)
    for seed in range(3):
        train = data.generate(2000, seed=seed)
        assert not test_questions & {ex.question for ex in train}
    for ex in test[:100]:
        _check_arithmetic(ex)


def test_train_and_eval_sources_default_to_generated():
    src = data.train_data("generated", 24, seed=0)
    assert src.kind == "generated" and len(src.examples) == 24
    fp = src.fingerprint()
    assert fp["n"] == 24 and len(fp["sha256"]) == 16
    assert fp == data.train_data("generated", 24, seed=0).fingerprint()
    assert fp["sha256"] != data.train_data("generated", 24, seed=1).fingerprint()["sha256"]
    ev = data.eval_data("generated", 10)
    assert ev.split == "test" and len(ev.examples) == 10
    assert ev.examples == data.eval_data("generated", 20).examples[:10]


# -- local files ---------------------------------------------------------------------------------

def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_jsonl_question_answer_and_query_response(tmp_path):
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [
        {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
        {"question": "What is 10 - 4?", "answer": "#### 6"},
    ])
    src = data.eval_data(gsm, None)
    assert src.kind == "jsonl" and [e.reference for e in src.examples] == ["5", "6"]
    meta = write_jsonl(tmp_path / "metamath.jsonl", [
        {"query": "Half of 8?", "response": "8 / 2 = 4. The answer is: 4", "type": "x"},
    ])
    assert data.eval_data(meta, None).examples[0].reference == "4"


def test_jsonl_training_order_is_seeded_and_cycles(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl",
                       [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(5)])
    a = data.train_data(path, 12, seed=0).examples
    assert len(a) == 12 and {e.question for e in a[:5]} == {f"q{i}" for i in range(5)}
    assert data.train_data(path, 12, seed=0).fingerprint()["distinct"] == 5  # 12 = 2.4 epochs
    assert a == data.train_data(path, 12, seed=0).examples
    assert a != data.train_data(path, 12, seed=1).examples


def test_bad_records_name_the_problem(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"body": "hello", "id": 3}])
    with pytest.raises(data.DataError, match=r"no known format: found fields \['body', 'id'\]; "
                                             r"expected messages \(chat\).*question/answer"):
        data.eval_data(path, None)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "x", "answer": "#### 1"}\nnot json\n')
    with pytest.raises(data.DataError, match="broken.jsonl:2"):
        data.eval_data(str(broken), None)
    noref = write_jsonl(tmp_path / "noref.jsonl", [{"question": "x", "answer": "none"}])
    with pytest.raises(data.DataError, match="without a number"):
        data.eval_data(noref, None)
    with pytest.raises(data.DataError, match="not found"):
        data.eval_data(str(tmp_path / "missing.jsonl"), None)


# -- the hub loader (datasets), offline on local folders ----------------------------------------

def test_hub_spec_parsing():
    assert data.parse_hub_spec("openai/gsm8k") == ("openai/gsm8k", None, None)
    assert data.parse_hub_spec("openai/gsm8k:main@test") == ("openai/gsm8k", "main", "test")
    assert data.parse_hub_spec("meta-math/MetaMathQA@train") == ("meta-math/MetaMathQA", None, "train")


def test_dataset_folder_of_data_files_goes_through_load_dataset(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "gsm8k_like"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"question": f"t{i}", "answer": f"#### {i}"} for i in range(6)])
    write_jsonl(folder / "test.jsonl", [{"question": f"e{i}", "answer": f"#### {10 + i}"} for i in range(4)])
    ev = data.eval_data(str(folder), 3)          # purpose eval -> the test split
    assert ev.kind == "hub" and ev.split == "test"
    assert [e.reference for e in ev.examples] == ["10", "11", "12"]
    tr = data.train_data(str(folder), 6, seed=0)  # purpose train -> the train split
    assert tr.split == "train" and {e.question for e in tr.examples} == {f"t{i}" for i in range(6)}
    assert data.eval_data(f"{folder}@train", None).split == "train"
    with pytest.raises(data.DataError, match="no split 'valid'"):
        data.eval_data(f"{folder}@valid", None)


def test_save_to_disk_folder_with_metamath_fields(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([
        {"query": "What is 6 * 7?", "response": "6 * 7 = 42\nThe answer is: 42", "type": "GSM_Rephrased"},
        {"query": "What is 9 - 2?", "response": "The answer is: 7", "type": "GSM_FOBAR"},
    ])
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "metamath"))
    src = data.train_data(str(tmp_path / "metamath"), 4, seed=0)
    assert src.kind == "hub" and src.split == "train"
    assert {e.reference for e in src.examples} == {"42", "7"}


def test_unreachable_hub_dataset_is_one_clear_line(monkeypatch):
    pytest.importorskip("datasets")
    import datasets
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(data.DataError) as err:
        data.eval_data("nosuch-org/nosuch-dataset", 5)
    assert "nosuch-org/nosuch-dataset" in str(err.value) and "\n" not in str(err.value)
