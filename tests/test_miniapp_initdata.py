"""Telegram Mini App initData validation (examples/miniapp/initdata.py): genuine data passes; forged, re-signed
with another bot's token, stale, future-dated, malformed or missing data is refused with the reason named."""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
from urllib.parse import quote

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "examples" / "miniapp"))
from initdata import InitDataError, sign_init_data, validate_init_data  # noqa: E402

TOKEN = "7001234567:AAE-example-token"
NOW = 1_780_000_000
USER = json.dumps({"id": 99, "first_name": "Ada", "username": "ada"}, separators=(",", ":"))


def telegram_style(fields: dict[str, str], token: str) -> str:
    """initData built step by step from Telegram's documentation, independently of initdata.py."""
    check = "\n".join(f"{k}={v}" for k, v in sorted(fields.items()))
    secret = hmac.new(key=b"WebAppData", msg=token.encode(), digestmod=hashlib.sha256).digest()
    h = hmac.new(key=secret, msg=check.encode(), digestmod=hashlib.sha256).hexdigest()
    return "&".join(f"{k}={quote(v, safe='')}" for k, v in {**fields, "hash": h}.items())


def fields(auth_date: int = NOW) -> dict[str, str]:
    return {"query_id": "AAHdF6IQAAAAAN0XohDhrOrc", "user": USER, "auth_date": str(auth_date)}


def reason(init: str, **kw: float) -> str:
    with pytest.raises(InitDataError) as e:
        validate_init_data(init, TOKEN, now=NOW, **kw)
    return e.value.reason


def test_genuine_initdata_passes_and_names_the_user() -> None:
    for init in (telegram_style(fields(), TOKEN), sign_init_data(fields(), TOKEN)):
        u = validate_init_data(init, TOKEN, now=NOW + 10)
        assert (u.id, u.first_name, u.username, u.auth_date) == (99, "Ada", "ada", NOW)


def test_forged_stale_and_malformed_initdata_is_refused() -> None:
    good = telegram_style(fields(), TOKEN)
    assert reason(good.replace("%22id%22%3A99", "%22id%22%3A98")) == "forged"  # another user id, same hash
    assert reason(telegram_style(fields(), "123:another-bot")) == "forged"
    assert reason(good.replace("hash=", "hash=0")) == "forged"
    assert reason(telegram_style(fields(NOW - 7200), TOKEN)) == "stale"
    assert reason(telegram_style(fields(NOW + 600), TOKEN)) == "stale"
    validate_init_data(telegram_style(fields(NOW - 7200), TOKEN), TOKEN, now=NOW, max_age_s=86400)
    assert reason("") == "missing"
    assert reason("%%%") == "malformed"
    no_user = {"auth_date": str(NOW), "query_id": "x"}
    assert reason(telegram_style(no_user, TOKEN)) == "malformed"


def test_odd_initdata_is_refused_with_a_reason_never_an_exception() -> None:
    """A non-ASCII hash raised TypeError (the Mini App server's 500); a repeated field was read as its last value
    and a missing hash was called forged. An uppercase hash is the same hex digest and passes; unicode in the user
    too."""
    good = telegram_style(fields(), TOKEN)
    assert reason(good.split("&hash=")[0] + "&hash=%C3%A9") == "forged"
    assert reason(good.split("&hash=")[0]) == "malformed"
    assert reason("user=%7B%22id%22%3A1%7D&" + good) == "malformed"
    head, h = good.split("&hash=")
    assert validate_init_data(f"{head}&hash={h.upper()}", TOKEN, now=NOW).id == 99
    uni = {**fields(), "user": json.dumps({"id": 7, "first_name": "Алёна 🚀"}, ensure_ascii=False)}
    assert validate_init_data(telegram_style(uni, TOKEN), TOKEN, now=NOW).first_name == "Алёна 🚀"
