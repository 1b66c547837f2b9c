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

import difflib
import importlib.metadata as md
import os
import re
from dataclasses import dataclass, field

import pluggy

from .. import config as config_module
from ..errors import VariantNotInstalled
from ..variant import contract_problem, registered_name
from . import hookspecs

ENTRY_POINT_GROUP = "lora_lite"
ALLOW_ENV = "LORA_LITE_PLUGINS"
_CORE_PLUGINS = {"bnb_backend": "lora_lite.layers.bnb"}  # plugin name -> module
# The distributions this repository ships (tests/test_plugins.py checks the list against
# plugins/*/pyproject.toml). Membership is by exact normalised name, never by prefix: anyone can
# call a package lora-lite-x, but one environment cannot hold two distributions of one
# normalised name, so a stranger cannot sit next to a built-in under its name.
BUILTIN_DISTRIBUTIONS = frozenset({
    "lora-lite", "lora-lite-antipasto", "lora-lite-delora", "lora-lite-dora", "lora-lite-eva",
    "lora-lite-hra", "lora-lite-ia3", "lora-lite-lora", "lora-lite-lora-xs", "lora-lite-oft",
    "lora-lite-pissa", "lora-lite-road"})
QUALIFIER = ":"  # "dist:variant" names the variant of one distribution


@dataclass
class PluginProblem:
    distribution: str
    error: str
    hint: str
    variant: str | None = None  # the variant name concerned, where there is one

    def __str__(self):
        return f"plugin {self.distribution!r}: {self.error} ({self.hint})"


@dataclass
class PluginInfo:
    name: str                 # pluggy plugin name (the entry-point name)
    distribution: str
    version: str
    hooks: list[str] = field(default_factory=list)
    variants: list[str] = field(default_factory=list)  # what this plugin provides (a variant
    # that lost its bare name to a clash is listed by its qualified name dist:variant)
    preferred: bool = False   # registered in-process with preferred=True: wins a clash

    @property
    def builtin(self) -> bool:
        return is_builtin(self.distribution)

    @property
    def rank(self) -> int:
        """Who keeps a clashing name: an explicit in-process choice, then a built-in."""
        return 2 if self.preferred else 1 if self.builtin else 0


@dataclass
class Collected:
    """What the loaded plugins registered (rebuilt whenever a plugin is added or removed)."""

    variants: dict = field(default_factory=dict)   # name -> variant class
    origin: dict = field(default_factory=dict)     # name -> PluginInfo of the provider
    qualified: dict = field(default_factory=dict)  # (normalised dist, name) -> (class, PluginInfo)
    backends: list = field(default_factory=list)   # weight backends, registration order
    problems: list = field(default_factory=list)   # PluginProblem, from registering


def _guarded(call, on_error):
    """Run ``call()``; any failure but Ctrl-C (an exception, ``sys.exit()``) goes to
    ``on_error(text)`` instead of taking the caller down."""
    try:
        return call()
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # a plugin calling sys.exit() must not end lora-lite
        on_error(f"{type(e).__name__}: {e}")
        return None


