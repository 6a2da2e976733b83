"""The real openai client against a fake OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest

from fakes.openai_server import FakeOpenAI, Reply
from tests.conftest import fast_llm
from turbobot import (
    Generate,
    GetUserInput,
    LLMError,
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
from turbobot.llm.base import DeltaCallback


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


# -- issue 10, defect 4: a retried stream must not repeat its text ---------------------


def collector() -> tuple[list[str], DeltaCallback]:
    deltas: list[str] = []

    async def on_delta(delta: str) -> None:
        deltas.append(delta)

    return deltas, on_delta


async def test_a_stream_cut_mid_way_is_not_retried_and_shows_each_piece_once(
    openai_server: FakeOpenAI, openai_llm: OpenAILLM
) -> None:
    text = "The answer is 42, as always."
    openai_server.script(Reply(content=text, cut_after=2), text)
    deltas, on_delta = collector()
    with pytest.raises(LLMError) as info:
        await openai_llm.complete(request(), on_delta=on_delta)
    assert isinstance(info.value, LLMUnavailableError)
    assert "broke off after 10 characters" in str(info.value)
    assert deltas == ["The a", "nswer"]
    assert len(openai_server.requests) == 1


@pytest.mark.parametrize(
    "failure",
    [Reply(status=500), Reply(content="lost before any piece", cut_after=0)],
    ids=["http-500", "cut-before-first-piece"],
)
async def test_a_stream_failing_before_its_first_piece_is_retried(
    openai_server: FakeOpenAI, openai_llm: OpenAILLM, failure: Reply
) -> None:
    openai_server.script(failure, "A fresh start.")
    deltas, on_delta = collector()
    response = await openai_llm.complete(request(), on_delta=on_delta)
    assert deltas == ["A fre", "sh st", "art."]
    assert response.content == "A fresh start."
    assert len(openai_server.requests) == 2


async def test_a_stream_ending_cleanly_before_the_model_finished_is_an_error(
    openai_server: FakeOpenAI, openai_llm: OpenAILLM
) -> None:
    openai_server.script(Reply(content="The answer is 42.", end_after=2), "unused")
    deltas, on_delta = collector()
    with pytest.raises(LLMResponseError, match="ended before the model finished"):
        await openai_llm.complete(request(), on_delta=on_delta)
    assert deltas == ["The a", "nswer"]
    assert len(openai_server.requests) == 1


# -- issue 10, defect 14: the operator sees the status, the cause and a hint -----------

SECRET_KEY = "sk-test-0123456789abcdef-key"


@pytest.fixture
async def keyed_llm(openai_server: FakeOpenAI) -> AsyncIterator[OpenAILLM]:
    async with fast_llm(openai_server, SECRET_KEY) as llm:
        yield llm


def error_reply(status: int, message: str, code: str | None = None) -> Reply:
    return Reply(
        status=status,
        error={"message": message, "type": "invalid_request_error", "code": code},
    )


async def test_a_wrong_key_says_401_the_providers_message_and_what_to_check(
    openai_server: FakeOpenAI, keyed_llm: OpenAILLM
) -> None:
    said = "Incorrect API key provided: sk-te***key"
    openai_server.script(error_reply(401, said, "invalid_api_key"))
    with pytest.raises(LLMRequestError) as info:
        await keyed_llm.complete(request())
    error = info.value
    assert "401" in str(error) and said in str(error) and "check OPENAI_API_KEY" in str(error)
    assert SECRET_KEY not in str(error)
    assert error.status_code == 401 and error.provider_message == said
    assert error.hint == "check OPENAI_API_KEY" and error.permanent
    assert len(openai_server.requests) == 1


async def test_a_key_echoed_by_the_server_is_scrubbed(
    openai_server: FakeOpenAI, keyed_llm: OpenAILLM
) -> None:
    openai_server.script(error_reply(401, f"Incorrect API key provided: {SECRET_KEY}."))
    with pytest.raises(LLMRequestError) as info:
        await keyed_llm.complete(request())
    error = info.value
    assert SECRET_KEY not in str(error) and SECRET_KEY not in (error.provider_message or "")
    assert "Incorrect API key provided: ***." in str(error)
    assert error.__cause__ is None  # the client's own exception repeats the key


async def test_an_unknown_model_says_404_and_points_at_the_model_setting(
    openai_server: FakeOpenAI, openai_llm: OpenAILLM
) -> None:
    said = "The model `gpt-9` does not exist or you do not have access to it."
    openai_server.script(error_reply(404, said, "model_not_found"))
    with pytest.raises(LLMRequestError) as info:
        await openai_llm.complete(request())
    text = str(info.value)
    assert "404" in text and said in text and "TURBOBOT_MODEL/--model" in text
    assert info.value.permanent


@pytest.mark.parametrize(
    ("status", "said", "code"),
    [
        (
            400,
            "This model's maximum context length is 128000 tokens. However, your messages "
            "resulted in 250000 tokens. Please reduce the length of the messages.",
            "context_length_exceeded",
        ),
        (413, "Request too large for gpt-4o-mini: limit 30000, requested 90000.", None),
    ],
    ids=["400-context-length", "413"],
)
async def test_a_prompt_too_large_says_so(
    openai_server: FakeOpenAI, openai_llm: OpenAILLM, status: int, said: str, code: str | None
) -> None:
    openai_server.script(error_reply(status, said, code))
    with pytest.raises(LLMRequestError) as info:
        await openai_llm.complete(request())
    text = str(info.value)
    assert str(status) in text and said in text
    assert info.value.hint == "the prompt is too large for the model" and info.value.hint in text
    assert info.value.permanent and len(openai_server.requests) == 1


async def test_a_long_provider_message_is_cut_to_one_short_line(
    openai_server: FakeOpenAI, openai_llm: OpenAILLM
) -> None:
    openai_server.script(error_reply(400, "bad parameter\n" + "x" * 1000))
    with pytest.raises(LLMRequestError) as info:
        await openai_llm.complete(request())
    said = info.value.provider_message
    assert said is not None and said.startswith("bad parameter x") and len(said) <= 301
    assert "\n" not in str(info.value) and info.value.hint is None


async def test_a_400_about_a_setting_gets_no_size_hint(
    openai_server: FakeOpenAI, openai_llm: OpenAILLM
) -> None:
    said = "max_tokens is too large: 100000. This model supports at most 16384 tokens."
    openai_server.script(error_reply(400, said, "invalid_value"))
    with pytest.raises(LLMRequestError) as info:
        await openai_llm.complete(request())
    assert info.value.hint is None and said in str(info.value)


def test_permanence_follows_the_status() -> None:
    def refused(status: int | None) -> LLMRequestError:
        return LLMRequestError("refused", status_code=status)

    assert [refused(s).permanent for s in (400, 401, 403, 404, 413, 422)] == [True] * 6
    assert [refused(s).permanent for s in (408, 409, 429)] == [False] * 3
    assert refused(None).permanent


async def test_408_is_retried(openai_server: FakeOpenAI, openai_llm: OpenAILLM) -> None:
    openai_server.script(Reply(status=408), "in time")
    response = await openai_llm.complete(request())
    assert response.content == "in time" and len(openai_server.requests) == 2


async def test_the_prompt_goes_out_as_built_beside_a_callers_extra_body(
    openai_server: FakeOpenAI, openai_llm: OpenAILLM
) -> None:
    """The prompt skips the client's per-message type walk (it travels in extra_body)
    and still arrives whole and in order, beside a template's own extra_body."""
    messages = [{"role": "user" if n % 2 else "assistant", "content": f"m{n}"} for n in range(500)]
    openai_server.script("ok", "ok")
    prompt = LLMRequest(
        messages=messages, model="gpt-4o-mini", settings={"extra_body": {"seed_hint": 7}}
    )
    assert (await openai_llm.complete(prompt)).content == "ok"
    assert openai_server.requests[0]["messages"] == messages
    assert openai_server.requests[0]["seed_hint"] == 7
    streamed = await openai_llm.complete(request("one"), on_delta=_ignore)
    assert streamed.content == "ok"
    assert openai_server.requests[1]["messages"] == [{"role": "user", "content": "one"}]


