"""The ``lora-lite`` Typer app. Commands live in their own modules; plugins add theirs through
the ``register_commands(app)`` hook (they get this ``typer.Typer``)."""
from __future__ import annotations

import sys

import typer
from rich.console import Console

from . import __version__

app = typer.Typer(name="lora-lite", no_args_is_help=True, add_completion=False,
                  help="LoRA-family adapters with forward hooks: list, attach, train, evaluate, cost.")
console = Console()
err_console = Console(stderr=True)


class CLIError(Exception):
    """An error shown to the user as one line, exit code ``code``."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


def _version(value: bool):
    if value:
        import lora_lite
        console.print(f"lora-lite-cli {__version__} (lora-lite {lora_lite.__version__})")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Show the version and exit.")):
    """lora-lite: LoRA-family adapters attached with forward hooks."""


def _register_builtin_commands():
    from . import commands  # noqa: F401  (each module decorates `app`)


def _register_plugin_commands():
    import lora_lite.plugins as plugins
    for impl in plugins.get_plugin_manager().hook.register_commands.get_hookimpls():
        try:
            impl.function(app=app)
        except Exception as e:
            err_console.print(f"[yellow]warning:[/] plugin {impl.plugin_name!r} failed to add "
                              f"commands: {type(e).__name__}: {e}")


def main(argv=None):
    _register_builtin_commands()
    _register_plugin_commands()
    try:
        app(args=argv, standalone_mode=True)
    except CLIError as e:
        err_console.print(f"[red]error:[/] {e}")
        sys.exit(e.code)
