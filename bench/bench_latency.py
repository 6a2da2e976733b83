"""Reply latency under a realistically paced streaming model: what the bot adds.

usage: python bench/bench_latency.py CHANNELS [SECONDS] [turbobot|bare]

The model is the fake OpenAI server (fakes/openai_server.py) in a subprocess of its
own (its own CPU core), on 127.0.0.1: 300 ms to the first token, then 50 tokens a
second, one token per streamed chunk, 30 tokens a reply. It records, per request,
when the request had arrived whole (its body read) and when its first content chunk
was written (``time.monotonic()``, one clock for every process on Linux).

CHANNELS channels talk at once, each a closed loop: send a message (its text is a
unique tag, which the server's record of the request is matched by), wait for the
whole reply, think 1 to 5 seconds (a seeded RNG), again. Measured: the messages sent
during SECONDS (default 30) after a warm-up (BENCH_WARMUP seconds, default 10; every
channel has begun its conversation by then).

turbobot  a ``Runtime`` with ``SQLStore`` on a real SQLite file (WAL,
          synchronous=FULL: the default), the bundled assistant template (system
          prompt, the conversation so far, ``Generate(stream=True)``) and
          ``OpenAILLM``; the sender notes when the first fragment of a streamed reply
          is handed to it (what an adapter would show first), then reads the rest.
          Latency: that moment minus the moment just before ``Runtime.receive``.
bare      the same loops with the bare ``openai.AsyncOpenAI`` client streaming
          directly (the same conversation as prompt, no turbobot): latency is the
          request to the first content chunk, what the client and loopback alone add.
          (It passes ``messages=`` as a user would; ``OpenAILLM`` passes them in
          ``extra_body``, which skips the client's walk over their types.)

Added latency = latency - (server's first chunk written - server's request arrival):
everything that is not the model's own time to the first token. (A request whose body
is sent late, by a busy client, counts as arriving late: that wait is the bot's.) Also reported: the
event loop's lag (a task sleeping 5 ms, how late it wakes), the CPU seconds of this
process (and of the server) during the measured window. Every reply is checked: the
full text must be what the server sent for that request (``replies_ok``).

One JSON line per run on stdout. ``BENCH_TRACE=1`` adds ``trace_p50_ms`` and
``trace_p99_ms``: where the added latency goes, from timestamps taken around
turbobot (nothing in it changed): see ``Trace``. ``BENCH_PROFILE=1`` prints where
the event loop's thread spends the measured window (see ``WallSampler``) to stderr.
``BENCH_TMP`` chooses where the database file goes (default: the system's temporary
directory); ``BENCH_SQLITE_SYNCHRONOUS=NORMAL`` shows what the fsyncs cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import openai
from openai.types.chat import ChatCompletionMessageParam

from fakes.openai_server import paced_chunks
from turbobot import ChannelKey, IncomingMessage, OpenAILLM
from turbobot.bots.assistant import assistant
from turbobot.delivery import answering
from turbobot.llm.base import DeltaCallback, LLMRequest, LLMResponse
from turbobot.runtime import BaseSender, Runtime, RuntimeSettings
from turbobot.template import AssistantStream

ROOT = Path(__file__).resolve().parent.parent
FIRST_TOKEN = 0.3  # seconds
TOKENS_PER_SECOND = 50.0
TOKENS = 30
THINK = (1.0, 5.0)  # seconds a user takes to answer, uniformly
LAG_TICK = 0.005
REPLY_TIMEOUT = 60.0
SEED = 20240613
MODEL = "gpt-4o-mini"
SYSTEM = "You are a helpful, concise assistant."  # (the assistant template's default)
#: SQLite's synchronous pragma (FULL, the default: an fsync per commit; NORMAL: none in WAL
#: mode but at checkpoints), to see what the fsync costs
SYNCHRONOUS = os.environ.get("BENCH_SQLITE_SYNCHRONOUS", "FULL").upper()


# -- the model's process -------------------------------------------------------------------


@contextlib.contextmanager
def fake_model(tmp: Path) -> Iterator[str]:
    """Run the paced fake model in a subprocess; yield its root URL; stop it whatever
    happens (its own session: a Ctrl-C reaches this process, which stops it)."""
    port_file = tmp / "port"
    command = [
        sys.executable,
        "-m",
        "fakes.openai_server",
        "--port-file",
        str(port_file),
        "--first-token",
        str(FIRST_TOKEN),
        "--tokens-per-second",
        str(TOKENS_PER_SECOND),
        "--tokens",
        str(TOKENS),
        "--parent",
        str(os.getpid()),  # it stops by itself if this process dies without stopping it
    ]
    server = subprocess.Popen(command, cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            if server.poll() is not None:
                raise RuntimeError(f"the fake model exited with {server.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("the fake model did not start within 30 s")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{int(port_file.read_text())}"
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def server_report(root: str, cpu_only: bool = False) -> dict[str, Any]:
    """The server's CPU seconds and its per-request timings (``GET /timings``)."""
    url = f"{root}/timings" + ("?cpu" if cpu_only else "")
    with urllib.request.urlopen(url, timeout=60) as response:
        report: dict[str, Any] = json.load(response)
    return report


