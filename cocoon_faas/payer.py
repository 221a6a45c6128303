"""Paying for calls from the caller's open channel (the one `cocoon channel open` recorded under COCOON_HOME)."""

from __future__ import annotations

import json
from pathlib import Path

from cocoon_faas.ton.client import ChannelSigner, PayingClient
from cocoon_faas.ton.keys import PrivateKey


def default_payer(home: Path) -> PayingClient | None:
    """A PayingClient for the channel in `home/channel.json`, or None when the caller has no open channel."""
    current, wallet = home / "channel.json", home / "wallet.json"
    if not current.exists() or not wallet.exists():
        return None
    cid = json.loads(current.read_text())["channel_id"]
    key = PrivateKey.from_mnemonic(json.loads(wallet.read_text())["words"])
    return PayingClient(ChannelSigner(home / "channels" / f"{cid}.json", key))

