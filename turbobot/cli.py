"""The ``turbobot`` command. The only place that reads the environment and ``.env``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from turbobot import __version__
from turbobot.exceptions import ConfigurationError
from turbobot.llm.base import LLM
from turbobot.loader import load_template

__all__ = ["choose_llm", "main"]

_log = logging.getLogger(__name__)

PLATFORMS = ("console", "telegram", "discord")


def choose_llm(flag: str | None, env: Mapping[str, str]) -> str:
    """Which LLM backend to use: the flag, else ``TURBOBOT_LLM``, else by the key.

    ``auto`` (the default) means OpenAI-compatible when ``OPENAI_API_KEY`` or
    ``OPENAI_BASE_URL`` is set, else the offline local model.
    """
    choice = (flag or env.get("TURBOBOT_LLM") or "auto").strip().lower()
    if choice not in ("auto", "openai", "local"):
        raise ConfigurationError(f"unknown LLM backend {choice!r}; use auto, openai or local")
    if choice == "auto":
        return "openai" if env.get("OPENAI_API_KEY") or env.get("OPENAI_BASE_URL") else "local"
    return choice


def build_llm(choice: str, env: Mapping[str, str]) -> LLM:
    if choice == "openai":
        from turbobot.llm.openai import OpenAILLM

        base_url = env.get("OPENAI_BASE_URL") or None
        key = env.get("OPENAI_API_KEY") or None
        if key is None and base_url is None:
            raise ConfigurationError(
                "the openai backend needs OPENAI_API_KEY (and OPENAI_BASE_URL for a "
                "compatible server such as Ollama or llama.cpp)"
            )
        # Self-hosted compatible servers often need no key; the client insists on one.
        return OpenAILLM(api_key=key or "unused", base_url=base_url)
    from turbobot.llm.local import LocalLLM

    return LocalLLM(model_path=env.get("TURBOBOT_LOCAL_MODEL") or None)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="turbobot", description="Run LLM chat bots written as turbo templates."
    )
    parser.add_argument("--version", action="version", version=f"turbobot {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a bot")
    run.add_argument("bot", help="bots.horoscope, path/to/bot.py, or module:attribute")
    run.add_argument("--platform", choices=PLATFORMS, default="console")
    run.add_argument("--channel", default="console", help="console channel name")
    run.add_argument("--model", help="model name (default: TURBOBOT_MODEL or the template's)")
    run.add_argument("--llm", choices=("auto", "openai", "local"), help="LLM backend")
    run.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default)")
    return parser


async def _run_console(args: argparse.Namespace, env: Mapping[str, str]) -> None:
    from adapters.console import ConsoleAdapter
    from turbobot.runtime import Runtime

    template = load_template(args.bot)
    model = args.model or env.get("TURBOBOT_MODEL")
    if model:
        template = template.configure(model=model)
    llm = build_llm(choose_llm(args.llm, env), env)
    adapter = ConsoleAdapter(channel=args.channel)
    try:
        start = getattr(llm, "start", None)
        if start is not None:
            await start()  # load a local model before the first message, not during it
        async with Runtime(template, llm=llm, sender=adapter) as runtime:
            await adapter.run(runtime)
    finally:
        await llm.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from dotenv import load_dotenv

        load_dotenv(os.path.join(os.getcwd(), ".env"), override=False)
    except ImportError:  # pragma: no cover - python-dotenv is a dependency
        pass
    env = dict(os.environ)
    level = (args.log_level or env.get("TURBOBOT_LOG_LEVEL") or "WARNING").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run":
            if args.platform != "console":
                raise ConfigurationError(
                    f"the {args.platform} adapter is not part of this version yet; "
                    "use --platform console"
                )
            asyncio.run(_run_console(args, env))
    except ConfigurationError as exc:
        print(f"turbobot: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
