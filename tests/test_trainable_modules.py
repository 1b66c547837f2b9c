"""Trainable modules (PEFT's modules_to_save): task heads of sequence / token classification
models train in full, save in the adapter file, reload, restore on detach, export to PEFT."""
import pytest
import torch

import lora_lite as ll
from lora_lite.errors import AttachError


def tiny_llama_cls(seed=0):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(seed)
    c = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=64, vocab_size=64, num_labels=3, pad_token_id=0)
    return LlamaForSequenceClassification(c).eval()


def tiny_bert(seed=0, task="seq"):
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification
    torch.manual_seed(seed)
    c = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   vocab_size=64, num_labels=3, max_position_embeddings=32)
    cls = BertForSequenceClassification if task == "seq" else BertForTokenClassification
    return cls(c).eval()


MODELS = {"llama": tiny_llama_cls, "bert": tiny_bert}
HEAD = {"llama": "score", "bert": "classifier"}


def ids(seed=1):
    return torch.randint(1, 64, (4, 6), generator=torch.Generator().manual_seed(seed))


def logits(model):
    with torch.no_grad():
        return model(ids()).logits


def train(model, steps=3):
    opt = torch.optim.AdamW(ll.trainable_parameters(model), lr=1e-2)
    labels = torch.tensor([0, 1, 2, 1])
    for _ in range(steps):
        opt.zero_grad()
        model(ids(), labels=labels).loss.backward()
        opt.step()


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_head_trains_saves_reloads_and_detach_restores_it(arch, tmp_path):
    model = MODELS[arch]()
    head = model.get_submodule(HEAD[arch])
    before, head_before = logits(model), head.weight.detach().clone()
    state = ll.attach(model, ll.config("lora", r=2))
    assert [tm.name for tm in state.trainable_modules] == [HEAD[arch]]
    assert not any(t.name == HEAD[arch] for t in state.targets)  # no LoRA on the trained head
    assert head.weight.requires_grad
    assert any(p is head.weight for p in ll.trainable_parameters(model))
    frozen = [n for n, p in model.named_parameters() if p.requires_grad
              and "lora_" not in n and not n.startswith(HEAD[arch])]
    assert frozen == []
    train(model)
    assert not torch.equal(head.weight, head_before)
    trained = logits(model)
    with ll.disabled(model):  # the base model inside: its own head too
        assert torch.equal(logits(model), before)
    assert torch.equal(logits(model), trained)
    ll.save(model, tmp_path / "a.safetensors")
    ll.detach(model)
    assert torch.equal(head.weight, head_before) and torch.equal(logits(model), before)
    fresh = MODELS[arch]()
    ll.load(fresh, tmp_path / "a.safetensors")
    assert torch.equal(logits(fresh), trained)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_export_to_peft_keeps_the_head_and_peft_folders_load(arch, tmp_path):
    peft = pytest.importorskip("peft")
    model = MODELS[arch]()
    ll.attach(model, ll.config("lora", r=2, target_names=[r"(query|value|q_proj|v_proj)$"]))
    train(model)
    want = logits(model)
    ll.export_peft(model, tmp_path / "peft")
    pm = peft.PeftModel.from_pretrained(MODELS[arch](), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(pm), want, atol=1e-5, rtol=1e-5)
    # PEFT's own SEQ_CLS folder (head in modules_to_save) loads into lora-lite
    base = MODELS[arch]()
    pm = peft.get_peft_model(base, peft.LoraConfig(
        r=2, target_modules=["query", "value"] if arch == "bert" else ["q_proj", "v_proj"],
        task_type="SEQ_CLS"))
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    pm.eval()
    want = logits(pm)
    pm.save_pretrained(tmp_path / "theirs")
    mine = MODELS[arch]()
    ll.load(mine, tmp_path / "theirs")
    assert [tm.name for tm in ll.attached(mine).trainable_modules] == [HEAD[arch]]
    torch.testing.assert_close(logits(mine), want, atol=1e-5, rtol=1e-5)


def test_token_classification_head_is_trainable_by_default():
    model = tiny_bert(task="token")
    state = ll.attach(model, ll.config("lora", r=2))
    assert [tm.name for tm in state.trainable_modules] == ["classifier"]


def test_explicit_none_and_unmatched():
    model = tiny_llama_cls()
    state = ll.attach(model, ll.config("lora", r=2, trainable_modules=()))
    assert state.trainable_modules == [] and not model.score.weight.requires_grad
    ll.detach(model)
    with pytest.raises(AttachError, match="no module matched trainable_modules") as e:
        ll.attach(model, ll.config("lora", trainable_modules=["no_such_head"]))
    assert "\n" not in str(e.value) and ll.attached(model) is None
    with pytest.raises(ll.ConfigError, match="trainable_modules"):
        ll.config("lora", trainable_modules=[5])
    from lora_lite.testing import tiny_llama
    causal = tiny_llama()
    assert ll.attach(causal, ll.config("lora")).trainable_modules == []  # no head by default


def test_merge_keeps_the_trained_head():
    model = tiny_llama_cls()
    ll.attach(model, ll.config("lora", r=2))
    train(model)
    trained, head = logits(model), model.score.weight.detach().clone()
    ll.merge(model)
    assert torch.equal(model.score.weight, head)
    torch.testing.assert_close(logits(model), trained, atol=1e-5, rtol=1e-5)


def test_peft_head_of_the_wrong_shape_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file
    pm = peft.get_peft_model(tiny_llama_cls(), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                               task_type="SEQ_CLS"))
    pm.save_pretrained(tmp_path / "p")
    weights = tmp_path / "p" / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.score.weight"] = torch.zeros(5, 32)
    save_file(tensors, weights)
    model = tiny_llama_cls()
    with pytest.raises(ll.AdapterFileError, match="score.weight has shape"):
        ll.load(model, tmp_path / "p")
    assert ll.attached(model) is None
