"""A timed quiz: running out of time on a question moves on to the next one."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from turbobot import GetUserInput, Result, turbo

SECONDS_PER_QUESTION = 30.0

#: (question, accepted answers)
QUESTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("paris",)),
    ("How many legs does a spider have?", ("8", "eight")),
    ("Which planet is known as the red planet?", ("mars",)),
    ("What gas do plants take in from the air?", ("co2", "carbon dioxide")),
    ("How many minutes are in a day?", ("1440", "1,440")),
)


def is_right(answer: str, accepted: tuple[str, ...]) -> bool:
    said = " ".join(answer.lower().strip(" .!?").split())
    return said in accepted


@turbo()
async def quiz(seconds: float = SECONDS_PER_QUESTION) -> AsyncGenerator[Any, Any]:
    """A five-question quiz: answer each within the time limit."""
    yield Result(
        f"Quiz time! {len(QUESTIONS)} questions, {seconds:g} seconds each. "
        "Running out of time moves on."
    )
    score = 0
    for number, (question, accepted) in enumerate(QUESTIONS, start=1):
        answer = yield GetUserInput(
            f"Question {number}: {question}", timeout=seconds, name=f"q{number}", record=False
        )
        if answer.timed_out:
            yield Result(f"Time is up! It was {accepted[0]}.")
        elif is_right(answer, accepted):
            score += 1
            yield Result("Right!")
        else:
            yield Result(f"Not quite: it was {accepted[0]}.")
    yield Result(f"You scored {score} out of {len(QUESTIONS)}. Send /start to play again.")


bot = quiz
