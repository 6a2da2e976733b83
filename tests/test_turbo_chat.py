"""turbo-chat's own examples, run verbatim on turbobot (issue 12).

``tests/turbo_chat_examples/`` holds the Python blocks of turbo-chat's README and of
its ``chat.py`` / ``types/generators.py`` descriptions, with ``turbo_chat`` replaced
by ``turbobot`` and nothing else. Each runs here as a script with top-level ``await``
(as in a notebook or ``python -m asyncio``), against the real ``openai`` client and a
fake OpenAI-compatible server on 127.0.0.1 (``OPENAI_BASE_URL``, as a user would set
it). Snippets that use names they do not import (turbo-chat's docs leave imports out)
get ``from turbobot import *`` first; ``input`` and ``print`` are the only names a test
supplies.
"""

from __future__ import annotations

import ast
import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import turbobot
from fakes.openai_server import FakeOpenAI, Reply
from turbobot import (
    Assistant,
    BaseMemory,
    Generate,
    GetUserInput,
    ListMemory,
    LocalMemory,
    Message,
    Messages,
    ScriptedLLM,
    System,
    TemplateContext,
    User,
    run,
    run_chat,
    turbo,
)
from turbobot.testing import ChatHarness

EXAMPLES = Path(__file__).parent / "turbo_chat_examples"


