"""Settlement backends behind one interface, and the `local` one: an embedded chain in SQLite.

The local chain holds wallet balances (funded by a faucet, for development) and channel contracts whose
storage is the exact contract data cell; every message runs through `rules.apply`, which accepts exactly what
the real contract accepts, with the same exit codes (tests/test_ton_contract.py). A rejected message bounces:
its value returns to the sender, minus the flat fee.

The local chain is one file, ``COCOON_CHAIN_PATH`` (default ``$COCOON_HOME/chain.db``). The gateway reads channel
states from it; a caller whose COCOON_HOME differs from the gateway's (another user on the same machine) points
COCOON_CHAIN_PATH at the gateway's file. The `ton` backend (cocoon_faas/ton/tonlib.py) talks to testnet/mainnet.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pytoniq_core import Cell

from cocoon_faas.errors import ConflictError, InvalidRequestError, PaymentRequiredError
from cocoon_faas.ton import rules
from cocoon_faas.ton.address import Address
from cocoon_faas.ton.amounts import format_ton
from cocoon_faas.ton.channel import ChannelConfig, ChannelData
from cocoon_faas.ton.keys import PrivateKey
from cocoon_faas.ton.wallet import Wallet

_MAX_LOCAL_BALANCE = 2**63 - 1  # nanoton: the most a SQLite INTEGER holds
MESSAGE_FEE = 5_000_000  # 0.005 TON per message, taken from the sender's wallet


@dataclass(frozen=True)
class SendResult:
    exit_code: int
    payouts: tuple[rules.Payout, ...] = ()

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class ChainBackend(Protocol):
    def now(self) -> int: ...
    def balance(self, address: Address) -> int: ...
    def send_to_channel(self, key: PrivateKey, wallet: Wallet, cfg: ChannelConfig, body: Cell,
                        value: int) -> SendResult: ...
    def channel_data(self, cfg: ChannelConfig) -> ChannelData | None: ...


class LocalChain:
    """SQLite chain at `path` (default ``$COCOON_HOME/chain.db``)."""

    def __init__(self, path: Path | str, clock: object = time.time) -> None:
        self._db = sqlite3.connect(Path(path), isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS accounts (address TEXT PRIMARY KEY, balance INTEGER NOT NULL);"
            "CREATE TABLE IF NOT EXISTS contracts (address TEXT PRIMARY KEY, data BLOB NOT NULL, "
            "balance INTEGER NOT NULL);"
            "CREATE TABLE IF NOT EXISTS payouts (id INTEGER PRIMARY KEY AUTOINCREMENT, contract TEXT NOT NULL, "
            "dest TEXT NOT NULL, amount INTEGER NOT NULL, at INTEGER NOT NULL);")
        self._lock = threading.Lock()
        self._clock = clock

    def now(self) -> int:
        return int(self._clock())  # type: ignore[operator]

    def balance(self, address: Address) -> int:
        row = self._db.execute("SELECT balance FROM accounts WHERE address=?", (address.raw,)).fetchone()
        return int(row[0]) if row else 0

    def faucet(self, address: Address, amount: int) -> int:
        with self._lock:
            if self.balance(address) + amount > _MAX_LOCAL_BALANCE:  # SQLite's INTEGER: refused, not a traceback
                raise InvalidRequestError(f"the local chain keeps a wallet below "
                                          f"{format_ton(_MAX_LOCAL_BALANCE)} TON; ask the faucet for less")
            self._db.execute("INSERT INTO accounts VALUES (?,?) ON CONFLICT(address) DO UPDATE SET "
                             "balance = balance + excluded.balance", (address.raw, amount))
        return self.balance(address)

    def channel_data(self, cfg: ChannelConfig) -> ChannelData | None:
        row = self._db.execute("SELECT data FROM contracts WHERE address=?", (cfg.address.raw,)).fetchone()
        return ChannelData.from_cell(Cell.one_from_boc(bytes(row[0]))) if row else None

    def contract_balance(self, cfg: ChannelConfig) -> int:
        row = self._db.execute("SELECT balance FROM contracts WHERE address=?", (cfg.address.raw,)).fetchone()
        return int(row[0]) if row else 0

    def payouts(self, cfg: ChannelConfig) -> list[tuple[Address, int]]:
        """Every payout the channel's contract has made: (destination, nanoton), oldest first."""
        rows = self._db.execute("SELECT dest, amount FROM payouts WHERE contract=? ORDER BY id",
                                (cfg.address.raw,)).fetchall()
        return [(Address.parse(d), int(a)) for d, a in rows]

    def send_to_channel(self, key: PrivateKey, wallet: Wallet, cfg: ChannelConfig, body: Cell,
                        value: int) -> SendResult:
        """Wallet -> channel internal message (deploying the channel on first use)."""
        if key.public_key() != wallet.public_key:
            raise InvalidRequestError("this key does not own the sending wallet")
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                have = self.balance(wallet.address)
                if have < value + MESSAGE_FEE:
                    raise PaymentRequiredError(
                        f"wallet {wallet.address} holds {have} nanoton, needs {value + MESSAGE_FEE}; fund it "
                        "(`cocoon wallet faucet 10` on the local chain)", needed=value + MESSAGE_FEE - have)
                data = self.channel_data(cfg) or cfg.initial_data()
                balance = self.contract_balance(cfg) + value
                out = rules.apply(data, body, balance, self.now())
                db.execute("UPDATE accounts SET balance = balance - ? WHERE address=?",
                           (MESSAGE_FEE + (value if out.accepted else 0), wallet.address.raw))
                if out.accepted:
                    for p in out.payouts:
                        amount = balance if p.mode & 128 else min(p.amount, balance)
                        balance -= amount
                        db.execute("INSERT INTO accounts VALUES (?,?) ON CONFLICT(address) DO UPDATE SET "
                                   "balance = balance + excluded.balance", (p.dest.raw, amount))
                        db.execute("INSERT INTO payouts (contract, dest, amount, at) VALUES (?,?,?,?)",
                                   (cfg.address.raw, p.dest.raw, amount, self.now()))
                    db.execute("INSERT INTO contracts VALUES (?,?,?) ON CONFLICT(address) DO UPDATE SET "
                               "data=excluded.data, balance=excluded.balance",
                               (cfg.address.raw, out.data.to_cell().to_boc(), balance))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return SendResult(out.exit_code, out.payouts)


