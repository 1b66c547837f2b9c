"""What the user reads when a variant is missing: which package to install (only one known to
provide it, only in lora-lite's namespace), close installed names, the allow-list in force."""
from __future__ import annotations

import difflib
import os
import re

from .manager import problems, registry
from .names import ALLOW_ENV, normalize_distribution, qualified_name, split_qualified

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
