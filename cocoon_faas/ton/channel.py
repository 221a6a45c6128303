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
        fast = _fast_signed_state(data)
        if fast is not None:
            return fast
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


def _pack_bits(v: int, nbits: int) -> tuple[int, bytes]:
    """(d2 descriptor, data bytes with completion tag) of an ordinary cell holding the `nbits` of `v`."""
    pad = -nbits % 8
    if pad:
        v = (v << pad) | (1 << (pad - 1))
    return nbits // 8 + (nbits + 7) // 8, v.to_bytes((nbits + 7) // 8, "big")


class StateTemplate:
    """The caller's hot path: serialise and sign ``SignedSemiChannel(channel_id, (seqno, sent), counterparty)``
    straight to BOC bytes, without building cells. The counterparty cell (fixed per template) and the BOC frame
    are laid out once; per state only the root cell's bits are packed. The bytes equal pytoniq-core's
    ``to_cell().to_boc()`` (no index, no CRC, 1-byte cell indices), and the signed hash equals
    ``SemiChannel.to_cell().hash``; tests check both against the general path."""

    def __init__(self, channel_id: int, counterparty: SemiChannelBody) -> None:
        if counterparty.conditionals is not None:
            raise ValueError("a state template carries no conditional payments")
        if not 0 <= channel_id < 1 << 128:
            raise ValueError("channel id must fit uint128")
        self.channel_id, self.counterparty = channel_id, counterparty
        clen = (counterparty.sent.bit_length() + 7) // 8
        cbits = 64 + 4 + 8 * clen + 1
        cv = ((counterparty.seqno << 4 | clen) << 8 * clen | counterparty.sent) << 1
        cd2, cdata = _pack_bits(cv, cbits)
        self._cp_ser = bytes([0, cd2]) + cdata
        self._cp_ref = b"\0\0" + hashlib.sha256(self._cp_ser).digest()  # depth 0, representation hash
        self._head = (TAG_SEMICHANNEL << 128 | channel_id) << 64

    def build(self, seqno: int, sent: int, sign: object) -> tuple[bytes, SignedSemiChannel]:
        """(BOC, state) for one state; `sign(hash) -> 64-byte signature` (callable)."""
        boc, sig, signed = self._signed(seqno, sent, sign)
        st = SemiChannel(self.channel_id, SemiChannelBody(seqno, sent), self.counterparty)
        return boc, SignedSemiChannel(sig, st, signed)

    def boc(self, seqno: int, sent: int, sign: object) -> bytes:
        """The BOC alone: all a paid call sends (`build` also makes the state's objects)."""
        return self._signed(seqno, sent, sign)[0]

    def _signed(self, seqno: int, sent: int, sign: object) -> tuple[bytes, bytes, bytes]:
        """(BOC, signature, signed hash)."""
        if not 0 <= seqno < 1 << 64 or not 0 <= sent < 1 << 120:
            raise ValueError("seqno must fit uint64 and sent Coins")
        ln = (sent.bit_length() + 7) // 8
        nbits = 32 + 128 + 64 + 4 + 8 * ln + 2
        v = (((self._head | seqno) << 4 | ln) << 8 * ln | sent) << 2 | 1  # no conditionals, counterparty ref
        d2, data = _pack_bits(v, nbits)
        signed = hashlib.sha256(bytes([1, d2]) + data + self._cp_ref).digest()
        sig = sign(signed)  # type: ignore[operator]
        root = bytes([1, d2 + 128]) + sig + data + b"\x01"
        size = len(root) + len(self._cp_ser)
        boc = b"\xb5\xee\x9c\x72\x01\x01\x02\x01\x00" + bytes([size, 0]) + root + self._cp_ser
        return boc, sig, signed


def _bits(data: bytes, d2: int) -> int:
    """Bit length of a cell's data from its d2 descriptor and completion tag."""
    if d2 % 2 == 0:
        return len(data) * 8
    last = data[-1]
    if last == 0:
        raise ValueError("bad completion tag")
    return len(data) * 8 - ((last & -last).bit_length())


def _coins(v: int, nbits: int, pos: int) -> tuple[int, int]:
    """Read Coins (4-bit length, then that many bytes) from the big-endian bit string `v` of `nbits` at `pos`."""
    ln = (v >> (nbits - pos - 4)) & 0xF
    pos += 4
    amount = (v >> (nbits - pos - 8 * ln)) & ((1 << (8 * ln)) - 1) if ln else 0
    return amount, pos + 8 * ln


