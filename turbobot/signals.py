"""Signals a template yields to ask the engine for something.

What each yield gets back (the template protocol):

=====================  ==========================================  =====================
yield                  effect                                      value sent back
=====================  ==========================================  =====================
``System``/``User``/   appended to memory; ``Assistant`` is also   ``None``
``Example*``           sent to the user (unless ``forward=False``)
``Assistant``
``Generate(...)``      LLM completion over the prepared prompt,    the ``Assistant``
                       appended to memory and sent unless          message
                       ``forward=False``; ``stream=True`` streams
                       it, ``tools=[...]`` lets the model call
                       Python functions
``GetUserInput(m)``    sends ``m`` (recorded as assistant text if  :class:`UserInput`
                       ``record``), waits for the next message     (a ``str``)
``Result(content)``    sent to the user, not recorded              ``None``
``Step(fn, *args)``    calls ``fn`` once and journals its result   its result
``Delegate(app)``      runs a sub-template in this conversation    what it returned
``Return(value)``      ends this template, handing ``value`` back  (does not resume)
=====================  ==========================================  =====================
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from turbobot.chat import IncomingMessage
from turbobot.messages import Message

if TYPE_CHECKING:
    from turbobot.template import App

__all__ = [
    "Delegate",
    "Generate",
    "GetInput",
    "GetUserInput",
    "Patched",
    "Result",
    "Return",
    "Step",
    "UserInput",
]


class Generate:
    """Ask the LLM for the next assistant message.

    Args:
        settings: model settings for this call (turbo-chat's ``settings=`` form).
        forward: send the reply to the user (``False`` keeps it internal).
        stream: deliver the reply incrementally to whoever displays it.
        tools: Python functions the model may call; their results are fed back to it.
        **overrides: model settings for this call, e.g. ``temperature=0.9``.
    """

    __slots__ = ("forward", "settings", "stream", "tools")

    def __init__(
        self,
        settings: Mapping[str, Any] | None = None,
        *,
        forward: bool = True,
        stream: bool = False,
        tools: Sequence[Callable[..., Any]] = (),
        **overrides: Any,
    ) -> None:
        self.settings: dict[str, Any] = {**(settings or {}), **overrides}
        self.forward = forward
        self.stream = stream
        self.tools = tuple(tools)

    def fingerprint(self) -> str:
        names = ",".join(getattr(t, "__name__", "?") for t in self.tools)
        return f"Generate|{sorted(self.settings.items())!r}|{self.forward}|{names}"

    def structure(self) -> str:
        names = ",".join(getattr(t, "__name__", "?") for t in self.tools)
        return f"Generate|{names}"

    def __repr__(self) -> str:
        return f"Generate(settings={self.settings!r}, forward={self.forward}, stream={self.stream})"


class GetUserInput:
    """Wait for the user's next message, optionally asking a question first.

    Args:
        message: text sent to the user before waiting (turbo-chat calls it ``content``).
        record: also record ``message`` in memory as assistant text.
        timeout: seconds to wait; when they pass the template receives a
            :class:`UserInput` with ``timed_out=True``.
        name: names this input in the template's structure: a replay after a
            redeploy checks it (unnamed inputs are told apart only by their order;
            see docs/architecture.md, "Replay and its rules").
    """

    __slots__ = ("message", "name", "record", "timeout")

    def __init__(
        self,
        message: str | None = None,
        *,
        record: bool = True,
        timeout: float | None = None,
        content: str | None = None,
        name: str | None = None,
    ) -> None:
        if message is not None and content is not None:
            raise TypeError("GetUserInput() takes message or content, not both")
        self.message = message if message is not None else content
        self.record = record
        if timeout is not None and timeout <= 0:
            raise ValueError(f"GetUserInput(timeout=...) must be positive, got {timeout!r}")
        self.timeout = timeout
        self.name = name

    @property
    def content(self) -> str | None:
        """turbo-chat's name for :attr:`message`."""
        return self.message

    def fingerprint(self) -> str:
        return f"GetUserInput|{self.message!r}|{self.record}|{self.timeout!r}"

    def structure(self) -> str:
        return "GetUserInput" if self.name is None else f"GetUserInput|{self.name}"

    def __repr__(self) -> str:
        return f"GetUserInput(message={self.message!r}, timeout={self.timeout!r})"


#: turbo-chat's name for :class:`GetUserInput`
GetInput = GetUserInput


class UserInput(str):
    """What ``GetUserInput`` returns: the user's text, plus the full incoming message.

    It is a ``str``, so ``yield User(content=reply)`` works. ``timed_out`` is true
    (and the text empty) when the wait's timeout passed first.
    """

    __slots__ = ("_incoming", "timed_out")

    _incoming: IncomingMessage | dict[str, Any] | None
    timed_out: bool

    def __new__(
        cls,
        text: str = "",
        *,
        incoming: IncomingMessage | dict[str, Any] | None = None,
        timed_out: bool = False,
    ) -> UserInput:
        """``incoming`` may be the message's dict (``IncomingMessage.to_dict()``): it
        is then built only if read. A replay hands thousands of inputs to a template
        that, most often, reads only their text."""
        self = super().__new__(cls, text)
        self._incoming = incoming
        self.timed_out = timed_out
        return self

    @property
    def incoming(self) -> IncomingMessage | None:
        """The incoming message this input came in (``None`` for a plain string)."""
        incoming = self._incoming
        if type(incoming) is dict:
            incoming = self._incoming = IncomingMessage.from_dict(incoming)
        return incoming  # type: ignore[return-value]

    def to_json(self) -> Any:
        """The journal's value for this input: its text, with the message if any."""
        incoming = self._incoming
        if incoming is None:
            return str(self)
        data = incoming if type(incoming) is dict else incoming.to_dict()  # type: ignore[union-attr]
        return {"text": str(self), "incoming": data}

    @classmethod
    def timeout(cls) -> UserInput:
        """The marker a template receives when a ``GetUserInput`` timed out."""
        return cls("", timed_out=True)


@dataclass(slots=True)
class Result:
    """Content sent to the user without being recorded in memory."""

    content: str = ""
    done: bool = False

    @classmethod
    def from_message(cls, message: Message) -> Result:
        return cls(content=message.content)

    def fingerprint(self) -> str:
        return f"Result|{self.content!r}"


@dataclass(slots=True)
class Step:
    """Run a non-deterministic call once and record its result in the journal.

    On replay the recorded result is returned instead of calling ``fn`` again, so use
    it for time, randomness and outside lookups. ``fn`` may be sync or async; its
    result must be JSON-serialisable.
    """

    fn: Callable[..., Any | Awaitable[Any]]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs

    def fingerprint(self) -> str:
        return f"Step|{getattr(self.fn, '__qualname__', repr(self.fn))}"

    def structure(self) -> str:
        return self.fingerprint()


@dataclass(slots=True)
class Delegate:
    """Run another template's app inside this conversation and get its return value.

    The sub-template shares the conversation's memory and context. Yielding an app
    directly (``result = yield other_template()``) does the same.
    """

    app: App

    def fingerprint(self) -> str:
        return f"Delegate|{self.app.template.ref}"

    def structure(self) -> str:
        return self.fingerprint()


@dataclass(frozen=True, slots=True)
class Patched:
    """Change a template's structure without breaking the conversations in flight.

    ``new = yield Patched("ask-age")`` is ``True`` in conversations that reach this
    point under the new code, and ``False`` in those that had already passed it (or
    were waiting beyond it) when the new code was deployed, which must keep taking
    the old path. Once every conversation started before the change has ended, the
    old path and the ``Patched`` can go (keep the ``if``'s body). In the spirit of
    Temporal's ``workflow.patched()``; see docs/architecture.md, "Replay and its
    rules"::

        name = yield GetUserInput("Your name?")
        if (yield Patched("ask-age")):
            age = yield GetUserInput("Your age?")
    """

    change: str

    def structure(self) -> str:
        return f"Patched|{self.change}"

    def fingerprint(self) -> str:
        return self.structure()


@dataclass(slots=True)
class Return:
    """End the current template and hand ``value`` back to the one that delegated to it.

    Async generators cannot ``return value``; this is the replacement. At the top
    level the value becomes the app's :attr:`~turbobot.App.result`.
    """

    value: Any = None

    def fingerprint(self) -> str:
        return "Return"
