"""The ``lora-lite`` Typer app.

Built-in commands live in ``lora_lite_cli.commands.*``: each module decorates ``app`` (the
built-in app). ``get_app()`` returns a fresh Typer holding the built-in commands plus the ones
every currently loaded plugin adds through its ``register_commands(app)`` hook, so a plugin
registered in-process (tests, notebooks) shows up on the next ``get_app()`` call.

Also here, for every command: ``handle_errors`` (expected errors -> one red line and an exit
code scripts can trust) and the option helpers that build an adapter config from the command
line (``build_config``: ``--targets``, ``--rank``, ``--set knob=value``).

Exit codes (``EXIT_CODES``, also in ``lora-lite --help``): 0 ok; 1 failed; 2 bad input
(usage, unknown variant, bad knob or number, model or file not found, adapter file or
checkpoint refused); 3 non-finite training (NaN/inf loss or update: the last good adapter is
kept); 130 interrupted (Ctrl-C or SIGTERM; ``train`` saves a checkpoint).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import shutil

import typer
from rich.console import Console
from rich.markup import escape

from . import __version__

EXIT_CODES = ("0 ok; 1 failed; 2 bad input (usage, unknown variant, bad number, missing model or "
              "file, refused adapter file or checkpoint); 3 non-finite training (the last good "
              "adapter is kept); 130 interrupted (Ctrl-C or SIGTERM)")
APP_HELP = ("LoRA-family adapters attached with forward hooks: list, attach, train, compare, evaluate, "
            f"cost.\n\nExit codes: {EXIT_CODES}.")
# options that take several values: `--variants a b` is read as `--variants a --variants b`
MULTI_VALUE_OPTIONS = ("--variants",)
DEFAULT_TARGETS = (r"q_proj$", r"v_proj$")
DEBUG_ENV = "LORA_LITE_DEBUG"


def _new_typer() -> typer.Typer:
    return typer.Typer(name="lora-lite", no_args_is_help=True, add_completion=False,
                       help=APP_HELP, pretty_exceptions_enable=False)


app = _new_typer()  # built-in commands register here (see commands/__init__.py)
console = Console()
err_console = Console(stderr=True)


class CLIError(Exception):
    """An error shown to the user as one line, with exit code ``code``."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


def one_line(message) -> str:
    """A message squeezed onto one line (library errors sometimes span several)."""
    return " ".join(str(message).split())


def fail(message, code=1):
    err_console.print(f"[red]error:[/] {escape(one_line(message))}", highlight=False,
                      soft_wrap=True)
    raise typer.Exit(code)


def warn(message):
    err_console.print(f"[yellow]warning:[/] {escape(one_line(message))}", highlight=False,
                      soft_wrap=True)


def handle_errors(fn):
    """Decorator for commands: errors become one red line and a non-zero exit code.

    CLIError -> its code; lora-lite errors (unknown variant, bad config, refused adapter file),
    a missing model, a missing file -> 2; Ctrl-C -> 130; anything else -> 1, with the traceback
    only when LORA_LITE_DEBUG=1.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import click

        from lora_lite import LoraLiteError

        from .models import ModelNotFound
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.ClickException, click.exceptions.Exit):
            raise
        except CLIError as e:
            fail(e, e.code)
        except (LoraLiteError, ModelNotFound, FileNotFoundError) as e:
            fail(e, 2)
        except KeyboardInterrupt:
            _ignore_further_interrupts()
            fail("interrupted", 130)
        except OSError as e:  # e.g. transformers: a model name that is neither a folder nor reachable
            fail(e, 2)
        except Exception as e:
            if os.environ.get(DEBUG_ENV):
                raise
            fail(f"{type(e).__name__}: {e} (set {DEBUG_ENV}=1 to see the traceback)", 1)
    return wrapper


def _ignore_further_interrupts():
    """A second Ctrl-C while the process winds down must not print a traceback (interpreter
    shutdown, thread joins): from here on SIGINT and SIGTERM are ignored."""
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)


def expand_multi_values(argv: list[str]) -> list[str]:
    """['--variants', 'a', 'b', '--json'] -> ['--variants', 'a', '--variants', 'b', '--json']:
    the README's space-separated spelling; 'a,b' and repeating the option also work."""
    out, current = [], None
    for arg in argv:
        if arg == "--":
            current = None
        elif arg.startswith("-"):
            current = arg if arg in MULTI_VALUE_OPTIONS else None
        elif current is not None and out and out[-1] != current:
            out.append(current)
        out.append(arg)
    return out


def _multi_value_command_class():
    from typer.core import TyperCommand

    class MultiValueCommand(TyperCommand):
        """A command whose MULTI_VALUE_OPTIONS take space-separated values."""

        def parse_args(self, ctx, args):
            return super().parse_args(ctx, expand_multi_values(list(args)))
    return MultiValueCommand


MultiValueCommand = _multi_value_command_class()


def _version(value: bool):
    if value:
        import lora_lite
        console.print(f"lora-lite-cli {__version__} (lora-lite {lora_lite.__version__})",
                      highlight=False)
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Show the version and exit.")):
    """lora-lite: LoRA-family adapters attached with forward hooks."""
    _fit_consoles()


