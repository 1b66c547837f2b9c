"""Hostile adapter files: every structure that parses but is wrong, forged metadata, bad tensor
values and a stored regex built to hang are refused with one clear AdapterFileError (the CLI
exits 2 on it), quickly, with the model and the file untouched."""
import json
import re
import struct
import time

import pytest
import torch
from lltest import assert_untouched, lora_cfg
from safetensors import safe_open
from safetensors.torch import save_file

import lora_lite as ll
import lora_lite.file_checks as file_checks
from lora_lite.testing import logits, snapshot_state, tiny_llama

# catastrophic backtracking on any name of >= ~30 [a-z_.0-9] characters (minutes per name);
# the first alternative still selects the layers the adapter was trained on
HANG = r"(q_proj|v_proj)$|^([a-z_.0-9]+)+!$"
HANG_Q = r"q_proj$|^([a-z_.0-9]+)+!$"  # the same, selecting the q projections only


def saved_random_lora(folder, cfg):
    """A LoRA adapter of ``cfg`` with every tensor N(0, 0.1), saved in ``folder``."""
    model = tiny_llama()
    ll.attach(model, cfg)
    with torch.no_grad():
        for p in ll.trainable_parameters(model):
            p.normal_(0, 0.1)
    path = folder / "adapter.safetensors"
    ll.save(model, path)
    return path


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    return saved_random_lora(tmp_path_factory.mktemp("good"), lora_cfg())


@pytest.fixture(scope="module")
def override_file(tmp_path_factory):
    """An adapter whose q projections have r=2 (a per-target override), the rest r=4."""
    return saved_random_lora(tmp_path_factory.mktemp("override"),
                             lora_cfg(overrides=[(r"q_proj$", {"r": 2})]))


def split(path):
    """(header as parsed JSON, the data bytes after it)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_raw(path, header, body=b""):
    """A safetensors-shaped file with any JSON (or raw bytes) as its header."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + body)
    return path


def with_header(good, dst, edit):
    header, body = split(good)
    return write_raw(dst, edit(header), body)


def with_metadata(good, dst, **changes):
    def edit(header):
        header["__metadata__"].update(changes)
        return header
    return with_header(good, dst, edit)


