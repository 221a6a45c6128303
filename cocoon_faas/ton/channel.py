"""Payment-channel state types, bit-exact with the standard TON payment-channel contract.

Layouts follow specs/ton-payment-channel.md (the contract's FunC code, where it and its README disagree).
Each type has ``to_cell()``/``from_cell()``; the docstring of each is its TL-B line. Conditional payments
are carried as an opaque dictionary root (``HashmapE 32``) we never fill: Cocoon pays unconditionally.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

from pytoniq_core import Builder, Cell, Slice, begin_cell

from cocoon_faas.errors import PaymentError
from cocoon_faas.ton.address import Address, state_init_hash
from cocoon_faas.ton.keys import PrivateKey, PublicKey

TAG_SEMICHANNEL = 0x43685374  # "ChSt"
# The compiled contract tonweb's `payments` deploys (ton-blockchain/payment-channels). Its hash and depth are
# all an address needs; the code itself is fetched only where a contract must run or be deployed.
CHANNEL_CODE_HASH = bytes.fromhex("41f5b77f02d4a96eb465197215ed00923720a6c731fa32934f9c0e80ffb85589")
CHANNEL_CODE_DEPTH = 11


def _slice(cell_or_slice: Cell | Slice) -> Slice:
    return cell_or_slice.begin_parse() if isinstance(cell_or_slice, Cell) else cell_or_slice


@dataclass(frozen=True)
class ClosingConfig:
    """conf#_ quarantin_duration:uint32 misbehavior_fine:Coins conditional_close_duration:uint32 = ClosingConfig;"""

    quarantine_duration: int = 0
    misbehavior_fine: int = 0
    conditional_close_duration: int = 0

    def to_cell(self) -> Cell:
        return (begin_cell().store_uint(self.quarantine_duration, 32).store_coins(self.misbehavior_fine)
                .store_uint(self.conditional_close_duration, 32).end_cell())

    @classmethod
    def from_cell(cls, cell: Cell | Slice) -> ClosingConfig:
        s = _slice(cell)
        return cls(s.load_uint(32), s.load_coins(), s.load_uint(32))


@dataclass(frozen=True)
class PaymentConfig:
    """payment_conf#_ excess_fee:Coins dest_A:MsgAddress dest_B:MsgAddress = PaymentConfig;"""

    excess_fee: int
    dest_a: Address
    dest_b: Address

    def to_cell(self) -> Cell:
        b = begin_cell().store_coins(self.excess_fee)
        self.dest_a.store(b)
        return self.dest_b.store(b).end_cell()

    @classmethod
    def from_cell(cls, cell: Cell | Slice) -> PaymentConfig:
        s = _slice(cell)
        return cls(s.load_coins(), Address.load(s), Address.load(s))


@dataclass(frozen=True)
class ChannelConfig:
    """What both parties agree on before deploying: keys, id, payout addresses, closing and payment configs."""

    channel_id: int
    key_a: PublicKey
    key_b: PublicKey
    dest_a: Address
    dest_b: Address
    closing: ClosingConfig = ClosingConfig()
    excess_fee: int = 0

    @property
    def payment(self) -> PaymentConfig:
        return PaymentConfig(self.excess_fee, self.dest_a, self.dest_b)

    def initial_data(self) -> ChannelData:
        return ChannelData(False, 0, 0, self.key_a, self.key_b, self.channel_id, self.closing, 0, 0, None,
                           self.payment)

    @property
    def address(self) -> Address:
        """Workchain-0 address = hash(StateInit{contract code, deployment data})."""
        return Address(0, state_init_hash(CHANNEL_CODE_HASH, CHANNEL_CODE_DEPTH, self.initial_data().to_cell()))


