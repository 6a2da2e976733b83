"""SummaryMemory (issue 12): turns leaving the window are folded into a rolling
summary, incrementally, by journaled model calls that a replay does not repeat."""

from __future__ import annotations

from typing import Any

from tests.conftest import StoreFactory
from turbobot import (
    Generate,
    GetUserInput,
    LLMRequest,
    ScriptedLLM,
    SummaryMemory,
    System,
    User,
    turbo,
)
from turbobot.testing import BotSession
from turbobot.tokens import count_prompt_tokens, token_counter_for

WINDOW, RESERVE = 400, 50


def summariser_requests(llm: ScriptedLLM) -> list[LLMRequest]:
    return [r for r in llm.requests if r.messages[0]["content"].startswith("You keep a running")]


def responder() -> tuple[ScriptedLLM, list[str]]:
    summaries: list[str] = []

    def respond(request: LLMRequest) -> str:
        if request.messages[0]["content"].startswith("You keep a running"):
            summaries.append(f"summary {len(summaries) + 1}")
            return summaries[-1]
        return "ok, noted that down for you."

    return ScriptedLLM(respond=respond), summaries


@turbo(memory=lambda: SummaryMemory(summary_tokens=40), context_window=WINDOW, max_tokens=RESERVE)
async def notes() -> Any:
    yield System("You are a note taker. Keep answers short.")
    while True:
        text = yield GetUserInput()
        yield User(text)
        yield Generate()


async def test_old_turns_fold_into_a_rolling_summary_incrementally(
    make_store: StoreFactory,
) -> None:
    llm, summaries = responder()
    counter = token_counter_for("gpt-4o-mini")
    async with BotSession(notes, llm=llm, store=await make_store()) as chat:
        for i in range(30):
            assert await chat.say(f"note {i}: the number {i} is worth remembering") == [
                "ok, noted that down for you."
            ]
        folds = summariser_requests(llm)
        assert len(folds) >= 3 and summaries[: len(folds)] == [
            f"summary {n}" for n in range(1, len(folds) + 1)
        ]
        # incremental: each fold gets the summary so far and only lines not folded before
        seen: set[str] = set()
        for n, request in enumerate(folds):
            content = request.messages[1]["content"]
            assert content.startswith(f"Summary so far:\n{'(none)' if n == 0 else f'summary {n}'}")
            new = content.split("New lines:\n", 1)[1].splitlines()
            users = [line for line in new if line.startswith("user: ")]
            assert users and not seen.intersection(users)
            seen.update(users)
        # every prompt fits, starts with the pinned system prompt, then the summary
        answers = [r for r in llm.requests if r not in folds]
        for request in answers:
            assert count_prompt_tokens(request.messages, counter) <= WINDOW - RESERVE
            assert request.messages[0]["content"].startswith("You are a note taker")
        last = answers[-1].messages
        assert last[1]["content"].startswith("Summary of the earlier conversation:\nsummary")
        assert last[-1]["content"] == "note 29: the number 29 is worth remembering"

        # A restart rebuilds the memory by replay: no summary call is made again, and
        # the next prompt is what it would have been.
        calls, folded = llm.calls, len(summaries)
        await chat.restart()
        await chat.say("note 30: one more")
        new_folds = [r for r in llm.requests[calls:] if r in summariser_requests(llm)]
        assert llm.calls - calls == 1 + len(new_folds) and len(new_folds) <= 1
        for request in new_folds:  # a fold due now continues from the last summary
            assert request.messages[1]["content"].startswith(f"Summary so far:\nsummary {folded}")
        after = llm.requests[-1].messages
        header = "Summary of the earlier conversation:\n"
        assert after[1]["content"] == header + summaries[-1]


async def test_a_short_conversation_is_never_summarised() -> None:
    llm, _ = responder()
    async with BotSession(notes, llm=llm) as chat:
        for i in range(3):
            await chat.say(f"hi {i}")
        assert summariser_requests(llm) == []
        assert [m["role"] for m in llm.requests[-1].messages] == ["system"] + [
            "user",
            "assistant",
        ] * 2 + ["user"]


def test_summary_memory_checks_its_settings() -> None:
    import pytest

    with pytest.raises(ValueError, match="0 < low < high"):
        SummaryMemory(low=0.9, high=0.5)
