"""Conversation messages a template yields: ``System``, ``User``, ``Assistant``, examples.

Yielding one appends it to the conversation's memory (what the model sees next time
it generates). ``Assistant`` messages are also sent to the user unless
``forward=False``. The template gets ``None`` back.

``content`` may be given directly, or as ``template=`` plus ``variables=`` in the
turbo-chat style: a Jinja2 template (``{{ name }}``, loops, filters), rendered when the
message is made, so a missing variable fails at the ``yield``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import jinja2
import jinja2.sandbox

from turbobot.exceptions import TemplateError

__all__ = [
    "Assistant",
    "Example",
    "ExampleAssistant",
    "ExampleUser",
    "Message",
    "Messages",
    "System",
    "TemplateVariableError",
    "ToolCall",
    "ToolMessage",
    "Usage",
    "User",
    "render_template",
]


class TemplateVariableError(TemplateError, KeyError):
    """A message template names a variable that was not given."""

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0])


@functools.lru_cache(maxsize=256)
def _compiled(template: str) -> jinja2.Template:
    # Sandboxed: a template cannot reach Python internals through its variables;
    # StrictUndefined: a missing variable is an error, not an empty string.
    environment = jinja2.sandbox.SandboxedEnvironment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False
    )
    return environment.from_string(template)


def render_template(template: str, variables: Mapping[str, object]) -> str:
    """Render a Jinja2 ``template`` (``{{ name }}``, ``{% for %}``, filters) with ``variables``.

    Raises:
        TemplateVariableError: the template uses a variable that was not given.
        TemplateError: the template is not valid Jinja2.
    """
    try:
        return _compiled(template).render(variables)
    except jinja2.UndefinedError as exc:
        raise TemplateVariableError(
            f"message template variable missing: {exc} (variables given: {sorted(variables)})"
        ) from None
    except jinja2.TemplateError as exc:
        raise TemplateError(f"message template {template[:60]!r} is not valid: {exc}") from None


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call requested by the model."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage reported by the LLM server for one completion."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Message:
    """A message of the conversation. Use the role subclasses, not this class."""

    role: ClassVar[str] = ""
    #: pinned messages (system prompt, examples) always survive prompt trimming
    pinned: ClassVar[bool] = False
    #: example messages are sent to the model as this role
    api_role: ClassVar[str] = ""

    __slots__ = ("content", "forward", "name", "tokens", "tool_call_id", "tool_calls", "usage")

    content: str
    name: str | None
    forward: bool
    tool_calls: tuple[ToolCall, ...]
    tool_call_id: str | None
    usage: Usage | None
    #: cached token count, filled in by prompt preparation
    tokens: int | None

    def __init__(
        self,
        content: str | None = None,
        *,
        template: str | None = None,
        variables: Mapping[str, object] | None = None,
        name: str | None = None,
        forward: bool = True,
        tool_calls: tuple[ToolCall, ...] | list[ToolCall] = (),
        tool_call_id: str | None = None,
        usage: Usage | None = None,
    ) -> None:
        if template is not None:
            if content is not None:
                raise TypeError(f"{type(self).__name__}() takes content or template, not both")
            content = render_template(template, variables or {})
        if content is None:
            content = ""
        if type(content) is not str:
            if not isinstance(content, str):
                raise TypeError(
                    f"{type(self).__name__}() content must be a str, got {type(content).__name__}"
                )
            # a plain copy: a UserInput would keep its whole incoming message alive for
            # as long as the memory keeps this message
            content = str.__str__(content)
        self.content = content
        self.name = name
        self.forward = forward
        self.tool_calls = tuple(tool_calls)
        self.tool_call_id = tool_call_id
        self.usage = usage
        self.tokens = None

    def to_openai(self) -> dict[str, Any]:
        """The message as an OpenAI chat-completions ``messages`` item."""
        payload: dict[str, Any] = {"role": self.api_role or self.role, "content": self.content}
        if self.name:
            payload["name"] = self.name
        if self.tool_calls:
            payload["tool_calls"] = [call.to_openai() for call in self.tool_calls]
        if self.tool_call_id is not None:
            payload["tool_call_id"] = self.tool_call_id
        return payload

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (for journals and stores); see :func:`message_from_dict`."""
        data: dict[str, Any] = {"type": type(self).__name__, "content": self.content}
        if self.name:
            data["name"] = self.name
        if not self.forward:
            data["forward"] = False
        if self.tool_calls:
            data["tool_calls"] = [[c.id, c.name, c.arguments] for c in self.tool_calls]
        if self.tool_call_id is not None:
            data["tool_call_id"] = self.tool_call_id
        if self.usage is not None:
            data["usage"] = [self.usage.prompt_tokens, self.usage.completion_tokens]
        return data

    def fingerprint(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.content!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return type(self) is type(other) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]


class System(Message):
    """The system prompt: instructions for the model. Never sent to the user."""

    __slots__ = ()

    role = "system"
    pinned = True


class User(Message):
    """A user turn the template adds to the prompt."""

    __slots__ = ()

    role = "user"


class Assistant(Message):
    """An assistant turn: recorded in memory and sent to the user (unless ``forward=False``)."""

    __slots__ = ()

    role = "assistant"


class ExampleUser(Message):
    """A few-shot example of a user turn; always kept in the prompt, never sent."""

    __slots__ = ()

    role = "example_user"
    api_role = "user"
    pinned = True


class ExampleAssistant(Message):
    """A few-shot example of an assistant turn; always kept in the prompt, never sent."""

    __slots__ = ()

    role = "example_assistant"
    api_role = "assistant"
    pinned = True


class ToolMessage(Message):
    """The result of a tool call, as the model sees it."""

    __slots__ = ()

    role = "tool"

    def to_openai(self) -> dict[str, Any]:
        # The chat-completions API takes no name on tool results.
        return {"role": "tool", "content": self.content, "tool_call_id": self.tool_call_id}


_TYPES: dict[str, type[Message]] = {
    cls.__name__: cls
    for cls in (System, User, Assistant, ExampleUser, ExampleAssistant, ToolMessage)
}


class Messages(tuple[Message, ...]):
    """Several messages yielded at once: each is appended to memory, in order.

    :func:`~turbobot.run` returns one when a mixin it stepped ended without an output,
    holding what the mixin added to its memory, so that ``yield output`` hands those
    messages to the calling template (turbo-chat's mixin loop).
    """

    __slots__ = ()

    def __new__(cls, messages: Iterable[Message] = ()) -> Messages:
        items = tuple(messages)
        for item in items:
            if not isinstance(item, Message):
                raise TypeError(f"Messages() holds messages, got {type(item).__name__}")
        return super().__new__(cls, items)

    def __repr__(self) -> str:
        return f"Messages({list(self)!r})"


class Example(Messages):
    """turbo-chat's ``Example(user=..., assistant=...)``: an example exchange."""

    __slots__ = ()

    def __new__(cls, user: str, assistant: str) -> Example:
        return tuple.__new__(cls, (ExampleUser(user), ExampleAssistant(assistant)))


def message_from_dict(data: Mapping[str, Any]) -> Message:
    """Rebuild a message from :meth:`Message.to_dict` output."""
    cls = _TYPES[data["type"]]
    usage = data.get("usage")
    return cls(
        data.get("content", ""),
        name=data.get("name"),
        forward=data.get("forward", True),
        tool_calls=tuple(ToolCall(*c) for c in data.get("tool_calls", ())),
        tool_call_id=data.get("tool_call_id"),
        usage=Usage(*usage) if usage else None,
    )
