"""Prometheus metrics of ``turbobot run --metrics-port``: after a scripted console run
against the fake OpenAI server, the scraped figures match what the database holds.
The admin page served beside the bot (``--admin-port``) shows the same metrics, behind
the token."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import create_async_engine

from fakes.openai_server import FakeOpenAI, Reply
from tests.test_console import ROOT, clean_env, communicate, spawn_turbobot

TOKEN = "metrics-test-token-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by name and labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def scalar(url: str, query: str) -> Any:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return (await conn.execute(sa.text(query))).scalar()
    finally:
        await engine.dispose()


async def test_metrics_match_the_database_after_a_scripted_run(openai_server: FakeOpenAI) -> None:
    # the second message's model call fails (4 tries); the third retries it, then answers
    openai_server.script("First answer.", *[Reply(status=500)] * 4, "Second.")
    metrics_port, admin_port = _free_port(), _free_port()
    env = clean_env(
        OPENAI_API_KEY="sk-metrics-secret",
        OPENAI_BASE_URL=openai_server.base_url,
        TURBOBOT_ADMIN_TOKEN=TOKEN,
        TURBOBOT_LLM_TIMEOUT="5",
    )
    url = env["TURBOBOT_DATABASE_URL"]
    proc = await spawn_turbobot(
        env,
        "run",
        str(ROOT / "bots" / "assistant.py"),
        "--metrics-port",
        str(metrics_port),
        "--admin-port",
        str(admin_port),
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        replies = []
        for line, answers in (("one", 1), ("two", 1), ("three", 2)):
            proc.stdin.write(f"{line}\n".encode())
            await proc.stdin.drain()
            for _ in range(answers):
                answer = await asyncio.wait_for(proc.stdout.readline(), 60)
                replies.append(answer.decode().strip())
        async with httpx.AsyncClient() as client:
            scraped = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
            refused = await client.get(f"http://127.0.0.1:{admin_port}/metrics")
            beside = await client.get(
                f"http://127.0.0.1:{admin_port}/metrics",
                headers={"authorization": f"Bearer {TOKEN}"},
            )
            page = await client.get(
                f"http://127.0.0.1:{admin_port}/health",
                headers={"authorization": f"Bearer {TOKEN}"},
            )
    finally:
        out, err = await communicate(proc, b"")
    assert proc.returncode == 0, err.decode()
    assert replies[0] == "First answer." and replies[2:] == ["Second.", "echo: three"], replies
    assert "sk-metrics-secret" not in (out + err).decode() and TOKEN not in err.decode()
    assert refused.status_code == 401 and beside.status_code == 200 and page.status_code == 200
    got = samples(scraped)
    assert samples(beside.text).keys() == got.keys()

    def value(name: str, **labels: str) -> float:
        return got.get((name, tuple(sorted(labels.items()))), 0.0)

    inbox = await scalar(url, "SELECT count(*) FROM inbox")
    assert value("turbobot_messages_received_total", platform="console") == inbox == 3
    sent = await scalar(url, "SELECT count(*) FROM outbox WHERE sent")
    assert value("turbobot_replies_sent_total", platform="console") == sent == 4, (
        sent,
        replies,
        out,
    )
    for trigger in ("begin", "message"):
        stored = await scalar(url, f"SELECT count(*) FROM steps WHERE trigger = '{trigger}'")
        assert value("turbobot_steps_total", trigger=trigger) == stored
    model = await scalar(url, "SELECT model FROM steps WHERE generations > 0 LIMIT 1")
    prompt = await scalar(url, "SELECT sum(prompt_tokens) FROM steps")
    completion = await scalar(url, "SELECT sum(completion_tokens) FROM steps")
    assert value("turbobot_llm_tokens_total", model=model, kind="prompt") == prompt == 3 * 11
    assert value("turbobot_llm_tokens_total", model=model, kind="completion") == completion
    assert (await scalar(url, "SELECT sum(prompt_tokens) FROM usage")) == prompt
    assert (await scalar(url, "SELECT sum(prompt_tokens) FROM model_usage")) == prompt
    assert (await scalar(url, "SELECT sum(generations) FROM model_usage")) == 3
    kinds = await scalar(url, "SELECT group_concat(kind) FROM errors")
    assert kinds == "llm:LLMUnavailableError"  # the second message's model call failed
    assert value("turbobot_errors_total", kind="llm:LLMUnavailableError") == 1
    assert value("turbobot_llm_request_failures_total", model=model) == 1
    timed = await scalar(url, "SELECT count(*) FROM steps WHERE first_reply IS NOT NULL")
    assert value("turbobot_reply_latency_seconds_count") == timed == 3
    latency = await scalar(url, "SELECT sum(first_reply) FROM steps")
    assert value("turbobot_reply_latency_seconds_sum") == pytest.approx(latency)
    assert value("turbobot_llm_request_seconds_count", model=model) == 4
    assert value("turbobot_commit_batch_operations_count") > 0
    assert value("turbobot_live_conversations") == 1
    assert value("turbobot_inbox_queued") == 0
