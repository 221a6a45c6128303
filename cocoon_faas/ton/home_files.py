"""The caller's money files under COCOON_HOME: `wallet.json` (the wallet key) and `channel.json` (the open channel).

Read in one place, with errors that name the file and the fix: a damaged file ends a command with one line, never
a traceback; and nothing here overwrites one (the channel record may be the only way back to a funded deposit).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cocoon_faas.errors import InvalidRequestError
from cocoon_faas.ton.keys import PrivateKey

# what `cocoon channel close|show|finish` read from the record; a file without them cannot reach its channel
CHANNEL_FIELDS = ("channel_id", "key_a", "key_b", "dest_a", "dest_b", "address")


def load_wallet_key(path: Path) -> PrivateKey:
    """The wallet key from wallet.json ({"words": [...]}), a 24-word phrase, or a 64-hex Ed25519 seed."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        raise InvalidRequestError(f"no wallet key at {path}; run `cocoon wallet create` (or pass --key-file)"
                                  ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"cannot read the wallet key at {path} ({exc}); fix its permissions or restore "
                                  "it from your 24 words") from None
    if text.startswith("{"):
        try:
            words = json.loads(text)["words"]
        except (ValueError, KeyError, TypeError):
            raise InvalidRequestError(f"{path} is damaged (not wallet JSON with \"words\"); restore it from your "
                                      "24 words: write them into the file, one line") from None
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise InvalidRequestError(f"{path}: \"words\" must be a list of 24 words; restore it from your 24 words")
        return PrivateKey.from_mnemonic(words)
    words = text.split()
    if len(words) == 24:
        return PrivateKey.from_mnemonic(words)
    try:
        return PrivateKey.from_bytes(bytes.fromhex(text))
    except ValueError:
        raise InvalidRequestError(f"{path} holds neither wallet JSON, 24 words nor a 64-hex seed; restore it from "
                                  "your 24 words") from None


def read_channel(path: Path, need: tuple[str, ...] = CHANNEL_FIELDS) -> dict[str, Any] | None:
    """The open channel's record, or None when there is none; a damaged record (one without the `need`ed fields)
    is an error, never 'none'. Paying needs only the channel's id; closing needs all of it."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"cannot read the channel record {path} ({exc}); fix its permissions") from None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    missing = [k for k in need if k not in data] if isinstance(data, dict) else list(need)
    if missing or not isinstance(data, dict) or not isinstance(data.get("channel_id"), int):
        raise InvalidRequestError(f"the channel record {path} is damaged (missing or bad: "
                                  f"{', '.join(missing) or 'channel_id'}); restore it from a backup: it is how the "
                                  "CLI reaches your deposit")
    return data
