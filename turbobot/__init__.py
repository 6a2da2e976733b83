"""turbobot: LLM chat bots as turbo-chat style generator templates.

Everything public is importable from here.
"""

from __future__ import annotations

from turbobot.cache import BaseCache, SimpleCache
from turbobot.chat import Attachment, ChannelKey, IncomingMessage, TemplateContext
from turbobot.exceptions import (
    ConfigurationError,
    InvalidYieldError,
    LLMCapabilityError,
    LLMError,
    LLMRateLimitedError,
    LLMRequestError,
    LLMResponseError,
    LLMUnavailableError,
    ReplayDivergedError,
    TemplateError,
    ToolError,
    TurbobotError,
    UndeliverableError,
)
from turbobot.journal import JournalEntry
from turbobot.llm.base import LLM, LLMRequest, LLMResponse
from turbobot.llm.openai import OpenAILLM, RetryPolicy
from turbobot.llm.scripted import ScriptedLLM
from turbobot.memory import BaseMemory, ListMemory, LocalMemory, SummaryMemory
from turbobot.messages import (
    Assistant,
    Example,
    ExampleAssistant,
    ExampleUser,
    Message,
    Messages,
    System,
    ToolCall,
    ToolMessage,
    Usage,
    User,
)
from turbobot.signals import (
    Delegate,
    Generate,
    GetInput,
    GetUserInput,
    Patched,
    Result,
    Return,
    Step,
    UserInput,
)
from turbobot.template import App, AssistantStream, Template, run, run_chat, turbo
from turbobot.turbo_chat import (
    BasePrefixMessageCollection,
    GeneratorAlreadyExhaustedError,
    InvalidValueYieldedError,
    MessageRole,
    PrefixMessage,
    TurboGen,
    TurboGenFn,
    TurboGenTemplate,
    TurboGenTemplateFn,
    TurboModel,
)

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "App",
    "Assistant",
    "AssistantStream",
    "Attachment",
    "BaseCache",
    "BaseMemory",
    "BasePrefixMessageCollection",
    "ChannelKey",
    "ConfigurationError",
    "Delegate",
    "Example",
    "ExampleAssistant",
    "ExampleUser",
    "Generate",
    "GeneratorAlreadyExhaustedError",
    "GetInput",
    "GetUserInput",
    "IncomingMessage",
    "InvalidValueYieldedError",
    "InvalidYieldError",
    "JournalEntry",
    "LLMCapabilityError",
    "LLMError",
    "LLMRateLimitedError",
    "LLMRequest",
    "LLMRequestError",
    "LLMResponse",
    "LLMResponseError",
    "LLMUnavailableError",
    "ListMemory",
    "LocalMemory",
    "Message",
    "MessageRole",
    "Messages",
    "OpenAILLM",
    "Patched",
    "PrefixMessage",
    "ReplayDivergedError",
    "Result",
    "RetryPolicy",
    "Return",
    "ScriptedLLM",
    "SimpleCache",
    "Step",
    "SummaryMemory",
    "System",
    "Template",
    "TemplateContext",
    "TemplateError",
    "ToolCall",
    "ToolError",
    "ToolMessage",
    "TurboGen",
    "TurboGenFn",
    "TurboGenTemplate",
    "TurboGenTemplateFn",
    "TurboModel",
    "TurbobotError",
    "UndeliverableError",
    "Usage",
    "User",
    "UserInput",
    "run",
    "run_chat",
    "turbo",
]
