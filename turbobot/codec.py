"""How values become storable text, the same way for every store.

Every store writes text columns and JSON columns (see docs/architecture.md, "Storage
encoding"). Two kinds of value cannot be written as they are:

- text that is not valid UTF-8 once encoded: lone surrogates (``"\\ud800"``, which
  Python's JSON decoder and a console with ``surrogateescape`` both produce), and NUL,
  which PostgreSQL's ``text`` refuses;
- values JSON cannot carry back unchanged: a ``datetime``, a ``set``, a ``tuple``
  (back as a list), ``NaN`` (never equal to itself), dicts with non-string keys.

``to_json`` writes any JSON value losslessly as valid, NUL-free UTF-8 (lone surrogates
become ``\\udXXX`` escapes, which decode back to the same string); ``writable_text``
makes text for a plain text column (a transcript line, a reply), replacing what
cannot be stored with U+FFFD; ``json_problem`` says why a value would not come back
unchanged, so that a template's ``Step`` result is refused where it is produced.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

__all__ = [
    "REPLACEMENT",
    "count",
    "from_json",
    "json_problem",
    "round_trip",
    "to_json",
    "unwritable",
    "writable_text",
]

#: what replaces a character that cannot be stored or sent
REPLACEMENT = "\ufffd"

_UNWRITABLE = re.compile("[\x00\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")

_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_escaped = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode
#: the standard library's: orjson reads integers beyond 64 bits as floats
from_json = json.loads


def to_json(value: Any) -> str:
    """Compact JSON of ``value`` that every store can write, and that loads back equal.

    Non-ASCII text stays as it is (smaller than escapes); only when the output holds
    a lone surrogate is everything escaped. NUL is always escaped by JSON itself.
    """
    text = _compact(value)
    if _SURROGATE.search(text) is not None:
        return _escaped(value)
    return text


def round_trip(value: Any) -> Any:
    """``value`` as a store gives it back: ``from_json(to_json(value))``, faster.

    orjson when it takes the value (ten times faster; the values it writes differently,
    NaN and integers beyond 64 bits, are refused before they reach a journal or make it
    raise), the standard library otherwise.
    """
    try:
        return orjson.loads(orjson.dumps(value))
    except (TypeError, ValueError):
        return from_json(to_json(value))


def unwritable(text: str) -> bool:
    """Whether ``text`` holds a character a text column cannot store (NUL, lone surrogate)."""
    return _UNWRITABLE.search(text) is not None


def writable_text(text: str) -> str:
    """``text`` with NUL and lone surrogates replaced by U+FFFD (unchanged if it has none)."""
    if _UNWRITABLE.search(text) is None:
        return text
    # A valid pair of surrogates (from a JSON escape) is one character: join it first.
    joined = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return _UNWRITABLE.sub(REPLACEMENT, joined)


#: the range of an integer column (a token count); 32 bits, as in the SQL schema
_COUNT = range(0, 2**31)


def count(value: int | None) -> int | None:
    """``value`` if it fits a count column, else ``None`` (a server's nonsense is not fatal)."""
    return value if value is None or (type(value) is int and value in _COUNT) else None


def json_problem(value: Any, _depth: int = 0) -> str | None:
    """Why ``value`` would not come back unchanged from JSON, or ``None`` if it would."""
    if _depth > 100:
        return "it is nested more than 100 levels deep"
    if value is None or isinstance(value, (bool, int, str)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{value!r} is not a finite number"
    if isinstance(value, list):
        for item in value:
            problem = json_problem(item, _depth + 1)
            if problem is not None:
                return problem
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"the dict key {key!r} is not a str (JSON keys are strings)"
            problem = json_problem(item, _depth + 1)
            if problem is not None:
                return problem
        return None
    if isinstance(value, tuple):
        return "a tuple would come back as a list: return a list"
    return f"a {type(value).__name__} is not a JSON value"
