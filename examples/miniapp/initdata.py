"""Validating Telegram Mini App `initData`, per Telegram's documented algorithm
(https://core.telegram.org/bots/webapps#validating-data-received-via-the-mini-app):

    data_check_string = "\\n".join(f"{k}={v}" for k, v in sorted(fields) if k != "hash")   (values URL-decoded)
    secret_key        = HMAC-SHA256(key="WebAppData", message=bot_token)
    valid             ⇔ hex(HMAC-SHA256(key=secret_key, message=data_check_string)) == hash

and `auth_date` no older than `max_age_s` (Telegram signs it; a stale one is a replay). Compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode


class InitDataError(ValueError):
    """initData refused: `reason` says why (missing, forged, stale, malformed)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class TelegramUser:
    id: int
    first_name: str
    username: str | None
    auth_date: int


def _secret(bot_token: str) -> bytes:
    return hmac.new(b"WebAppData", bot_token.encode(), hashlib.sha256).digest()


def _check_string(fields: dict[str, str]) -> bytes:
    return "\n".join(f"{k}={fields[k]}" for k in sorted(fields) if k != "hash").encode()


def sign_init_data(fields: dict[str, str], bot_token: str) -> str:
    """The query string Telegram would hand the Mini App for `fields` (tests and local development only)."""
    h = hmac.new(_secret(bot_token), _check_string(fields), hashlib.sha256).hexdigest()
    return urlencode({**fields, "hash": h})


def validate_init_data(init_data: str, bot_token: str, *, max_age_s: float = 3600.0,
                       now: float | None = None) -> TelegramUser:
    """The user behind a genuine, fresh initData; `InitDataError` otherwise."""
    if not init_data:
        raise InitDataError("missing", "no Telegram initData: open the Mini App from Telegram")
    try:
        pairs = parse_qsl(init_data, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise InitDataError("malformed", "initData is not a URL-encoded query string") from None
    fields = dict(pairs)
    if len(fields) != len(pairs):  # Telegram never repeats a field; the signed value and the one read could differ
        seen = [k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i])]
        raise InitDataError("malformed", f"initData repeats the field {seen[0]!r}; pass it as Telegram gave it")
    if "hash" not in fields:
        raise InitDataError("malformed", "initData has no hash; pass Telegram.WebApp.initData unchanged")
    got = fields["hash"]
    want = hmac.new(_secret(bot_token), _check_string(fields), hashlib.sha256).hexdigest()
    # bytes: compare_digest raises TypeError on a str with non-ASCII characters (a 500 for a forged hash)
    if not hmac.compare_digest(got.lower().encode(), want.encode()):
        raise InitDataError("forged", "initData hash does not verify with this bot's token (altered, or from "
                            "another bot)")
    try:
        auth_date = int(fields["auth_date"])
        user: dict[str, Any] = json.loads(fields.get("user", "{}"))
        uid = int(user["id"])
    except (KeyError, ValueError, TypeError):
        raise InitDataError("malformed", "initData lacks auth_date or a user with an id") from None
    age = (now if now is not None else time.time()) - auth_date
    if age > max_age_s:
        raise InitDataError("stale", f"initData is {age:.0f}s old (limit {max_age_s:.0f}s); reopen the Mini App")
    if age < -60:
        raise InitDataError("stale", "initData is dated in the future; check the server's clock")
    return TelegramUser(uid, str(user.get("first_name", "")), user.get("username"), auth_date)
