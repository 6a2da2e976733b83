"""The template engine with a scripted LLM: every row of the vocabulary, run(), replay."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from turbobot import (
    App,
    Assistant,
    AssistantStream,
    BaseMemory,
    Delegate,
    ExampleAssistant,
    ExampleUser,
    Generate,
    GetInput,
    GetUserInput,
    InvalidYieldError,
    LLMUnavailableError,
    LocalMemory,
    ReplayDivergedError,
    Result,
    Return,
    ScriptedLLM,
    SimpleCache,
    Step,
    System,
    TemplateContext,
    TemplateError,
    User,
    UserInput,
    run,
    turbo,
)


@turbo(temperature=0.9)
async def horoscope(zodiac: str):
    yield System(content="You are a fortune teller")
    yield User(content=f"My zodiac sign is {zodiac}")
    question = yield GetInput(content="What do you want to know?")
    yield User(content=question)
    value = yield Generate()
    yield Result.from_message(value)


async def drain(app: App, *inputs: str) -> list[Any]:
    """Every output of ``app``, answering each GetUserInput with the next input."""
    outputs: list[Any] = []
    pending = list(inputs)
    try:
        output = await app.asend(None)
        while True:
            outputs.append(output)
            if isinstance(output, GetUserInput):
                if not pending:
                    return outputs
                output = await app.asend(pending.pop(0))
            else:
                output = await app.asend(None)
    except StopAsyncIteration:
        return outputs


async def test_turbo_chat_readme_loop() -> None:
    llm = ScriptedLLM(["Great fortune awaits."])
    app = horoscope(zodiac="pisces").bind(llm=llm)
    output, done = await run(app)
    assert not done
    assert isinstance(output, GetUserInput) and output.content == "What do you want to know?"
    output, done = await run(app, "Tell me my fortune")
    assert done
    assert isinstance(output, Result) and output.content == "Great fortune awaits."
    assert llm.requests[0].settings == {"temperature": 0.9}
    assert llm.requests[0].messages == [
        {"role": "system", "content": "You are a fortune teller"},
        {"role": "user", "content": "My zodiac sign is pisces"},
        {"role": "assistant", "content": "What do you want to know?"},
        {"role": "user", "content": "Tell me my fortune"},
    ]


async def test_app_run_method_turbo_chat_style() -> None:
    app = horoscope("leo").bind(llm=ScriptedLLM(["yes"]))
    first = await app.run()
    assert not first.done and first.content == "What do you want to know?"
    second = await app.run("money?")
    assert second.done and second.content == "yes"


async def test_run_with_input_on_first_call_answers_first_question() -> None:
    app = horoscope("leo").bind(llm=ScriptedLLM(["yes"]))
    output, done = await run(app, "money?")
    assert done and output is not None and output.content == "yes"


async def test_message_yields_go_to_memory_and_only_assistant_is_forwarded() -> None:
    @turbo()
    async def t(memory: BaseMemory):
        got = [(yield System("sys")), (yield ExampleUser("eu")), (yield ExampleAssistant("ea"))]
        got.append((yield User("u")))
        got.append((yield Assistant("hello there")))
        got.append((yield Assistant("secret", forward=False)))
        assert got == [None] * 6
        yield Result(str(len(await memory.get())))

    outputs = await drain(t().bind(llm=ScriptedLLM()))
    assert [type(o).__name__ for o in outputs] == ["Assistant", "Result"]
    assert outputs[0].content == "hello there"
    assert outputs[1].content == "6"


async def test_examples_are_sent_with_api_roles() -> None:
    @turbo()
    async def t():
        yield System("sys")
        yield ExampleUser("2+2?")
        yield ExampleAssistant("4")
        yield User("3+3?")
        yield Generate()

    llm = ScriptedLLM(["6"])
    await drain(t().bind(llm=llm))
    assert [m["role"] for m in llm.requests[0].messages] == ["system", "user", "assistant", "user"]


async def test_generate_returns_assistant_recorded_and_forwarded() -> None:
    seen: list[Any] = []

    @turbo()
    async def t(memory: BaseMemory):
        value = yield Generate()
        seen.append(value)
        hidden = yield Generate(forward=False)
        seen.append(hidden)
        seen.append([m.content for m in await memory.get()])

    outputs = await drain(t().bind(llm=ScriptedLLM(["one", "two"])))
    assert [o.content for o in outputs] == ["one"]
    assert isinstance(seen[0], Assistant) and seen[0].content == "one"
    assert seen[1].content == "two" and seen[1].forward is False
    assert seen[2] == ["one", "two"]


async def test_generate_per_call_overrides_and_settings_form() -> None:
    @turbo(model="m1", temperature=0.1, max_tokens=50)
    async def t():
        yield User("x")
        yield Generate(temperature=0.9)
        yield Generate(settings={"top_p": 0.5}, model="m2")

    llm = ScriptedLLM(["a", "b"])
    await drain(t().bind(llm=llm))
    assert llm.requests[0].model == "m1"
    assert llm.requests[0].settings == {"temperature": 0.9, "max_tokens": 50}
    assert llm.requests[1].model == "m2"
    assert llm.requests[1].settings == {"temperature": 0.1, "max_tokens": 50, "top_p": 0.5}


async def test_get_user_input_record_false_and_full_incoming_message() -> None:
    from turbobot import ChannelKey, IncomingMessage

    got: list[UserInput] = []

    @turbo()
    async def t(memory: BaseMemory):
        got.append((yield GetUserInput("visible only", record=False)))
        yield Result(str(len(await memory.get())))

    app = t().bind(llm=ScriptedLLM())
    await app.asend(None)
    incoming = IncomingMessage(ChannelKey("console", "c"), "hi there", "m1", author_name="ann")
    result = await app.asend(incoming)
    assert got[0] == "hi there" and got[0].incoming is incoming and not got[0].timed_out
    assert isinstance(result, Result) and result.content == "0"


async def test_timed_out_marker() -> None:
    @turbo()
    async def t():
        reply = yield GetUserInput("Still there?", timeout=5)
        yield Result("timed out" if reply.timed_out else f"got {reply}")

    app = t().bind(llm=ScriptedLLM())
    prompt = await app.asend(None)
    assert isinstance(prompt, GetUserInput) and prompt.timeout == 5
    result = await app.asend(UserInput.timeout())
    assert result.content == "timed out"
    assert app.journal[-1].kind == "timeout"


async def test_configure_merges_and_keeps_every_setting() -> None:
    cache = SimpleCache()
    base = horoscope.configure(model="gpt-4o", cache=cache, debug=True, custom="x")
    again = base.configure(temperature=0.2)
    assert again.settings == {
        "temperature": 0.2,
        "model": "gpt-4o",
        "cache": cache,
        "debug": True,
        "custom": "x",
    }
    assert horoscope.settings == {"temperature": 0.9}
    assert again.fn is horoscope.fn


async def test_cache_hit_makes_no_llm_call() -> None:
    cache = SimpleCache()
    llm = ScriptedLLM(["cached answer"])
    t = horoscope.configure(cache=cache)
    for _ in range(2):
        app = t("leo").bind(llm=llm)
        await run(app)
        output, done = await run(app, "same question")
        assert done and output is not None and output.content == "cached answer"
    assert llm.calls == 1 and len(cache) == 1


async def test_memory_injection_and_custom_memory_class() -> None:
    class CountingMemory(LocalMemory):
        appended = 0

        async def append(self, message: Any) -> None:
            CountingMemory.appended += 1
            await super().append(message)

    @turbo(memory=CountingMemory)
    async def t(memory: BaseMemory, context: TemplateContext):
        assert isinstance(memory, CountingMemory)
        yield User(f"platform {context.platform}")

    await drain(t().bind(llm=ScriptedLLM()))
    assert CountingMemory.appended == 1


async def test_composition_delegate_and_return() -> None:
    @turbo(temperature=0.0)
    async def ask_sign():
        sign = yield GetUserInput("Your sign?")
        yield Generate(forward=False)
        yield Return(sign.upper())

    @turbo(temperature=1.0)
    async def parent():
        first = yield Delegate(ask_sign())
        second = yield ask_sign()  # yielding an app directly delegates too
        yield Result(f"{first}+{second}")

    llm = ScriptedLLM(["a", "b"])
    outputs = await drain(parent().bind(llm=llm), "leo", "virgo")
    assert outputs[-1].content == "LEO+VIRGO"
    assert llm.requests[0].settings == {"temperature": 0.0}  # the sub-template's settings


async def test_sub_template_error_reaches_parent() -> None:
    @turbo()
    async def broken():
        raise ValueError("boom")
        yield  # pragma: no cover

    @turbo()
    async def parent():
        try:
            yield Delegate(broken())
        except ValueError as exc:
            yield Result(f"caught {exc}")

    outputs = await drain(parent().bind(llm=ScriptedLLM()))
    assert outputs[-1].content == "caught boom"


async def test_return_at_top_level_sets_result() -> None:
    @turbo()
    async def t():
        yield Return(42)
        yield Result("never")  # pragma: no cover

    app = t().bind(llm=ScriptedLLM())
    assert await drain(app) == []
    assert app.result == 42 and app.done


async def test_invalid_yield_names_template_and_value() -> None:
    @turbo()
    async def sloppy():
        yield "just a string"

    with pytest.raises(InvalidYieldError, match=r"sloppy yielded 'just a string' \(str\)"):
        await drain(sloppy().bind(llm=ScriptedLLM()))


async def test_non_generator_is_rejected() -> None:
    """A plain function is refused at once; an ``async def`` that never yields only when
    its app starts (turbo-chat's README decorates such a sketch, which must import)."""

    def not_async() -> None:
        return None

    async def not_a_generator() -> None:
        return None

    with pytest.raises(TemplateError, match="async generator function"):
        turbo(not_async)
    sketch = turbo(not_a_generator)
    assert sketch.problem is not None and "not_a_generator" in sketch.problem
    app = sketch()
    with pytest.raises(TemplateError, match="async generator function"):
        await app.asend(None)


async def test_message_template_and_variables() -> None:
    assert User(template="Sign: {{ sign }}!", variables={"sign": "leo"}).content == "Sign: leo!"
    with pytest.raises(KeyError, match="sign"):
        User(template="{{sign}}")
    # Jinja2: loops and filters; user text in a variable is never itself a template
    listed = System(
        template="Known: {% for s in signs %}{{ s | title }}{{ ', ' if not loop.last }}"
        "{% endfor %}.",
        variables={"signs": ["leo", "pisces"]},
    )
    assert listed.content == "Known: Leo, Pisces."
    assert User(template="{{ t }}", variables={"t": "{{ 7*7 }}"}).content == "{{ 7*7 }}"


async def test_a_missing_template_variable_fails_at_the_yield_naming_it() -> None:
    from turbobot.messages import TemplateVariableError

    @turbo()
    async def forgetful():
        yield System(
            template="You are {{ persona }}, speaking to {{ name }}.", variables={"name": "Ann"}
        )

    with pytest.raises(TemplateVariableError) as caught:
        await drain(forgetful().bind(llm=ScriptedLLM()))
    assert "'persona' is undefined" in str(caught.value) and "['name']" in str(caught.value)
    assert isinstance(caught.value, TemplateError)
    with pytest.raises(TemplateError, match="is not valid"):
        User(template="{% for %}")
    with pytest.raises(Exception, match="unsafe"):  # the sandbox refuses Python internals
        User(template="{{ x.__class__.__mro__ }}", variables={"x": 1})


async def test_streaming_generate_yields_stream_then_message() -> None:
    @turbo()
    async def t():
        reply = yield Generate(stream=True)
        yield Result(f"final={reply.content}")

    app = t().bind(llm=ScriptedLLM(["streamed text here"]))
    stream = await app.asend(None)
    assert isinstance(stream, AssistantStream)
    parts = [delta async for delta in stream]
    assert len(parts) > 1 and "".join(parts) == "streamed text here"
    result = await app.asend(None)
    assert result.content == "final=streamed text here"


async def test_step_result_is_journaled_and_replayed() -> None:
    counter = {"n": 0}

    def roll() -> int:
        counter["n"] += 1
        return 4

    @turbo()
    async def t():
        value = yield Step(roll)
        answer = yield GetUserInput(f"rolled {value}")
        yield Result(f"{answer} {value}")

    app = t().bind(llm=ScriptedLLM())
    await drain(app)
    replayed = t().bind(llm=ScriptedLLM(), replay=list(app.journal), replay_until=app.yields)
    prompt = await replayed.asend(None)
    assert counter["n"] == 1, "a replayed Step must not call its function again"
    assert isinstance(prompt, GetUserInput) and prompt.message is None  # not re-sent
    result = await replayed.asend("ok")
    assert result.content == "ok 4"


async def test_replay_makes_no_llm_call_and_sends_nothing_again() -> None:
    llm = ScriptedLLM(["first answer", "second answer"])

    @turbo()
    async def chat():
        yield System("sys")
        while True:
            text = yield GetUserInput()
            yield User(text)
            yield Generate()

    app = chat().bind(llm=llm)
    await drain(app, "q1", "q2")
    fresh_llm = ScriptedLLM(["third answer"])
    replayed = chat().bind(llm=fresh_llm, replay=list(app.journal), replay_until=app.yields)
    output = await replayed.asend(None)
    assert isinstance(output, GetUserInput)
    assert fresh_llm.calls == 0
    assert [m.content for m in replayed.memory.messages] == [
        m.content
        for m in app.memory.messages  # type: ignore[attr-defined]
    ]
    assert (await replayed.asend("q3")).content == "third answer"


async def test_replay_detects_changed_template() -> None:
    @turbo()
    async def v1():
        text = yield GetUserInput("Hello?")
        yield User(text)
        yield Generate()
        yield GetUserInput()

    @turbo()
    async def v2():  # a new greeting alone would not count: a new step does
        text = yield GetUserInput("Hi, new greeting?")
        yield User(text)
        yield Step(lambda: "looked up")
        yield Generate()
        yield GetUserInput()

    app = v1().bind(llm=ScriptedLLM(["x"]))
    await drain(app, "a")
    changed = v2().bind(llm=ScriptedLLM(), replay=list(app.journal), replay_until=app.yields)
    with pytest.raises(ReplayDivergedError, match="no longer matches"):
        await changed.asend(None)


async def test_uncaught_llm_error_leaves_journal_ready_for_retry() -> None:
    @turbo()
    async def t():
        text = yield GetUserInput()
        yield User(text)
        yield Generate()
        yield GetUserInput()

    app = t().bind(llm=ScriptedLLM([LLMUnavailableError("down")]))
    await app.asend(None)
    with pytest.raises(LLMUnavailableError):
        await app.asend("hello")
    assert [e.kind for e in app.journal] == ["input"]
    retry_llm = ScriptedLLM(["recovered"])
    again = t().bind(llm=retry_llm, replay=list(app.journal), replay_until=app.yields)
    assert (await again.asend(None)).content == "recovered"


async def test_template_may_catch_llm_error_and_replay_repeats_it() -> None:
    @turbo()
    async def t():
        try:
            yield Generate()
        except LLMUnavailableError:
            yield Result("fallback")
        yield GetUserInput()

    app = t().bind(llm=ScriptedLLM([LLMUnavailableError("down")]))
    outputs = await drain(app)
    assert outputs[0].content == "fallback"
    again = t().bind(llm=ScriptedLLM(), replay=list(app.journal), replay_until=app.yields)
    assert isinstance(await again.asend(None), GetUserInput)


async def test_aclose_runs_finally_blocks() -> None:
    closed: list[bool] = []

    @turbo()
    async def t():
        try:
            yield GetUserInput("wait")
        finally:
            closed.append(True)

    app = t().bind(llm=ScriptedLLM())
    await app.asend(None)
    await app.aclose()
    assert closed == [True]


async def test_started_means_a_step_was_taken() -> None:
    @turbo()
    async def t():
        yield GetUserInput("wait")

    unstarted = t()
    await unstarted.aclose()  # closing an app that never ran does not start it
    assert not unstarted.started
    unstarted.bind(llm=ScriptedLLM())
    app = t().bind(llm=ScriptedLLM())
    await app.asend(None)
    assert app.started
    with pytest.raises(RuntimeError, match="before the app starts"):
        app.bind(llm=ScriptedLLM())


async def test_waiting_app_needs_input() -> None:
    app = horoscope("leo").bind(llm=ScriptedLLM())
    await app.asend(None)
    with pytest.raises(TemplateError, match="waiting for user input"):
        await app.asend(None)


async def test_owned_app_is_not_tracked_by_the_loop_and_still_cleans_up() -> None:
    events: list[str] = []

    @turbo()
    async def asks():
        try:
            yield GetUserInput("name?")
        finally:
            events.append("finally")

    loop = asyncio.get_running_loop()
    before = len(loop._asyncgens)  # type: ignore[attr-defined]
    owned = asks().bind(owned=True)
    assert isinstance(await owned.asend(None), GetUserInput)
    assert len(loop._asyncgens) == before  # type: ignore[attr-defined]
    await owned.aclose()
    assert events == ["finally"]

    # Dropped without aclose(): Python closes the generator when it is collected.
    dropped = asks().bind(owned=True)
    await dropped.asend(None)
    del dropped
    gc.collect()
    assert events == ["finally", "finally"]

    # Not owned: the loop tracks it, as for any async generator.
    tracked = asks()
    await tracked.asend(None)
    assert len(loop._asyncgens) == before + 1  # type: ignore[attr-defined]
    await tracked.aclose()


def test_a_message_made_from_user_input_holds_only_its_text() -> None:
    """``yield User(text)`` with the ``UserInput`` a template received: the memory keeps
    a plain string, not the whole incoming message (RAM per turn, issue 10)."""
    from turbobot import ChannelKey, IncomingMessage, User
    from turbobot.signals import UserInput

    incoming = IncomingMessage(ChannelKey("console", "c"), "hi there", "m1", attachments=())
    message = User(UserInput("hi there", incoming=incoming))
    assert type(message.content) is str and message.content == "hi there"
    assert not hasattr(message.content, "incoming")
