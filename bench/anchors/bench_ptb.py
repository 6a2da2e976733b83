"""python-telegram-bot baseline: Application + ConversationHandler(per_chat=True).

usage: python bench_ptb.py CHATS [memory|pickle|pickle-ckpt]

memory       no persistence
pickle       PicklePersistence() with defaults (single_file=True, on_flush=False,
             update_interval=60). Full lifecycle: app.start() ... app.stop() (final
             update_persistence) + app.shutdown() (persistence.flush()). The final
             write is inside the timed region.
pickle-ckpt  as 'pickle', plus one app.update_persistence() while all C conversations
             are waiting, i.e. what one periodic update_interval tick costs at that moment
             (this is the only point at which the *waiting* states reach disk).

The network is replaced by a BaseRequest subclass that answers getMe/sendMessage locally
with canned JSON, so PTB still builds the request parameters and parses the returned
Message exactly as it would for a real HTTP response.
"""

import asyncio
import json
import os
import sys

from telegram import Update
from telegram.ext import (
    Application,
    ConversationHandler,
    MessageHandler,
    PicklePersistence,
    filters,
)
from telegram.request import BaseRequest

import benchlib as B

BOT_ID = 123456789
BOT_USER = {"id": BOT_ID, "is_bot": True, "first_name": "Bench", "username": "bench_bot"}
LOG = B.ReplyLog()


class LocalRequest(BaseRequest):
    """A BaseRequest that never touches the network."""

    def __init__(self):
        self._msg_id = 0

    @property
    def read_timeout(self):
        return None

    async def initialize(self):
        pass

    async def shutdown(self):
        pass

    async def do_request(
        self,
        url,
        method,
        request_data=None,
        read_timeout=None,
        write_timeout=None,
        connect_timeout=None,
        pool_timeout=None,
    ):
        api = url.rsplit("/", 1)[-1]
        if api == "getMe":
            result = BOT_USER
        elif api == "sendMessage":
            params = request_data.json_parameters
            chat_id = int(params["chat_id"])
            text = params["text"]
            LOG.record(chat_id, text)
            self._msg_id += 1
            result = {
                "message_id": self._msg_id,
                "date": 1700000000,
                "chat": {"id": chat_id, "type": "private", "first_name": "U"},
                "from": BOT_USER,
                "text": text,
            }
        elif api in ("deleteWebhook", "close", "logOut"):
            result = True
        else:
            raise RuntimeError(f"unexpected API call {api}")
        return 200, json.dumps({"ok": True, "result": result}).encode()


ASK = 0


async def start(update, context):
    await update.message.reply_text(B.ASK_TEXT)
    return ASK


async def got_name(update, context):
    await update.message.reply_text(f"Hello {update.message.text}")
    return ConversationHandler.END


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


async def main(chats, variant):
    persistence = None
    pickle_path = None
    if variant in ("pickle", "pickle-ckpt"):
        pickle_path = B.fresh_path("ptb.pickle")
        persistence = PicklePersistence(filepath=pickle_path)  # all defaults
    elif variant != "memory":
        sys.exit(f"unknown variant {variant}")

    builder = (
        Application.builder()
        .token(f"{BOT_ID}:TEST")
        .request(LocalRequest())
        .get_updates_request(LocalRequest())
        .updater(None)
    )
    if persistence is not None:
        builder = builder.persistence(persistence)
    app = builder.build()
    conv = ConversationHandler(
        entry_points=[MessageHandler(filters.Text(["hi"]), start)],
        states={ASK: [MessageHandler(filters.TEXT & ~filters.COMMAND, got_name)]},
        fallbacks=[],
        per_chat=True,
        name="twostep",
        persistent=persistence is not None,
    )
    app.add_handler(conv)
    await app.initialize()  # getMe via LocalRequest, loads (empty) persistence
    await app.start()  # starts the update_interval persistence task when persistence is set

    # inputs are generated lazily inside the timed loops (about 1 us per dict) so that the
    # RSS numbers are not inflated by 2*C pre-built input dicts
    bot = app.bot

    # warm-up conversations (not timed, replies discarded)
    for i in B.WARMUP_IDS:
        await app.process_update(Update.de_json(make_update(i, 10**9 + i, "hi"), bot))
        await app.process_update(Update.de_json(make_update(i, 2 * 10**9 + i, B.name_for(i)), bot))
    assert len(LOG.sent) == 2 * B.WARMUP and not conv._conversations  # noqa: SLF001
    LOG.reset()

    rss_base = B.rss_mb()
    t = B.Timer()
    t.start()
    for i in range(chats):
        data = make_update(i, i + 1, "hi")
        await app.process_update(Update.de_json(data, bot))
    t.mark("phase1")
    rss_waiting = B.rss_mb()
    waiting = len(conv._conversations)  # noqa: SLF001  (private, only used as a sanity check)
    if variant == "pickle-ckpt":
        await app.update_persistence()
    t.mark("ckpt")
    if os.environ.get("CHECK_PERSISTED") and pickle_path:  # debugging aid, not for timing runs
        import pickle

        convs = {}
        if os.path.exists(pickle_path):
            with open(pickle_path, "rb") as f:
                convs = (pickle.load(f)["conversations"] or {}).get("twostep", {})
        print(
            "persisted waiting conversations:",
            sum(1 for v in convs.values() if v == ASK),
            file=sys.stderr,
        )
    for i in range(chats):
        data = make_update(i, chats + i + 1, B.name_for(i))
        await app.process_update(Update.de_json(data, bot))
    t.mark("phase2")
    await app.stop()  # final update_persistence() when persistence is set
    await app.shutdown()  # persistence.flush()
    t.mark("end")

    extra = dict(
        process_s=t.marks["phase1"] + (t.marks["phase2"] - t.marks["ckpt"]),
        persist_s=(t.marks["ckpt"] - t.marks["phase1"]) + (t.marks["end"] - t.marks["phase2"]),
        waiting_seen=waiting,
    )
    if pickle_path:
        extra["pickle_bytes"] = os.path.getsize(pickle_path)
        os.remove(pickle_path)
    B.emit(
        "python-telegram-bot",
        variant,
        chats,
        t.marks["end"],
        LOG.verify(chats) and waiting == chats,
        rss_base,
        rss_waiting,
        t.cpu_marks["end"],
        **extra,
    )


if __name__ == "__main__":
    c = B.parse_chats()
    v = sys.argv[2] if len(sys.argv) > 2 else "memory"
    asyncio.run(main(c, v))
