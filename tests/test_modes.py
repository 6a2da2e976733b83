"""Several personalities in one deployment (issue 12): /mode switches per chat, the
choice is stored and survives restarts, each mode keeps its own commands."""

from __future__ import annotations

from fakes.openai_server import FakeOpenAI
from tests.conftest import StoreFactory
from tests.test_console import clean_env, run_console
from turbobot import ScriptedLLM
from turbobot.bots import assistant, quiz, summarizer
from turbobot.testing import BotSession

MODES = "Modes: {}. Send /mode NAME to switch."


async def test_mode_switches_per_chat_and_is_remembered(make_store: StoreFactory) -> None:
    store = await make_store()
    llm = ScriptedLLM(["Hello there.", "Hi, Bo."])
    session = BotSession(assistant.bot, llm=llm, store=store, modes=[quiz.bot, summarizer.bot])
    async with session as chat:
        assert await chat.say("/mode") == [MODES.format("assistant (current), quiz, summarizer")]
        assert await chat.say("hi") == ["Hello there."]
        replies = await chat.say("/mode quiz")
        assert replies[0] == "Switched to quiz."
        assert replies[1].startswith("Quiz time!") and replies[2].startswith("Question 1:")
        assert await chat.say("/mode QUIZ") == ["You are already talking to quiz."]
        # another chat is not affected
        assert await chat.say("hey", channel="other") == ["Hi, Bo."]
        assert await chat.say("paris") == [
            "Right!",
            "Question 2: How many legs does a spider have?",
        ]
        await chat.restart()
        assert await chat.say("8") == [
            "Right!",
            "Question 3: Which planet is known as the red planet?",
        ]
        for _ in range(3):
            await chat.advance(quiz.SECONDS_PER_QUESTION)
        assert chat.texts("chat")[-1].startswith("You scored 2 out of 5")
        # finished: the next message starts a quiz again, also after a restart
        await chat.restart()
        assert (await chat.say("again"))[0].startswith("Quiz time!")
        for _ in range(5):
            await chat.advance(quiz.SECONDS_PER_QUESTION)  # finished again
        await chat.restart()
        assert (await chat.say("/start"))[0].startswith("Quiz time!")  # /start: this mode
        (help_text,) = await chat.say("/help")
        assert help_text.startswith("A five-question quiz")
        assert MODES.format("assistant, quiz (current), summarizer") in help_text
        # a command of another mode is not input here
        assert await chat.say("/summarize") == [
            "I do not know the command /summarize. /help lists the ones I know."
        ]
        assert await chat.say("/mode nope") == [
            MODES.format("assistant, quiz (current), summarizer")
        ]
        llm.replies.append("Back to chatting.")
        assert await chat.say("/mode assistant") == ["Switched to assistant."]
        assert await chat.say("hello again") == ["Back to chatting."]
    statuses = [(c.template_ref, c.status) for c in await store.conversations(chat.key())]
    assert ("bots.quiz:quiz", "restarted") in statuses
    assert statuses[-1] == ("bots.assistant:assistant", "waiting")


async def test_the_registry_offers_mode_with_choices_and_every_modes_commands() -> None:
    async with BotSession(assistant.bot, modes=[quiz.bot, summarizer.bot]) as chat:
        commands = {c.name: c for c in chat.runtime.commands}
        assert commands["mode"].choices == ("assistant", "quiz", "summarizer")
        assert commands["summarize"].input
    async with BotSession(assistant.bot) as single:
        assert "mode" not in single.runtime.commands  # no modes, no /mode


async def test_the_console_switches_modes(openai_server: FakeOpenAI) -> None:
    env = clean_env(OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=openai_server.base_url)
    code, out, err = await run_console(
        "hello\n/mode quiz\nparis\n", env, "bots.assistant", "--mode", "bots.quiz"
    )
    assert code == 0, err
    assert "echo: hello" in out and "Switched to quiz." in out and "Right!" in out
    code, out, err = await run_console("hi\n", env, "bots.assistant", "--mode", "bots.assistant")
    assert code == 2 and "two bots have the same name" in err and "Traceback" not in err


def test_the_runtime_still_lists_its_modes() -> None:
    """From review: the split had removed the public ``Runtime.modes``."""
    from turbobot.runtime import Runtime
    from turbobot.testing import RecordingSender

    runtime = Runtime(assistant.bot, llm=ScriptedLLM(), sender=RecordingSender(), modes=[quiz.bot])
    assert list(runtime.modes) == [assistant.bot.fn.__name__, quiz.bot.fn.__name__]
