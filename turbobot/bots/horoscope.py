"""A fortune teller who reads your horoscope: the turbo-chat README app, as a chat."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from turbobot import Generate, GetUserInput, System, TemplateContext, User, turbo

SIGNS = (
    "aries",
    "taurus",
    "gemini",
    "cancer",
    "leo",
    "virgo",
    "libra",
    "scorpio",
    "sagittarius",
    "capricorn",
    "aquarius",
    "pisces",
)


def find_sign(text: str) -> str | None:
    """The zodiac sign named in ``text``, if exactly one is."""
    words = {w.strip(".,!?;:'\"()").lower() for w in text.split()}
    found = [s for s in SIGNS if s in words]
    return found[0] if len(found) == 1 else None


@turbo(temperature=0.9, max_tokens=200)
async def horoscope(
    context: TemplateContext, zodiac: str | None = None
) -> AsyncGenerator[Any, Any]:
    """I am Madame Turbo, a fortune teller. Tell me your sign and ask about your future."""
    yield System(
        content=(
            "You are Madame Turbo, a warm and mysterious fortune teller. "
            "Answer in two or three short sentences, in character."
        )
    )
    # The sign may come from the caller, the bot's settings or the message that woke us.
    trigger = context.trigger.text if context.trigger else ""
    sign = zodiac or context.settings.get("zodiac") or find_sign(trigger)
    prompt = "Welcome, traveller. What is your zodiac sign?"
    while sign is None:
        answer = yield GetUserInput(prompt)
        sign = find_sign(answer)
        prompt = "The stars need a sign, like Leo or Pisces. Which one is yours?"
    yield User(content=f"My zodiac sign is {sign.capitalize()}.")
    question = yield GetUserInput(f"Ah, {sign.capitalize()}. What do you want to know?")
    while True:
        yield User(content=question)
        yield Generate(temperature=0.9)
        question = yield GetUserInput()


bot = horoscope
