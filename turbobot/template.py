"""Templates: ``@turbo`` async generators, and the ``App`` engine that drives them.

A template is an async generator function decorated with :func:`turbo`. Calling it
returns an :class:`App`: an async iterator of *outputs* (what a user should see) that
handles everything else the template yields (memory, LLM calls, tools, steps,
sub-templates). The protocol of each yield is documented in :mod:`turbobot.signals`.

Every value sent into the template (user input, LLM result, tool result, step
result, timeout, error) is appended to ``App.journal`` together with a running hash
(``chain``) of everything the template yielded before it. An App created with a
journal to replay feeds those values back instead of calling the LLM, sends nothing
already sent, and checks each chain, so a conversation can be rebuilt after a
failure, an eviction or a restart. Templates must therefore be deterministic given
what they receive: wrap time, randomness and outside calls in :class:`Step`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import hashlib
import inspect
import logging
import sys
import typing
import weakref
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias, overload

from turbobot.cache import BaseCache
from turbobot.chat import IncomingMessage, TemplateContext
from turbobot.codec import json_problem
from turbobot.exceptions import (
    ConfigurationError,
    InvalidYieldError,
    LLMError,
    ReplayDivergedError,
    TemplateError,
)
from turbobot.journal import JournalEntry
from turbobot.llm.base import LLM, LLMRequest, LLMResponse
from turbobot.llm.tools import call_tool, tool_schema
from turbobot.memory import BaseMemory, LocalMemory, SummaryMemory
from turbobot.messages import (
    Assistant,
    Example,
    Message,
    Messages,
    ToolMessage,
    message_from_dict,
)
from turbobot.metrics import model_call_ended, model_call_started, step_clock
from turbobot.signals import (
    Delegate,
    Generate,
    GetUserInput,
    Patched,
    Result,
    Return,
    Step,
    UserInput,
)
from turbobot.tokens import context_window_for, token_counter_for

__all__ = [
    "INTERRUPTED",
    "App",
    "AssistantStream",
    "JournalEntry",
    "Output",
    "Template",
    "run",
    "run_chat",
    "turbo",
]

#: what ends the part of a reply shown before its generation broke off (adapters show
#: it, the transcript records it: what the user saw and the transcript agree)
INTERRUPTED = "\u2026 [interrupted]"

_log = logging.getLogger(__name__)

#: settings the engine consumes itself; every other setting goes to the LLM request
ENGINE_SETTINGS = frozenset(
    {"model", "memory", "cache", "debug", "context_window", "llm", "max_tool_rounds", "commands"}
)
DEFAULT_MAX_TOOL_ROUNDS = 8

TemplateFn: TypeAlias = Callable[..., AsyncGenerator[Any, Any]]


class Template:
    """A template function plus its settings. Made by :func:`turbo`."""

    __slots__ = ("__dict__", "fn", "ref", "settings")

    def __init__(self, fn: TemplateFn, settings: Mapping[str, Any]) -> None:
        # An ``async def`` without ``yield`` is refused when its app starts, not here: a
        # sketch such as turbo-chat's ``async def app(): ...`` must still import.
        if not inspect.isasyncgenfunction(fn) and not inspect.iscoroutinefunction(fn):
            raise TemplateError(self._not_a_generator(fn))
        self.fn = fn
        self.settings: dict[str, Any] = dict(settings)
        self.ref = f"{_stable_module(fn.__module__)}:{fn.__qualname__}"
        functools.update_wrapper(self, fn)

    @staticmethod
    def _not_a_generator(fn: Any) -> str:
        return (
            f"@turbo needs an async generator function (async def with yield); "
            f"{getattr(fn, '__qualname__', fn)!r} is not one"
        )

    @property
    def problem(self) -> str | None:
        """Why this template cannot run (its function never yields), or ``None``."""
        return None if inspect.isasyncgenfunction(self.fn) else self._not_a_generator(self.fn)

    def configure(
        self, new_settings: Mapping[str, Any] | None = None, /, **settings: Any
    ) -> Template:
        """A new template with these settings merged over the current ones (all kept).

        Settings come as keywords, as a dict (turbo-chat's ``configure(new_settings)``),
        or both (the keywords win).
        """
        return Template(self.fn, {**self.settings, **(new_settings or {}), **settings})

    @functools.cached_property
    def _parameters(self) -> _Parameters:
        return _Parameters.of(self.fn)

    def __call__(self, *args: Any, **kwargs: Any) -> App:
        return App(self, args, kwargs)

    def __repr__(self) -> str:
        return f"<Template {self.ref} {self.settings!r}>"


@dataclass(frozen=True, slots=True)
class _Parameters:
    """What a template function declares, for what the engine passes it by name."""

    #: the parameters a positional argument can fill, in order
    positional: tuple[str, ...]
    #: every parameter that has a name of its own (not ``*args`` or ``**kwargs``)
    named: frozenset[str]
    #: where the runtime's :class:`TemplateContext` goes: the parameter annotated
    #: ``TemplateContext``, else one called ``context``
    context: str | None

    @classmethod
    def of(cls, fn: Callable[..., Any]) -> _Parameters:
        params = inspect.signature(fn).parameters.values()
        named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        positional = tuple(
            p.name for p in named if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        )
        annotated = [p.name for p in named if _is_context_annotation(p.annotation)]
        context = annotated[0] if annotated else None
        if context is None and any(p.name == "context" for p in named):
            context = "context"
        return cls(positional, frozenset(p.name for p in named), context)

    def free(self, name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
        """``name`` is a parameter the caller left for the engine to fill."""
        return (
            name in self.named and name not in kwargs and name not in self.positional[: len(args)]
        )


def _is_context_annotation(annotation: Any) -> bool:
    """``TemplateContext``, ``TemplateContext | None`` or ``Optional[...]``, as a type
    or as the string ``from __future__ import annotations`` leaves."""
    if isinstance(annotation, str):
        words = {
            w.rpartition(".")[2]
            for w in annotation.replace("|", " ").replace("[", " ").replace("]", " ").split()
        }
        return "TemplateContext" in words
    if annotation is TemplateContext:
        return True
    return TemplateContext in typing.get_args(annotation)


def _stable_module(module: str) -> str:
    """The module part of a template's ref: the bundled bots keep the name they were
    stored under before they were packaged as ``turbobot.bots`` (``bots.horoscope``),
    so their conversations belong to them across that change."""
    return module[len("turbobot.") :] if module.startswith("turbobot.bots.") else module


def _skip_loop_tracking(gen: AsyncGenerator[Any, Any]) -> None:
    """Keep the event loop from tracking ``gen`` (a weak reference per generator).

    An async generator calls the loop's hooks the first time an ``asend`` is made;
    making one (never awaited) with the hooks off marks it as seen. Whoever runs it
    closes it; if it is collected unclosed, Python closes it synchronously.
    """
    hooks = sys.get_asyncgen_hooks()
    sys.set_asyncgen_hooks(firstiter=None, finalizer=None)
    try:
        _ = gen.asend(None)  # not a coroutine: dropping it unawaited is silent
    finally:
        sys.set_asyncgen_hooks(*hooks)


@overload
def turbo(fn: TemplateFn, /) -> Template: ...


@overload
def turbo(fn: None = None, /, **settings: Any) -> Callable[[TemplateFn], Template]: ...


def turbo(
    fn: TemplateFn | None = None, /, **settings: Any
) -> Template | Callable[[TemplateFn], Template]:
    """Make an async generator function a template: ``@turbo`` or ``@turbo(model=...)``.

    Settings: ``model``, ``temperature``, ``max_tokens`` and any other chat-completion
    parameter; ``memory`` (a :class:`BaseMemory` subclass or factory), ``cache`` (a
    :class:`BaseCache`), ``context_window``, ``llm`` (an :class:`LLM`), ``debug``.
    """
    if fn is not None:
        return Template(fn, settings)

    def decorate(inner: TemplateFn) -> Template:
        return Template(inner, settings)

    return decorate


class AssistantStream:
    """An assistant reply that is still being generated, yielded when ``stream=True``.

    Iterate it for text fragments; :attr:`message` holds the final message once the
    iteration has ended. The App finishes the generation itself when resumed, whether
    or not the stream was read.
    """

    def __init__(self) -> None:
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.message: Assistant | None = None
        self.parts: list[str] = []
        #: when the first fragment came (the running step's clock; ``None``: none yet)
        self.first_at: float | None = None
        #: the generation is over (``message`` is ``None`` if it failed)
        self.closed = False
        self._closed_event: asyncio.Event | None = None

    async def push(self, delta: str) -> None:
        if not self.parts:
            # the reply's first byte goes to the adapter: the step's latency, once the
            # adapter showed it (see Conversations._say_stream)
            self.first_at = step_clock()
        self.parts.append(delta)
        self._queue.put_nowait(delta)

    def close(self, message: Assistant | None) -> None:
        self.message = message
        self.closed = True
        self._queue.put_nowait(None)
        if self._closed_event is not None:
            self._closed_event.set()

    async def wait_closed(self) -> None:
        """Wait until the generation is over, however far the stream was read."""
        if not self.closed:
            if self._closed_event is None:
                self._closed_event = asyncio.Event()
            await self._closed_event.wait()

    @property
    def text(self) -> str:
        return self.message.content if self.message is not None else "".join(self.parts)

    @property
    def interrupted(self) -> bool:
        """The generation broke off after some text was produced (it is not an answer)."""
        return self.closed and self.message is None and bool(self.parts)

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        while True:
            delta = await self._queue.get()
            if delta is None:
                return
            yield delta


_NO_KWARGS: dict[str, Any] = {}  # shared, never changed
_INPUT = object()
_STREAM = object()
#: ``App._pending`` before the first step
_FRESH = object()
#: generation tasks stopped by ``App.cancel_generation`` (``/cancel``)
_CANCELLED: weakref.WeakSet[asyncio.Future[Any]] = weakref.WeakSet()
#: LLM clients an app made for itself (no ``llm`` bound); closed when it ends
_MADE_BY_APPS: weakref.WeakSet[LLM] = weakref.WeakSet()
#: ``App.replay_until`` of a replay that stopped waiting for input
_UNTIL_WAITING = sys.maxsize
#: the journal of every app that has not journaled anything yet; never appended to
_NO_ENTRIES: list[JournalEntry] = []

#: what an App yields to its consumer
Output: TypeAlias = Assistant | Result | GetUserInput | AssistantStream


@dataclass(frozen=True, slots=True)
class _Throw:
    """An error to throw into the template at its next step (instead of a value)."""

    error: BaseException


@dataclass(slots=True)
class _Frame:
    template: Template
    gen: AsyncGenerator[Any, Any]


class App:
    """A running template: an async iterator of :data:`Output`.

    Send the user's text with :meth:`asend` when it yields a :class:`GetUserInput`.
    Call :meth:`bind` before the first step to choose the LLM, memory, context and a
    journal to replay.
    """

    __slots__ = (
        "_chain",
        "_gen",
        "_legacy",
        "_pending",
        "_replay",
        "_send",
        "_stack",
        "_task",
        "_untracked",
        "args",
        "cache",
        "context",
        "done",
        "journal",
        "journal_base",
        "kwargs",
        "llm",
        "memory",
        "replay_until",
        "result",
        "template",
        "waiting",
        "yields",
    )

    def __init__(self, template: Template, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.template = template
        self.args = args
        # the common call, template(), would otherwise keep an empty dict per app
        self.kwargs = kwargs or _NO_KWARGS
        self.context = TemplateContext()
        self.memory: BaseMemory = _make_memory(template.settings.get("memory"))
        self.llm: LLM | None = template.settings.get("llm")
        self.cache: BaseCache | None = template.settings.get("cache")
        #: shared and empty until the first entry (see ``_journal``)
        self.journal: list[JournalEntry] = _NO_ENTRIES
        #: entries dropped from the front of ``journal`` by :meth:`forget_journal`
        self.journal_base = 0
        #: number of yields handled so far; outputs at or below ``replay_until`` are not re-sent
        self.yields = 0
        self.replay_until = 0
        self.result: Any = None
        self.done = False
        self.waiting: GetUserInput | None = None
        self._replay: deque[JournalEntry] | None = None
        #: what the template gets next: a value to send, or a _Throw
        self._send: Any = None
        #: why the app stopped last: not started yet, waiting for input, or for a stream
        self._pending: object | None = _FRESH
        self._task: asyncio.Future[Assistant] | None = None
        #: running hash of every yield so far (16 bytes: a hasher object costs 400)
        self._chain = b""
        #: the chain by the rule before issue 10 (message texts included), while a journal
        #: that may have been written by it is replayed
        self._legacy: bytes | None = None
        #: the template's generator, then the delegated sub-templates' (innermost last;
        #: a list only once something is delegated)
        self._gen: AsyncGenerator[Any, Any] | None = None
        self._stack: list[_Frame] | None = None
        self._untracked = False

    # -- set-up -------------------------------------------------------------------

    def bind(
        self,
        *,
        llm: LLM | None = None,
        memory: BaseMemory | None = None,
        context: TemplateContext | None = None,
        cache: BaseCache | None = None,
        replay: list[JournalEntry] | None = None,
        replay_until: int = 0,
        stopped_waiting: bool = False,
        owned: bool = False,
    ) -> App:
        """Choose collaborators before the first step. Returns ``self``.

        Args:
            replay: journal entries to feed back instead of doing their effects.
            replay_until: the ``yields`` count at which the replayed run stopped;
                outputs up to it were already delivered and are not yielded again.
            stopped_waiting: the replayed run stopped waiting for input: every output
                up to the first ``GetUserInput`` after the journal was delivered
                (``replay_until`` is then ignored: a redeployed template may yield
                more or fewer messages than the one that ran; see
                docs/architecture.md, "Replay and its rules").
            owned: the caller promises to ``aclose()`` the app when it drops it
                unfinished (the runtime does). Its generators are then not registered
                with the event loop for clean-up at shutdown, which saves ~110 bytes
                per conversation.
        """
        if self.started:
            raise RuntimeError("App.bind() must be called before the app starts")
        if llm is not None:
            self.llm = llm
        if memory is not None:
            self.memory = memory
        if context is not None:
            self.context = context
        if cache is not None:
            self.cache = cache
        if replay:
            self._replay = deque(replay)
            self._legacy = b""
        self.replay_until = _UNTIL_WAITING if stopped_waiting else replay_until
        self._untracked = owned
        return self

    @property
    def started(self) -> bool:
        return self._pending is not _FRESH

    @property
    def journal_length(self) -> int:
        """How many entries the journal has had (forgotten ones included)."""
        return self.journal_base + len(self.journal)

    def forget_journal(self) -> None:
        """Drop the entries recorded so far from RAM (their owner has stored them)."""
        self.journal_base += len(self.journal)
        self.journal = _NO_ENTRIES

    @property
    def replaying(self) -> bool:
        """True while recorded values are still being fed back."""
        return bool(self._replay)

    # -- async iterator protocol --------------------------------------------------

    def __aiter__(self) -> App:
        return self

    async def __anext__(self) -> Output:
        return await self.asend(None)

    async def asend(self, value: Any = None) -> Output:
        """Resume the app with ``value`` (the user's input when it is waiting).

        Raises:
            StopAsyncIteration: the template has finished.
            TemplateError: it waits for input and ``value`` is ``None``.
        """
        if self.done:
            raise StopAsyncIteration
        if self._pending is _INPUT:
            given = _as_input(value)  # raises while still waiting: the state is kept
        try:
            if self._pending is _FRESH:
                self._pending = None
                if type(self.memory).init is not BaseMemory.init:
                    await self.memory.init(self._call_context())
                self._gen = self._open_frame(self.template, self.args, self.kwargs)
            elif self._pending is _INPUT:
                self._record(
                    "timeout" if given.timed_out else "input",
                    None if given.timed_out else given.to_json(),
                )
                self._pending, self.waiting, self._send = None, None, given
            elif self._pending is _STREAM:
                task, self._task, self._pending = self._task, None, None
                assert task is not None
                if not task.done():
                    await asyncio.wait([task])
                try:
                    self._send = task.result()
                except LLMError as exc:
                    self._record_error(exc)
                except asyncio.CancelledError:
                    if task not in _CANCELLED:
                        raise
                    self._send = self._cancelled()
            return await self._run()
        except StopAsyncIteration:
            self.done = True
            await self._close_own_llm()
            raise
        except BaseException:
            await self.aclose()  # run the templates' finally blocks
            raise

    async def _close_own_llm(self) -> None:
        """Close the client the app made itself (a template stepped by hand, with no
        ``llm`` bound): its connections would otherwise stay open until exit."""
        llm = self.llm
        if llm is not None and llm in _MADE_BY_APPS:
            _MADE_BY_APPS.discard(llm)
            self.llm = None
            await llm.aclose()

    async def aclose(self) -> None:
        """Stop the template, running its ``finally`` blocks."""
        self.done = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._task = None
        for frame in reversed(self._stack or ()):
            await frame.gen.aclose()
        self._stack = None
        if self._gen is not None:
            gen, self._gen = self._gen, None
            await gen.aclose()
        await self._close_own_llm()

    def structure(self) -> str:
        """Yielded by a template, an app is a sub-template: part of the structure."""
        return f"Delegate|{self.template.ref}"

    async def run(self, input: str | None = None) -> Result:
        """turbo-chat's ``app.run(input)``: step to the next input request or the end."""
        output, done = await run(self, input)
        content = getattr(output, "content", None) or ""
        return Result(content=content, done=done)

    # -- the engine ----------------------------------------------------------------

    def _name(self) -> str:
        return self._stack[-1].template.ref if self._stack else self.template.ref

    def _settings(self) -> dict[str, Any]:
        settings = dict(self.template.settings)
        for frame in self._stack or ():
            settings.update(frame.template.settings)
        return settings

    def _call_context(self) -> Any:
        """The context the template was called with, else the runtime's."""
        params, args, kwargs = self.template._parameters, self.args, self.kwargs
        name = params.context
        if name is None or params.free(name, args, kwargs):
            return self.context
        return kwargs[name] if name in kwargs else args[params.positional.index(name)]

    def _open_frame(
        self, template: Template, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> AsyncGenerator[Any, Any]:
        # What the caller passed wins; the engine fills only the parameters left free
        # (see README, "Writing templates").
        problem = template.problem
        if problem is not None:
            raise TemplateError(problem)
        params = template._parameters
        injected = dict(kwargs)
        if params.free("memory", args, kwargs):
            injected["memory"] = self.memory
        if params.context is not None and params.free(params.context, args, kwargs):
            injected[params.context] = self.context
        if params.free("settings", args, kwargs):
            injected["settings"] = self._settings()
        gen = template.fn(*args, **injected)
        if self._untracked:
            _skip_loop_tracking(gen)
        return gen

    def _top(self) -> AsyncGenerator[Any, Any] | None:
        return self._stack[-1].gen if self._stack else self._gen

    def _drop_top(self) -> bool:
        """Forget the innermost generator; ``True`` if it was the template's own."""
        if self._stack:
            self._stack.pop()
            return False
        self._gen = None
        return True

    def _fingerprint(self, item: Any) -> None:
        """Add ``item`` to the chain if it is part of the template's structure.

        Only yields that receive a value (input, generate, tool, step), the names of
        steps, tools and sub-templates count: a message's text may change between
        deploys. While a journal written before this rule is replayed, the old chain
        (every yield, with its text) is kept beside it (``_legacy``).
        """
        structure = getattr(item, "structure", None)
        if structure is not None:
            self._chain = hashlib.blake2b(
                self._chain + structure().encode("utf-8", "surrogatepass"), digest_size=16
            ).digest()
        if self._legacy is not None:
            describe = getattr(item, "fingerprint", None)
            text = describe() if describe is not None else type(item).__name__
            self._legacy = hashlib.blake2b(
                self._legacy + text.encode("utf-8", "surrogatepass"), digest_size=16
            ).digest()

    def _take(self, kinds: tuple[str, ...]) -> JournalEntry | None:
        """The next recorded value if replaying, checked against the current chain."""
        if not self._replay:
            return None
        entry = self._replay.popleft()
        if not self._replay:
            self._replay = None
        chain = self._chain.hex()
        matches = entry.chain == chain
        if self._legacy is not None:
            if not matches:
                matches = entry.chain == self._legacy.hex()
            elif not self.journal_length:
                self._legacy = None  # a journal of the structural rule from its start
        if not self._replay:
            self._legacy = None
        if entry.kind not in kinds or not matches:
            raise ReplayDivergedError(
                f"template {self._name()} no longer matches its recorded conversation at "
                f"journal entry {self.journal_length} (expected a {entry.kind!r} value, the "
                f"template asked for {'/'.join(kinds)}); its code probably changed",
                position=self.journal_length,
            )
        self._journal(entry)
        return entry

    def _record(self, kind: str, value: Any) -> None:
        self._journal(JournalEntry(kind, value, self._chain.hex()))

    def _journal(self, entry: JournalEntry) -> None:
        # A conversation waiting at its first question has journaled nothing: it shares
        # one empty list until then (a list of its own would cost 56 bytes).
        if self.journal is _NO_ENTRIES:
            self.journal = []
        self.journal.append(entry)

    def _live_output(self) -> bool:
        return not self._replay and self.yields > self.replay_until

    def _patched(self, change: str) -> bool:
        """See :class:`~turbobot.signals.Patched`."""
        replay = self._replay
        if replay:
            entry = replay[0]
            if entry.kind == "patch" and entry.value == change:
                self._take(("patch",))
                return True
            return False  # recorded before this change: the old path
        if self.replay_until == _UNTIL_WAITING:
            return False  # still where the old code had brought the conversation
        self._record("patch", change)
        return True

    async def _run(self) -> Output:
        """Drive the template until it produces an output; raise StopAsyncIteration at its end.

        The App is a state machine, not an async generator: between outputs, only its
        attributes remain (what to send or throw next, whether it waits for input or
        for a stream), which keeps a waiting conversation small.
        """
        while (gen := self._top()) is not None:
            send, self._send = self._send, None
            throw = send.error if type(send) is _Throw else None
            try:
                item = await (gen.athrow(throw) if throw else gen.asend(send))
            except StopAsyncIteration:
                self._drop_top()
                continue
            except Exception as exc:
                if self._drop_top():
                    if exc is throw and self.journal and self.journal[-1].kind == "error":
                        # Nobody caught the LLM failure: forget it so that a replay stops at
                        # the Generate and retries it; that Generate's output was never
                        # delivered, so a replay must deliver it.
                        self.journal.pop()
                        self.yields -= 1
                    raise
                self._send = _Throw(exc)
                continue
            self.yields += 1
            self._fingerprint(item)

            if isinstance(item, Message):
                await self.memory.append(item)
                if isinstance(item, Assistant) and item.forward and self._live_output():
                    return item
            elif type(item) in (Messages, Example, list, tuple) and all(
                isinstance(m, Message) for m in item
            ):
                await self.memory.extend(item)
            elif isinstance(item, Generate):
                try:
                    if item.stream and item.forward and self._live_output():
                        stream = AssistantStream()
                        self._task = asyncio.ensure_future(self._generate(item, stream))
                        self._pending = _STREAM
                        return stream
                    message = await self._generate_cancellable(item)
                    self._send = message
                    if message.forward and self._live_output():
                        return message
                except LLMError as exc:
                    self._record_error(exc)
            elif isinstance(item, GetUserInput):
                if item.message is not None and item.record:
                    await self.memory.append(Assistant(item.message))
                entry = self._take(("input", "timeout"))
                if entry is None:
                    self.waiting = item
                    self._pending = _INPUT
                    live = self._live_output()
                    if self.replay_until == _UNTIL_WAITING:
                        self.replay_until = self.yields  # where it waited: later output is new
                    return item if live else GetUserInput(timeout=item.timeout)
                self._send = _input_from_json(entry)
            elif isinstance(item, Result):
                if self._live_output():
                    return item
            elif isinstance(item, Patched):
                self._send = self._patched(item.change)
            elif isinstance(item, Step):
                entry = self._take(("step", "error"))
                if entry is None:
                    await self._step(item)
                elif entry.kind == "step":
                    self._send = entry.value
                else:  # a refused result, refused again
                    self._send = _Throw(TemplateError(entry.value.get("message", "")))
            elif isinstance(item, (Delegate, App)):
                sub = item.app if isinstance(item, Delegate) else item
                if self._stack is None:
                    self._stack = []
                opened = self._open_frame(sub.template, sub.args, sub.kwargs)
                self._stack.append(_Frame(sub.template, opened))
            elif isinstance(item, Return):
                await gen.aclose()
                if self._drop_top():
                    self.result = item.value
                self._send = item.value
            else:
                raise InvalidYieldError(
                    f"template {self._name()} yielded {item!r} ({type(item).__name__}), which "
                    "is not a message or a signal; yield System/User/Assistant/Example*, Messages, "
                    "Generate, GetUserInput, Result, Step, Delegate or Return",
                    template=self._name(),
                    value=item,
                )
        raise StopAsyncIteration

    async def _step(self, item: Step) -> None:
        value = item.fn(*item.args, **item.kwargs)
        if inspect.isawaitable(value):
            value = await value
        problem = json_problem(value)
        if problem is None:
            self._record("step", value)
            self._send = value
            return
        # Refused here, where the template can see why, not later in the store; the
        # refusal is journaled, so that a replay refuses it again at the same point.
        error = TemplateError(
            f"template {self._name()}: Step {getattr(item.fn, '__qualname__', item.fn)!s} "
            f"returned {_short_repr(value)}, which cannot be journaled: {problem}. A Step "
            "must return JSON values (str, int, float, bool, None, lists, dicts with str keys)"
        )
        self._record("error", {"type": "TemplateError", "message": str(error)})
        self._send = _Throw(error)

    def cancel_generation(self) -> bool:
        """Stop the generation in progress (``/cancel``). ``False`` if there is none.

        The template's ``Generate`` then gets an empty reply that is neither sent nor
        added to memory; the cancellation is journaled, so a replay agrees.
        """
        task = self._task
        if task is None or task.done():
            return False
        _CANCELLED.add(task)  # (a set, not a slot: most apps are never cancelled)
        task.cancel()
        return True

    async def _generate_cancellable(self, item: Generate) -> Assistant:
        if self._replay:  # from the journal: nothing to cancel, no task to pay for
            return await self._generate_rounds(item, None)  # (no stream to close)
        self._task = task = asyncio.ensure_future(self._generate(item, None))
        try:
            return await task
        except asyncio.CancelledError:
            if not (task in _CANCELLED and task.cancelled()):
                raise  # the caller was cancelled, not the generation
            return self._cancelled()
        finally:
            self._task = None

    def _cancelled(self) -> Assistant:
        self._record("cancelled", None)
        return Assistant("", forward=False)

    def _record_error(self, exc: LLMError) -> None:
        """Throw ``exc`` into the template; journal it unless it came from the journal."""
        if isinstance(exc, _ReplayedLLMError):
            self._send = _Throw(exc.error)
            return
        self._record("error", {"type": type(exc).__name__, "message": str(exc)})
        self._send = _Throw(exc)

    async def _generate(self, signal: Generate, stream: AssistantStream | None) -> Assistant:
        message: Assistant | None = None
        try:
            message = await self._generate_rounds(signal, stream)
            return message
        finally:
            if stream is not None:
                stream.close(message)

    async def _generate_rounds(self, signal: Generate, stream: AssistantStream | None) -> Assistant:
        # Built only when needed: a replay mostly reads the recorded reply and goes on.
        settings: dict[str, Any] | None = None
        if isinstance(self.memory, SummaryMemory):
            settings = {**self._settings(), **signal.settings}
            await self._summarise(self.memory, settings)
        rounds_done = 0
        while True:
            entry = self._take(("generate", "error", "cancelled"))
            if entry is not None:
                if entry.kind == "error":
                    raise _ReplayedLLMError(_error_from_json(entry.value))
                if entry.kind == "cancelled":
                    return Assistant("", forward=False)
                message = message_from_dict(entry.value)
                assert isinstance(message, Assistant)
            else:
                if settings is None:
                    settings = {**self._settings(), **signal.settings}
                schemas = [tool_schema(t) for t in signal.tools]
                response = await self._complete(settings, schemas, stream)
                message = response.to_message(forward=signal.forward)
                self._record("generate", message.to_dict())
            await self.memory.append(message)
            if not message.tool_calls:
                return message
            for call in message.tool_calls:
                tool_entry = self._take(("tool",))
                if tool_entry is not None:
                    output = str(tool_entry.value)
                else:
                    output = await call_tool(signal.tools, call.name, call.arguments)
                    self._record("tool", output)
                await self.memory.append(ToolMessage(output, name=call.name, tool_call_id=call.id))
            if settings is None:
                settings = {**self._settings(), **signal.settings}
            rounds = int(settings.get("max_tool_rounds", DEFAULT_MAX_TOOL_ROUNDS))
            rounds_done += 1
            if rounds_done > rounds:
                raise TemplateError(
                    f"template {self._name()}: the model kept calling tools for {rounds} "
                    "rounds; raise max_tool_rounds or check the tools' answers"
                )

    async def _summarise(self, memory: SummaryMemory, settings: Mapping[str, Any]) -> None:
        """Fold the oldest turns of a :class:`SummaryMemory` into its summary if the
        prompt outgrew it: one journaled model call (a replay folds the recorded one)."""
        replay = self._replay
        if replay:
            if replay[0].kind == "summary":
                entry = self._take(("summary",))
                assert entry is not None
                memory.fold(int(entry.value["upto"]), str(entry.value["text"]))
            return  # a replay folds where the journal did, never anywhere else
        if self.llm is None:
            from turbobot.llm.openai import OpenAILLM

            self.llm = OpenAILLM()
            _MADE_BY_APPS.add(self.llm)
        model, window, reserve = _window(settings, self.llm)
        plan = memory.plan(
            counter=token_counter_for(model), context_window=window, max_tokens=reserve
        )
        if plan is None:
            return
        request = LLMRequest(
            messages=plan.messages,
            model=model,
            settings={"max_tokens": memory.summary_tokens, "temperature": 0},
        )
        started = model_call_started()
        try:
            response = await self.llm.complete(request)
        except BaseException:
            model_call_ended(model, started, failed=True)
            raise
        model_call_ended(model, started)
        text = response.content.strip()
        summary: dict[str, Any] = {"upto": plan.upto, "text": text}
        if response.usage is not None:  # counted in the user's token use
            summary["usage"] = [response.usage.prompt_tokens, response.usage.completion_tokens]
        self._record("summary", summary)
        memory.fold(plan.upto, text)

    async def _complete(
        self,
        settings: dict[str, Any],
        schemas: list[dict[str, Any]],
        stream: AssistantStream | None,
    ) -> LLMResponse:
        if self.llm is None:
            from turbobot.llm.openai import OpenAILLM

            self.llm = OpenAILLM()
            _MADE_BY_APPS.add(self.llm)
        return await _complete(
            self.memory,
            self.llm,
            self.cache,
            settings,
            schemas=schemas,
            on_delta=stream.push if stream is not None else None,
            name=self._name(),
        )


async def _complete(
    memory: BaseMemory,
    llm: LLM,
    cache: BaseCache | None,
    settings: Mapping[str, Any],
    *,
    schemas: list[dict[str, Any]],
    on_delta: Callable[[str], Awaitable[None]] | None,
    name: str,
) -> LLMResponse:
    """One completion over ``memory``'s prompt (trimmed to the window), through the cache."""
    model, window, reserve = _window(settings, llm)
    messages = await memory.prepare_prompt(
        counter=token_counter_for(model), context_window=window, max_tokens=reserve
    )
    extra = {k: v for k, v in settings.items() if k not in ENGINE_SETTINGS and v is not None}
    request = LLMRequest(messages=messages, model=model, settings=extra, tools=schemas)
    if settings.get("debug"):
        _log.debug("template %s prompt: %r", name, messages)
    key = None
    if cache is not None:
        key = cache.to_key(request)
        cached = await cache.get(key)
        if cached is not None:
            if on_delta is not None and cached.content:
                await on_delta(cached.content)
            return cached
    started = model_call_started()
    try:
        response = await llm.complete(request, on_delta=on_delta)
    except BaseException:
        model_call_ended(model, started, failed=True)
        raise
    model_call_ended(model, started)
    if cache is not None and key is not None:
        await cache.set(key, response)
    return response


def _window(settings: Mapping[str, Any], llm: LLM) -> tuple[str, int, int]:
    """The model, its context window and the tokens reserved for the reply."""
    model = str(settings.get("model") or "gpt-4o-mini")
    max_tokens = settings.get("max_tokens")
    window = int(
        settings.get("context_window")
        or getattr(llm, "context_window", None)
        or context_window_for(model)
    )
    reserve = int(max_tokens) if max_tokens else min(1024, window // 4)
    return model, window, reserve


async def run_chat(
    memory: BaseMemory,
    cache: BaseCache | None = None,
    *,
    llm: LLM | None = None,
    **settings: Any,
) -> Assistant:
    """turbo-chat's ``run_chat``: the assistant's reply to the conversation in ``memory``.

    The prompt is ``memory``'s (trimmed to the model's window); a reply found in
    ``cache`` is used instead of calling the model, and a new one is cached. The reply
    is appended to ``memory`` and returned. ``settings`` are model settings
    (``model=``, ``temperature=``, ...). Without ``llm``, an :class:`OpenAILLM` is made
    from the environment for this call and closed after it.

    Outside a template nothing is journaled: this is a one-off call, not a durable
    conversation (use a template run by the runtime for that).
    """
    owned = None
    if llm is None:
        from turbobot.llm.openai import OpenAILLM

        llm = owned = OpenAILLM()
    try:
        response = await _complete(
            memory, llm, cache, settings, schemas=[], on_delta=None, name="run_chat"
        )
    finally:
        if owned is not None:
            await owned.aclose()
    message = response.to_message(forward=True)
    await memory.append(message)
    return message


def _short_repr(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _make_memory(setting: Any) -> BaseMemory:
    if setting is None:
        return LocalMemory()
    if isinstance(setting, BaseMemory):
        # turbo-chat's ``@turbo(memory=RedisMemory())``: the instance is a prototype,
        # each conversation gets its own copy (and its ``init(context)`` call)
        return copy.copy(setting)
    memory = setting()
    if not isinstance(memory, BaseMemory):
        raise ConfigurationError(f"turbo(memory=...) made {memory!r}, which is not a BaseMemory")
    return memory


def _as_input(value: Any) -> UserInput:
    if isinstance(value, UserInput):
        return value
    if isinstance(value, IncomingMessage):
        return UserInput(value.text, incoming=value)
    if isinstance(value, str):
        return UserInput(value)
    if value is None:
        raise TemplateError(
            "the app is waiting for user input: resume it with app.asend(text) or run(app, text)"
        )
    raise TypeError(f"user input must be a str or IncomingMessage, got {type(value).__name__}")


def _input_from_json(entry: JournalEntry) -> UserInput:
    if entry.kind == "timeout":
        return UserInput.timeout()
    if isinstance(entry.value, str):
        return UserInput(entry.value)
    # the message is built from its dict only if the template reads it
    return UserInput(entry.value["text"], incoming=entry.value["incoming"])


class _ReplayedLLMError(LLMError):
    """Carries a journaled LLM error out of ``_generate`` without journaling it again."""

    def __init__(self, error: LLMError) -> None:
        super().__init__(str(error))
        self.error = error


def _error_from_json(value: Mapping[str, Any]) -> LLMError:
    from turbobot import exceptions

    cls = getattr(exceptions, str(value.get("type")), LLMError)
    if not (isinstance(cls, type) and issubclass(cls, LLMError)):
        cls = LLMError
    try:
        return cls(value.get("message", ""))
    except TypeError:
        return LLMError(value.get("message", ""))


async def run(app: App, input: str | None = None) -> tuple[Output | Messages, bool]:
    """Step ``app`` by hand, as in turbo-chat: returns ``(output, done)``.

    The first call starts the app and runs it to its first ``GetUserInput`` (whose
    ``content`` is the question) or its end; if ``input`` is given on that first call,
    it answers the first ``GetUserInput``. Later calls send ``input`` and run to the
    next request for input. ``output`` is the ``GetUserInput`` when not done, else the
    last message or result the app produced; if it produced none (a mixin that only
    adds messages), the messages it added to its memory, as :class:`Messages`, which
    a template can ``yield`` to add them to its own prompt.
    """
    if app.done:
        from turbobot.turbo_chat import GeneratorAlreadyExhaustedError

        raise GeneratorAlreadyExhaustedError(
            f"run(): the app of {app.template.ref} has already finished; call the "
            "template again for a new one"
        )
    last: Output | None = None
    # what the app's memory held before this call: a mixin that ends without an output
    # hands back the messages it added (see Messages)
    before = len(await app.memory.get()) if app.started else 0
    try:
        if app.started:
            output, pending = await app.asend(input), None
        else:
            output, pending = await app.asend(None), input
        while True:
            if isinstance(output, AssistantStream):
                async for _ in output:
                    pass
                last = output.message
                output = await app.asend(None)
            elif isinstance(output, GetUserInput):
                if pending is None:
                    return output, False
                output, pending = await app.asend(pending), None
            else:
                last = output
                output = await app.asend(None)
    except StopAsyncIteration:
        if last is None:
            return Messages((await app.memory.get())[before:]), True
        return last, True