# -- what is measured ------------------------------------------------------------------------


@dataclass(slots=True)
class Sample:
    """One message and its reply, as the bot's side saw them."""

    tag: str
    sent: float  # just before the message was handed over (receive / create)
    first: float | None = None  # the first fragment of the reply
    text: str | None = None  # the reply, whole
    streamed: bool = True  # False: a plain message came instead (an apology, a notice)
    done: asyncio.Future[None] | None = None


@dataclass(slots=True)
class Trace:
    """Timestamps (``time.monotonic()``) around turbobot, by tag; with BENCH_TRACE=1.

    received  ``Runtime.receive`` returned (the message is committed to the inbox)
    step      ``Conversations.advance`` began (the channel's worker runs the step)
    llm       ``LLM.complete`` was called (the template ran, the prompt is ready)
    request   the HTTP client is about to send the request (``openai`` built it)
    headers   the response's headers arrived (the server sends them at once)
    delta     the first content chunk was parsed and handed to ``on_delta``
    shown     ``BaseSender.send_stream`` was called (the step's commit done)
    """

    points: dict[str, dict[str, float]] = field(default_factory=dict)
    #: the store's group commits: (when, operations, seconds), from ``BaseStore.on_commit``
    commits: list[tuple[float, int, float]] = field(default_factory=list)

    def mark(self, tag: str | None, point: str) -> None:
        if tag is not None:
            self.points.setdefault(tag, {}).setdefault(point, time.monotonic())


TRACE: Trace | None = Trace() if os.environ.get("BENCH_TRACE") == "1" else None
#: the tag of the message whose generation runs in this task (for the HTTP hooks)
CURRENT_TAG: contextvars.ContextVar[str | None] = contextvars.ContextVar("tag", default=None)


class WallSampler:
    """BENCH_PROFILE=1: where the event loop's thread is, every few milliseconds, by wall
    clock (idle in ``epoll``, blocked in a call, or running Python): a poor man's py-spy,
    printed to stderr. Samples wait for the GIL, so they lean towards blocking calls."""

    def __init__(self, every: float = 0.002) -> None:
        self.every = every
        self.leaves: dict[str, int] = {}
        self.ours: dict[str, int] = {}
        self.samples = 0
        self._target = threading.get_ident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wall-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            frame = sys._current_frames().get(self._target)
            if frame is None:
                continue
            self.samples += 1
            leaf = f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"
            self.leaves[leaf] = self.leaves.get(leaf, 0) + 1
            while frame is not None:  # the innermost frame in turbobot or this bench
                name = frame.f_code.co_filename
                if "/turbobot/" in name or name.endswith("bench_latency.py"):
                    where = f"{Path(name).name}:{frame.f_code.co_name}"
                    self.ours[where] = self.ours.get(where, 0) + 1
                    break
                frame = frame.f_back

    def report(self) -> None:
        total = max(1, self.samples)
        print(f"wall-clock samples of the loop's thread: {self.samples}", file=sys.stderr)
        for title, counts in (("innermost frame", self.leaves), ("innermost of ours", self.ours)):
            print(f"  by {title}:", file=sys.stderr)
            for where, n in sorted(counts.items(), key=lambda kv: -kv[1])[:15]:
                print(f"    {100 * n / total:5.1f}%  {where}", file=sys.stderr)


