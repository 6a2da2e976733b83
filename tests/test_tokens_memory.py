"""Offline token counting and token-aware prompt trimming."""

from __future__ import annotations

from typing import Any

from turbobot import Assistant, ExampleAssistant, ExampleUser, LocalMemory, System, User
from turbobot.tokens import (
    DEFAULT_CONTEXT_WINDOW,
    context_window_for,
    count_prompt_tokens,
    token_counter_for,
)


def test_exact_counts_for_openai_models_offline() -> None:
    # Reference ids: tiktoken's cl100k_base / o200k_base encodings.
    assert token_counter_for("gpt-4")("hello world") == 2
    assert token_counter_for("gpt-4o-mini")("hello world") == 2
    assert token_counter_for("gpt-4o")("你好，世界") == 3


def test_unknown_model_still_counts() -> None:
    count = token_counter_for("some-new-model-nobody-knows")
    assert count("hello world") == 2
    assert context_window_for("some-new-model-nobody-knows") == DEFAULT_CONTEXT_WINDOW
    assert context_window_for("gpt-4o-2024-08-06") == 128_000
    assert context_window_for("HuggingFaceTB/SmolLM2-135M-Instruct") == DEFAULT_CONTEXT_WINDOW


async def test_trimming_keeps_system_examples_and_newest_turn() -> None:
    memory = LocalMemory()
    await memory.extend([System("You are terse."), ExampleUser("2+2?"), ExampleAssistant("4")])
    for n in range(50):
        await memory.append(User(f"question number {n} " + "blah " * 20))
        await memory.append(Assistant(f"answer number {n} " + "blah " * 20))
    await memory.append(User("the newest question"))
    counter = token_counter_for("gpt-4o")
    prompt = await memory.prepare_prompt(counter=counter, context_window=400, max_tokens=100)
    contents = [m["content"] for m in prompt]
    assert contents[:3] == ["You are terse.", "2+2?", "4"]
    assert contents[-1] == "the newest question"
    assert count_prompt_tokens(prompt, counter) <= 300
    assert len(prompt) < 20
    # What was kept is the newest turns, in order.
    kept = [c.split()[2] for c in contents[3:-1] if c.startswith("question")]
    assert kept == sorted(kept, key=int) and kept[-1] == "49"


async def test_newest_turn_survives_even_if_too_big() -> None:
    memory = LocalMemory([System("sys"), User("old"), User("huge " * 500)])
    prompt = await memory.prepare_prompt(
        counter=token_counter_for("gpt-4o"), context_window=100, max_tokens=50
    )
    assert next(m["content"] for m in prompt) == "sys"
    assert prompt[-1]["content"].startswith("huge")
    assert "old" not in [m["content"] for m in prompt]


