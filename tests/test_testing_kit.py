"""turbobot.testing, the kit bot authors test with (issue 12).

BotTester is used from plain ``def`` tests here on purpose: that is how an author's
project without any pytest configuration uses it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from turbobot import Generate, GetUserInput, Result, ScriptedLLM, Step, User, turbo
from turbobot.clock import FakeClock
from turbobot.testing import BotSession, BotTester


@turbo()
async def reminder() -> Any:
    name = yield GetUserInput("What is your name?")
    answer = yield GetUserInput(f"{name}, ready?", timeout=60)
    while answer.timed_out:
        answer = yield GetUserInput("Still there? Say yes when ready.", timeout=60)
    yield User(f"{name} is ready: {answer}")
    yield Generate()


def test_say_restart_and_advance_without_sleeping() -> None:
    with BotTester(reminder, llm=ScriptedLLM(["Let us begin."])) as chat:
        assert chat.say("hi") == ["What is your name?"]
        assert chat.say("Ada") == ["Ada, ready?"]
        assert chat.advance(59) == []
        chat.restart()  # the deadline survives the restart: it is stored
        assert chat.advance(1) == ["Still there? Say yes when ready."]
        assert chat.advance(60) == ["Still there? Say yes when ready."]
        assert chat.say("yes") == ["Let us begin."]
        assert chat.llm.requests[0].messages[-1]["content"] == "Ada is ready: yes"  # type: ignore[attr-defined]
        assert chat.transcript()[-2:] == [("user", "yes"), ("assistant", "Let us begin.")]
        assert chat.texts() == [
            "What is your name?",
            "Ada, ready?",
            "Still there? Say yes when ready.",
            "Still there? Say yes when ready.",
            "Let us begin.",
        ]


def test_a_scripted_llm_that_runs_out_fails_the_test_clearly() -> None:
    with BotTester(reminder, llm=ScriptedLLM([])) as chat:
        chat.say("hi")
        chat.say("Bo")
        with pytest.raises(AssertionError, match=r"ran out of replies at request 1.*Bo is ready"):
            chat.say("yes")


_paths = iter(["first", "second"])


@turbo()
async def not_replay_safe() -> Any:
    yield GetUserInput("Name?")
    # reads outside state without Step: a replay after a restart takes another path
    if next(_paths) == "first":
        yield GetUserInput("Question one?")
    else:
        yield Step(lambda: "oops")
    yield GetUserInput("Question two?")


def test_a_template_that_is_not_replay_safe_fails_after_restart() -> None:
    with BotTester(not_replay_safe) as chat:
        assert chat.say("hi") == ["Name?"]
        assert chat.say("Ann") == ["Question one?"]
        assert chat.say("one") == ["Question two?"]
        chat.restart()
        with pytest.raises(AssertionError, match=r"could not be rebuilt by replay.*Step"):
            chat.say("answer")


async def test_the_async_session_has_the_same_kit() -> None:
    @turbo()
    async def quiz() -> Any:
        answer = yield GetUserInput("2+2? You have 10 s.", timeout=10)
        yield Result("Time is up: 4." if answer.timed_out else f"You said {answer}.")

    clock = FakeClock(start=100.0)
    async with BotSession(quiz, clock=clock) as chat:
        assert await chat.say("start") == ["2+2? You have 10 s."]
        assert await chat.advance(10) == ["Time is up: 4."]
        assert clock() == 110.0 and clock.pending == 0
        with pytest.raises(ValueError, match="forwards"):
            clock.advance(-1)
    with pytest.raises(TypeError, match="FakeClock"):
        async with BotSession(quiz, clock=lambda: 0.0) as other:
            await other.advance(1)


def test_the_readme_example_passes_in_a_project_with_no_configuration(tmp_path: Path) -> None:
    """Outside this repository (no asyncio_mode=auto, no conftest), with plain pytest."""
    (tmp_path / "mybot.py").write_text(
        textwrap.dedent(
            """
            from turbobot import Generate, GetUserInput, User, turbo

            @turbo()
            async def bot():
                while True:
                    text = yield GetUserInput()
                    yield User(text)
                    yield Generate()
            """
        )
    )
    (tmp_path / "test_mybot.py").write_text(
        textwrap.dedent(
            """
            from turbobot import ScriptedLLM
            from turbobot.testing import BotTester
            from mybot import bot

            def test_my_bot():
                with BotTester(bot, llm=ScriptedLLM(["Hi!"])) as chat:
                    assert chat.say("hello") == ["Hi!"]
                    chat.restart()
            """
        )
    )
    assert_passes_alone(tmp_path, "test_mybot.py")


def assert_passes_alone(directory: Path, test_file: str) -> None:
    """``test_file`` passes with plain pytest run in ``directory`` (no config, one test)."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