def http_client() -> openai.DefaultAsyncHttpxClient:
    """The client's HTTP client as ``openai`` makes it, with timing hooks when tracing."""
    if TRACE is None:
        return openai.DefaultAsyncHttpxClient()
    trace = TRACE

    async def request(_: Any) -> None:
        trace.mark(CURRENT_TAG.get(), "request")

    async def response(_: Any) -> None:
        trace.mark(CURRENT_TAG.get(), "headers")

    return openai.DefaultAsyncHttpxClient(
        event_hooks={"request": [request], "response": [response]}
    )


class TracingLLM:
    """An ``OpenAILLM`` that notes when it is called and when its first delta came."""

    def __init__(self, inner: OpenAILLM, trace: Trace) -> None:
        self.inner = inner
        self.trace = trace

    async def complete(
        self, request: LLMRequest, *, on_delta: DeltaCallback | None = None
    ) -> LLMResponse:
        users = [m for m in request.messages if m.get("role") == "user"]
        tag = str(users[-1]["content"]) if users else None
        self.trace.mark(tag, "llm")
        CURRENT_TAG.set(tag)  # (this task's own context: the generation's)
        if on_delta is None:
            return await self.inner.complete(request)
        forward = on_delta

        async def first(delta: str) -> None:
            self.trace.mark(tag, "delta")
            await forward(delta)

        return await self.inner.complete(request, on_delta=first)

    async def aclose(self) -> None:
        await self.inner.aclose()


class BenchSender(BaseSender):
    """Notes when each reply's first fragment is handed over, then reads it whole."""

    def __init__(self) -> None:
        self.waiting: dict[ChannelKey, Sample] = {}
        self.unexpected = 0
        self.count = 0

    def _take(self, key: ChannelKey) -> Sample | None:
        sample = self.waiting.pop(key, None)
        if sample is None:
            self.unexpected += 1
        return sample

    async def send_stream(self, key: ChannelKey, stream: AssistantStream) -> str | None:
        first = None
        parts: list[str] = []
        sample = self._take(key)
        if TRACE is not None and sample is not None:
            TRACE.mark(sample.tag, "shown")
        async for fragment in stream:
            if first is None:
                first = time.monotonic()
            parts.append(fragment)
        self.count += 1
        if sample is not None:
            sample.first = first
            sample.text = "".join(parts) if stream.message is not None else None
            if sample.done is not None and not sample.done.done():
                sample.done.set_result(None)
        return str(self.count)

    async def send(self, key: ChannelKey, text: str) -> str | None:
        self.count += 1
        sample = self._take(key)
        if sample is not None:
            sample.first, sample.text, sample.streamed = time.monotonic(), text, False
            if sample.done is not None and not sample.done.done():
                sample.done.set_result(None)
        return str(self.count)


# -- the two ways of talking to the model ---------------------------------------------------

Ask = Callable[[int, str], Awaitable[Sample]]


