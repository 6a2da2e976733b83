"""The real openai client against a fake OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import time

import pytest

from tests.fakes.openai_server import FakeOpenAI, Reply
from turbobot import (
    Generate,
    GetUserInput,
    LLMRateLimitedError,
    LLMRequest,
    LLMRequestError,
    LLMResponseError,
    LLMUnavailableError,
    OpenAILLM,
    RetryPolicy,
    System,
    User,
    run,
    turbo,
)


def request(text: str = "hi", **settings: object) -> LLMRequest:
    return LLMRequest(
        messages=[{"role": "user", "content": text}], model="gpt-4o-mini", settings=dict(settings)
    )


async def test_completion_returns_text_and_usage(
    openai_server: FakeOpenAI, openai_llm: OpenAILLM
) -> None:
    openai_server.script("The stars smile on you.")
    response = await openai_llm.complete(request(temperature=0.5, max_tokens=20))
    assert response.content == "The stars smile on you."
    assert response.usage is not None and response.usage.total_tokens == 18
    sent = openai_server.requests[0]
    assert sent["temperature"] == 0.5 and sent["max_tokens"] == 20
    assert sent["model"] == "gpt-4o-mini"


async def test_streaming_delivers_deltas_in_order(
    openai_server: FakeOpenAI, openai_llm: OpenAILLM
) -> None:
    text = "A long and winding road to fortune."
    openai_server.script(text)
    deltas: list[str] = []

    async def on_delta(delta: str) -> None:
        deltas.append(delta)

    response = await openai_llm.complete(request(), on_delta=on_delta)
    assert len(deltas) > 3
    assert "".join(deltas) == text == response.content
    assert openai_server.requests[0]["stream"] is True
    assert response.usage is not None and response.usage.completion_tokens == 7


async def test_streamed_tool_call_arguments_are_assembled(
    openai_server: FakeOpenAI, openai_llm: OpenAILLM
) -> None:
    openai_server.script(Reply(tool_calls=[("lookup", '{"sign": "leo", "day": 3}')]))

    async def ignore(delta: str) -> None:
        pass

    response = await openai_llm.complete(request(), on_delta=ignore)
    assert [(c.name, c.arguments) for c in response.tool_calls] == [
        ("lookup", '{"sign": "leo", "day": 3}')
    ]


async def test_429_is_retried_honouring_retry_after(
    openai_server: FakeOpenAI, openai_llm: OpenAILLM
) -> None:
    openai_server.script(Reply(status=429, headers={"retry-after": "0.3"}), "finally")
    start = time.monotonic()
    response = await openai_llm.complete(request())
    assert response.content == "finally"
    assert len(openai_server.requests) == 2
    gap = openai_server.request_times[1] - openai_server.request_times[0]
    assert gap >= 0.28, f"retry-after 0.3s not honoured (gap {gap:.3f}s)"
    assert time.monotonic() - start < 3


async def test_500_is_retried_then_succeeds(
    openai_server: FakeOpenAI, openai_llm: OpenAILLM
) -> None:
    openai_server.script(Reply(status=500), Reply(status=503), "ok now")
    response = await openai_llm.complete(request())
    assert response.content == "ok now"
    assert len(openai_server.requests) == 3


async def test_exhausted_5xx_raises_unavailable(
    openai_server: FakeOpenAI, openai_llm: OpenAILLM
) -> None:
    openai_server.script(*[Reply(status=500)] * 3)
    with pytest.raises(LLMUnavailableError, match="after 3 attempts"):
        await openai_llm.complete(request())
    assert len(openai_server.requests) == 3


async def test_exhausted_429_raises_rate_limited(
    openai_server: FakeOpenAI, openai_llm: OpenAILLM
) -> None:
    openai_server.script(*[Reply(status=429, headers={"retry-after": "0"})] * 3)
    with pytest.raises(LLMRateLimitedError) as info:
        await openai_llm.complete(request())
    assert info.value.retry_after == 0


async def test_400_is_not_retried(openai_server: FakeOpenAI, openai_llm: OpenAILLM) -> None:
    openai_server.script(Reply(status=400))
    with pytest.raises(LLMRequestError) as info:
        await openai_llm.complete(request())
    assert info.value.status_code == 400
    assert len(openai_server.requests) == 1


async def test_malformed_response_raises_response_error(
    openai_server: FakeOpenAI, openai_llm: OpenAILLM
) -> None:
    openai_server.script(Reply(raw='{"unexpected": "shape"}'))
    with pytest.raises(LLMResponseError, match="no usable choices"):
        await openai_llm.complete(request())


async def test_connection_refused_is_unavailable_and_hides_the_key() -> None:
    llm = OpenAILLM(
        api_key="sk-secret-value",
        base_url="http://127.0.0.1:9/v1",
        timeout=2,
        retry=RetryPolicy(attempts=2, base_delay=0.01),
    )
    try:
        with pytest.raises(LLMUnavailableError) as info:
            await llm.complete(request())
        assert "sk-secret-value" not in str(info.value)
    finally:
        await llm.aclose()


async def test_template_end_to_end_with_tools_over_http(
    openai_server: FakeOpenAI, openai_llm: OpenAILLM
) -> None:
    calls: list[str] = []

    def lucky_number(sign: str) -> int:
        """The lucky number of a zodiac sign.

        Args:
            sign: the zodiac sign, lower case.
        """
        calls.append(sign)
        return 7

    @turbo(model="gpt-4o-mini")
    async def teller():
        yield System("You tell fortunes.")
        question = yield GetUserInput("Ask.")
        yield User(question)
        yield Generate(tools=[lucky_number])

    openai_server.script(
        Reply(tool_calls=[("lucky_number", '{"sign": "leo"}')]), "Your number is 7."
    )
    app = teller().bind(llm=openai_llm)
    await run(app)
    output, done = await run(app, "lucky number for leo?")
    assert done and output is not None and output.content == "Your number is 7."
    assert calls == ["leo"]
    first, second = openai_server.requests
    assert first["tools"][0]["function"]["name"] == "lucky_number"
    assert first["tools"][0]["function"]["parameters"]["properties"]["sign"] == {
        "type": "string",
        "description": "the zodiac sign, lower case.",
    }
    assert second["messages"][-2]["tool_calls"][0]["function"]["name"] == "lucky_number"
    assert second["messages"][-1] == {"role": "tool", "content": "7", "tool_call_id": "call_0"}
