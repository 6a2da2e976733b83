"""Finding a bot's template from what the user typed: a module, a file or module:attr."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType

from turbobot.exceptions import ConfigurationError
from turbobot.template import Template

__all__ = ["load_template"]


def _import_file(path: str) -> ModuleType:
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"turbobot_bot_{name}", path)
    if spec is None or spec.loader is None:
        raise ConfigurationError(f"cannot load bot file {path!r}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _bundled(target: str) -> str | None:
    """``turbobot.bots.X`` for ``bots.X`` when turbobot ships such a bot.

    One module for the bundled bots, whether run from the checkout (which also has a
    ``bots`` link) or installed; a project's own ``bots`` package is used otherwise.
    """
    if not target.startswith("bots."):
        return None
    try:
        found = importlib.util.find_spec(f"turbobot.{target}")
    except ModuleNotFoundError:
        return None
    return f"turbobot.{target}" if found is not None else None


def load_template(ref: str) -> Template:
    """The template named by ``ref``.

    ``ref`` is a module path (``bots.horoscope``: the bundled bots are
    ``turbobot.bots``), a file path (``./mybot.py``) or either followed by
    ``:attribute``. Without an attribute, the module's ``bot``
    attribute is used if it is a template, else its only template.

    Raises:
        ConfigurationError: nothing importable, or no single template in it.
    """
    template = _find_template(ref)
    if template.problem is not None:
        raise ConfigurationError(f"{ref}: {template.problem}")
    return template


def _find_template(ref: str) -> Template:
    target, _, attr = ref.partition(":")
    if target.endswith(".py") or os.sep in target:
        if not os.path.isfile(target):
            raise ConfigurationError(f"bot file {target!r} does not exist")
        module = _import_file(target)
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(_bundled(target) or target)
        except ModuleNotFoundError as exc:
            raise ConfigurationError(
                f"cannot import bot module {target!r} ({exc}); give a module path such as "
                "bots.horoscope, a file path, or module:attribute"
            ) from exc
    if attr:
        value = getattr(module, attr, None)
        if not isinstance(value, Template):
            raise ConfigurationError(f"{target}:{attr} is not a @turbo template")
        return value
    bot = getattr(module, "bot", None)
    if isinstance(bot, Template):
        return bot
    found = {name: v for name, v in vars(module).items() if isinstance(v, Template)}
    local = {n: v for n, v in found.items() if v.fn.__module__ == module.__name__}
    candidates = local or found
    if len(candidates) == 1:
        return next(iter(candidates.values()))
    if not candidates:
        raise ConfigurationError(f"{target} defines no @turbo template")
    raise ConfigurationError(
        f"{target} defines several templates ({', '.join(sorted(candidates))}); "
        f"name one as {target}:NAME or call it bot"
    )
