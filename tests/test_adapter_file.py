"""The safetensors adapter file: contents, atomic save, and every bad input refused cleanly."""
import json
import os

import pytest
import torch
from lltest import assert_untouched, lora_cfg
from safetensors import safe_open
from safetensors.torch import save_file

import lora_lite as ll
import lora_lite.adapter_file as adapter_file
from lora_lite.testing import logits, snapshot_state, tiny_llama


@pytest.fixture
def trained_file(tmp_path, batch):
    model = tiny_llama()
    ll.attach(model, lora_cfg())
    with torch.no_grad():
        for p in ll.trainable_parameters(model):
            p.normal_(0, 0.1)
    path = tmp_path / "adapter.safetensors"
    ll.save(model, path)
    return path, logits(model, batch)


def test_file_holds_only_adapter_tensors_and_full_metadata(trained_file, batch):
    path, trained = trained_file
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == {f"model.layers.{i}.self_attn.{p}.lora_{t}" for i in (0, 1)
                    for p in ("q_proj", "v_proj") for t in "AB"}
    assert meta["format"] == "lora-lite" and meta["format_version"] == "1"
    assert meta["variant"] == "lora" and meta["plugin"] == "lora-lite-lora"
    assert meta["plugin_version"] and meta["lora_lite_version"]
    assert json.loads(meta["config"])["r"] == 4
    assert json.loads(meta["targets"])[0] == ["model.layers.0.self_attn.q_proj", "reader", 64, 64]
    assert meta["base_model"] == "tiny-random-llama-seed0"
    assert os.path.getsize(path) < 10_000  # 4 layers x (4x64 + 64x4) fp32 + header
    fresh = tiny_llama()
    ll.load(fresh, path)
    assert torch.equal(logits(fresh, batch), trained)


def test_save_is_atomic(trained_file, monkeypatch):
    path, _ = trained_file
    good = path.read_bytes()
    model = tiny_llama()
    ll.attach(model, lora_cfg(r=2))

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(adapter_file, "save_file", crash)
    path.chmod(0o600)
    with pytest.raises(OSError, match="disk full") as info:
        ll.save(model, path)
    assert isinstance(info.value, ll.LoraLiteError)               # the CLI exits 2 on it
    assert str(info.value).startswith(f"{path}: cannot save") and ".lora-lite-" not in str(info.value)
    assert path.read_bytes() == good and (path.stat().st_mode & 0o777) == 0o600
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_save_without_adapter_is_an_error(tmp_path):
    with pytest.raises(ll.AttachError, match="nothing to save"):
        ll.save(tiny_llama(), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def _rewrite_metadata(src, dst, **changes):
    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    meta.update(changes)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _bad_files(path, tmp_path):
    data = path.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) - 100])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01not safetensors at all" * 10)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "foreign.safetensors"))
    _rewrite_metadata(path, tmp_path / "future.safetensors", format_version="99")
    _rewrite_metadata(path, tmp_path / "uninstalled.safetensors", variant="frobnicate",
                      plugin="lora-lite-frobnicate")
    _rewrite_metadata(path, tmp_path / "badcfg.safetensors",
                      config=json.dumps({**json.loads(lora_cfg().to_json()), "r": -1}))
    return {
        "truncated": (tmp_path / "truncated.safetensors", "truncated"),
        "garbage": (tmp_path / "garbage.safetensors", "not a safetensors file|not a lora-lite"),
        "empty": (tmp_path / "empty.safetensors", "not a lora-lite adapter"),
        "foreign": (tmp_path / "foreign.safetensors", "not a lora-lite adapter file"),
        "future": (tmp_path / "future.safetensors", "format version '99'.*upgrade lora-lite"),
        "uninstalled": (tmp_path / "uninstalled.safetensors",
                        "written by lora-lite-frobnicate .*: pip install lora-lite-frobnicate$"),
        "badcfg": (tmp_path / "badcfg.safetensors", "config is not valid.*r: got -1"),
        "missing": (tmp_path / "nope.safetensors", "no such adapter file"),
    }


@pytest.mark.parametrize("case", ["truncated", "garbage", "empty", "foreign", "future",
                                  "uninstalled", "badcfg", "missing"])
def test_bad_files_are_refused_and_the_model_untouched(trained_file, tmp_path, batch, case):
    path, _ = trained_file
    bad, message = _bad_files(path, tmp_path)[case]
    content = bad.read_bytes() if bad.exists() else None
    model = tiny_llama()
    before, ref = snapshot_state(model), logits(model, batch)
    with pytest.raises(ll.AdapterFileError, match=message):
        ll.load(model, bad)
    assert_untouched(model, before, ref, batch)
    assert (bad.read_bytes() if bad.exists() else None) == content  # files are never modified


