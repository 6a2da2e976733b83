"""Modes: several personalities in one deployment, switched per channel with ``/mode``.

A channel talks to one template at a time. Its choice is not stored apart: it is the
template of the channel's newest conversation, found again after a restart by
:meth:`Personalities.recall` (docs/architecture.md, "Conversations").
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from turbobot.chat import ChannelKey
from turbobot.commands import Command
from turbobot.store import ConversationRecord
from turbobot.template import Template

__all__ = ["Personalities"]


class Personalities:
    """The templates a runtime runs, and which one each channel talks to.

    Args:
        default: the bot's template (every channel's, when there are no modes).
        others: the templates users may switch to; none: one template, no ``/mode``.
    """

    def __init__(self, default: Template, others: Sequence[Template] = ()) -> None:
        self.default = default
        #: by name (the template function's), the default first; empty if no modes
        self.modes: dict[str, Template] = {}
        if others:
            for template in (default, *others):
                name = template.fn.__name__.lower()
                if name in self.modes and self.modes[name].ref != template.ref:
                    raise ValueError(
                        f"two modes are called {name!r}: rename one of their functions"
                    )
                self.modes.setdefault(name, template)
        #: with modes: each channel's personality, once known (see recall)
        self._chosen: dict[ChannelKey, Template] = {}

    def __bool__(self) -> bool:
        """Whether there are modes (more than one personality)."""
        return bool(self.modes)

    def commands(self) -> list[Command]:
        """The commands users can send: with modes, /mode then every mode's own (each once)."""
        if not self.modes:
            return list(self.default.settings.get("commands", ()))
        names = ", ".join(self.modes)
        found = [Command("mode", f"Switch personality: {names}"[:100], choices=tuple(self.modes))]
        seen = {"mode"}
        for template in self.modes.values():
            for command in template.settings.get("commands", ()):
                if command.name not in seen:
                    seen.add(command.name)
                    found.append(command)
        return found

    def others(self) -> list[Template]:
        """The modes other than the default."""
        return [t for t in self.modes.values() if t is not self.default]

    def of(self, key: ChannelKey) -> Template:
        """The personality the channel talks to (its /mode, else the default)."""
        return self._chosen.get(key, self.default) if self.modes else self.default

    def choose(self, key: ChannelKey, template: Template) -> None:
        self._chosen[key] = template

    def forget(self, key: ChannelKey) -> None:
        """Read the channel's personality from the store again (another worker had it)."""
        self._chosen.pop(key, None)

    def known(self, key: ChannelKey) -> bool:
        return key in self._chosen

    def by_ref(self, ref: str) -> Template:
        """The template of a stored conversation (the default if no mode has that ref)."""
        for mode in self.modes.values():
            if mode.ref == ref:
                return mode
        return self.default

    def declares(self, key: ChannelKey, name: str) -> bool:
        """Whether the channel's personality declares the command ``name`` itself."""
        return any(c.name == name for c in self.of(key).settings.get("commands", ()))

    async def recall(
        self,
        key: ChannelKey,
        conversations: Callable[[ChannelKey], Awaitable[list[ConversationRecord]]],
    ) -> None:
        """Find the channel's mode after a restart: that of its newest conversation."""
        if not self.modes or key in self._chosen:
            return
        records = await conversations(key)
        refs = {mode.ref: mode for mode in self.modes.values()}
        newest = next((r for r in reversed(records) if r.template_ref in refs), None)
        self._chosen[key] = refs[newest.template_ref] if newest is not None else self.default

    def listing(self, key: ChannelKey, text: str) -> str:
        """``text`` (the ``modes`` notice) filled with the names, the current one marked."""
        current = self.of(key)
        names = [f"{n} (current)" if t is current else n for n, t in self.modes.items()]
        return text.format(modes=", ".join(names))
