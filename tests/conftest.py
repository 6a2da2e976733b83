from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.fakes.openai_server import FakeOpenAI
from turbobot import OpenAILLM, RetryPolicy


@pytest.fixture
async def openai_server() -> AsyncIterator[FakeOpenAI]:
    server = await FakeOpenAI().start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def openai_llm(openai_server: FakeOpenAI) -> AsyncIterator[OpenAILLM]:
    llm = OpenAILLM(
        api_key="test-key",
        base_url=openai_server.base_url,
        timeout=5,
        retry=RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05),
    )
    try:
        yield llm
    finally:
        await llm.aclose()
