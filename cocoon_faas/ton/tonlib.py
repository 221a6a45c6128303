"""The `ton` settlement backend: TON testnet/mainnet, with pytonlib as the transport (optional extra `ton`).

Everything that carries meaning is built and signed here, not in tonlib: the wallet transfer is a v3 external
message signed locally (cocoon_faas.ton.wallet), its internal message carries our channel message cell (and the
channel's StateInit when the channel is not deployed yet). tonlib only delivers the BOC (``raw.sendMessage``) and
runs get methods (``seqno``, ``get_channel_data``) on a liteserver. `TonChain` takes any `Transport`, so the bytes it
would send are checked offline (tests/test_ton_backend.py runs them through the real wallet and channel code in a
TVM emulator); `PytonlibTransport` is the network one. pytonlib is GPL-3.0, hence an optional extra.

``get_channel_data`` returns (state, [bal_A, bal_B], [key_A, key_B], channel_id, [Q, fine, C],
[committed_A, committed_B], quarantine|null, [excess_fee, addr_A, addr_B])  (specs/ton-payment-channel.md).
"""

from __future__ import annotations

import asyncio
import base64
import json
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol

from pytoniq_core import Cell, Slice

from cocoon_faas.errors import ConflictError, InvalidRequestError
from cocoon_faas.ton.address import Address
from cocoon_faas.ton.chain import SendResult
from cocoon_faas.ton.channel import (
    CHANNEL_CODE_HASH,
    ChannelConfig,
    ChannelData,
    ClosingConfig,
    PaymentConfig,
    QuarantinedState,
)
from cocoon_faas.ton.keys import PrivateKey, PublicKey
from cocoon_faas.ton.wallet import Wallet, internal_message, state_init_cell

SEND_MODE = 3  # pay transfer fees separately, ignore errors
TRANSFER_TTL_S = 60


class Transport(Protocol):
    """What `TonChain` needs from the network. Stack values: int, Cell, Slice, list (tuple), None."""

    def send_boc(self, boc: bytes) -> None: ...
    def run_get_method(self, address: Address, method: str) -> tuple[int, list[Any]]: ...
    def balance(self, address: Address) -> int: ...


def _int(v: Any) -> int:
    if not isinstance(v, int):
        raise ConflictError(f"get_channel_data returned {type(v).__name__} where a number belongs")
    return v


def _cell(v: Any) -> Cell:
    return v.to_cell() if isinstance(v, Slice) else v


def plain(v: Any) -> Any:
    """Stack values as plain Python: pytoniq-core's VmTuple (and tuples) become lists, recursively."""
    if hasattr(v, "list") and not isinstance(v, (Cell, Slice)):
        v = v.list
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v


def parse_channel_data(stack: list[Any]) -> ChannelData:
    """The get_channel_data stack -> the same ChannelData the storage cell holds."""
    stack = plain(stack)
    if len(stack) != 8:
        raise ConflictError(f"get_channel_data returned {len(stack)} values, expected 8; is this a payment channel?")
    state, bals, keys, cid, closing, committed, quarantine, payment = stack
    q = QuarantinedState.from_cell(_cell(quarantine)) if isinstance(quarantine, (Cell, Slice)) else None
    dest_a, dest_b = (Address.load(_cell(x).begin_parse()) for x in payment[1:3])  # never consume the caller's
    return ChannelData(
        inited=_int(state) != 0, balance_a=_int(bals[0]), balance_b=_int(bals[1]),
        key_a=PublicKey.from_int(_int(keys[0])), key_b=PublicKey.from_int(_int(keys[1])), channel_id=_int(cid),
        closing=ClosingConfig(_int(closing[0]), _int(closing[1]), _int(closing[2])),
        committed_seqno_a=_int(committed[0]), committed_seqno_b=_int(committed[1]), quarantine=q,
        payment=PaymentConfig(_int(payment[0]), dest_a, dest_b))


