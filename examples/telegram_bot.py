"""A Telegram bot that answers with Cocoon functions, paying per call from the bot's own channel
(python-telegram-bot 21).

    plain message    -> Chat.generate (examples/chat.py), streamed: the reply is edited in place as tokens arrive
    /summarize TEXT  -> summarize (a unary function, e.g. tests/apps/web_chat.py's)
    /start           -> what the bot does

It shows "typing…" while a call runs and answers errors politely. Payment: the channel `cocoon channel open`
recorded under the bot's COCOON_HOME (the SDK's Client pays from it by default); no channel -> the API key.

Run:  cocoon wallet create && cocoon channel open --deposit 5      (once, in the bot's COCOON_HOME)
      TELEGRAM_BOT_TOKEN=123:abc python examples/telegram_bot.py
Settings (environment): TELEGRAM_BOT_TOKEN (required), TELEGRAM_API_URL (the Bot API base, default
https://api.telegram.org/bot — tests point it at a local stand-in), COCOON_GATEWAY_URL, COCOON_HOME,
BOT_CHAT_FUNCTION (Chat.generate), BOT_SUMMARIZE_FUNCTION (summarize), BOT_EDIT_EVERY_S (0.7: Telegram
rate-limits edits), BOT_POLL_TIMEOUT_S (10, the getUpdates long-poll).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from telegram import Message, Update
from telegram.constants import ChatAction
from telegram.error import BadRequest, NetworkError, RetryAfter, TelegramError, TimedOut
from telegram.ext import Application, CommandHandler, ContextTypes, MessageHandler, filters

from cocoon_faas.client import Client
from cocoon_faas.errors import CocoonError

log = logging.getLogger("cocoon.bot")
CHAT_FN = os.environ.get("BOT_CHAT_FUNCTION", "Chat.generate")
SUMMARIZE_FN = os.environ.get("BOT_SUMMARIZE_FUNCTION", "summarize")
EDIT_EVERY_S = float(os.environ.get("BOT_EDIT_EVERY_S", "0.7"))
MAX_HISTORY = 8  # messages of context kept per chat
MAX_TEXT = 4096  # Telegram refuses a longer message text ("message is too long"), counted in UTF-16 units


def fit(text: str) -> str:
    """`text` cut to what Telegram shows in one message (an ellipsis marks the cut)."""
    if len(text.encode("utf-16-le")) // 2 <= MAX_TEXT:
        return text
    out, units = [], 0
    for ch in text:
        units += len(ch.encode("utf-16-le")) // 2
        if units > MAX_TEXT - 1:
            break
        out.append(ch)
    return "".join(out) + "…"


def retry_after_s(exc: RetryAfter) -> float:
    """A 429's retry_after in seconds (python-telegram-bot gives an int, or a timedelta in newer versions)."""
    ra = exc.retry_after
    return float(ra.total_seconds() if hasattr(ra, "total_seconds") else ra)


async def edit(message: Message, text: str, *, final: bool) -> float:
    """Show `text` in the bot's reply. Telegram rate-limits edits (429 with retry_after) and has bad moments
    (5xx): a passing update is skipped, returning how long to hold off further ones; the final one is retried a
    few times. The paid call is never re-run for it."""
    for attempt in range(4 if final else 1):
        try:
            await message.edit_text(fit(text))
            return 0.0
        except RetryAfter as exc:
            wait = retry_after_s(exc)
            if not final:
                return wait
            await asyncio.sleep(min(wait, 30.0))
        except BadRequest as exc:  # e.g. "message is not modified": retrying cannot help
            log.warning("edit refused: %s", exc)
            return 0.0
        except NetworkError as exc:  # 5xx, timeouts
            log.warning("edit failed (attempt %d): %s", attempt + 1, exc)
            if not final:
                return 0.0
            await asyncio.sleep(0.5 * (attempt + 1))
    return 0.0


async def send(message: Message, text: str) -> Message:
    """`message.reply_text(text)`, waiting out a 429 (retry_after) or a 5xx a few times: a summary the bot paid
    for is not dropped because Telegram was busy. A timeout is not retried (the message may have been sent)."""
    for attempt in range(4):
        try:
            return await message.reply_text(fit(text))
        except RetryAfter as exc:
            if attempt == 3:
                raise
            await asyncio.sleep(min(retry_after_s(exc), 30.0))
        except (BadRequest, TimedOut):
            raise
        except NetworkError:
            if attempt == 3:
                raise
            await asyncio.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


async def typing(context: ContextTypes.DEFAULT_TYPE, chat_id: int) -> None:
    """The "typing…" hint: best effort, a refused one (429) must not stop the answer."""
    try:
        await context.bot.send_chat_action(chat_id, ChatAction.TYPING)
    except TelegramError as exc:
        log.info("typing hint refused: %s", exc)


async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
    """The Bot API failed under a handler (after its own retries): log it; the polling loop carries on."""
    log.warning("update %s not handled: %r", getattr(update, "update_id", "?"), context.error)


