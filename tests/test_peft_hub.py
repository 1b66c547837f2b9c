"""A hub adapter id through ll.load and `lora-lite eval --adapter`, offline: the real hub code
path runs with ``huggingface_hub.snapshot_download`` replaced by a stand-in that serves a "repo"
folder PEFT wrote in the test, filtered by the call's allow_patterns as the hub filters them.
Checked: the call gets the repo id, revision and subfolder; only adapter_config.json and
adapter_model.safetensors may be fetched (never a pickle, never model weights); the result equals
loading the folder itself; a hub error is one line that says what to do, the model untouched."""
import json
import shutil

import pytest
import torch
from lltest import assert_untouched
from typer.testing import CliRunner

import lora_lite as ll
from lora_lite.testing import logits, make_batch, snapshot_state, tiny_llama

peft = pytest.importorskip("peft")
huggingface_hub = pytest.importorskip("huggingface_hub")
BATCH = make_batch()
REPO_ID = "acme/tiny-lora"
DECOYS = ("adapter_model.bin", "model.safetensors", "pytorch_model.bin", "README.md")


def write_repo(folder, base, subfolder=""):
    """A hub repo as a folder: a PEFT LoRA adapter (random B) in ``subfolder``, plus decoys a
    download must never fetch (a pickle of the same adapter, full model weights, a readme)."""
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8,
                                                      target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    adapter_dir = folder / subfolder if subfolder else folder
    model.eval().save_pretrained(str(adapter_dir))
    for name in DECOYS:
        (adapter_dir / name).write_bytes(b"must not be downloaded")
    return adapter_dir


class FakeHub:
    """Stands in for huggingface_hub.snapshot_download: records each call, copies into a fresh
    snapshot folder the repo files that the call's allow_patterns select (huggingface_hub's own
    filter), or raises ``error``."""

    def __init__(self, repo, snapshots, error=None):
        self.repo, self.snapshots, self.error, self.calls = repo, snapshots, error, []

    def __call__(self, repo_id, *, revision=None, allow_patterns=None, **kwargs):
        self.calls.append({"repo_id": repo_id, "revision": revision,
                           "allow_patterns": allow_patterns, **kwargs})
        if self.error is not None:
            raise self.error
        files = [str(p.relative_to(self.repo)) for p in self.repo.rglob("*") if p.is_file()]
        chosen = list(huggingface_hub.utils.filter_repo_objects(files, allow_patterns=allow_patterns))
        snapshot = self.snapshots / f"snapshot{len(self.calls)}"
        for name in chosen:
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.repo / name, snapshot / name)
        self.fetched = sorted(chosen)
        return str(snapshot)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    fake = FakeHub(repo, tmp_path / "snapshots")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return fake


def test_a_hub_id_loads_like_its_folder(hub):
    folder = write_repo(hub.repo, tiny_llama())
    from_folder = tiny_llama()
    ll.load(from_folder, folder)
    from_hub = tiny_llama()
    ll.load(from_hub, REPO_ID, revision="v1.0")
    [call] = hub.calls
    assert call["repo_id"] == REPO_ID and call["revision"] == "v1.0"
    assert sorted(call["allow_patterns"]) == ["adapter_config.json", "adapter_model.safetensors"]
    assert hub.fetched == ["adapter_config.json", "adapter_model.safetensors"]  # no decoy came
    assert torch.equal(logits(from_hub, BATCH), logits(from_folder, BATCH))
    assert not torch.equal(logits(from_hub, BATCH), logits(tiny_llama(), BATCH))  # not trivial
    assert ll.attached(from_hub).cfg.variant == "lora"


def test_a_hub_subfolder_is_fetched_alone(hub):
    write_repo(hub.repo, tiny_llama(), subfolder="adapters/qv")
    write_repo(hub.repo, tiny_llama(seed=1))  # another adapter at the root: not this one
    from_folder = tiny_llama()
    ll.load(from_folder, hub.repo / "adapters" / "qv")
    from_hub = tiny_llama()
    ll.load(from_hub, REPO_ID, subfolder="adapters/qv")
    [call] = hub.calls
    assert sorted(call["allow_patterns"]) == ["adapters/qv/adapter_config.json",
                                              "adapters/qv/adapter_model.safetensors"]
    assert torch.equal(logits(from_hub, BATCH), logits(from_folder, BATCH))


