"""What the runtime says and how it behaves: :class:`Notices` and :class:`RuntimeSettings`.

Built by the entry point (the ``turbobot`` command, or a program embedding the
runtime); nothing here reads the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from turbobot.limits import Limits

__all__ = ["Notices", "RuntimeSettings"]


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
    #: to a user the allowlists leave out (once per user per run)
    not_allowed: str = "Sorry, this bot is private."
    #: when a user's messages outrun ``Limits.per_minute`` (once per slow-down)
    slow_down: str = (
        "You are sending messages faster than I can answer. I will answer them in order; "
        "the next in about {seconds:.0f} s."
    )
    #: instead of an answer, to a user who used today's ``Limits.tokens_per_day``
    over_budget: str = (
        "You have used your {limit:,} tokens for today, so I cannot answer until the "
        "budget renews at 00:00 UTC (in {renews}). /usage shows your use."
    )
    #: the answer to /usage (a ``usage_budget`` line follows when there is a budget)
    usage: str = (
        "Your use today (UTC): {today:,} tokens ({prompt:,} prompt, {completion:,} "
        "completion) in {calls:,} model calls. Last 7 days: {week:,} tokens."
    )
    usage_budget: str = "Daily budget: {limit:,} tokens; {left:,} left, renewed in {renews}."
    #: to someone who sent /reset, /start, /retry or /mode in a shared chat whose
    #: conversation another started
    not_yours: str = (
        "Only the person who started this conversation, or an admin of this chat, can "
        "reset, restart or retry it."
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
    #: seconds between the gauges written for the operator's health page (``samples``
    #: table: live and evicted conversations, queued inputs); ``None``: none written
    sample_seconds: float | None = 60.0
    #: allowlists and the per-user rate (see turbobot.limits)
    limits: Limits = field(default_factory=Limits)