def test_wrong_model_is_refused(trained_file, batch):
    path, _ = trained_file
    wider = tiny_llama(hidden=32, heads=2, kv_heads=1)          # same names, other shapes
    before, ref = snapshot_state(wider), logits(wider, batch)
    with pytest.raises(ll.AdapterFileError, match="shape mismatch at 'model.layers.0.self_attn.q_proj'"):
        ll.load(wider, path)
    assert_untouched(wider, before, ref, batch)
    shallow = tiny_llama(layers=1)                              # a target layer is missing
    before, ref = snapshot_state(shallow), logits(shallow, batch)
    with pytest.raises(ll.AdapterFileError, match="'model.layers.1.self_attn.q_proj' does not exist"):
        ll.load(shallow, path)
    assert_untouched(shallow, before, ref, batch)


def test_tensor_shape_tampering_is_refused(trained_file, tmp_path, batch):
    path, _ = trained_file
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    tensors["model.layers.0.self_attn.q_proj.lora_A"] = torch.zeros(5, 64)
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata=meta)
    model = tiny_llama()
    before, ref = snapshot_state(model), logits(model, batch)
    with pytest.raises(ll.AdapterFileError, match="lora_A.*shape \\(5, 64\\)"):
        ll.load(model, tmp_path / "t.safetensors")
    assert_untouched(model, before, ref, batch)
    del tensors["model.layers.0.self_attn.q_proj.lora_A"]
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata=meta)
    with pytest.raises(ll.AdapterFileError, match="missing"):
        ll.load(model, tmp_path / "m.safetensors")
    assert_untouched(model, before, ref, batch)


def test_load_onto_a_model_with_an_adapter_is_refused(trained_file, batch):
    path, _ = trained_file
    model = tiny_llama()
    ll.attach(model, lora_cfg(r=2))
    state = snapshot_state(model)
    with pytest.raises(ll.AttachError, match="already has a 'lora' adapter"):
        ll.load(model, path)
    from lora_lite.testing import state_equal
    assert state_equal(snapshot_state(model), state)


def test_saved_file_gets_ordinary_permissions(tmp_path):
    model = tiny_llama()
    ll.attach(model, lora_cfg())
    path = tmp_path / "a.safetensors"
    umask = os.umask(0o022)
    try:
        ll.save(model, path)
    finally:
        os.umask(umask)
    assert (path.stat().st_mode & 0o777) == 0o644


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o444])
def test_resaving_keeps_the_files_permissions(tmp_path, mode):
    model = tiny_llama()
    ll.attach(model, lora_cfg())
    path = tmp_path / "a.safetensors"
    ll.save(model, path)
    path.chmod(mode)
    with torch.no_grad():
        ll.trainable_parameters(model)[0].add_(1.0)
    ll.save(model, path)
    assert (path.stat().st_mode & 0o777) == mode
    fresh = tiny_llama()
    ll.load(fresh, path)  # the new content is there
    assert torch.equal(ll.trainable_parameters(fresh)[0], ll.trainable_parameters(model)[0])


def test_resaving_through_a_symlink_keeps_the_link(tmp_path):
    model = tiny_llama()
    ll.attach(model, lora_cfg())
    real, link = tmp_path / "real.safetensors", tmp_path / "link.safetensors"
    ll.save(model, real)
    link.symlink_to(real)
    ll.save(model, link)
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.safetensors", "real.safetensors"]


@pytest.mark.parametrize("where", ["missing_folder", "a_directory"])
def test_save_errors_name_the_target_not_the_temp_file(tmp_path, where):
    model = tiny_llama()
    ll.attach(model, lora_cfg())
    path = tmp_path / "missing" / "a.safetensors"
    if where == "a_directory":
        path = tmp_path / "adir.safetensors"
        path.mkdir()
    with pytest.raises(ll.AdapterSaveError) as info:
        ll.save(model, path)
    message = str(info.value)
    assert message.startswith(f"{path}: cannot save the adapter (") and "\n" not in message
    assert ".lora-lite-" not in message and ".tmp" not in message
    assert isinstance(info.value, OSError)
    assert [p.name for p in tmp_path.iterdir()] == ([] if where == "missing_folder" else [path.name])
