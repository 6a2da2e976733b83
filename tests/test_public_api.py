"""The public surface and the layering rules."""

from __future__ import annotations

import subprocess
import sys

import turbobot


def test_all_is_sorted_complete_and_importable() -> None:
    names = turbobot.__all__

    # isort style, as ruff's RUF022 keeps it: CONSTANTS, then Classes, then functions
    def style(name: str) -> tuple[int, str]:
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)

    assert list(names) == sorted(names, key=style)
    for name in names:
        assert hasattr(turbobot, name), name
    public = {
        n
        for n, v in vars(turbobot).items()
        if not n.startswith("_") and getattr(v, "__module__", "").startswith("turbobot")
    }
    assert public <= set(names), f"exported but missing from __all__: {public - set(names)}"


def test_core_never_imports_platform_libraries() -> None:
    code = (
        "import sys, turbobot, turbobot.runtime, turbobot.cli, turbobot.testing;"
        "bad = [m for m in ('discord', 'telegram') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_stores_do_not_import_the_template_engine() -> None:
    """Layering (docs/architecture.md, "Module map"): stores keep journals, they do
    not import the engine that writes them, nor the runtime (type hints aside)."""
    import ast
    from pathlib import Path

    package = Path(turbobot.__file__).parent
    for path in [
        package / "store.py",
        package / "journal.py",
        package / "codec.py",
        package / "delivery.py",
        *sorted((package / "sql").glob("*.py")),
    ]:
        tree = ast.parse(path.read_text())
        guarded = {
            id(node)
            for stmt in ast.walk(tree)
            if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test)
            for node in ast.walk(stmt)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and id(node) not in guarded:
                assert node.module not in ("turbobot.template", "turbobot.runtime"), (
                    f"{path.name} imports {node.module}"
                )


def test_get_input_is_get_user_input() -> None:
    assert turbobot.GetInput is turbobot.GetUserInput