class _Registry:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("lora_lite")
        self.pm.add_hookspecs(hookspecs)
        self.info: dict[str, PluginInfo] = {}
        self.load_problems: list[PluginProblem] = []
        self._collected: Collected | None = None

    # -- loading -------------------------------------------------------------------------
    def load_entry_points(self):
        allow = os.environ.get(ALLOW_ENV)
        allowed = None if allow is None else {normalize_distribution(a) for a in allow.split(",") if a.strip()}
        for plugin_name, module_name in _CORE_PLUGINS.items():
            module = __import__(module_name, fromlist=["_"])
            self.add(module, plugin_name, "lora-lite", _version("lora-lite"))
        for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=_entry_point_key):
            dist = ep.dist.name if ep.dist is not None else ep.name
            version = ep.dist.version if ep.dist is not None else "?"
            if allowed is not None and not {normalize_distribution(dist), normalize_distribution(ep.name)} & allowed:
                continue
            if self.pm.has_plugin(ep.name):
                self.load_problems.append(PluginProblem(
                    dist, f"entry point name {ep.name!r} is already used by another plugin",
                    f"rename the entry point in {dist}'s pyproject.toml"))
                continue

            def import_failed(error, _ep=ep, _dist=dist):
                # the entry-point name is all it says of itself before import (by convention
                # its variant or family name): a command asking for that name is told why
                self.load_problems.append(PluginProblem(
                    _dist, f"failed to import {_ep.value!r}: {error}",
                    f"reinstall or fix it (pip install --force-reinstall {_dist}), or exclude "
                    f"it with {ALLOW_ENV}", _ep.name))
            module = _guarded(ep.load, import_failed)
            if module is not None:
                self.add(module, ep.name, dist, version)

    def add(self, plugin, name, distribution="?", version="?", preferred=False):
        try:
            self.pm.register(plugin, name=name)
        except Exception as e:
            self.load_problems.append(PluginProblem(
                distribution, f"could not be registered: {type(e).__name__}: {e}",
                "check its @hookimpl functions against lora_lite.plugins.hookspecs"))
            return
        hooks = sorted(impl.function.__name__ for caller in self.pm.get_hookcallers(plugin) or []
                       for impl in caller.get_hookimpls() if impl.plugin is plugin)
        self.info[name] = PluginInfo(name, distribution, version, hooks, preferred=preferred)
        self._collected = None

    def remove(self, name):
        self.pm.unregister(name=name)
        self.info.pop(name, None)
        self._collected = None

    # -- collecting what plugins register ---------------------------------------------------
    def collected(self) -> Collected:
        if self._collected is None:
            self._collected = self._collect()
        return self._collected

    def _by_distribution(self, hook_caller):
        """Hook implementations ordered by distribution name, then plugin name (deterministic:
        neither install nor directory order changes what is reported first)."""
        return sorted(hook_caller.get_hookimpls(),
                      key=lambda impl: (normalize_distribution(self.info[impl.plugin_name].distribution),
                                        impl.plugin_name))

    def _collect(self) -> Collected:
        out = Collected()
        for info in self.info.values():
            info.variants = []
        offers: dict[str, list] = {}  # name -> [(class, PluginInfo)], one per distribution
        for impl in self._by_distribution(self.pm.hook.register_variants):
            info = self.info[impl.plugin_name]
            _guarded(lambda impl=impl, info=info: impl.function(register=lambda cls: _offer(out, offers, info, cls)),
                     lambda error, _info=info: out.problems.append(PluginProblem(
                         _info.distribution, f"register_variants raised {error}",
                         f"fix or uninstall {_info.distribution}")))
        for name, providers in offers.items():
            _settle(out, name, providers)
        for impl in self.pm.hook.register_weight_backends.get_hookimpls()[::-1]:
            dist = self.info[impl.plugin_name].distribution
            _guarded(lambda impl=impl: impl.function(register=out.backends.append),
                     lambda error, _dist=dist: out.problems.append(PluginProblem(
                         _dist, f"register_weight_backends raised {error}", "fix the plugin")))
        return out


def _offer(out: Collected, offers: dict, info: PluginInfo, cls):
    """One ``register(cls)`` call of ``info``'s plugin: checked, then recorded under its
    qualified name; who gets the bare name is settled once all have registered."""
    name = registered_name(cls)
    hint = f"report it to the plugin's author or uninstall {info.distribution}"
    failed: list[str] = []
    problem = _guarded(lambda: variant_problem(cls), failed.append)
    if failed:
        problem = f"variant {cls!r} could not be checked: {failed[0]}"
    key = (normalize_distribution(info.distribution), name)
    if problem is None and key in out.qualified:
        problem = (f"variant name {name!r} is registered twice by {info.distribution}; "
                   "the first one is kept")
    if problem is not None:
        out.problems.append(PluginProblem(info.distribution, problem, hint, name))
        return
    warning = _guarded(lambda: tensor_name_problem(cls), lambda error: None)
    if warning is not None:
        out.problems.append(PluginProblem(info.distribution, warning, hint, name))
    out.qualified[key] = (cls, info)
    offers.setdefault(name, []).append((cls, info))


