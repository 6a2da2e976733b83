"""A chat assistant that sums up the recent conversation on /summarize."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from turbobot import BaseMemory, Generate, GetUserInput, Result, System, User, turbo
from turbobot.commands import Command, split_command

#: turns summed up when /summarize gives no number
DEFAULT_TURNS = 10
#: the name of the request for a summary (it is left out of later summaries)
REQUEST = "summary_request"


def recent_lines(messages: list[Any], turns: int) -> list[str]:
    """The last ``turns`` exchanges as ``role: text`` lines, without earlier summaries."""
    lines: list[str] = []
    skip_reply = False
    for message in messages:
        if message.role == "user" and message.name == REQUEST:
            skip_reply = True  # a summary request, then its answer: not conversation
            continue
        if message.role == "assistant" and skip_reply:
            skip_reply = False
            continue
        if message.role in ("user", "assistant") and message.content:
            lines.append(f"{message.role}: {message.content}")
    return lines[-2 * turns :]


@turbo(
    temperature=0.3,
    commands=[Command("summarize", "Sum up our recent conversation (/summarize 5)", input=True)],
)
async def summarizer(memory: BaseMemory) -> AsyncGenerator[Any, Any]:
    """A helpful assistant; /summarize sums up what we said recently."""
    yield System("You are a helpful, concise assistant.")
    while True:
        text = yield GetUserInput()
        command = split_command(text)
        if command is None or command[0] != "summarize":
            yield User(text)
            yield Generate(stream=True)
            continue
        turns = int(command[1]) if command[1].isdigit() else DEFAULT_TURNS
        lines = recent_lines(await memory.get(), max(1, min(turns, 50)))
        if not lines:
            yield Result("There is nothing to summarise yet: say something first.")
            continue
        transcript = "\n".join(lines)
        yield User(
            f"Summarise this conversation in at most five short bullet points:\n\n{transcript}",
            name=REQUEST,
        )
        yield Generate()


bot = summarizer