async def _ignore(delta: str) -> None:
    return None


# -- issue 16: the stream is read as server-sent events, not as the client's objects --


def sse_chunk(delta: dict[str, object], finish: str | None = None, **extra: object) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    body = {"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": [choice]}
    return json.dumps({**body, **extra}, ensure_ascii=False).encode()


def split_everywhere(body: bytes, size: int) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 4096])
@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
async def test_events_are_read_whatever_their_line_ends_and_however_they_are_split(
    openai_server: FakeOpenAI, openai_llm: OpenAILLM, size: int, newline: bytes
) -> None:
    """Any of SSE's three line ends; pieces split inside a CR LF, inside a multibyte
    character and inside a field name; comments, ``event:``/``id:`` fields, ``data:``
    without its space, and an event whose data spans two lines."""
    n = newline
    two_lines = sse_chunk({"content": "é😀"}).replace(b'"delta": ', b'"delta":' + n + b"data: ")
    body = b"".join(
        [
            b": keep-alive" + n + n,
            b"data: " + sse_chunk({"role": "assistant", "content": ""}) + n + n,
            b"event: message"
            + n
            + b"id: 1"
            + n
            + b"data:"
            + sse_chunk({"content": "Grüß "})
            + n
            + n,
            b"data: " + two_lines + n + n,
            b"data: " + sse_chunk({}, "stop") + n + n,
            b"data: "
            + sse_chunk({}, None, usage={"prompt_tokens": 3, "completion_tokens": 4})
            + n
            + n,
            b"data: [DONE]" + n + n,
        ]
    )
    openai_server.script(Reply(sse=split_everywhere(body, size)))
    deltas, on_delta = collector()
    response = await openai_llm.complete(request(), on_delta=on_delta)
    assert deltas == ["Grüß ", "é😀"]
    assert response.content == "Grüß é😀"
    assert response.finish_reason == "stop"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (3, 4)
    assert response.model == "m"