_BOC_MAGIC = b"\xb5\xee\x9c\x72"
# counterparty cells seen by `_fast_signed_state` -> (body, its depth and hash as a ref): a payer's counterparty
# body changes only when the payee signs, so nearly every state repeats the last one (bounded: cleared when full)
_COUNTERPARTY: dict[bytes, tuple[SemiChannelBody, bytes]] = {}
_COUNTERPARTY_MAX = 4096


def _counterparty(cell: bytes) -> tuple[SemiChannelBody, bytes] | None:
    """(body, depth+hash of the cell) of a counterparty cell given as d1 d2 data; None unless it is exactly a
    SemiChannelBody without conditionals and without refs."""
    hit = _COUNTERPARTY.get(cell)
    if hit is not None:
        return hit
    cd1, cd2, cdata = cell[0], cell[1], cell[2:]
    if cd1 or len(cdata) != (cd2 + 1) // 2:
        return None
    cbits = _bits(cdata, cd2)
    cv = int.from_bytes(cdata, "big") >> (len(cdata) * 8 - cbits)
    cseq = cv >> (cbits - 64)
    csent, cp_end = _coins(cv, cbits, 64)
    if cbits - cp_end != 1 or cv & 1:
        return None
    got = SemiChannelBody(cseq, csent), b"\0\0" + hashlib.sha256(cell).digest()
    if len(_COUNTERPARTY) >= _COUNTERPARTY_MAX:
        _COUNTERPARTY.clear()
    _COUNTERPARTY[bytes(cell)] = got
    return got


def _fast_signed_state(boc: bytes) -> SignedSemiChannel | None:
    """The hot path of `from_boc`: a plain BOC of one SignedSemiChannel (no conditionals; counterparty body in at
    most one ref) read straight from its bytes, with the signed hash computed from the raw cell data. Anything
    else returns None and takes the general pytoniq-core path; tests check both agree."""
    boc = bytes(boc)
    try:
        if len(boc) < 12 or boc[:4] != _BOC_MAGIC:
            return None
        flags, off, n, roots, absent = boc[4], boc[5], boc[6], boc[7], boc[8]
        # only has_crc32c may be set among the flag bits; 1-byte cell indices; one root (index 0), no absent cells
        if flags & 0xA0 or flags & 7 != 1 or off < 1 or roots != 1 or absent != 0 or n not in (1, 2):
            return None
        pos = 9 + off
        if boc[pos] != 0:
            return None
        d1, d2 = boc[pos + 1], boc[pos + 2]
        if d1 & 0xF8:  # exotic or with levels
            return None
        nrefs = d1 & 7
        start = pos + 3
        end = start + (d2 + 1) // 2
        data = boc[start:end]
        refs = boc[end:end + nrefs]
        if n == 2:
            if refs != b"\x01":
                return None
            cstart = end + 1
            cd1, cd2 = boc[cstart], boc[cstart + 1]
            if cd1 & 0xF8:
                return None
            cend = cstart + 2 + (cd2 + 1) // 2 + (cd1 & 7)
            cell = boc[cstart:cend]
        else:
            if nrefs:
                return None
            cend = end
            cell = b""
        if cend + (4 if flags & 0x40 else 0) != len(boc) or len(data) != (d2 + 1) // 2:
            return None
        nbits = _bits(data, d2)
        v = int.from_bytes(data, "big") >> (len(data) * 8 - nbits)
        if nbits < 512 + 32 + 128 + 64 + 4 + 2 or (v >> (nbits - 544)) & 0xFFFFFFFF != TAG_SEMICHANNEL:
            return None
        cid = (v >> (nbits - 672)) & ((1 << 128) - 1)
        seqno = (v >> (nbits - 736)) & ((1 << 64) - 1)
        sent, p = _coins(v, nbits, 736)
        if nbits - p != 2 or (v >> 1) & 1:  # conditionals bit must be 0; then the counterparty Maybe bit
            return None
        cp = None
        ref = b""
        if v & 1:
            if n != 2:
                return None
            hit = _counterparty(cell)
            if hit is None:
                return None
            cp, ref = hit
        elif n != 1:
            return None
        signed = hashlib.sha256(bytes((d1, d2 - 128)) + data[64:] + ref).digest()
        return SignedSemiChannel(data[:64], SemiChannel(cid, SemiChannelBody(seqno, sent), cp), signed)
    except (IndexError, ValueError):
        return None


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
