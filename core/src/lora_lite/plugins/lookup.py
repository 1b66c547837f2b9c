"""Finding a variant class by name (bare or ``dist:variant``), and which plugin provides it."""
from __future__ import annotations

from ..errors import VariantNotInstalled
from .manager import PluginInfo, registry
from .messages import not_installed_message
from .names import ALLOW_ENV, normalize_distribution, split_qualified


def variant_origin(name) -> PluginInfo:
    """The plugin that provides ``name`` (bare or ``dist:variant``); KeyError if none does."""
    collected = registry().collected()
    dist, bare = split_qualified(name)
    if dist is None:
        return collected.origin[name]
    return collected.qualified[(dist, bare)][1]


def origin_mismatch(variant: str, distribution: str | None) -> str | None:
    """Why a file written by ``distribution``'s ``variant`` must not be run by the installed one
    (another distribution provides that name here), or None when they agree or the file names
    no distribution."""
    if not distribution:
        return None
    try:
        here = variant_origin(variant).distribution
    except KeyError:
        return None
    if normalize_distribution(here) == normalize_distribution(distribution):
        return None
    return (f"it was written by variant {variant!r} of {distribution}, but {variant!r} is provided "
            f"here by {here}: install {distribution} and select it with "
            f"{ALLOW_ENV}={distribution} (or uninstall {here})")


def get_variant(name, distribution: str | None = None, version: str | None = None):
    """The variant class called ``name``. ``distribution`` (and ``version``): the package a file
    records as its writer, reported in the error when the variant is missing."""
    collected = registry().collected()
    dist, bare = split_qualified(name)
    if dist is None and name in collected.variants:
        return collected.variants[name]
    if dist is not None and (dist, bare) in collected.qualified:
        return collected.qualified[(dist, bare)][0]
    found = dict(collected.variants)
    raise VariantNotInstalled(not_installed_message(name, found, distribution, version))
