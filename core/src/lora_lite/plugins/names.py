"""Names of plugins and their distributions: qualified variant names (``dist:variant``), PEP 503
normalisation, which distributions are this repository's own, installed versions."""
from __future__ import annotations

import importlib.metadata as md
import re

ENTRY_POINT_GROUP = "lora_lite"
ALLOW_ENV = "LORA_LITE_PLUGINS"
# The distributions this repository ships (tests/test_plugins.py checks the list against
# plugins/*/pyproject.toml). Membership is by exact normalised name, never by prefix: anyone can
# call a package lora-lite-x, but one environment cannot hold two distributions of one
# normalised name, so a stranger cannot sit next to a built-in under its name.
BUILTIN_DISTRIBUTIONS = frozenset({
    "lora-lite", "lora-lite-antipasto", "lora-lite-delora", "lora-lite-dora", "lora-lite-eva",
    "lora-lite-hra", "lora-lite-ia3", "lora-lite-lora", "lora-lite-lora-xs", "lora-lite-oft",
    "lora-lite-pissa", "lora-lite-road"})
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

