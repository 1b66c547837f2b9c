"""The ``lora-lite`` Typer app. Commands live in ``lora_lite_cli.commands.*`` (each module
decorates ``app``); plugins add theirs through the ``register_commands(app)`` hook and get this
``typer.Typer``."""
from __future__ import annotations

import functools

import typer
from rich.console import Console

from . import __version__

app = typer.Typer(name="lora-lite", no_args_is_help=True, add_completion=False,
                  help="LoRA-family adapters with forward hooks: list, attach, train, evaluate, cost.")
console = Console()
err_console = Console(stderr=True)


class CLIError(Exception):
    """An error shown to the user as one line, with exit code ``code``."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


def handle_errors(fn):
    """Decorator for commands: expected errors become one red line and a non-zero exit code."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from lora_lite import LoraLiteError
        from .models import ModelNotFound
        try:
            return fn(*args, **kwargs)
        except CLIError as e:
            err_console.print(f"[red]error:[/] {e}", highlight=False)
            raise typer.Exit(e.code)
        except (LoraLiteError, ModelNotFound, FileNotFoundError) as e:
            err_console.print(f"[red]error:[/] {e}", highlight=False)
            raise typer.Exit(2)
    return wrapper


def _version(value: bool):
    if value:
        import lora_lite
        console.print(f"lora-lite-cli {__version__} (lora-lite {lora_lite.__version__})")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Show the version and exit.")):
    """lora-lite: LoRA-family adapters attached with forward hooks."""


_registered = False


def get_app() -> typer.Typer:
    """The app with built-in and plugin commands registered (idempotent; use in tests)."""
    global _registered
    if not _registered:
        _registered = True
        from . import commands  # noqa: F401
        from lora_lite.plugins import hook
        for impl in hook().register_commands.get_hookimpls():
            try:
                impl.function(app=app)
            except Exception as e:
                err_console.print(f"[yellow]warning:[/] plugin {impl.plugin_name!r} failed to "
                                  f"add commands: {type(e).__name__}: {e}")
    return app


def main():
    get_app()()