def _fit_consoles():
    """Size output for where it goes *now*: the terminal's width, $COLUMNS if set, and a wide
    page when piped or captured (tables are not cut at rich's 80-column default)."""
    columns = os.environ.get("COLUMNS", "")
    for con in (console, err_console):
        if columns.isdigit():
            con.width = int(columns)
        elif con.is_terminal:
            con.width = shutil.get_terminal_size().columns
        else:
            con.width = 200


# -- plugins' commands -------------------------------------------------------------------------
command_problems: list[str] = []  # filled by get_app(): plugins whose commands were refused


def _command_name(info) -> str:
    from typer.main import get_command_name
    return info.name or get_command_name(info.callback.__name__)


def _group_name(info) -> str | None:
    return info.name or (info.typer_instance.info.name if info.typer_instance else None)


def get_app() -> typer.Typer:
    """A fresh app: the built-in commands plus those of every loaded plugin.

    Each plugin's ``register_commands`` gets its own scratch Typer, so a plugin that raises half
    way adds nothing, and a command whose name is taken (built-in or another plugin's) is
    refused with a warning naming the distribution. Plugin commands get ``handle_errors``.
    """
    from lora_lite.plugins import hook, registry

    from . import (
        commands,  # noqa: F401  (imports register the built-in commands on `app`)
        hookspecs,
    )
    hookspecs.add_to(registry().pm)  # the CLI's own hook (core has no command line)

    cli = _new_typer()
    cli.registered_callback = app.registered_callback
    cli.registered_commands = list(app.registered_commands)
    cli.registered_groups = list(app.registered_groups)
    taken = {_command_name(c): "lora-lite-cli" for c in cli.registered_commands}
    taken.update({_group_name(g): "lora-lite-cli" for g in cli.registered_groups})
    command_problems.clear()
    info = registry().info
    for impl in hook().register_commands.get_hookimpls()[::-1]:  # registration order
        dist = info[impl.plugin_name].distribution if impl.plugin_name in info else impl.plugin_name
        scratch = typer.Typer()
        try:
            impl.function(app=scratch)
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # sys.exit() in a plugin's hook must not end lora-lite
            command_problems.append(f"plugin {dist!r} failed to add commands: "
                                    f"{type(e).__name__}: {e} (fix or uninstall {dist})")
            continue
        for command in _free(scratch.registered_commands, _command_name, "command", dist, taken):
            command = copy.copy(command)
            command.callback = handle_errors(command.callback)
            cli.registered_commands.append(command)
        cli.registered_groups += _free(scratch.registered_groups, _group_name, "command group",
                                       dist, taken)
    return cli


def _free(entries, name_of, kind, dist, taken) -> list:
    """The entries (commands or groups) of plugin ``dist`` whose names are not ``taken`` yet,
    now recorded there; each clash is a warning naming the holder."""
    kept = []
    for entry in entries:
        name = name_of(entry)
        if name in taken:
            command_problems.append(f"plugin {dist!r}: {kind} {name!r} is already provided by "
                                    f"{taken[name]}; this one was skipped (rename it in {dist})")
            continue
        taken[name] = dist
        kept.append(entry)
    return kept


def report_command_problems():
    for problem in command_problems:
        warn(problem)