def local_chain_path(home: Path, chain_path: Path | None = None) -> Path:
    """The local chain's file: COCOON_CHAIN_PATH, else home/chain.db."""
    return Path(chain_path) if chain_path else home / "chain.db"


def open_backend(kind: str, home: Path, chain_path: Path | None = None, **ton: Any) -> Any:
    """The settlement backend `kind` ('local' or 'ton'); `ton` keywords go to `TonChain`."""
    if kind == "local":
        path = local_chain_path(home, chain_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return LocalChain(path)
    if kind == "ton":
        from cocoon_faas.ton.tonlib import TonChain

        code = home / "payment_channel.boc"  # tonweb's PAYMENT_CHANNEL_CODE_HEX as a BOC, to deploy channels
        return TonChain(channel_code=Cell.one_from_boc(code.read_bytes()) if code.exists() else None, wait_s=30.0,
                        **ton)
    raise InvalidRequestError(f"unknown settlement backend {kind!r}; set COCOON_SETTLEMENT to 'local' or 'ton'")


def backend_from_settings(settings: Any) -> Any:
    """The backend the settings choose (COCOON_SETTLEMENT, COCOON_CHAIN_PATH, COCOON_TON_*)."""
    return open_backend(settings.settlement, settings.home, settings.chain_path,
                        network=settings.ton_network, config_path=settings.ton_config)


def require_ok(result: SendResult, what: str) -> SendResult:
    if not result.ok:
        raise ConflictError(f"{what} was rejected by the channel contract: exit code {result.exit_code} "
                            f"({rules.ERR_NAMES.get(result.exit_code, '?')})", exit_code=result.exit_code)
    return result