async def turbobot_cell(
    root: str, tmp: Path, run: Callable[[Ask], Awaitable[None]]
) -> dict[str, Any]:
    from turbobot.sql import SQLStore

    folder = Path(os.environ.get("BENCH_TMP") or tmp)
    path = folder / f"latency-{os.getpid()}.db"
    store = SQLStore(f"sqlite+aiosqlite:///{path}", sqlite_synchronous=SYNCHRONOUS)
    await store.open()
    if TRACE is not None:
        commits = TRACE.commits
        store.on_commit = lambda ops, took: commits.append((time.monotonic(), ops, took))
    sender = BenchSender()
    inner = OpenAILLM(
        client=openai.AsyncOpenAI(
            api_key="unused",
            base_url=f"{root}/v1",
            timeout=60.0,
            max_retries=0,  # (as OpenAILLM makes its own client: its retries are its own)
            http_client=http_client(),
        )
    )
    llm: Any = inner if TRACE is None else TracingLLM(inner, TRACE)
    settings = RuntimeSettings(gc_threshold=10_000)  # as the turbobot command runs it
    runtime = Runtime(assistant, llm=llm, sender=sender, store=store, settings=settings)
    await runtime.start()
    if TRACE is not None:
        trace = TRACE
        advance = runtime.conversations.advance

        async def traced_advance(*args: Any, **kwargs: Any) -> bool:
            message = answering.get()
            trace.mark(message.text if message is not None else None, "step")
            return await advance(*args, **kwargs)

        runtime.conversations.advance = traced_advance  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()

    async def ask(channel: int, tag: str) -> Sample:
        key = ChannelKey("bench", str(channel))
        sample = Sample(tag, 0.0, done=loop.create_future())
        sender.waiting[key] = sample
        message = IncomingMessage(key, tag, tag, author_id=str(channel), author_name="u")
        sample.sent = time.monotonic()
        await runtime.receive(message)
        if TRACE is not None:
            TRACE.mark(tag, "received")
        assert sample.done is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sample.done, REPLY_TIMEOUT)
        return sample

    try:
        await run(ask)
    finally:
        await runtime.aclose()
        await store.aclose()
        await llm.aclose()
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(f"{path}{suffix}")
    return {"synchronous": SYNCHRONOUS, "unexpected_sends": sender.unexpected}


async def bare_cell(root: str, tmp: Path, run: Callable[[Ask], Awaitable[None]]) -> dict[str, Any]:
    client = openai.AsyncOpenAI(
        api_key="unused",
        base_url=f"{root}/v1",
        timeout=60.0,
        max_retries=0,
        http_client=http_client(),
    )
    histories: dict[int, list[ChatCompletionMessageParam]] = {}

    async def ask(channel: int, tag: str) -> Sample:
        history = histories.setdefault(channel, [{"role": "system", "content": SYSTEM}])
        history.append({"role": "user", "content": tag})
        sample = Sample(tag, 0.0)
        CURRENT_TAG.set(tag)
        parts: list[str] = []
        try:
            sample.sent = time.monotonic()
            if TRACE is not None:
                TRACE.points[tag] = {"llm": sample.sent}  # (the segments turbobot's has)
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=history,
                stream=True,
                stream_options={"include_usage": True},
                temperature=0.7,
            )
            async for chunk in stream:
                for choice in chunk.choices:
                    content = choice.delta.content
                    if content:
                        if sample.first is None:
                            sample.first = time.monotonic()
                            if TRACE is not None:
                                TRACE.points[tag]["delta"] = sample.first
                        parts.append(content)
            sample.text = "".join(parts)
        except openai.APIError as exc:
            print(f"channel {channel}: {exc!r}", file=sys.stderr)
        history.append({"role": "assistant", "content": "".join(parts)})
        return sample

    try:
        await run(ask)
    finally:
        await client.close()
    return {}


# -- the closed loops -------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (nearest rank) of ``values``."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


