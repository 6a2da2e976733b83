"""Answers questions from one document only, and says so when the document does not tell."""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
from typing import Any

from turbobot import Generate, GetUserInput, Result, System, User, turbo

#: what it says when the document does not answer the question
UNKNOWN = "The document does not say."

DOCUMENT = """\
turbobot runs LLM chat bots written as async-generator templates. A template yields
System and User messages to build the prompt, Generate() for a reply from the model and
GetUserInput() to wait for the user's next message. The same template runs in the
console, on Telegram and on Discord. Conversations are stored in SQLite by default, or
in PostgreSQL, and survive restarts: a conversation is rebuilt by replaying its journal.
With no OPENAI_API_KEY the bot runs on an offline local model, SmolLM2-135M-Instruct.
The commands /start, /reset, /retry, /cancel and /help work on every platform.
"""

#: words that say nothing about a question's topic
_COMMON = frozenset(
    (  # noqa: SIM905 - a sentence of words reads better than a column of them
        "what which when where who whom whose why how does did do is are was were can could "
        "would should will the a an and or of to in on for with about from by at it its this "
        "that these those there their them they you your yours me my mine tell please"
    ).split()
)


def topic_words(text: str) -> set[str]:
    """The words of ``text`` that can name a topic (3+ letters, not common words)."""
    words = {w.lower() for w in re.findall(r"[^\W\d_]{3,}", text)}
    return {w for w in words if w not in _COMMON}


def mentions(document: str, question: str) -> bool:
    """Whether ``document`` shares any topic word (or its stem) with ``question``."""
    known = {w[:5] for w in topic_words(document)}
    return any(w[:5] in known for w in topic_words(question))


@turbo(temperature=0.0)
async def qa(document: str = DOCUMENT) -> AsyncGenerator[Any, Any]:
    """Ask me about the document I was given; I answer from it and nothing else."""
    yield System(
        "Answer the user's question using only the document below. If the document "
        f'does not contain the answer, reply exactly "{UNKNOWN}" and nothing else. '
        "Keep answers to one or two sentences.\n\n"
        f"Document:\n{document}"
    )
    while True:
        question = yield GetUserInput()
        if not mentions(document, question):
            # Nothing in the document is about it: no need to ask the model.
            yield Result(UNKNOWN)
            continue
        yield User(question)
        yield Generate()


bot = qa
