"""Paying for calls from the caller's open channel (the one `cocoon channel open` recorded under COCOON_HOME).

One `ChannelSigner` per channel per process: every `Client` of the process that pays from the same channel
shares it. A second signer on the same file would resume past the first one's lease (it cannot know what the
first signed), so the signed `sent` would climb by a lease's headroom per signer: money the caller signed away.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cocoon_faas.ton.client import PayingClient

_payers: dict[Path, PayingClient] = {}
_lock = threading.Lock()


def default_payer(home: Path) -> PayingClient | None:
    """The process's PayingClient for the channel in `home/channel.json`, or None when the caller has none."""
    wallet = home / "wallet.json"
    if not (home / "channel.json").exists():  # no channel: nothing of the TON client is loaded
        return None
    from cocoon_faas.ton.client import ChannelSigner, PayingClient
    from cocoon_faas.ton.home_files import load_wallet_key, read_channel

    current = read_channel(home / "channel.json", need=("channel_id",))
    if current is None or not wallet.exists():
        return None
    path = (home / "channels" / f"{current['channel_id']}.json").resolve()
    with _lock:
        payer = _payers.get(path)
        if payer is None:
            key = load_wallet_key(wallet)  # PBKDF2: once per process
            payer = _payers[path] = PayingClient(ChannelSigner(path, key))
        return payer


def forget_payers() -> None:
    """Flush and drop the process's signers (after `cocoon channel close`, or a test that swaps homes)."""
    with _lock:
        for p in _payers.values():
            p.signer.flush()
        _payers.clear()
