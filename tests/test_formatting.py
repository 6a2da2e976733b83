"""Markdown from a model as text + entities, and splitting long replies."""

from __future__ import annotations

import random
import re
import time

import pytest

from turbobot.formatting import (
    MIN_MARKDOWN_LIMIT,
    Entity,
    FormattedText,
    parse_markdown,
    split_formatted,
    split_markdown,
    utf16_len,
)


def spans(formatted: FormattedText) -> list[tuple[str, str]]:
    return [(e.kind, formatted.text[e.offset : e.offset + e.length]) for e in formatted.entities]


def test_inline_markup_becomes_entities() -> None:
    parsed = parse_markdown("Say **hello** to *you*, `x < y` and [docs](https://e.com/a).")
    assert parsed.text == "Say hello to you, x < y and docs."
    assert spans(parsed) == [
        ("bold", "hello"),
        ("italic", "you"),
        ("code", "x < y"),
        ("text_link", "docs"),
    ]
    assert parsed.entities[-1].url == "https://e.com/a"


def test_nested_and_heading_and_strike() -> None:
    parsed = parse_markdown("# Title\n**bold _both_** ~~gone~~")
    assert parsed.text == "Title\nbold both gone"
    assert spans(parsed) == [
        ("bold", "Title"),
        ("bold", "bold both"),
        ("italic", "both"),
        ("strikethrough", "gone"),
    ]


@pytest.mark.parametrize(
    "source",
    [
        "2 * 3 * 4 = 24",
        "snake_case_name and __init__ stay",
        "a <b> & c",
        "* a bullet\n* another",
        "**unclosed bold",
        "`unclosed code",
        "[not a link](javascript:alert(1))",
    ],
)
def test_anything_malformed_or_plain_stays_as_written(source: str) -> None:
    parsed = parse_markdown(source)
    assert parsed.text == source
    assert parsed.entities == ()


def test_code_blocks_keep_their_content_and_language() -> None:
    source = "Run:\n```python\nprint('**not bold**')\n```\nDone."
    parsed = parse_markdown(source)
    assert parsed.text == "Run:\nprint('**not bold**')\nDone."
    assert parsed.entities == (Entity("pre", 5, 21, language="python"),)


def test_an_open_code_block_at_the_end_is_code() -> None:
    parsed = parse_markdown("Here:\n```\nx = 1\ny = 2")
    assert parsed.text == "Here:\nx = 1\ny = 2"
    assert spans(parsed) == [("pre", "x = 1\ny = 2")]


def test_short_text_is_one_part() -> None:
    formatted = parse_markdown("hello **world**")
    assert split_formatted(formatted, 4096) == [formatted]


def test_split_prefers_paragraphs_then_lines_then_words() -> None:
    text = ("word " * 30).strip() + "\n\n" + ("more " * 30).strip()
    parts = split_formatted(FormattedText(text), 200)
    assert [p.text for p in parts] == [("word " * 30).strip(), ("more " * 30).strip()]

    words = " ".join(f"w{i}" for i in range(100))
    parts = split_formatted(FormattedText(words), 50)
    assert all(len(p.text) <= 50 for p in parts)
    assert " ".join(p.text for p in parts) == words  # no word broken, none lost


def test_a_word_longer_than_the_limit_is_cut() -> None:
    parts = split_formatted(FormattedText("x" * 25), 10)
    assert [p.text for p in parts] == ["x" * 10, "x" * 10, "x" * 5]


def test_a_code_block_cut_in_two_is_code_in_both_parts() -> None:
    code = "\n".join(f"line {i} = {i * i}" for i in range(40))
    parsed = parse_markdown(f"Intro text.\n```py\n{code}\n```\nOutro **bold**.")
    parts = split_formatted(parsed, 300)
    assert len(parts) > 1
    rebuilt = []
    for part in parts:
        assert len(part.text) <= 300
        for entity in part.entities:
            assert entity.offset >= 0 and entity.offset + entity.length <= len(part.text)
        rebuilt.extend(
            part.text[e.offset : e.offset + e.length] for e in part.entities if e.kind == "pre"
        )
    # every code line is in a code entity of some part, in order
    assert "\n".join(rebuilt).split("\n") == code.split("\n")
    assert spans(parts[-1])[-1] == ("bold", "bold")


def test_ten_thousand_characters_split_for_telegram_in_utf16() -> None:
    text = ("Emoji 😀 and words. " * 600).strip()  # astral characters count twice
    parts = split_formatted(parse_markdown(text), 4096, measure=utf16_len)
    assert len(parts) == 3
    assert all(utf16_len(p.text) <= 4096 for p in parts)
    assert " ".join(p.text for p in parts) == text


# --- split_markdown: Markdown as written, for Discord ---------------------------------


def nonspace(text: str) -> str:
    return "".join(text.split())


