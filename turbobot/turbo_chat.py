"""turbo-chat's names, for templates written for turbo-chat.

Replace ``turbo_chat`` by ``turbobot`` in the imports and these names keep working.
Each is the turbobot object that does the same job; where the behaviour differs it
is said here and in the README ("Coming from turbo-chat").
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, Literal, TypeAlias

from turbobot.exceptions import InvalidYieldError
from turbobot.memory import ListMemory
from turbobot.messages import Message, Messages
from turbobot.template import App, Template, TemplateFn

__all__ = [
    "BasePrefixMessageCollection",
    "GeneratorAlreadyExhaustedError",
    "InvalidValueYieldedError",
    "ListMemory",
    "MessageRole",
    "PrefixMessage",
    "TurboGen",
    "TurboGenFn",
    "TurboGenTemplate",
    "TurboGenTemplateFn",
    "TurboModel",
]

#: a message of the prompt (turbo-chat's pydantic base of System, User, ...)
PrefixMessage = Message
#: several messages yielded at once (turbobot yields :class:`Messages`, or a list)
BasePrefixMessageCollection = Messages
#: what a template yields that the app rejects
InvalidValueYieldedError = InvalidYieldError
#: a running app (``horoscope({...})``); turbobot's :class:`App`
TurboGen: TypeAlias = App
#: the decorated template (``@turbo()``); turbobot's :class:`Template`
TurboGenFn: TypeAlias = Template
#: the undecorated async generator function
TurboGenTemplateFn: TypeAlias = TemplateFn
TurboGenTemplate: TypeAlias = AsyncGenerator[Any, Any]
#: any model name the configured endpoint serves (turbo-chat listed OpenAI's)
TurboModel: TypeAlias = str
MessageRole = Literal["system", "user", "assistant", "example_user", "example_assistant", "tool"]


class GeneratorAlreadyExhaustedError(StopAsyncIteration):
    """:func:`~turbobot.run` was called on an app that had already finished."""