@dataclass(frozen=True)
class SemiChannelBody:
    """sc_body#_ seqno:uint64 sent:Coins conditionals:(HashmapE 32 ConditionalPayment) = SemiChannelBody;"""

    seqno: int = 0
    sent: int = 0
    conditionals: Cell | None = None

    def store(self, b: Builder) -> Builder:
        return b.store_uint(self.seqno, 64).store_coins(self.sent).store_maybe_ref(self.conditionals)

    @classmethod
    def load(cls, s: Slice) -> SemiChannelBody:
        return cls(s.load_uint(64), s.load_coins(), s.load_maybe_ref())

    def to_cell(self) -> Cell:
        return self.store(begin_cell()).end_cell()

    @classmethod
    def from_cell(cls, cell: Cell | Slice) -> SemiChannelBody:
        return cls.load(_slice(cell))


@dataclass(frozen=True)
class SemiChannel:
    """semichannel_state#43685374 channel_id:uint128 data:SemiChannelBody
    counterparty_data:(Maybe ^SemiChannelBody) = SemiChannel;"""

    channel_id: int
    data: SemiChannelBody
    counterparty: SemiChannelBody | None = None

    def store(self, b: Builder) -> Builder:
        b.store_uint(TAG_SEMICHANNEL, 32).store_uint(self.channel_id, 128)
        self.data.store(b)
        return b.store_maybe_ref(self.counterparty.to_cell() if self.counterparty is not None else None)

    @classmethod
    def load(cls, s: Slice) -> SemiChannel:
        tag = s.load_uint(32)
        if tag != TAG_SEMICHANNEL:
            raise PaymentError(f"not a channel state: tag {tag:#010x}, expected 0x43685374 ('ChSt')",
                               problem="malformed")
        cid = s.load_uint(128)
        data = SemiChannelBody.load(s)
        cp = s.load_maybe_ref()
        return cls(cid, data, SemiChannelBody.from_cell(cp) if cp is not None else None)

    def to_cell(self) -> Cell:
        return self.store(begin_cell()).end_cell()

    @classmethod
    def from_cell(cls, cell: Cell | Slice) -> SemiChannel:
        return cls.load(_slice(cell))

    def sign(self, key: PrivateKey) -> SignedSemiChannel:
        return SignedSemiChannel(key.sign(self.to_cell().hash), self)


@dataclass(frozen=True)
class SignedSemiChannel:
    """signed_schs#_ signature:bits512 state:SemiChannel = SignedSemiChannel;  (state inline, same cell)

    The signature covers the representation hash of the SemiChannel cell (its bits and refs)."""

    signature: bytes
    state: SemiChannel
    _hash: bytes | None = field(default=None, compare=False, repr=False)

    def to_cell(self) -> Cell:
        return self.state.store(begin_cell().store_bytes(self.signature)).end_cell()

    @classmethod
    def from_cell(cls, cell: Cell | Slice) -> SignedSemiChannel:
        s = _slice(cell)
        sig = s.load_bytes(64)
        state = SemiChannel.load(s)
        return cls(sig, state, _tail_hash(cell, 512) if isinstance(cell, Cell) else None)

    def signed_hash(self) -> bytes:
        return self._hash if self._hash is not None else self.state.to_cell().hash

    def is_signed_by(self, key: PublicKey) -> bool:
        return key.is_valid(self.signature, self.signed_hash())

    def to_boc(self) -> bytes:
        return self.to_cell().to_boc()

    @classmethod
    def from_boc(cls, data: bytes) -> SignedSemiChannel:
        try:
            cell = Cell.one_from_boc(data)
        except Exception as exc:
            raise PaymentError(f"payment state is not a valid BOC ({exc}); send base64 of a SignedSemiChannel",
                               problem="malformed") from None
        try:
            return cls.from_cell(cell)
        except PaymentError:
            raise
        except Exception as exc:
            raise PaymentError(f"payment state does not parse as a SignedSemiChannel ({exc})",
                               problem="malformed") from None


