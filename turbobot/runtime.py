"""The runtime: one conversation per channel, driven by incoming messages.

Data flow of one message: an adapter calls :meth:`Runtime.receive` → the message is
committed to the channel's inbox (a redelivered id is ignored) → the channel's worker
takes its inbox in arrival order and resumes (or starts, or rebuilds by replay) the
channel's conversation → outputs go to the outbox and out through the sender.
Channels run concurrently; within one channel, one step at a time.

Rules (DESIGN §3): a message in a channel with no conversation starts the template;
that first message is the first input only if the first ``GetUserInput`` asks no
question. ``/start`` (``/new``) always starts afresh and is never input; ``/reset``
ends the conversation and clears its memory; ``/help`` describes the bot. A message
that arrives while the bot is busy waits its turn and answers the next
``GetUserInput``. When a template ends, the next message starts a new conversation.
If a generation fails after the LLM layer's retries and the template does not catch
the error, the user gets an apology and the generation is retried when the channel's
next message arrives; that message then waits its turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

from turbobot.chat import ChannelKey, IncomingMessage, TemplateContext
from turbobot.exceptions import LLMError, ReplayDivergedError
from turbobot.llm.base import LLM
from turbobot.signals import GetUserInput, Result, UserInput
from turbobot.store import BaseStore, ConversationRecord, ConversationStatus, InMemoryStore
from turbobot.template import App, AssistantStream, Template

__all__ = ["BaseSender", "Notices", "Runtime", "RuntimeSettings", "parse_command"]

_log = logging.getLogger(__name__)


class BaseSender(ABC):
    """How the runtime talks back: an adapter implements this for its platform."""

    @abstractmethod
    async def send(self, key: ChannelKey, text: str) -> str | None:
        """Send ``text`` to the channel; return the platform's message id if any."""

    async def send_stream(self, key: ChannelKey, stream: AssistantStream) -> str | None:
        """Show a reply while it is generated. The default waits and sends it whole."""
        async for _ in stream:
            pass
        return await self.send(key, stream.text) if stream.text else None

    async def typing(self, key: ChannelKey) -> None:  # noqa: B027 - optional hook
        """Show that the bot is working (called every few seconds while it is)."""


@dataclass(frozen=True, slots=True)
class Notices:
    """Texts the runtime itself sends."""

    apology: str = "Sorry, I could not answer just now. Send another message and I will try again."
    failure: str = (
        "Sorry, something went wrong and this conversation had to end. "
        "Send a message to start again."
    )
    reset: str = "Conversation reset. Send a message to start again."
    started: str = "New conversation started."
    diverged: str = (
        "The bot was updated and could not resume our conversation, so it started a new one."
    )
    help: str = (
        "Commands: /start (or /new) starts a new conversation, /reset ends this one "
        "and forgets it, /help shows this."
    )


@dataclass(frozen=True, slots=True)
class RuntimeSettings:
    """How the runtime behaves; built by the entry point, never read from the environment."""

    bot_username: str | None = None
    notices: Notices = field(default_factory=Notices)
    typing_interval: float = 4.0


def parse_command(text: str, bot_username: str | None = None) -> str | None:
    """The command in ``text`` (``"start"`` for ``/start@bot args``), else ``None``.

    A command addressed to another bot (``/start@otherbot``) is not ours: ``None``.
    """
    if not text.startswith("/") or len(text) < 2:
        return None
    word = text[1:].split(maxsplit=1)[0] if text[1:].strip() else ""
    name, _, target = word.partition("@")
    if target and bot_username and target.lower() != bot_username.lower().lstrip("@"):
        return None
    return name.lower() or None


@dataclass(slots=True)
class _Live:
    record: ConversationRecord
    app: App | None
    saved: int = 0


