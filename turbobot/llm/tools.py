"""Python functions as model tools: the name, docstring and type hints become the schema."""

from __future__ import annotations

import enum
import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal, Union, get_args, get_origin

from turbobot.exceptions import ToolError

__all__ = ["call_tool", "tool_schema"]

_SCALARS: dict[type, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}
_ARG_LINE = re.compile(r"^\s{2,}(\w+)(?:\s*\([^)]*\))?:\s*(.+)$")


def _json_type(hint: Any, where: str) -> dict[str, Any]:
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return {"type": "string", "enum": [str(m.value) for m in hint]}
    origin = get_origin(hint)
    args = get_args(hint)
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (list, tuple, Sequence, set, frozenset):
        item = args[0] if args else str
        return {"type": "array", "items": _json_type(item, where)}
    if origin is dict:
        return {"type": "object"}
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _json_type(options[0], where)
        return {"anyOf": [_json_type(a, where) for a in options]}
    if hint is Any:
        return {}
    raise ToolError(
        f"tool parameter {where} has type {hint!r}, which cannot be described to the model; "
        "use str, int, float, bool, Literal, an Enum, list[...] or dict"
    )


def _doc_parts(fn: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    doc = inspect.getdoc(fn) or ""
    summary = doc.split("\n\n", 1)[0].strip()
    params: dict[str, str] = {}
    in_args = False
    for line in doc.splitlines():
        if line.strip() in ("Args:", "Arguments:", "Parameters:"):
            in_args = True
            continue
        if in_args:
            match = _ARG_LINE.match(line)
            if match:
                params[match.group(1)] = match.group(2).strip()
            elif line.strip() and not line.startswith(" "):
                in_args = False
    return summary, params


def tool_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """The OpenAI ``tools`` entry describing ``fn``.

    Raises:
        ToolError: ``fn`` has a parameter without a type hint or with an unsupported type.
    """
    name = getattr(fn, "__name__", None)
    if not name or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise ToolError(f"tool {fn!r} needs a name of letters, digits, _ or - (at most 64)")
    hints = typing.get_type_hints(fn)
    summary, param_docs = _doc_parts(fn)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.name not in hints:
            raise ToolError(f"tool {name}() parameter {param.name!r} needs a type hint")
        schema = _json_type(hints[param.name], f"{name}({param.name})")
        if param.name in param_docs:
            schema["description"] = param_docs[param.name]
        properties[param.name] = schema
        if param.default is param.empty:
            required.append(param.name)
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": summary,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


async def call_tool(tools: Sequence[Callable[..., Any]], name: str, arguments: str) -> str:
    """Run the tool the model asked for and return its result as text for the model.

    Errors (unknown tool, bad JSON, an exception in the tool) are returned as text so
    the model can recover; they are not raised into the template.
    """
    by_name = {getattr(t, "__name__", ""): t for t in tools}
    fn = by_name.get(name)
    if fn is None:
        return f"error: there is no tool named {name!r}; available: {sorted(by_name)}"
    try:
        kwargs = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError as exc:
        return f"error: the arguments are not valid JSON ({exc.msg})"
    if not isinstance(kwargs, dict):
        return "error: the arguments must be a JSON object"
    try:
        result = fn(**kwargs)
        if inspect.isawaitable(result):
            result = await result
    except Exception as exc:  # the model gets the failure and can try again
        return f"error: {type(exc).__name__}: {exc}"
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(result)
