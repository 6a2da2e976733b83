"""Redeploys keep conversations (issue 10): replay checks structure, not text.

Each test runs a template, stops the process (a new store and runtime stand for a
redeploy), then runs a changed template under the same name on the same database.
"""

from __future__ import annotations

from typing import Any

from tests.conftest import StoreFactory
from tests.test_runtime import echo_llm
from turbobot import (
    Generate,
    GetUserInput,
    JournalEntry,
    LLMRequest,
    Patched,
    ScriptedLLM,
    System,
    Template,
    User,
    turbo,
)
from turbobot.testing import ChatHarness


async def session(
    make_store: StoreFactory,
    template: Template,
    texts: list[str],
    llm: Any = None,
    expect_divergence: bool = False,
) -> list[str]:
    store = await make_store()
    async with ChatHarness(
        template, llm=llm or echo_llm(), store=store, expect_divergence=expect_divergence
    ) as h:
        replies: list[str] = []
        for text in texts:
            replies += await h.say(text)
        return replies


def redeployed(old: Template, new: Template) -> Template:
    new.ref = old.ref  # the same module and function name, new code
    return new


async def test_a_changed_system_prompt_keeps_the_conversation_and_applies(
    make_store: StoreFactory,
) -> None:
    @turbo()
    async def v1():
        yield System("You are a helpful asistant.")  # the typo the operator fixes
        name = yield GetUserInput("Your name?")
        yield User(f"I am {name}")
        yield Generate()
        while True:
            text = yield GetUserInput()
            yield User(text)
            yield Generate()

    @turbo()
    async def v2():
        yield System("You are a helpful assistant. Be brief.")
        name = yield GetUserInput("What is your name?")  # reworded too
        yield User(f"I am {name}")
        yield Generate()
        while True:
            text = yield GetUserInput()
            yield User(text)
            yield Generate()

    assert await session(make_store, v1, ["hi", "Ann"]) == ["Your name?", "echo: I am Ann"]
    prompts: list[str] = []

    def respond(request: LLMRequest) -> str:
        prompts.append(request.messages[0]["content"])
        return f"echo: {request.messages[-1]['content']}"

    llm = ScriptedLLM(respond=respond)
    replies = await session(make_store, redeployed(v1, v2), ["more"], llm)
    # No divergence notice, no repeated question: the conversation went on...
    assert replies == ["echo: more"]
    # ...and its next generation used the new prompt, with the whole history.
    assert prompts == ["You are a helpful assistant. Be brief."]


async def test_an_inserted_question_diverges_by_the_documented_policy(
    make_store: StoreFactory,
) -> None:
    # Named inputs are part of the structure; unnamed ones are told apart only by
    # their order (an unnamed question inserted among unnamed ones would take the
    # old answers in order: use Patched for that).
    @turbo()
    async def v1():
        name = yield GetUserInput("Your name?", name="name")
        colour = yield GetUserInput(f"{name}, your colour?", name="colour")
        yield GetUserInput(f"{colour} it is.")

    @turbo()
    async def v2():
        name = yield GetUserInput("Your name?", name="name")
        age = yield GetUserInput("Your age?", name="age")
        colour = yield GetUserInput(f"{name} ({age}), your colour?", name="colour")
        yield GetUserInput(f"{colour} it is.")

    assert await session(make_store, v1, ["hi", "Ann", "blue"]) == [
        "Your name?",
        "Ann, your colour?",
        "blue it is.",
    ]
    replies = await session(make_store, redeployed(v1, v2), ["hello"], expect_divergence=True)
    assert replies[0].startswith("The bot was updated and could not resume")
    assert replies[1:] == ["Your name?"]


async def test_patched_keeps_old_conversations_on_the_old_path(make_store: StoreFactory) -> None:
    @turbo()
    async def v1():
        name = yield GetUserInput("Your name?")
        colour = yield GetUserInput(f"{name}, your colour?")
        yield GetUserInput(f"{name} likes {colour}.")

    @turbo()
    async def v2():
        name = yield GetUserInput("Your name?")
        if (yield Patched("ask-age")):
            age = yield GetUserInput("Your age?")
            name = f"{name} ({age})"
        colour = yield GetUserInput(f"{name}, your colour?")
        yield GetUserInput(f"{name} likes {colour}.")

    # An old conversation, waiting for its colour when the new code is deployed...
    assert await session(make_store, v1, ["hi", "Ann"]) == ["Your name?", "Ann, your colour?"]
    new = redeployed(v1, v2)
    # ...keeps the old path: its answer is the colour, not an age.
    assert await session(make_store, new, ["blue"]) == ["Ann likes blue."]
    # A new conversation (on another channel) takes the new path, and keeps it on replay.
    store = await make_store()
    async with ChatHarness(new, llm=echo_llm(), store=store) as h:
        assert await h.say("hi", channel="new") == ["Your name?"]
        assert await h.say("Bo", channel="new") == ["Your age?"]
        await h.runtime.evict(h.key("new"))
        assert await h.say("7", channel="new") == ["Bo (7), your colour?"]
        await h.runtime.evict(h.key("new"))
        assert await h.say("red", channel="new") == ["Bo (7) likes red."]


async def test_a_journal_written_before_the_structural_rule_still_replays(
    make_store: StoreFactory,
) -> None:
    """Deploying this very change must not reset conversations stored by the old rule."""
    import hashlib

    @turbo()
    async def bot():
        yield System("Be kind.")
        name = yield GetUserInput("Your name?")
        yield User(name)
        yield Generate()
        yield GetUserInput()

    # The chain as the previous version computed it: every yield, with its text.
    def legacy(*texts: str) -> str:
        chain = b""
        for text in texts:
            chain = hashlib.blake2b(chain + text.encode(), digest_size=16).digest()
        return chain.hex()

    from turbobot import GetUserInput as Ask
    from turbobot.messages import Assistant
    from turbobot.signals import Generate as Gen

    system, ask = System("Be kind.").fingerprint(), Ask("Your name?").fingerprint()
    journal = [
        JournalEntry("input", "Ann", legacy(system, ask)),
        JournalEntry(
            "generate",
            Assistant("echo: Ann").to_dict(),
            legacy(system, ask, User("Ann").fingerprint(), Gen().fingerprint()),
        ),
    ]
    from turbobot.chat import TemplateContext
    from turbobot.store import ConversationRecord, StepWrite, new_id

    store = await make_store()
    async with ChatHarness(bot, llm=echo_llm(), store=store) as h:
        record = ConversationRecord(
            new_id(), h.key(), bot.ref, TemplateContext(key=h.key()).to_dict(), "waiting"
        )
        record.yields = 6
        await store.write(
            StepWrite(record=record, new_conversation=True, journal=journal, journal_start=0)
        )
        await store.flush()
        await h.runtime.aclose()
    replies = await session(make_store, bot, ["anything"])
    assert replies == []  # it went on (waiting for the end), no divergence notice
