"""The runtime: one conversation per channel, driven by incoming messages.

Data flow of one message: an adapter calls :meth:`Runtime.receive` → the message is
committed to the channel's inbox (a redelivered id is ignored) → the channel's worker
takes its inbox in arrival order and resumes (or starts, or rebuilds by replay) the
channel's conversation → each reply is recorded in the outbox, committed together
with the input and the generation that produced it, and only then sent.
Channels run concurrently; within one channel, one step at a time.

Rules (docs/architecture.md, "Conversations"): a message in a channel with no
conversation starts the template; that first message is the first input only if the
first ``GetUserInput`` asks no question. ``/start`` (``/new``) always starts afresh
and is never input; ``/reset`` ends the conversation and clears its memory; ``/help``
describes the bot. A message that arrives while the bot is busy waits its turn and
answers the next ``GetUserInput``. When a template ends, the next message starts a
new conversation. If a generation fails after the LLM layer's retries and the
template does not catch the error, the user gets an apology and the generation is
retried when the channel's next message arrives; that message then waits its turn.

Durability (docs/architecture.md, "The step and commit protocol", "Replay and its
rules"): a conversation is rebuilt by replaying its journal whenever
it is not in RAM: after a restart, after eviction, after a failed generation. Idle
conversations are evicted (their generators closed, so ``finally`` blocks run) and
come back by replay on their next message or deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any

from turbobot.chat import ChannelKey, IncomingMessage, TemplateContext
from turbobot.clock import Clock, SystemClock, TimerHandle
from turbobot.codec import count, unwritable, writable_text
from turbobot.commands import Command, CommandCall, CommandRegistry, parse_command
from turbobot.delivery import FAILED, Outbox
from turbobot.exceptions import LLMError, LLMRequestError, ReplayDivergedError
from turbobot.journal import JournalEntry
from turbobot.llm.base import LLM
from turbobot.messages import Assistant
from turbobot.scheduler import ChannelWorkers
from turbobot.signals import GetUserInput, Result, UserInput
from turbobot.store import (
    BaseStore,
    ConversationRecord,
    ConversationStatus,
    InboxItem,
    IncomingBatchError,
    InMemoryStore,
    OutgoingRecord,
    StepWrite,
    TranscriptLine,
    new_id,
)
from turbobot.template import INTERRUPTED, App, AssistantStream, Template

__all__ = ["BaseSender", "Notices", "Runtime", "RuntimeSettings", "answering", "parse_command"]

_log = logging.getLogger(__name__)

#: The incoming message the step now running answers, for a sender to reply to it (or
#: to answer the slash command it was). ``None`` when no message asked for what is sent:
#: a timeout, a kept reply sent again later, a step finished after a restart.
answering: ContextVar[IncomingMessage | None] = ContextVar("turbobot_answering", default=None)


class _InfrastructureError(Exception):
    """The store failed under a step (raised from the cause): not the template's fault.

    The channel's conversation leaves RAM as it was last stored, its inbox is kept,
    and the channel is tried again later (see ``Runtime._work_once``).
    """


def _refusal(exc: LLMError) -> str | None:
    """Why the model refused ``exc``'s request for good (``None``: worth retrying).

    A 4xx other than 408 (timeout), 409 and 429 (rate limit) will fail the same way
    every time: a bad request, a prompt too large, a key without access.
    """
    if not isinstance(exc, LLMRequestError) or not exc.permanent:
        return None
    status = exc.status_code
    reason = f"HTTP {status}" if status is not None else "request rejected"
    return f"{reason}: {exc.hint}" if exc.hint else reason


#: a live conversation's journal: the entries are in the store (shared, never changed)
_NO_JOURNAL: list[JournalEntry] = []
#: stands for a context already stored with its conversation (one shared empty dict,
#: never changed: a new one per conversation would cost 64 bytes each)
_STORED_CONTEXT: dict[str, Any] = {}


class BaseSender(ABC):
    """How the runtime talks back: an adapter implements this for its platform."""

    @abstractmethod
    async def send(self, key: ChannelKey, text: str) -> str | None:
        """Send ``text`` to the channel; return the platform's message id if any."""

    async def send_stream(self, key: ChannelKey, stream: AssistantStream) -> str | None:
        """Show a reply while it is generated. The default waits and sends it whole.

        If the generation breaks off (``stream.interrupted``), a sender that showed
        part of it marks that part as interrupted (ending it with
        :data:`~turbobot.template.INTERRUPTED`) and returns its id, or takes it away
        and returns ``None``; the runtime records in the transcript what it says was
        shown. The default shows nothing of it.
        """
        async for _ in stream:
            pass
        if stream.message is None or not stream.text:
            return None
        return await self.send(key, stream.text)

    async def typing(self, key: ChannelKey) -> None:  # noqa: B027 - optional hook
        """Show that the bot is working (called every few seconds while it is)."""

    async def handled(self, message: IncomingMessage) -> None:  # noqa: B027 - optional hook
        """``message`` is dealt with: every reply it asked for was sent (or kept).

        A sender that acknowledged it on the platform (a slash command's "thinking…")
        and has not answered it yet takes the acknowledgement away here.
        """


@dataclass(frozen=True, slots=True)
class Notices:
    """Texts the runtime itself sends."""

    apology: str = "Sorry, I could not answer just now. Send another message and I will try again."
    #: the model refused the request for good (``reason``: its status and hint)
    refused: str = (
        "Sorry, the language model refused to answer ({reason}), so this conversation "
        "had to end. Send a message to start a new one."
    )
    failure: str = (
        "Sorry, something went wrong and this conversation had to end. "
        "Send a message to start again."
    )
    reset: str = "Conversation reset. Send a message to start again."
    started: str = "New conversation started."
    diverged: str = (
        "The bot was updated and could not resume our conversation, so it started a new one."
    )
    #: the answer to a message with media but no text (the message is kept in the inbox)
    text_only: str = "I can only read text messages, sorry: please type your message."
    #: heads the list of commands in the answer to /help
    help: str = "Commands:"
    retry_nothing: str = "There is no answer to retry yet."
    cancelled: str = "Cancelled."
    cancel_nothing: str = "There is no answer being written to cancel."
    #: when a bot begins a conversation in a channel where another bot has one going
    other_bot: str = (
        "Note: another bot's conversation is open in this chat; it is kept as it is, and "
        "this bot starts its own."
    )
    unknown_command: str = "I do not know the command /{command}. /help lists the ones I know."
    #: the answer to /mode without a known name (``modes``: the names, the current marked)
    modes: str = "Modes: {modes}. Send /mode NAME to switch."
    mode_switched: str = "Switched to {mode}."
    mode_same: str = "You are already talking to {mode}."
    #: to the sender of a message the store could not commit (it was not read)
    not_stored: str = (
        "Sorry, I could not store your message, so I have not read it. Please send it again."
    )
    #: sent before the answer to a message cut to ``RuntimeSettings.max_input_chars``
    too_long: str = (
        "Your message was too long: I read only its first {limit:,} characters. "
        "Send the rest in another message if it matters."
    )
    #: sent before the answer to a message holding characters no store or model takes
    unreadable: str = (
        "Part of your message could not be read (invalid or control characters); "
        "I replaced it with \ufffd."
    )


