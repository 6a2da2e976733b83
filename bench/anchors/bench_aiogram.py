"""aiogram 3 baseline: Dispatcher + Router + FSM (StatesGroup with one waiting state).

usage: python bench_aiogram.py CHATS [memory|sqlite]

memory  aiogram.fsm.storage.memory.MemoryStorage (the default storage)
sqlite  aiogram_sqlite_storage.sqlitestore.SQLStorage (third-party package
        aiogram-sqlite-storage, default 'pickle' serializer): every set_state/set_data is
        an INSERT OR REPLACE + COMMIT on a local SQLite file (default journal mode,
        synchronous=FULL), executed synchronously on the event loop.

Updates are built as aiogram would for webhook/polling input:
Update.model_validate(dict, context={"bot": bot}) and then `await dp.feed_update(bot, update)`.
The network is replaced by a BaseSession subclass whose make_request serialises the method
(model_dump + prepare_value, as AiohttpSession.build_form_data does, minus aiohttp's
FormData) and parses a canned JSON response through BaseSession.check_response, so aiogram
still builds the request and validates the returned Message.
"""

import asyncio
import json
import os
import sys

from aiogram import Bot, Dispatcher, F, Router
from aiogram.client.session.base import BaseSession
from aiogram.filters import StateFilter
from aiogram.fsm.context import FSMContext
from aiogram.fsm.state import State, StatesGroup
from aiogram.fsm.storage.memory import MemoryStorage
from aiogram.types import Message, Update

import benchlib as B

BOT_ID = 123456789
BOT_USER = {"id": BOT_ID, "is_bot": True, "first_name": "Bench", "username": "bench_bot"}
LOG = B.ReplyLog()


class LocalSession(BaseSession):
    """A BaseSession that never touches the network."""

    def __init__(self):
        super().__init__()
        self._msg_id = 0

    async def close(self):
        pass

    async def stream_content(self, *a, **kw):  # pragma: no cover - not used
        raise NotImplementedError
        yield b""

    async def make_request(self, bot, method, timeout=None):
        files = {}
        fields = {}
        for key, value in method.model_dump(warnings=False).items():
            value = self.prepare_value(value, bot=bot, files=files)
            if value:
                fields[key] = value
        api = method.__api_method__
        if api == "sendMessage":
            chat_id = int(fields["chat_id"])
            text = fields["text"]
            LOG.record(chat_id, text)
            self._msg_id += 1
            result = {
                "message_id": self._msg_id,
                "date": 1700000000,
                "chat": {"id": chat_id, "type": "private", "first_name": "U"},
                "from": BOT_USER,
                "text": text,
            }
        elif api == "getMe":
            result = BOT_USER
        else:
            raise RuntimeError(f"unexpected API call {api}")
        raw = json.dumps({"ok": True, "result": result})
        response = self.check_response(bot=bot, method=method, status_code=200, content=raw)
        return response.result


class Form(StatesGroup):
    name = State()


router = Router()


@router.message(StateFilter(None), F.text == "hi")
async def start(message: Message, state: FSMContext):
    await state.set_state(Form.name)
    await message.answer(B.ASK_TEXT)


@router.message(Form.name)
async def got_name(message: Message, state: FSMContext):
    await state.clear()
    await message.answer(f"Hello {message.text}")


def make_update(uid_idx, update_id, text):
    uid = B.BASE_ID + uid_idx
    return {
        "update_id": update_id,
        "message": {
            "message_id": update_id,
            "date": 1700000000,
            "chat": {"id": uid, "type": "private", "first_name": f"U{uid_idx}"},
            "from": {"id": uid, "is_bot": False, "first_name": f"U{uid_idx}"},
            "text": text,
        },
    }


def count_waiting(storage, variant):
    if variant == "memory":
        return sum(1 for rec in storage.storage.values() if rec.state == Form.name.state)
    return storage.con.execute(
        "SELECT COUNT(*) FROM fsm_data WHERE state = ?", (Form.name.state,)
    ).fetchone()[0]


async def main(chats, variant):
    db_path = None
    if variant == "memory":
        storage = MemoryStorage()
    elif variant == "sqlite":
        from aiogram_sqlite_storage.sqlitestore import SQLStorage

        db_path = B.fresh_path("aiogram.sqlite")
        storage = SQLStorage(db_path)
    else:
        sys.exit(f"unknown variant {variant}")

    bot = Bot(token=f"{BOT_ID}:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", session=LocalSession())
    dp = Dispatcher(storage=storage)
    dp.include_router(router)

    # inputs are generated lazily inside the timed loops (about 1 us per dict) so that the
    # RSS numbers are not inflated by 2*C pre-built input dicts

    async def feed(data):
        await dp.feed_update(bot, Update.model_validate(data, context={"bot": bot}))

    for i in B.WARMUP_IDS:
        await feed(make_update(i, 10**9 + i, "hi"))
        await feed(make_update(i, 2 * 10**9 + i, B.name_for(i)))
    assert len(LOG.sent) == 2 * B.WARMUP
    LOG.reset()

    rss_base = B.rss_mb()
    t = B.Timer()
    t.start()
    for i in range(chats):
        data = make_update(i, i + 1, "hi")
        await feed(data)
    t.mark("phase1")
    rss_waiting = B.rss_mb()
    waiting = count_waiting(storage, variant)
    t.mark("count")
    for i in range(chats):
        data = make_update(i, chats + i + 1, B.name_for(i))
        await feed(data)
    t.mark("phase2")
    await dp.storage.close()
    await bot.session.close()
    t.mark("end")

    extra = dict(waiting_seen=waiting)
    seconds = t.marks["end"] - (t.marks["count"] - t.marks["phase1"])  # exclude the sanity count
    cpu = t.cpu_marks["end"] - (t.cpu_marks["count"] - t.cpu_marks["phase1"])
    if db_path:
        extra["db_bytes"] = os.path.getsize(db_path)
        os.remove(db_path)
    B.emit(
        "aiogram",
        variant,
        chats,
        seconds,
        LOG.verify(chats) and waiting == chats,
        rss_base,
        rss_waiting,
        cpu,
        **extra,
    )


if __name__ == "__main__":
    c = B.parse_chats()
    v = sys.argv[2] if len(sys.argv) > 2 else "memory"
    asyncio.run(main(c, v))
