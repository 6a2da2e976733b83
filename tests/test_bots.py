"""The bundled personalities (issue 12), each tested with the kit bot authors use:
a conversation, a restart in the middle of it, and one run through the real openai
client against the fake OpenAI server."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fakes.openai_server import FakeOpenAI, Reply
from tests.conftest import StoreFactory
from turbobot import LLMCapabilityError, LLMResponse, OpenAILLM, ScriptedLLM, ToolCall
from turbobot.bots import interviewer, qa, quiz, self_ask, summarizer, toolsmith
from turbobot.loader import load_template
from turbobot.testing import BotSession


@pytest.mark.parametrize(
    "name",
    ["assistant", "horoscope", "interviewer", "quiz", "qa", "summarizer", "self_ask", "toolsmith"],
)
def test_every_bot_loads_by_name_and_says_what_it_is(name: str) -> None:
    template = load_template(f"bots.{name}")
    module = __import__(f"turbobot.bots.{name}", fromlist=["bot"])
    assert module.__doc__ and "\n" not in module.__doc__.strip()  # a one-line docstring
    assert template.__doc__  # what /help shows


# -- interviewer ---------------------------------------------------------------------


async def test_interviewer_re_asks_reminds_and_sums_up(make_store: StoreFactory) -> None:
    async with BotSession(interviewer.bot, store=await make_store()) as chat:
        assert await chat.say("hi") == ["What is your name?"]
        assert await chat.say("   ") == [chat.runtime.settings.notices.text_only]
        assert await chat.say("42") == ["That does not look like a name. What is your name?"]
        assert await chat.say("12345") == ["That does not look like a name. What is your name?"]
        assert await chat.say("Ada  Lovelace") == ["How old are you?"]
        assert await chat.advance(interviewer.REMINDER_SECONDS) == ["Still there? How old are you?"]
        await chat.restart()  # mid-form: answers so far are kept
        assert await chat.say("two hundred") == [
            "Please give your age as a whole number, like 34. How old are you?"
        ]
        assert await chat.say("36") == ["What e-mail address can we reach you at?"]
        # two reminders, then it waits without nagging
        assert await chat.advance(interviewer.REMINDER_SECONDS) != []
        assert await chat.advance(interviewer.REMINDER_SECONDS) != []
        assert await chat.advance(interviewer.REMINDER_SECONDS * 10) == []
        assert await chat.say("not an address") == [
            "That is not an e-mail address I can use (name@example.com). "
            "What e-mail address can we reach you at?"
        ]
        assert await chat.say("ada@example.org") == [
            "Thank you, Ada Lovelace! I noted: age 36, e-mail ada@example.org. "
            "Send /start to fill the form again."
        ]
        assert chat.llm.calls == 0  # type: ignore[attr-defined]  # a form needs no model


def test_interviewer_checks() -> None:
    assert interviewer.check_name("  Zoë   Ng ") == ("Zoë Ng", None)
    assert interviewer.check_name("x" * 61)[0] is None
    assert interviewer.check_age("0")[0] is None and interviewer.check_age("130") == ("130", None)
    assert interviewer.check_email("a@b")[0] is None
    assert interviewer.check_email("a@b.co") == ("a@b.co", None)


# -- quiz ----------------------------------------------------------------------------


async def test_quiz_moves_on_when_time_runs_out_across_a_restart(make_store: StoreFactory) -> None:
    seconds = quiz.SECONDS_PER_QUESTION
    async with BotSession(quiz.bot, store=await make_store()) as chat:
        replies = await chat.say("play")
        assert replies[0].startswith("Quiz time! 5 questions, 30 seconds each.")
        assert replies[1] == "Question 1: What is the capital of France?"
        assert await chat.say(" Paris. ") == [
            "Right!",
            "Question 2: How many legs does a spider have?",
        ]
        assert await chat.advance(seconds - 1) == []
        await chat.restart()  # the deadline is stored: it still fires
        assert await chat.advance(1) == [
            "Time is up! It was 8.",
            "Question 3: Which planet is known as the red planet?",
        ]
        assert await chat.say("Venus") == [
            "Not quite: it was mars.",
            "Question 4: What gas do plants take in from the air?",
        ]
        assert await chat.say("carbon dioxide") == [
            "Right!",
            "Question 5: How many minutes are in a day?",
        ]
        assert await chat.advance(seconds) == [
            "Time is up! It was 1440.",
            "You scored 2 out of 5. Send /start to play again.",
        ]


# -- qa ------------------------------------------------------------------------------


async def test_qa_answers_from_the_document_and_refuses_what_it_does_not_cover() -> None:
    llm = ScriptedLLM(["It stores conversations in SQLite by default."])
    async with BotSession(qa.bot, llm=llm) as chat:
        assert await chat.say("Where are conversations stored?") == [
            "It stores conversations in SQLite by default."
        ]
        system = llm.requests[0].messages[0]["content"]
        assert qa.UNKNOWN in system and "SmolLM2" in system
        # nothing in the document is about it: answered without a model call
        assert await chat.say("Who won the football world cup?") == [qa.UNKNOWN]
        await chat.restart()
        assert await chat.say("Which football team is best?") == [qa.UNKNOWN]
        assert llm.calls == 1


def test_qa_topic_matching() -> None:
    assert qa.mentions(qa.DOCUMENT, "Does it run on telegram?")
    assert not qa.mentions(qa.DOCUMENT, "What is the weather?")
    assert not qa.mentions(qa.DOCUMENT, "")


# -- summarizer ----------------------------------------------------------------------


async def test_summarizer_sums_up_recent_turns_only(make_store: StoreFactory) -> None:
    llm = ScriptedLLM(["Paris is lovely.", "Take the train.", "- Paris\n- train", "Yes."])
    async with BotSession(summarizer.bot, llm=llm, store=await make_store()) as chat:
        assert await chat.say("/summarize") == [
            "There is nothing to summarise yet: say something first."
        ]
        assert await chat.say("I am going to Paris") == ["Paris is lovely."]
        await chat.restart()
        assert await chat.say("How do I get there?") == ["Take the train."]
        assert await chat.say("/summarize 1") == ["- Paris\n- train"]
        request = llm.requests[2].messages[-1]["content"]
        assert "user: How do I get there?\nassistant: Take the train." in request
        assert "Paris is lovely" not in request  # one turn only
        await chat.say("Thanks")
        llm.replies.append("- thanks")
        await chat.say("/summarize")
        again = llm.requests[4].messages[-1]["content"]
        # earlier summary requests and their answers are not summed up again
        assert "Summarise this conversation" not in again.split("\n\n", 1)[1]
        assert "- Paris" not in again and "user: Thanks" in again


async def test_summarize_is_in_the_command_menu() -> None:
    async with BotSession(summarizer.bot) as chat:
        assert (
            "summarize",
            "Sum up our recent conversation (/summarize 5)",
        ) in chat.runtime.commands.menu()


# -- self_ask ------------------------------------------------------------------------


async def test_self_ask_composes_sub_templates(make_store: StoreFactory) -> None:
    llm = ScriptedLLM(
        [
            "1. Who directed Jaws?\n2. When was that director born?",
            "Steven Spielberg.",
            "1946.",
            "Jaws was directed by Steven Spielberg, born in 1946.",
        ]
    )
    async with BotSession(self_ask.bot, llm=llm, store=await make_store()) as chat:
        replies = await chat.say("When was the director of Jaws born?")
        assert replies == [
            "Steps:\n- Who directed Jaws? Steven Spielberg.\n- When was that director born? 1946.",
            "Jaws was directed by Steven Spielberg, born in 1946.",
        ]
        # each sub-template had a prompt of its own
        assert [m["role"] for m in llm.requests[1].messages] == ["system", "user"]
        assert llm.requests[1].messages[1]["content"] == "Who directed Jaws?"
        await chat.restart()
        llm.replies.append("I am not sure.")  # a model that cannot decompose
        assert await chat.say("Why?") == [self_ask.NEEDS_A_CAPABLE_MODEL]


def test_self_ask_parsing() -> None:
    text = "- Who is A?\n* Who is B?\n3) Where is C?\n4. Why D?\nnot a question\n?"
    assert self_ask.parse_subquestions(text) == ["Who is A?", "Who is B?", "Where is C?"]
    assert self_ask.parse_subquestions("") == []


# -- toolsmith -----------------------------------------------------------------------


def test_calculate_is_exact_and_safe() -> None:
    assert toolsmith.calculate("(17 * 23) + 4 ** 2") == "407"
    assert toolsmith.calculate("7 / 2") == "3.5"
    assert toolsmith.calculate("1/0") == "error: division by zero"
    assert toolsmith.calculate("2 ** 1000").startswith("error: exponents above")
    assert toolsmith.calculate("9 ** 99 * 9 ** 99").startswith("error: the result is too large")
    assert toolsmith.calculate("__import__('os').system('true')").startswith("error: only numbers")
    assert toolsmith.calculate("True + 1").startswith("error: only numbers")
    assert toolsmith.calculate("1 +").startswith("error:")
    assert toolsmith.calculate("1" * 300).startswith("error: expressions are limited")
    assert toolsmith.roll_dice(0).startswith("error")
    assert toolsmith.current_time("Nowhere/Atlantis").startswith("error: unknown time zone")


async def test_toolsmith_calls_tools_and_replays_them(make_store: StoreFactory) -> None:
    llm = ScriptedLLM(
        [
            LLMResponse("", (ToolCall("c1", "roll_dice", '{"count": 2}'),), None, "tool_calls"),
            "You rolled.",
            "Again?",
        ]
    )
    async with BotSession(toolsmith.bot, llm=llm, store=await make_store()) as chat:
        assert await chat.say("roll two dice") == ["You rolled."]
        tool_result = llm.requests[1].messages[-1]
        assert tool_result["role"] == "tool" and tool_result["content"].startswith("rolls [")
        assert "Today is " in llm.requests[0].messages[0]["content"]
        await chat.restart()  # the date (a Step) and the rolls (a tool) replay as they were
        assert await chat.say("and?") == ["Again?"]
        assert llm.requests[2].messages[-3]["content"] == tool_result["content"]


async def test_toolsmith_says_plainly_when_the_model_cannot_call_tools() -> None:
    llm = ScriptedLLM([LLMCapabilityError("the offline local model does not support tools")])
    async with BotSession(toolsmith.bot, llm=llm) as chat:
        assert await chat.say("what is 2+2?") == [toolsmith.NEEDS_TOOLS]


# -- end to end through the real openai client ----------------------------------------


def _respond_by_bot(body: dict[str, Any]) -> Reply:
    """The fake OpenAI server, answering each bot's kind of request."""
    messages = body["messages"]
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    last = messages[-1]
    if body.get("tools") and last["role"] == "user":
        return Reply(tool_calls=[("calculate", json.dumps({"expression": "6*7"}))])
    if last["role"] == "tool":
        return Reply(content=f"The answer is {last['content']}.")
    if system.startswith("Break the user's question"):
        return Reply(content="1. What is one?\n2. What is two?")
    return Reply(content=f"echo: {last['content'][:40]}")