def polite(exc: Exception) -> str:
    """What the user reads when a call fails: no stack trace, what happened and what to do."""
    if isinstance(exc, CocoonError) and exc.status == 402:
        return "Sorry — the bot's prepaid credit has run out. Please try again later."
    if isinstance(exc, CocoonError) and exc.status in (429, 503, 504):
        return "Sorry — the model is busy right now. Please try again in a minute."
    if isinstance(exc, CocoonError) and exc.type in ("function_error", "invalid_request"):
        return f"Sorry — I couldn't answer that ({exc.message.split(':', 1)[-1].strip()}). Please rephrase and try again."
    return "Sorry — something went wrong on my side. Please try again."


async def astream(client: Client, name: str, args: dict[str, Any]) -> AsyncIterator[Any]:
    """The SDK's (blocking) SSE stream, consumed from a worker thread so the bot's event loop keeps running."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[Any] = asyncio.Queue()
    done = object()

    def run() -> None:
        try:
            for item in client.stream(name, args):
                loop.call_soon_threadsafe(q.put_nowait, item)
            loop.call_soon_threadsafe(q.put_nowait, done)
        except Exception as exc:  # noqa: BLE001 - handed to the event loop, raised there
            loop.call_soon_threadsafe(q.put_nowait, exc)

    worker = loop.run_in_executor(None, run)
    while True:
        item = await q.get()
        if item is done:
            break
        if isinstance(item, Exception):
            raise item
        yield item
    await worker


class Bot:
    def __init__(self, client: Client) -> None:
        self.client = client
        self.history: dict[int, list[dict[str, str]]] = {}
        self.turns: dict[int, asyncio.Lock] = {}  # one answer at a time per chat: its history stays in order

    async def start(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        assert update.message is not None
        await update.message.reply_text("Hi! Send me a message and I'll answer with a model running on Cocoon; "
                                        "/summarize TEXT for a summary. Each answer is paid per call.")

    async def summarize(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        assert update.message is not None and update.effective_chat is not None
        text = " ".join(context.args or [])
        if not text:
            await update.message.reply_text("Send the text to summarize after the command: /summarize TEXT")
            return
        await typing(context, update.effective_chat.id)
        try:
            out = await asyncio.to_thread(self.client.call, SUMMARIZE_FN, {"text": text})
        except CocoonError as exc:
            log.warning("summarize failed: %s", exc)
            await send(update.message, polite(exc))
            return
        await send(update.message, f"Summary ({out['words']} words): {out['summary']}")

    async def chat(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        assert update.effective_chat is not None
        async with self.turns.setdefault(update.effective_chat.id, asyncio.Lock()):
            await self._chat(update, context)

    async def _chat(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        assert update.message is not None and update.effective_chat is not None and update.message.text
        chat_id = update.effective_chat.id
        history = self.history.setdefault(chat_id, [])
        history.append({"role": "user", "content": update.message.text})
        await typing(context, chat_id)
        try:
            reply = await send(update.message, "…")
        except TelegramError:
            history.pop()  # nothing was called (nor paid) yet: the error handler logs it
            raise
        answer, shown, next_edit = "", "…", time.monotonic()
        try:
            async for item in astream(self.client, CHAT_FN, {"messages": history[-MAX_HISTORY:], "max_tokens": 256}):
                answer += str(item.get("delta", "")) if isinstance(item, dict) else ""
                if answer.strip() and answer != shown and time.monotonic() >= next_edit:
                    hold = await edit(reply, answer, final=False)  # a long answer grows in place
                    shown, next_edit = answer, time.monotonic() + max(EDIT_EVERY_S, hold)
                    if not hold:
                        await typing(context, chat_id)
            final = answer.strip() or "(no answer)"
            if final != shown:
                await edit(reply, final, final=True)
            history.append({"role": "assistant", "content": final})
        except CocoonError as exc:
            history.pop()
            log.warning("chat failed: %s", exc)
            await edit(reply, polite(exc), final=True)


def build(token: str, client: Client | None = None) -> Application:  # type: ignore[type-arg]
    # updates are handled side by side (python-telegram-bot's default is one at a time: every chat waited for
    # the answer streaming to another); a chat's own messages still take turns (Bot.turns)
    app = (Application.builder().token(token).concurrent_updates(True)
           .base_url(os.environ.get("TELEGRAM_API_URL", "https://api.telegram.org/bot")).build())
    bot = Bot(client or Client())
    app.add_handler(CommandHandler("start", bot.start, filters.UpdateType.MESSAGE))
    app.add_handler(CommandHandler("summarize", bot.summarize, filters.UpdateType.MESSAGE))
    # new messages only: an edited message (or a channel post) has no `update.message` to answer
    app.add_handler(MessageHandler(filters.UpdateType.MESSAGE & filters.TEXT & ~filters.COMMAND, bot.chat))
    app.add_error_handler(on_error)
    return app


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    token = os.environ.get("TELEGRAM_BOT_TOKEN")
    if not token:
        raise SystemExit("set TELEGRAM_BOT_TOKEN to the token BotFather gave you")
    build(token).run_polling(timeout=int(os.environ.get("BOT_POLL_TIMEOUT_S", "10")), poll_interval=0.0,
                             allowed_updates=["message"])


if __name__ == "__main__":
    main()
