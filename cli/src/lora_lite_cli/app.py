"""The ``lora-lite`` Typer app.

Built-in commands live in ``lora_lite_cli.commands.*``: each module decorates ``app`` (the
built-in app). ``get_app()`` returns a fresh Typer holding the built-in commands plus the ones
every currently loaded plugin adds through its ``register_commands(app)`` hook, so a plugin
registered in-process (tests, notebooks) shows up on the next ``get_app()`` call.

Also here, for every command: ``handle_errors`` (expected errors -> one red line and an exit
code scripts can trust). Elsewhere: the shared options in ``options``, the adapter config from
the command line in ``configs``, JSON output in ``output``, ``CLIError`` in ``errors`` (all
re-exported here, their old home).

Exit codes (``EXIT_CODES``, also in ``lora-lite --help``): 0 ok; 1 failed; 2 bad input
(usage, unknown variant, bad knob or number, model or file not found, adapter file or
checkpoint refused); 3 non-finite training (NaN/inf loss or update: the last good adapter is
kept); 130 interrupted (Ctrl-C or SIGTERM; ``train`` saves a checkpoint).
"""
from __future__ import annotations

import copy
import functools
import os
import shutil

import typer
from rich.console import Console
from rich.markup import escape

from . import __version__
from .configs import _coerce, build_config, parse_layers, parse_sets
from .errors import CLIError, one_line
from .models import load_base_model
from .options import (
    MULTI_VALUE_OPTIONS,
    MultiValueCommand,
    dtype_option,
    expand_multi_values,
    json_option,
    layers_option,
    model_option,
    quantize_option,
    rank_option,
    sets_option,
    targets_option,
    threads_option,
    variant_option,
)
from .output import jsonable, print_json

__all__ = [  # re-exported: their old import path (tests, plugins)
    "CLIError", "MULTI_VALUE_OPTIONS", "MultiValueCommand", "_coerce", "build_config", "dtype_option",
    "expand_multi_values", "json_option", "jsonable", "layers_option", "load_base_model", "model_option",
    "one_line", "parse_layers", "parse_sets", "print_json", "quantize_option", "rank_option", "sets_option",
    "targets_option", "threads_option", "variant_option",
    "app", "console", "err_console", "fail", "warn", "handle_errors", "get_app", "main", "command_problems",
    "report_command_problems", "quiet_library_notices", "EXIT_CODES", "APP_HELP", "DEBUG_ENV",
]

EXIT_CODES = ("0 ok; 1 failed; 2 bad input (usage, unknown variant, bad number, missing model or "
              "file, refused adapter file or checkpoint); 3 non-finite training (the last good "
              "adapter is kept); 130 interrupted (Ctrl-C or SIGTERM)")
APP_HELP = ("LoRA-family adapters attached with forward hooks: list, attach, train, compare, evaluate, "
            f"cost.\n\nExit codes: {EXIT_CODES}.")
DEBUG_ENV = "LORA_LITE_DEBUG"


def _new_typer() -> typer.Typer:
    return typer.Typer(name="lora-lite", no_args_is_help=True, add_completion=False,
                       help=APP_HELP, pretty_exceptions_enable=False)


app = _new_typer()  # built-in commands register here (see commands/__init__.py)
console = Console()
err_console = Console(stderr=True)


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


