"""The offline local model (SmolLM2-135M through xllamacpp), for real: marked slow."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.test_console import clean_env, run_console
from turbobot import LLMCapabilityError, LLMRequest
from turbobot.llm.local import LocalLLM

pytestmark = pytest.mark.slow


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def local_llm() -> AsyncIterator[LocalLLM]:
    llm = LocalLLM()
    await llm.start()
    try:
        yield llm
    finally:
        await llm.aclose()


def ask(text: str, **settings: object) -> LLMRequest:
    return LLMRequest(
        messages=[
            {"role": "system", "content": "You are a helpful assistant. Answer in one sentence."},
            {"role": "user", "content": text},
        ],
        model="smollm2",
        settings={"temperature": 0.0, **settings},
    )


@pytest.mark.asyncio(loop_scope="module")
async def test_reply_is_non_empty_and_stop_terminated(local_llm: LocalLLM) -> None:
    response = await local_llm.complete(ask("What is the capital of France?"))
    assert response.content.strip()
    assert response.finish_reason == "stop"
    assert response.usage is not None and response.usage.completion_tokens > 0


@pytest.mark.asyncio(loop_scope="module")
async def test_max_tokens_is_capped(local_llm: LocalLLM) -> None:
    cap, local_llm.max_tokens_cap = local_llm.max_tokens_cap, 24
    try:
        response = await local_llm.complete(
            ask("Write a very long story about dragons.", max_tokens=100_000)
        )
    finally:
        local_llm.max_tokens_cap = cap
    assert response.usage is not None
    assert response.usage.completion_tokens == 24
    assert response.finish_reason == "length"


@pytest.mark.asyncio(loop_scope="module")
async def test_chat_template_renders_the_system_prompt(local_llm: LocalLLM) -> None:
    body = json.dumps(
        {
            "messages": [
                {"role": "system", "content": "SYSTEM-MARKER"},
                {"role": "user", "content": "hi"},
            ]
        }
    ).encode()
    request = urllib.request.Request(
        f"{local_llm.base_url}/apply-template",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    prompt = await asyncio.to_thread(
        lambda: json.loads(urllib.request.urlopen(request).read())["prompt"]
    )
    assert "<|im_start|>system\nSYSTEM-MARKER<|im_end|>" in prompt


@pytest.mark.asyncio(loop_scope="module")
async def test_streaming_keeps_the_event_loop_free(local_llm: LocalLLM) -> None:
    deltas: list[str] = []
    gaps: list[float] = []

    async def on_delta(delta: str) -> None:
        deltas.append(delta)

    async def ticker(stop: asyncio.Event) -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    stop = asyncio.Event()
    tick = asyncio.create_task(ticker(stop))
    response = await local_llm.complete(
        ask("Tell me about the moon.", max_tokens=60), on_delta=on_delta
    )
    stop.set()
    await tick
    assert len(deltas) > 5 and "".join(deltas) == response.content
    assert max(gaps) < 0.2, f"the event loop stalled for {max(gaps):.3f}s during generation"


@pytest.mark.asyncio(loop_scope="module")
async def test_concurrent_requests_all_complete(local_llm: LocalLLM) -> None:
    responses = await asyncio.gather(
        *(local_llm.complete(ask(f"Name a colour number {i}.", max_tokens=20)) for i in range(3))
    )
    assert all(r.content.strip() for r in responses)


@pytest.mark.asyncio(loop_scope="module")
async def test_tools_are_refused_clearly(local_llm: LocalLLM) -> None:
    request = LLMRequest(messages=[], model="m", tools=[{"type": "function", "function": {}}])
    with pytest.raises(LLMCapabilityError, match="does not support tools"):
        await local_llm.complete(request)


async def test_console_horoscope_on_the_local_model_with_no_key() -> None:
    code, out, err = await run_console(
        "hello\nI am a Leo\nWhat does my week hold?\n", clean_env(), "bots.horoscope"
    )
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[:2] == [
        "Welcome, traveller. What is your zodiac sign?",
        "Ah, Leo. What do you want to know?",
    ]
    assert len(lines) >= 3 and "Sorry" not in out