class TonChain:
    """Settlement on TON through a `Transport`; the same calls as `LocalChain` (minus the faucet)."""

    def __init__(self, transport: Transport | None = None, network: str = "testnet", config_path: Path | None = None,
                 channel_code: Cell | None = None, clock: Callable[[], float] = time.time, wait_s: float = 0.0,
                 **_: Any) -> None:
        if network not in ("testnet", "mainnet"):
            raise InvalidRequestError(f"COCOON_TON_NETWORK must be 'testnet' or 'mainnet', not {network!r}")
        self.network = network
        self._transport = transport
        self._config_path = config_path
        self.channel_code = channel_code
        self.clock = clock
        self.wait_s = wait_s

    @property
    def transport(self) -> Transport:
        if self._transport is None:
            self._transport = PytonlibTransport(self._config_path)
        return self._transport

    def balance(self, address: Address) -> int:
        return self.transport.balance(address)

    def now(self) -> int:
        """Chain time as the contract sees it (block time tracks wall time within seconds)."""
        return int(self.clock())

    def wallet_seqno(self, wallet: Wallet) -> int:
        """The wallet's next seqno; 0 when it is not deployed yet (its first transfer deploys it)."""
        code, stack = self.transport.run_get_method(wallet.address, "seqno")
        return _int(plain(stack)[0]) if code == 0 and stack else 0

    def channel_data(self, cfg: ChannelConfig) -> ChannelData | None:
        code, stack = self.transport.run_get_method(cfg.address, "get_channel_data")
        if code != 0 or not stack:
            return None
        return parse_channel_data(stack)

    def transfer(self, key: PrivateKey, wallet: Wallet, dest: Address, value: int, body: Cell | None = None,
                 state_init: Cell | None = None, seqno: int | None = None) -> Cell:
        """The signed external message that makes `wallet` send `value` (and `body`) to `dest`."""
        seqno = self.wallet_seqno(wallet) if seqno is None else seqno
        msg = internal_message(dest, value, body, state_init)
        signed = wallet.transfer_body(key, seqno, int(self.clock()) + TRANSFER_TTL_S, [(SEND_MODE, msg)])
        return wallet.external_message(signed, with_state_init=seqno == 0)

    def channel_state_init(self, cfg: ChannelConfig) -> Cell:
        if self.channel_code is None:
            raise ConflictError("deploying a payment channel on TON needs the contract code; pass channel_code "
                                "(the BOC of tonweb's PAYMENT_CHANNEL_CODE_HEX)")
        if self.channel_code.hash != CHANNEL_CODE_HASH:
            raise InvalidRequestError("channel_code is not the standard payment-channel contract (hash differs)")
        return state_init_cell(self.channel_code, cfg.initial_data().to_cell())

    def send_to_channel(self, key: PrivateKey, wallet: Wallet, cfg: ChannelConfig, body: Cell,
                        value: int) -> SendResult:
        """Send `body` with `value` from `wallet` to the channel (deploying it when absent). The network only
        says it accepted the message: exit code 0 here means sent; the contract's verdict shows in
        `channel_data` a few seconds later (`wait_s` polls for a change)."""
        before = self.channel_data(cfg)
        init = self.channel_state_init(cfg) if before is None else None
        ext = self.transfer(key, wallet, cfg.address, value, body, init)
        self.transport.send_boc(ext.to_boc())
        deadline = time.monotonic() + self.wait_s
        while time.monotonic() < deadline and self.channel_data(cfg) == before:
            time.sleep(1.0)
        return SendResult(0)


def stack_from_tonlib(entries: list[Any]) -> list[Any]:
    """pytonlib's get-method stack (``["num", "0x…"]``, ``["cell", {"bytes": b64}]``, ``["tuple", {...}]`` at the
    top, raw ``tvm.stackEntry*`` objects inside tuples) -> int, Cell, list, None values."""
    out: list[Any] = []
    for e in entries:
        if isinstance(e, dict):
            out.append(_tonlib_entry(e))
            continue
        kind, value = e[0], e[1]
        if kind == "num":
            out.append(int(str(value), 0))
        elif kind in ("cell", "slice"):
            out.append(Cell.one_from_boc(base64.b64decode(value["bytes"])))
        elif kind in ("tuple", "list"):
            out.append([_tonlib_entry(x) for x in value.get("elements", [])])
        else:
            out.append(None)
    return out


def _tonlib_entry(t: dict[str, Any]) -> Any:
    kind = t.get("@type", "")
    if kind == "tvm.stackEntryNumber":
        return int(t["number"]["number"])
    if kind == "tvm.stackEntryCell":
        return Cell.one_from_boc(base64.b64decode(t["cell"]["bytes"]))
    if kind == "tvm.stackEntrySlice":
        return Cell.one_from_boc(base64.b64decode(t["slice"]["bytes"]))
    if kind == "tvm.stackEntryTuple":
        return [_tonlib_entry(x) for x in t["tuple"]["elements"]]
    if kind == "tvm.stackEntryList":
        return [_tonlib_entry(x) for x in t["list"]["elements"]]
    return None  # tvm.stackEntryUnsupported: a null


class PytonlibTransport:
    """tonlib over pytonlib on a private event loop thread (callable from sync code and from inside a loop)."""

    def __init__(self, config_path: Path | None, ls_index: int = 0, timeout: float = 10.0) -> None:
        try:
            from pytonlib import TonlibClient
        except ImportError:
            raise ConflictError("the 'ton' settlement backend needs pytonlib: pip install 'cocoon-faas[ton]' "
                                "(GPL-3.0)") from None
        if config_path is None or not Path(config_path).exists():
            raise InvalidRequestError("set COCOON_TON_CONFIG to a TON global config JSON (testnet: "
                                      "https://ton.org/testnet-global.config.json)")
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True, name="tonlib").start()
        keystore = tempfile.mkdtemp(prefix="cocoon-tonlib-")
        self._client = TonlibClient(ls_index, json.loads(Path(config_path).read_text()), keystore,
                                    loop=self._loop, tonlib_timeout=timeout)
        self._run(self._client.init())

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(60)

    def send_boc(self, boc: bytes) -> None:
        self._run(self._client.raw_send_message(boc))

    def run_get_method(self, address: Address, method: str) -> tuple[int, list[Any]]:
        r = self._run(self._client.raw_run_method(address.raw, method, []))
        return int(r.get("exit_code", -1)), stack_from_tonlib(r.get("stack", []))

    def balance(self, address: Address) -> int:
        return int(self._run(self._client.raw_get_account_state(address.raw)).get("balance", 0))
