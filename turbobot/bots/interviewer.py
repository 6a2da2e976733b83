"""An intake form: re-asks until each answer is valid, reminds you when you go quiet, sums up."""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, Callable
from typing import Any

from turbobot import GetUserInput, Result, turbo

#: minutes of silence before a reminder, and how many reminders before it just waits
REMINDER_SECONDS = 600.0
REMINDERS = 2

Check = Callable[[str], tuple[str | None, str | None]]


def check_name(text: str) -> tuple[str | None, str | None]:
    name = " ".join(text.split())
    if not 1 <= len(name) <= 60 or not re.search(r"[^\W\d_]", name):
        return None, "That does not look like a name."
    return name, None


def check_age(text: str) -> tuple[str | None, str | None]:
    digits = text.strip()
    if not digits.isdigit() or not 1 <= int(digits) <= 130:
        return None, "Please give your age as a whole number, like 34."
    return digits, None


def check_email(text: str) -> tuple[str | None, str | None]:
    email = text.strip()
    if not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", email) or len(email) > 254:
        return None, "That is not an e-mail address I can use (name@example.com)."
    return email, None


#: (field, question, check)
QUESTIONS: tuple[tuple[str, str, Check], ...] = (
    ("name", "What is your name?", check_name),
    ("age", "How old are you?", check_age),
    ("email", "What e-mail address can we reach you at?", check_email),
)


@turbo()
async def interviewer() -> AsyncGenerator[Any, Any]:
    """I ask you three questions (name, age, e-mail) and sum up your answers."""
    answers: dict[str, str] = {}
    for field, question, check in QUESTIONS:
        prompt, reminders = question, 0
        while field not in answers:
            timeout = REMINDER_SECONDS if reminders < REMINDERS else None
            # record=False: the questions are the form's, not a model's turns
            reply = yield GetUserInput(prompt, timeout=timeout, name=field, record=False)
            if reply.timed_out:
                reminders += 1
                prompt = f"Still there? {question}"
                continue
            value, problem = check(reply)
            if value is None:
                prompt = f"{problem} {question}"
            else:
                answers[field] = value
    yield Result(
        f"Thank you, {answers['name']}! I noted: age {answers['age']}, "
        f"e-mail {answers['email']}. Send /start to fill the form again."
    )


bot = interviewer
