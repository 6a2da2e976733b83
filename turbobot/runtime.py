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

The pieces (docs/architecture.md, "Module map"): this module admits messages and
schedules channels; turbobot.conversation drives a conversation one step (one commit)
at a time; turbobot.control carries out commands; turbobot.delivery sends replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import math
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace

from turbobot.chat import ChannelKey, IncomingMessage
from turbobot.clock import Clock, SystemClock, TimerHandle
from turbobot.codec import unwritable, writable_text
from turbobot.commands import CommandRegistry, parse_command
from turbobot.control import GENERATING, BuiltinCommands
from turbobot.conversation import Conversations, InfrastructureError
from turbobot.delivery import BaseSender, Outbox, answering
from turbobot.limits import RateLimiter, TokenBudget, duration
from turbobot.llm.base import LLM
from turbobot.metrics import Metrics, message_arrived
from turbobot.modes import Personalities
from turbobot.scheduler import ChannelWorkers
from turbobot.settings import Notices, RuntimeSettings
from turbobot.signals import GetUserInput, UserInput
from turbobot.store import (
    BaseStore,
    ChannelLeases,
    InboxItem,
    IncomingBatchError,
    InMemoryStore,
    LeaseLostError,
    Recovery,
    Sample,
    StepWrite,
)
from turbobot.template import Template

# BaseSender, Notices, RuntimeSettings, answering and parse_command are defined in
# their own modules (docs/architecture.md, "Module map") and imported from here too.
__all__ = ["BaseSender", "Notices", "Runtime", "RuntimeSettings", "answering", "parse_command"]

_log = logging.getLogger(__name__)


#: arrival times kept for inputs not yet handled (beyond: the oldest are forgotten)
_ARRIVALS = 100_000


