"""Conversation memory: what the model sees when a template yields ``Generate``.

A template asks for its memory by declaring a ``memory`` parameter. ``BaseMemory``
is the interface (async, as in turbo-chat); ``LocalMemory`` keeps messages in RAM.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Generator, Iterable
from typing import Any

from turbobot.messages import Message, User
from turbobot.tokens import (
    TOKENS_REPLY_PRIMING,
    TokenCounter,
    count_message_tokens,
    count_prompt_tokens,
)

__all__ = [
    "CUT_MARK",
    "BaseMemory",
    "ListMemory",
    "LocalMemory",
    "Memory",
    "SummaryMemory",
    "SummaryPlan",
    "fit_newest",
    "trim_to_window",
]


def _tokens(message: Message, counter: TokenCounter) -> int:
    # Messages are immutable once appended, so a count is computed once.
    if message.tokens is None:
        message.tokens = count_message_tokens(message.to_openai(), counter)
    return message.tokens


def trim_to_window(messages: list[Message], *, budget: int, counter: TokenCounter) -> list[Message]:
    """Drop the oldest turns until the prompt fits ``budget`` tokens.

    Pinned messages (system prompt, examples) and the newest turn always survive, even
    if together they exceed the budget. A turn starts at a ``User`` message and
    includes the assistant and tool messages after it, so a tool call is never
    separated from its result.
    """
    pinned = [i for i, m in enumerate(messages) if m.pinned]
    rest = [i for i, m in enumerate(messages) if not m.pinned]
    turns: list[list[int]] = []
    for i in rest:
        m = messages[i]
        if not turns or isinstance(m, User):
            turns.append([i])
        else:
            turns[-1].append(i)
    used = TOKENS_REPLY_PRIMING + sum(_tokens(messages[i], counter) for i in pinned)
    kept: list[list[int]] = []
    for n, turn in enumerate(reversed(turns)):
        cost = sum(_tokens(messages[i], counter) for i in turn)
        if n > 0 and used + cost > budget:
            break
        used += cost
        kept.append(turn)
    keep = set(pinned)
    for turn in kept:
        keep.update(turn)
    return [m for i, m in enumerate(messages) if i in keep]


#: ends a message cut to fit the model's context window
CUT_MARK = " [… cut to fit the model's context window]"


def fit_newest(prompt: list[dict[str, Any]], *, budget: int, counter: TokenCounter) -> None:
    """Cut the newest user message of ``prompt`` (in place) so the prompt fits ``budget``.

    Trimming keeps the newest turn whole; on a small window (a local model's 2,048
    tokens) one long message alone can exceed it, and the model would refuse every
    request. Only that message's text is shortened, never the system prompt.
    """
    total = count_prompt_tokens(prompt, counter)
    if total <= budget:
        return
    index = next((i for i in range(len(prompt) - 1, -1, -1) if prompt[i]["role"] == "user"), None)
    if index is None:
        return
    text = str(prompt[index].get("content") or "")
    others = total - count_message_tokens(prompt[index], counter)
    room = budget - others - counter(CUT_MARK) - 8  # the role's overhead and a margin
    low, high = 0, len(text)
    while low < high:  # the longest prefix within ``room`` tokens
        middle = (low + high + 1) // 2
        if counter(text[:middle]) <= room:
            low = middle
        else:
            high = middle - 1
    prompt[index] = {**prompt[index], "content": text[:low] + CUT_MARK}


class BaseMemory(ABC):
    """Where a conversation's messages live.

    Implement :meth:`append` and :meth:`clear`, and :meth:`get` for the prompt (it is
    not abstract so that a memory sketched as in turbo-chat's README can be made, but
    a ``Generate`` needs it); :meth:`init`, :meth:`extend` and :meth:`prepare_prompt`
    have defaults. Given to ``@turbo(memory=...)`` as a class (made once per
    conversation) or as an instance (copied once per conversation, then
    :meth:`init` is called with the conversation's context).
    """

    # Every conversation has a memory: without this, each would carry a __dict__.
    __slots__ = ()

    async def init(self, context: Any) -> None:
        """Called once when a conversation starts (or is rebuilt after a restart, by
        replaying its messages into this memory): ``context`` is what the template was
        called with as its ``context``, else the runtime's :class:`TemplateContext`."""
        return None  # nothing to set up by default

    @abstractmethod
    def append(self, message: Message) -> Awaitable[None]:
        """Add a message at the end of the conversation (``async def`` in subclasses)."""

    async def get(self) -> list[Message]:
        """Every message, oldest first."""
        raise NotImplementedError(
            f"{type(self).__name__}.get() is not implemented: a memory must return its "
            "messages (oldest first) for the model's prompt"
        )

    @abstractmethod
    async def clear(self) -> None:
        """Forget every message."""

    async def extend(self, messages: Iterable[Message]) -> None:
        """Append several messages in order."""
        for message in messages:
            await self.append(message)

    async def prepare_prompt(
        self, *, counter: TokenCounter, context_window: int, max_tokens: int
    ) -> list[dict[str, Any]]:
        """The chat-completions ``messages`` for the next generation.

        Oldest turns are dropped so that prompt plus ``max_tokens`` fits the
        ``context_window``; pinned messages and the newest turn always stay.
        """
        messages = await self.get()
        budget = context_window - max_tokens
        prompt = [m.to_openai() for m in trim_to_window(messages, budget=budget, counter=counter)]
        fit_newest(prompt, budget=budget, counter=counter)
        return prompt


class _Done:
    """An awaitable that is already done (what ``LocalMemory.append`` returns)."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # makes this a generator that ends at once


_DONE = _Done()


def _as_message(message: object) -> Message:
    if isinstance(message, str):
        return User(message)  # turbo-chat's ``memory.append(user_message)``
    raise TypeError(f"memory.append() takes a message or a str, got {type(message).__name__}")


class _TurnIndex:
    """Where a memory's pinned messages and turns start, and the window of the last
    prompt; made by its first prompt, then kept up to date as messages are appended."""

    __slots__ = (
        "budget",
        "count",
        "counter",
        "first_turn",
        "pinned",
        "turns",
        "used",
        "window_end",
    )

    def __init__(self) -> None:
        self.pinned: list[int] = []
        self.turns: list[int] = []
        #: how many messages it covers
        self.count = 0
        # The last prompt's window: turns ``first_turn`` on, ``used`` tokens with the
        # pinned messages, counting messages up to ``window_end``; for this budget and
        # counter (another budget starts afresh).
        self.budget: int | None = None
        self.counter: TokenCounter | None = None
        self.first_turn = 0
        self.used = 0
        self.window_end = 0


class LocalMemory(BaseMemory):
    """Memory held in a Python list (the default).

    It indexes its turns (from its first prompt on, and incrementally after that), so
    preparing a prompt costs what the prompt holds (the newest turns that fit the
    window), not the conversation's whole length.

    Args:
        messages: what it starts with.
        window_only: keep only what a prompt can still use: the pinned messages
            (system prompt, examples) and the turns from the prompt window's oldest on.
            Turns that left the window are dropped (in batches, as they leave), so a
            live conversation's RAM stays the size of its window however long it
            runs; ``get()`` and ``messages`` then hold that much, not the whole
            history (the store's transcript keeps it). Turns are dropped only outside
            the window of the largest budget (context window minus ``max_tokens``)
            seen so far; a later, larger window (another model) does not get them
            back, while a conversation rebuilt by replay starts with all of them.
            Default: keep everything, as turbo-chat's memory does.
    """

    #: one slot for the index, ``None`` until the first prompt: a conversation that
    #: only waits pays 8 bytes for it
    __slots__ = ("_index", "_widest", "messages", "window_only")

    #: turns that left the window are dropped once at least this many messages (and as
    #: many as the window holds) wait to be: the cost of dropping stays O(1) a message
    DROP_AT_LEAST = 64

    def __init__(self, messages: Iterable[Message] = (), *, window_only: bool = False) -> None:
        self.messages: list[Message] = list(messages)
        self._index: _TurnIndex | None = None
        self.window_only = window_only
        #: the largest prompt budget seen: turns are dropped only outside its window
        self._widest = 0

    def _indexed(self) -> _TurnIndex:
        messages = self.messages
        index = self._index
        if index is None or index.count > len(messages):
            # first prompt, or ``messages`` (public) was shortened directly: rebuild
            index = self._index = _TurnIndex()
        for i in range(index.count, len(messages)):
            message = messages[i]
            if message.pinned:
                index.pinned.append(i)
            elif not index.turns or isinstance(message, User):
                index.turns.append(i)
        index.count = len(messages)
        return index

    def append(self, message: Message | str) -> Awaitable[None]:
        # Done at once, then awaitable: ``await memory.append(m)`` as everywhere, and
        # also the bare ``memory.append("text")`` of turbo-chat's ``run_chat`` example.
        self.messages.append(message if isinstance(message, Message) else _as_message(message))
        return _DONE

    def __copy__(self) -> LocalMemory:
        # a copy of an instance given to @turbo(memory=...) starts with its own list
        # (window_only passed only when set: a subclass's __init__ may not take it)
        if self.window_only:
            return type(self)(self.messages, window_only=True)
        return type(self)(self.messages)

    async def get(self) -> list[Message]:
        return list(self.messages)

    async def clear(self) -> None:
        self.messages.clear()
        self._index = None

    async def prepare_prompt(
        self, *, counter: TokenCounter, context_window: int, max_tokens: int
    ) -> list[dict[str, Any]]:
        # The same selection as trim_to_window (the newest turns that fit, the newest
        # one always), kept as a sliding window: appended messages are added to it and
        # the oldest turns leave it while it is over budget. Appending only ever moves
        # the longest suffix of turns that fits forwards, so a turn that left never
        # comes back, and a turn costs its new messages, not the window's length.
        index = self._indexed()
        messages, turns = self.messages, index.turns
        budget = context_window - max_tokens
        if index.budget != budget or index.counter is not counter:
            index.budget, index.counter = budget, counter
            index.first_turn = index.window_end = 0
            index.used = TOKENS_REPLY_PRIMING
        used = index.used
        for i in range(index.window_end, len(messages)):
            # (a pinned message counts wherever it is: it is always in the prompt)
            used += _tokens(messages[i], counter)
        index.window_end = len(messages)
        first_turn, last_turn = index.first_turn, len(turns) - 1
        while used > budget and first_turn < last_turn:
            start, stop = turns[first_turn], turns[first_turn + 1]
            used -= sum(_tokens(m, counter) for m in messages[start:stop] if not m.pinned)
            first_turn += 1
        index.first_turn, index.used = first_turn, used
        self._widest = max(self._widest, budget)
        if self.window_only and turns and budget >= self._widest:
            # Only at the widest budget seen: a turn outside its window is outside every
            # narrower one too (a Generate with a larger max_tokens keeps fewer turns).
            self._drop_before(index, turns[first_turn])
            messages, turns, first_turn = self.messages, index.turns, index.first_turn
        first = turns[first_turn] if turns else len(messages)
        prompt = [messages[i].to_openai() for i in index.pinned if i < first]
        prompt += [m.to_openai() for m in messages[first:]]
        if used > budget:  # the newest turn alone is too big
            fit_newest(prompt, budget=budget, counter=counter)
        return prompt

    def _drop_before(self, index: _TurnIndex, first: int) -> None:
        """Drop the turns before message ``first`` (the window's oldest), pinned ones
        kept, if enough of them wait; the index is shifted to match."""
        messages = self.messages
        pinned_before = [i for i in index.pinned if i < first]
        dropped = first - len(pinned_before)
        if dropped < max(self.DROP_AT_LEAST, len(messages) - first):
            return
        kept = [messages[i] for i in pinned_before]
        messages[:first] = kept  # the same list: whoever holds it sees the change
        index.pinned = [*range(len(kept)), *(i - dropped for i in index.pinned if i >= first)]
        index.turns = [t - dropped for t in index.turns[index.first_turn :]]
        index.first_turn = 0
        index.count -= dropped
        index.window_end -= dropped


#: turbo-chat's names for :class:`LocalMemory`
ListMemory = LocalMemory
Memory = LocalMemory


class SummaryPlan:
    """What :meth:`SummaryMemory.plan` asks the engine to summarise: the request for
    the model, and how many messages the summary will stand for once folded."""

    __slots__ = ("messages", "upto")

    def __init__(self, upto: int, messages: list[dict[str, Any]]) -> None:
        self.upto = upto
        self.messages = messages


class SummaryMemory(LocalMemory):
    """A memory that folds turns leaving the window into a rolling summary.

    When the prompt would fill more than ``high`` of the window, the oldest turns are
    summarised (the previous summary plus only those turns: never the whole history)
    until it fills at most ``low``; the prompt is then the pinned messages (system
    prompt, examples: never summarised), a system message holding the summary, and
    the turns after it. The engine makes the summary call with the template's model
    before a ``Generate`` and journals it, so a replay folds the same summary at the
    same point without calling the model (docs/architecture.md, "Replay and its rules").

    Args:
        summary_tokens: the longest summary asked for.
        high: the share of the window (after the reply's reserve) that starts a fold.
        low: the share a fold brings the prompt down to.
    """

    __slots__ = ("folded", "high", "low", "summary", "summary_tokens")

    #: what the summariser is told
    INSTRUCTION = (
        "You keep a running summary of a conversation between a user and an assistant. "
        "Rewrite the summary so far to include the new lines: keep names, facts, "
        "decisions and open questions; drop small talk. Reply with the summary only, "
        "in at most {words} words."
    )
    #: how the summary is put before the turns it stands for
    HEADER = "Summary of the earlier conversation:\n"

    def __init__(
        self,
        messages: Iterable[Message] = (),
        *,
        summary_tokens: int = 256,
        high: float = 0.8,
        low: float = 0.5,
    ) -> None:
        super().__init__(messages)
        if not 0 < low < high <= 1:
            raise ValueError(f"SummaryMemory needs 0 < low < high <= 1, got {low}, {high}")
        self.summary_tokens, self.high, self.low = summary_tokens, high, low
        self.summary = ""
        #: messages before this index are represented by the summary (pinned ones aside)
        self.folded = 0

    def __copy__(self) -> SummaryMemory:
        return type(self)(
            self.messages, summary_tokens=self.summary_tokens, high=self.high, low=self.low
        )

    async def clear(self) -> None:
        await super().clear()
        self.summary, self.folded = "", 0

    def fold(self, upto: int, summary: str) -> None:
        """The messages before ``upto`` are now represented by ``summary``."""
        self.folded, self.summary = max(self.folded, upto), summary

    def _summary_message(self) -> Message | None:
        if not self.summary:
            return None
        from turbobot.messages import System

        return System(self.HEADER + self.summary)

    def _turn_starts(self) -> list[int]:
        index = self._indexed()
        return [i for i in index.turns if i >= self.folded]

    def plan(
        self, *, counter: TokenCounter, context_window: int, max_tokens: int
    ) -> SummaryPlan | None:
        """The summary call to make before the next prompt, or ``None`` if it fits."""
        budget = context_window - max_tokens
        messages = self.messages
        starts = self._turn_starts()
        if len(starts) < 2:
            return None  # the newest turn is never summarised
        pinned = sum(_tokens(m, counter) for m in messages if m.pinned)
        summary = self.summary_tokens if self.summary else 0
        costs = [
            sum(_tokens(m, counter) for m in messages[start:stop] if not m.pinned)
            for start, stop in zip(starts, [*starts[1:], len(messages)], strict=True)
        ]
        used = TOKENS_REPLY_PRIMING + pinned + summary + sum(costs)
        if used <= budget * self.high:
            return None
        target = budget * self.low
        folded = 0  # turns to fold
        used += self.summary_tokens - summary  # a summary will be there
        while folded < len(costs) - 1 and used > target:
            used -= costs[folded]
            folded += 1
        upto = starts[folded]
        lines = "\n".join(
            f"{m.role}: {m.content}"
            for m in messages[self.folded : upto]
            if not m.pinned and m.content and m.role in ("user", "assistant")
        )
        words = max(20, self.summary_tokens * 3 // 4)
        request = [
            {"role": "system", "content": self.INSTRUCTION.format(words=words)},
            {
                "role": "user",
                "content": f"Summary so far:\n{self.summary or '(none)'}\n\nNew lines:\n{lines}",
            },
        ]
        return SummaryPlan(upto, request)

    async def prepare_prompt(
        self, *, counter: TokenCounter, context_window: int, max_tokens: int
    ) -> list[dict[str, Any]]:
        messages = self.messages
        head = [m for m in messages[: self.folded] if m.pinned]
        summary = self._summary_message()
        kept = [*head, *([summary] if summary else []), *messages[self.folded :]]
        budget = context_window - max_tokens
        # a summary that came out longer than asked still leaves room: trim as usual
        prompt = [m.to_openai() for m in trim_to_window(kept, budget=budget, counter=counter)]
        fit_newest(prompt, budget=budget, counter=counter)
        return prompt