def _settle(out: Collected, name: str, providers: list):
    """Give the bare ``name`` to its only provider, or on a clash to the one provider of the
    highest rank (an explicit in-process choice, else the built-in); with no single one, to
    nobody. Every other provider is reported, naming both sides and how to choose."""
    best = max(info.rank for _, info in providers)
    top = [(cls, info) for cls, info in providers if info.rank == best]
    keeper = top[0] if len(top) == 1 else None
    if keeper is not None:
        out.variants[name], out.origin[name] = keeper
        keeper[1].variants.append(name)
    for _, info in providers:
        if keeper is not None and info is keeper[1]:
            continue
        info.variants.append(qualified_name(info.distribution, name))
        out.problems.append(_clash_problem(name, info, keeper, providers))


def _clash_problem(name, info, keeper, providers) -> PluginProblem:
    mine = qualified_name(info.distribution, name)
    choose = (f"use it by its qualified name {mine!r} (ll.config / --variant), or load only "
              f"{info.distribution} with {ALLOW_ENV}={info.distribution}")
    if keeper is not None:
        holder = keeper[1].distribution + (" (built in)" if keeper[1].builtin else "")
        return PluginProblem(info.distribution, (
            f"variant name {name!r} is also registered by {holder}, which keeps it; "
            f"{info.distribution}'s {name!r} was not registered under that name"),
            f"{choose}; or pip uninstall {info.distribution}", name)
    others = ", ".join(sorted(i.distribution for _, i in providers if i is not info))
    return PluginProblem(info.distribution, (
        f"variant name {name!r} is registered by both {info.distribution} and {others}; a clash "
        "is never settled silently, so the bare name is not registered at all"),
        f"{choose}; or uninstall one of them", name)


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


def _entry_point_key(ep):
    """Built-ins load first, so a stranger reusing one of their entry-point names is the one
    refused; then by distribution name (never the directory or install order)."""
    dist = normalize_distribution(ep.dist.name) if ep.dist is not None else ""
    return (not is_builtin(dist), dist, ep.name)


def normalize_distribution(name):
    """PEP 503 normalisation of a distribution name: runs of -_. become -, lower case."""
    return re.sub(r"[-_.]+", "-", str(name).strip()).lower()


def _version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "0+unknown"


def variant_problem(cls):
    """Why ``cls`` breaks the variant contract, or None if it meets it."""
    return contract_problem(cls)


def tensor_name_problem(cls):
    """Bad tensor names in ``cls.param_specs`` under its default config, or None. Such a variant
    stays registered (attach refuses it before touching a model); this reports it up front."""
    try:
        specs = cls.param_specs(16, 16, cls.config())
    except Exception:  # cannot be probed with the default config: attach still checks
        return None
    bad = [n for n in specs if not (isinstance(n, str) and n.startswith("lora_"))] \
        if isinstance(specs, dict) else []
    if bad:
        return (f"variant {cls.name!r}: param_specs names tensor(s) {bad}; every adapter tensor "
                "name must start with 'lora_', so attach refuses this variant")
    return None


_registry: _Registry | None = None


def registry() -> _Registry:
    global _registry
    if _registry is None:
        _registry = _Registry()
        _registry.load_entry_points()
    return _registry


def get_plugin_manager() -> pluggy.PluginManager:
    return registry().pm


def reset():
    """Forget every loaded plugin; the next use reloads from entry points (honours LORA_LITE_PLUGINS)."""
    global _registry
    _registry = None


def register_plugin(plugin, name, distribution="(in-process)", version="0", preferred=False):
    """Register a plugin object in-process (tests, notebooks). Undo with ``unregister_plugin``.
    ``preferred=True``: its variants keep their names on a clash, even over a built-in (the
    caller's own explicit choice, e.g. the conformance kit checking a class named like one)."""
    registry().add(plugin, name, distribution, version, preferred)


