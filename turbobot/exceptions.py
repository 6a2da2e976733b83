"""Every error turbobot raises.

The tree::

    TurbobotError
    ├── ConfigurationError        bad settings, missing extra, unknown bot module
    ├── TemplateError             a template did something the engine cannot run
    │   ├── InvalidYieldError     it yielded a value that is not part of the vocabulary
    │   └── ReplayDivergedError   its yields no longer match the recorded journal
    ├── ToolError                 a tool could not be described or called
    ├── UndeliverableError        the platform will never take this reply (bot blocked)
    └── LLMError                  the language model did not give a usable answer
        ├── LLMUnavailableError   timeouts, connection errors, 5xx, after retries
        ├── LLMRateLimitedError   429 after retries (``retry_after`` when known)
        ├── LLMResponseError      the server answered with something unusable
        └── LLMRequestError       the server refused the request (4xx other than 429)

Messages say what happened and what to do; they never contain API keys or tokens.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "InvalidYieldError",
    "LLMCapabilityError",
    "LLMError",
    "LLMRateLimitedError",
    "LLMRequestError",
    "LLMResponseError",
    "LLMUnavailableError",
    "ReplayDivergedError",
    "TemplateError",
    "ToolError",
    "TurbobotError",
    "UndeliverableError",
]


class TurbobotError(Exception):
    """Base class of every error raised by turbobot."""


class ConfigurationError(TurbobotError):
    """The configuration is incomplete or contradictory."""


class TemplateError(TurbobotError):
    """A template did something the engine cannot run."""


class InvalidYieldError(TemplateError):
    """A template yielded a value that is not a message or a signal."""

    def __init__(self, message: str, *, template: str, value: object) -> None:
        super().__init__(message)
        self.template = template
        self.value = value


class ReplayDivergedError(TemplateError):
    """Replaying a journal met yields that differ from the recorded ones."""

    def __init__(self, message: str, *, position: int) -> None:
        super().__init__(message)
        self.position = position


class ToolError(TurbobotError):
    """A tool function could not be described to the model or called."""


class UndeliverableError(TurbobotError):
    """An adapter's send can never succeed: the user blocked the bot, the chat is gone.

    The runtime drops the reply (marked sent, with no platform id) instead of keeping
    it in the outbox to be tried again at every start.
    """


class LLMError(TurbobotError):
    """The language model did not give a usable answer."""


class LLMUnavailableError(LLMError):
    """The LLM server timed out, refused the connection or failed (5xx), after retries."""


class LLMRateLimitedError(LLMError):
    """The LLM server kept answering 429 Too Many Requests."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LLMResponseError(LLMError):
    """The LLM server answered, but not with a chat completion turbobot can use."""


class LLMRequestError(LLMError):
    """The LLM server rejected the request (bad model name, bad key, bad parameters).

    Attributes:
        status_code: the HTTP status, when known.
        provider_message: what the server said (one line, shortened, key scrubbed).
        hint: what the operator should check, when turbobot can tell.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        provider_message: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.provider_message = provider_message
        self.hint = hint

    @property
    def permanent(self) -> bool:
        """Whether the same request can never succeed: any 4xx but 408, 409 and 429.

        Without a status the server is taken at its word that it refused the request.
        """
        status = self.status_code
        if status is None:
            return True
        return 400 <= status < 500 and status not in (408, 409, 429)


class LLMCapabilityError(LLMRequestError):
    """The model cannot do what the request asks (tools on the offline local model).

    Raised into the template at its ``Generate``, like every :class:`LLMError`: a bot
    that needs a capable model catches it and says so.
    """
