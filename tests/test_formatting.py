"""Markdown from a model as text + entities, and splitting long replies."""

from __future__ import annotations

import pytest

from turbobot.formatting import Entity, FormattedText, parse_markdown, split_formatted, utf16_len


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
