"""An assistant with real local tools: safe arithmetic, the date and time, and dice."""

from __future__ import annotations

import ast
import datetime
import operator
import random
from collections.abc import AsyncGenerator, Callable
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from turbobot import (
    Generate,
    GetUserInput,
    LLMCapabilityError,
    Result,
    Step,
    System,
    User,
    turbo,
)

NEEDS_TOOLS = (
    "I need a model that can call tools for that (an OpenAI-compatible one: set "
    "OPENAI_API_KEY, or OPENAI_BASE_URL); the offline model cannot."
)

_OPERATORS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
#: bounds that keep one expression cheap to evaluate
MAX_EXPRESSION = 200
MAX_EXPONENT = 100
MAX_MAGNITUDE = 10**100


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        if isinstance(node.value, bool):
            raise ValueError("only numbers, + - * / // % ** and parentheses are allowed")
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.operand))  # type: ignore[no-any-return]
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponents above {MAX_EXPONENT} are not allowed")
        result = _OPERATORS[type(node.op)](left, right)
        if isinstance(result, complex) or abs(result) > MAX_MAGNITUDE:
            raise ValueError("the result is too large")
        return result  # type: ignore[no-any-return]
    raise ValueError("only numbers, + - * / // % ** and parentheses are allowed")


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression exactly, e.g. (17 * 23) + 4 ** 2.

    Args:
        expression: numbers, + - * / // % ** and parentheses only.
    """
    if len(expression) > MAX_EXPRESSION:
        return f"error: expressions are limited to {MAX_EXPRESSION} characters"
    try:
        tree = ast.parse(expression.strip(), mode="eval")
        return str(_evaluate(tree.body))
    except ZeroDivisionError:
        return "error: division by zero"
    except (SyntaxError, ValueError, TypeError, OverflowError) as exc:
        return f"error: {exc}"


def current_time(timezone: str = "UTC") -> str:
    """The current date and time in a time zone.

    Args:
        timezone: an IANA time zone name, e.g. Europe/Paris.
    """
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        return f"error: unknown time zone {timezone!r}"
    return datetime.datetime.now(zone).strftime("%A %d %B %Y, %H:%M %Z")


def roll_dice(count: int = 1, sides: int = 6) -> str:
    """Roll dice and give each result and the total.

    Args:
        count: how many dice (1-20).
        sides: sides per die (2-1000).
    """
    if not 1 <= count <= 20 or not 2 <= sides <= 1000:
        return "error: 1-20 dice of 2-1000 sides"
    rolls = [random.randint(1, sides) for _ in range(count)]
    return f"rolls {rolls}, total {sum(rolls)}"


def today() -> str:
    return datetime.date.today().isoformat()


@turbo(temperature=0.0)
async def toolsmith() -> AsyncGenerator[Any, Any]:
    """Ask me to calculate, to tell the time anywhere, or to roll dice."""
    # Steps run once and are journaled: a replay after a restart sees the same date,
    # as tool results (also journaled) stay the same rolls and times.
    date = yield Step(today)
    yield System(
        f"You are a helpful assistant. Today is {date}. Use the calculate tool for any "
        "arithmetic, current_time for the time, and roll_dice for dice; never guess."
    )
    while True:
        text = yield GetUserInput()
        yield User(text)
        try:
            yield Generate(tools=[calculate, current_time, roll_dice])
        except LLMCapabilityError:
            yield Result(NEEDS_TOOLS)


bot = toolsmith