async def test_incremental_prompt_matches_the_reference_trim() -> None:
    """LocalMemory's indexed walk (issue 10, long conversations) selects exactly what
    trim_to_window selects, for mixed histories and any budget."""
    import random

    from turbobot.memory import fit_newest, trim_to_window
    from turbobot.messages import ToolMessage

    counter = token_counter_for("gpt-4o")
    kinds = [User, Assistant, ToolMessage, System, ExampleUser]
    for seed in range(40):
        rng = random.Random(seed)
        messages = [
            rng.choice(kinds)(" ".join("w" for _ in range(rng.randint(1, 30))))
            for _ in range(rng.randint(1, 60))
        ]
        memory = LocalMemory()
        for message in messages[: len(messages) // 2]:
            await memory.append(message)
        memory.messages.extend(messages[len(messages) // 2 :])  # changed directly: reindexed
        for window in (30, 120, 400, 5000):
            reference = [
                m.to_openai() for m in trim_to_window(messages, budget=window - 10, counter=counter)
            ]
            fit_newest(reference, budget=window - 10, counter=counter)
            prompt = await memory.prepare_prompt(
                counter=counter, context_window=window, max_tokens=10
            )
            assert prompt == reference, (seed, window)
        # prompted after every message, as a conversation does: the window slides
        for window in (30, 120, 400):
            memory = LocalMemory()
            for n, message in enumerate(messages, 1):
                await memory.append(message)
                reference = [
                    m.to_openai()
                    for m in trim_to_window(messages[:n], budget=window - 10, counter=counter)
                ]
                fit_newest(reference, budget=window - 10, counter=counter)
                prompt = await memory.prepare_prompt(
                    counter=counter, context_window=window, max_tokens=10
                )
                assert prompt == reference, (seed, window, n)
    memory = LocalMemory([User("a")])
    await memory.clear()
    await memory.append(User("b"))
    assert await memory.prepare_prompt(counter=counter, context_window=100, max_tokens=10) == [
        {"role": "user", "content": "b"}
    ]


async def test_one_message_too_big_for_the_window_is_cut_to_fit() -> None:
    """Issue 10, defect 2: on a small window (a local model's 2,048 tokens) a long
    message alone would make every request fail; it is cut, the system prompt kept."""
    from turbobot.memory import CUT_MARK

    counter = token_counter_for("gpt-4o")
    text = " ".join(f"word{i}" for i in range(6000))
    for memory in (LocalMemory(), _ListOnly()):
        await memory.extend([System("Be brief."), User("hi"), Assistant("hello"), User(text)])
        prompt = await memory.prepare_prompt(counter=counter, context_window=2048, max_tokens=200)
        assert prompt[0] == {"role": "system", "content": "Be brief."}
        assert prompt[-1]["content"].startswith("word0 word1") and prompt[-1]["content"].endswith(
            CUT_MARK
        )
        assert count_prompt_tokens(prompt, counter) <= 2048 - 200


class _ListOnly(LocalMemory):
    """A memory that only implements the interface: BaseMemory's prepare_prompt."""

    __slots__ = ()

    async def prepare_prompt(self, **kwargs: Any) -> list[dict[str, Any]]:
        from turbobot.memory import BaseMemory

        return await BaseMemory.prepare_prompt(self, **kwargs)


async def test_window_only_memory_stays_the_size_of_its_window() -> None:
    """LocalMemory(window_only=True): the same prompts as keeping everything, while the
    messages it holds stay bounded (the pinned system prompt and example kept)."""
    counter = token_counter_for("gpt-4o")
    pinned = [System("You are terse."), ExampleUser("ex q"), ExampleAssistant("ex a")]
    full, windowed = LocalMemory(pinned), LocalMemory(pinned, window_only=True)
    held = []
    for turn in range(3_000):
        for memory in (full, windowed):
            await memory.append(User(f"question {turn} " + "word " * (turn % 7)))
            await memory.append(Assistant(f"answer {turn}"))
        expected = await full.prepare_prompt(counter=counter, context_window=400, max_tokens=50)
        got = await windowed.prepare_prompt(counter=counter, context_window=400, max_tokens=50)
        assert got == expected, turn
        held.append(len(windowed.messages))
    assert len(full.messages) == 6_003
    assert max(held[100:]) < 200  # the window holds ~40 messages; dropped in batches
    assert windowed.messages[:3] == pinned
    # a copy (what @turbo(memory=...) makes per conversation) keeps the option
    import copy

    assert copy.copy(windowed).window_only


def test_window_only_prompts_do_not_depend_on_a_restart_when_budgets_change() -> None:
    """From review: turns dropped under a small budget (a Generate with a large
    max_tokens) were missing from the next, wider prompt, unlike after a restart."""
    from turbobot import Generate, GetUserInput, ScriptedLLM, turbo
    from turbobot.testing import BotTester

    @turbo(memory=LocalMemory(window_only=True), context_window=400)
    async def terse():
        yield System("You are terse.")
        while True:
            said = yield GetUserInput()
            yield User(said)
            yield Generate(max_tokens=300 if said.startswith("long") else 50)

    def last_prompt(restart: bool) -> list[dict[str, Any]]:
        llm = ScriptedLLM(respond=lambda request: "ok")
        with BotTester(terse, llm=llm) as chat:
            for turn in range(150):
                chat.say(f"question {turn}")
            chat.say("long answer please")
            if restart:
                chat.restart()
            chat.say("short question")
        return llm.requests[-1].messages

    assert last_prompt(False) == last_prompt(True)


def test_a_memory_subclass_without_window_only_can_still_be_copied() -> None:
    import copy

    class TaggedMemory(LocalMemory):
        __slots__ = ("tag",)

        def __init__(self, messages: Any = (), tag: str = "x") -> None:
            super().__init__(messages)
            self.tag = tag

    assert copy.copy(TaggedMemory([User("a")])).messages == [User("a")]
