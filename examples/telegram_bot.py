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

from telegram import Update
from telegram.constants import ChatAction
from telegram.ext import Application, CommandHandler, ContextTypes, MessageHandler, filters

from cocoon_faas.client import Client
from cocoon_faas.errors import CocoonError

log = logging.getLogger("cocoon.bot")
CHAT_FN = os.environ.get("BOT_CHAT_FUNCTION", "Chat.generate")
SUMMARIZE_FN = os.environ.get("BOT_SUMMARIZE_FUNCTION", "summarize")
EDIT_EVERY_S = float(os.environ.get("BOT_EDIT_EVERY_S", "0.7"))
MAX_HISTORY = 8  # messages of context kept per chat


def polite(exc: Exception) -> str:
    """What the user reads when a call fails: no stack trace, what happened and what to do."""
    if isinstance(exc, CocoonError) and exc.status == 402:
        return "Sorry — the bot's prepaid credit has run out. Please try again later."
    if isinstance(exc, CocoonError) and exc.status in (429, 503, 504):
        return "Sorry — the model is busy right now. Please try again in a minute."
    if isinstance(exc, CocoonError) and exc.type == "function_error":
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
        await context.bot.send_chat_action(update.effective_chat.id, ChatAction.TYPING)
        try:
            out = await asyncio.to_thread(self.client.call, SUMMARIZE_FN, {"text": text})
            await update.message.reply_text(f"Summary ({out['words']} words): {out['summary']}")
        except CocoonError as exc:
            log.warning("summarize failed: %s", exc)
            await update.message.reply_text(polite(exc))

    async def chat(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        assert update.message is not None and update.effective_chat is not None and update.message.text
        chat_id = update.effective_chat.id
        history = self.history.setdefault(chat_id, [])
        history.append({"role": "user", "content": update.message.text})
        await context.bot.send_chat_action(chat_id, ChatAction.TYPING)
        reply = await update.message.reply_text("…")
        answer, shown, last = "", "…", time.monotonic()
        try:
            async for item in astream(self.client, CHAT_FN, {"messages": history[-MAX_HISTORY:], "max_tokens": 256}):
                answer += str(item.get("delta", "")) if isinstance(item, dict) else ""
                if answer.strip() and answer != shown and time.monotonic() - last >= EDIT_EVERY_S:
                    await reply.edit_text(answer)  # a long answer grows in place
                    shown, last = answer, time.monotonic()
                    await context.bot.send_chat_action(chat_id, ChatAction.TYPING)
            final = answer.strip() or "(no answer)"
            if final != shown:
                await reply.edit_text(final)
            history.append({"role": "assistant", "content": final})
        except CocoonError as exc:
            history.pop()
            log.warning("chat failed: %s", exc)
            await reply.edit_text(polite(exc))


def build(token: str, client: Client | None = None) -> Application:  # type: ignore[type-arg]
    app = (Application.builder().token(token)
           .base_url(os.environ.get("TELEGRAM_API_URL", "https://api.telegram.org/bot")).build())
    bot = Bot(client or Client())
    app.add_handler(CommandHandler("start", bot.start))
    app.add_handler(CommandHandler("summarize", bot.summarize))
    app.add_handler(MessageHandler(filters.TEXT & ~filters.COMMAND, bot.chat))
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
