"""Commands: one parser and one registry for every platform.

The runtime handles the built-in commands (``/start``, ``/new``, ``/reset``,
``/retry``, ``/cancel``, ``/usage``, ``/help``); a bot adds its own with ``@turbo(commands=[...])``
(see :class:`Command`). Adapters read :meth:`CommandRegistry.menu` to build their
platform's command menu. See docs/architecture.md, "Conversations".
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass

from turbobot.chat import IncomingMessage

__all__ = [
    "BUILT_IN",
    "Command",
    "CommandCall",
    "CommandRegistry",
    "parse_command",
    "split_command",
]

#: a command as Telegram defines one (Discord's text commands follow it): a slash, then
#: 1-32 letters, digits or underscores, optionally @bot, then the end or a space
_COMMAND = re.compile(r"/([A-Za-z0-9_]{1,32})(?:@([A-Za-z0-9_]{1,64}))?(?=\s|$)")


def split_command(text: str, bot_username: str | None = None) -> tuple[str, str] | None:
    """``(name, arguments)`` of the command ``text`` starts with, else ``None``.

    Only a command word right after the slash counts: ``/ start`` and ``/path/x`` are
    text. A command addressed to another bot (``/start@otherbot``) is not ours.
    """
    if not text.startswith("/"):
        return None
    match = _COMMAND.match(text)
    if match is None:
        return None
    name, target = match.groups()
    if target and bot_username and target.lower() != bot_username.lower().lstrip("@"):
        return None
    return name.lower(), text[match.end() :].strip()


def parse_command(text: str, bot_username: str | None = None) -> str | None:
    """The command in ``text`` (``"start"`` for ``/start@bot args``), else ``None``."""
    found = split_command(text, bot_username)
    return found[0] if found else None


@dataclass(frozen=True, slots=True)
class CommandCall:
    """A command as a user sent it."""

    name: str
    #: the text after the command word
    args: str
    message: IncomingMessage


#: a bot's command handler: its reply (``None``: no reply)
CommandHandler = Callable[[CommandCall], Awaitable[str | None]]


@dataclass(frozen=True, slots=True)
class Command:
    """A command users can send.

    ``handler`` answers it; a built-in command has none (the runtime handles it).
    A bot's command with a handler answers outside the conversation: it is not input
    to the template, and the template's state is unchanged (``input=True`` instead
    sends it to the template as input)::

        async def ping(call: CommandCall) -> str:
            return f"pong {call.args}"

        @turbo(commands=[Command("ping", "Check that the bot is up", ping)])
        async def bot(): ...
    """

    name: str
    description: str
    handler: CommandHandler | None = None
    aliases: tuple[str, ...] = ()
    #: a command the template itself answers: listed in the platforms' menus, and sent
    #: to the template as input (it reads the text, ``/summarize 5``), not handled by
    #: the runtime
    input: bool = False
    #: the values its argument may take, offered as choices where the platform can
    #: (Discord's slash command options)
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.input and self.handler is not None:
            raise ValueError(f"command /{self.name}: give a handler or input=True, not both")
        for word in (self.name, *self.aliases):
            if not re.fullmatch(r"[a-z0-9_]{1,32}", word):
                raise ValueError(
                    f"command name {word!r}: use 1-32 lowercase letters, digits or underscores"
                )


#: the commands the runtime itself handles, in menu order
BUILT_IN = (
    Command("start", "Start a new conversation", aliases=("new",)),
    Command("reset", "End this conversation and forget it"),
    Command("retry", "Answer your last message again"),
    Command("cancel", "Stop the answer being written"),
    Command("usage", "Your token use today"),
    Command("help", "What this bot does"),
)


class CommandRegistry:
    """The commands a runtime understands: the built-in ones, then a bot's own."""

    def __init__(self, extra: Iterable[Command] = ()) -> None:
        self._commands: dict[str, Command] = {}
        self._names: dict[str, Command] = {}
        for command in (*BUILT_IN, *extra):
            self.add(command)

    def add(self, command: Command) -> None:
        """Add ``command``; a bot's command may replace a built-in one of the same name."""
        previous = self._commands.get(command.name)
        if previous is not None and previous.handler is not None:
            raise ValueError(f"the command /{command.name} is defined twice")
        if previous is not None:
            for alias in previous.aliases:
                self._names.pop(alias, None)
        self._commands[command.name] = command
        for word in (command.name, *command.aliases):
            self._names[word] = command

    def get(self, name: str) -> Command | None:
        """The command called ``name`` (or with that alias)."""
        return self._names.get(name)

    def parse(
        self, message: IncomingMessage, bot_username: str | None = None
    ) -> CommandCall | None:
        """The command ``message`` sends (known or not), else ``None``.

        The call's ``name`` is the command's own name when ``message`` used an alias.
        """
        found = split_command(message.text, bot_username)
        if found is None:
            return None
        word, args = found
        command = self._names.get(word)
        return CommandCall(command.name if command else word, args, message)

    def menu(self) -> list[tuple[str, str]]:
        """``(name, description)`` of every command, for a platform's command menu."""
        return [(c.name, c.description) for c in self]

    def help(self) -> str:
        """One line per command, for ``/help``."""
        return "\n".join(f"/{c.name} - {c.description}" for c in self)

    def __iter__(self) -> Iterator[Command]:
        return iter(self._commands.values())

    def __contains__(self, name: object) -> bool:
        return name in self._names