def test_a_repo_with_only_a_pickle_is_refused_without_fetching_it(hub):
    folder = write_repo(hub.repo, tiny_llama())
    (folder / "adapter_model.safetensors").unlink()  # adapter_model.bin (a decoy) stays
    model = tiny_llama()
    before, ref = snapshot_state(model), logits(model, BATCH)
    with pytest.raises(ll.AdapterFileError, match="no adapter_model.safetensors .*never downloads"):
        ll.load(model, REPO_ID)
    assert hub.fetched == ["adapter_config.json"]
    assert_untouched(model, before, ref, BATCH)


@pytest.mark.parametrize("error", [
    huggingface_hub.errors.LocalEntryNotFoundError("Cannot find an appropriate cached snapshot "
                                                   "folder for the specified revision on the "
                                                   "local disk and outgoing traffic has been "
                                                   "disabled.\nTo enable repo look-ups, set "
                                                   "HF_HUB_OFFLINE=0"),
    OSError("[Errno 101] Network is unreachable"),
], ids=["offline", "no network"])
def test_a_hub_error_is_one_line_that_says_what_to_do(hub, error):
    hub.error = error
    model = tiny_llama()
    before, ref = snapshot_state(model), logits(model, BATCH)
    with pytest.raises(ll.AdapterFileError) as info:
        ll.load(model, REPO_ID, revision="main")
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"{REPO_ID}: ")
    assert type(error).__name__ in text and "not a reachable hub adapter id" in text
    assert "connect to the hub" in text and "downloaded PEFT adapter folder" in text
    assert hub.calls[0]["repo_id"] == REPO_ID
    assert_untouched(model, before, ref, BATCH)


@pytest.mark.parametrize("subfolder", ["../escape", "/abs", "a/../../b", "a//b", 3])
def test_a_subfolder_outside_the_repo_is_refused_before_any_download(hub, subfolder):
    with pytest.raises(ll.AdapterFileError, match="subfolder"):
        ll.load(tiny_llama(), REPO_ID, subfolder=subfolder)
    assert hub.calls == []


def test_revision_on_a_lora_lite_file_is_refused(tmp_path):
    model = tiny_llama()
    ll.attach(model, ll.config("lora", r=4, target_names=[r"q_proj$"], target_roles=()))
    ll.save(model, tmp_path / "a.safetensors")
    with pytest.raises(ll.AdapterFileError, match="revision / subfolder"):
        ll.load(tiny_llama(), tmp_path / "a.safetensors", revision="main")


def test_eval_takes_a_hub_adapter_id(hub, tmp_path, monkeypatch):
    """`lora-lite eval --adapter org/name` checks and loads it through the same hub code."""
    from tinymodel import save_tiny_model

    from lora_lite_cli import models
    from lora_lite_cli.app import get_app
    model_dir = save_tiny_model(tmp_path / "model")
    base, _ = models.load_model(model_dir)
    write_repo(hub.repo, base)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(get_app(), ["eval", "--adapter", REPO_ID, "--model", model_dir,
                                            "--limit", "1", "--max-new-tokens", "2", "--no-base",
                                            "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["variant"] == "lora" and report["adapter"] == REPO_ID
    assert {c["repo_id"] for c in hub.calls} == {REPO_ID}  # the check, then the load
    assert (tmp_path / "eval_predictions.jsonl").is_file()  # in the working directory
    hub.error = OSError("Network is unreachable")
    result = CliRunner().invoke(get_app(), ["eval", "--adapter", REPO_ID, "--model", model_dir])
    assert result.exit_code == 2 and "not a reachable hub adapter id" in result.output
    assert "Traceback" not in result.output