async def run_example(
    name: str, *, prelude: str = "", **names: Any
) -> tuple[dict[str, Any], list[str]]:
    """Run one example file as a script with top-level await; its globals and prints."""
    source = EXAMPLES.joinpath(name).read_text()
    printed: list[str] = []
    namespace: dict[str, Any] = {
        "__name__": f"turbo_chat_example_{name[:-3]}",
        "print": lambda *args: printed.append(" ".join(map(str, args))),
        **names,
    }
    if prelude:
        exec(prelude, namespace)
    code = compile(source, name, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(code, namespace)
    if asyncio.iscoroutine(result):
        await result
    return namespace, printed


@pytest.fixture
async def openai_env(
    openai_server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[FakeOpenAI]:
    """The environment a turbo-chat user sets: the default OpenAILLM finds the fake."""
    monkeypatch.setenv("OPENAI_BASE_URL", openai_server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    yield openai_server


def test_the_examples_are_turbo_chat_s_with_only_the_import_renamed() -> None:
    """Guards the copies: no file says turbo_chat, each imports from turbobot or uses
    names without imports, as the original does."""
    files = sorted(EXAMPLES.glob("*.py"))
    assert [f.name for f in files] == [
        "chat_run_chat.py",
        "generators_configure.py",
        "readme_horoscope.py",
        "readme_intro.py",
        "readme_memory.py",
    ]
    for file in files:
        assert "turbo_chat" not in file.read_text()
    assert 'horoscope({"user_id": 1})' in EXAMPLES.joinpath("readme_horoscope.py").read_text()


async def test_the_readme_horoscope_runs_verbatim(openai_env: FakeOpenAI) -> None:
    openai_env.script("Pisces, the tides favour you this week.")
    asked: list[str] = []

    def fake_input(prompt: str) -> str:
        asked.append(prompt)
        return "Will I find love?"

    namespace, printed = await run_example("readme_horoscope.py", input=fake_input)

    # the question reached the caller's loop, the answer was printed, the loop ended
    assert asked == ["What do you want to know?"]
    assert printed == ["Pisces, the tides favour you this week."]
    assert namespace["done"] is True and isinstance(namespace["result"], Assistant)
    # the caller's dict reached the template (no clash with the runtime's context), the
    # mixin's User message reached the parent's prompt, the settings reached the model
    (request,) = openai_env.requests
    assert request["messages"] == [
        {"role": "system", "content": "You are a fortune teller"},
        {"role": "user", "content": "My zodiac sign is pisces"},
        {"role": "assistant", "content": "What do you want to know?"},
        {"role": "user", "content": "Will I find love?"},
    ]
    assert request["temperature"] == 0.9


async def test_the_readme_intro_generator_runs_once_decorated(openai_env: FakeOpenAI) -> None:
    openai_env.script("Hello, world!")
    namespace, printed = await run_example("readme_intro.py", prelude="from turbobot import *")
    output, done = await run(turbo(namespace["example"])())
    assert done is True and isinstance(output, Assistant)
    assert output.content == "Hello, world!"
    assert printed == ["Hello, world!"]  # the template's own print(output.content)
    assert openai_env.requests[0]["messages"] == [
        {"role": "system", "content": "Greet the user!"},
        {"role": "user", "content": "Hello World!"},
    ]


async def test_the_readme_custom_memory_sketch_imports_and_a_filled_one_is_used() -> None:
    namespace, _ = await run_example("readme_memory.py")
    sketch = namespace["app"]
    assert isinstance(sketch, turbobot.Template)
    assert isinstance(sketch.settings["memory"], namespace["RedisMemory"])
    # The sketch's app never yields: it is refused when it starts, with the reason.
    with pytest.raises(turbobot.TemplateError, match="async generator function"):
        await sketch().asend(None)

    # The same memory filled in (a dict stands for Redis): each conversation gets its
    # own copy of the instance, initialised with its context; the prompt comes from it.
    redis: dict[str, list[Message]] = {}

    class RedisMemory(BaseMemory):
        def __init__(self) -> None:
            self.key = ""

        async def init(self, context: Any) -> None:
            self.key = f"chat:{context['user_id']}"
            redis.setdefault(self.key, [])

        async def append(self, item: Message) -> None:
            redis[self.key].append(item)

        async def get(self) -> list[Message]:
            return list(redis[self.key])

        async def clear(self) -> None:
            redis[self.key] = []

    @turbo(memory=RedisMemory())
    async def app(context: dict[str, Any]) -> Any:
        yield System(content="Be brief.")
        question = yield GetUserInput(message="Ask me.")
        yield User(content=question)
        yield Generate()

    one, two = app({"user_id": 1}), app({"user_id": 2})
    for a, text in ((one, "first?"), (two, "second?")):
        a.bind(llm=ScriptedLLM([f"re: {text}"]))
        assert (await run(a))[0].content == "Ask me."  # type: ignore[union-attr]
        output, done = await run(a, text)
        assert done and output.content == f"re: {text}"  # type: ignore[union-attr]
    assert one.memory is not two.memory
    assert [m.content for m in redis["chat:1"]] == ["Be brief.", "Ask me.", "first?", "re: first?"]
    assert [m.content for m in redis["chat:2"]][-1] == "re: second?"


async def test_run_chat_from_chat_md_runs_verbatim_and_caches(openai_env: FakeOpenAI) -> None:
    openai_env.script("Sunny, 21 degrees.")
    namespace, printed = await run_example("chat_run_chat.py")
    assert printed == ["Sunny, 21 degrees."]
    memory = namespace["memory"]
    assert [(type(m), m.content) for m in await memory.get()] == [
        (User, "What's the weather like today?"),
        (Assistant, "Sunny, 21 degrees."),
    ]
    # the same prompt again is answered from the cache: no second request
    again = namespace["Memory"]()
    again.append("What's the weather like today?")
    reply = await run_chat(again, namespace["cache"])
    assert reply.content == "Sunny, 21 degrees." and len(openai_env.requests) == 1
    assert [m.content for m in await again.get()][-1] == "Sunny, 21 degrees."
    # settings go to the model; memory.append is also awaitable
    await again.append(User("And tomorrow?"))
    openai_env.script("Rain.")
    assert (await run_chat(again, temperature=0.1)).content == "Rain."
    assert openai_env.requests[-1]["temperature"] == 0.1


async def test_generators_md_configure_with_a_dict_and_context_keywords() -> None:
    namespace, _ = await run_example(
        "generators_configure.py",
        prelude="from typing import Optional\nfrom turbobot import *",
        context={"user_id": 7},
    )
    configured = namespace["turbo_gen_fn"]
    assert configured.settings == {"setting1": "value1", "setting2": "value2"}
    assert namespace["turbo_gen_wrapper"].kwargs == {"user_id": 7}

    # The same shape of template, with a body: memory is passed, context keywords stay
    # the caller's (the runtime's context does not land in **context)
    seen: list[Any] = []

    @turbo
    async def custom(memory: BaseMemory | None = None, **context: Any) -> Any:
        seen.append((memory, context))
        yield Assistant(content=f"hi {context.get('name', 'there')}")

    tuned = custom.configure({"temperature": 0.3}, model="m")
    assert tuned.settings == {"temperature": 0.3, "model": "m"}
    app = tuned(name="Ada")
    output, done = await run(app)
    assert done and output.content == "hi Ada"  # type: ignore[union-attr]
    assert seen == [(app.memory, {"name": "Ada"})]
    async with ChatHarness(tuned, llm=ScriptedLLM()) as chat:
        assert await chat.say("hello") == ["hi there"]


async def test_the_callers_context_wins_and_the_runtimes_has_its_own_way_in() -> None:
    got: dict[str, Any] = {}

    @turbo
    async def by_name(context: dict[str, Any]) -> Any:
        got["by_name"] = context
        yield Assistant("ok")

    @turbo
    async def by_type(user: str = "", ctx: TemplateContext | None = None) -> Any:
        got["by_type"] = ctx
        yield Assistant(f"ok {user}")

    await run(by_name({"user_id": 1}))
    await run(by_name(context={"user_id": 2}))
    assert got["by_name"] == {"user_id": 2}
    await run(by_type("ann"))
    assert isinstance(got["by_type"], TemplateContext)
    async with ChatHarness(by_type, llm=ScriptedLLM(), platform="console") as chat:
        await chat.say("hi")
    assert got["by_type"].platform == "console" and got["by_type"].key == chat.key()
    async with ChatHarness(by_name, llm=ScriptedLLM(), platform="console") as chat:
        await chat.say("hi")  # nothing passed: the runtime's context, as before
    assert isinstance(got["by_name"], TemplateContext)


async def test_a_stepped_mixin_with_several_messages_and_one_already_finished() -> None:
    @turbo
    async def mixin() -> Any:
        yield System("Rules.")
        yield User("Facts.")

    app = mixin()
    output, done = await run(app)
    assert done is True
    assert isinstance(output, Messages)
    assert [(type(m), m.content) for m in output] == [(System, "Rules."), (User, "Facts.")]
    with pytest.raises(turbobot.GeneratorAlreadyExhaustedError, match="already finished"):
        await run(app)
    with pytest.raises(TypeError, match="holds messages"):
        Messages(["text"])  # type: ignore[list-item]


def test_turbo_chat_names_are_importable() -> None:
    from turbobot import (
        BasePrefixMessageCollection,
        Example,
        GetInput,
        InvalidValueYieldedError,
        PrefixMessage,
        SimpleCache,
        TurboGen,
        TurboGenFn,
    )
    from turbobot.cache import Cache
    from turbobot.memory import Memory

    assert ListMemory is LocalMemory is Memory and Cache is SimpleCache
    assert GetInput is GetUserInput and PrefixMessage is Message
    assert TurboGen is turbobot.App and TurboGenFn is turbobot.Template
    assert issubclass(InvalidValueYieldedError, turbobot.TemplateError)
    assert [m.api_role for m in Example(user="2+2?", assistant="4")] == ["user", "assistant"]
    assert issubclass(Example, BasePrefixMessageCollection)


async def test_an_example_yielded_is_pinned_in_the_prompt() -> None:
    llm = ScriptedLLM(["5"])

    @turbo
    async def maths() -> Any:
        yield System("Answer with a number.")
        yield turbobot.Example(user="2+2?", assistant="4")
        yield User("2+3?")
        yield Generate()

    await run(maths().bind(llm=llm))
    assert [m["content"] for m in llm.requests[0].messages] == [
        "Answer with a number.",
        "2+2?",
        "4",
        "2+3?",
    ]


async def test_a_failed_run_chat_leaves_memory_as_it_was(openai_env: FakeOpenAI) -> None:
    openai_env.script(Reply(status=401, error={"message": "bad key"}))
    memory = LocalMemory()
    memory.append("hello")
    with pytest.raises(turbobot.LLMError):
        await run_chat(memory)
    assert [m.content for m in await memory.get()] == ["hello"]