@dataclass(frozen=True, slots=True)
class RuntimeSettings:
    """How the runtime behaves; built by the entry point, never read from the environment.

    Args:
        bot_username: commands addressed to another bot (``/start@other``) are plain text.
        idle_evict_seconds: a conversation idle this long leaves RAM (``None``: never).
        max_live: at most this many conversations stay in RAM; the least recently
            used idle ones are evicted first (``None``: no cap).
        max_input_chars: the longest text a template gets from one message; a longer
            message is cut (the user is told, the whole text is stored). A model's
            prompt always keeps the newest turn whole, so without a cap one huge message
            would make every later request too large.
        gc_threshold: opt-in: on start, raise the garbage collector's first threshold
            to this (default ``None``: a library leaves the process's setting alone;
            the ``turbobot`` command, which owns its process, sets 10,000). With
            Python's default, 700, the short-lived objects of steps waiting for a
            commit reach the oldest generation, and its collections walk every waiting
            conversation: ~20% of the time per message with 10,000 waiting. A higher
            setting is never lowered.
    """

    bot_username: str | None = None
    notices: Notices = field(default_factory=Notices)
    typing_interval: float = 4.0
    #: seconds before the first typing indicator (quick answers need none)
    typing_delay: float = 0.5
    #: seconds between tries of a channel whose reply could not be sent or whose step
    #: could not be stored; the last one repeats
    retry_delays: tuple[float, ...] = (1.0, 2.0, 5.0, 15.0, 30.0, 60.0)
    idle_evict_seconds: float | None = 600.0
    max_live: int | None = None
    max_input_chars: int = 16_000
    #: seconds ``Runtime.aclose`` lets steps in flight finish before abandoning them
    stop_grace: float = 10.0
    gc_threshold: int | None = None


@dataclass(slots=True)
class _Live(ConversationRecord):
    """A conversation the runtime holds: its record, and its app when in RAM.

    A record itself (a subclass, not a wrapper): one object less per conversation.
    One loaded from the store is made with ``_Live.copy_of(record, saved=...)``.
    """

    app: App | None = None
    #: journal entries already handed to the store
    saved: int = 0
    #: changes of the current step not yet handed to the store
    buffer: StepWrite | None = None
    #: the message that started the conversation, until it is known whether it is input
    wake: IncomingMessage | None = None
    used_at: float = 0.0


def _modes(default: Template, others: Sequence[Template]) -> dict[str, Template]:
    """Modes by name (the template function's), the default first; empty if none."""
    if not others:
        return {}
    modes: dict[str, Template] = {}
    for template in (default, *others):
        name = template.fn.__name__.lower()
        if name in modes and modes[name].ref != template.ref:
            raise ValueError(f"two modes are called {name!r}: rename one of their functions")
        modes.setdefault(name, template)
    return modes


def _mode_commands(modes: dict[str, Template]) -> list[Command]:
    """/mode, then every mode's own commands (each once)."""
    names = ", ".join(modes)
    commands = [Command("mode", f"Switch personality: {names}"[:100], choices=tuple(modes))]
    seen = {"mode"}
    for template in modes.values():
        for command in template.settings.get("commands", ()):
            if command.name not in seen:
                seen.add(command.name)
                commands.append(command)
    return commands


def _loop_call_later(delay: float, callback: Callable[..., Any], *args: Any) -> TimerHandle:
    return asyncio.get_running_loop().call_later(delay, callback, *args)