async def measure(
    channels: int, seconds: float, warmup: float, root: str, tmp: Path, variant: str
) -> dict[str, Any]:
    samples: list[Sample] = []
    lags: list[float] = []
    pauses: list[tuple[int, float]] = []  # the garbage collector's: (generation, seconds)
    started = time.monotonic()
    window = (started + warmup, started + warmup + seconds)
    marks: dict[str, float] = {}

    async def channel_loop(ask: Ask, channel: int) -> None:
        rng = random.Random(SEED * 1_000_003 + channel)
        await asyncio.sleep(rng.uniform(0, THINK[1]))  # users do not all start at once
        turn = 0
        while time.monotonic() < window[1]:
            turn += 1
            sample = await ask(channel, f"c{channel}t{turn}")
            if window[0] <= sample.sent < window[1]:
                samples.append(sample)
            pause = rng.uniform(*THINK)
            await asyncio.sleep(min(pause, max(0.0, window[1] - time.monotonic())))

    collecting: list[float] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collecting.append(time.perf_counter())
        elif collecting:
            pauses.append((info["generation"], time.perf_counter() - collecting.pop()))

    async def watch_lag() -> None:
        await asyncio.sleep(max(0.0, window[0] - time.monotonic()))
        marks["cpu0"] = time.process_time()
        report = await asyncio.to_thread(server_report, root, True)
        marks["server_cpu0"] = report["cpu_s"]
        gc.callbacks.append(on_gc)
        sampler = WallSampler() if os.environ.get("BENCH_PROFILE") == "1" else None
        if sampler is not None:
            sampler.start()
        try:
            while (before := time.monotonic()) < window[1]:
                await asyncio.sleep(LAG_TICK)
                lags.append(time.monotonic() - before - LAG_TICK)
        finally:
            gc.callbacks.remove(on_gc)
            if sampler is not None:
                sampler.stop()
                sampler.report()
        marks["cpu1"] = time.process_time()
        report = await asyncio.to_thread(server_report, root, True)
        marks["server_cpu1"] = report["cpu_s"]

    async def run(ask: Ask) -> None:
        watcher = asyncio.create_task(watch_lag())
        await asyncio.gather(*(channel_loop(ask, c) for c in range(channels)))
        await watcher

    cell = turbobot_cell if variant == "turbobot" else bare_cell
    extra = await cell(root, tmp, run)
    report = await asyncio.to_thread(server_report, root)
    extra["gc_pauses"] = len(pauses)
    extra["gc_full_pauses"] = sum(1 for generation, _ in pauses if generation == 2)
    extra["gc_pause_total_ms"] = ms(sum(pause for _, pause in pauses))
    extra["gc_pause_max_ms"] = ms(max((pause for _, pause in pauses), default=None))
    return summarise(variant, channels, window, warmup, samples, lags, marks, report, extra)


