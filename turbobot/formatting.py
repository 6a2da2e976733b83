"""Model output (Markdown) as plain text plus formatting entities, and splitting it.

Platforms that take formatting as *entities* over plain text (Telegram) cannot reject
a message because of stray ``<`` or ``*`` in model output: the text is sent as it
reads and only well-formed Markdown becomes bold, code, links. Long replies are
split where a reader expects it (paragraph, line, word), never inside a word when
it can be helped, and a code block cut in two stays a code block in both parts.

Platforms that render Markdown themselves (Discord) take the source as it is written:
:func:`split_markdown` cuts it the same way, closing and reopening code fences.
"""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

__all__ = [
    "MIN_MARKDOWN_LIMIT",
    "Entity",
    "FormattedText",
    "parse_markdown",
    "split_formatted",
    "split_markdown",
    "utf16_len",
]


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


# --- Markdown as it is written (Discord) ---------------------------------------------

#: The smallest ``limit`` :func:`split_markdown` takes: a part that continues a code
#: block must hold the reopening fence (up to 24 characters), some code and the
#: closing fence.
MIN_MARKDOWN_LIMIT = 32

_CLOSE = "\n```"
_LANGUAGE = re.compile(r"([A-Za-z0-9_+#.\-]{0,20})\n")
#: whitespace a part may be cut at: any but the no-break spaces
_NO_BREAK = "\xa0\u2007\u202f"
_LINE_RUN = re.compile(rf"\n[^\S{_NO_BREAK}]*")
_SPACE_RUN = re.compile(rf"[^\S\n{_NO_BREAK}]+")
_SPACES = re.compile(" +")
_BREAK = re.compile(rf"[^\S{_NO_BREAK}]")
# every branch begins with a literal character, so that re skips plain text quickly
_MARKUP = re.compile(
    r"\n[^\S\n]*\n"  # a paragraph break
    r"|``*"
    r"|\[[^\[\]\n]*\]\([^\s()\[\]`]*\)"  # a masked link
    r"|\*\**|__*|~~|\|\|"
)
#: breakable whitespace other than space and line break (tabs, ideographic spaces, ...)
_OTHER_SPACE = re.compile(rf"[^\S \n{_NO_BREAK}]")
# Where a cut goes, best first: the rightmost cut of the best rank that fits wins.
_PARA, _LINE, _CODE_PARA, _CODE_LINE, _SPACE, _MARKUP_LINE, _MARKUP_SPACE, _CODE_SPACE = range(8)
_IN_CODE = frozenset({_CODE_PARA, _CODE_LINE, _CODE_SPACE})
_SENTENCE_ENDS = ("。！？", "、，；：")  # CJK text has no spaces: cut after these first
_CLOSING = "」』）】〕’”"


def split_markdown(source: str, limit: int) -> list[str]:
    """Cut Markdown ``source`` into messages of at most ``limit`` characters.

    For platforms that render Markdown themselves (Discord): the parts are the source
    as written, cut where a reader expects it: at the last paragraph break that fits,
    else line break, else space. A cut goes inside a fenced code block, or inside an
    inline code span, ``**bold**``, ``*italic*``, ``__underline__``, ``~~strike~~``,
    ``||spoiler||`` run or ``[masked](link)``, only when no cut outside one fits, and
    into a word only when the word alone is longer than ``limit`` (then after CJK
    punctuation if there is some, never inside an emoji sequence or before a
    combining mark). Line markup (``#`` headings, ``-#`` subtext, ``>`` quotes, lists)
    is per line, so a line break keeps it.

    A code block cut in two is closed with ```` ``` ```` at the end of one part and
    reopened with ```` ```lang ```` at the start of the next, so both render as code
    (the added fences count toward ``limit``); a block left open at the end of the
    source stays open. Parts neither begin nor end with the whitespace they were cut at
    (code keeps its indentation), parts of only whitespace are left out, and joined
    back, less the added fences, they hold every other character of ``source`` in
    order (whitespace may go: where parts meet, and before a block's closing fence
    when only it stands between the code and that fence).

    ``limit`` counts code points (Python ``len``), as Discord does: its API is Python
    and counts code points, so "😀" is one of its 2,000 characters, not two as in
    Telegram's UTF-16 (discord/discord-api-docs#1315). Text that pings, ``@everyone``,
    ``@here``, ``<@123>``, ``<@&123>``, is left as written: whether it pings is the
    request's ``allowed_mentions``, which the Discord adapter sets to none for the
    client and for every send and edit. Mangling the text as well (a zero-width space
    after ``@``) would turn mentions the bot quotes into garbled ids, change code
    samples and e-mail addresses, and still not stop a ping that ``allowed_mentions``
    lets through under another spelling.

    Raises ValueError if ``limit`` is less than :data:`MIN_MARKDOWN_LIMIT`. Linear in
    the length of ``source``, apart from a logarithmic factor.
    """
    if limit < MIN_MARKDOWN_LIMIT:
        raise ValueError(f"limit must be at least {MIN_MARKDOWN_LIMIT}, not {limit}")
    layout = _Layout(source)
    end = len(source)
    while end and _breakable(source[end - 1]):
        end -= 1
    parts: list[str] = []
    position = 0
    while position < end:
        fence = layout.fence_at(position)
        if fence is not None and fence.body <= position < fence.close:
            prefix = fence.reopen  # this part continues a code block
        else:
            prefix = ""
            while position < end and source[position].isspace():
                position += 1  # no-break spaces too: a part does not begin with them
        budget = limit - len(prefix)
        if end - position <= budget:
            if rest := source[position:end].rstrip():
                parts.append(prefix + rest)
            break
        cut, resume, in_code = layout.cut(position, position + budget, end, limit)
        chunk = source[position:cut].rstrip()
        if chunk.strip():
            parts.append(prefix + chunk + (_CLOSE if in_code else ""))
        position = resume
    return parts


