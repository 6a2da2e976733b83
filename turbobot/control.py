"""What the built-in commands do: ``/start`` (``/new``), ``/reset``, ``/help``, ``/retry``,
``/cancel``, ``/usage``, ``/mode``, and the handlers bots register.

Parsing and the registry are in turbobot.commands; a command is never input to the
template unless declared ``Command(input=True)`` (docs/architecture.md,
"Conversations"). The effects go through the conversation driver
(turbobot.conversation), so each is one step, committed before its reply is sent.
"""

from __future__ import annotations

import logging

from turbobot.chat import ChannelKey, IncomingMessage
from turbobot.commands import CommandCall, CommandRegistry
from turbobot.conversation import Conversations, InfrastructureError
from turbobot.limits import TokenBudget, duration
from turbobot.modes import Personalities
from turbobot.settings import RuntimeSettings
from turbobot.store import StepWrite, utc_day

__all__ = ["GENERATING", "BuiltinCommands"]

_log = logging.getLogger("turbobot.runtime")

#: built-in commands that may call the model (refused to a user over the token budget)
GENERATING = frozenset({"start", "retry", "mode"})
#: built-in commands that end or rewrite the conversation: in a shared chat, only its
#: starter or an admin may send them (``/mode`` too, when it switches)
ENDING = frozenset({"start", "reset", "retry"})


class BuiltinCommands:
    """Carries out commands for a runtime."""

    def __init__(
        self,
        registry: CommandRegistry,
        conversations: Conversations,
        personalities: Personalities,
        settings: RuntimeSettings,
        budget: TokenBudget | None = None,
    ) -> None:
        self.registry = registry
        self._budget = budget
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
        built_in = command is None or command.handler is None
        if built_in and name in ENDING and not await self._may_end(key, message):
            await say(key, notices.not_yours, consumed=message)
            return
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
        elif name == "usage":
            await say(key, await self._usage(message), consumed=message)
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

    async def _may_end(self, key: ChannelKey, message: IncomingMessage) -> bool:
        """Whoever started the conversation may end or rewrite it, and so may admins (the
        operator's ``Limits.admins``, the chat's own admins as the platform says)."""
        live = await self._conversations.load(key)
        if live is None:
            return True
        if live.app is not None:
            starter = live.app.context.author_id
        else:
            starter = str(live.context.get("author_id") or "")
        user = message.author_id
        if not starter or user == starter:
            return True
        if self._settings.limits.is_admin(key.platform, user):
            return True
        try:
            return await self._conversations.sender.is_admin(key, user)
        except Exception as exc:  # the platform could not say: not an admin, this time
            _log.warning("channel %s: could not learn whether %s is an admin: %s", key, user, exc)
            return False

    async def _usage(self, message: IncomingMessage) -> str:
        """``/usage``: the sender's tokens today and over the last 7 days."""
        conversations, notices = self._conversations, self._settings.notices
        platform, user = message.key.platform, message.author_id
        now = conversations.clock()
        today = utc_day(now)
        try:
            days = await conversations.store.usage(platform, user, utc_day(now - 6 * 86_400))
        except Exception as exc:
            raise InfrastructureError(f"reading the usage of {user} failed") from exc
        mine = [d for d in days if d.day == today]
        used = sum(d.tokens for d in mine)
        text = notices.usage.format(
            today=used,
            prompt=sum(d.prompt_tokens for d in mine),
            completion=sum(d.completion_tokens for d in mine),
            calls=sum(d.generations for d in mine),
            week=sum(d.tokens for d in days),
        )
        budget = self._budget
        if budget is not None:
            # (the budget may know of steps written but not committed yet)
            spent = max(await budget.spent(platform, user), used)
            text += "\n" + notices.usage_budget.format(
                limit=budget.per_day,
                left=max(0, budget.per_day - spent),
                renews=duration(budget.renews_in()),
            )
        return text

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
        if not await self._may_end(key, message):
            await conversations.send_standalone(key, notices.not_yours, consumed=message)
            return
        await conversations.end(key, "restarted", None)
        personalities.choose(key, target)
        fresh = conversations.start(key, message)
        conversations.note_user(fresh, message)
        # committed with the new conversation: its template ref is the stored choice
        await conversations.say(key, fresh, notices.mode_switched.format(mode=name))
        await conversations.advance(key, fresh, None)