def unregister_plugin(name):
    registry().remove(name)


def variants() -> dict:
    """name -> variant class, from every loaded plugin."""
    return dict(registry().collected().variants)


def weight_backends() -> list:
    return list(registry().collected().backends)


def problems() -> list[PluginProblem]:
    reg = registry()
    return list(reg.load_problems) + list(reg.collected().problems)


def installed_plugins() -> list[PluginInfo]:
    reg = registry()
    reg.collected()
    return list(reg.info.values())


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


_DIST_NAME = re.compile(r"[A-Z0-9]([A-Z0-9._-]*[A-Z0-9])?", re.IGNORECASE)  # PEP 508 names
_VERSION = re.compile(r"[A-Za-z0-9.+!_-]{1,40}")
NAMESPACE = "lora-lite-"  # the project's distributions; the only ones an error says to install
MAX_SUGGESTED_NAME = 100


def _quoted(text) -> str:
    shown = repr(text)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _as_shown(text, pattern) -> str:
    """``text`` as is when it matches ``pattern``, else quoted (repr) and cut: one safe line."""
    return text if len(text) <= MAX_SUGGESTED_NAME and pattern.fullmatch(text) else _quoted(text)


def recorded_writer(distribution: str, version: str | None = None) -> str:
    """What a file says about its writer, as a fact, plus ``: pip install NAME`` only for a
    valid distribution name in lora-lite's namespace (a file must not send users to any package)."""
    text = f"the file says it was written by {_as_shown(distribution, _DIST_NAME)}"
    if version:
        text += f" {_as_shown(str(version), _VERSION)}"
    if (len(distribution) <= MAX_SUGGESTED_NAME and _DIST_NAME.fullmatch(distribution)
            and normalize_distribution(distribution).startswith(NAMESPACE)):
        text += f": pip install {distribution}"
    return text


def _allow_list_note() -> str:
    if os.environ.get(ALLOW_ENV) is None:
        return ""
    return f" (note: {ALLOW_ENV}={os.environ[ALLOW_ENV]!r} limits which plugins load)"


def not_installed_message(name, found: dict, distribution: str | None = None,
                          version: str | None = None) -> str:
    """Why ``name`` is not available and what to do, naming a package only when one is known to
    provide it (a broken plugin that registers it, or ``distribution``); close installed names
    are suggested, never a guessed package name."""
    related = [p for p in problems() if p.variant == name]
    if distribution:
        mine = normalize_distribution(distribution)
        related += [p for p in problems() if normalize_distribution(p.distribution) == mine]
    if related:
        return f"variant {name!r} is unavailable because {related[0]}"
    qualifier, bare = split_qualified(name)
    if qualifier is not None and not distribution:
        return _qualified_missing(qualifier, bare)
    if distribution:  # a file names the distribution that wrote it
        msg = f"this adapter needs variant {_quoted(name)}, which is not installed"
        return f"{msg}{_allow_list_note()}; {recorded_writer(distribution, version)}"
    msg = f"unknown adapter variant {name!r}: no installed plugin provides it"
    close = difflib.get_close_matches(str(name), sorted(found), n=3, cutoff=0.6)
    if close:
        msg += f" (did you mean {' or '.join(repr(c) for c in close)}?)"
    msg += _allow_list_note()
    if found:
        msg += f". Installed variants: {', '.join(sorted(found))}"
    return msg


def _qualified_missing(dist, bare) -> str:
    providers = sorted(qualified_name(i.distribution, n)
                       for (_, n), (_, i) in registry().collected().qualified.items() if n == bare)
    msg = f"no installed distribution {_quoted(dist)} provides variant {_quoted(bare)}"
    if providers:
        msg += f"; it is provided as {' or '.join(repr(p) for p in providers)}"
    return msg + _allow_list_note()


def hook():
    """The pluggy hook relay, e.g. ``hook().register_variants(register=...)``."""
    return registry().pm.hook


config_module.set_variant_lookup(get_variant)