def _breakable(char: str) -> bool:
    return char.isspace() and char not in _NO_BREAK


@dataclass(frozen=True, slots=True)
class _Fence:
    """A fenced code block: ```` ```lang ```` at ``start``, code from ``body``."""

    start: int
    body: int
    last: int  # the code's last non-whitespace character (body - 1 if none)
    close: int  # the closing ```, or the end of the source if the block is left open
    end: int
    reopen: str  # how a part that continues the block begins


class _Layout:
    """Where ``source`` has code blocks and inline markup, and where it may be cut."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.fences = _fences(source)
        self.fence_starts = [fence.start for fence in self.fences]
        self.markup_starts, self.markup_ends = _markup(source, self.fences)
        self.plain_spaces = _OTHER_SPACE.search(source) is None
        # rank -> where its cuts are (sorted) and where the next part begins after each
        self.cuts: list[list[int]] = [[] for _ in range(8)]
        self.resumes: list[list[int]] = [[] for _ in range(8)]
        for match in _LINE_RUN.finditer(source):
            start, stop = match.span()
            while start and _breakable(source[start - 1]):
                start -= 1
            classified = self.classify(start, stop, source.count("\n", start, stop))
            if classified is not None:
                rank, resume = classified
                self.cuts[rank].append(start)
                self.resumes[rank].append(resume)

    def fence_at(self, index: int) -> _Fence | None:
        k = bisect_right(self.fence_starts, index) - 1
        if k >= 0 and index < self.fences[k].end:
            return self.fences[k]
        return None

    def in_markup(self, index: int) -> bool:
        k = bisect_right(self.markup_starts, index) - 1
        return k >= 0 and index < self.markup_ends[k]

    def classify(self, start: int, stop: int, lines: int) -> tuple[int, int] | None:
        """The rank of a cut at the whitespace ``source[start:stop]``, and where to resume."""
        fence = self.fence_at(start)
        if fence is not None:
            # only between code and code: never in the ```lang line nor before the close
            if not fence.body < start < fence.last:
                return None
            if lines:
                resume = self.source.rfind("\n", start, stop) + 1  # keep the indentation
                return (_CODE_PARA if lines > 1 else _CODE_LINE), resume
            return _CODE_SPACE, stop
        if self.in_markup(start):
            return (_MARKUP_LINE if lines else _MARKUP_SPACE), stop
        return (_PARA if lines > 1 else _LINE if lines else _SPACE), stop

    def cut(self, position: int, stop: int, end: int, limit: int) -> tuple[int, int, bool]:
        """Where the part from ``position`` ends (at most ``stop``), where the next begins,
        and whether the part ends inside a code block."""
        fence = self.fence_at(stop)
        if fence is not None and fence.start < stop and fence.close < len(self.source):
            code_end = max(fence.last + 1, fence.body)
            if position < code_end <= stop - len(_CLOSE):
                # only whitespace before the closing ``` is past ``stop``: end the part
                # with the block, that whitespace left out
                return code_end, fence.end, True
        minimum = position + max(1, (stop - position) // 4)  # no tiny parts for a nicer cut
        for rank in (_PARA, _LINE, _CODE_PARA, _CODE_LINE):
            found = self._rightmost(rank, minimum, stop)
            if found is not None:
                return found
        markup_space = code_space = None
        for start, after in self._spaces(minimum, stop):
            classified = self.classify(start, after, 0)
            if classified is None:
                continue
            rank, resume = classified
            if rank == _SPACE:
                return start, resume, False
            if rank == _MARKUP_SPACE and markup_space is None:
                markup_space = start, resume, False
            if rank == _CODE_SPACE and code_space is None and start <= stop - len(_CLOSE):
                code_space = start, resume, True
        # a short part beats a cut into markup or into a line of code
        for rank in (_PARA, _LINE, _CODE_PARA, _CODE_LINE):
            found = self._rightmost(rank, position + 1, minimum - 1)
            if found is not None:
                return found
        for start, after in self._spaces(position + 1, minimum - 1):
            if self.classify(start, after, 0) == (_SPACE, after):
                return start, after, False
        found = self._rightmost(_MARKUP_LINE, minimum, stop) or markup_space or code_space
        if found is not None:
            return found
        return self._inside_word(position, minimum, stop, end, limit)

    def _rightmost(self, rank: int, low: int, high: int) -> tuple[int, int, bool] | None:
        in_code = rank in _IN_CODE
        cuts = self.cuts[rank]
        k = bisect_right(cuts, high - len(_CLOSE) if in_code else high) - 1
        if k >= 0 and cuts[k] >= low:
            return cuts[k], self.resumes[rank][k], in_code
        return None

    def _spaces(self, low: int, high: int) -> Iterator[tuple[int, int]]:
        """Runs of spaces (no line break) that start in ``[low, high]``, right to left."""
        source = self.source
        if not self.plain_spaces:
            yield from reversed(self._other_spaces(low, high))
            return
        size = len(source)
        before = high + 1
        while (index := source.rfind(" ", low, before)) >= 0:
            start = index
            while start > low and source[start - 1] == " ":
                start -= 1
            if not start or source[start - 1] == " ":
                return  # the run begins before ``low``
            run = _SPACES.match(source, index)
            stop = run.end() if run else index + 1
            before = start
            if source[start - 1] != "\n" and (stop == size or source[stop] != "\n"):
                yield start, stop

    def _other_spaces(self, low: int, high: int) -> list[tuple[int, int]]:
        source = self.source
        runs = []
        for match in _SPACE_RUN.finditer(source, low, high + 1):
            start, stop = match.span()
            if not start or _breakable(source[start - 1]):
                continue  # the tail of a longer run
            if stop == high + 1 and (more := _SPACE_RUN.match(source, stop)):
                stop = more.end()
            if stop < len(source) and _breakable(source[stop]):
                continue  # part of a line break
            runs.append((start, stop))
        return runs

    def _inside_word(
        self, position: int, minimum: int, stop: int, end: int, limit: int
    ) -> tuple[int, int, bool]:
        """No cut fits in ``[minimum, stop]``, nor a clean one before: end the part at
        the last cut into markup or code, before the word that runs past ``stop``, if
        that word fits in a part of its own; else cut the word."""
        earlier = []
        if found := self._rightmost(_MARKUP_LINE, position + 1, minimum - 1):
            earlier.append(found)
        for start, after in self._spaces(position + 1, minimum - 1):
            if classified := self.classify(start, after, 0):
                earlier.append((start, classified[1], classified[0] in _IN_CODE))
                break  # the rightmost
        if earlier:
            start, resume, in_code = best = max(earlier)
            fence = self.fence_at(start) if in_code else None
            room = resume + limit - (len(fence.reopen) + len(_CLOSE) if fence else 0)
            if end <= room or _BREAK.search(self.source, stop, room + 1):
                return best
        return self._hard_cut(position, minimum, stop)

    def _hard_cut(self, position: int, minimum: int, stop: int) -> tuple[int, int, bool]:
        source = self.source
        cut = stop
        fence = self.fence_at(cut)
        if fence is not None and fence.start < cut:
            low = max(position, fence.body)
            cut = min(cut, stop - len(_CLOSE), fence.last)
            if cut > low:
                cut = _grapheme_start(source, cut, low)
                return cut, cut, True
            # no code of this part to cut in: end before the block
            cut = fence.start if fence.start > position else stop
            return cut, cut, False
        for ends in _SENTENCE_ENDS:
            after = max(source.rfind(mark, minimum, cut) for mark in ends) + 1
            while minimum < after < cut and source[after] in _CLOSING:
                after += 1
            if after > minimum and self._outside(after) and not _continues(source, after):
                return after, after, False
        kept = _grapheme_start(source, cut, position + 1)
        cut = kept if self._outside(kept) else cut
        return cut, cut, False

    def _outside(self, index: int) -> bool:
        """Whether a part may end at ``index`` without closing a code block."""
        fence = self.fence_at(index)
        return fence is None or fence.start == index


def _grapheme_start(text: str, index: int, low: int) -> int:
    """``index``, or a little before it (above ``low``), so that no emoji sequence,
    flag or accented letter is cut apart; ``index`` if that cannot be had."""
    for cut in range(index, max(low, index - 32), -1):
        if not _continues(text, cut):
            return cut
    return index


def _continues(text: str, index: int) -> bool:
    """Whether ``text[index]`` belongs with the character before it."""
    char, before = ord(text[index]), text[index - 1]
    if before == "\u200d" or text[index] == "\u200d":  # zero-width joiner
        return True
    if (
        0xFE00 <= char <= 0xFE0F  # variation selectors
        or 0x1F3FB <= char <= 0x1F3FF  # skin tones
        or 0xE0020 <= char <= 0xE007F  # tags (flags of regions)
        or 0xE0100 <= char <= 0xE01EF
        or unicodedata.category(text[index]) in ("Mn", "Mc", "Me")
    ):
        return True
    if _regional(char) and _regional(ord(before)):  # flags are pairs of these
        count = 0
        while index - count - 1 >= 0 and _regional(ord(text[index - count - 1])):
            count += 1
        return count % 2 == 1
    return False


def _regional(char: int) -> bool:
    return 0x1F1E6 <= char <= 0x1F1FF


def _fences(source: str) -> list[_Fence]:
    """Code blocks as Discord sees them: each ``` opens a block that the next closes."""
    fences = []
    start = source.find("```")
    while start >= 0:
        language = _LANGUAGE.match(source, start + 3)
        body = language.end() if language else start + 3
        close = source.find("```", body)
        end = close + 3 if close >= 0 else len(source)
        if close < 0:
            close = len(source)
        last = body + len(source[body:close].rstrip()) - 1
        reopen = f"```{language.group(1) if language else ''}\n"
        fences.append(_Fence(start, body, last, close, end, reopen))
        start = source.find("```", end) if end < len(source) else -1
    return fences