@pytest.mark.parametrize(
    "name", ["qa", "summarizer", "self_ask", "toolsmith", "interviewer", "quiz"]
)
async def test_each_bot_end_to_end_on_the_openai_client(name: str) -> None:
    server = await FakeOpenAI(respond=_respond_by_bot).start()
    llm = OpenAILLM(api_key="sk-test", base_url=server.base_url, timeout=5)
    try:
        async with BotSession(load_template(f"bots.{name}"), llm=llm) as chat:
            if name == "qa":
                assert await chat.say("Which platforms does turbobot run on?") == [
                    "echo: Which platforms does turbobot run on?"
                ]
            elif name == "summarizer":
                await chat.say("hello")
                (summary,) = await chat.say("/summarize")
                assert summary.startswith("echo: Summarise this conversation")
            elif name == "self_ask":
                replies = await chat.say("What is three?")
                steps = "- What is one? echo: What is one?\n- What is two? echo: What is two?"
                assert replies[0] == f"Steps:\n{steps}"
                assert replies[1].startswith("echo: Notes:")
            elif name == "toolsmith":
                assert await chat.say("six times seven?") == ["The answer is 42."]
            elif name == "interviewer":
                assert await chat.say("hi") == ["What is your name?"]
                assert len(server.requests) == 0
            else:
                assert (await chat.say("go"))[1].startswith("Question 1:")
        assert name in ("interviewer", "quiz") or server.requests
    finally:
        await llm.aclose()
        await server.stop()
