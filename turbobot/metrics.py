"""What a running bot measures: each step's timings (stored, for the operator's page)
and, when enabled, Prometheus metrics (docs/architecture.md, "Operator's view").

A step is timed by :class:`StepTimer`, which ``Conversations.advance`` puts in the
context variable :data:`current_step` while the step runs; the template's model calls
and the first reply of the step report to it from wherever they run (the generation
task copies the context). Outside a step (``run_chat`` on its own) nothing is timed.

:class:`Metrics` holds the Prometheus counters, gauges and histograms in a registry
of its own (so that several runtimes in one process, as in tests, do not collide);
``prometheus-client`` is imported only when metrics are enabled.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from turbobot.store import ErrorRecord, StepStats

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["Metrics", "StepTimer", "current_step", "error_detail", "message_arrived"]


@dataclass(slots=True)
class StepTimer:
    """The step being run in this context: its stats, the clock, the metrics."""

    stats: StepStats
    clock: Callable[[], float]
    metrics: Metrics | None = None

    def model_call(self, model: str, started: float, failed: bool = False) -> None:
        """A model call that began at ``started`` (this timer's clock) has ended."""
        seconds = max(0.0, self.clock() - started)
        self.stats.llm_seconds += seconds
        self.stats.model = model
        if self.metrics is not None:
            self.metrics.llm_seconds.labels(model).observe(seconds)
            if failed:
                self.metrics.llm_failures.labels(model).inc()

    def reply(self, at: float) -> None:
        """A reply of this step reached the platform; its first byte was handed to the
        adapter at ``at`` (the first one counts)."""
        if self.stats.first_reply_at is None:
            self.stats.first_reply_at = at


#: the step running in this context (see :class:`StepTimer`)
current_step: ContextVar[StepTimer | None] = ContextVar("turbobot_step", default=None)
#: when the message being handled arrived in this process (``None``: unknown, e.g. it
#: arrived before a restart or at another worker)
message_arrived: ContextVar[float | None] = ContextVar("turbobot_arrived", default=None)


def model_call_ended(model: str, started: float | None, failed: bool = False) -> None:
    timer = current_step.get()
    if timer is not None and started is not None:
        timer.model_call(model, started, failed)


def step_clock() -> float | None:
    """The running step's clock's time (``None``: no step)."""
    timer = current_step.get()
    return None if timer is None else timer.clock()


#: when a model call begins (the running step's clock)
model_call_started = step_clock


def error_detail(exc: BaseException) -> str:
    """One line for an operator: the exception's type and its message's first line
    (what turbobot logs too; exception messages carry no credentials)."""
    name = type(exc).__name__
    try:
        text = str(exc).strip().splitlines()
    except Exception:  # a broken __str__ must not break what records it
        return name
    first = text[0] if text else ""
    return f"{name}: {first}"[:300] if first else name


#: seconds: a reply's latency, a step, a model call (the model's dominate)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)


class Metrics:
    """Prometheus metrics of one runtime (``turbobot run --metrics-port``).

    The names and what they count are listed in the README ("Metrics"). Gauges are
    read when scraped: :meth:`watch` tells them where to look.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError as exc:  # pragma: no cover - installed with turbobot[admin]
            from turbobot.exceptions import ConfigurationError

            raise ConfigurationError(
                "metrics need prometheus-client: pip install 'turbobot[admin]'"
            ) from exc
        self.registry = r = registry if registry is not None else CollectorRegistry()
        latency: dict[str, Any] = {"buckets": _LATENCY_BUCKETS, "registry": r}
        self.messages_in = Counter(
            "turbobot_messages_received",
            "Messages accepted into the inbox",
            ["platform"],
            registry=r,
        )
        self.replies = Counter(
            "turbobot_replies_sent", "Replies the platform accepted", ["platform"], registry=r
        )
        self.steps = Counter(
            "turbobot_steps", "Steps run, by what began them", ["trigger"], registry=r
        )
        self.reply_latency = Histogram(
            "turbobot_reply_latency_seconds",
            "From a message's arrival to the first byte of its reply handed to the adapter",
            **latency,
        )
        self.step_seconds = Histogram("turbobot_step_seconds", "A step, start to end", **latency)
        self.llm_seconds = Histogram(
            "turbobot_llm_request_seconds", "A model call", ["model"], **latency
        )
        self.llm_failures = Counter(
            "turbobot_llm_request_failures", "Model calls that failed", ["model"], registry=r
        )
        self.tokens = Counter(
            "turbobot_llm_tokens", "Tokens the model reported", ["model", "kind"], registry=r
        )
        self.errors = Counter("turbobot_errors", "Errors, by kind", ["kind"], registry=r)
        self.evictions = Counter("turbobot_evictions", "Conversations evicted from RAM", registry=r)
        self.replays = Counter(
            "turbobot_replays", "Conversations rebuilt from their journal", registry=r
        )
        self.commit_batch = Histogram(
            "turbobot_commit_batch_operations",
            "Operations per store commit",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.commit_seconds = Histogram("turbobot_commit_seconds", "A store commit", **latency)
        self.queued = Gauge(
            "turbobot_inbox_queued",
            "Messages received and not yet handled (this process)",
            registry=r,
        )
        self.live = Gauge("turbobot_live_conversations", "Conversations held in RAM", registry=r)

    def watch(self, queued: Callable[[], float], live: Callable[[], float]) -> None:
        """Read the gauges from these functions when scraped."""
        self.queued.set_function(queued)
        self.live.set_function(live)

    def step(self, stats: StepStats) -> None:
        self.steps.labels(stats.trigger).inc()
        self.step_seconds.observe(stats.duration)
        if stats.first_reply is not None:
            self.reply_latency.observe(stats.first_reply)
        model = stats.model or "unknown"
        if stats.prompt_tokens:
            self.tokens.labels(model, "prompt").inc(stats.prompt_tokens)
        if stats.completion_tokens:
            self.tokens.labels(model, "completion").inc(stats.completion_tokens)

    def error(self, error: ErrorRecord) -> None:
        self.errors.labels(error.kind).inc()

    def commit(self, operations: int, seconds: float) -> None:
        self.commit_batch.observe(operations)
        self.commit_seconds.observe(seconds)

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def value(self, name: str, **labels: Any) -> float:
        """One sample's value (0 if absent), e.g. for a test."""
        found = self.registry.get_sample_value(name, labels or None)
        return 0.0 if found is None else found
