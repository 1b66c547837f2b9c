"""The plugin registry (``registry()``): a pluggy manager over the ``lora_lite`` entry points (and core's own
bitsandbytes backend, registered through the same hooks), the allow-list, what every plugin
provides collected into variants and weight backends, clash rules, and the problems found.
"""
from __future__ import annotations

import importlib.metadata as md
import os
from dataclasses import dataclass, field

import pluggy

from ..variant import contract_problem, registered_name
from . import hookspecs
from .names import (
    ALLOW_ENV,
    ENTRY_POINT_GROUP,
    _entry_point_key,
    installed_version,
    is_builtin,
    normalize_distribution,
    qualified_name,
)

_CORE_PLUGINS = {"bnb_backend": "lora_lite.layers.bnb"}  # plugin name -> module


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
            self.add(module, plugin_name, "lora-lite", installed_version("lora-lite"))
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


def hook():
    """The pluggy hook relay, e.g. ``hook().register_variants(register=...)``."""
    return registry().pm.hook