async def test_a_stream_without_done_but_finished_is_whole(
    openai_server: FakeOpenAI, openai_llm: OpenAILLM
) -> None:
    body = [b"data: " + sse_chunk({"content": "fine"}, "stop") + b"\n\n"]
    openai_server.script(Reply(sse=body))
    response = await openai_llm.complete(request(), on_delta=collector()[1])
    assert (response.content, response.finish_reason) == ("fine", "stop")


async def test_an_event_cut_at_the_end_of_the_body_is_dropped_and_the_reply_is_short(
    openai_server: FakeOpenAI, openai_llm: OpenAILLM
) -> None:
    body = [
        b"data: " + sse_chunk({"content": "half"}) + b"\n\n",
        b"data: " + sse_chunk({}, "stop")[:20],  # the body ends inside the last event
    ]
    openai_server.script(Reply(sse=body))
    deltas, on_delta = collector()
    with pytest.raises(LLMResponseError, match="ended before the model finished"):
        await openai_llm.complete(request(), on_delta=on_delta)
    assert deltas == ["half"]


@pytest.mark.parametrize(
    ("event", "says"),
    [
        (b"data: {not json}\n\n", "not JSON"),
        (b"data: [1, 2]\n\n", "not an object"),
        (b'data: {"choices": [{"delta": {"content": 5}}]}\n\n', "cannot read"),
        (b'data: {"choices": [{"delta": {"tool_calls": [{"id": "x"}]}}]}\n\n', "cannot read"),
        (b'data: {"choices": [{"delta": {"tool_calls": [{"index": "0"}]}}]}\n\n', "cannot read"),
        (b'data: {"choices": [], "usage": {"prompt_tokens": "many"}}\n\n', "cannot read"),
        (b'data: {"choices": [{"delta": {}, "finish_reason": 1}]}\n\n', "cannot read"),
        (b'data: {"choices": ["text"]}\n\n', "cannot read"),
    ],
    ids=[
        "not-json",
        "not-object",
        "content-not-text",
        "tool-call-without-index",
        "tool-call-index-not-int",
        "usage-not-a-number",
        "finish-reason-not-text",
        "choice-not-object",
    ],
)
async def test_an_unreadable_chunk_is_a_response_error_not_a_crash(
    openai_server: FakeOpenAI, openai_llm: OpenAILLM, event: bytes, says: str
) -> None:
    openai_server.script(Reply(sse=[event]), "unused")
    with pytest.raises(LLMResponseError, match=says):
        await openai_llm.complete(request(), on_delta=collector()[1])
    assert len(openai_server.requests) == 1  # the same server would say the same again


