"""A local stand-in for the Telegram Bot API's HTTP surface that examples/telegram_bot.py uses (tests only):
getMe, deleteWebhook, getUpdates (long poll with offset and timeout), sendMessage, editMessageText, sendChatAction,
as documented at https://core.telegram.org/bots/api: POST /bot<token>/<method>, form or JSON parameters,
answers {"ok": true, "result": ...} or {"ok": false, "error_code", "description"}. It keeps every call so a test
can read what the bot did. Runs under uvicorn in a thread on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

BOT_USER = {"id": 777000111, "is_bot": True, "first_name": "Cocoon", "username": "cocoon_test_bot",
            "can_join_groups": False, "can_read_all_group_messages": False, "supports_inline_queries": False}


@dataclass
class Sent:
    message_id: int
    chat_id: int
    text: str
    edits: list[str] = field(default_factory=list)


class BotApiStandIn:
    def __init__(self, token: str, port: int) -> None:
        self.token, self.port = token, port
        self.url = f"http://127.0.0.1:{port}/bot"
        self.lock = threading.Lock()
        self.updates: list[dict[str, Any]] = []
        self.sent: dict[int, Sent] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._next_update, self._next_message = 1, 100
        self._server: uvicorn.Server | None = None
        # failures to answer, in order: (method, HTTP status, extra fields such as {"parameters": {"retry_after": 1}})
        self.failures: list[tuple[str, int, dict[str, Any]]] = []

    # -- what a test does ----------------------------------------------------------------------------
    def user_says(self, chat_id: int, text: str) -> int:
        with self.lock:
            mid = self._next_message = self._next_message + 1
            entities = [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}] if text.startswith("/") else []
            self.updates.append({"update_id": self._next_update, "message": {
                "message_id": mid, "date": int(time.time()), "text": text, "entities": entities,
                "chat": {"id": chat_id, "type": "private", "first_name": "Ada"},
                "from": {"id": chat_id, "is_bot": False, "first_name": "Ada"}}})
            self._next_update += 1
            return mid

    def update(self, kind: str, body: dict[str, Any]) -> None:
        """Any other update: `kind` is its field ("edited_message", "callback_query", ...)."""
        with self.lock:
            self.updates.append({"update_id": self._next_update, kind: body})
            self._next_update += 1

    def replies(self, chat_id: int) -> list[Sent]:
        with self.lock:
            return [s for s in self.sent.values() if s.chat_id == chat_id]

    def methods(self) -> list[str]:
        with self.lock:
            return [m for m, _ in self.calls]

    # -- the API ----------------------------------------------------------------------------------------
    def _message(self, s: Sent) -> dict[str, Any]:
        return {"message_id": s.message_id, "date": int(time.time()), "text": s.edits[-1] if s.edits else s.text,
                "chat": {"id": s.chat_id, "type": "private"}, "from": BOT_USER}

    async def _handle(self, request: Request) -> JSONResponse:
        if request.path_params["token"] != self.token:
            return JSONResponse({"ok": False, "error_code": 401, "description": "Unauthorized"}, 401)
        method = request.path_params["method"]
        raw = await request.body()
        if request.headers.get("content-type", "").startswith("application/json"):
            p = dict(json.loads(raw or b"{}"))
        else:  # application/x-www-form-urlencoded, what python-telegram-bot sends for calls without files
            p = dict(parse_qsl(raw.decode(), keep_blank_values=True))
        with self.lock:
            self.calls.append((method, p))
            fail = next((f for f in self.failures if f[0] == method), None)
            if fail is not None:
                self.failures.remove(fail)
        if fail is not None:
            return JSONResponse({"ok": False, "error_code": fail[1], "description": f"injected {fail[1]}",
                                 **fail[2]}, fail[1])
        if len(str(p.get("text", "")).encode("utf-16-le")) > 2 * 4096:
            return JSONResponse({"ok": False, "error_code": 400, "description": "Bad Request: message is too long"},
                                400)
        if method == "getMe":
            return self._ok(BOT_USER)
        if method in ("deleteWebhook", "sendChatAction"):
            return self._ok(True)
        if method == "getUpdates":
            offset, timeout = int(p.get("offset") or 0), float(p.get("timeout") or 0)
            deadline = time.monotonic() + min(timeout, 2.0)
            while True:
                with self.lock:
                    self.updates = [u for u in self.updates if u["update_id"] >= offset]
                    ready = list(self.updates)
                if ready or time.monotonic() >= deadline:
                    return self._ok(ready)
                await asyncio.sleep(0.05)
        if method == "sendMessage":
            with self.lock:
                self._next_message += 1
                s = self.sent[self._next_message] = Sent(self._next_message, int(p["chat_id"]), str(p["text"]))
            return self._ok(self._message(s))
        if method == "editMessageText":
            with self.lock:
                s = self.sent.get(int(p.get("message_id") or 0))
                if s is None or s.chat_id != int(p["chat_id"]):
                    return JSONResponse({"ok": False, "error_code": 400,
                                         "description": "Bad Request: message to edit not found"}, 400)
                if (s.edits[-1] if s.edits else s.text) == p["text"]:
                    return JSONResponse({"ok": False, "error_code": 400, "description": "Bad Request: message is "
                                         "not modified: specified new message content is exactly the same"}, 400)
                s.edits.append(str(p["text"]))
            return self._ok(self._message(s))
        return JSONResponse({"ok": False, "error_code": 404, "description": f"Not Found: method {method}"}, 404)

    @staticmethod
    def _ok(result: Any) -> JSONResponse:
        return JSONResponse({"ok": True, "result": json.loads(json.dumps(result))})

    def start(self) -> BotApiStandIn:
        app = Starlette(routes=[Route("/bot{token}/{method}", self._handle, methods=["GET", "POST"])])
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        threading.Thread(target=self._server.run, daemon=True).start()
        while not self._server.started:
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
