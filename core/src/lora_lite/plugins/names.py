"""Names of plugins and their distributions: qualified variant names (``dist:variant``), PEP 503
normalisation, which distributions are this repository's own, installed versions."""
from __future__ import annotations

import importlib.metadata as md
import re

ENTRY_POINT_GROUP = "lora_lite"
ALLOW_ENV = "LORA_LITE_PLUGINS"
CORE_DISTRIBUTION = "lora-lite"
BUILTINS_EXTRA = "all"  # core's extra listing the distributions this repository ships


def builtin_distributions() -> frozenset:
    """The distributions this repository ships: core and every one its ``[all]`` extra requires
    (core/pyproject.toml; tests/test_plugins.py checks it against plugins/*/pyproject.toml). Read
    from core's installed metadata, which no other package can change, so the code names no
    variant. Membership is by exact normalised name, never by prefix: anyone can call a package
    lora-lite-x, but one environment cannot hold two distributions of one normalised name, so a
    stranger cannot sit next to a built-in under its name."""
    try:
        requires = md.requires(CORE_DISTRIBUTION) or []
    except md.PackageNotFoundError:  # core run from a source tree, not installed
        requires = []
    extra = re.compile(rf"""extra\s*==\s*["']{BUILTINS_EXTRA}["']""")
    names = {re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0] for r in requires if extra.search(r)}
    return frozenset({CORE_DISTRIBUTION} | {normalize_distribution(n) for n in names if n})


QUALIFIER = ":"  # "dist:variant" names the variant of one distribution


def qualified_name(distribution, name) -> str:
    """``dist:variant``, the name that selects ``distribution``'s variant ``name``."""
    return f"{normalize_distribution(distribution)}{QUALIFIER}{name}"


def split_qualified(name) -> tuple[str | None, str]:
    """(normalised distribution or None, bare variant name) of ``dist:variant`` or ``variant``."""
    if not isinstance(name, str) or QUALIFIER not in name:
        return None, name
    dist, _, bare = name.rpartition(QUALIFIER)
    return normalize_distribution(dist), bare


def is_builtin(distribution) -> bool:
    return normalize_distribution(distribution) in BUILTIN_DISTRIBUTIONS


def normalize_distribution(name):
    """PEP 503 normalisation of a distribution name: runs of -_. become -, lower case."""
    return re.sub(r"[-_.]+", "-", str(name).strip()).lower()


def installed_version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "0+unknown"


def _entry_point_key(ep):
    """Built-ins load first, so a stranger reusing one of their entry-point names is the one
    refused; then by distribution name (never the directory or install order)."""
    dist = normalize_distribution(ep.dist.name) if ep.dist is not None else ""
    return (not is_builtin(dist), dist, ep.name)


BUILTIN_DISTRIBUTIONS = builtin_distributions()
