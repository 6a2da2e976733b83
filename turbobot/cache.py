"""Response caches: a cache hit answers a ``Generate`` without calling the LLM."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from typing import Any

from turbobot.llm.base import LLMRequest, LLMResponse

__all__ = ["BaseCache", "Cache", "SimpleCache"]


class BaseCache(ABC):
    """Maps a request (prompt + model settings) to a stored response."""

    @staticmethod
    def to_key(request: LLMRequest) -> str:
        """A stable key for ``request``: a hash of everything that shapes the answer."""
        payload: dict[str, Any] = {
            "messages": request.messages,
            "model": request.model,
            "settings": request.settings,
            "tools": request.tools,
        }
        blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    @abstractmethod
    async def get(self, key: str) -> LLMResponse | None:
        """The cached response, or ``None``."""

    @abstractmethod
    async def set(self, key: str, response: LLMResponse) -> None:
        """Store ``response`` under ``key``."""

    @abstractmethod
    async def clear(self) -> None:
        """Forget every entry."""

    async def has(self, key: str) -> bool:
        return await self.get(key) is not None


class SimpleCache(BaseCache):
    """An unbounded in-process dictionary."""

    def __init__(self) -> None:
        self._entries: dict[str, LLMResponse] = {}

    async def get(self, key: str) -> LLMResponse | None:
        return self._entries.get(key)

    async def set(self, key: str, response: LLMResponse) -> None:
        self._entries[key] = response

    async def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


#: the name turbo-chat's ``run_chat`` documentation uses
Cache = SimpleCache
