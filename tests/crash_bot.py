"""The template the crash suite (tests/test_crash.py) runs in every chat: a question, a
greeting, ``TURNS`` streamed generations, then a question with a timeout."""

from __future__ import annotations

from turbobot import Generate, GetUserInput, Result, System, User, turbo

TURNS = 3
QUESTION = "Hello! What is your name?"
ANYTHING_ELSE = "Anything else?"
TIMED_OUT = "Time is up. Goodbye!"
#: seconds the last question waits
TIMEOUT = 1.0


def greeting(name: str) -> str:
    return f"Nice to meet you, {name}. Ask me anything."


@turbo(model="gpt-4o-mini", max_tokens=64)
async def crash_chat():
    """A multi-turn conversation that survives kills."""
    yield System("You answer in one short line.")
    name = yield GetUserInput(QUESTION)
    yield Result(greeting(name))
    for _ in range(TURNS):
        said = yield GetUserInput()
        yield User(said)
        yield Generate(stream=True)
    last = yield GetUserInput(ANYTHING_ELSE, timeout=TIMEOUT)
    yield Result(TIMED_OUT if last.timed_out else f"Goodbye, {last}!")


@turbo(model="gpt-4o-mini", context_window=1024, max_tokens=64)
async def flood_chat():
    """An assistant with a small window: each prompt costs the same however many lines
    came before (the flood test measures order and exactly-once, not prompt size)."""
    while True:
        said = yield GetUserInput()
        yield User(said)
        yield Generate(stream=True)