def _markup(source: str, fences: list[_Fence]) -> tuple[list[int], list[int]]:
    """Inline code, emphasis and masked links outside code blocks, as sorted and merged
    ``(starts, ends)``. A run is paired with the next of its kind within a paragraph,
    ``*``/``_`` only where they can open or close (CommonMark's flanking, roughly)."""
    spans: list[tuple[int, int]] = []
    size = len(source)
    gaps = [0, *(i for fence in fences for i in (fence.start, fence.end)), size]
    for low, high in zip(gaps[::2], gaps[1::2], strict=True):
        code_start = code_length = 0  # an open inline code span
        delimiters: dict[str, int] = {}  # an open run of each kind: where it starts
        for match in _MARKUP.finditer(source, low, high):
            token = match.group()
            first = token[0]
            if first == "\n":
                code_length = 0
                if delimiters:
                    delimiters = {}
                continue
            start, stop = match.span()
            if code_length:
                if first == "`" and stop - start == code_length:
                    spans.append((code_start, stop))
                    code_length = 0
            elif first == "`":
                code_start, code_length = start, stop - start
            elif start and source[start - 1] == "\\":
                continue  # escaped
            elif first == "[":
                spans.append((start, stop))
            else:
                before = source[start - 1] if start else " "
                after = source[stop] if stop < size else " "
                if first == "_" and before.isalnum() and after.isalnum():
                    continue  # snake_case
                key = token[:2]
                if key in delimiters and not before.isspace():
                    spans.append((delimiters.pop(key), stop))
                elif not after.isspace():
                    delimiters[key] = start
    spans.sort()
    starts: list[int] = []
    ends: list[int] = []
    for start, stop in spans:
        if ends and start <= ends[-1]:
            ends[-1] = max(ends[-1], stop)
        else:
            starts.append(start)
            ends.append(stop)
    return starts, ends