def rejoined(source: str, parts: list[str]) -> bool:
    """Whether ``parts`` hold ``source``'s non-whitespace in order, nothing lost or
    repeated, once the fences split_markdown adds (a ```lang line at the start of a
    part that continues a code block, a ``` at the end of one cut inside it) are
    taken out. Which fences were added is not marked, so every reading is tried."""
    rest = nonspace(source)
    failed: set[tuple[int, int]] = set()

    def readings(part: str) -> set[str]:
        bodies = {part, part.removesuffix("\n```")}
        if part.startswith("```"):
            without_first_line = part.partition("\n")[2]
            bodies |= {without_first_line, without_first_line.removesuffix("\n```")}
        return {nonspace(body) for body in bodies}

    def holds(index: int, at: int) -> bool:
        if index == len(parts):
            return at == len(rest)
        if (index, at) in failed:
            return False
        for body in readings(parts[index]):
            if rest.startswith(body, at) and holds(index + 1, at + len(body)):
                return True
        failed.add((index, at))
        return False

    return holds(0, 0)


def fences_balanced(part: str) -> bool:
    return part.count("```") % 2 == 0


def test_short_markdown_is_one_part_and_blank_is_none() -> None:
    assert split_markdown("  hello **world**\n", 2000) == ["hello **world**"]
    assert split_markdown("", 2000) == []
    assert split_markdown(" \n\n\t  \n", 2000) == []


def test_a_limit_too_small_for_fences_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 32"):
        split_markdown("text", 19)
    assert split_markdown("a " * 40, MIN_MARKDOWN_LIMIT)  # the smallest limit works


def test_a_long_code_block_is_closed_and_reopened_in_every_part() -> None:
    code = "\n".join(f"    total_{i} = compute(item_{i}) + offset * {i}" for i in range(110))
    source = (
        "Here is the **whole** script, as asked:\n\n"
        f"```python\ndef main() -> None:\n{code}\n```\n\n"
        "Run it with `python main.py`; it prints nothing."
    )
    assert len(source) > 5000
    parts = split_markdown(source, 2000)
    assert len(parts) == 3
    assert all(len(part) <= 2000 for part in parts)
    assert all(fences_balanced(part) for part in parts)
    assert parts[0].startswith("Here is the **whole** script")
    assert parts[0].endswith("\n```")
    for part in parts[1:]:
        # the next code line, indentation and all, follows the reopened fence
        assert re.match(r"```python\n    total_\d+ = ", part)
    assert parts[-1].endswith("it prints nothing.")
    assert rejoined(source, parts)


def test_cuts_prefer_paragraphs_then_lines_then_spaces() -> None:
    first, second = ("word " * 30).strip(), ("more " * 30).strip()
    assert split_markdown(f"{first}\n{second}\n\n{first}", 350) == [
        f"{first}\n{second}",
        first,
    ]
    short = ("more " * 5).strip()
    assert split_markdown(f"{first}\n{short} {first}", 250) == [first, f"{short} {first}"]
    words = " ".join(f"w{i}" for i in range(100))
    parts = split_markdown(words, 50)
    assert all(len(part) <= 50 for part in parts)
    assert " ".join(parts) == words  # cut at spaces only, none lost


def test_no_word_is_broken() -> None:
    rng = random.Random(7)
    words = ["".join(rng.choices("abcdefghij", k=rng.randint(1, 15))) for _ in range(2000)]
    source = " ".join(words)
    for limit in (40, 77, 200, 2000):
        parts = split_markdown(source, limit)
        assert all(len(part) <= limit for part in parts)
        assert [w for part in parts for w in part.split(" ")] == words


def test_a_word_longer_than_the_limit_is_cut_where_it_must() -> None:
    assert split_markdown("x" * 5000, 2000) == ["x" * 2000, "x" * 2000, "x" * 1000]
    # a word that fits in a part of its own is not cut: the part before ends early
    long_word = "y" * 1990
    assert split_markdown(f"short start {long_word} end", 2000) == [
        "short start",
        f"{long_word} end",
    ]


def test_inline_code_bold_and_links_are_not_cut_when_avoidable() -> None:
    filler = "plain words here " * 3
    for run in (
        "`some code with spaces in it`",
        "**bold words that go on a while**",
        "__underlined words in a row__",
        "||a spoiler with many words||",
        "~~struck out words right here~~",
        "[a masked link text](https://example.com/page)",
    ):
        source = f"{filler}{run} and then more words after it"
        for limit in range(40, len(source)):
            parts = split_markdown(source, limit)
            assert rejoined(source, parts)
            if limit >= len(run):  # the run is whole in one part whenever it fits in one
                assert any(run in part for part in parts), (run, limit, parts)


def test_markup_is_cut_inside_only_when_nothing_else_fits() -> None:
    source = "**" + " ".join(["bold"] * 30) + "**"
    parts = split_markdown(source, 60)
    assert all(len(part) <= 60 for part in parts)
    assert rejoined(source, parts)
    assert len(parts) == 3  # cut at spaces, not into words


def test_an_unclosed_fence_at_the_end_stays_open() -> None:
    code = "\n".join(f"step_{i}()" for i in range(60))
    source = f"Streaming so far:\n```js\n{code}"
    parts = split_markdown(source, 300)
    assert len(parts) > 2
    assert all(len(part) <= 300 for part in parts)
    assert all(fences_balanced(part) for part in parts[:-1])
    assert parts[-1].startswith("```js\n") and not parts[-1].endswith("```")
    assert rejoined(source, parts)
    assert split_markdown("Look:\n```py\nx = 1", 2000) == ["Look:\n```py\nx = 1"]


