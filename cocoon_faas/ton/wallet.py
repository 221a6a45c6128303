"""Standard wallet contracts (v3R1, v3R2): addresses from a public key, and signed transfers.

The wallet code cells are the well-known public constants every TON SDK carries. A wallet's address is
the hash of StateInit{code, data} with data seqno:uint32 subwallet_id:uint32 public_key:bits256
(subwallet 698983191 + workchain by default). Transfers are external messages the wallet checks
(signature, subwallet, expiry, seqno) before it sends the internal messages inside them.
"""

from __future__ import annotations

from dataclasses import dataclass

from pytoniq_core import Builder, Cell, begin_cell

from cocoon_faas.errors import InvalidRequestError
from cocoon_faas.ton.address import Address
from cocoon_faas.ton.keys import PrivateKey, PublicKey

WALLET_CODES = {
    "v3r1": "B5EE9C724101010100620000C0FF0020DD2082014C97BA9730ED44D0D70B1FE0A4F2608308D71820D31FD31FD31FF82313BBF263ED44D0D31FD31FD3FFD15132BAF2A15144BAF2A204F901541055F910F2A3F8009320D74A96D307D402FB00E8D101A4C8CB1FCB1FCBFFC9ED543FBE6EE0",
    "v3r2": "B5EE9C724101010100710000DEFF0020DD2082014C97BA218201339CBAB19F71B0ED44D0D31FD31F31D70BFFE304E0A4F2608308D71820D31FD31FD31FF82313BBF263ED44D0D31FD31FD3FFD15132BAF2A15144BAF2A204F901541055F910F2A3F8009320D74A96D307D402FB00E8D101A4C8CB1FCB1FCBFFC9ED5410BD6DAD",
}
DEFAULT_SUBWALLET = 698983191


def wallet_code(version: str) -> Cell:
    try:
        return Cell.one_from_boc(bytes.fromhex(WALLET_CODES[version.lower()]))
    except KeyError:
        raise InvalidRequestError(f"unknown wallet version {version!r}; use one of {sorted(WALLET_CODES)}") from None


def state_init_cell(code: Cell, data: Cell) -> Cell:
    """_ split_depth:(Maybe (## 5)) special:(Maybe TickTock) code:(Maybe ^Cell) data:(Maybe ^Cell)
    library:(Maybe ^Cell) = StateInit;"""
    return begin_cell().store_uint(0b00110, 5).store_ref(code).store_ref(data).end_cell()


@dataclass(frozen=True)
class Wallet:
    """A v3 wallet of one public key."""

    public_key: PublicKey
    version: str = "v3r2"
    workchain: int = 0
    subwallet_id: int = DEFAULT_SUBWALLET

    def data_cell(self, seqno: int = 0) -> Cell:
        """seqno:uint32 subwallet_id:uint32 public_key:bits256"""
        return (begin_cell().store_uint(seqno, 32).store_uint(self.subwallet_id + self.workchain, 32)
                .store_bytes(self.public_key.raw).end_cell())

    def state_init(self) -> Cell:
        return state_init_cell(wallet_code(self.version), self.data_cell())

    @property
    def address(self) -> Address:
        return Address(self.workchain, self.state_init().hash)

    def transfer_body(self, key: PrivateKey, seqno: int, valid_until: int, messages: list[tuple[int, Cell]]
                      ) -> Cell:
        """signature:bits512 subwallet_id:uint32 valid_until:uint32 seqno:uint32 (mode:uint8 ^Message)*"""
        if key.public_key() != self.public_key:
            raise InvalidRequestError("this key does not own the wallet; load the wallet's own mnemonic")
        if not 0 < len(messages) <= 4:
            raise InvalidRequestError("a v3 wallet sends 1 to 4 messages per transfer")
        b = (begin_cell().store_uint(self.subwallet_id + self.workchain, 32).store_uint(valid_until, 32)
             .store_uint(seqno, 32))
        for mode, msg in messages:
            b.store_uint(mode, 8).store_ref(msg)
        unsigned = b.end_cell()
        return begin_cell().store_bytes(key.sign(unsigned.hash)).store_cell(unsigned).end_cell()

    def external_message(self, body: Cell, with_state_init: bool = False) -> Cell:
        """ext_in_msg_info$10 src:addr_none dest:MsgAddressInt import_fee:Coins init:(Maybe (Either StateInit
        ^StateInit)) body:(Either X ^X) = Message X;"""
        b = begin_cell().store_uint(0b10, 2).store_uint(0, 2)
        self.address.store(b).store_coins(0)
        if with_state_init:
            b.store_uint(0b11, 2).store_ref(self.state_init())
        else:
            b.store_uint(0, 1)
        return b.store_uint(1, 1).store_ref(body).end_cell()


def internal_message(dest: Address, value: int, body: Cell | None = None, state_init: Cell | None = None,
                     bounce: bool = True) -> Cell:
    """int_msg_info$0 ihr_disabled:Bool bounce:Bool bounced:Bool src:addr_none dest:MsgAddressInt
    value:CurrencyCollection ihr_fee:Coins fwd_fee:Coins created_lt:uint64 created_at:uint32
    init:(Maybe (Either StateInit ^StateInit)) body:(Either X ^X) = Message X;"""
    b: Builder = begin_cell().store_uint(0, 1).store_bit(1).store_bit(int(bounce)).store_bit(0).store_uint(0, 2)
    dest.store(b).store_coins(value).store_bit(0).store_coins(0).store_coins(0).store_uint(0, 64)
    b.store_uint(0, 32)
    if state_init is not None:
        b.store_uint(0b11, 2).store_ref(state_init)
    else:
        b.store_bit(0)
    if body is not None:
        b.store_bit(1).store_ref(body)
    else:
        b.store_bit(0)
    return b.end_cell()