async def test_an_error_event_in_the_stream_carries_the_providers_message(
    openai_server: FakeOpenAI, openai_llm: OpenAILLM
) -> None:
    error = {"error": {"message": "The server had an error processing your request."}}
    body = [
        b"data: " + sse_chunk({"content": "Hel"}) + b"\n\n",
        b"data: " + json.dumps(error).encode() + b"\n\n",
    ]
    openai_server.script(Reply(sse=body))
    deltas, on_delta = collector()
    with pytest.raises(LLMUnavailableError) as info:
        await openai_llm.complete(request(), on_delta=on_delta)
    assert deltas == ["Hel"]
    assert "broke off after 3 characters" in str(info.value)
    assert "The server had an error processing your request." in str(info.value)


async def test_the_connection_is_reused_after_a_streamed_reply(
    openai_server: FakeOpenAI, openai_llm: OpenAILLM
) -> None:
    """The body is read to its end after [DONE] (here a comment follows it, written on
    its own), so the next request needs no new connection (a new one per reply costs a
    TCP handshake on the latency path)."""
    for text in ("one", "two", "three"):
        body = [
            b"data: " + sse_chunk({"content": text}, "stop") + b"\n\n",
            b"data: [DONE]\n\n",
            b": the end\n\n",
        ]
        openai_server.script(Reply(sse=body))
        assert (await openai_llm.complete(request(), on_delta=collector()[1])).content == text
    assert len(set(openai_server.peers)) == 1, openai_server.peers


@pytest.mark.parametrize("hold", [0.0, 3.0], ids=["at-once", "after-3s"])
async def test_a_connection_dropped_after_done_does_not_spoil_the_reply(
    openai_server: FakeOpenAI, openai_llm: OpenAILLM, hold: float
) -> None:
    """What follows [DONE] is read for a short while only, and its failure (a proxy
    dropping the connection, at once or after holding it open) is not the reply's."""
    body = [b"data: " + sse_chunk({"content": "whole"}, "stop") + b"\n\n", b"data: [DONE]\n\n"]
    openai_server.script(Reply(sse=body, hold_open=hold, cut_after=0))
    response = await asyncio.wait_for(
        openai_llm.complete(request(), on_delta=collector()[1]), timeout=2
    )
    assert (response.content, response.finish_reason) == ("whole", "stop")


@pytest.mark.parametrize(
    "body",
    [
        [b"data: " + b"x" * 100 for _ in range(30)],  # one line that never ends
        [b"data: " + b"x" * 100 + b"\n" for _ in range(30)],  # one event that never ends
    ],
    ids=["endless-line", "endless-event"],
)
async def test_an_endless_event_is_dropped_not_held_in_memory(
    openai_server: FakeOpenAI,
    openai_llm: OpenAILLM,
    body: list[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("turbobot.llm.openai._MAX_EVENT_BYTES", 2000)
    openai_server.script(Reply(sse=body), "unused")
    with pytest.raises(LLMResponseError, match="streamed an event of more than"):
        await openai_llm.complete(request(), on_delta=collector()[1])
    assert len(openai_server.requests) == 1


async def test_an_error_in_the_delta_callback_is_not_blamed_on_the_server(
    openai_server: FakeOpenAI, openai_llm: OpenAILLM
) -> None:
    openai_server.script("Some text.")

    async def broken(delta: str) -> None:
        raise KeyError("a bug on our side")

    with pytest.raises(KeyError, match="a bug on our side"):
        await openai_llm.complete(request(), on_delta=broken)


async def test_a_reply_that_spells_out_sse_framing_comes_through_whole(
    openai_server: FakeOpenAI, openai_llm: OpenAILLM
) -> None:
    """A user can make the model write anything, the stream's own framing included: in
    the chunk's JSON it is text, not framing."""
    text = 'Sure:\n\ndata: [DONE]\n\nevent: error\r\ndata: {"error": "x"}\r\n\r\n: done\rend'
    openai_server.script(text)
    deltas, on_delta = collector()
    response = await openai_llm.complete(request(), on_delta=on_delta)
    assert "".join(deltas) == response.content == text
    assert response.finish_reason == "stop"
