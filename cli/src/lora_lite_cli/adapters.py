"""What an ``--adapter`` value is: a lora-lite file or a PEFT adapter folder, checked before any
model is loaded, and the base model it records (if that model can be loaded again)."""
from __future__ import annotations

import os

from .models import DEFAULT_MODEL


def check_adapter(path) -> dict:
    """{"kind": "lora-lite"|"peft", "variant" (or PEFT's peft_type), "base_model"}; raises the
    library's one-line error for a missing, foreign, truncated or refused adapter."""
    import lora_lite as ll
    from lora_lite.peft.load import is_peft_source, read_peft_folder, resolve_folder
    path = os.fspath(path)
    if is_peft_source(path):
        config, _ = read_peft_folder(resolve_folder(path))
        return {"kind": "peft", "variant": config.get("peft_type"),
                "base_model": config.get("base_model_name_or_path") or ""}
    meta, _ = ll.read_header(path)
    return {"kind": "lora-lite", "variant": meta.get("variant"), "base_model": meta.get("base_model") or ""}


def model_of_adapter(path) -> str:
    """The base model recorded with the adapter, if it can be loaded again, else the default."""
    name = check_adapter(path)["base_model"]
    if name and (os.path.exists(name) or not name.startswith(("/", "."))):
        return name
    return DEFAULT_MODEL
