"""examples/telegram_bot.py's handlers, in process, against the Bot API stand-in (real HTTP through
python-telegram-bot) with a fake Cocoon client at the SDK boundary: long answers, a rate-limited (429) or failing
(5xx) Bot API, updates the bot does not handle. The bot must answer or skip politely, never leave an exception
to its loop, and call (pay for) each message once."""

from __future__ import annotations

import asyncio
import importlib.util
from typing import Any

import pytest

from tests.conftest import ROOT, free_port

pytest.importorskip("telegram", reason="python-telegram-bot not installed (scripts/test installs it)")
from telegram import Update  # noqa: E402

from tests.botapi_standin import BotApiStandIn  # noqa: E402

TOKEN = "42:bot-token"
CHAT = 5150


class FakeClient:
    """The SDK client at its boundary: a stream of deltas per chat call; every call is counted (each is paid)."""

    def __init__(self, answer: str) -> None:
        self.answer, self.calls = answer, 0

    def stream(self, name: str, args: dict[str, Any]) -> Any:
        self.calls += 1
        step = max(1, len(self.answer) // 4)
        for i in range(0, len(self.answer), step):
            yield {"delta": self.answer[i:i + step]}
        yield {"finish_reason": "stop"}


@pytest.fixture(scope="module")
def bot_module() -> Any:
    spec = importlib.util.spec_from_file_location("example_telegram_bot", ROOT / "examples" / "telegram_bot.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.EDIT_EVERY_S = 0.0
    return mod


@pytest.fixture(scope="module")
def api() -> Any:
    a = BotApiStandIn(TOKEN, free_port()).start()
    yield a
    a.stop()


def run(bot_module: Any, api: BotApiStandIn, client: FakeClient, updates: list[dict[str, Any]],
        monkeypatch: pytest.MonkeyPatch) -> list[BaseException]:
    """Process `updates` as the polling loop would; the errors that reached the application's error handlers."""
    monkeypatch.setenv("TELEGRAM_API_URL", api.url)
    errors: list[BaseException] = []

    async def go() -> None:
        app = bot_module.build(TOKEN, client=client)

        async def collect(update: object, context: Any) -> None:
            errors.append(context.error)

        app.add_error_handler(collect)
        await app.initialize()
        try:
            for u in updates:
                await app.process_update(Update.de_json(u, app.bot))
        finally:
            await app.shutdown()

    asyncio.run(go())
    return errors


def message(text: str, mid: int = 1) -> dict[str, Any]:
    return {"message_id": mid, "date": 1_780_000_000, "text": text, "chat": {"id": CHAT, "type": "private"},
            "from": {"id": CHAT, "is_bot": False, "first_name": "Ada"}}


def final_text(api: BotApiStandIn) -> str:
    s = api.replies(CHAT)[-1]
    return s.edits[-1] if s.edits else s.text


def test_long_answer_is_cut_to_one_telegram_message_and_called_once(bot_module, api, monkeypatch) -> None:
    """An answer past 4096 characters made every edit fail ("message is too long"): the user saw a partial answer
    and the handler died. An emoji-only message of 4097+ characters is answered too."""
    client = FakeClient("word " * 1200)
    errors = run(bot_module, api, client, [{"update_id": 1, "message": message("🙂" * 4100)}], monkeypatch)
    shown = final_text(api)
    assert errors == [] and client.calls == 1
    assert shown.endswith("…") and len(shown.encode("utf-16-le")) <= 2 * 4096 and shown.startswith("word word")


def test_rate_limited_or_failing_bot_api_is_retried_not_recharged(bot_module, api, monkeypatch) -> None:
    """429 with retry_after, then a 502, on the final edit: the bot waits and retries the edit; the paid call is
    made once."""
    client = FakeClient("Paris is the capital of France.")
    api.failures += [("editMessageText", 429, {"parameters": {"retry_after": 1}}),
                     ("editMessageText", 502, {})]
    monkeypatch.setattr(bot_module, "EDIT_EVERY_S", 3600.0)  # only the final edit: the failures hit it
    errors = run(bot_module, api, client, [{"update_id": 2, "message": message("Capital of France?")}],
                 monkeypatch)
    assert errors == [] and client.calls == 1 and api.failures == []
    assert final_text(api) == "Paris is the capital of France."


def test_updates_the_bot_does_not_handle_are_skipped_without_errors(bot_module, api, monkeypatch) -> None:
    """An edited message reached the chat handler, whose `update.message` is None (an AssertionError per edit);
    a sticker or a callback query is ignored."""
    client = FakeClient("unused")
    before = len(api.calls)
    sticker = {**message(""), "sticker": {"file_id": "s", "file_unique_id": "u", "type": "regular", "width": 1,
                                          "height": 1, "is_animated": False, "is_video": False}}
    del sticker["text"]
    updates = [{"update_id": 3, "edited_message": {**message("edited text"), "edit_date": 1_780_000_100}},
               {"update_id": 4, "message": sticker},
               {"update_id": 5, "callback_query": {"id": "cb", "chat_instance": "ci", "data": "x",
                                                   "from": {"id": CHAT, "is_bot": False, "first_name": "Ada"}}}]
    errors = run(bot_module, api, client, updates, monkeypatch)
    assert errors == [] and client.calls == 0
    assert [m for m in api.methods()[before:] if m not in ("getMe",)] == []


def test_one_chat_waiting_for_its_answer_does_not_hold_up_another(bot_module, api, monkeypatch) -> None:
    """python-telegram-bot handles updates one at a time by default: every user waited while one answer streamed.
    Chat A's answer here only comes once chat B has had its own (a stand-in for a slow model)."""
    import threading

    b_done = threading.Event()
    waited: list[bool] = []

    class TwoChats(FakeClient):
        def stream(self, name: str, args: dict[str, Any]) -> Any:
            self.calls += 1
            if args["messages"][-1]["content"] == "A":
                waited.append(b_done.wait(15))
                yield {"delta": "answer A"}
            else:
                yield {"delta": "answer B"}
                b_done.set()

    monkeypatch.setenv("TELEGRAM_API_URL", api.url)
    client = TwoChats("")

    async def go() -> None:
        app = bot_module.build(TOKEN, client=client)
        await app.initialize()
        await app.start()
        try:
            await app.update_queue.put(Update.de_json({"update_id": 10, "message": message("A")}, app.bot))
            await app.update_queue.put(Update.de_json(
                {"update_id": 11, "message": {**message("B"), "chat": {"id": CHAT + 1, "type": "private"}}}, app.bot))
            while len(waited) < 1 or not b_done.is_set():
                await asyncio.sleep(0.05)
            while any(s.text == "…" and not s.edits for s in api.replies(CHAT)):
                await asyncio.sleep(0.05)
        finally:
            await app.stop()
            await app.shutdown()

    asyncio.run(go())
    assert waited == [True] and client.calls == 2
    assert final_text(api) == "answer A"


def test_a_paid_summary_is_delivered_through_a_busy_bot_api(bot_module, api, monkeypatch) -> None:
    """A 429 on the typing hint stopped the command before the call; a 429 on sending the summary dropped an
    answer already paid for. Now the hint is best effort and the send waits out retry_after; one call."""

    class Summaries(FakeClient):
        def call(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
            self.calls += 1
            return {"words": 2, "summary": "Cocoon pays."}

    client = Summaries("")
    api.failures += [("sendChatAction", 429, {"parameters": {"retry_after": 1}}),
                     ("sendMessage", 429, {"parameters": {"retry_after": 1}})]
    cmd = {**message("/summarize GPU owners are paid per call"),
           "entities": [{"type": "bot_command", "offset": 0, "length": 10}]}
    errors = run(bot_module, api, client, [{"update_id": 20, "message": cmd}], monkeypatch)
    assert errors == [] and client.calls == 1 and api.failures == []
    assert final_text(api) == "Summary (2 words): Cocoon pays."