class Runtime:
    """Runs a template in every channel that talks to the bot.

    Args:
        template: the bot personality.
        llm: the language model every conversation uses.
        sender: how replies leave (the adapter).
        store: where inboxes and conversations live (in RAM by default).
        settings: runtime behaviour.
        clock: the time source for deadlines (epoch seconds).
    """

    def __init__(
        self,
        template: Template,
        *,
        llm: LLM,
        sender: BaseSender,
        store: BaseStore | None = None,
        settings: RuntimeSettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.template = template
        self.llm = llm
        self.sender = sender
        self.store = store or InMemoryStore()
        self.settings = settings or RuntimeSettings()
        self.clock = clock
        self._live: dict[ChannelKey, _Live] = {}
        self._workers: dict[ChannelKey, asyncio.Task[None]] = {}
        self._dirty: set[ChannelKey] = set()
        self._timers: dict[ChannelKey, asyncio.TimerHandle] = {}
        self._closed = False

    # -- public API -----------------------------------------------------------------

    async def receive(self, message: IncomingMessage) -> bool:
        """Commit an incoming message and schedule its channel. ``False`` if ignored."""
        if self._closed:
            raise RuntimeError("the runtime is closed")
        if message.is_bot:
            return False
        if not await self.store.add_incoming(message):
            _log.debug("ignoring redelivered message %s in %s", message.message_id, message.key)
            return False
        self._wake(message.key)
        return True

    async def join(self) -> None:
        """Wait until every channel has handled everything it can handle now."""
        while self._workers:
            await asyncio.gather(*list(self._workers.values()), return_exceptions=True)

    async def aclose(self) -> None:
        """Finish in-flight steps, then close every live conversation (runs ``finally``)."""
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        await self.join()
        for live in self._live.values():
            if live.app is not None:
                await live.app.aclose()
        self._live.clear()

    async def __aenter__(self) -> Runtime:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def waiting(self, key: ChannelKey) -> GetUserInput | None:
        """What the channel's conversation waits for, if it waits."""
        live = self._live.get(key)
        return live.app.waiting if live and live.app else None

    # -- scheduling -------------------------------------------------------------------

    def _wake(self, key: ChannelKey) -> None:
        self._dirty.add(key)
        if key not in self._workers:
            self._workers[key] = asyncio.create_task(self._work(key), name=f"turbobot:{key}")

    async def _work(self, key: ChannelKey) -> None:
        try:
            while key in self._dirty:
                self._dirty.discard(key)
                try:
                    await self._drain(key)
                except Exception:
                    _log.exception("channel %s: unexpected error; its inbox is kept", key)
                    return
        finally:
            # No await between the last dirty check and this: a message committed
            # meanwhile either set dirty before the check or starts a new worker after.
            del self._workers[key]

    async def _drain(self, key: ChannelKey) -> None:
        for message in await self.store.pending(key):
            if not await self._handle(key, message):
                return  # a failed retry: keep this message and the rest for next time
            await self.store.consume(key, message.message_id)
        live = self._live.get(key)
        if live is not None and live.app is not None and live.app.waiting is not None:
            deadline = live.record.deadline
            if deadline is not None and self.clock() >= deadline:
                await self._advance(key, live, UserInput.timeout())

    def _arm_timer(self, key: ChannelKey, deadline: float | None) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        if deadline is None or self._closed:
            return
        delay = max(0.0, deadline - self.clock())
        self._timers[key] = asyncio.get_running_loop().call_later(delay, self._on_timer, key)

    def _on_timer(self, key: ChannelKey) -> None:
        self._timers.pop(key, None)
        if not self._closed:
            self._wake(key)

    # -- one message ------------------------------------------------------------------

    async def _handle(self, key: ChannelKey, message: IncomingMessage) -> bool:
        """Handle one inbox message; ``False`` leaves it in the inbox."""
        command = parse_command(message.text, self.settings.bot_username)
        notices = self.settings.notices
        if command in ("start", "new"):
            await self._end(key, "restarted")
            live = await self._start(key, message)
            await self.store.add_transcript(live.record, "user", message.text)
            sent = await self._advance(key, live, None)
            if not sent and live.record.active:
                await self._say(key, live.record, notices.started)
            return True
        if command == "reset":
            current = await self._load(key)
            if current is not None and current.app is not None:
                await current.app.memory.clear()
            await self._end(key, "reset")
            await self._send(key, notices.reset)
            return True
        if command == "help":
            await self._send(key, self._help())
            return True

        loaded = await self._load(key)
        if loaded is None:
            await self._begin(key, message)
            return True
        live = loaded
        if live.app is None or live.record.broken:
            # Rebuilt by replay (after a failed generation, the replay retries it).
            if await self._rehydrate(key, live, message):
                return True
            if live.record.broken:
                return False
        if live.app is not None and live.app.waiting is not None:
            await self.store.add_transcript(live.record, "user", message.text)
            await self._advance(key, live, message)
        elif live.record.active:
            # Not waiting and not broken cannot happen outside a bug; keep the message.
            _log.error("channel %s: conversation %s is not waiting", key, live.record.id)
            return False
        return True

    def _help(self) -> str:
        doc = (self.template.fn.__doc__ or "").strip().split("\n\n", 1)[0].strip()
        return f"{doc}\n\n{self.settings.notices.help}" if doc else self.settings.notices.help

    async def _load(self, key: ChannelKey) -> _Live | None:
        live = self._live.get(key)
        if live is not None and live.record.active:
            return live
        record = await self.store.active_conversation(key)
        if record is None:
            self._live.pop(key, None)
            return None
        live = _Live(record, None, len(record.journal))
        self._live[key] = live
        return live

    async def _start(self, key: ChannelKey, trigger: IncomingMessage) -> _Live:
        context = TemplateContext(
            platform=key.platform,
            key=key,
            author_id=trigger.author_id,
            author_name=trigger.author_name,
            trigger=trigger,
        )
        record = await self.store.create_conversation(key, self.template.ref, context.to_dict())
        app = self.template().bind(llm=self.llm, context=context)
        live = _Live(record, app)
        self._live[key] = live
        return live

    async def _begin(self, key: ChannelKey, message: IncomingMessage) -> None:
        """Start a conversation woken by ``message`` (the first-message rule)."""
        live = await self._start(key, message)
        await self.store.add_transcript(live.record, "user", message.text)
        await self._advance(key, live, None)
        app = live.app
        if app is not None and app.waiting is not None and app.waiting.message is None:
            # A chat-style template asked nothing: the message is its first input.
            await self._advance(key, live, message)

    async def _end(self, key: ChannelKey, status: ConversationStatus) -> None:
        live = await self._load(key)
        self._arm_timer(key, None)
        if live is None:
            return
        if live.app is not None:
            await live.app.aclose()
        live.record.status = status
        live.record.deadline = None
        await self._save(live)
        self._live.pop(key, None)

    async def _rehydrate(self, key: ChannelKey, live: _Live, message: IncomingMessage) -> bool:
        """Rebuild the conversation's app from its journal.

        Returns ``True`` when ``message`` was used up: the replay diverged, so by the
        documented policy the old conversation is kept as it was, the user is told,
        and ``message`` starts a new conversation.
        """
        record = live.record
        context = TemplateContext.from_dict(record.context)
        app = self.template().bind(
            llm=self.llm, context=context, replay=list(record.journal), replay_until=record.yields
        )
        record.journal = []
        live.app, live.saved = app, 0
        record.broken = False
        await self._advance(key, live, None)
        if record.status != "diverged":
            return False
        await self._send(key, self.settings.notices.diverged)
        await self._begin(key, message)
        return True

    async def _advance(
        self, key: ChannelKey, live: _Live, value: IncomingMessage | UserInput | None
    ) -> bool:
        """Resume the app with ``value`` and deliver outputs until it waits or ends.

        Returns whether anything was sent.
        """
        app = live.app
        assert app is not None
        record = live.record
        sent = False
        previous_deadline = record.deadline
        record.status, record.deadline = "running", None
        self._arm_timer(key, None)
        # Only senders that show typing get the (per-step) indicator task.
        typing: asyncio.Task[None] | None = None
        if type(self.sender).typing is not BaseSender.typing:
            typing = asyncio.create_task(self._keep_typing(key))
        try:
            output = await app.asend(value)
            while True:
                if isinstance(output, GetUserInput):
                    if output.message:
                        await self._say(key, record, output.message)
                        sent = True
                    record.status = "waiting"
                    if output is not app.waiting:
                        # A replayed prompt: its deadline was fixed when it was first asked.
                        record.deadline = previous_deadline
                    elif output.timeout is not None:
                        record.deadline = self.clock() + output.timeout
                    break
                if isinstance(output, AssistantStream):
                    if typing is not None:
                        typing.cancel()
                    platform_id = await self.sender.send_stream(key, output)
                    text = output.text
                    if text:
                        outgoing = await self.store.add_outgoing(key, text)
                        await self.store.mark_sent(outgoing, platform_id)
                        await self.store.add_transcript(record, "assistant", text)
                        sent = True
                elif isinstance(output, Result) or output.forward:
                    await self._say(key, record, output.content)
                    sent = True
                output = await app.asend(None)
        except StopAsyncIteration:
            record.status = "finished"
        except LLMError as exc:
            _log.warning("channel %s: generation failed (%s); will retry", key, type(exc).__name__)
            record.broken = True
            await self._say(key, record, self.settings.notices.apology)
            sent = True
        except ReplayDivergedError as exc:
            _log.warning("channel %s: %s", key, exc)
            record.status = "diverged"
            live.app = None
        except Exception:
            _log.exception("channel %s: template %s failed", key, self.template.ref)
            record.status = "failed"
            live.app = None
            await self._say(key, record, self.settings.notices.failure)
            sent = True
        finally:
            if typing is not None:
                typing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await typing
        await self._save(live)
        if record.broken:
            live.app = None  # the generator died with the error; replay rebuilds it
        if not record.active:
            self._live.pop(key, None)
        self._arm_timer(key, record.deadline if record.status == "waiting" else None)
        return sent

    async def _save(self, live: _Live) -> None:
        record = live.record
        if live.app is not None:
            new = live.app.journal[live.saved :]
            record.journal.extend(new)
            live.saved = len(live.app.journal)
            record.yields = live.app.yields
        else:
            new = []
        await self.store.save_conversation(record, new)

    async def _keep_typing(self, key: ChannelKey) -> None:
        interval = self.settings.typing_interval
        await asyncio.sleep(0.5)  # quick answers need no indicator
        while True:
            try:
                await self.sender.typing(key)
            except Exception as exc:  # a failed indicator must never stop a reply
                _log.debug("typing indicator failed in %s: %s", key, exc)
            await asyncio.sleep(interval)

    async def _say(self, key: ChannelKey, record: ConversationRecord, text: str) -> None:
        await self.store.add_transcript(record, "assistant", text)
        await self._send(key, text)

    async def _send(self, key: ChannelKey, text: str) -> None:
        outgoing = await self.store.add_outgoing(key, text)
        platform_id = await self.sender.send(key, text)
        await self.store.mark_sent(outgoing, platform_id)
