"""Python functions described to the model as tools."""

from __future__ import annotations

import enum
from typing import Literal

import pytest

from turbobot import ToolError
from turbobot.llm.tools import call_tool, tool_schema


class Unit(enum.Enum):
    C = "celsius"
    F = "fahrenheit"


def weather(
    city: str,
    days: int = 1,
    unit: Unit = Unit.C,
    tags: list[str] | None = None,
    mode: Literal["short", "long"] = "short",
) -> str:
    """Forecast for a city.

    Args:
        city: the city name.
        days: how many days ahead.
    """
    return f"{city}:{days}:{unit}:{mode}"


def test_schema_from_hints_and_docstring() -> None:
    schema = tool_schema(weather)["function"]
    assert schema["name"] == "weather"
    assert schema["description"] == "Forecast for a city."
    props = schema["parameters"]["properties"]
    assert props["city"] == {"type": "string", "description": "the city name."}
    assert props["days"] == {"type": "integer", "description": "how many days ahead."}
    assert props["unit"] == {"type": "string", "enum": ["celsius", "fahrenheit"]}
    assert props["tags"] == {"type": "array", "items": {"type": "string"}}
    assert props["mode"] == {"enum": ["short", "long"]}
    assert schema["parameters"]["required"] == ["city"]


def test_missing_hint_is_a_clear_error() -> None:
    def bad(x):  # type: ignore[no-untyped-def]
        return x

    with pytest.raises(ToolError, match="parameter 'x' needs a type hint"):
        tool_schema(bad)


async def test_call_tool_reports_errors_as_text() -> None:
    async def add(a: int, b: int) -> int:
        return a + b

    assert await call_tool([add], "add", '{"a": 2, "b": 3}') == "5"
    assert "no tool named" in await call_tool([add], "mul", "{}")
    assert "not valid JSON" in await call_tool([add], "add", "{oops")
    assert "TypeError" in await call_tool([add], "add", '{"a": 1}')
