"""Plugin loading: pluggy manager, entry points, allow-list, and the variant/backend registries.

Everything a plugin provides is collected through the hooks in ``hookspecs``. lora-lite's own
bitsandbytes backend is registered through the same hooks. Loading is lazy (first use). A plugin
that fails to import or registers something malformed is recorded in ``problems()`` and skipped.

``LORA_LITE_PLUGINS=a,b`` loads only the listed distributions (or entry-point names);
``LORA_LITE_PLUGINS=''`` loads none.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import re
import traceback
from dataclasses import dataclass, field

import pluggy

from . import hookspecs
from .errors import VariantContractError, VariantNotInstalled

ENTRY_POINT_GROUP = "lora_lite"
ALLOW_ENV = "LORA_LITE_PLUGINS"
_NAME_RE = re.compile(r"^[a-z0-9_]+$")
_CORE_PLUGINS = ("lora_lite.bnb_backend",)

# Where the variants this project ships live, so "not installed" can name the package.
KNOWN_DISTRIBUTIONS = {
    "lora": "lora-lite-lora", "pissa": "lora-lite-pissa", "dora": "lora-lite-dora",
    "delora": "lora-lite-delora", "eva": "lora-lite-eva", "ia3": "lora-lite-ia3",
    "ia3_ff": "lora-lite-ia3", "hra": "lora-lite-hra", "road": "lora-lite-road",
    "antipasto": "lora-lite-antipasto", "antipasto_rot": "lora-lite-antipasto",
    "antipasto_arrow": "lora-lite-antipasto", "vera": "lora-lite-vera",
    "oft": "lora-lite-oft", "boft": "lora-lite-oft", "lora_xs": "lora-lite-lora-xs",
}


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
    variants: list[str] = field(default_factory=list)


class _Registry:
    def __init__(self):
        self.pm = pluggy.PluginManager("lora_lite")
        self.pm.add_hookspecs(hookspecs)
        self.info: dict[str, PluginInfo] = {}
        self.load_problems: list[PluginProblem] = []
        self._collected = None  # (variants, variant_origin, backends, problems)

    # -- loading -------------------------------------------------------------------------
    def load_entry_points(self):
        allow = os.environ.get(ALLOW_ENV)
        allowed = None if allow is None else {_norm(a) for a in allow.split(",") if a.strip()}
        for plugin_name in _CORE_PLUGINS:
            module = __import__(plugin_name, fromlist=["_"])
            self.add(module, plugin_name.split(".")[-1], "lora-lite", _version("lora-lite"))
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else ep.name
            version = ep.dist.version if ep.dist is not None else "?"
            if allowed is not None and _norm(dist) not in allowed and _norm(ep.name) not in allowed:
                continue
            if self.pm.has_plugin(ep.name):
                self.load_problems.append(PluginProblem(
                    dist, f"entry point name {ep.name!r} is already used by another plugin",
                    f"rename the entry point in {dist}'s pyproject.toml"))
                continue
            try:
                module = ep.load()
            except Exception as e:  # a broken plugin must not take the others down
                self.load_problems.append(PluginProblem(
                    dist, f"failed to import {ep.value!r}: {type(e).__name__}: {e}",
                    f"reinstall or fix it (pip install --force-reinstall {dist}), or exclude "
                    f"it with {ALLOW_ENV}"))
                continue
            self.add(module, ep.name, dist, version)

    def add(self, plugin, name, distribution="?", version="?"):
        try:
            self.pm.register(plugin, name=name)
        except Exception as e:
            self.load_problems.append(PluginProblem(
                distribution, f"could not be registered: {type(e).__name__}: {e}",
                "check its @hookimpl functions against lora_lite.hookspecs"))
            return
        hooks = sorted(impl.function.__name__ for caller in self.pm.get_hookcallers(plugin) or []
                       for impl in caller.get_hookimpls() if impl.plugin is plugin)
        self.info[name] = PluginInfo(name, distribution, version, hooks)
        self._collected = None

    def remove(self, name):
        self.pm.unregister(name=name)
        self.info.pop(name, None)
        self._collected = None

    # -- collecting what plugins register ---------------------------------------------------
    def collected(self):
        if self._collected is None:
            self._collected = self._collect()
        return self._collected

    def _collect(self):
        variants, origin, backends, problems = {}, {}, [], []
        for info in self.info.values():
            info.variants = []
        # registration order (get_hookimpls lists it; pluggy *calls* in reverse): the first
        # plugin to register a name keeps it, as the clash report says
        for impl in self.pm.hook.register_variants.get_hookimpls():
            info = self.info[impl.plugin_name]

            def register(cls, _info=info):
                problem = variant_problem(cls)
                name = getattr(cls, "name", repr(cls))
                hint = f"report it to the plugin's author or uninstall {_info.distribution}"
                if problem is None and name in variants:
                    problem = (f"variant name {name!r} is already registered by "
                               f"{origin[name].distribution}; this one was skipped")
                    hint = (f"uninstall one of the two (pip uninstall {_info.distribution}), or "
                            f"load only one of them with {ALLOW_ENV}")
                if problem is not None:
                    problems.append(PluginProblem(
                        _info.distribution, problem, hint,
                        name if isinstance(name, str) else None))
                    return
                warning = tensor_name_problem(cls)
                if warning is not None:
                    problems.append(PluginProblem(_info.distribution, warning, hint, name))
                variants[name] = cls
                origin[name] = _info
                _info.variants.append(name)

            try:
                impl.function(register=register)
            except Exception as e:
                problems.append(PluginProblem(
                    info.distribution, f"register_variants raised {type(e).__name__}: {e}",
                    f"fix or uninstall {info.distribution}"))
        for impl in self.pm.hook.register_weight_backends.get_hookimpls()[::-1]:
            try:
                impl.function(register=backends.append)
            except Exception as e:
                problems.append(PluginProblem(
                    self.info[impl.plugin_name].distribution,
                    f"register_weight_backends raised {type(e).__name__}: {e}", "fix the plugin"))
        return variants, origin, backends, problems


def _norm(name):
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def _version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "0+unknown"


def variant_problem(cls):
    """Why ``cls`` breaks the variant contract, or None if it meets it."""
    from .config import AdapterConfig
    import dataclasses
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        return f"variant {cls!r} has no valid .name (a string of [a-z0-9_]+)"
    cfg = getattr(cls, "config", None)
    if not (isinstance(cfg, type) and issubclass(cfg, AdapterConfig) and dataclasses.is_dataclass(cfg)):
        return f"variant {name!r}: .config must be a dataclass subclassing lora_lite.AdapterConfig"
    default = {f.name: f.default for f in dataclasses.fields(cfg)}.get("variant")
    if default != name:
        return f"variant {name!r}: its config's `variant` field must default to {name!r}, not {default!r}"
    if not callable(getattr(cls, "param_specs", None)):
        return f"variant {name!r} has no param_specs(d_in, d_out, cfg)"
    fwd = [m for m in ("forward", "forward_input") if callable(getattr(cls, m, None))]
    if not fwd:
        return f"variant {name!r} must define forward(layer, x, y) or forward_input(layer, x) (or both); it has none"
    return None


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


def register_plugin(plugin, name, distribution="(in-process)", version="0"):
    """Register a plugin object in-process (tests, notebooks). Undo with ``unregister_plugin``."""
    registry().add(plugin, name, distribution, version)


def unregister_plugin(name):
    registry().remove(name)


def variants() -> dict:
    """name -> variant class, from every loaded plugin."""
    return dict(registry().collected()[0])


def weight_backends() -> list:
    return list(registry().collected()[2])


def problems() -> list[PluginProblem]:
    reg = registry()
    return list(reg.load_problems) + list(reg.collected()[3])


def installed_plugins() -> list[PluginInfo]:
    reg = registry()
    reg.collected()
    return list(reg.info.values())


def variant_origin(name) -> PluginInfo:
    return registry().collected()[1][name]


def get_variant(name):
    found = variants()
    if name in found:
        return found[name]
    dist = KNOWN_DISTRIBUTIONS.get(name) or f"lora-lite-{name.split('_')[0]}"
    related = ([p for p in problems() if p.variant == name]
               or [p for p in problems() if _norm(p.distribution) == _norm(dist)])
    msg = f"unknown adapter variant {name!r}: it is not installed. Install its plugin: pip install {dist}"
    if related:
        msg = f"variant {name!r} is unavailable because {related[0]}"
    elif os.environ.get(ALLOW_ENV) is not None:
        msg += f" (note: {ALLOW_ENV}={os.environ[ALLOW_ENV]!r} limits which plugins load)"
    if found:
        msg += f". Installed variants: {', '.join(sorted(found))}"
    raise VariantNotInstalled(msg)


def hook():
    """The pluggy hook relay, e.g. ``hook().register_commands(app=app)``."""
    return registry().pm.hook
