"""Model output (Markdown) as plain text plus formatting entities, and splitting it.

Platforms that take formatting as *entities* over plain text (Telegram) cannot reject
a message because of stray ``<`` or ``*`` in model output: the text is sent as it
reads and only well-formed Markdown becomes bold, code, links. Long replies are
split where a reader expects it (paragraph, line, word), never inside a word when
it can be helped, and a code block cut in two stays a code block in both parts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

__all__ = ["Entity", "FormattedText", "parse_markdown", "split_formatted", "utf16_len"]


@dataclass(frozen=True, slots=True)
class Entity:
    """Formatting over ``text[offset:offset + length]`` (Python string indices)."""

    kind: str  # bold, italic, strikethrough, code, pre, text_link
    offset: int
    length: int
    url: str | None = None
    language: str | None = None


@dataclass(frozen=True, slots=True)
class FormattedText:
    text: str
    entities: tuple[Entity, ...] = ()


def utf16_len(text: str) -> int:
    """Length in UTF-16 code units, the unit of Telegram's offsets and limits."""
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


_FENCE = re.compile(r"^```[ \t]*([\w+#.-]*)[ \t]*\n(.*?)(?:\n```[ \t]*$|\Z)", re.M | re.S)

_INLINE = re.compile(
    r"(?P<heading>^\#{1,6}[ \t]+(?P<heading_body>[^\n]+))"
    r"|(?P<code>`(?P<code_body>[^`\n]+)`)"
    r"|(?P<link>\[(?P<link_body>[^\]\n]+)\]\((?P<link_url>https?://(?:[^\s()]|\([^\s()]*\))+)\))"
    r"|(?P<url>https?://\S+)"
    r"|(?P<bold>\*\*(?P<bold_body>(?!\s)[^\n]+?(?<!\s))\*\*)"
    r"|(?P<strike>~~(?P<strike_body>(?!\s)[^\n]+?(?<!\s))~~)"
    r"|(?P<italic>(?<![\w*])\*(?P<italic_body>(?![\s*])[^\n]*?(?<![\s*]))\*(?![\w*]))"
    r"|(?P<italic2>(?<![\w/\\])_(?P<italic2_body>(?![\s_])[^\n]*?(?<![\s_]))_(?![\w/\\]))",
    re.M,
)
_KINDS = {
    "heading": "bold",
    "bold": "bold",
    "strike": "strikethrough",
    "italic": "italic",
    "italic2": "italic",
}


def parse_markdown(source: str) -> FormattedText:
    """Plain text and entities for the Markdown a model writes.

    Handles fenced code blocks (also one left open at the end), inline code, links,
    bold (``**``), italic, strikethrough and headings (as bold). ``__x__`` is left
    alone (it is usually a Python name). Anything else, including
    malformed markup, stays as it was written.
    """
    out: list[str] = []
    entities: list[Entity] = []
    length = 0
    position = 0
    for fence in _FENCE.finditer(source):
        length = _inline(source[position : fence.start()], out, entities, length)
        body = fence.group(2)
        if body:
            language = fence.group(1) or None
            entities.append(Entity("pre", length, len(body), language=language))
            out.append(body)
            length += len(body)
        position = fence.end()
    _inline(source[position:], out, entities, length)
    entities.sort(key=lambda e: (e.offset, -e.length))
    return FormattedText("".join(out), tuple(entities))


def _inline(source: str, out: list[str], entities: list[Entity], length: int) -> int:
    """Append ``source`` with its inline markup turned into entities; the new length."""
    position = 0
    for match in _INLINE.finditer(source):
        kind = match.lastgroup
        assert kind is not None
        plain = source[position : match.start()]
        out.append(plain)
        length += len(plain)
        start = length
        if kind == "url":  # a bare URL is text: nothing inside it is markup
            out.append(match.group())
            length += len(match.group())
        elif kind == "code":
            body = match.group("code_body")
            out.append(body)
            length += len(body)
            entities.append(Entity("code", start, len(body)))
        else:
            body = match.group(f"{kind}_body")
            length = _inline(body, out, entities, length)
            if kind == "link":
                entities.append(
                    Entity("text_link", start, length - start, url=match.group("link_url"))
                )
            else:
                entities.append(Entity(_KINDS[kind], start, length - start))
        position = match.end()
    rest = source[position:]
    out.append(rest)
    return length + len(rest)


def split_formatted(
    formatted: FormattedText, limit: int, *, measure: Callable[[str], int] = len
) -> list[FormattedText]:
    """Cut ``formatted`` into parts of at most ``limit`` (as ``measure`` counts).

    Cuts at the last paragraph break, else line break, else space that fits, outside
    code blocks when possible; a word longer than ``limit`` is cut where it must be.
    Entities are clipped to each part, so a code block cut in two is code in both.
    Parts that would be only whitespace are left out.
    """
    if limit < 1:
        raise ValueError("limit must be positive")
    text = formatted.text
    parts: list[FormattedText] = []
    start = 0
    while start < len(text):
        end = _fit(text, start, limit, measure)
        if end < len(text):
            cut, resume = _boundary(text, start, end, formatted.entities)
        else:
            cut, resume = end, end
        chunk = text[start:cut]
        if chunk.strip():
            parts.append(FormattedText(chunk, _clip(formatted.entities, start, cut)))
        start = resume
    return parts


def _fit(text: str, start: int, limit: int, measure: Callable[[str], int]) -> int:
    """The largest end such that ``measure(text[start:end]) <= limit`` (at least +1)."""
    end = min(len(text), start + limit)
    if measure is len:
        return end
    while end > start + 1 and (over := measure(text[start:end]) - limit) > 0:
        end -= max(1, over // 2)
    return max(end, start + 1)


def _boundary(text: str, start: int, end: int, entities: tuple[Entity, ...]) -> tuple[int, int]:
    """Where to end this part and where the next begins, searching ``text[start:end]``."""
    blocks = [(e.offset, e.offset + e.length) for e in entities if e.kind == "pre"]

    def inside(index: int) -> bool:
        return any(lo < index < hi for lo, hi in blocks)

    minimum = start + (end - start) // 4  # no tiny parts just to find a nicer cut
    for outside_only in (True, False):
        for separator in ("\n\n", "\n", " "):
            index = text.rfind(separator, minimum, end)
            while index > start:
                if not outside_only or not inside(index):
                    return index, index + len(separator)
                index = text.rfind(separator, minimum, index)
    return end, end


def _clip(entities: tuple[Entity, ...], start: int, end: int) -> tuple[Entity, ...]:
    clipped = []
    for entity in entities:
        lo = max(entity.offset, start)
        hi = min(entity.offset + entity.length, end)
        if hi > lo:
            clipped.append(replace(entity, offset=lo - start, length=hi - lo))
    return tuple(clipped)
