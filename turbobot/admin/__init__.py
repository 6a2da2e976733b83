"""The operator's page: conversations, usage and health of a bot, read from its store.

``turbobot admin`` serves it (Starlette, Jinja2 templates, plots drawn on the server
as SVG; no JavaScript and nothing fetched from elsewhere). It is read-only: the
database is opened read-only where the driver allows (SQLite ``mode=ro``; a
PostgreSQL session with read-only transactions). Every page needs the admin token
(``TURBOBOT_ADMIN_TOKEN``): given once on the login form, it is kept as a cookie
holding its end time signed with it (never the token itself; 12 hours), or sent as
``Authorization: Bearer <token>`` by scripts. See docs/architecture.md, "Operator's view".
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from turbobot.codec import writable_text
from turbobot.exceptions import ConfigurationError

__all__ = ["MIN_TOKEN_LENGTH", "TOKEN_VARIABLE", "create_app", "read_only_engine"]

TOKEN_VARIABLE = "TURBOBOT_ADMIN_TOKEN"
MIN_TOKEN_LENGTH = 16
COOKIE = "turbobot_admin"
#: how long a login lasts (the cookie carries its end, signed with the token)
SESSION_SECONDS = 12 * 3600
_HERE = Path(__file__).parent
#: headers of every answer: no scripts, no frames, nothing from elsewhere, no caching
_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def check_token(token: str | None) -> str:
    """The admin token, or a :class:`ConfigurationError` saying how to set one."""
    if not token:
        raise ConfigurationError(
            f"the admin page needs a token: set {TOKEN_VARIABLE} to a long random value, "
            "e.g. export TURBOBOT_ADMIN_TOKEN=$(python -c 'import secrets; "
            "print(secrets.token_urlsafe(24))')"
        )
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigurationError(
            f"{TOKEN_VARIABLE} is too short ({len(token)} characters): use at least "
            f"{MIN_TOKEN_LENGTH} random ones, e.g. python -c 'import secrets; "
            "print(secrets.token_urlsafe(24))'"
        )
    return token


def read_only_engine(url: str, *, must_exist: bool = True) -> Any:
    """An async engine on ``url`` that cannot write (where the driver allows).
    ``must_exist=False``: a SQLite file the bot beside is about to create."""
    from sqlalchemy import make_url
    from sqlalchemy.ext.asyncio import create_async_engine

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if not database or database == ":memory:":
            raise ConfigurationError("the admin page reads a SQLite file: give its URL")
        if must_exist and not Path(database).exists():
            raise ConfigurationError(
                f"no database at {database}: run the bot first (it creates it), or give "
                "the bot's URL with --database or TURBOBOT_DATABASE_URL"
            )
        uri = Path(database).resolve().as_uri() + "?mode=ro"
        return create_async_engine(parsed.set(database=uri, query={**parsed.query, "uri": "true"}))
    return create_async_engine(
        url,
        connect_args={"server_settings": {"default_transaction_read_only": "on"}},
        pool_size=4,
        max_overflow=2,
    )


def create_app(
    url: str,
    token: str,
    *,
    clock: Callable[[], float] = time.time,
    metrics: Callable[[], bytes] | None = None,
    must_exist: bool = True,
) -> Any:
    """The page's ASGI app on the database at ``url``.

    ``metrics``: when the page runs in the bot's process (``turbobot run
    --admin-port``), the Prometheus exposition, served at ``/metrics`` too.
    """
    try:
        from jinja2 import Environment, FileSystemLoader, select_autoescape
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import HTMLResponse, RedirectResponse, Response
        from starlette.routing import Mount, Route
        from starlette.staticfiles import StaticFiles
    except ImportError as exc:  # pragma: no cover - installed with turbobot[admin]
        raise ConfigurationError(
            f"the admin page needs {exc.name}: pip install 'turbobot[admin]'"
        ) from exc

    from turbobot.admin import plots
    from turbobot.admin.queries import PAGE, STATES, AdminData, Filters, per_worker

    check_token(token)

    def signed(expires: int) -> str:
        mac = hmac.new(token.encode(), f"turbobot admin {expires}".encode(), hashlib.sha256)
        return f"{expires}.{mac.hexdigest()}"

    def session_valid(cookie: str) -> bool:
        expires, _, _ = cookie.partition(".")
        if not expires.isascii() or not expires.isdigit() or int(expires) < clock():
            return False
        return hmac.compare_digest(cookie.encode(), signed(int(expires)).encode())

    engine = read_only_engine(url, must_exist=must_exist)
    data = AdminData(engine)
    env = Environment(
        loader=FileSystemLoader(_HERE / "templates"),
        autoescape=select_autoescape(default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["seconds"] = _seconds
    env.filters["number"] = _number
    env.globals["STATES"] = STATES

    def allowed(request: Request) -> bool:
        cookie = request.cookies.get(COOKIE, "")
        if cookie and session_valid(cookie):
            return True
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), token.encode()
        )

    def page(name: str, status: int = 200, **values: Any) -> Response:
        html = env.get_template(name).render(**values)
        return HTMLResponse(html, status_code=status, headers=_HEADERS)

    def guarded(
        handler: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if not allowed(request):
                return page("login.html", 401, failed=False, next=request.url.path)
            return await handler(request)

        return endpoint

    async def login(request: Request) -> Response:
        if request.method == "GET":
            return page("login.html", 401 if not allowed(request) else 200, failed=False)
        form = await request.form()
        given = str(form.get("token", ""))
        target = str(form.get("next", "/"))
        if not target.startswith("/") or target.startswith("//"):
            target = "/"  # (no redirects elsewhere)
        if not hmac.compare_digest(given.encode(), token.encode()):
            return page("login.html", 401, failed=True, next=target)
        response = RedirectResponse(target, status_code=303, headers=_HEADERS)
        response.set_cookie(
            COOKIE,
            signed(int(clock()) + SESSION_SECONDS),
            max_age=SESSION_SECONDS,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    async def logout(request: Request) -> Response:
        response = RedirectResponse("/login", status_code=303, headers=_HEADERS)
        response.delete_cookie(COOKIE)
        return response

    async def home(request: Request) -> Response:
        return RedirectResponse("/conversations", status_code=303, headers=_HEADERS)

    async def conversation_list(request: Request) -> Response:
        q = _Params(request)
        filters = Filters(
            platform=q.get("platform", "")[:32],
            state=q.get("state", "") if q.get("state", "") in STATES else "",
            user=q.get("user", "")[:128],
            text=q.get("q", "")[:200],
            before=q.get("before", "")[:120],
        )
        began = time.perf_counter()
        rows, after = await data.conversations(filters)
        platforms = await data.platforms()
        took = time.perf_counter() - began
        return page(
            "conversations.html",
            section="conversations",
            rows=rows,
            filters=filters,
            platforms=platforms,
            page_size=PAGE,
            next_page=("?" + urlencode(filters.query(before=after))) if after else None,
            first_page=("?" + urlencode(filters.query(before=""))) if filters.before else None,
            took=took,
        )

    async def conversation_page(request: Request) -> Response:
        found = await data.conversation(writable_text(request.path_params["id"])[:48])
        if found is None:
            return page("missing.html", 404, section="conversations")
        llm = sum(s["llm"] for s in found.steps)
        totals = {
            "prompt": sum(s["prompt_tokens"] or 0 for s in found.steps),
            "completion": sum(s["completion_tokens"] or 0 for s in found.steps),
            "generations": sum(s["generations"] for s in found.steps),
            "llm": llm,
        }
        timeline = plots.lines(
            "Reply latency per step",
            [
                plots.Series(
                    "first reply",
                    [
                        (s["at"], s["first_reply"])
                        for s in found.steps
                        if s["first_reply"] is not None
                    ],
                ),
                plots.Series(
                    "model", [(s["at"], s["llm"]) for s in found.steps if s["generations"]]
                ),
            ],
            unit="seconds",
            empty="no timed steps (recorded from migration 0005 on)",
        )
        return page(
            "conversation.html",
            section="conversations",
            c=found,
            totals=totals,
            timeline=timeline,
        )

    async def usage_page(request: Request) -> Response:
        days = _bounded(_Params(request).get("days"), 14, 1, 366)
        usage = await data.usage(days, clock())
        per_day = plots.bars(
            f"Tokens per day (last {days} days, UTC)",
            [(r["day"][5:], float(r["prompt"] + r["completion"])) for r in usage["per_day"]],
            unit="tokens",
            empty="no tokens used in this window",
        )
        per_user = plots.bars(
            "Tokens per user (top 20)",
            [
                (f"{r['platform']}:{r['user_id'] or '?'}", float(r["tokens"]))
                for r in usage["per_user"]
            ],
            unit="tokens",
            empty="no tokens used in this window",
        )
        per_model = plots.bars(
            "Tokens per model",
            [(r["model"] or "?", float(r["prompt"] + r["completion"])) for r in usage["per_model"]],
            unit="tokens",
            empty="no tokens used in this window",
        )
        return page(
            "usage.html",
            section="usage",
            usage=usage,
            days=days,
            plots=[per_day, per_user, per_model],
        )

    async def health_page(request: Request) -> Response:
        hours = _bounded(_Params(request).get("hours"), 6, 1, 24 * 14)
        began = time.perf_counter()
        health = await data.health(hours, clock())
        took = time.perf_counter() - began
        minutes = health["bucket"] / 60
        throughput = plots.lines(
            f"Messages answered per minute (last {hours} h, UTC)",
            [
                plots.Series(
                    "messages", [(r["at"], r["steps"] / minutes) for r in health["per_slot"]]
                )
            ],
            unit="per minute",
            empty="no messages in this window",
        )
        latency = plots.lines(
            "Reply latency: message in \u2192 first reply byte",
            [
                plots.Series(name, [(r["at"], r[key]) for r in health["latency"]])
                for name, key in (
                    ("p50", "p50"),
                    ("p90", "p90"),
                    ("p99", "p99"),
                    ("model p50", "llm_p50"),
                    ("added p50", "added_p50"),
                )
            ],
            unit="seconds",
            empty="no replies in this window",
        )
        kinds = plots.bars(
            "Errors by kind",
            [(r["kind"], float(r["count"])) for r in health["errors"]],
            unit="errors",
            empty="no errors in this window",
        )
        live = per_worker(health["samples"], "live")
        queued = per_worker(health["samples"], "queued")
        gauges = plots.lines(
            "Conversations in RAM and messages queued, per worker",
            [plots.Series(f"live {w}", points) for w, points in live.items()]
            + [plots.Series(f"queued {w}", points) for w, points in queued.items()],
            unit="count",
            empty="no samples yet (a running bot writes one a minute)",
        )
        evicted = plots.lines(
            "Evictions and replays since each worker started",
            [
                plots.Series(f"evicted {w}", points)
                for w, points in per_worker(health["samples"], "evictions").items()
            ]
            + [
                plots.Series(f"replayed {w}", points)
                for w, points in per_worker(health["samples"], "replays").items()
            ],
            unit="count",
            empty="no samples yet",
        )
        last = {}
        for sample in health["samples"]:
            last[sample["worker"]] = sample
        return page(
            "health.html",
            section="health",
            health=health,
            hours=hours,
            plots=[throughput, latency, kinds, gauges, evicted],
            workers=list(last.values()),
            took=took,
        )

    async def metrics_page(request: Request) -> Response:
        assert metrics is not None
        return Response(metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    routes = [
        Route("/", guarded(home)),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/conversations", guarded(conversation_list)),
        Route("/conversations/{id}", guarded(conversation_page)),
        Route("/usage", guarded(usage_page)),
        Route("/health", guarded(health_page)),
        Mount("/static", StaticFiles(directory=_HERE / "static"), name="static"),
    ]
    if metrics is not None:
        routes.append(Route("/metrics", guarded(metrics_page)))

    async def lifespan(app: Any) -> Any:
        yield
        await engine.dispose()

    from contextlib import asynccontextmanager

    app = Starlette(routes=routes, lifespan=asynccontextmanager(lifespan))
    app.state.engine = engine  # (disposed when the app's lifespan ends, else by its owner)
    return app


class _Params:
    """A request's query parameters as a database takes them (no NUL, no lone
    surrogate: PostgreSQL refuses both)."""

    def __init__(self, request: Any) -> None:
        self._params = request.query_params

    def get(self, name: str, default: str = "") -> str:
        return writable_text(self._params.get(name, default)).replace("\ufffd", "")


def _bounded(text: str | None, default: int, low: int, high: int) -> int:
    try:
        value = int(text or default)
    except ValueError:
        return default
    return max(low, min(high, value))


def _when(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _seconds(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "\u2013"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    return f"{value:.2f} s"


def _number(value: float | int | None) -> str:
    return "\u2013" if value is None else f"{value:,.0f}"