class _DropNotice:
    """A logging filter dropping records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes):
        self.prefixes = prefixes

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self.prefixes)


# bitsandbytes 0.50 on an AVX512-BF16 CPU logs, on every import, a warning to `pip install
# kernels`, a package that would then fetch a kernel from the Hugging Face hub at import time:
# advice a run here must not follow (no downloads at run time), so the CLI drops that one record.
LIBRARY_NOTICES = {"bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",)}


def quiet_library_notices():
    import logging
    for logger, prefixes in LIBRARY_NOTICES.items():
        log = logging.getLogger(logger)
        if not any(isinstance(f, _DropNotice) for f in log.filters):
            log.addFilter(_DropNotice(*prefixes))


def main():
    import sys
    quiet_library_notices()
    cli = get_app()
    report_command_problems()
    try:
        cli(args=sys.argv[1:], prog_name="lora-lite")
    except KeyboardInterrupt:  # Ctrl-C outside a command body (option parsing, plugin loading)
        _ignore_further_interrupts()
        err_console.print("[red]error:[/] interrupted", highlight=False)
        raise SystemExit(130) from None


# -- options shared by several commands (declared once, the same spelling everywhere) ---------
def variant_option(default=None):
    return typer.Option(default, "--variant", "-v", help="Adapter variant (see `lora-lite variants`).")


def model_option(default=None, help_extra=""):
    return typer.Option(default, "--model", "-m", help="'smollm2' (embedded default), a local "
                        "model folder, a .gguf file or a hub id" + help_extra + ".")


def targets_option():
    return typer.Option(None, "--targets", "-t", help="Regex on layer names, repeatable "
                        "(default: the variant's own targets).")


def rank_option():
    return typer.Option(None, "--rank", "-r", help="Rank r (default: the variant's).")


def layers_option():
    return typer.Option(None, "--layers", help="Blocks to adapt: 0,1,5 or 0-3 or all (default: all).")


def sets_option(example="--set block=8"):
    return typer.Option(None, "--set", help=f"A variant knob, knob=value, repeatable (e.g. {example}).")


def dtype_option(default="float32"):
    return typer.Option(default, "--dtype", help="Storage dtype of the base model: float32, "
                        "bfloat16, float16 (adapter tensors stay float32 in train).")


def quantize_option():
    return typer.Option(None, "--quantize", help="Quantize the base with bitsandbytes: 4bit (nf4) or 8bit.")


def threads_option():
    return typer.Option(None, "--threads", help="CPU threads for torch (default: one per core "
                        "not busy with other work).")


def json_option(what="the results"):
    return typer.Option(False, "--json", help=f"Print {what} as JSON on stdout.")


# -- loading the base model ------------------------------------------------------------------
def load_base_model(name: str, dtype="float32", quantize=None, device="cpu"):
    """(model, tokenizer) through ``models.load_model``, with a clear error for a local path
    that does not exist (transformers would call it an invalid hub repo id)."""
    from .models import load_model
    if name.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(name)):
        raise CLIError(f"model {name!r} not found: no such folder or file", 2)
    return load_model(os.path.expanduser(name) if name.startswith("~") else name,
                      dtype=dtype, quantize=quantize, device=device)


# -- building an adapter config from the command line ------------------------------------------
def parse_sets(pairs) -> dict[str, str]:
    """['block=8', 'road_variant=road_2'] -> {'block': '8', ...} (values still text)."""
    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise CLIError(f"--set {pair!r}: expected knob=value, e.g. --set alpha=32", 2)
        out[key] = value.strip()
    return out


def _coerce(field, text: str):
    """Turn the text of --set into the type of config field ``field`` (from its default)."""
    default = field.default if field.default is not dataclasses.MISSING else None
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        default = field.default_factory()  # type: ignore[misc]
    if not isinstance(text, str):  # a typed value (a variant's train_defaults knobs), not --set text
        return text
    low = text.lower()
    if isinstance(default, bool):
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    if isinstance(default, (tuple, list)):
        if text.startswith("["):
            return tuple(json.loads(text))
        items = [s.strip() for s in text.split(",") if s.strip()]
        return tuple(_scalar(s) for s in items) if field.name == "layers" else tuple(items)
    if default is None:
        if low in ("none", "null", ""):
            return None
        if field.name == "layers":
            return tuple(int(s) for s in text.split(",") if s.strip())
        return _scalar(text)
    return text  # strings, dtype names


def _scalar(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    return text


def parse_layers(text: str | None):
    """'0,1,5' or '0-3' or 'all' -> tuple of indices or None."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = part.split("-")
                out.extend(range(int(lo), int(hi) + 1))
            elif part:
                out.append(int(part))
        except ValueError:
            raise CLIError(f"--layers {text!r}: expected indices like 0,1,5 or a range 0-3, or all",
                           2) from None
    return tuple(out)


def build_config(variant: str, *, targets=None, rank=None, alpha=None, layers=None,
                 dtype="float32", sets=None, seed=None):
    """The typed config of ``variant`` from command-line values.

    targets: regexes on module names; when omitted, the variant config's own default target
    names, else ``DEFAULT_TARGETS`` (q/v, like the upstream benchmark); any role. ``sets``:
    {'knob': 'text'} from --set, coerced to each field's type; unknown knobs and bad values
    raise ConfigError naming the field. Raises VariantNotInstalled for an unknown variant.
    """
    import lora_lite as ll
    cls = ll.get_variant(variant).config
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict = {}
    if targets:
        values["target_names"] = tuple(targets)
    else:
        own = fields["target_names"].default if "target_names" in fields else ()
        # a variant with per-architecture defaults (ia3) resolves them itself at attach
        per_arch = ll.get_variant(variant).default_target_names is not None
        values["target_names"] = tuple(own) if own or per_arch else DEFAULT_TARGETS
    values["target_roles"] = ()
    if rank is not None:
        values["r"] = rank
    if alpha is not None:
        values["alpha"] = alpha
    if layers is not None:
        values["layers"] = layers
    if seed is not None:
        values["seed"] = seed
    values["dtype"] = dtype
    for key, text in (sets or {}).items():
        if key == "variant":
            raise ll.ConfigError("variant: choose the variant with --variant, not --set")
        if key not in fields:
            known = sorted(k for k in fields if k != "variant")
            raise ll.ConfigError(f"unknown knob {key!r} for variant {variant!r}; "
                                 f"known knobs: {', '.join(known)}")
        try:
            values[key] = _coerce(fields[key], text)
        except (ValueError, TypeError) as e:
            raise ll.ConfigError(f"{key}: cannot read {text!r} ({e})") from None
    return ll.config(variant, **values)


def jsonable(value):
    """Config defaults and figures as JSON values (dtypes as names, tuples as lists)."""
    import torch
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and value != value:
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def print_json(data):
    """JSON on stdout, nothing else (progress and warnings go to stderr)."""
    typer.echo(json.dumps(jsonable(data), indent=2))
