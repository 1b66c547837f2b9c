"""Plugin loading: pluggy manager, entry points, allow-list, and the variant/backend registries.

Everything a plugin provides is collected through the hooks in ``hookspecs``. lora-lite's own
bitsandbytes backend is registered through the same hooks. Loading is lazy (first use). A plugin
that fails to import (any exception, ``sys.exit()`` included), registers something malformed or
has a hook that raises is recorded in ``problems()`` and skipped; the others keep working.

Two distributions registering one variant name: a clash is never settled by a name or an order.
A built-in (one of ``BUILTIN_DISTRIBUTIONS``, the distributions this repository ships) keeps the
name over any other; two others clashing both lose the bare name. Every registered variant is
also reachable by its qualified name ``dist:variant`` (``ll.config("acme:scale")``), and each
loser is reported in ``problems()`` naming both distributions and how to choose. A file records
the distribution that wrote it; ``origin_mismatch`` tells when another one would load it.

``LORA_LITE_PLUGINS=a,b`` loads only the listed distributions (or entry-point names);
``LORA_LITE_PLUGINS=''`` loads none.
"""
from __future__ import annotations

from .. import config as config_module
from . import hookspecs
from .lookup import get_variant, origin_mismatch, variant_origin
from .manager import (
    Collected,
    PluginInfo,
    PluginProblem,
    get_plugin_manager,
    hook,
    installed_plugins,
    problems,
    register_plugin,
    registry,
    reset,
    tensor_name_problem,
    unregister_plugin,
    variant_problem,
    variants,
    weight_backends,
)
from .messages import not_installed_message, recorded_writer
from .names import (
    ALLOW_ENV,
    BUILTIN_DISTRIBUTIONS,
    ENTRY_POINT_GROUP,
    QUALIFIER,
    installed_version,
    is_builtin,
    normalize_distribution,
    qualified_name,
    split_qualified,
)

__all__ = [
    "ALLOW_ENV", "BUILTIN_DISTRIBUTIONS", "ENTRY_POINT_GROUP", "QUALIFIER", "Collected", "PluginInfo",
    "PluginProblem", "get_plugin_manager", "get_variant", "hook", "hookspecs", "installed_plugins",
    "installed_version", "is_builtin", "normalize_distribution", "not_installed_message", "origin_mismatch",
    "problems", "qualified_name", "recorded_writer", "register_plugin", "registry", "reset", "split_qualified",
    "tensor_name_problem", "unregister_plugin", "variant_origin", "variant_problem", "variants",
    "weight_backends",
]

config_module.set_variant_lookup(get_variant)
