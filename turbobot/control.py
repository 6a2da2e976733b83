"""What the built-in commands do: ``/start`` (``/new``), ``/reset``, ``/help``, ``/retry``,
``/cancel``, ``/mode``, and the handlers bots register.

Parsing and the registry are in turbobot.commands; a command is never input to the
template unless declared ``Command(input=True)`` (docs/architecture.md,
"Conversations"). The effects go through the conversation driver
(turbobot.conversation), so each is one step, committed before its reply is sent.
"""

from __future__ import annotations

from turbobot.chat import ChannelKey, IncomingMessage
from turbobot.commands import CommandCall, CommandRegistry
from turbobot.conversation import Conversations
from turbobot.modes import Personalities
from turbobot.settings import RuntimeSettings
from turbobot.store import StepWrite

__all__ = ["BuiltinCommands"]


class BuiltinCommands:
    """Carries out commands for a runtime."""

    def __init__(
        self,
        registry: CommandRegistry,
        conversations: Conversations,
        personalities: Personalities,
        settings: RuntimeSettings,
    ) -> None:
        self.registry = registry
        self._conversations = conversations
        self._personalities = personalities
        self._settings = settings
        #: channels whose generation a /cancel stopped (answered when /cancel's turn comes)
        self._cancelled: set[ChannelKey] = set()

    def parse(self, message: IncomingMessage) -> CommandCall | None:
        """The command ``message`` is for the runtime (not the template), if any."""
        call = self.registry.parse(message, self._settings.bot_username)
        if call is None or self.is_input(call):
            return None
        return call

    def is_input(self, call: CommandCall) -> bool:
        """A command the template answers (``Command(input=True)``): it is input.

        With modes, only for the mode that declares it (another mode's is unknown here).
        """
        command = self.registry.get(call.name)
        if command is None or not command.input:
            return False
        if not self._personalities:
            return True
        return self._personalities.declares(call.message.key, command.name)

    def cancel_if_asked(self, message: IncomingMessage) -> None:
        """``/cancel`` acts at once, ahead of its turn: it stops the generation in progress.

        The message itself is answered in its turn (see ``run``).
        """
        call = self.registry.parse(message, self._settings.bot_username)
        if call is None or call.name != "cancel":
            return
        live = self._conversations.live.get(message.key)
        if live is not None and live.app is not None and live.app.cancel_generation():
            self._cancelled.add(message.key)

    async def run(self, key: ChannelKey, call: CommandCall) -> None:
        """Carry out ``call``; its message is used by it (never input to the template)."""
        conversations, notices = self._conversations, self._settings.notices
        message, name = call.message, call.name
        say = conversations.send_standalone
        command = self.registry.get(name)
        if command is not None and command.handler is not None:
            reply = await command.handler(call)
            if reply:
                await say(key, reply, consumed=message)
            else:
                await conversations.write(StepWrite(consumed=[(key, message.message_id)]))
        elif name == "start":
            await conversations.end(key, "restarted", None)
            fresh = conversations.start(key, message)
            conversations.note_user(fresh, message)
            if not await conversations.advance(key, fresh, None) and fresh.active:
                await conversations.say(key, fresh, notices.started)
                await conversations.commit(fresh)
        elif name == "reset":
            current = conversations.live.get(key)
            if current is not None and current.app is not None:
                await current.app.memory.clear()
            noted = await conversations.end(key, "reset", message)
            await say(key, notices.reset, consumed=None if noted else message)
        elif name == "mode" and self._personalities:
            await self._switch_mode(key, call)
        elif name == "help":
            await say(key, self._help(key), consumed=message)
        elif name == "retry":
            live = await conversations.load(key)
            if live is None or not await conversations.rewind(key, live, message):
                await say(key, notices.retry_nothing, consumed=message)
        elif name == "cancel":
            text = notices.cancelled if key in self._cancelled else notices.cancel_nothing
            self._cancelled.discard(key)
            await say(key, text, consumed=message)
        else:
            await say(key, notices.unknown_command.format(command=name), consumed=message)

    def _help(self, key: ChannelKey) -> str:
        template = self._personalities.of(key)
        doc = (template.fn.__doc__ or "").strip().split("\n\n", 1)[0].strip()
        listing = f"{self._settings.notices.help}\n{self.registry.help()}"
        if self._personalities:
            listing += "\n\n" + self._personalities.listing(key, self._settings.notices.modes)
        return f"{doc}\n\n{listing}" if doc else listing

    async def _switch_mode(self, key: ChannelKey, call: CommandCall) -> None:
        """``/mode NAME``: end the conversation and start one with that personality."""
        conversations, personalities = self._conversations, self._personalities
        message, notices = call.message, self._settings.notices
        name = call.args.strip().lower()
        target = personalities.modes.get(name)
        if target is None:
            listing = personalities.listing(key, notices.modes)
            await conversations.send_standalone(key, listing, consumed=message)
            return
        if target is personalities.of(key) and conversations.has_conversation(key):
            text = notices.mode_same.format(mode=name)
            await conversations.send_standalone(key, text, consumed=message)
            return
        await conversations.end(key, "restarted", None)
        personalities.choose(key, target)
        fresh = conversations.start(key, message)
        conversations.note_user(fresh, message)
        # committed with the new conversation: its template ref is the stored choice
        await conversations.say(key, fresh, notices.mode_switched.format(mode=name))
        await conversations.advance(key, fresh, None)
