"""Platform-neutral chat values: channel keys, incoming messages, the context of a run.

Adapters translate platform events into these; the core never sees a platform object.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

__all__ = ["Attachment", "ChannelKey", "IncomingMessage", "TemplateContext"]


class ChannelKey(NamedTuple):
    """Identifies one conversation: platform + channel (+ thread, + user in group mode).

    Direct messages are channels too. ``user`` is set when a group channel keeps one
    conversation per member. A named tuple: the runtime hashes keys many times per
    message, and a tuple hashes in C.
    """

    platform: str
    channel: str
    thread: str | None = None
    user: str | None = None

    def __str__(self) -> str:
        parts = [self.platform, self.channel]
        if self.thread is not None:
            parts.append(f"thread={self.thread}")
        if self.user is not None:
            parts.append(f"user={self.user}")
        return ":".join(parts)

    def to_dict(self) -> dict[str, Any]:
        # A literal: ``_asdict()`` is three times slower, and this runs per message.
        return {
            "platform": self.platform,
            "channel": self.channel,
            "thread": self.thread,
            "user": self.user,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChannelKey:
        return cls(**data)


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file, image or other media that came with a message."""

    kind: str
    url: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    """One message a user sent, as an adapter hands it to the runtime.

    ``message_id`` is the platform's id; a message whose id was already received on
    the same channel is ignored (platforms redeliver).
    """

    key: ChannelKey
    text: str
    message_id: str
    author_id: str = ""
    author_name: str = ""
    timestamp: float = field(default_factory=time.time)
    attachments: tuple[Attachment, ...] = ()
    is_bot: bool = False
    reply_to: str | None = None
    #: the text as the user sent it, when ``text`` had to differ: cut to the input cap,
    #: or with characters no store or model takes replaced (see ``Runtime.receive``)
    raw_text: str | None = None
    #: the server (Discord guild) the message was sent in; ``None`` elsewhere
    guild: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {
            "key": self.key.to_dict(),
            "text": self.text,
            "message_id": self.message_id,
            "author_id": self.author_id,
            "author_name": self.author_name,
            "timestamp": self.timestamp,
            "attachments": [
                {"kind": a.kind, "url": a.url, "name": a.name} for a in self.attachments
            ],
            "is_bot": self.is_bot,
            "reply_to": self.reply_to,
        }
        if self.raw_text is not None:
            data["raw_text"] = self.raw_text
        if self.guild is not None:
            data["guild"] = self.guild
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IncomingMessage:
        values = dict(data)
        values["key"] = ChannelKey.from_dict(values["key"])
        values["attachments"] = tuple(Attachment(**a) for a in values.get("attachments", ()))
        return cls(**values)


_NO_SETTINGS: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class TemplateContext:
    """What a template knows about where it runs.

    A template receives it by declaring a ``context`` parameter. It is stored with the
    conversation so that a rehydrated conversation sees the same context.
    """

    platform: str = "local"
    key: ChannelKey | None = None
    author_id: str = ""
    author_name: str = ""
    trigger: IncomingMessage | None = None
    # shared and read-only when empty: one dict per conversation would cost 64 bytes
    settings: Mapping[str, Any] = field(default_factory=lambda: _NO_SETTINGS)

    def to_dict(self) -> dict[str, Any]:
        return {
            "platform": self.platform,
            "key": self.key.to_dict() if self.key else None,
            "author_id": self.author_id,
            "author_name": self.author_name,
            "trigger": self.trigger.to_dict() if self.trigger else None,
            "settings": dict(self.settings),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TemplateContext:
        return cls(
            platform=data.get("platform", "local"),
            key=ChannelKey.from_dict(data["key"]) if data.get("key") else None,
            author_id=data.get("author_id", ""),
            author_name=data.get("author_name", ""),
            trigger=IncomingMessage.from_dict(data["trigger"]) if data.get("trigger") else None,
            settings=data.get("settings") or _NO_SETTINGS,
        )
