"""The training options of ``compare``: parsed by ``train``'s own option parser, so every
``train`` flag (and any flag added to ``train`` later) is spelled and checked the same way."""
from __future__ import annotations

import dataclasses

from ..configs import parse_layers
from ..errors import CLIError
from ..training.settings import Settings

# train options that compare owns or that make no sense for a sweep
REFUSED = {"variant": "use --variants", "resume": "a compare resumes by itself: run it again",
           "output": "use compare's --output", "sets": "use --set VARIANT.knob=value",
           "as_json": "compare writes results.json"}
RENAMED = {"compile_model": "compile"}


def train_command():
    from typer.main import get_command

    from .. import commands  # noqa: F401  (registers train on `app`)
    from ..app import app
    return get_command(app).commands["train"]


def given_from_args(args: list[str]) -> dict:
    """The Settings values given by ``train`` flags in ``args``; a bad flag is one line, exit 2."""
    cmd = train_command()
    try:
        ctx = cmd.make_context("lora-lite compare", list(args), resilient_parsing=False)
    except Exception as e:  # click's UsageError (typer may bring its own copy of click)
        if not hasattr(e, "format_message"):
            raise
        raise CLIError(f"{e.format_message()} (compare takes train's options, see "
                       "`lora-lite train --help`)", 2) from None
    fields = {f.name for f in dataclasses.fields(Settings)}
    given = {}
    for name, value in ctx.params.items():
        if value is None or value is False or value == ():
            continue
        if name in REFUSED:
            flag = next(o for p in cmd.params if p.name == name for o in p.opts)
            raise CLIError(f"{flag} is not a compare option: {REFUSED[name]}", 2)
        name = RENAMED.get(name, name)
        if name == "targets":
            value = tuple(value)
        elif name == "layers":
            value = parse_layers(value)
        elif not isinstance(value, (bool, int, float, str)):
            value = str(value)
        if name not in fields:
            raise CLIError(f"train option {name!r} has no setting compare can pass on", 2)
        given[name] = value
    return given
