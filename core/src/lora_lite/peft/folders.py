"""A PEFT folder holding several adapters, as PEFT's ``save_pretrained`` writes it: the
``default`` adapter at the top, every other one in a subfolder named after it."""
from __future__ import annotations

import os

from ..attach import DEFAULT, detach, registry
from ..errors import AdapterFileError
from ..slots import check_name
from .load import CONFIG_FILE, load_peft


def peft_adapter_folders(folder) -> dict:
    """{adapter name: folder} of the adapters under ``folder`` (top level = "default")."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise AdapterFileError(f"{folder}: not a folder; give a PEFT adapter folder")
    found = {DEFAULT: folder} if os.path.isfile(os.path.join(folder, CONFIG_FILE)) else {}
    for entry in sorted(os.listdir(folder)):
        sub = os.path.join(folder, entry)
        if os.path.isdir(sub) and not os.path.islink(sub) and \
                os.path.isfile(os.path.join(sub, CONFIG_FILE)):
            found[check_name(entry)] = sub
    if not found:
        raise AdapterFileError(f"{folder}: no {CONFIG_FILE} here or in a subfolder; not a PEFT "
                               "adapter folder")
    return found


def load_peft_adapters(model, folder) -> list[str]:
    """Attach every adapter of a (multi-adapter) PEFT folder under its name; all or none."""
    found = peft_adapter_folders(folder)
    reg = registry(model)
    taken = [n for n in found if reg is not None and n in reg.states]
    if taken:
        raise AdapterFileError(f"{os.fspath(folder)}: this model already has an adapter named "
                               f"{taken[0]!r}; detach it first")
    done = []
    try:
        for name, sub in found.items():
            load_peft(model, sub, name=name)
            done.append(name)
    except BaseException:
        for name in reversed(done):
            detach(model, name=name)
        raise
    return done
