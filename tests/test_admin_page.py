"""The operator's page in a real headless Chromium (Debian's chromium and chromedriver,
driven by Selenium), served by the real ``turbobot admin`` command on a real SQLite
file that a scripted run of the runtime filled.

Screenshots of each page are saved in ``build/screenshots/`` (CI keeps them as
artefacts).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from turbobot import (
    Generate,
    GetUserInput,
    LLMUnavailableError,
    Result,
    ScriptedLLM,
    UndeliverableError,
    User,
    turbo,
)
from turbobot.chat import ChannelKey
from turbobot.clock import FakeClock
from turbobot.llm.base import LLMRequest, LLMResponse
from turbobot.messages import Usage
from turbobot.sql import SQLStore
from turbobot.template import INTERRUPTED, AssistantStream
from turbobot.testing import BotSession, RecordingSender

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "build" / "screenshots"
TOKEN = "a-test-admin-token-" + "x" * 16
HOSTILE = '<script>document.title="owned"</script><img src=x onerror=alert(1)>'


@turbo(model="model-a")
async def helper():
    name = yield GetUserInput("Your name?")
    yield Result(f"Hello, {name}.")
    while True:
        said = yield GetUserInput(timeout=60)
        if said.timed_out:
            yield Result("Time is up.")
            return
        if said == "bye":
            return
        if said == "crash":
            raise RuntimeError("the template broke")
        yield User(said)
        yield Generate(stream=said.startswith("stream"))


class Model(ScriptedLLM):
    """Answers "About X: fine." in 0.4 s (fake clock); a very long answer to "long";
    breaks off half way through a streamed answer to "stream broken"."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(respond=self.answer)
        self.clock = clock

    def answer(self, request: LLMRequest) -> LLMResponse:
        self.clock.advance(0.4)
        said = str(request.messages[-1]["content"])
        text = "word " * 500 if said == "long" else f"About {said}: fine."
        return LLMResponse(text, usage=Usage(20, 6), model=request.model)

    async def complete(self, request: LLMRequest, *, on_delta: Any = None) -> LLMResponse:
        if request.messages[-1]["content"] == "stream broken" and on_delta is not None:
            await on_delta("Half an ans")
            raise LLMUnavailableError("the model server went away")
        return await super().complete(request, on_delta=on_delta)


class ShowingSender(RecordingSender):
    """Shows a broken-off stream marked as interrupted (as Telegram's edits do); the
    user of a channel ending in "blocked" blocked the bot."""

    async def send(self, key: ChannelKey, text: str) -> str | None:
        if key.channel.endswith("blocked"):
            raise UndeliverableError("Forbidden: bot was blocked by the user")
        return await super().send(key, text)

    async def send_stream(self, key: ChannelKey, stream: AssistantStream) -> str | None:
        async for _ in stream:
            pass
        if stream.interrupted:
            return await self.send(key, stream.text + INTERRUPTED)
        return await self.send(key, stream.text) if stream.message is not None else None