def _loop_call_later(delay: float, callback: Callable[..., object], *args: object) -> TimerHandle:
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
        metrics: Metrics | None = None,
    ) -> None:
        self.template = template
        #: Prometheus metrics (None: not collected; see turbobot.metrics)
        self.metrics = metrics
        #: the personalities users may switch to with /mode (see turbobot.modes)
        self.personalities = Personalities(template, modes)
        self.commands = commands or CommandRegistry(self.personalities.commands())
        self.llm = llm
        self.sender = sender
        self.store = store or InMemoryStore()
        self.settings = settings or RuntimeSettings()
        self.clock: Callable[[], float] = clock or SystemClock()
        timers = getattr(self.clock, "call_later", None)
        self._call_later: Callable[..., TimerHandle] = timers or _loop_call_later
        self._queues: dict[ChannelKey, deque[InboxItem]] = {}
        #: when each input waiting in RAM arrived, by (channel, message id): its step's
        #: latency starts there (see turbobot.metrics; bounded by ``_ARRIVALS``)
        self._arrivals: dict[tuple[ChannelKey, str], float] = {}
        self._workers = ChannelWorkers(self._work_once)
        #: channels to try again after a store failure (see _retry_later)
        self._retry_timers: dict[ChannelKey, TimerHandle] = {}
        #: channels whose conversation stopped mid-step and must be replayed to go on
        self._resume: set[ChannelKey] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._outbox = Outbox(
            sender,
            self.store,
            retry_delays=self.settings.retry_delays,
            wake=self._wake_unless_closed,
            call_later=self._call_later,
            clock=self.clock,
            metrics=metrics,
        )
        limits = self.settings.limits
        #: the token budgets (None: none; see turbobot.limits)
        self._budget = (
            TokenBudget(limits.tokens_per_day, self.store.usage, self.clock)
            if limits.tokens_per_day is not None
            else None
        )
        #: the conversations and their steps (turbobot.conversation)
        self.conversations = Conversations(
            self.personalities,
            llm=llm,
            sender=sender,
            store=self.store,
            outbox=self._outbox,
            settings=self.settings,
            clock=self.clock,
            call_later=self._call_later,
            wake=self._wake,
            on_usage=self._budget.spend if self._budget is not None else None,
            metrics=metrics,
        )
        if metrics is not None:
            metrics.watch(self._queued, lambda: len(self.conversations.live))
            self.store.on_commit = metrics.commit
        self._commands = BuiltinCommands(
            self.commands, self.conversations, self.personalities, self.settings, self._budget
        )
        #: channels whose RAM queue is rebuilt from the store's inbox before their next try
        self._reload: set[ChannelKey] = set()
        #: messages whose admission notice (cut, unreadable) was sent, until handled
        self._told: set[tuple[ChannelKey, str]] = set()
        #: channels to try again after an infrastructure error, and how often they failed
        self._retries: dict[ChannelKey, int] = {}
        #: per-user token buckets (None: no rate limit)
        self._rates = (
            RateLimiter(limits.per_minute, limits.burst, self.clock)
            if limits.per_minute is not None
            else None
        )
        #: users the allowlists left out who were told so (this run)
        self._refused_users: set[tuple[str, str]] = set()
        #: channels told to slow down, until their next message goes through
        self._slowed: set[ChannelKey] = set()
        #: notices sent from receive (not awaited there), kept until done
        self._notices: set[asyncio.Future[None]] = set()
        self._started = False
        self._start_lock = asyncio.Lock()
        self._closed = False
        #: the store's channel leases, when several workers share it (set at start)
        self._leases: ChannelLeases | None = None
        self._lease_task: asyncio.Task[None] | None = None
        #: channels check_leases took whose state is not read yet (see _adopt)
        self._taken: set[ChannelKey] = set()
        #: channels whose workers wait for a claim, and the task making it (see _claim)
        self._claims: dict[ChannelKey, asyncio.Future[None]] = {}
        self._claimer: asyncio.Task[None] | None = None
        #: channels this worker gave up at its last look at the leases
        self._given_up: set[ChannelKey] = set()
        #: looks at the leases on the listener's say-so (kept: tasks are weakly held)
        self._lease_checks: set[asyncio.Task[None]] = set()

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def modes(self) -> dict[str, Template]:
        """The personalities users may switch to with /mode, by name (the default first);
        empty: one template, no /mode."""
        return self.personalities.modes

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
        self._leases = leases = self.store.leases
        if leases is not None:
            # Several workers share the store: this one recovers the channels it takes
            # (see _take), and takes those nobody holds (check_leases).
            leases.subscribe(self._notified)
            await self._check_leases_now()
            self._lease_task = asyncio.create_task(self._keep_leases(), name="turbobot:leases")
        else:
            recovery = await self._recovery()
            if recovery.unsent:
                _log.info("sending %d replies left unsent by the last run", len(recovery.unsent))
            for item in recovery.inbox:
                self._queues.setdefault(item.message.key, deque()).append(item)
            self._resume_from(recovery)
            for key in list(self._queues):
                self._wake(key)
        idle = self.settings.idle_evict_seconds
        if idle is not None:
            self._sweeper = asyncio.create_task(self._sweep(idle), name="turbobot:sweeper")
        every = self.settings.sample_seconds
        if every is not None and every > 0:
            self._sampler = asyncio.create_task(self._sample_every(every), name="turbobot:samples")

    async def sample(self) -> Sample:
        """Write this process's gauges now (the operator's health page plots them)."""
        conversations = self.conversations
        sample = Sample(
            self.clock(),
            getattr(self.store, "worker", None) or f"{socket.gethostname()}:{os.getpid()}",
            len(conversations.live),
            self._queued(),
            conversations.evictions,
            conversations.replays,
        )
        await self.store.write(StepWrite(samples=[sample]))
        return sample

    def _queued(self) -> int:
        """Inputs received and not yet handled, in this process's RAM queues."""
        return sum(map(len, self._queues.values()))

    def _arrived(self, message: IncomingMessage, at: float) -> None:
        """``message`` arrived in this process at ``at`` (it waits in RAM to be handled)."""
        arrivals = self._arrivals
        if len(arrivals) >= _ARRIVALS:  # messages handled elsewhere (another worker)
            del arrivals[next(iter(arrivals))]
        arrivals[message.key, message.message_id] = at

    async def _sample_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await self.sample()
            except Exception as exc:  # only a record: the bot goes on
                _log.debug("the gauges were not written: %s", exc)

    async def _recovery(self, keys: Sequence[ChannelKey] | None = None) -> Recovery:
        """What the store says every channel (or ``keys``) was left at, for each mode."""
        conversations = self.conversations
        recovery = await self.store.recovery(self.template.ref, keys)
        stored = set(recovery.active)
        others = recovery.others
        for mode in self.personalities.others():
            # conversations of the other modes: the default's recovery has the inbox
            # and the unsent replies already, only what is per template is taken here
            other = await self.store.recovery(mode.ref, keys)
            for key in other.active:
                self.personalities.choose(key, mode)
            stored |= other.active
            others &= other.others
            recovery.deadlines.extend(other.deadlines)
            recovery.running.extend(other.running)
        recovery.active = stored
        conversations.stored_keys |= stored
        conversations.others |= others - stored
        return recovery

    def _resume_from(self, recovery: Recovery) -> None:
        """Schedule what ``recovery`` left to do: unsent replies, deadlines, steps."""
        conversations = self.conversations
        for outgoing in recovery.unsent:
            # Sent by the channel's worker, not here: start-up never waits on the platform.
            self._outbox.keep(outgoing)
        for key, deadline in recovery.deadlines:
            conversations.arm_timer(key, deadline)
        for key in recovery.running:
            # Stopped mid-step (say, during a streamed reply): finish that step now.
            self._resume.add(key)
            self._wake(key)

    # -- several workers (docs/architecture.md, "Scale-out") ------------------------------

    async def check_leases(self) -> None:
        """Renew this worker's leases, give up idle ones, and take channels nobody holds.

        Runs every third of a lease's life; a test calls it to make it happen now.
        """
        leases = self._leases
        if leases is None:
            return
        lost = await leases.renew()
        if self._closed:
            return  # (renewed while the last steps finish: nothing new is taken)
        for key in lost:
            self._wake(key)  # its worker lets it go (another worker has it)
        idle = [key for key in leases.held() if self._idle(key)]
        if idle:
            await self.store.flush()  # (an eviction's last write must pass its fence)
            idle = [key for key in idle if self._idle(key)]
            await leases.release(idle)
        # A message committed elsewhere just before a release was refused a claim by
        # this worker's lease and may be told of after it: until the next look, those
        # channels are taken back on notice (else their message waits for the poll).
        self._given_up = set(idle)
        due = self.clock() + leases.ttl
        refs = [self.template.ref, *(mode.ref for mode in self.personalities.others())]
        # Never a channel in the middle of a step: its writes would be tagged with the
        # new generation and pass the fence, though the step began under a lost lease.
        orphans = [
            key
            for key in await leases.orphans(due, refs, limit=1000)
            if not self._workers.busy(key)
        ]
        if orphans:
            await self.store.flush()  # (what finished steps wrote passes its own fence)
        for key in await leases.claim(orphans) if orphans else ():
            self._taken.add(key)  # its worker reads its state (see _adopt)
            self._wake(key)
        for key in await leases.unread():
            if not self._workers.busy(key):
                self._reload.add(key)  # a message another worker committed, unannounced
                self._wake(key)

    def _idle(self, key: ChannelKey) -> bool:
        """Whether this worker has nothing of the channel in hand: no conversation in RAM,
        no message queued, no reply kept, no timer."""
        return not (
            key in self._taken
            or key in self.conversations.live
            or self._queues.get(key)
            or self._workers.busy(key)
            or self._outbox.has_kept(key)
            or self.conversations.deadline_of(key) is not None
            or key in self._retry_timers
            or key in self._resume
        )

    async def _keep_leases(self) -> None:
        assert self._leases is not None
        while True:
            await asyncio.sleep(self._leases.ttl / 3)
            await self._check_leases_now()

    async def _check_leases_now(self) -> None:
        """:meth:`check_leases`; a failure is logged (the next look, a third of a lease
        later, tries again)."""
        try:
            await self.check_leases()
        except Exception as exc:
            _log.warning(
                "could not renew or take channel leases (%s: %s); trying again",
                type(exc).__name__,
                exc,
            )

    def _notified(self, keys: list[ChannelKey] | None) -> None:
        """Another worker committed messages for ``keys`` (``None``: some may have been
        missed)."""
        if self._closed:
            return
        if keys is None:
            check = asyncio.get_running_loop().create_task(self._check_leases_now())
            self._lease_checks.add(check)
            check.add_done_callback(self._lease_checks.discard)
            return
        assert self._leases is not None
        for key in keys:
            # Only channels this worker holds: the worker that received the message
            # takes a free channel itself (its adapter may keep things about the message
            # in RAM, e.g. Discord's interactions); a dead holder's channels are found
            # by check_leases.
            if self._leases.holds(key):
                self._reload.add(key)  # committed elsewhere: the inbox has it, RAM not
                self._wake(key)
            elif key in self._given_up:
                self._wake(key)  # its worker takes it again (see check_leases)

    async def _take(self, key: ChannelKey) -> bool:
        """The channel's worker found it not held: take it, or let it go (``False``)."""
        assert self._leases is not None
        try:
            await self._claim(key)
        except Exception as exc:
            raise InfrastructureError(f"taking the lease of {key} failed") from exc
        if not self._leases.holds(key):  # (or check_leases took it meanwhile)
            # Another worker has it, and its messages: asked again with the next message
            # this worker receives for it (no memory of who holds what: a holder may give
            # a channel up at any moment, and a remembered "held elsewhere" then strands
            # its next message until the slow poll).
            await self._let_go(key)
            return False
        await self._adopt(key)
        return True

    async def _claim(self, key: ChannelKey) -> None:
        """Claim the channel's lease together with the other channels whose workers
        claim now (one statement for a page of new channels, as a group commit)."""
        assert self._leases is not None
        pending = self._claims.get(key)
        if pending is None:
            pending = self._claims[key] = asyncio.get_running_loop().create_future()
            if self._claimer is None:
                self._claimer = asyncio.create_task(self._claim_batches())
        await asyncio.shield(pending)

    async def _claim_batches(self) -> None:
        assert self._leases is not None
        try:
            await asyncio.sleep(0)  # (the other channels of this page join)
            while self._claims:
                batch, self._claims = self._claims, {}
                try:
                    await self._leases.claim(list(batch))
                except Exception as exc:
                    for future in batch.values():
                        future.set_exception(exc)
                        future.exception()  # (retrieved: each caller gets it too)
                    continue
                for future in batch.values():
                    future.set_result(None)
        finally:
            self._claimer = None

    async def _adopt(self, key: ChannelKey) -> None:
        """This worker took the channel. Another one may have had it since this one last
        did: what this one knew of it is stale; it is read again from the store."""
        assert self._leases is not None
        await self._let_go(key)
        try:
            recovery = await self._recovery([key])
        except Exception as exc:
            await self._leases.release([key])
            raise InfrastructureError(f"reading the state of {key} failed") from exc
        self._requeue(key, recovery.inbox)
        self._resume_from(recovery)

    async def _let_go(self, key: ChannelKey) -> None:
        """Forget everything about the channel: another worker has it."""
        self._queues.pop(key, None)
        self._reload.discard(key)
        self._resume.discard(key)
        self._slowed.discard(key)
        self._retries.pop(key, None)
        timer = self._retry_timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self._taken.discard(key)
        self._outbox.forget(key)
        await self.conversations.let_go(key)

    async def aclose(self) -> None:
        """Finish in-flight steps, commit, then close live conversations (runs ``finally``).

        A step still running after ``RuntimeSettings.stop_grace`` seconds is abandoned
        exactly as a crash would leave it: nothing of it is committed, so the next
        start does it again (its input is still in the inbox, or its conversation is
        stopped mid-step). Waiting, not committing half a step, is what makes a stop
        (Ctrl-C, SIGTERM) lose no reply.
        """
        self._closed = True
        self.conversations.stop_timers()
        if self._notices:  # (notices to people the allowlists leave out)
            _, late = await asyncio.wait(set(self._notices), timeout=self.settings.stop_grace)
            for notice in late:
                notice.cancel()
        for timer in self._retry_timers.values():
            timer.cancel()
        self._retry_timers.clear()
        self._outbox.close()
        for task in (self._sweeper, self._sampler):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
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
                await self.conversations.drop(key)  # not committed: as the store has it
        await self.conversations.close()
        await self.store.flush()
        # Renewed until here: the steps finishing above still held their channels.
        tasks: list[asyncio.Task[None] | None] = [
            self._lease_task,
            self._claimer,
            *self._lease_checks,
        ]
        for helper in tasks:
            if helper is not None:
                helper.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await helper

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
        arrived = self.clock()
        allowed = [not m.is_bot and self._allowed(m) for m in messages]
        wanted = [self._admit(m) for m, ok in zip(messages, allowed, strict=True) if ok]
        failure: IncomingBatchError | None = None
        try:
            committed = await self.store.add_incoming_many(wanted) if wanted else []
        except IncomingBatchError as exc:
            # Schedule what was committed; tell the senders of the rest (below).
            committed, failure = exc.seqs, exc
        seqs = iter(committed)
        admitted_messages = iter(wanted)
        accepted: list[bool] = []
        for message, ok in zip(messages, allowed, strict=True):
            seq = admitted = None
            if ok:
                seq, admitted = next(seqs), next(admitted_messages)
            accepted.append(seq is not None)
            if seq is None and ok:
                _log.debug("ignoring redelivered message %s in %s", message.message_id, message.key)
            elif seq is not None and admitted is not None and not self._closed:
                # (once closed, the next start has it)
                self._arrived(admitted, arrived)
                if self.metrics is not None:
                    self.metrics.messages_in.labels(message.key.platform).inc()
                self._commands.cancel_if_asked(admitted)
                if self._leases is None:
                    self._queues.setdefault(message.key, deque()).append(InboxItem(seq, admitted))
                else:
                    # Several workers: the channel's inbox is read instead. Another
                    # worker may have committed earlier messages of it, whose
                    # notification is still on its way; and a read made meanwhile (on
                    # such a notification) may have the message already, and have had
                    # it handled: queued here too, it would be handled twice.
                    self._reload.add(message.key)
                self._wake(message.key)
        if failure is not None:
            await self._refused_incoming(wanted, failure)
        return accepted

    def _allowed(self, message: IncomingMessage) -> bool:
        """The allowlists (turbobot.limits): someone left out is told once per run."""
        if self.settings.limits.allows(message):
            return True
        user = (message.key.platform, message.author_id)
        if user not in self._refused_users:
            if len(self._refused_users) >= 10_000:  # (a flood of new ids: forget, stay small)
                self._refused_users.clear()
            self._refused_users.add(user)
            _log.info("ignoring %s: user %s is not on the allowlists", message.key, user[1])
            task = asyncio.ensure_future(self._tell(message.key, self.settings.notices.not_allowed))
            self._notices.add(task)
            task.add_done_callback(self._notices.discard)
        return False

    async def _tell(self, key: ChannelKey, text: str) -> None:
        """Send a notice that is stored nowhere (its message was not stored either)."""
        await self._outbox.attempt(key, self.sender.send(key, text))

    def _throttled(self, key: ChannelKey, message: IncomingMessage) -> float:
        """Seconds the channel's next message must wait for its author's rate (0: none)."""
        if self._rates is None:
            return 0.0
        return self._rates.take((key.platform, message.author_id))

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
            await self._tell(message.key, self.settings.notices.not_stored)

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
        return self.conversations.has_conversation(key)

    def waiting(self, key: ChannelKey) -> GetUserInput | None:
        """What the channel's conversation waits for, if it is in RAM and waits."""
        live = self.conversations.live.get(key)
        return live.app.waiting if live and live.app else None

    @property
    def live_count(self) -> int:
        """Conversations currently held in RAM with a running generator."""
        return sum(1 for live in self.conversations.live.values() if live.app is not None)

    async def evict(self, key: ChannelKey) -> bool:
        """Move an idle conversation out of RAM (it comes back by replay). ``False`` if busy."""
        if self._workers.busy(key) or self._closed:
            return False
        return await self.conversations.evict(key)

    # -- scheduling ---------------------------------------------------------------------

    def _wake(self, key: ChannelKey) -> None:
        self._workers.wake(key)

    async def _work_once(self, key: ChannelKey) -> bool:
        """One run of the channel's worker (turbobot.scheduler); ``False`` stops it."""
        try:
            leases = self._leases
            if leases is not None:
                if not leases.holds(key):
                    if not await self._take(key):
                        return False
                elif key in self._taken:
                    await self._adopt(key)
            await self._drain(key)
        except LeaseLostError:
            _log.info("channel %s: another worker took it; its step here is dropped", key)
            await self._let_go(key)
            # Go on if woken meanwhile (a message received here): the next run takes the
            # channel again if it is free, or leaves it to its holder.
            return True
        except InfrastructureError as exc:
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
        await self.conversations.drop(key)
        self._retry_at(key, delay)

    async def _drain(self, key: ChannelKey) -> None:
        conversations = self.conversations
        if self._outbox.has_kept(key):
            # (a worker paused past its lease: its kept replies are the new holder's)
            await conversations.check_lease(key, ask=True)
            await self._outbox.resend(key)
        if key in self._reload:
            await self._reload_inbox(key)
        if key in self._resume:
            await self._resume_step(key)
            self._resume.discard(key)  # only once done: a failed try is tried again
        queue = self._queues.get(key)
        while queue:
            if key in self._reload:  # (another worker committed a message meanwhile)
                await self._reload_inbox(key)
                queue = self._queues.get(key)
                if not queue:
                    break
            stalled = conversations.stalled.get(key)
            if stalled is not None:
                await self._commands_first(key, queue)
                if key in conversations.stalled and not any(i.seq > stalled for i in queue):
                    return  # nothing new to retry the failed generation with
            if not queue:
                break
            wait = self._throttled(key, queue[0].message)
            if wait > 0:
                # Its author is over their rate: the queue waits, in order, and is tried
                # again when a token is back. Told once per slow-down.
                if key not in self._slowed:
                    self._slowed.add(key)
                    notice = self.settings.notices.slow_down.format(seconds=max(1.0, wait))
                    await conversations.send_standalone(key, notice)
                self._retry_at(key, wait)
                return
            if not await self._handle(key, queue[0].message):
                # The retried generation failed again: keep this message and the rest.
                conversations.stalled[key] = queue[-1].seq
                return
            done = queue.popleft()
            conversations.stalled.pop(key, None)  # handled: no failed generation waits any more
            if self._told:
                self._told.discard((key, done.message.message_id))
        self._queues.pop(key, None)
        self._slowed.discard(key)  # caught up: a later slow-down is told again
        deadline = conversations.deadline_of(key)
        if deadline is not None and self.clock() < deadline:
            # the timer ran early (or the clock stepped back)
            conversations.arm_timer(key, deadline)
        elif deadline is not None:
            live = await conversations.load(key)
            if (
                live is not None
                and await conversations.ensure_app(key, live, None)
                and live.app is not None
                and live.app.waiting is not None
            ):
                await conversations.advance(key, live, UserInput.timeout())

    async def _reload_inbox(self, key: ChannelKey) -> None:
        """Rebuild the channel's RAM queue from the store's inbox: after a step failed on
        the store, or (several workers) when messages were committed by another worker."""
        try:
            pending = await self.store.inbox(key)
        except Exception as exc:
            raise InfrastructureError(f"reading the inbox of {key} failed") from exc
        self._reload.discard(key)
        self._requeue(key, pending)

    def _requeue(self, key: ChannelKey, pending: list[InboxItem]) -> None:
        """The channel's queue is ``pending`` (its inbox as just read), then what was
        queued in RAM after it."""
        # What arrived during the read is in it, or (if committed after) still queued.
        last = pending[-1].seq if pending else 0
        later = [item for item in self._queues.get(key, ()) if item.seq > last]
        if pending or later:
            self._queues[key] = deque([*pending, *later])
        else:
            self._queues.pop(key, None)

    async def _resume_step(self, key: ChannelKey) -> None:
        """Finish the step a conversation stopped in (the process died during it).

        If the message that started the conversation is still unused in the inbox,
        whether it is input was not decided yet (see ``Conversations.begin``): it is the waking
        message again, never the answer to a question asked after it.
        """
        conversations = self.conversations
        live = await conversations.load(key)
        if live is None:
            return
        queue = self._queues.get(key)
        trigger = live.context.get("trigger") or {}
        wake = None
        if queue and queue[0].message.message_id == trigger.get("message_id"):
            wake = live.wake = queue.popleft().message
        if not await conversations.ensure_app(key, live, wake) or wake is None:
            return
        app = live.app
        if live.wake is wake and app is not None and app.waiting is not None:
            conversations.use_wake(live)  # it asked nothing: the waking message is its first input
            await conversations.advance(key, live, wake)

    async def _commands_first(self, key: ChannelKey, queue: deque[InboxItem]) -> None:
        """While a failed generation waits, handle the commands queued behind it.

        ``/start`` and ``/reset`` end the conversation: the messages that waited in
        front of them are noted in it (its transcript keeps them) and not answered.
        """
        conversations = self.conversations
        index = 0
        while index < len(queue):
            message = queue[index].message
            call = self._commands.parse(message)
            if call is None:
                index += 1
                continue
            if call.name in ("start", "reset"):  # (the registry names /new start)
                live = await conversations.load(key)
                for _ in range(index):
                    waiting = queue.popleft().message
                    if live is not None:
                        conversations.note_user(live, waiting)
                    else:
                        await conversations.write(
                            StepWrite(consumed=[(waiting.key, waiting.message_id)])
                        )
                index = 0
            del queue[index]
            await self._handle(key, message)
            if key not in conversations.stalled:
                return

    def _retry_at(self, key: ChannelKey, delay: float) -> None:
        """Try the channel again in ``delay`` seconds (its own timer, not its deadline's)."""
        if self._closed:
            return
        previous = self._retry_timers.pop(key, None)
        if previous is not None:
            previous.cancel()
        self._retry_timers[key] = self._call_later(delay, self._retry_due, key)

    def _retry_due(self, key: ChannelKey) -> None:
        self._retry_timers.pop(key, None)
        self._wake_unless_closed(key)

    def _wake_unless_closed(self, key: ChannelKey) -> None:
        if not self._closed:
            self._wake(key)

    async def _sweep(self, idle: float) -> None:
        while True:
            await asyncio.sleep(max(0.05, idle / 2))
            cutoff = time.monotonic() - idle
            for key in [k for k, live in self.conversations.live.items() if live.used_at < cutoff]:
                await self.evict(key)

    async def _enforce_cap(self) -> None:
        cap = self.settings.max_live
        if cap is None or self._closed:
            return
        live = self.conversations.live
        excess = len(live) - cap
        if excess <= 0:
            return
        # The least recently used first, and only as many as are over the cap (plus a
        # few, for busy ones): listing every live key each step cost O(cap) per step.
        for key in list(itertools.islice(live, excess + 8)):
            if len(live) <= cap:
                break
            await self.evict(key)

    # -- one message --------------------------------------------------------------------

    async def _handle(self, key: ChannelKey, message: IncomingMessage) -> bool:
        """Handle one inbox message; ``False`` leaves it in the inbox."""
        token = answering.set(message)
        arrival = message_arrived.set(self._arrivals.pop((message.key, message.message_id), None))
        try:
            handled = await self._handle_message(key, message)
        finally:
            message_arrived.reset(arrival)
            answering.reset(token)
        if handled:
            try:
                await self.sender.handled(message)
            except Exception as exc:  # the platform's bookkeeping never stops a channel
                _log.debug("channel %s: the sender's handled() failed: %s", key, exc)
        return handled

    async def _over_budget(self, key: ChannelKey, message: IncomingMessage) -> bool:
        """If the author used today's tokens: say so, use the message up, ``True``."""
        budget = self._budget
        if budget is None:
            return False
        try:
            exhausted = await budget.exhausted(key.platform, message.author_id)
        except Exception as exc:
            raise InfrastructureError(f"reading the usage of {message.author_id} failed") from exc
        if not exhausted:
            return False
        text = self.settings.notices.over_budget.format(
            limit=budget.per_day, renews=duration(budget.renews_in())
        )
        await self.conversations.send_standalone(key, text, consumed=message)
        return True

    async def _handle_message(self, key: ChannelKey, message: IncomingMessage) -> bool:
        conversations = self.conversations
        if self.personalities and not (
            self.personalities.known(key) or conversations.has_conversation(key)
        ):
            # commands too: /start starts the channel's mode
            try:
                await self.personalities.recall(key, self.store.conversations)
            except Exception as exc:
                raise InfrastructureError(f"reading the conversations of {key} failed") from exc
        call = self._commands.parse(message)
        if call is not None:
            if call.name not in GENERATING or not await self._over_budget(key, message):
                await self._commands.run(key, call)
            return True
        notices = self.settings.notices
        admission = self._admission_notice(message)
        if admission is not None and (key, message.message_id) not in self._told:
            # Once per message, even if a failed retry makes it wait and come back.
            self._told.add((key, message.message_id))
            await conversations.send_standalone(key, admission)
        if not message.text.strip():
            # Media without a caption: nothing for a template to read. The message
            # stays stored (in the inbox, with its attachments); it is answered, not used.
            await conversations.send_standalone(key, notices.text_only, consumed=message)
            return True
        if await self._over_budget(key, message):
            return True
        loaded = await conversations.load(key)
        if loaded is None:
            await conversations.begin(key, message)
            return True
        live = loaded
        if not await conversations.ensure_app(key, live, message):
            return True  # the replay diverged; ``message`` started a new conversation
        if live.broken:
            return False  # the retried generation failed again; keep the message
        if not live.active:
            # The rebuild finished the conversation (it ended in a step that crashed
            # before being recorded as ended): this message starts the next one.
            await conversations.begin(key, message)
            return True
        if live.app is not None and live.app.waiting is not None:
            trigger = live.app.context.trigger
            if trigger is not None and trigger.message_id == message.message_id:
                # The waking message, stored with the conversation's first step, whose
                # use as input was not committed (the process stopped): use it now.
                conversations.step(live).consumed.append((key, message.message_id))
            else:
                conversations.note_user(live, message)
            await conversations.advance(key, live, message)
            return True
        _log.error("channel %s: conversation %s is not waiting", key, live.id)
        return False
