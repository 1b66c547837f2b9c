"""The hook the ``lora-lite`` command line offers plugins (pluggy project ``lora_lite``).

Core has no command line, so this spec lives here; ``add_to`` adds it to core's plugin manager
whenever the CLI builds its app (``app.get_app``). A plugin implements it like core's hooks::

    @lora_lite.hookimpl
    def register_commands(app):  # app: a typer.Typer
        @app.command("my-report")
        def my_report(): ...
"""
import sys

import pluggy

hookspec = pluggy.HookspecMarker("lora_lite")


@hookspec
def register_commands(app):
    """Add commands to the ``lora-lite`` command line: ``app`` is a ``typer.Typer``."""


def add_to(pm: pluggy.PluginManager) -> None:
    """Add this module's hook specs to ``pm`` unless it has them (a reset makes a new manager)."""
    caller = getattr(pm.hook, "register_commands", None)
    if caller is None or caller.spec is None:
        pm.add_hookspecs(sys.modules[__name__])