async def _fill(url: str) -> None:
    """A scripted run: users on two platforms, finished, failed, timed out and waiting
    conversations, streamed replies, a hostile message; gauges sampled meanwhile."""
    clock = FakeClock(time.time() - 2 * 3600)
    for platform, users in (("telegram", 4), ("discord", 3)):
        store = SQLStore(url)
        await store.open()
        try:
            chat = BotSession(
                helper,
                llm=Model(clock),
                store=store,
                clock=clock,
                platform=platform,
                sender=ShowingSender(),
            )
            async with chat:
                for i in range(users):
                    channel, author = f"{platform}-chat-{i}", f"user{i}"
                    await chat.say("hi", channel=channel, author=author)
                    await chat.say(f"name{i}", channel=channel, author=author)
                    await chat.say(f"weather in town {i}", channel=channel, author=author)
                    await chat.say("stream a poem", channel=channel, author=author)
                    if i == 0:
                        await chat.say(HOSTILE, channel=channel, author=author)
                        await chat.say("bye", channel=channel, author=author)
                    elif i == 1:
                        await chat.say("crash", channel=channel, author=author)
                    elif i == 2:
                        await chat.say("long", channel=channel, author=author)
                        await chat.say("stream broken", channel=channel, author=author)
                    clock.advance(300)
                    await chat.runtime.sample()
                await chat.advance(120)  # the waiting ones' deadlines fire
                await chat.say("hi", channel=f"{platform}-blocked", author="blocker")
                await chat.say("hi", channel=f"{platform}-late", author="late")
                await chat.runtime.sample()
        finally:
            await store.aclose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``turbobot admin`` on a filled database: its base URL."""
    path = tmp_path_factory.mktemp("admin") / "bot.db"
    url = f"sqlite+aiosqlite:///{path}"
    asyncio.run(_fill(url))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURBOBOT_")}
    env.update(TURBOBOT_DATABASE_URL=url, TURBOBOT_ADMIN_TOKEN=TOKEN)
    log = path.with_suffix(".log")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "turbobot", "admin", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(base + "/login", timeout=1)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"turbobot admin did not start: {log.read_text()}"
                    ) from None
                time.sleep(0.1)  # (polling a starting process, not waiting for time)
        yield base
    finally:
        proc.terminate()
        assert proc.wait(10) == 0, log.read_text()
        assert TOKEN not in log.read_text()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail(
            "the admin page's tests need Debian's chromium and chromium-driver: make browser"
        )
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager never downloads a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1600",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield chrome
    finally:
        chrome.quit()


def _shot(browser: object, name: str) -> None:
    path = SCREENSHOTS / f"admin-{name}.png"
    assert browser.save_screenshot(str(path)), path  # type: ignore[attr-defined]
    assert path.stat().st_size > 10_000  # a page, not a blank


def _click(browser: object, element: object) -> None:
    """Click something that loads a page, and wait until the new page is there."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    b: any = browser  # type: ignore[valid-type]
    old = b.find_element(By.TAG_NAME, "html")
    element.click()  # type: ignore[attr-defined]

    def replaced(_: object) -> bool:
        try:
            old.tag_name  # noqa: B018 - raises once the page it belonged to is gone
        except WebDriverException:  # (stale, or "does not belong to the document")
            return True
        return False

    WebDriverWait(b, 10).until(replaced)


def _login(browser: object, base: str) -> None:
    from selenium.webdriver.common.by import By

    b: any = browser  # type: ignore[valid-type]
    b.delete_all_cookies()
    b.get(base + "/conversations")
    assert "Admin token required" in b.page_source  # refused without the token
    b.find_element(By.ID, "token").send_keys("wrong-token-wrong-token")
    _click(b, b.find_element(By.ID, "login"))
    assert b.find_element(By.ID, "failed").is_displayed()
    b.find_element(By.ID, "token").send_keys(TOKEN)
    _click(b, b.find_element(By.ID, "login"))
    assert b.current_url == base + "/conversations"
    b.get_log("browser")  # (read: the refusals above are logged as failed loads)


def test_without_the_token_every_page_is_refused(admin: str) -> None:
    for path in ("/", "/conversations", "/conversations/x", "/usage", "/health"):
        answer = httpx.get(admin + path)
        assert answer.status_code == 401, path
        assert "Admin token required" in answer.text and "telegram" not in answer.text
    wrong = httpx.get(admin + "/usage", headers={"authorization": "Bearer not-the-token"})
    assert wrong.status_code == 401
    forged = httpx.get(admin + "/usage", cookies={"turbobot_admin": TOKEN})  # the raw token
    assert forged.status_code == 401
    right = httpx.get(admin + "/usage", headers={"authorization": f"Bearer {TOKEN}"})
    assert right.status_code == 200 and "Tokens per model" in right.text
    assert "script-src" not in right.headers["content-security-policy"]  # no scripts at all