def test_unicode_is_counted_in_code_points_and_never_cut_apart() -> None:
    family = "👨\u200d👩\u200d👧\u200d👦"  # one emoji of seven code points
    flag, thumbs = "🇫🇷", "👍🏽"
    accented = "e\u0301"  # e + combining acute
    for unit in (family, flag, thumbs, accented):
        source = unit * 100  # one long "word"
        for limit in (33, 50, 64):
            parts = split_markdown(source, limit)
            assert "".join(parts) == source
            assert all(len(part) <= limit for part in parts)
            assert all(part.startswith(unit) and part.endswith(unit) for part in parts)
    chain = "😀\u200d" * 100 + "😀"  # joined without end: cut where it must be
    assert "".join(split_markdown(chain, 40)) == chain
    assert rejoined(f"```\n{chain}\n```", split_markdown(f"```\n{chain}\n```", 40))
    # in a code block too, where the added fences leave less room
    source = f"```\n{family * 60}\n```"
    parts = split_markdown(source, 40)
    assert all(len(part) <= 40 and fences_balanced(part) for part in parts)
    assert rejoined(source, parts)
    assert all(
        part.removeprefix("```\n").removesuffix("\n```").startswith(family) for part in parts
    )
    emoji = ("Emoji 😀 and words. " * 300).strip()  # 😀 counts once, as Discord counts
    parts = split_markdown(emoji, 2000)
    assert [len(part) for part in parts] == [2000, 2000, 1697]
    assert utf16_len(parts[0]) > 2000  # what Telegram would count
    assert " ".join(parts) == emoji


def test_cjk_text_is_cut_after_its_punctuation() -> None:
    sentence = "今日は良い天気ですね。明日も晴れるでしょうか？"
    source = sentence * 100
    parts = split_markdown(source, 2000)
    assert all(len(part) <= 2000 for part in parts)
    assert "".join(parts) == source
    assert all(part[-1] in "。？" for part in parts)


def test_mentions_are_left_as_written() -> None:
    # allowed_mentions on the request decides whether anything pings, not the text
    source = "Hi @everyone and @here, <@123> and <@&456> and <#789>."
    assert split_markdown(source, 2000) == [source]


def random_markdown(rng: random.Random) -> str:
    pieces: list[str] = []
    for _ in range(rng.randint(0, 120)):
        roll = rng.random()
        word = "".join(rng.choices("abcxyz_*`~|#>-é😀中", k=rng.randint(1, 12)))
        if roll < 0.45:
            pieces.append(word)
        elif roll < 0.6:
            pieces.append(rng.choice([" ", "  ", "\n", "\n\n", "\n   ", " \n \n\t"]))
        elif roll < 0.7:
            pieces.append(rng.choice(["```", "```py\n", "\n```\n", "```\n", "```" + word]))
        elif roll < 0.8:
            mark = rng.choice(["**", "*", "__", "_", "~~", "||", "`"])
            pieces.append(f"{mark}{word} {word}{mark}")
        elif roll < 0.85:
            pieces.append(f"[{word} {word}](https://e.com/{word})")
        elif roll < 0.9:
            pieces.append(rng.choice(["# ", "### ", "-# ", "> ", ">>> ", "- ", "1. "]))
        else:
            pieces.append(word * rng.randint(5, 30))  # a long word
        if rng.random() < 0.5:
            pieces.append(" ")
    return "".join(pieces)


def test_nothing_is_lost_or_repeated_in_random_markdown() -> None:
    rng = random.Random(20240501)
    for _ in range(1000):
        source = random_markdown(rng)
        limit = rng.choice([32, 33, 40, 57, 100, 300, 2000])
        parts = split_markdown(source, limit)
        assert all(len(part) <= limit for part in parts), (source, limit)
        assert all(part.strip() and part == part.strip() for part in parts), (source, limit)
        assert rejoined(source, parts), (source, limit, parts)
        if source.count("```") % 2 == 0:
            assert all(fences_balanced(part) for part in parts), (source, limit, parts)


def test_a_megabyte_splits_in_well_under_a_second() -> None:
    block = (
        "## Heading\n\nSome **bold** text, `code`, a [link](https://e.com) and words "
        "that go on for a while. "
        * 8
        + "\n\n```python\n"
        + "\n".join(f"    line_{i} = value * {i}" for i in range(40))
        + "\n```\n\n> a quote\n- a list item\n"
    )
    source = block * (1_000_000 // len(block) + 1)
    single_line = ("lorem ipsum dolor sit amet " * 40_000)[:1_000_000]
    for text in (source, single_line, "z" * 1_000_000):
        started = time.perf_counter()
        parts = split_markdown(text, 2000)
        elapsed = time.perf_counter() - started
        assert elapsed < 1.0, elapsed
        assert all(len(part) <= 2000 for part in parts)
        assert sum(len(nonspace(part)) for part in parts) >= len(nonspace(text))