def with_tensors(good, dst, edit):
    with safe_open(str(good), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    edit(tensors)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def stored_config(good, **changes):
    header, _ = split(good)
    return json.dumps({**json.loads(header["__metadata__"]["config"]), **changes})


def first_entry(header):
    return next(k for k in header if k != "__metadata__")


def drop_offsets(h):
    del h[first_entry(h)]["data_offsets"]
    return h


def set_entry(**fields):
    def edit(h):
        h[first_entry(h)].update(fields)
        return h
    return edit


Q = "model.layers.0.self_attn.q_proj"
CASES = {
    # header structure
    "header_list": (lambda g, d: write_raw(d, []), "header is a list, not a JSON object"),
    "header_string": (lambda g, d: write_raw(d, "lora-lite"), "header is a str, not a JSON object"),
    "header_null": (lambda g, d: write_raw(d, None), "header is a NoneType, not a JSON object"),
    "header_nested": (lambda g, d: write_raw(d, b"[" * 100_000 + b"]" * 100_000),
                      "unreadable header"),
    "metadata_list": (lambda g, d: with_header(g, d, lambda h: {**h, "__metadata__": []}),
                      "__metadata__ is a list, not a JSON object of strings"),
    "metadata_not_strings": (lambda g, d: with_metadata(g, d, config={"r": 4}),
                             "metadata 'config' is a dict, not a string"),
    "variant_5": (lambda g, d: with_metadata(g, d, variant=5), "metadata 'variant' is a int"),
    "variant_empty": (lambda g, d: with_metadata(g, d, variant=""), "names no variant"),
    "no_data_offsets": (lambda g, d: with_header(g, d, drop_offsets), "has no data_offsets"),
    "offsets_string": (lambda g, d: with_header(g, d, set_entry(data_offsets="0-10")),
                       "data_offsets"),
    "offsets_backwards": (lambda g, d: with_header(g, d, set_entry(data_offsets=[100, 0])),
                          "data_offsets"),
    "offsets_wrong_size": (lambda g, d: with_header(g, d, set_entry(data_offsets=[0, 4])),
                           "data_offsets"),
    "shape_not_ints": (lambda g, d: with_header(g, d, set_entry(shape=["4", 64])), "shape"),
    "shape_negative": (lambda g, d: with_header(g, d, set_entry(shape=[-4, -64])), "shape"),
    "entry_not_object": (lambda g, d: with_header(g, d, lambda h: {**h, first_entry(h): 7}),
                         "is a int, not an object"),
    "dtype_missing": (lambda g, d: with_header(g, d, set_entry(dtype=None)), "dtype"),
    # stored config
    "config_list": (lambda g, d: with_metadata(g, d, config="[]"), "config is a list"),
    "config_null": (lambda g, d: with_metadata(g, d, config="null"), "config is a NoneType"),
    "config_number": (lambda g, d: with_metadata(g, d, config="5"), "config is a int"),
    "config_not_json": (lambda g, d: with_metadata(g, d, config="{r: 4"), "config is not JSON"),
    "config_nested": (lambda g, d: with_metadata(g, d, config="[" * 50_000 + "]" * 50_000),
                      "config is not JSON"),
    "config_bad_field_type": (lambda g, d: with_metadata(
        g, d, config=stored_config(g, target_names=5)), "target_names"),
    "config_says_dora": (lambda g, d: with_metadata(g, d, config=stored_config(g, variant="dora")),
                         "metadata says variant 'lora'.*config says 'dora'"),
    # stored targets
    "targets_object": (lambda g, d: with_metadata(g, d, targets="{}"), "targets is a dict"),
    "targets_number": (lambda g, d: with_metadata(g, d, targets="5"), "targets is a int"),
    "targets_not_json": (lambda g, d: with_metadata(g, d, targets="[["), "targets is not JSON"),
    "target_short": (lambda g, d: with_metadata(g, d, targets=json.dumps([[Q, "reader"]])),
                     "target 0"),
    "target_number": (lambda g, d: with_metadata(g, d, targets="[5]"), "target 0"),
    "target_str_sizes": (lambda g, d: with_metadata(
        g, d, targets=json.dumps([[Q, "reader", "64", "64"]])), "target 0"),
    "target_bool_sizes": (lambda g, d: with_metadata(
        g, d, targets=json.dumps([[Q, "reader", True, 64]])), "target 0"),
    "target_bad_role": (lambda g, d: with_metadata(
        g, d, targets=json.dumps([[Q, "sideways", 64, 64]])), "target 0"),
    "target_twice": (lambda g, d: with_metadata(
        g, d, targets=json.dumps([[Q, "reader", 64, 64]] * 2)), "listed twice"),
    "target_not_linear": (lambda g, d: with_metadata(
        g, d, targets=json.dumps([["model.norm", "reader", 64, 64]])), "not a linear layer"),
    "target_is_model": (lambda g, d: with_metadata(
        g, d, targets=json.dumps([["", "reader", 64, 64]])), "not a linear layer"),
    # tensor values
    "int_tensor": (lambda g, d: with_tensors(g, d, lambda t: t.update(
        {f"{Q}.lora_A": torch.ones(4, 64, dtype=torch.int64)})), "lora_A.*I64.*floating"),
    "bool_tensor": (lambda g, d: with_tensors(g, d, lambda t: t.update(
        {f"{Q}.lora_B": torch.ones(64, 4, dtype=torch.bool)})), "lora_B.*BOOL.*floating"),
    "nan_tensor": (lambda g, d: with_tensors(g, d, lambda t: t[f"{Q}.lora_A"].__setitem__(
        (1, 2), float("nan"))), "lora_A.*NaN or Inf"),
    "inf_tensor": (lambda g, d: with_tensors(g, d, lambda t: t[f"{Q}.lora_B"].__setitem__(
        (0, 0), float("-inf"))), "lora_B.*NaN or Inf"),
}


def assert_refused_cleanly(bad, message, batch):
    """ll.load refuses the file ``bad`` with one short line matching ``message`` that starts with
    the path; the model is untouched and the file unchanged."""
    content = bad.read_bytes()
    model = tiny_llama()
    before, ref = snapshot_state(model), logits(model, batch)
    with pytest.raises(ll.AdapterFileError, match=message) as info:
        ll.load(model, bad)
    text = str(info.value)
    assert "\n" not in text and text.startswith(str(bad)) and len(text) < 400
    assert_untouched(model, before, ref, batch)
    assert bad.read_bytes() == content


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_file_is_refused_cleanly(good_file, tmp_path, batch, case):
    make, message = CASES[case]
    assert_refused_cleanly(make(good_file, tmp_path / f"{case}.safetensors"), message, batch)


def test_cli_exits_2_on_a_hostile_file(good_file, tmp_path):
    """The CLI maps lora-lite errors to exit code 2; a raw TypeError would exit 1."""
    import typer

    from lora_lite_cli.app import handle_errors
    bad = with_metadata(good_file, tmp_path / "bad.safetensors", targets="5")

    @handle_errors
    def command():
        ll.load(tiny_llama(), bad)

    with pytest.raises(typer.Exit) as info:
        command()
    assert info.value.exit_code == 2


@pytest.mark.parametrize("fields", ["target_names", "overrides"])
def test_a_stored_regex_is_never_run_at_load(good_file, override_file, tmp_path, batch,
                                             monkeypatch, fields):
    """A file whose target_names (or per-target overrides) would backtrack for hours loads at
    once: load uses the stored resolved target list (and resolved overrides), it never runs the
    file's regexes over the module names."""
    if fields == "target_names":
        good, hang = good_file, HANG
        config = stored_config(good_file, target_names=[HANG])
    else:
        good, hang = override_file, HANG_Q
        config = stored_config(override_file, overrides=[[HANG_Q, {"r": 2}]])
    hostile = with_metadata(good, tmp_path / "hang.safetensors", config=config)
    ran = []
    for fn in ("search", "match", "fullmatch", "findall", "finditer"):
        real = getattr(re, fn)

        def spy(pattern, *args, _real=real, _fn=fn, **kw):
            if getattr(pattern, "pattern", pattern) == hang:
                ran.append(_fn)
                raise AssertionError(f"ll.load ran the stored regex with re.{_fn}")
            return _real(pattern, *args, **kw)
        monkeypatch.setattr(re, fn, spy)
    model = tiny_llama()
    ll.load(model, hostile)
    assert ran == []
    monkeypatch.undo()                                   # the real re, against the wall clock
    reference = tiny_llama()
    ll.load(reference, good)
    fresh = tiny_llama()
    start = time.perf_counter()
    ll.load(fresh, hostile)
    assert time.perf_counter() - start < 10
    assert torch.equal(logits(fresh, batch), logits(reference, batch))
    stored = ll.attached(fresh).cfg                     # the config is kept as stored
    assert hang in stored.target_names or stored.overrides[0][0] == hang
    ranks = {t.name: t.layer.lora_A.shape[0] for t in ll.attached(fresh).targets}
    assert ranks[Q] == (2 if fields == "overrides" else 4) and ranks[Q.replace("q_", "v_")] == 4
    start = time.perf_counter()
    ll.save(fresh, tmp_path / "again.safetensors")       # re-saving runs no stored regex either
    assert time.perf_counter() - start < 10
    assert split(tmp_path / "again.safetensors")[0]["__metadata__"].get("target_overrides") == \
        split(hostile)[0]["__metadata__"].get("target_overrides")


def without_key(key):
    def edit(h):
        del h["__metadata__"][key]
        return h
    return edit


OVERRIDE_CASES = {
    "unresolved": (lambda g, d: with_header(g, d, without_key("target_overrides")),
                   "overrides but the file does not list them resolved"),
    "not_json": (lambda g, d: with_metadata(g, d, target_overrides="{"), "target_overrides is not JSON"),
    "a_list": (lambda g, d: with_metadata(g, d, target_overrides="[]"), "target_overrides is a list"),
    "unknown_target": (lambda g, d: with_metadata(
        g, d, target_overrides=json.dumps({"model.norm": {"r": 2}})), "names 'model.norm'"),
    "not_overridable": (lambda g, d: with_metadata(
        g, d, target_overrides=json.dumps({Q: {"variant": "dora"}})), "fields among"),
    "bad_value": (lambda g, d: with_metadata(
        g, d, target_overrides=json.dumps({Q: {"r": -1}})), "override of .* r: got -1"),
    "not_a_dict": (lambda g, d: with_metadata(
        g, d, target_overrides=json.dumps({Q: 2})), "expected \\{field: value\\}"),
    "without_overrides": (lambda g, d: with_metadata(
        g, d, config=stored_config(g, overrides=[])), "without overrides in the config"),
}


@pytest.mark.parametrize("case", sorted(OVERRIDE_CASES))
def test_hostile_override_list_is_refused_cleanly(override_file, tmp_path, batch, case):
    make, message = OVERRIDE_CASES[case]
    assert_refused_cleanly(make(override_file, tmp_path / f"{case}.safetensors"), message, batch)


@pytest.mark.parametrize("limit,value,message", [
    ("MAX_TENSORS", 3, "holds 8 tensors, more than 3"),
    ("MAX_TARGETS", 2, "lists 4 targets, more than 2"),
    ("MAX_METADATA_CHARS", 100, "metadata 'config' has .* characters, more than 100"),
    ("MAX_HEADER_BYTES", 1000, "header of .* bytes, more than the 1000"),
])
def test_what_a_file_may_hold_is_bounded(good_file, batch, monkeypatch, limit, value, message):
    monkeypatch.setattr(file_checks, limit, value)
    model = tiny_llama()
    before, ref = snapshot_state(model), logits(model, batch)
    with pytest.raises(ll.AdapterFileError, match=message):
        ll.load(model, good_file)
    assert_untouched(model, before, ref, batch)


def test_default_bounds_fit_a_large_real_adapter():
    """80 layers x 7 projections with long names fit comfortably under the defaults."""
    assert file_checks.MAX_TARGETS >= 80 * 7 * 4
    assert file_checks.MAX_TENSORS >= 80 * 7 * 8
    assert file_checks.MAX_METADATA_CHARS >= 80 * 7 * 120