def _tail_hash(cell: Cell, skip: int) -> bytes:
    """Representation hash of the cell made of `cell`'s bits after the first `skip` and all its refs (ordinary
    cells): what a signature over "the rest of the cell" covers, without building that cell (the hot path)."""
    bits = cell.bits[skip:].copy()
    n = len(bits)
    if n % 8:
        bits.append(1)
        bits.extend([0] * ((8 - len(bits) % 8) % 8))
    refs = cell.refs
    return hashlib.sha256(b"".join([bytes([len(refs), n // 8 + (n + 7) // 8]), bits.tobytes(),
                                    *(r.get_depth().to_bytes(2, "big") for r in refs),
                                    *(r.hash for r in refs)])).digest()


@dataclass(frozen=True)
class QuarantinedState:
    """quarantined_state#_ state_A:SemiChannelBody state_B:SemiChannelBody quarantine_starts:uint32
    state_commited_by_A:Bool state_challenged:Bool = QuarantinedState;"""

    state_a: SemiChannelBody
    state_b: SemiChannelBody
    quarantine_starts: int
    committed_by_a: bool
    challenged: bool | None  # None: the bit is absent (the contract drops it in settle_conditionals)

    def to_cell(self) -> Cell:
        b = begin_cell()
        self.state_a.store(b)
        self.state_b.store(b)
        b.store_uint(self.quarantine_starts, 32).store_int(-1 if self.committed_by_a else 0, 1)
        if self.challenged is not None:
            b.store_int(-1 if self.challenged else 0, 1)
        return b.end_cell()

    @classmethod
    def from_cell(cls, cell: Cell | Slice) -> QuarantinedState:
        s = _slice(cell)
        a, b = SemiChannelBody.load(s), SemiChannelBody.load(s)
        starts, by_a = s.load_uint(32), s.load_int(1) != 0
        return cls(a, b, starts, by_a, (s.load_int(1) != 0) if s.remaining_bits else None)


@dataclass(frozen=True)
class ChannelData:
    """storage#_ inited:Bool balance_A:Coins balance_B:Coins key_A:uint256 key_B:uint256 channel_id:uint128
    closure_config:^ClosingConfig committed_seqno_A:uint32 committed_seqno_B:uint32
    quarantin:(Maybe ^QuarantinedState) constraints:^PaymentConfig = Storage;"""

    inited: bool
    balance_a: int
    balance_b: int
    key_a: PublicKey
    key_b: PublicKey
    channel_id: int
    closing: ClosingConfig
    committed_seqno_a: int
    committed_seqno_b: int
    quarantine: QuarantinedState | None
    payment: PaymentConfig

    def to_cell(self) -> Cell:
        b = (begin_cell().store_int(-1 if self.inited else 0, 1).store_coins(self.balance_a)
             .store_coins(self.balance_b).store_bytes(self.key_a.raw).store_bytes(self.key_b.raw)
             .store_uint(self.channel_id, 128).store_ref(self.closing.to_cell())
             .store_uint(self.committed_seqno_a, 32).store_uint(self.committed_seqno_b, 32))
        b.store_maybe_ref(self.quarantine.to_cell() if self.quarantine is not None else None)
        return b.store_ref(self.payment.to_cell()).end_cell()

    @classmethod
    def from_cell(cls, cell: Cell | Slice) -> ChannelData:
        s = _slice(cell)
        inited = s.load_int(1) != 0
        bal_a, bal_b = s.load_coins(), s.load_coins()
        key_a, key_b = PublicKey(s.load_bytes(32)), PublicKey(s.load_bytes(32))
        cid = s.load_uint(128)
        closing = ClosingConfig.from_cell(s.load_ref())
        ca, cb = s.load_uint(32), s.load_uint(32)
        q = s.load_maybe_ref()
        payment = PaymentConfig.from_cell(s.load_ref())
        return cls(inited, bal_a, bal_b, key_a, key_b, cid, closing, ca, cb,
                   QuarantinedState.from_cell(q) if q is not None else None, payment)

    def evolve(self, **changes: object) -> ChannelData:
        return replace(self, **changes)  # type: ignore[arg-type]

    @property
    def state(self) -> int:
        """get_channel_state: 0 uninited, 1 open, 2 closure started, 3 settling conditionals, 4 awaiting
        finalization (the last three need `now`; see rules.channel_state)."""
        if not self.inited:
            return 0
        return 1 if self.quarantine is None else 2
