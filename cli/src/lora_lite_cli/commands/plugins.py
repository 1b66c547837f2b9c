"""``lora-lite plugins`` / ``install`` / ``uninstall``: the plugin distributions, and pip run in
lora-lite's own environment (``sys.executable -m pip``, as simonw/llm does), so a plugin never
lands in another Python than the one that runs lora-lite."""
from __future__ import annotations

import json
import subprocess
import sys

import typer
from rich.table import Table

from ..app import app, command_problems, console, err_console, handle_errors, warn
from ..errors import CLIError
from ..output import print_json


def plugins_data() -> dict:
    """{'plugins': [...], 'problems': [...]} (the --json record of ``lora-lite plugins``)."""
    import lora_lite as ll
    plugins = [{"name": p.name, "distribution": p.distribution, "version": p.version,
                "hooks": list(p.hooks), "variants": list(p.variants)}
               for p in ll.installed_plugins()]
    problems = [{"distribution": p.distribution, "error": p.error, "fix": p.hint}
                for p in ll.problems()]
    problems += [{"distribution": "", "error": msg, "fix": ""} for msg in command_problems]
    return {"python": sys.executable, "plugins": plugins, "problems": problems}


@app.command("plugins")
@handle_errors
def plugins_command(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """List the installed plugin distributions: version, hooks, variants they register.

    Plugins that failed to load or registered something malformed are listed as warnings,
    naming the distribution and what to do.
    """
    data = plugins_data()
    if as_json:
        print_json(data)
        return
    table = Table(title=f"lora-lite plugins ({sys.executable})", title_justify="left")
    table.add_column("distribution", no_wrap=True)
    table.add_column("version")
    table.add_column("hooks", overflow="fold")
    table.add_column("variants", overflow="fold")
    for p in data["plugins"]:
        table.add_row(p["distribution"], p["version"], ", ".join(p["hooks"]),
                      ", ".join(p["variants"]) or "-")
    console.print(table)
    for p in data["problems"]:
        if p["distribution"]:
            warn(f"plugin {p['distribution']!r}: {p['error']} -> {p['fix']}")
        else:
            warn(p["error"])


def run_pip(args: list[str]) -> int:
    """Run pip in this interpreter's environment; its output goes straight to the terminal."""
    cmd = [sys.executable, "-m", "pip", *args]
    err_console.print(f"[dim]$ {' '.join(cmd)}[/]", highlight=False, soft_wrap=True)
    return subprocess.run(cmd).returncode


def _fresh_plugin_listing() -> dict | None:
    """``lora-lite plugins --json`` in a fresh interpreter (new installs are visible there)."""
    code = "from lora_lite_cli.app import main; main()"
    proc = subprocess.run([sys.executable, "-c", code, "plugins", "--json"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        return None


def _summarise_change(before: dict, after: dict | None):
    if after is None:
        warn("could not list the plugins after the change; run `lora-lite plugins`")
        return
    old = {(p["distribution"], p["version"]) for p in before["plugins"]}
    new = [p for p in after["plugins"] if (p["distribution"], p["version"]) not in old]
    gone = {p["distribution"] for p in before["plugins"]} - \
        {p["distribution"] for p in after["plugins"]}
    for p in new:
        console.print(f"plugin [bold]{p['distribution']}[/] {p['version']}: variants "
                      f"{', '.join(p['variants']) or '(none)'}; hooks {', '.join(p['hooks'])}",
                      highlight=False, soft_wrap=True)
    for dist in sorted(gone):
        console.print(f"removed plugin [bold]{dist}[/]", highlight=False, soft_wrap=True)
    old_problems = {(p["distribution"], p["error"]) for p in before["problems"]}
    for p in after["problems"]:
        if (p["distribution"], p["error"]) not in old_problems:
            warn(f"plugin {p['distribution']!r}: {p['error']} -> {p['fix']}")
    return new, gone


@app.command("install")
@handle_errors
def install_command(
    packages: list[str] | None = typer.Argument(
        None, help="Distributions to install: names on PyPI, wheel files, folders."),
    upgrade: bool = typer.Option(False, "--upgrade", "-U", help="Upgrade to the newest version."),
    editable: str | None = typer.Option(
        None, "--editable", "-e", help="Install a local plugin folder in editable mode."),
    force_reinstall: bool = typer.Option(False, "--force-reinstall",
                                         help="Reinstall even if the same version is installed."),
    no_deps: bool = typer.Option(False, "--no-deps", help="Do not install dependencies."),
    no_cache_dir: bool = typer.Option(False, "--no-cache-dir", help="Disable pip's cache."),
    pre: bool = typer.Option(False, "--pre", help="Allow pre-release versions."),
):
    """Install plugins with pip into the environment lora-lite runs in.

    Example: lora-lite install lora-lite-hra; lora-lite install -e ./my_plugin
    """
    if not packages and not editable:
        raise CLIError("name at least one package to install (or -e FOLDER)", 2)
    args = ["install"]
    if upgrade:
        args.append("--upgrade")
    if force_reinstall:
        args.append("--force-reinstall")
    if no_deps:
        args.append("--no-deps")
    if no_cache_dir:
        args.append("--no-cache-dir")
    if pre:
        args.append("--pre")
    if editable:
        args += ["--editable", editable]
    args += list(packages or [])
    before = plugins_data()
    code = run_pip(args)
    if code != 0:
        raise CLIError(f"pip install failed (exit code {code}); see pip's output above", 1)
    change = _summarise_change(before, _fresh_plugin_listing())
    if change is not None and not change[0]:
        console.print("no new lora-lite plugin appeared (already installed, or the package has no "
                      "entry point in the 'lora_lite' group)")


@app.command("uninstall")
@handle_errors
def uninstall_command(
    packages: list[str] = typer.Argument(..., help="Distributions to uninstall."),
    yes: bool = typer.Option(True, "--yes/--ask", "-y",
                             help="Do not ask for confirmation (default), or let pip ask."),
):
    """Uninstall plugins with pip from the environment lora-lite runs in.

    Example: lora-lite uninstall lora-lite-hra
    """
    from lora_lite.plugins import normalize_distribution
    protected = {"lora-lite", "lora-lite-cli"}
    # PEP 503: lora.lite, Lora_Lite and lora--lite all name lora-lite (pip would remove it)
    hit = sorted(protected & {normalize_distribution(p.split("==")[0].split("[")[0])
                              for p in packages})
    if hit:
        raise CLIError(f"refusing to uninstall {', '.join(hit)} with lora-lite itself; "
                       f"use {sys.executable} -m pip uninstall", 2)
    before = plugins_data()
    code = run_pip(["uninstall", *(["-y"] if yes else []), *packages])
    if code != 0:
        raise CLIError(f"pip uninstall failed (exit code {code}); see pip's output above", 1)
    _summarise_change(before, _fresh_plugin_listing())
