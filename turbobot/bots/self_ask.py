"""Answers a question by breaking it into sub-questions, answering each, then combining them."""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
from typing import Any

from turbobot import (
    BaseMemory,
    Generate,
    GetUserInput,
    Result,
    Return,
    System,
    User,
    turbo,
)

MAX_SUBQUESTIONS = 3

NEEDS_A_CAPABLE_MODEL = (
    "I could not break that question into sub-questions: this bot needs a more capable "
    "model than the offline one (set OPENAI_API_KEY, or OPENAI_BASE_URL for another "
    "OpenAI-compatible server)."
)


def parse_subquestions(text: str) -> list[str]:
    """The questions listed in ``text``, one per line (numbers and bullets removed)."""
    found = []
    for line in text.splitlines():
        line = re.sub(r"^\s*(?:[-*•]|\d+[.)])\s*", "", line).strip()
        if line.endswith("?") and 3 <= len(line) <= 300:
            found.append(line)
    return found[:MAX_SUBQUESTIONS]


@turbo(temperature=0.0)
async def subquestions(question: str, memory: BaseMemory) -> AsyncGenerator[Any, Any]:
    """Breaks ``question`` into simpler questions (a sub-template: returns a list)."""
    await memory.clear()  # a prompt of its own
    yield System(
        f"Break the user's question into at most {MAX_SUBQUESTIONS} simpler factual "
        "questions whose answers together answer it. Reply with the questions only, one "
        "per line, each ending with a question mark."
    )
    yield User(question)
    reply = yield Generate(forward=False)
    yield Return(parse_subquestions(reply.content))


@turbo(temperature=0.0)
async def answer_briefly(question: str, memory: BaseMemory) -> AsyncGenerator[Any, Any]:
    """Answers one simple question in a sentence (a sub-template: returns the text)."""
    await memory.clear()
    yield System("Answer the question in one short factual sentence.")
    yield User(question)
    reply = yield Generate(forward=False)
    yield Return(reply.content.strip())


@turbo(temperature=0.0)
async def self_ask(memory: BaseMemory) -> AsyncGenerator[Any, Any]:
    """Ask me a question that takes a few steps; I show the steps, then answer."""
    while True:
        question = yield GetUserInput()
        parts: list[str] = yield subquestions(question)
        if not parts:
            yield Result(NEEDS_A_CAPABLE_MODEL)
            continue
        facts = []
        for part in parts:
            answer = yield answer_briefly(part)
            facts.append(f"- {part} {answer}")
        notes = "\n".join(facts)
        yield Result(f"Steps:\n{notes}")
        await memory.clear()
        yield System("Answer the question in two or three sentences, using the notes given.")
        yield User(f"Notes:\n{notes}\n\nQuestion: {question}")
        yield Generate()


bot = self_ask
