"""Platforms: how ``turbobot run --platform NAME`` finds what talks to users.

A platform is an entry point in the ``turbobot.platforms`` group naming an async
function that takes a :class:`Launch` and runs until the bot stops. turbobot's own
(``console``, ``telegram``) are declared in its ``pyproject.toml``; a third party adds
one from its own distribution::

    [project.entry-points."turbobot.platforms"]
    matrix = "turbobot_matrix:run_platform"

The CLI (the composition root) loads the entry point by name; nothing in the core
imports a platform. See docs/architecture.md, "Module map".
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Coroutine, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from turbobot.exceptions import ConfigurationError
from turbobot.llm.base import LLM
from turbobot.metrics import Metrics
from turbobot.runtime import RuntimeSettings
from turbobot.store import BaseStore
from turbobot.template import Template

__all__ = ["GROUP", "Launch", "PlatformRunner", "available", "load"]

GROUP = "turbobot.platforms"


@dataclass(frozen=True, slots=True)
class Launch:
    """What ``turbobot run`` hands a platform.

    ``parts()`` opens the bot's parts: the template, the open store and the started
    LLM, closed when the context exits. ``settings`` are the runtime settings from the
    environment (a platform may replace fields, e.g. ``bot_username``).
    """

    args: argparse.Namespace
    env: Mapping[str, str]
    settings: RuntimeSettings
    parts: Callable[[], AbstractAsyncContextManager[tuple[Template, BaseStore, LLM]]]
    #: more personalities users may switch to with /mode (``--mode``); none: no /mode
    modes: tuple[Template, ...] = ()
    #: the Prometheus metrics to give the runtime (``--metrics-port``; None: none)
    metrics: Metrics | None = None


PlatformRunner = Callable[[Launch], Coroutine[object, object, None]]


def available() -> dict[str, EntryPoint]:
    """The installed platforms by name."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def load(name: str) -> PlatformRunner:
    """The platform called ``name``; a clear error if none is installed under it."""
    found = available().get(name)
    if found is None:
        names = ", ".join(sorted(available())) or "none"
        raise ConfigurationError(
            f"no platform named {name!r} is installed (installed: {names}); a platform is "
            f"a '{GROUP}' entry point of an installed distribution"
        )
    try:
        runner = found.load()
    except ImportError as exc:
        raise ConfigurationError(
            f"the {name} platform cannot be loaded ({exc}); install its extra, e.g. "
            f"pip install 'turbobot[{name}]'"
        ) from exc
    if not callable(runner):
        raise ConfigurationError(f"the {name} platform's entry point {found.value} is not callable")
    return runner  # type: ignore[no-any-return]
