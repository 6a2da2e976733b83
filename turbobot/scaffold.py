"""``turbobot new NAME``: a personality module and its passing test, to start from."""

from __future__ import annotations

import keyword
import re
from pathlib import Path

from turbobot.exceptions import ConfigurationError

__all__ = ["new_bot"]

_BOT = '''\
"""{title}: a chat bot that remembers the conversation (say what it does here)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from turbobot import Generate, GetUserInput, System, User, turbo


@turbo(temperature=0.7)
async def {name}() -> AsyncGenerator[Any, Any]:
    """Hello! I am {title}. Ask me anything."""
    yield System(content="You are {title}, a helpful and concise assistant.")
    while True:
        message = yield GetUserInput()
        yield User(content=message)
        yield Generate(stream=True)


bot = {name}
'''

_TEST = '''\
"""Tests of {name}: run them with `python -m pytest {test_file}` (no configuration needed)."""

from turbobot import ScriptedLLM
from turbobot.testing import BotTester

from {name} import bot


def test_it_answers_and_remembers() -> None:
    llm = ScriptedLLM(["Hi! How can I help?", "You asked about tea."])
    with BotTester(bot, llm=llm) as chat:
        assert chat.say("hello") == ["Hi! How can I help?"]
        chat.restart()  # the conversation is rebuilt by replay: nothing is lost
        assert chat.say("what did I ask?") == ["You asked about tea."]
        prompt = [m["content"] for m in llm.requests[-1].messages]
        assert prompt[-3:] == ["hello", "Hi! How can I help?", "what did I ask?"]
'''


def new_bot(name: str, directory: Path) -> tuple[Path, Path]:
    """Write ``NAME.py`` and ``test_NAME.py`` in ``directory``; their paths.

    Raises:
        ConfigurationError: ``name`` is not a module name, or a file already exists.
    """
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,63}", name) or keyword.iskeyword(name):
        raise ConfigurationError(
            f"{name!r} cannot be a bot's module name: use lowercase letters, digits and "
            "underscores, starting with a letter (e.g. tea_expert)"
        )
    if not directory.is_dir():
        raise ConfigurationError(f"directory {str(directory)!r} does not exist")
    bot_file, test_file = directory / f"{name}.py", directory / f"test_{name}.py"
    for path in (bot_file, test_file):
        if path.exists():
            raise ConfigurationError(f"{path} already exists; nothing was written")
    title = name.replace("_", " ").title()
    bot_file.write_text(_BOT.format(name=name, title=title))
    test_file.write_text(_TEST.format(name=name, test_file=test_file.name))
    return bot_file, test_file
