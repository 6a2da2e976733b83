"""Plots for the operator's page, as inline SVG written on the server.

Two shapes are needed, lines over time and labelled bars, and each is a few dozen
lines of SVG: a plotting library (matplotlib: tens of MB and a second of import per
process; pygal: styling through its own CSS and scripts) would cost more than it
saves. Every label goes through :func:`markupsafe.escape`: user ids and model names
are text from outside.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

__all__ = ["Series", "bars", "lines"]

WIDTH, HEIGHT = 720, 220
#: room for the axes' labels
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 40, 28
#: colours of successive series (distinguishable with the common colour blindnesses)
COLOURS = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9")


@dataclass(frozen=True, slots=True)
class Series:
    """One line: its label and its (x, y) points, x ascending."""

    label: str
    points: Sequence[tuple[float, float]]


def _ticks(low: float, high: float, count: int = 4) -> list[float]:
    """Round values spanning ``low``..``high`` for an axis."""
    if high <= low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def _top(high: float) -> float:
    """The axis' top: the first round value at or above ``high`` (1 for nothing)."""
    if high <= 0:
        return 1.0
    ticks = _ticks(0.0, high)
    step = ticks[1] - ticks[0] if len(ticks) > 1 else high
    return math.ceil(high / step) * step


def _number(value: float) -> str:
    if value and abs(value) < 0.01:
        return f"{value:.3g}"
    if abs(value) >= 10_000:
        return f"{value / 1000:,.0f}k"
    return f"{value:,.2f}".rstrip("0").rstrip(".") if value % 1 else f"{value:,.0f}"


def _time_label(epoch: float, span: float) -> str:
    layout = "%H:%M" if span <= 2 * 86400 else "%m-%d"
    return time.strftime(layout, time.gmtime(epoch))


def _frame(title: str, unit: str, body: list[str]) -> Markup:
    label = escape(title)
    return Markup(
        f'<svg class="plot" role="img" aria-label="{label}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg" '
        f'font-family="sans-serif" font-size="11"><title>{label}</title>'
        f'<text x="{LEFT}" y="14" font-weight="bold">{label}</text>'
        f'<text x="{WIDTH - RIGHT}" y="14" text-anchor="end" fill="#555">{escape(unit)}</text>'
        + "".join(body)
        + "</svg>"
    )


def _y_axis(low: float, high: float, scale_y: object, body: list[str]) -> None:
    assert callable(scale_y)
    for tick in _ticks(low, high):
        y = scale_y(tick)
        body.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_number(tick)}</text>'
        )


def lines(title: str, series: Sequence[Series], *, unit: str = "", empty: str = "") -> Markup:
    """Lines over time (x: epoch seconds, UTC labels), one per series, with a legend."""
    points = [p for s in series for p in s.points]
    if not points:
        return _frame(title, unit, [_nothing(empty)])
    x_low, x_high = min(p[0] for p in points), max(p[0] for p in points)
    y_high = _top(max(p[1] for p in points))
    x_span = (x_high - x_low) or 1.0
    inner_w, inner_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def scale_x(x: float) -> float:
        return LEFT + (x - x_low) / x_span * inner_w

    def scale_y(y: float) -> float:
        return TOP + inner_h - (y / y_high) * inner_h

    body: list[str] = []
    _y_axis(0.0, y_high, scale_y, body)
    for tick in _ticks(x_low, x_high, 6):
        x = scale_x(tick)
        body.append(
            f'<text x="{x:.1f}" y="{HEIGHT - 8}" text-anchor="middle">'
            f"{_time_label(tick, x_span)}</text>"
        )
    for i, one in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{scale_x(x):.1f},{scale_y(y):.1f}" for x, y in one.points)
        if len(one.points) == 1:
            x, y = one.points[0]
            body.append(
                f'<circle cx="{scale_x(x):.1f}" cy="{scale_y(y):.1f}" r="3" fill="{colour}"/>'
            )
        else:
            body.append(
                f'<polyline fill="none" stroke="{colour}" stroke-width="1.8" points="{path}"/>'
            )
        # the legend, in a row above the plot (wrapping after five)
        lx, ly = LEFT + (i % 5) * 130, 26 + (i // 5) * 12
        body.append(
            f'<rect x="{lx}" y="{ly - 9}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{lx + 14}" y="{ly}">{escape(one.label)}</text>'
        )
    return _frame(title, unit, body)


def bars(
    title: str, items: Sequence[tuple[str, float]], *, unit: str = "", empty: str = ""
) -> Markup:
    """Labelled vertical bars, in the order given (at most 40 shown)."""
    items = list(items)[:40]
    if not items:
        return _frame(title, unit, [_nothing(empty)])
    y_high = _top(max(v for _, v in items))
    inner_w, inner_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = min(inner_w / len(items), 80.0)

    def scale_y(y: float) -> float:
        return TOP + inner_h - (y / y_high) * inner_h

    body: list[str] = []
    _y_axis(0.0, y_high, scale_y, body)
    every = max(1, math.ceil(len(items) / 12))  # labels that fit
    for i, (label, value) in enumerate(items):
        x, top = LEFT + i * slot + slot * 0.15, scale_y(value)
        shown = escape(label if len(label) <= 14 else label[:13] + "\u2026")
        body.append(
            f'<rect x="{x:.1f}" y="{top:.1f}" width="{slot * 0.7:.1f}" '
            f'height="{TOP + inner_h - top:.1f}" fill="{COLOURS[0]}">'
            f"<title>{escape(label)}: {_number(value)}</title></rect>"
        )
        if i % every == 0:
            body.append(
                f'<text x="{x + slot * 0.35:.1f}" y="{HEIGHT - 8}" text-anchor="middle">'
                f"{shown}</text>"
            )
    return _frame(title, unit, body)


def _nothing(text: str) -> str:
    return (
        f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" fill="#777">'
        f"{escape(text or 'nothing yet')}</text>"
    )
