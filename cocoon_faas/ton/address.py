"""Standard TON addresses: raw ``wc:hex`` and user-friendly base64url (spec: "Keys and addresses").

User-friendly = base64url(flags, workchain, hash[32], crc16-xmodem of the first 34 bytes); flags 0x11
bounceable ("EQ…"), 0x51 non-bounceable ("UQ…"), +0x80 testnet-only. In cells an address is a std
``MsgAddress``: bits ``10``, anycast bit ``0``, ``workchain:int8``, ``hash:bits256`` (267 bits).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from pytoniq_core import Builder, Cell, Slice

from cocoon_faas.errors import InvalidRequestError

BOUNCEABLE = 0x11
NON_BOUNCEABLE = 0x51
TESTNET = 0x80


def crc16_xmodem(data: bytes) -> bytes:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc.to_bytes(2, "big")


@dataclass(frozen=True)
class Address:
    """An account address: workchain and 32-byte account hash."""

    workchain: int
    hash: bytes

    def __post_init__(self) -> None:
        if len(self.hash) != 32 or not -128 <= self.workchain <= 127:
            raise InvalidRequestError("an address is a workchain in [-128, 127] and a 32-byte hash")

    @property
    def raw(self) -> str:
        return f"{self.workchain}:{self.hash.hex()}"

    def friendly(self, bounceable: bool = True, testnet: bool = False, url_safe: bool = True) -> str:
        flags = (BOUNCEABLE if bounceable else NON_BOUNCEABLE) | (TESTNET if testnet else 0)
        body = bytes([flags, self.workchain & 0xFF]) + self.hash
        enc = base64.urlsafe_b64encode if url_safe else base64.b64encode
        return enc(body + crc16_xmodem(body)).decode()

    def __str__(self) -> str:
        return self.friendly()

    @classmethod
    def parse(cls, text: str) -> Address:
        """Raw (``0:ab…``) or user-friendly (either base64 alphabet) -> Address; checks the CRC."""
        text = text.strip()
        if ":" in text:
            wc, _, hx = text.partition(":")
            try:
                return cls(int(wc), bytes.fromhex(hx))
            except ValueError:
                raise InvalidRequestError(f"bad raw address {text!r}: expected '<workchain>:<64 hex>'") from None
        try:
            data = base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
        except ValueError:
            raise InvalidRequestError(f"bad address {text!r}: not raw and not base64") from None
        if len(data) != 36 or crc16_xmodem(data[:34]) != data[34:]:
            raise InvalidRequestError(f"bad address {text!r}: wrong length or checksum (a typo?)")
        if data[0] & 0x7F not in (BOUNCEABLE, NON_BOUNCEABLE):
            raise InvalidRequestError(f"bad address {text!r}: unknown flags byte {data[0]:#x}")
        return cls(int.from_bytes(data[1:2], "big", signed=True), data[2:34])

    def store(self, b: Builder) -> Builder:
        """addr_std$10 anycast:(Maybe Anycast) workchain_id:int8 address:bits256 = MsgAddressInt;"""
        return b.store_uint(0b100, 3).store_int(self.workchain, 8).store_bytes(self.hash)

    @classmethod
    def load(cls, s: Slice) -> Address:
        tag = s.load_uint(3)
        if tag != 0b100:
            raise InvalidRequestError(f"expected a std address without anycast, got prefix {tag:03b}")
        wc = s.load_int(8)
        return cls(wc, s.load_bytes(32))

    @classmethod
    def from_state_init(cls, state_init: Cell, workchain: int = 0) -> Address:
        return cls(workchain, state_init.hash)


def state_init_hash(code_hash: bytes, code_depth: int, data: Cell) -> bytes:
    """Hash of ``StateInit{code, data}`` from the code's hash and depth alone.

    A cell's representation hash covers its children only through their hashes and depths, so an address can
    be computed without holding the code (we do not ship the payment-channel contract code).
    StateInit bits ``0 0 1 1 0`` (no split_depth, no special, code, data, no library): d1=2 refs, d2=1,
    padded data byte 0x34.
    """
    data_depth = data.get_depth()
    return hashlib.sha256(
        bytes([2, 1, 0x34]) + code_depth.to_bytes(2, "big") + data_depth.to_bytes(2, "big") + code_hash
        + data.hash
    ).digest()
