"""The conversation driver: each channel's conversation, its steps and their commits.

:class:`Conversations` holds the conversations in RAM (``Live``) and knows which
others are in the store; it begins, advances, rebuilds (by replay) and ends them, and
collects what one step changes in a ``StepWrite`` that is handed to the store whole
(docs/architecture.md, "The step and commit protocol"). A reply is recorded in that
step and committed before the outbox sends it. It also keeps the deadlines of waiting
conversations (``GetUserInput(timeout=...)``), as timers that wake the channel.

It does not decide *when* a channel runs (the runtime's scheduler does) nor what a
command means (turbobot.control): it is told to begin, advance or end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from turbobot.chat import ChannelKey, IncomingMessage, TemplateContext
from turbobot.clock import TimerHandle
from turbobot.codec import count
from turbobot.delivery import (
    FAILED,
    BaseSender,
    Outbox,
    answering,
    delivering,
    reached,
    stored_id,
)
from turbobot.exceptions import LLMError, LLMRequestError, ReplayDivergedError
from turbobot.journal import JournalEntry
from turbobot.llm.base import LLM
from turbobot.messages import Assistant
from turbobot.metrics import Metrics, StepTimer, current_step, error_detail, message_arrived
from turbobot.modes import Personalities
from turbobot.settings import RuntimeSettings
from turbobot.signals import GetUserInput, Result, UserInput
from turbobot.store import (
    BaseStore,
    ConversationRecord,
    ConversationStatus,
    ErrorRecord,
    LeaseLostError,
    OutgoingRecord,
    StepStats,
    StepWrite,
    TokenUsage,
    TranscriptLine,
    new_id,
    utc_day,
)
from turbobot.template import INTERRUPTED, App, AssistantStream

__all__ = ["Conversations", "InfrastructureError", "Live"]

_log = logging.getLogger("turbobot.runtime")


class InfrastructureError(Exception):
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
#: journal entries that record a call of the model (their value may hold its "usage")
_MODEL_CALLS = frozenset({"generate", "summary"})
#: stands for a context already stored with its conversation (one shared empty dict,
#: never changed: a new one per conversation would cost 64 bytes each)
_STORED_CONTEXT: dict[str, Any] = {}


@dataclass(slots=True)
class Live(ConversationRecord):
    """A conversation the runtime holds: its record, and its app when in RAM.

    A record itself (a subclass, not a wrapper): one object less per conversation.
    One loaded from the store is made with ``Live.copy_of(record, saved=...)``.
    """

    app: App | None = None
    #: journal entries already handed to the store
    saved: int = 0
    #: changes of the current step not yet handed to the store
    buffer: StepWrite | None = None
    #: the message that started the conversation, until it is known whether it is input
    wake: IncomingMessage | None = None
    used_at: float = 0.0


class Conversations:
    """The channels' conversations and the step protocol that changes them.

    Args:
        personalities: which template each channel runs.
        wake: schedules a channel's worker (a deadline came).
        call_later: the clock's timers.
    """

    def __init__(
        self,
        personalities: Personalities,
        *,
        llm: LLM,
        sender: BaseSender,
        store: BaseStore,
        outbox: Outbox,
        settings: RuntimeSettings,
        clock: Callable[[], float],
        call_later: Callable[..., TimerHandle],
        wake: Callable[[ChannelKey], None],
        on_usage: Callable[[TokenUsage], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.personalities = personalities
        self.llm = llm
        self.sender = sender
        self.store = store
        self.outbox = outbox
        self.settings = settings
        self.clock = clock
        self._call_later = call_later
        self._wake = wake
        #: told the tokens each written step used (the token budgets)
        self._on_usage = on_usage
        # insertion order = least recently used first (a plain dict is half an OrderedDict)
        self.live: dict[ChannelKey, Live] = {}
        #: channels with an active conversation in the store but not in RAM (a live one
        #: is active by definition: keeping its key here too would cost ~50 bytes)
        self.stored_keys: set[ChannelKey] = set()
        #: channels where another template has a conversation going (told once, on begin)
        self.others: set[ChannelKey] = set()
        #: channels whose conversation's last generation failed, to be retried by the next
        #: message: the highest inbox seq already tried (commands do not trigger a retry)
        self.stalled: dict[ChannelKey, int] = {}
        self._timers: dict[ChannelKey, TimerHandle] = {}
        #: deadlines of waiting conversations that are not in RAM
        self._deadlines: dict[ChannelKey, float] = {}
        self._closed = False
        self._used_clock = 0.0
        idle = settings.idle_evict_seconds
        self._used_tick = min(1.0, idle / 10) if idle else 1.0
        self._typing = type(sender).typing is not BaseSender.typing
        self.metrics = metrics
        #: since this process started (the operator's samples)
        self.evictions = 0
        self.replays = 0

    # -- what is where ------------------------------------------------------------------

    def has_conversation(self, key: ChannelKey) -> bool:
        """Whether the channel has an active conversation (in RAM or in the store)."""
        live = self.live.get(key)
        return live.active if live is not None else key in self.stored_keys

    def _touch(self, key: ChannelKey, live: Live) -> None:
        # Conversations used within the same tick share one float (24 bytes each
        # otherwise); idle eviction needs no finer clock.
        now = time.monotonic()
        if now - self._used_clock >= self._used_tick:
            self._used_clock = now
        live.used_at = self._used_clock
        self.live.pop(key, None)
        self.live[key] = live

    async def load(self, key: ChannelKey) -> Live | None:
        """The channel's active conversation, from RAM or the store (``None``: none)."""
        live = self.live.get(key)
        if live is not None:
            if live.active:
                self._touch(key, live)
                return live
            del self.live[key]
            return None
        if key not in self.stored_keys:
            return None
        try:
            record = await self.store.load_conversation(key, self.personalities.of(key).ref)
        except Exception as exc:
            raise InfrastructureError(f"loading the conversation of {key} failed") from exc
        self.stored_keys.discard(key)
        if record is None:
            return None
        live = Live.copy_of(record, saved=len(record.journal))
        self._deadlines.pop(key, None)
        self._touch(key, live)
        return live

    async def evict(self, key: ChannelKey) -> bool:
        """Move the conversation out of RAM (it comes back by replay)."""
        live = self.live.get(key)
        if live is None:
            return False
        # Detach before the first await: a message arriving meanwhile loads the
        # conversation from the store, where this commit is already queued.
        del self.live[key]
        if live.active:
            self.stored_keys.add(key)
        if live.status == "waiting" and live.deadline is not None:
            self._deadlines[key] = live.deadline
        self.evictions += 1
        if self.metrics is not None:
            self.metrics.evictions.inc()
        await self.commit(live)
        await self._close_app(key, live)
        return True

    async def drop(self, key: ChannelKey) -> None:
        """Take the conversation out of RAM as the store has it (its step not committed)."""
        live = self.live.pop(key, None)
        if live is None:
            return
        self.stored_keys.add(key)
        live.buffer = None
        await self._close_app(key, live)

    async def close(self) -> None:
        """Commit and close every conversation in RAM (their ``finally`` blocks run)."""
        for live in list(self.live.values()):
            await self.commit(live)
            if live.app is not None:
                await live.app.aclose()
        self.live.clear()

    @staticmethod
    async def _close_app(key: ChannelKey, live: Live) -> None:
        app, live.app = live.app, None
        if app is None:
            return
        try:
            await app.aclose()  # runs the template's finally blocks
        except Exception:
            _log.exception("channel %s: template failed while being closed", key)

    async def let_go(self, key: ChannelKey) -> None:
        """Another worker has the channel now: forget everything about it (its
        conversation leaves RAM uncommitted, its deadline's timer stops)."""
        self.arm_timer(key, None)
        live = self.live.pop(key, None)
        self.stored_keys.discard(key)
        self.others.discard(key)
        self.stalled.pop(key, None)
        self._deadlines.pop(key, None)
        self.personalities.forget(key)
        if live is not None:
            live.buffer = None
            await self._close_app(key, live)

    def forget(self, key: ChannelKey) -> None:
        """The channel's conversation ended: it is neither in RAM nor active any more."""
        self.live.pop(key, None)
        self.stored_keys.discard(key)
        self.stalled.pop(key, None)

    # -- deadlines ----------------------------------------------------------------------

    def deadline_of(self, key: ChannelKey) -> float | None:
        live = self.live.get(key)
        if live is not None:
            return live.deadline if live.status == "waiting" else None
        return self._deadlines.get(key)

    def arm_timer(self, key: ChannelKey, deadline: float | None) -> None:
        """Wake the channel at ``deadline`` (``None``: the channel waits for nothing)."""
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        if deadline is None or self._closed:
            self._deadlines.pop(key, None)
            return
        if key not in self.live:
            self._deadlines[key] = deadline
        delay = max(0.0, deadline - self.clock())
        self._timers[key] = self._call_later(delay, self._on_timer, key)

    def _on_timer(self, key: ChannelKey) -> None:
        self._timers.pop(key, None)
        if not self._closed:
            self._wake(key)

    def stop_timers(self) -> None:
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    # -- beginning, rebuilding, ending --------------------------------------------------

    def start(self, key: ChannelKey, trigger: IncomingMessage) -> Live:
        """A new conversation of the channel's personality, in RAM, not yet run."""
        context = TemplateContext(
            platform=key.platform,
            key=key,
            author_id=trigger.author_id,
            author_name=trigger.author_name,
            trigger=trigger,
        )
        template = self.personalities.of(key)
        live = Live(new_id(), key, template.ref, context.to_dict(), started_at=self.clock())
        live.app = template().bind(llm=self.llm, context=context, owned=True)
        live.buffer = StepWrite(record=live, new_conversation=True)
        self._touch(key, live)
        return live

    async def begin(self, key: ChannelKey, message: IncomingMessage) -> None:
        """Start a conversation woken by ``message`` (the first-message rule).

        Whether ``message`` is input is known only when the template first waits, so
        its consumption is recorded with the step that uses it: the question's
        commit, the input's journal entry, or the end of the conversation.
        """
        if key in self.others:
            self.others.discard(key)
            await self.send_standalone(key, self.settings.notices.other_bot)
        live = self.start(key, message)
        self.step(live).transcript.append(self._user_line(live, message))
        live.wake = message
        await self.advance(key, live, None, trigger="begin")
        app = live.app
        if app is not None and app.waiting is not None and live.wake is message:
            # A chat-style template asked nothing: the message is its first input,
            # consumed in the same step that journals it.
            self.use_wake(live)
            await self.advance(key, live, message)

    async def end(
        self, key: ChannelKey, status: ConversationStatus, message: IncomingMessage | None
    ) -> bool:
        """End the channel's conversation, noting ``message`` in it. ``False``: none."""
        live = await self.load(key)
        self.arm_timer(key, None)
        if live is None:
            return False
        if message is not None:
            self.note_user(live, message)
        if live.app is not None:
            await live.app.aclose()
        live.status = status
        live.deadline = None
        live.ended_at = self.clock()
        await self.commit(live)
        self.forget(key)
        return True

    async def ensure_app(
        self, key: ChannelKey, live: Live, message: IncomingMessage | None
    ) -> bool:
        """Rebuild the conversation's app by replay if it is not in RAM.

        Returns ``False`` when the replay diverged: by the documented policy the old
        conversation is kept as it was, the user is told, and ``message`` (if any)
        starts a new conversation.
        """
        if live.app is not None and not live.broken:
            return True
        record = live
        # Rebuilt from what the store loaded: an app that failed left RAM (see advance).
        assert record.context is not _STORED_CONTEXT
        context = TemplateContext.from_dict(record.context)
        live.app = self.personalities.by_ref(record.template_ref)().bind(
            llm=self.llm,
            context=context,
            replay=list(record.journal),
            replay_until=record.yields,
            stopped_waiting=record.status == "waiting",
            owned=True,
        )
        live.saved = len(record.journal)
        record.broken = False
        self.replays += 1
        if self.metrics is not None:
            self.metrics.replays.inc()
        await self.advance(key, live, None, trigger="replay")
        if record.status != "diverged":
            return True
        await self.send_standalone(key, self.settings.notices.diverged)
        if message is not None:
            await self.begin(key, message)
        return False

    async def rewind(self, key: ChannelKey, live: Live, message: IncomingMessage) -> bool:
        """Cut the journal back to just before its last generation and generate again.

        ``message`` (the ``/retry``) is noted in the step that cuts. ``False`` (nothing
        changed, nothing noted) if there is no generation that nothing followed:
        no input or timeout was put to the conversation after it. The reply it
        replaces leaves the model's memory; the transcript keeps both.
        """
        journal: list[JournalEntry] = live.journal
        if live.app is not None:
            # A live app keeps only what it has not handed to the store: read the store.
            await self.commit(live, wait=True)
            stored = await self.store.load_conversation(key, live.template_ref)
            journal = stored.journal if stored is not None else []
        cut = next(
            (i for i in range(len(journal) - 1, -1, -1) if journal[i].kind == "generate"), None
        )
        if cut is None or any(e.kind in ("input", "timeout") for e in journal[cut:]):
            return False
        self.note_user(live, message)
        if live.app is not None:
            app, live.app = live.app, None
            context = app.context
            await app.aclose()
        else:
            context = TemplateContext.from_dict(live.context)
        kept = journal[:cut]
        self.step(live).rewind = True
        live.journal, live.saved = kept, cut
        live.status, live.deadline = "running", None
        await self.commit(live, wait=True)
        live.app = self.personalities.by_ref(live.template_ref)().bind(
            llm=self.llm,
            context=context,
            replay=list(kept),
            replay_until=0,  # everything after the cut is new: the generation's reply
            owned=True,
        )
        await self.advance(key, live, None)
        return True

    # -- one step -----------------------------------------------------------------------

    def step(self, live: Live) -> StepWrite:
        """The changes of the conversation's current step, not yet handed to the store."""
        if live.buffer is None:
            live.buffer = StepWrite(record=live)
        return live.buffer

    def note_user(self, live: Live, message: IncomingMessage) -> None:
        """Record that ``message`` was used by this conversation (atomic with its effects)."""
        step = self.step(live)
        step.consumed.append((message.key, message.message_id))
        step.transcript.append(self._user_line(live, message))

    @staticmethod
    def _user_line(live: Live, message: IncomingMessage) -> TranscriptLine:
        # A message of this channel's inbox: a store may keep its text once, there.
        message_id = message.message_id if message.key == live.key else None
        return TranscriptLine(
            live.id, "user", message.text, message.timestamp, message_id=message_id
        )

    def use_wake(self, live: Live) -> None:
        """Consume the waking message (if still pending) with the current step."""
        if live.wake is not None:
            self.step(live).consumed.append((live.wake.key, live.wake.message_id))
            live.wake = None

    async def commit(
        self, live: Live, *, wait: bool = False, undelivered: int = 0, state: bool = True
    ) -> None:
        """Hand the step's changes to the store; with ``wait``, until committed.

        ``undelivered``: how many of the app's last yields produced output not yet
        delivered (a replay must deliver them). ``state=False``: the caller knows the
        conversation's state is as last written (its row is then not updated again).
        """
        step = self.step(live)
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
            if step.journal:
                self._count_usage(live, app, step)
        if state or step.journal or step.transcript or step.new_conversation:
            step.record = live
        else:
            step.record = None  # only replies sent or messages used: the row is unchanged
        await self.write(step)
        if step.new_conversation:
            # Stored with the new row; in RAM the app's context stands for it.
            live.context = _STORED_CONTEXT
        if wait:
            await self.flush(live.key)

    def _count_usage(self, live: Live, app: App, step: StepWrite) -> None:
        """Add the tokens of the step's model calls to its user's day (``step.usage``).

        The user is the one whose message is being answered, else (a deadline, a
        resumed step) the one who started the conversation.
        """
        prompt = completion = calls = 0
        for entry in step.journal:
            if entry.kind in _MODEL_CALLS:
                calls += 1
                reported = entry.value.get("usage") if type(entry.value) is dict else None
                if reported:
                    prompt += count(reported[0]) or 0
                    completion += count(reported[1]) or 0
        if not calls:
            return
        timer = current_step.get()
        if timer is not None:
            stats = timer.stats
            stats.prompt_tokens = (stats.prompt_tokens or 0) + prompt
            stats.completion_tokens = (stats.completion_tokens or 0) + completion
            stats.generations += calls
        message = answering.get()
        user = message.author_id if message is not None else app.context.author_id
        used = TokenUsage(live.key.platform, user, utc_day(self.clock()), prompt, completion, calls)
        step.usage.append(used)
        if self._on_usage is not None:
            self._on_usage(used)

    async def write(self, step: StepWrite) -> None:
        try:
            await self.store.write(step)
        except Exception as exc:
            raise InfrastructureError("writing a step failed") from exc

    async def flush(self, key: ChannelKey | None = None) -> None:
        """Wait until what was written is committed; with ``key``, raise
        :class:`LeaseLostError` if the channel's steps were not (another worker took
        the channel): nothing of it may be sent then."""
        try:
            await self.store.flush()
        except Exception as exc:
            raise InfrastructureError("committing a step failed") from exc
        if key is not None:
            await self.check_lease(key)

    async def check_lease(self, key: ChannelKey, *, ask: bool = False) -> None:
        """Raise :class:`LeaseLostError` unless this worker still holds the channel (when
        several share the store). The store is asked with ``ask``, and whenever the
        leases were not renewed for a while (this worker was paused?): another worker
        may have taken the channel and sent what this one is about to send."""
        leases = self.store.leases
        if leases is None:
            return
        held = leases.holds(key)
        if held and (ask or not leases.fresh()):
            try:
                held = await leases.confirm(key)
            except Exception as exc:
                raise InfrastructureError(f"confirming the lease of {key} failed") from exc
        if not held:
            raise LeaseLostError(f"another worker took the channel {key}")

    async def advance(
        self,
        key: ChannelKey,
        live: Live,
        value: IncomingMessage | UserInput | None,
        *,
        trigger: str | None = None,
    ) -> bool:
        """Resume the app with ``value`` and deliver outputs until it waits or ends.

        Returns whether anything was sent. The step is timed (:class:`StepTimer`);
        its stats are written with its last commit.
        """
        message = answering.get()
        if trigger is None:
            timed_out = isinstance(value, UserInput) and value.timed_out
            trigger = "timeout" if timed_out else "resume" if value is None else "message"
        app = live.app
        user = (
            message.author_id
            if message is not None
            else app.context.author_id
            if app is not None
            else None
        )
        stats = StepStats(live.id, key, user or None, trigger, self.clock())
        if trigger in ("message", "begin"):
            stats.arrived = message_arrived.get()
        timer = StepTimer(stats, self.clock, self.metrics)
        token = current_step.set(timer)
        try:
            sent = await self._advance(key, live, value)
        finally:
            current_step.reset(token)
        if self.metrics is not None:  # (after its last commit, which counted its tokens)
            self.metrics.step(stats)
        return sent

    def _step_ended(self, live: Live) -> None:
        """Add the running step's stats to its last write."""
        timer = current_step.get()
        if timer is None:
            return
        stats = timer.stats
        stats.duration = max(0.0, self.clock() - stats.at)
        self.step(live).stats.append(stats)

    def _error(self, live: Live, kind: str, exc: BaseException) -> None:
        """Record an error of the running step (written with it)."""
        error = ErrorRecord(self.clock(), kind[:32], error_detail(exc), live.key, live.id)
        self.step(live).errors.append(error)
        timer = current_step.get()
        if timer is not None:
            timer.stats.error = error.kind
        if self.metrics is not None:
            self.metrics.error(error)

    async def _advance(
        self, key: ChannelKey, live: Live, value: IncomingMessage | UserInput | None
    ) -> bool:
        app = live.app
        assert app is not None
        record = live
        sent = False
        previous_deadline = record.deadline
        record.status, record.deadline = "running", None
        asked = False  # a question was sent, and with it the final state committed
        self.arm_timer(key, None)
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
                        self.use_wake(live)
                        await self.say(key, live, output.message)
                        sent = asked = True
                    break
                if isinstance(output, AssistantStream):
                    await self._say_stream(key, live, output)
                    sent = True
                elif isinstance(output, Result):
                    await self.say(key, live, output.content)
                    sent = True
                elif output.forward:
                    await self.say(key, live, output.content, output)
                    sent = True
                output = await app.asend(None)
        except StopAsyncIteration:
            record.status = "finished"
        except LLMError as exc:
            refusal = _refusal(exc)
            self._error(live, "refused" if refusal else f"llm:{type(exc).__name__}", exc)
            if refusal is None:
                _log.warning(
                    "channel %s: generation failed (%s: %s); it is retried with the "
                    "channel's next message",
                    key,
                    type(exc).__name__,
                    exc,
                )
                record.broken = True
                await self.say(key, live, self.settings.notices.apology)
            else:
                # It would fail the same way every time: not retried, the conversation ends.
                _log.warning(
                    "channel %s: the model refused the request for good (%s); the "
                    "conversation ends",
                    key,
                    exc,
                )
                record.status = "failed"
                await self.say(key, live, self.settings.notices.refused.format(reason=refusal))
            sent = True
        except ReplayDivergedError as exc:
            _log.warning("channel %s: %s", key, exc)
            self._error(live, "diverged", exc)
            record.status = "diverged"
        except (InfrastructureError, LeaseLostError):
            raise
        except Exception as exc:
            _log.exception("channel %s: template %s failed", key, record.template_ref)
            self._error(live, "template", exc)
            record.status = "failed"
            await self.say(key, live, self.settings.notices.failure)
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
            self.use_wake(live)  # it ended (or failed) before asking for input
        self._step_ended(live)
        await self.commit(live, state=not asked)
        if not record.active:
            live.app = None
            self.forget(key)
        elif record.broken:
            # The generator is gone. The conversation leaves RAM, so that the next message
            # rebuilds it by replay from the store, which has its context.
            live.app = None
            if self.live.get(key) is live:
                del self.live[key]
                self.stored_keys.add(key)
        self.arm_timer(key, record.deadline if record.status == "waiting" else None)
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

    # -- replies ------------------------------------------------------------------------

    def _record_reply(
        self,
        key: ChannelKey,
        live: Live,
        text: str,
        message: Assistant | None = None,
        outgoing_id: str | None = None,
    ) -> OutgoingRecord:
        step = self.step(live)
        usage = message.usage if message is not None else None
        outgoing = OutgoingRecord(outgoing_id or new_id(), key, text)
        step.transcript.append(
            TranscriptLine(
                live.id,
                "assistant",
                text,
                self.clock(),
                count(usage.prompt_tokens) if usage else None,
                count(usage.completion_tokens) if usage else None,
                reply_id=outgoing.id,
                streamed=outgoing_id is not None,  # (a stream's id is chosen before)
            )
        )
        step.outgoing.append(outgoing)
        return outgoing

    async def say(
        self, key: ChannelKey, live: Live, text: str, message: Assistant | None = None
    ) -> None:
        """Record a reply, commit everything that led to it, then send it."""
        outgoing = self._record_reply(key, live, text, message)
        await self.commit(live, wait=True)
        handed = self.clock()
        platform_id = await self.outbox.deliver(outgoing)
        if platform_id is not FAILED:
            self.step(live).sent.append((outgoing.id, stored_id(platform_id)))
        timer = current_step.get()
        if timer is not None:
            timer.stats.replies += 1
            if reached(platform_id):
                timer.reply(handed)  # (the latency of a reply that reached the user)

    async def _say_stream(self, key: ChannelKey, live: Live, stream: AssistantStream) -> None:
        # The input is committed before the first fragment is shown, without counting
        # the Generate as delivered: a crash mid-stream replays and delivers it. The
        # reply itself is recorded (and marked sent) once complete, under an outbox id
        # chosen now, which the adapter sees while it shows the stream (``delivering``).
        await self.commit(live, wait=True, undelivered=1)
        reply_id = new_id()
        recorded: OutgoingRecord | None = None
        if self.outbox.has_kept(key) and not await self.outbox.resend(key):
            # Earlier replies still wait for the platform: this one must not overtake
            # them. It is not shown while it grows, and is kept behind them once complete.
            async for _ in stream:
                pass
            platform_id = FAILED
        else:
            platform_id, recorded = await self._show_stream(key, live, stream, reply_id)
        delivered = reached(platform_id)
        platform_id = stored_id(platform_id)
        timer = current_step.get()
        if timer is not None and delivered and stream.first_at is not None:
            timer.reply(stream.first_at)
        if not stream.closed:
            async for _ in stream:  # the sender gave up early: let the generation finish
                pass
        if stream.interrupted and platform_id not in (None, FAILED):
            # The sender left the broken-off part on screen, marked: the transcript says so.
            self.step(live).transcript.append(
                TranscriptLine(
                    live.id,
                    "assistant",
                    stream.text + INTERRUPTED,
                    self.clock(),
                    reply_id=reply_id,
                    streamed=True,
                )
            )
        elif stream.text and stream.message is not None:
            # Complete: recorded either way; a reply that could not be sent is kept and
            # sent again (as plain text) later.
            outgoing = recorded or self._record_reply(
                key, live, stream.text, stream.message, reply_id
            )
            if timer is not None:
                timer.stats.replies += 1
            if platform_id is FAILED:
                self.outbox.keep(outgoing)
            else:
                self.step(live).sent.append((outgoing.id, platform_id))
                if delivered and self.metrics is not None:
                    self.metrics.replies.labels(key.platform).inc()

    async def _show_stream(
        self, key: ChannelKey, live: Live, stream: AssistantStream, reply_id: str
    ) -> tuple[Any, OutgoingRecord | None]:
        """Let the adapter show the stream; once the generation is complete, record the
        reply (as ``reply_id``) and commit it while the adapter still finishes showing
        it (a last edit, a paced send). Returns the platform id and that record.

        A crash after that commit sends the recorded reply again as a plain message,
        under the same id (a platform that dedupes by it shows it once): a finished
        generation is never asked for again.
        """
        token = delivering.set(reply_id)
        try:  # (the task below runs in a copy of this context)
            showing = asyncio.ensure_future(
                self.outbox.attempt(key, self.sender.send_stream(key, stream))
            )
        finally:
            delivering.reset(token)
        generated = asyncio.ensure_future(stream.wait_closed())
        recorded: OutgoingRecord | None = None
        try:
            await asyncio.wait((showing, generated), return_when=asyncio.FIRST_COMPLETED)
            if not showing.done() and stream.message is not None and stream.text:
                recorded = self._record_reply(key, live, stream.text, stream.message, reply_id)
                await self.commit(live, wait=True)
            return await showing, recorded
        except BaseException:
            showing.cancel()  # (the adapter takes away what it showed of a stopped stream)
            with contextlib.suppress(BaseException):
                await showing
            raise
        finally:
            generated.cancel()

    async def send_standalone(
        self, key: ChannelKey, text: str, *, consumed: IncomingMessage | None = None
    ) -> None:
        """Send a notice that belongs to no conversation step."""
        outgoing = OutgoingRecord(new_id(), key, text)
        step = StepWrite(outgoing=[outgoing])
        if consumed is not None:
            step.consumed.append((consumed.key, consumed.message_id))
        await self.write(step)
        await self.flush(key)
        platform_id = await self.outbox.deliver(outgoing)
        if platform_id is not FAILED:
            await self.write(StepWrite(sent=[(outgoing.id, stored_id(platform_id))]))