def test_the_list_filters_and_a_click_opens_a_transcript(admin: str, browser: object) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    b: any = browser  # type: ignore[valid-type]
    _login(b, admin)
    rows = b.find_elements(By.CSS_SELECTOR, "#conversations tbody tr")
    assert len(rows) == 4 + 3 + 2 + 2  # every conversation of the run, newest first
    assert "late" in rows[0].text
    _shot(b, "conversations")

    Select(b.find_element(By.ID, "platform")).select_by_value("discord")
    _click(b, b.find_element(By.ID, "filter"))
    rows = b.find_elements(By.CSS_SELECTOR, "#conversations tbody tr")
    assert len(rows) == 5 and all("discord" in r.text for r in rows)

    Select(b.find_element(By.ID, "state")).select_by_value("failed")
    _click(b, b.find_element(By.ID, "filter"))
    rows = b.find_elements(By.CSS_SELECTOR, "#conversations tbody tr")
    assert [r.text.split()[3] for r in rows] == ["discord:discord-chat-1"]

    b.get(admin + "/conversations?state=timed_out")
    timed_out = b.find_elements(By.CSS_SELECTOR, "#conversations tbody tr")
    # (chat 2's conversations broke off with the model: they wait for a retry instead)
    assert [r.text.split()[3] for r in timed_out] == ["telegram:telegram-chat-3"]

    b.get(admin + "/conversations?user=user0&q=onerror")  # text search finds the hostile line
    rows = b.find_elements(By.CSS_SELECTOR, "#conversations tbody tr a")
    assert len(rows) == 2
    _click(b, rows[0])
    assert "/conversations/" in b.current_url
    lines = [li.text for li in b.find_elements(By.CSS_SELECTOR, "#transcript li")]
    assert any(HOSTILE in line for line in lines)  # shown as text, never run
    assert b.title != "owned" and not b.find_elements(By.CSS_SELECTOR, "#transcript img")
    assert any("streamed" in line and "About stream a poem: fine." in line for line in lines)
    assert any(line.startswith("user") and "weather in town 0" in line for line in lines)
    steps = b.find_elements(By.CSS_SELECTOR, "#steps tbody tr")
    assert any("model-a" in s.text and "400 ms" in s.text for s in steps)
    assert b.find_elements(By.CSS_SELECTOR, "svg.plot")
    assert b.find_elements(By.CSS_SELECTOR, "#journal tbody tr")
    _shot(b, "transcript")

    # the marks: a reply split in two messages (Discord's limit is 2,000 characters),
    # a stream broken off half way, a reply to a user who blocked the bot
    b.get(admin + "/conversations?platform=discord&q=stream+broken")
    _click(b, b.find_element(By.CSS_SELECTOR, "#conversations tbody tr a"))
    marks = b.find_element(By.ID, "transcript").text
    assert "split in 2 messages" in marks and "interrupted" in marks
    assert "Half an ans" + INTERRUPTED in marks
    assert "llm:LLMUnavailableError" in b.find_element(By.ID, "errors").text
    _shot(b, "transcript-marks")
    b.get(admin + "/conversations?user=blocker&platform=telegram")
    _click(b, b.find_element(By.CSS_SELECTOR, "#conversations tbody tr a"))
    assert "undeliverable" in b.find_element(By.ID, "transcript").text
    assert "Forbidden: bot was blocked" in b.find_element(By.ID, "errors").text
    errors = [e for e in b.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []  # no blocked script, no missing asset


def test_usage_and_health_pages_show_plots(admin: str, browser: object) -> None:
    from selenium.webdriver.common.by import By

    b: any = browser  # type: ignore[valid-type]
    _login(b, admin)
    b.get(admin + "/usage")
    plots = b.find_elements(By.CSS_SELECTOR, "svg.plot")
    assert len(plots) == 3
    assert plots[0].find_elements(By.TAG_NAME, "rect")  # tokens per day
    assert len(plots[1].find_elements(By.TAG_NAME, "rect")) >= 7  # per user bars
    models = b.find_element(By.ID, "per-model").text
    assert "model-a" in models
    _shot(b, "usage")

    b.get(admin + "/health")
    plots = b.find_elements(By.CSS_SELECTOR, "svg.plot")
    assert len(plots) == 5
    assert plots[0].find_elements(By.TAG_NAME, "polyline")  # messages per minute
    assert plots[1].find_elements(By.TAG_NAME, "polyline")  # latency percentiles
    # 18 replies without the model (questions, greetings, failure notices), 16 with it
    assert b.find_element(By.ID, "p50").text == "0 ms"
    assert b.find_element(By.ID, "p99").text == "400 ms"  # the scripted model's time
    # per platform: a template that failed, a stream broken off, a user who blocked the bot
    assert int(b.find_element(By.ID, "error-count").text) == 6
    recent = b.find_element(By.ID, "recent-errors").text
    assert all(kind in recent for kind in ("template", "llm:LLMUnavailableError", "undeliverable"))
    assert b.find_elements(By.CSS_SELECTOR, "#workers tbody tr")
    _shot(b, "health")