def summarise(
    variant: str,
    channels: int,
    window: tuple[float, float],
    warmup: float,
    samples: list[Sample],
    lags: list[float],
    marks: dict[str, float],
    report: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    repeated = 0
    for row in report["requests"]:
        if row["prompt"] in rows:
            repeated += 1  # (a retried request: the last one answered counts)
        if row["prompt"] not in rows or row["first"] is not None:
            rows[row["prompt"]] = row
    latencies: list[float] = []
    added: list[float] = []
    model: list[float] = []
    bad = missing = 0
    for sample in samples:
        row = rows.get(sample.tag)
        expected = "".join(paced_chunks(sample.tag, TOKENS))
        if sample.first is None or sample.text is None or row is None or row["first"] is None:
            missing += 1
            continue
        if not sample.streamed or sample.text != expected or row["text"] != sample.text:
            bad += 1
            continue
        latency = sample.first - sample.sent
        thinking = row["first"] - row["arrived"]
        latencies.append(latency)
        model.append(thinking)
        added.append(latency - thinking)
    result: dict[str, Any] = {
        "bench": "latency",
        "variant": "turbobot-sqlite" if variant == "turbobot" else "openai-bare",
        "channels": channels,
        "seconds": round(window[1] - window[0], 3),
        "warmup_s": warmup,
        "messages": len(samples),
        "p50_ms": ms(percentile(latencies, 50)),
        "p99_ms": ms(percentile(latencies, 99)),
        "max_ms": ms(max(latencies, default=None)),
        "added_p50_ms": ms(percentile(added, 50)),
        "added_p99_ms": ms(percentile(added, 99)),
        "added_max_ms": ms(max(added, default=None)),
        "model_first_token_p50_ms": ms(percentile(model, 50)),
        "model_first_token_p99_ms": ms(percentile(model, 99)),
        "loop_lag_p50_ms": ms(percentile(lags, 50)),
        "loop_lag_p99_ms": ms(percentile(lags, 99)),
        "loop_lag_max_ms": ms(max(lags, default=None)),
        "cpu_s": round(marks["cpu1"] - marks["cpu0"], 2) if "cpu1" in marks else None,
        "server_cpu_s": (
            round(marks["server_cpu1"] - marks["server_cpu0"], 2)
            if "server_cpu1" in marks
            else None
        ),
        "missing": missing,
        "bad": bad,
        "replies_ok": bool(samples) and missing == 0 and bad == 0,
        **extra,
    }
    if repeated:
        result["requests_repeated"] = repeated
    if TRACE is not None:
        result.update(trace_summary(samples, rows, window))
    return result


#: consecutive segments of the added latency, by the trace points that bound them
#: (``started``, ``arrived`` and ``first`` are the server's: its handler began, the
#: request's body was in, the first token was written; the model's time is between the
#: last two)
SEGMENTS = (
    ("inbox_commit", "sent", "received"),
    ("to_step", "received", "step"),
    ("step_to_llm", "step", "llm"),
    ("client_build", "llm", "request"),
    ("to_server", "request", "started"),
    ("request_body", "started", "arrived"),
    ("from_server", "first", "delta"),
    ("to_sender", "delta", "first_fragment"),
)


def trace_summary(
    samples: list[Sample], rows: dict[str, dict[str, Any]], window: tuple[float, float]
) -> dict[str, Any]:
    assert TRACE is not None
    spans: dict[str, list[float]] = {name: [] for name, _, _ in SEGMENTS}
    shown_after_delta: list[float] = []
    for sample in samples:
        row = rows.get(sample.tag)
        points = TRACE.points.get(sample.tag, {})
        if row is None or sample.first is None or row["first"] is None:
            continue
        times = {
            **points,
            "sent": sample.sent,
            "started": row["started"],
            "arrived": row["arrived"],
            "first": row["first"],
            "first_fragment": sample.first,
        }
        for name, start, end in SEGMENTS:
            if start in times and end in times:
                spans[name].append(times[end] - times[start])
        if "shown" in points and "delta" in points:
            shown_after_delta.append(points["shown"] - points["delta"])
    result: dict[str, Any] = {
        "trace_p50_ms": {name: ms(percentile(v, 50)) for name, v in spans.items() if v},
        "trace_p99_ms": {name: ms(percentile(v, 99)) for name, v in spans.items() if v},
    }
    if shown_after_delta:
        # < 0: the step's commit before the stream is shown ended before the first token
        result["trace_shown_minus_delta_p99_ms"] = ms(percentile(shown_after_delta, 99))
    commits = [(ops, took) for at, ops, took in TRACE.commits if window[0] <= at < window[1]]
    if commits:
        result["trace_commits"] = len(commits)
        result["trace_commit_p50_ms"] = ms(percentile([took for _, took in commits], 50))
        result["trace_commit_p99_ms"] = ms(percentile([took for _, took in commits], 99))
        result["trace_commit_ops_p50"] = percentile([float(ops) for ops, _ in commits], 50)
    return result


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        sys.exit(__doc__)
    channels = int(args[0])
    seconds = float(args[1]) if len(args) > 1 else 30.0
    variant = args[2] if len(args) > 2 else "turbobot"
    if variant not in ("turbobot", "bare"):
        sys.exit(f"unknown variant {variant!r}: turbobot or bare")
    warmup = float(os.environ.get("BENCH_WARMUP", "10"))

    def stop(signum: int, _: Any) -> None:
        raise SystemExit(128 + signum)  # (unwinds: the server and the files are removed)

    async def until_stopped() -> dict[str, Any]:
        # In the loop, SIGTERM cancels the run as Ctrl-C does (asyncio.run's own SIGINT
        # handling): the runtime, the store and the client are closed on the way out.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await measure(channels, seconds, warmup, root, Path(tmp), variant)

    signal.signal(signal.SIGTERM, stop)
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp, fake_model(Path(tmp)) as root:
        try:
            result = asyncio.run(until_stopped())
        except asyncio.CancelledError:
            raise SystemExit(128 + signal.SIGTERM) from None
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
