"""Every Python block of the README and docs/ runs (issue 12: the docs cannot rot).

Each ```python block runs on its own, as a script with top-level ``await``; each
template it defines then holds a short conversation (a scripted model), and the
``test_*`` functions it defines are called. A block that cannot run alone says
so on the line before it: ``<!-- docs-test: skip, REASON -->``.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

from turbobot import ScriptedLLM, Template
from turbobot.testing import BotSession

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)```", re.S)


def blocks() -> list[Any]:
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for match in _BLOCK.finditer(text):
            line = text[: match.start("code")].count("\n") + 1
            name = f"{doc.relative_to(ROOT)}:{line}"
            skip = match["before"].strip().startswith("<!-- docs-test: skip")
            marks = [pytest.mark.skip(reason=match["before"].strip())] if skip else []
            found.append(pytest.param(match["code"], id=name, marks=marks))
    return found


def test_the_docs_have_python_blocks() -> None:
    assert len([b for b in blocks() if not b.marks]) >= 3


@pytest.mark.parametrize("code", blocks())
async def test_python_block_runs(
    code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    namespace: dict[str, Any] = {"__name__": "docs_block"}
    compiled = compile(code, "<docs>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(compiled, namespace)
    if asyncio.iscoroutine(result):
        await result
    for name, value in list(namespace.items()):
        if isinstance(value, Template) and value.fn.__module__ == "docs_block":
            # a template the block defines: it must hold a short conversation
            session = BotSession(value, llm=ScriptedLLM(["Sure."] * 10))
            async with session:
                replies = [t for text in ("hi", "Ann", "yes") for t in await session.say(text)]
            assert replies, f"{name} answered nothing"
        if name.startswith("test_") and callable(value):
            if inspect.iscoroutinefunction(value):
                await value()
            else:
                # a plain test may run its own event loop (BotTester): not inside ours
                await asyncio.to_thread(value)


def test_every_guarantee_names_tests_that_exist() -> None:
    """The README's "Guarantees" cite tests by name: each named file and test exists."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    cited = 0
    for row in section.splitlines():
        current: str | None = None
        for name, test in re.findall(r"`(test_\w+\.py)?(?:::(\w+))?`", row):
            if name:
                current = name
                assert (ROOT / "tests" / name).is_file(), name
            if test:
                assert current is not None, row
                source = (ROOT / "tests" / current).read_text()
                assert re.search(rf"^(async )?def {test}\(", source, re.M), f"{current}::{test}"
                cited += 1
    assert cited >= 15