class Runtime:
    """Runs a template in every channel that talks to the bot.

    Use it as an async context manager: entering recovers what a previous run left
    (unconsumed messages, unsent replies, pending deadlines); leaving finishes
    in-flight steps and closes live conversations.

    Args:
        template: the bot personality.
        llm: the language model every conversation uses.
        sender: how replies leave (the adapter).
        store: where inboxes and conversations live (in RAM by default).
        settings: runtime behaviour.
        clock: epoch seconds, and the timers of deadlines and retries: a
            :class:`~turbobot.clock.Clock` (a test's :class:`~turbobot.clock.FakeClock`
            moves time without sleeping), or a plain function returning epoch
            seconds (timers then run on the event loop's time).
        commands: the commands users can send (default: the built-in ones and the
            template's ``commands`` setting).
    """

    def __init__(
        self,
        template: Template,
        *,
        llm: LLM,
        sender: BaseSender,
        store: BaseStore | None = None,
        settings: RuntimeSettings | None = None,
        clock: Clock | Callable[[], float] | None = None,
        commands: CommandRegistry | None = None,
        modes: Sequence[Template] = (),
    ) -> None:
        self.template = template
        #: the personalities users may switch to with /mode, by name (the default first);
        #: empty: one template, no /mode
        self.modes: dict[str, Template] = _modes(template, modes)
        self.commands = commands or CommandRegistry(
            _mode_commands(self.modes) if self.modes else template.settings.get("commands", ())
        )
        self.llm = llm
        self.sender = sender
        self.store = store or InMemoryStore()
        self.settings = settings or RuntimeSettings()
        self.clock: Callable[[], float] = clock or SystemClock()
        timers = getattr(self.clock, "call_later", None)
        self._call_later: Callable[..., TimerHandle] = timers or _loop_call_later
        # insertion order = least recently used first (a plain dict is half an OrderedDict)
        self._live: dict[ChannelKey, _Live] = {}
        #: channels with an active conversation in the store but not in RAM (a live one
        #: is active by definition: keeping its key here too would cost ~50 bytes)
        self._stored_keys: set[ChannelKey] = set()
        #: with modes: each channel's personality, once known (see _mode_of)
        self._mode: dict[ChannelKey, Template] = {}
        self._queues: dict[ChannelKey, deque[InboxItem]] = {}
        self._workers = ChannelWorkers(self._work_once)
        self._timers: dict[ChannelKey, TimerHandle] = {}
        #: channels to try again after a store failure (see _retry_later)
        self._retry_timers: dict[ChannelKey, TimerHandle] = {}
        #: deadlines of waiting conversations that are not in RAM
        self._deadlines: dict[ChannelKey, float] = {}
        #: channels whose conversation stopped mid-step and must be replayed to go on
        self._resume: set[ChannelKey] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._others: set[ChannelKey] = set()
        self._outbox = Outbox(
            sender,
            self.store,
            retry_delays=self.settings.retry_delays,
            wake=self._wake_unless_closed,
            call_later=self._call_later,
        )
        #: channels whose conversation's last generation failed, to be retried by the next
        #: message: the highest inbox seq already tried (commands do not trigger a retry)
        self._stalled: dict[ChannelKey, int] = {}
        #: channels whose generation a /cancel stopped (answered when /cancel's turn comes)
        self._cancelled: set[ChannelKey] = set()
        #: channels whose RAM queue is rebuilt from the store's inbox before their next try
        self._reload: set[ChannelKey] = set()
        #: messages whose admission notice (cut, unreadable) was sent, until handled
        self._told: set[tuple[ChannelKey, str]] = set()
        #: channels to try again after an infrastructure error, and how often they failed
        self._retries: dict[ChannelKey, int] = {}
        self._used_clock = 0.0
        idle = self.settings.idle_evict_seconds
        self._used_tick = min(1.0, idle / 10) if idle else 1.0
        self._typing = type(sender).typing is not BaseSender.typing
        self._started = False
        self._start_lock = asyncio.Lock()
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Recover from the store: resend unsent replies, requeue messages, arm deadlines."""
        async with self._start_lock:  # receivers wait: recovery must not race new messages
            if not self._started:
                await self._recover()
                self._started = True

    async def _recover(self) -> None:
        threshold = self.settings.gc_threshold
        if threshold is not None:
            first, *older = gc.get_threshold()
            if first < threshold:
                gc.set_threshold(threshold, *older)
        recovery = await self.store.recovery(self.template.ref)
        self._stored_keys = set(recovery.active)
        #: channels where another template has a conversation going (told once, on begin)
        self._others = recovery.others
        for mode in self.modes.values():
            if mode is self.template:
                continue
            # conversations of the other modes: the default's recovery has the inbox
            # and the unsent replies already, only what is per template is taken here
            other = await self.store.recovery(mode.ref)
            for key in other.active:
                self._mode[key] = mode
            self._stored_keys |= other.active
            self._others &= other.others
            recovery.deadlines.extend(other.deadlines)
            recovery.running.extend(other.running)
        self._others -= self._stored_keys
        if recovery.unsent:
            _log.info("sending %d replies left unsent by the last run", len(recovery.unsent))
        for outgoing in recovery.unsent:
            # Sent by the channel's worker, not here: start-up never waits on the platform.
            self._outbox.keep(outgoing)
        for item in recovery.inbox:
            self._queues.setdefault(item.message.key, deque()).append(item)
        for key, deadline in recovery.deadlines:
            self._arm_timer(key, deadline)
        for key in recovery.running:
            # Stopped mid-step (say, during a streamed reply): finish that step now.
            self._resume.add(key)
            self._wake(key)
        for key in list(self._queues):
            self._wake(key)
        idle = self.settings.idle_evict_seconds
        if idle is not None:
            self._sweeper = asyncio.create_task(self._sweep(idle), name="turbobot:sweeper")

    async def aclose(self) -> None:
        """Finish in-flight steps, commit, then close live conversations (runs ``finally``).

        A step still running after ``RuntimeSettings.stop_grace`` seconds is abandoned
        exactly as a crash would leave it: nothing of it is committed, so the next
        start does it again (its input is still in the inbox, or its conversation is
        stopped mid-step). Waiting, not committing half a step, is what makes a stop
        (Ctrl-C, SIGTERM) lose no reply.
        """
        self._closed = True
        for timer in [*self._timers.values(), *self._retry_timers.values()]:
            timer.cancel()
        self._retry_timers.clear()
        self._timers.clear()
        self._outbox.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        workers = self._workers.tasks()
        if workers:
            _, pending = await asyncio.wait(
                [task for _, task in workers], timeout=self.settings.stop_grace
            )
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
            for key, task in workers:
                if task not in pending:
                    continue
                _log.warning(
                    "channel %s: a step was still running at stop; it is done again on the "
                    "next start",
                    key,
                )
                live = self._live.pop(key, None)  # not committed: left as the store has it
                if live is not None and live.app is not None:
                    live.buffer = None
                    try:
                        await live.app.aclose()
                    except Exception:
                        _log.exception("channel %s: template failed while being closed", key)
        for live in list(self._live.values()):
            await self._commit(live)
            if live.app is not None:
                await live.app.aclose()
        self._live.clear()
        await self.store.flush()

    async def __aenter__(self) -> Runtime:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- public API -------------------------------------------------------------------------

    async def receive(self, message: IncomingMessage) -> bool:
        """Commit an incoming message and schedule its channel. ``False`` if ignored."""
        return (await self.receive_many((message,)))[0]

    async def receive_many(self, messages: Sequence[IncomingMessage]) -> list[bool]:
        """Commit several messages at once (one page of updates), then schedule them.

        Messages of one channel are handled in the order given. Returns, for each
        message, ``False`` if it was ignored (from a bot, or a redelivery) or could not
        be stored: its sender is then told to send it again, and the others go on.
        """
        if self._closed:
            raise RuntimeError("the runtime is closed")
        if not self._started:
            await self.start()
        wanted = [self._admit(m) for m in messages if not m.is_bot]
        failure: IncomingBatchError | None = None
        try:
            committed = await self.store.add_incoming_many(wanted) if wanted else []
        except IncomingBatchError as exc:
            # Schedule what was committed; tell the senders of the rest (below).
            committed, failure = exc.seqs, exc
        seqs = iter(committed)
        admitted_messages = iter(wanted)
        accepted: list[bool] = []
        for message in messages:
            seq = admitted = None
            if not message.is_bot:
                seq, admitted = next(seqs), next(admitted_messages)
            accepted.append(seq is not None)
            if seq is None and not message.is_bot:
                _log.debug("ignoring redelivered message %s in %s", message.message_id, message.key)
            elif seq is not None and admitted is not None and not self._closed:
                # (once closed, the next start has it)
                self._cancel_if_asked(admitted)
                self._queues.setdefault(message.key, deque()).append(InboxItem(seq, admitted))
                self._wake(message.key)
        if failure is not None:
            await self._refused_incoming(wanted, failure)
        return accepted

    async def _refused_incoming(
        self, messages: Sequence[IncomingMessage], failure: IncomingBatchError
    ) -> None:
        """The store could not commit some messages: say so in the log and to their senders.

        The notice is sent, not stored: the store just refused to store.
        """
        cause = failure.__cause__ or failure
        for index in failure.failed:
            message = messages[index]
            _log.error(
                "channel %s: message %s could not be stored (%s: %s); its sender is asked "
                "to send it again",
                message.key,
                message.message_id,
                type(cause).__name__,
                cause,
            )
            notice = self.settings.notices.not_stored
            await self._outbox.attempt(message.key, self.sender.send(message.key, notice))

    def _cancel_if_asked(self, message: IncomingMessage) -> None:
        """``/cancel`` acts at once, ahead of its turn: it stops the generation in progress.

        The message itself is answered in its turn (see ``_command``).
        """
        call = self.commands.parse(message, self.settings.bot_username)
        if call is None or call.name != "cancel":
            return
        live = self._live.get(message.key)
        if live is not None and live.app is not None and live.app.cancel_generation():
            self._cancelled.add(message.key)

    def _admit(self, message: IncomingMessage) -> IncomingMessage:
        """The message as the template will see it: writable text, within the input cap.

        What had to change is kept whole in ``raw_text`` (stored losslessly, see
        turbobot.codec); the user is told when the message is handled.
        """
        timestamp = message.timestamp
        if type(timestamp) is not float or not math.isfinite(timestamp):
            try:
                timestamp = float(timestamp)
            except (TypeError, ValueError, OverflowError):
                timestamp = math.nan
            if not math.isfinite(timestamp):
                timestamp = self.clock()
            message = replace(message, timestamp=timestamp)
        text = message.text
        limit = self.settings.max_input_chars
        if len(text) <= limit and not unwritable(text):
            return message
        return replace(message, text=writable_text(text[:limit]), raw_text=text)

    def _admission_notice(self, message: IncomingMessage) -> str | None:
        raw = message.raw_text
        if raw is None:
            return None
        notices = self.settings.notices
        limit = self.settings.max_input_chars
        if len(raw) > limit:
            return notices.too_long.format(limit=limit)
        return notices.unreadable

    async def join(self) -> None:
        """Wait until every channel has handled everything it can handle now.

        Cancelling the wait does not cancel the channels' steps.
        """
        await self._workers.join()

    def has_conversation(self, key: ChannelKey) -> bool:
        """Whether the channel has an active conversation (in RAM or in the store)."""
        live = self._live.get(key)
        return live.active if live is not None else key in self._stored_keys

    def waiting(self, key: ChannelKey) -> GetUserInput | None:
        """What the channel's conversation waits for, if it is in RAM and waits."""
        live = self._live.get(key)
        return live.app.waiting if live and live.app else None

    @property
    def live_count(self) -> int:
        """Conversations currently held in RAM with a running generator."""
        return sum(1 for live in self._live.values() if live.app is not None)

    async def evict(self, key: ChannelKey) -> bool:
        """Move an idle conversation out of RAM (it comes back by replay). ``False`` if busy."""
        live = self._live.get(key)
        if live is None or self._workers.busy(key) or self._closed:
            return False
        # Detach before the first await: a message arriving meanwhile loads the
        # conversation from the store, where this commit is already queued.
        del self._live[key]
        if live.active:
            self._stored_keys.add(key)
        if live.status == "waiting" and live.deadline is not None:
            self._deadlines[key] = live.deadline
        await self._commit(live)
        if live.app is not None:
            try:
                await live.app.aclose()
            except Exception:
                _log.exception("channel %s: template failed while being closed", key)
        return True

    # -- scheduling ---------------------------------------------------------------------

    def _wake(self, key: ChannelKey) -> None:
        self._workers.wake(key)

    async def _work_once(self, key: ChannelKey) -> bool:
        """One run of the channel's worker (turbobot.scheduler); ``False`` stops it."""
        try:
            await self._drain(key)
        except _InfrastructureError as exc:
            await self._retry_later(key, exc.__cause__ or exc)
            return False
        except Exception:
            _log.exception("channel %s: unexpected error; its inbox is kept", key)
            return False
        self._retries.pop(key, None)
        # Still the channel's worker, so join() and aclose() wait for this.
        await self._enforce_cap()
        return True

    async def _retry_later(self, key: ChannelKey, cause: BaseException) -> None:
        """The store failed under a step: rebuild the channel from the store later."""
        failures = self._retries.get(key, 0)
        self._retries[key] = failures + 1
        delays = self.settings.retry_delays
        delay = delays[min(failures, len(delays) - 1)]
        _log.warning(
            "channel %s: the store failed during a step (%s: %s); the conversation is "
            "rebuilt from what is stored and tried again in %.1fs",
            key,
            type(cause).__name__,
            cause,
            delay,
        )
        self._reload.add(key)  # messages taken from the RAM queue may not have been used
        live = self._live.pop(key, None)
        if live is not None:
            self._stored_keys.add(key)
            if live.app is not None:
                app, live.app = live.app, None
                try:
                    await app.aclose()  # runs the template's finally blocks
                except Exception:
                    _log.exception("channel %s: template failed while being closed", key)
        if not self._closed:
            # its own timer: the channel's deadline timer (self._timers) stays armed
            previous = self._retry_timers.pop(key, None)
            if previous is not None:
                previous.cancel()
            self._retry_timers[key] = self._call_later(delay, self._retry_due, key)

    async def _drain(self, key: ChannelKey) -> None:
        if self._outbox.has_kept(key):
            await self._outbox.resend(key)
        if key in self._reload:
            # A step failed on the store: the inbox, not RAM, says what is still to do.
            try:
                pending = await self.store.inbox(key)
            except Exception as exc:
                raise _InfrastructureError(f"reading the inbox of {key} failed") from exc
            self._reload.discard(key)
            # What arrived during the read is in it, or (if committed after) still queued.
            last = pending[-1].seq if pending else 0
            later = [item for item in self._queues.get(key, ()) if item.seq > last]
            self._queues[key] = deque([*pending, *later])
        if key in self._resume:
            await self._resume_step(key)
            self._resume.discard(key)  # only once done: a failed try is tried again
        queue = self._queues.get(key)
        while queue:
            stalled = self._stalled.get(key)
            if stalled is not None:
                await self._commands_first(key, queue)
                if key in self._stalled and not any(i.seq > stalled for i in queue):
                    return  # nothing new to retry the failed generation with
            if not queue:
                break
            if not await self._handle(key, queue[0].message):
                # The retried generation failed again: keep this message and the rest.
                self._stalled[key] = queue[-1].seq
                return
            done = queue.popleft()
            self._stalled.pop(key, None)  # handled: no failed generation waits any more
            if self._told:
                self._told.discard((key, done.message.message_id))
        self._queues.pop(key, None)
        deadline = self._deadline_of(key)
        if deadline is not None and self.clock() < deadline:
            self._arm_timer(key, deadline)  # the timer ran early (or the clock stepped back)
        elif deadline is not None:
            live = await self._load(key)
            if (
                live is not None
                and await self._ensure_app(key, live, None)
                and live.app is not None
                and live.app.waiting is not None
            ):
                await self._advance(key, live, UserInput.timeout())

    async def _resume_step(self, key: ChannelKey) -> None:
        """Finish the step a conversation stopped in (the process died during it).

        If the message that started the conversation is still unused in the inbox,
        whether it is input was not decided yet (see ``_begin``): it is the waking
        message again, never the answer to a question asked after it.
        """
        live = await self._load(key)
        if live is None:
            return
        queue = self._queues.get(key)
        trigger = live.context.get("trigger") or {}
        wake = None
        if queue and queue[0].message.message_id == trigger.get("message_id"):
            wake = live.wake = queue.popleft().message
        if not await self._ensure_app(key, live, wake) or wake is None:
            return
        app = live.app
        if live.wake is wake and app is not None and app.waiting is not None:
            self._use_wake(live)  # it asked nothing: the waking message is its first input
            await self._advance(key, live, wake)

    async def _commands_first(self, key: ChannelKey, queue: deque[InboxItem]) -> None:
        """While a failed generation waits, handle the commands queued behind it.

        ``/start`` and ``/reset`` end the conversation: the messages that waited in
        front of them are noted in it (its transcript keeps them) and not answered.
        """
        index = 0
        while index < len(queue):
            message = queue[index].message
            call = self.commands.parse(message, self.settings.bot_username)
            if call is None or self._template_command(call):
                index += 1
                continue
            if call.name in ("start", "reset"):  # (the registry names /new start)
                live = await self._load(key)
                for _ in range(index):
                    waiting = queue.popleft().message
                    if live is not None:
                        self._note_user(live, waiting)
                    else:
                        await self._store_write(
                            StepWrite(consumed=[(waiting.key, waiting.message_id)])
                        )
                index = 0
            del queue[index]
            await self._handle(key, message)
            if key not in self._stalled:
                return

    def _deadline_of(self, key: ChannelKey) -> float | None:
        live = self._live.get(key)
        if live is not None:
            return live.deadline if live.status == "waiting" else None
        return self._deadlines.get(key)

    def _arm_timer(self, key: ChannelKey, deadline: float | None) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        if deadline is None or self._closed:
            self._deadlines.pop(key, None)
            return
        if key not in self._live:
            self._deadlines[key] = deadline
        delay = max(0.0, deadline - self.clock())
        self._timers[key] = self._call_later(delay, self._on_timer, key)

    def _retry_due(self, key: ChannelKey) -> None:
        self._retry_timers.pop(key, None)
        self._wake_unless_closed(key)

    def _wake_unless_closed(self, key: ChannelKey) -> None:
        if not self._closed:
            self._wake(key)

    def _on_timer(self, key: ChannelKey) -> None:
        self._timers.pop(key, None)
        if not self._closed:
            self._wake(key)

    async def _sweep(self, idle: float) -> None:
        while True:
            await asyncio.sleep(max(0.05, idle / 2))
            cutoff = time.monotonic() - idle
            for key in [k for k, live in self._live.items() if live.used_at < cutoff]:
                await self.evict(key)

    async def _enforce_cap(self) -> None:
        cap = self.settings.max_live
        if cap is None or self._closed:
            return
        for key in list(self._live):  # least recently used first
            if len(self._live) <= cap:
                break
            await self.evict(key)

    # -- one message --------------------------------------------------------------------

    async def _handle(self, key: ChannelKey, message: IncomingMessage) -> bool:
        """Handle one inbox message; ``False`` leaves it in the inbox."""
        token = answering.set(message)
        try:
            handled = await self._handle_message(key, message)
        finally:
            answering.reset(token)
        if handled:
            try:
                await self.sender.handled(message)
            except Exception as exc:  # the platform's bookkeeping never stops a channel
                _log.debug("channel %s: the sender's handled() failed: %s", key, exc)
        return handled

    async def _handle_message(self, key: ChannelKey, message: IncomingMessage) -> bool:
        await self._recall_mode(key)  # commands too: /start starts the channel's mode
        call = self.commands.parse(message, self.settings.bot_username)
        if call is not None and not self._template_command(call):
            await self._command(key, call)
            return True
        notices = self.settings.notices
        admission = self._admission_notice(message)
        if admission is not None and (key, message.message_id) not in self._told:
            # Once per message, even if a failed retry makes it wait and come back.
            self._told.add((key, message.message_id))
            await self._send_standalone(key, admission)
        if not message.text.strip():
            # Media without a caption: nothing for a template to read. The message
            # stays stored (in the inbox, with its attachments); it is answered, not used.
            await self._send_standalone(key, notices.text_only, consumed=message)
            return True
        loaded = await self._load(key)
        if loaded is None:
            await self._begin(key, message)
            return True
        live = loaded
        if not await self._ensure_app(key, live, message):
            return True  # the replay diverged; ``message`` started a new conversation
        if live.broken:
            return False  # the retried generation failed again; keep the message
        if not live.active:
            # The rebuild finished the conversation (it ended in a step that crashed
            # before being recorded as ended): this message starts the next one.
            await self._begin(key, message)
            return True
        if live.app is not None and live.app.waiting is not None:
            trigger = live.app.context.trigger
            if trigger is not None and trigger.message_id == message.message_id:
                # The waking message, stored with the conversation's first step, whose
                # use as input was not committed (the process stopped): use it now.
                self._buffer(live).consumed.append((key, message.message_id))
            else:
                self._note_user(live, message)
            await self._advance(key, live, message)
            return True
        _log.error("channel %s: conversation %s is not waiting", key, live.id)
        return False

    def _template_command(self, call: CommandCall) -> bool:
        """A command the template answers (``Command(input=True)``): it is input.

        With modes, only for the mode that declares it (another mode's is unknown here).
        """
        command = self.commands.get(call.name)
        if command is None or not command.input:
            return False
        if not self.modes:
            return True
        declared = self._template_of(call.message.key).settings.get("commands", ())
        return any(c.name == command.name for c in declared)

    async def _command(self, key: ChannelKey, call: CommandCall) -> None:
        """Handle a command (see turbobot.commands); it is never input to the template."""
        message, notices = call.message, self.settings.notices
        name = call.name
        command = self.commands.get(name)
        if command is not None and command.handler is not None:
            reply = await command.handler(call)
            if reply:
                await self._send_standalone(key, reply, consumed=message)
            else:
                await self._store_write(StepWrite(consumed=[(key, message.message_id)]))
        elif name == "start":
            await self._end(key, "restarted", None)
            fresh = self._start(key, message)
            self._note_user(fresh, message)
            if not await self._advance(key, fresh, None) and fresh.active:
                await self._say(key, fresh, notices.started)
                await self._commit(fresh)
        elif name == "reset":
            current = self._live.get(key)
            if current is not None and current.app is not None:
                await current.app.memory.clear()
            noted = await self._end(key, "reset", message)
            await self._send_standalone(key, notices.reset, consumed=None if noted else message)
        elif name == "mode" and self.modes:
            await self._switch_mode(key, call)
        elif name == "help":
            await self._send_standalone(key, self._help(key), consumed=message)
        elif name == "retry":
            await self._retry(key, message)
        elif name == "cancel":
            text = notices.cancelled if key in self._cancelled else notices.cancel_nothing
            self._cancelled.discard(key)
            await self._send_standalone(key, text, consumed=message)
        else:
            text = notices.unknown_command.format(command=name)
            await self._send_standalone(key, text, consumed=message)

    async def _retry(self, key: ChannelKey, message: IncomingMessage) -> None:
        """``/retry``: generate the conversation's last reply again.

        The journal is cut back to just before its last generation (nothing was put
        to the conversation after it), and the conversation is rebuilt from there:
        the generation runs again and its reply is sent; the one it replaces leaves
        the model's memory (the transcript keeps both).
        """
        live = await self._load(key)
        journal: list[JournalEntry] = []
        if live is not None and live.app is not None:
            # A live app keeps only what it has not handed to the store: read the store.
            await self._commit(live, wait=True)
            stored = await self.store.load_conversation(key, live.template_ref)
            journal = stored.journal if stored is not None else []
        elif live is not None:
            journal = live.journal
        cut = next(
            (i for i in range(len(journal) - 1, -1, -1) if journal[i].kind == "generate"), None
        )
        if (
            live is None
            or cut is None
            or any(e.kind in ("input", "timeout") for e in journal[cut:])
        ):
            await self._send_standalone(key, self.settings.notices.retry_nothing, consumed=message)
            return
        assert live is not None
        self._note_user(live, message)
        if live.app is not None:
            app, live.app = live.app, None
            context = app.context
            await app.aclose()
        else:
            context = TemplateContext.from_dict(live.context)
        kept = journal[:cut]
        step = self._buffer(live)
        step.rewind = True
        live.journal, live.saved = kept, cut
        live.status, live.deadline = "running", None
        await self._commit(live, wait=True)
        live.app = self._template_by_ref(live.template_ref)().bind(
            llm=self.llm,
            context=context,
            replay=list(kept),
            replay_until=0,  # everything after the cut is new: the generation's reply
            owned=True,
        )
        await self._advance(key, live, None)

    def _help(self, key: ChannelKey) -> str:
        template = self._template_of(key)
        doc = (template.fn.__doc__ or "").strip().split("\n\n", 1)[0].strip()
        listing = f"{self.settings.notices.help}\n{self.commands.help()}"
        if self.modes:
            listing += "\n\n" + self._mode_list(key)
        return f"{doc}\n\n{listing}" if doc else listing

    # -- modes (several personalities, /mode) -------------------------------------------

    def _template_of(self, key: ChannelKey) -> Template:
        """The personality the channel talks to (its /mode, else the default)."""
        return self._mode.get(key, self.template) if self.modes else self.template

    def _template_by_ref(self, ref: str) -> Template:
        for mode in self.modes.values():
            if mode.ref == ref:
                return mode
        return self.template

    async def _recall_mode(self, key: ChannelKey) -> None:
        """Find the channel's mode after a restart: that of its newest conversation."""
        if not self.modes or key in self._mode or key in self._live or key in self._stored_keys:
            return
        try:
            records = await self.store.conversations(key)
        except Exception as exc:
            raise _InfrastructureError(f"reading the conversations of {key} failed") from exc
        refs = {mode.ref: mode for mode in self.modes.values()}
        newest = next((r for r in reversed(records) if r.template_ref in refs), None)
        self._mode[key] = refs[newest.template_ref] if newest is not None else self.template

    def _mode_list(self, key: ChannelKey) -> str:
        current = self._template_of(key)
        names = [f"{n} (current)" if t is current else n for n, t in self.modes.items()]
        return self.settings.notices.modes.format(modes=", ".join(names))

    async def _switch_mode(self, key: ChannelKey, call: CommandCall) -> None:
        """``/mode NAME``: end the conversation and start one with that personality."""
        message, notices = call.message, self.settings.notices
        await self._recall_mode(key)
        name = call.args.strip().lower()
        target = self.modes.get(name)
        if target is None:
            await self._send_standalone(key, self._mode_list(key), consumed=message)
            return
        if target is self._template_of(key) and self.has_conversation(key):
            text = notices.mode_same.format(mode=name)
            await self._send_standalone(key, text, consumed=message)
            return
        await self._end(key, "restarted", None)
        self._mode[key] = target
        fresh = self._start(key, message)
        self._note_user(fresh, message)
        # committed with the new conversation: its template ref is the stored choice
        await self._say(key, fresh, notices.mode_switched.format(mode=name))
        await self._advance(key, fresh, None)

    def _touch(self, key: ChannelKey, live: _Live) -> None:
        # Conversations used within the same tick share one float (24 bytes each
        # otherwise); idle eviction needs no finer clock.
        now = time.monotonic()
        if now - self._used_clock >= self._used_tick:
            self._used_clock = now
        live.used_at = self._used_clock
        self._live.pop(key, None)
        self._live[key] = live

    async def _load(self, key: ChannelKey) -> _Live | None:
        live = self._live.get(key)
        if live is not None:
            if live.active:
                self._touch(key, live)
                return live
            del self._live[key]
            return None
        if key not in self._stored_keys:
            return None
        try:
            record = await self.store.load_conversation(key, self._template_of(key).ref)
        except Exception as exc:
            raise _InfrastructureError(f"loading the conversation of {key} failed") from exc
        self._stored_keys.discard(key)
        if record is None:
            return None
        live = _Live.copy_of(record, saved=len(record.journal))
        self._deadlines.pop(key, None)
        self._touch(key, live)
        return live

    def _start(self, key: ChannelKey, trigger: IncomingMessage) -> _Live:
        context = TemplateContext(
            platform=key.platform,
            key=key,
            author_id=trigger.author_id,
            author_name=trigger.author_name,
            trigger=trigger,
        )
        template = self._template_of(key)
        live = _Live(new_id(), key, template.ref, context.to_dict())
        live.app = template().bind(llm=self.llm, context=context, owned=True)
        live.buffer = StepWrite(record=live, new_conversation=True)
        self._touch(key, live)
        return live

    async def _begin(self, key: ChannelKey, message: IncomingMessage) -> None:
        """Start a conversation woken by ``message`` (the first-message rule).

        Whether ``message`` is input is known only when the template first waits, so
        its consumption is recorded with the step that uses it: the question's
        commit, the input's journal entry, or the end of the conversation.
        """
        if key in self._others:
            self._others.discard(key)
            await self._send_standalone(key, self.settings.notices.other_bot)
        live = self._start(key, message)
        self._buffer(live).transcript.append(self._user_line(live, message))
        live.wake = message
        await self._advance(key, live, None)
        app = live.app
        if app is not None and app.waiting is not None and live.wake is message:
            # A chat-style template asked nothing: the message is its first input,
            # consumed in the same step that journals it.
            self._use_wake(live)
            await self._advance(key, live, message)

    async def _end(
        self, key: ChannelKey, status: ConversationStatus, message: IncomingMessage | None
    ) -> bool:
        """End the channel's conversation, noting ``message`` in it. ``False``: none."""
        live = await self._load(key)
        self._arm_timer(key, None)
        if live is None:
            return False
        if message is not None:
            self._note_user(live, message)
        if live.app is not None:
            await live.app.aclose()
        live.status = status
        live.deadline = None
        live.ended_at = self.clock()
        await self._commit(live)
        self._forget(key)
        return True

    async def _ensure_app(
        self, key: ChannelKey, live: _Live, message: IncomingMessage | None
    ) -> bool:
        """Rebuild the conversation's app by replay if it is not in RAM.

        Returns ``False`` when the replay diverged: by the documented policy the old
        conversation is kept as it was, the user is told, and ``message`` (if any)
        starts a new conversation.
        """
        if live.app is not None and not live.broken:
            return True
        record = live
        # Rebuilt from what the store loaded: an app that failed left RAM (see _advance).
        assert record.context is not _STORED_CONTEXT
        context = TemplateContext.from_dict(record.context)
        live.app = self._template_by_ref(record.template_ref)().bind(
            llm=self.llm,
            context=context,
            replay=list(record.journal),
            replay_until=record.yields,
            stopped_waiting=record.status == "waiting",
            owned=True,
        )
        live.saved = len(record.journal)
        record.broken = False
        await self._advance(key, live, None)
        if record.status != "diverged":
            return True
        await self._send_standalone(key, self.settings.notices.diverged)
        if message is not None:
            await self._begin(key, message)
        return False

    def _forget(self, key: ChannelKey) -> None:
        """The channel's conversation ended: it is neither in RAM nor active any more."""
        self._live.pop(key, None)
        self._stored_keys.discard(key)
        self._stalled.pop(key, None)

    def _buffer(self, live: _Live) -> StepWrite:
        if live.buffer is None:
            live.buffer = StepWrite(record=live)
        return live.buffer

    def _note_user(self, live: _Live, message: IncomingMessage) -> None:
        """Record that ``message`` was used by this conversation (atomic with its effects)."""
        step = self._buffer(live)
        step.consumed.append((message.key, message.message_id))
        step.transcript.append(self._user_line(live, message))

    @staticmethod
    def _user_line(live: _Live, message: IncomingMessage) -> TranscriptLine:
        return TranscriptLine(live.id, "user", message.text, message.timestamp)

    def _use_wake(self, live: _Live) -> None:
        """Consume the waking message (if still pending) with the current step."""
        if live.wake is not None:
            self._buffer(live).consumed.append((live.wake.key, live.wake.message_id))
            live.wake = None

    async def _commit(
        self, live: _Live, *, wait: bool = False, undelivered: int = 0, state: bool = True
    ) -> None:
        """Hand the step's changes to the store; with ``wait``, until committed.

        ``undelivered``: how many of the app's last yields produced output not yet
        delivered (a replay must deliver them). ``state=False``: the caller knows the
        conversation's state is as last written (its row is then not updated again).
        """
        step = self._buffer(live)
        live.buffer = None
        app = live.app
        step.journal_start = live.saved
        if app is not None:
            step.journal = app.journal[live.saved - app.journal_base :]
            live.saved = app.journal_length
            live.yields = app.yields - undelivered
            # Handed to the store, the entries leave RAM: a live conversation costs its
            # memory window, not its whole history (the store has the journal).
            app.forget_journal()
            live.journal = _NO_JOURNAL
        if state or step.journal or step.transcript or step.new_conversation:
            step.record = live
        else:
            step.record = None  # only replies sent or messages used: the row is unchanged
        await self._store_write(step)
        if step.new_conversation:
            # Stored with the new row; in RAM the app's context stands for it.
            live.context = _STORED_CONTEXT
        if wait:
            await self._store_flush()

    async def _store_write(self, step: StepWrite) -> None:
        try:
            await self.store.write(step)
        except Exception as exc:
            raise _InfrastructureError("writing a step failed") from exc

    async def _store_flush(self) -> None:
        try:
            await self.store.flush()
        except Exception as exc:
            raise _InfrastructureError("committing a step failed") from exc

    async def _advance(
        self, key: ChannelKey, live: _Live, value: IncomingMessage | UserInput | None
    ) -> bool:
        """Resume the app with ``value`` and deliver outputs until it waits or ends.

        Returns whether anything was sent.
        """
        app = live.app
        assert app is not None
        record = live
        sent = False
        previous_deadline = record.deadline
        record.status, record.deadline = "running", None
        asked = False  # a question was sent, and with it the final state committed
        self._arm_timer(key, None)
        typing = asyncio.create_task(self._keep_typing(key)) if self._typing else None
        try:
            output = await app.asend(value)
            while True:
                if isinstance(output, GetUserInput):
                    record.status = "waiting"
                    if output is not app.waiting:
                        # A replayed prompt: its deadline was fixed when it was first asked.
                        record.deadline = previous_deadline
                    elif output.timeout is not None:
                        record.deadline = self.clock() + output.timeout
                    if output.message:
                        self._use_wake(live)
                        await self._say(key, live, output.message)
                        sent = asked = True
                    break
                if isinstance(output, AssistantStream):
                    await self._say_stream(key, live, output)
                    sent = True
                elif isinstance(output, Result):
                    await self._say(key, live, output.content)
                    sent = True
                elif output.forward:
                    await self._say(key, live, output.content, output)
                    sent = True
                output = await app.asend(None)
        except StopAsyncIteration:
            record.status = "finished"
        except LLMError as exc:
            refusal = _refusal(exc)
            if refusal is None:
                _log.warning(
                    "channel %s: generation failed (%s: %s); it is retried with the "
                    "channel's next message",
                    key,
                    type(exc).__name__,
                    exc,
                )
                record.broken = True
                await self._say(key, live, self.settings.notices.apology)
            else:
                # It would fail the same way every time: not retried, the conversation ends.
                _log.warning(
                    "channel %s: the model refused the request for good (%s); the "
                    "conversation ends",
                    key,
                    exc,
                )
                record.status = "failed"
                await self._say(key, live, self.settings.notices.refused.format(reason=refusal))
            sent = True
        except ReplayDivergedError as exc:
            _log.warning("channel %s: %s", key, exc)
            record.status = "diverged"
        except _InfrastructureError:
            raise
        except Exception:
            _log.exception("channel %s: template %s failed", key, record.template_ref)
            record.status = "failed"
            await self._say(key, live, self.settings.notices.failure)
            sent = True
        finally:
            if typing is not None:
                typing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await typing
        if not record.active:
            record.ended_at = self.clock()
            record.deadline = None
        if app.waiting is None or record.broken:
            self._use_wake(live)  # it ended (or failed) before asking for input
        await self._commit(live, state=not asked)
        if not record.active:
            live.app = None
            self._forget(key)
        elif record.broken:
            # The generator is gone. The conversation leaves RAM, so that the next message
            # rebuilds it by replay from the store, which has its context.
            live.app = None
            if self._live.get(key) is live:
                del self._live[key]
                self._stored_keys.add(key)
        self._arm_timer(key, record.deadline if record.status == "waiting" else None)
        return sent

    async def _keep_typing(self, key: ChannelKey) -> None:
        interval = self.settings.typing_interval
        await asyncio.sleep(self.settings.typing_delay)  # quick answers need no indicator
        while True:
            try:
                await self.sender.typing(key)
            except Exception as exc:  # a failed indicator must never stop a reply
                _log.debug("typing indicator failed in %s: %s", key, exc)
            await asyncio.sleep(interval)

    def _record_reply(
        self, key: ChannelKey, live: _Live, text: str, message: Assistant | None = None
    ) -> OutgoingRecord:
        step = self._buffer(live)
        usage = message.usage if message is not None else None
        step.transcript.append(
            TranscriptLine(
                live.id,
                "assistant",
                text,
                self.clock(),
                count(usage.prompt_tokens) if usage else None,
                count(usage.completion_tokens) if usage else None,
            )
        )
        outgoing = OutgoingRecord(new_id(), key, text)
        step.outgoing.append(outgoing)
        return outgoing

    async def _say(
        self, key: ChannelKey, live: _Live, text: str, message: Assistant | None = None
    ) -> None:
        """Record a reply, commit everything that led to it, then send it."""
        outgoing = self._record_reply(key, live, text, message)
        await self._commit(live, wait=True)
        platform_id = await self._outbox.deliver(outgoing)
        if platform_id is not FAILED:
            self._buffer(live).sent.append((outgoing.id, platform_id))

    async def _say_stream(self, key: ChannelKey, live: _Live, stream: AssistantStream) -> None:
        # The input is committed before the first fragment is shown, without counting
        # the Generate as delivered: a crash mid-stream replays and delivers it. The
        # reply itself is recorded (and marked sent) once complete.
        await self._commit(live, wait=True, undelivered=1)
        if self._outbox.has_kept(key) and not await self._outbox.resend(key):
            # Earlier replies still wait for the platform: this one must not overtake
            # them. It is not shown while it grows, and is kept behind them once complete.
            async for _ in stream:
                pass
            platform_id = FAILED
        else:
            platform_id = await self._outbox.attempt(key, self.sender.send_stream(key, stream))
        if not stream.closed:
            async for _ in stream:  # the sender gave up early: let the generation finish
                pass
        if stream.interrupted and platform_id not in (None, FAILED):
            # The sender left the broken-off part on screen, marked: the transcript says so.
            self._buffer(live).transcript.append(
                TranscriptLine(live.id, "assistant", stream.text + INTERRUPTED, self.clock())
            )
        elif stream.text and stream.message is not None:
            # Complete: recorded either way; a reply that could not be sent is kept and
            # sent again (as plain text) later.
            outgoing = self._record_reply(key, live, stream.text, stream.message)
            if platform_id is FAILED:
                self._outbox.keep(outgoing)
            else:
                self._buffer(live).sent.append((outgoing.id, platform_id))

    async def _send_standalone(
        self, key: ChannelKey, text: str, *, consumed: IncomingMessage | None = None
    ) -> None:
        """Send a notice that belongs to no conversation step."""
        outgoing = OutgoingRecord(new_id(), key, text)
        step = StepWrite(outgoing=[outgoing])
        if consumed is not None:
            step.consumed.append((consumed.key, consumed.message_id))
        await self._store_write(step)
        await self._store_flush()
        platform_id = await self._outbox.deliver(outgoing)
        if platform_id is not FAILED:
            await self._store_write(StepWrite(sent=[(outgoing.id, platform_id)]))
