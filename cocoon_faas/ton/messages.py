"""Every message of the payment-channel contract, as cells (spec: "Messages").

op = crc32 of the TL-B constructor. One-signature messages carry ``flag:int1 sig:bits512`` and then a signed
payload whose cell (bits and refs) is what the signature covers. Two-signature messages carry the signatures
in refs 0 and 1 (512 bits each) and both sign the remaining bits. `parse_message` dispatches on the op.
"""

from __future__ import annotations

from dataclasses import dataclass

from pytoniq_core import Builder, Cell, Slice, begin_cell

from cocoon_faas.errors import InvalidRequestError
from cocoon_faas.ton.channel import SignedSemiChannel
from cocoon_faas.ton.keys import PrivateKey, PublicKey

OP_TOP_UP = 0x67C7D281
OP_INIT = 0x0E0620C2
OP_COOPERATIVE_CLOSE = 0x5577587E
OP_COOPERATIVE_COMMIT = 0x79A126EF
OP_START_UNCOOPERATIVE_CLOSE = 0x1F151ACF
OP_CHALLENGE = 0x088EAA32
OP_SETTLE_CONDITIONALS = 0x66F6F069
OP_FINISH_UNCOOPERATIVE_CLOSE = 0x25432A91
OP_PAYOUT = 0xDDDC88BA

TAG_INIT = 0x696E6974  # "init"
TAG_CLOSE = 0x436C6F73  # "Clos"
TAG_COMMIT = 0x43436D74  # "CCmt"
TAG_START_UNCOOPERATIVE_CLOSE = 0x556E436C  # "UnCl"
TAG_CHALLENGE = 0x43686751  # "ChgQ"
TAG_SETTLE = 0x436C436E  # "ClCn"


def _sig_cell(sig: bytes) -> Cell:
    return begin_cell().store_bytes(sig).end_cell()


@dataclass(frozen=True)
class TopUp:
    """top_up_balance#67c7d281 add_A:Coins add_B:Coins = InternalMsgBody;"""

    add_a: int
    add_b: int = 0

    def to_cell(self) -> Cell:
        return begin_cell().store_uint(OP_TOP_UP, 32).store_coins(self.add_a).store_coins(self.add_b).end_cell()

    @classmethod
    def load(cls, s: Slice) -> TopUp:
        return cls(s.load_coins(), s.load_coins())


@dataclass(frozen=True)
class InitChannel:
    """init_channel#0e0620c2 is_A:Bool signature:bits512 tag:#696e6974 channel_id:uint128 balance_A:Coins
    balance_B:Coins = InternalMsgBody;"""

    is_a: bool
    signature: bytes
    channel_id: int
    balance_a: int
    balance_b: int

    @staticmethod
    def payload(channel_id: int, balance_a: int, balance_b: int) -> Cell:
        return (begin_cell().store_uint(TAG_INIT, 32).store_uint(channel_id, 128).store_coins(balance_a)
                .store_coins(balance_b).end_cell())

    @classmethod
    def signed(cls, key: PrivateKey, is_a: bool, channel_id: int, balance_a: int, balance_b: int) -> InitChannel:
        return cls(is_a, key.sign(cls.payload(channel_id, balance_a, balance_b).hash), channel_id, balance_a,
                   balance_b)

    def to_cell(self) -> Cell:
        return (begin_cell().store_uint(OP_INIT, 32).store_int(-1 if self.is_a else 0, 1)
                .store_bytes(self.signature)
                .store_cell(self.payload(self.channel_id, self.balance_a, self.balance_b)).end_cell())

    @classmethod
    def load(cls, s: Slice) -> InitChannel:
        is_a, sig = s.load_int(1) != 0, s.load_bytes(64)
        s.load_uint(32)
        return cls(is_a, sig, s.load_uint(128), s.load_coins(), s.load_coins())


@dataclass(frozen=True)
class CooperativeClose:
    """cooperative_close#5577587e sig_A:^bits512 sig_B:^bits512 tag:#436c6f73 channel_id:uint128
    balance_A:Coins balance_B:Coins seqno_A:uint64 seqno_B:uint64 = InternalMsgBody;"""

    sig_a: bytes
    sig_b: bytes
    channel_id: int
    balance_a: int
    balance_b: int
    seqno_a: int
    seqno_b: int

    @staticmethod
    def payload(channel_id: int, balance_a: int, balance_b: int, seqno_a: int, seqno_b: int) -> Cell:
        return (begin_cell().store_uint(TAG_CLOSE, 32).store_uint(channel_id, 128).store_coins(balance_a)
                .store_coins(balance_b).store_uint(seqno_a, 64).store_uint(seqno_b, 64).end_cell())

    def payload_hash(self) -> bytes:
        return self.payload(self.channel_id, self.balance_a, self.balance_b, self.seqno_a, self.seqno_b).hash

    def to_cell(self) -> Cell:
        return (begin_cell().store_uint(OP_COOPERATIVE_CLOSE, 32).store_ref(_sig_cell(self.sig_a))
                .store_ref(_sig_cell(self.sig_b))
                .store_cell(self.payload(self.channel_id, self.balance_a, self.balance_b, self.seqno_a,
                                         self.seqno_b)).end_cell())

    @classmethod
    def load(cls, s: Slice) -> CooperativeClose:
        sig_a, sig_b = s.load_ref().begin_parse().load_bytes(64), s.load_ref().begin_parse().load_bytes(64)
        s.load_uint(32)
        return cls(sig_a, sig_b, s.load_uint(128), s.load_coins(), s.load_coins(), s.load_uint(64),
                   s.load_uint(64))


@dataclass(frozen=True)
class CooperativeCommit:
    """cooperative_commit#79a126ef sig_A:^bits512 sig_B:^bits512 tag:#43436d74 channel_id:uint128
    seqno_A:uint64 seqno_B:uint64 = InternalMsgBody;"""

    sig_a: bytes
    sig_b: bytes
    channel_id: int
    seqno_a: int
    seqno_b: int

    @staticmethod
    def payload(channel_id: int, seqno_a: int, seqno_b: int) -> Cell:
        return (begin_cell().store_uint(TAG_COMMIT, 32).store_uint(channel_id, 128).store_uint(seqno_a, 64)
                .store_uint(seqno_b, 64).end_cell())

    def to_cell(self) -> Cell:
        return (begin_cell().store_uint(OP_COOPERATIVE_COMMIT, 32).store_ref(_sig_cell(self.sig_a))
                .store_ref(_sig_cell(self.sig_b))
                .store_cell(self.payload(self.channel_id, self.seqno_a, self.seqno_b)).end_cell())

    @classmethod
    def load(cls, s: Slice) -> CooperativeCommit:
        sig_a, sig_b = s.load_ref().begin_parse().load_bytes(64), s.load_ref().begin_parse().load_bytes(64)
        s.load_uint(32)
        return cls(sig_a, sig_b, s.load_uint(128), s.load_uint(64), s.load_uint(64))


def _two_states(tag: int, channel_id: int, sch_a: SignedSemiChannel, sch_b: SignedSemiChannel) -> Cell:
    return (begin_cell().store_uint(tag, 32).store_uint(channel_id, 128).store_ref(sch_a.to_cell())
            .store_ref(sch_b.to_cell()).end_cell())


@dataclass(frozen=True)
class StartUncooperativeClose:
    """start_uncooperative_close#1f151acf signed_by_A:Bool signature:bits512 tag:#556e436c channel_id:uint128
    sch_A:^SignedSemiChannel sch_B:^SignedSemiChannel = InternalMsgBody;"""

    signed_by_a: bool
    signature: bytes
    channel_id: int
    sch_a: SignedSemiChannel
    sch_b: SignedSemiChannel
    TAG = TAG_START_UNCOOPERATIVE_CLOSE
    OP = OP_START_UNCOOPERATIVE_CLOSE

    @classmethod
    def signed(cls, key: PrivateKey, by_a: bool, channel_id: int, sch_a: SignedSemiChannel,
               sch_b: SignedSemiChannel):  # type: ignore[no-untyped-def]
        return cls(by_a, key.sign(_two_states(cls.TAG, channel_id, sch_a, sch_b).hash), channel_id, sch_a, sch_b)

    def to_cell(self) -> Cell:
        return (begin_cell().store_uint(self.OP, 32).store_int(-1 if self.signed_by_a else 0, 1)
                .store_bytes(self.signature)
                .store_cell(_two_states(self.TAG, self.channel_id, self.sch_a, self.sch_b)).end_cell())

    @classmethod
    def load(cls, s: Slice):  # type: ignore[no-untyped-def]
        by_a, sig = s.load_int(1) != 0, s.load_bytes(64)
        s.load_uint(32)
        cid = s.load_uint(128)
        return cls(by_a, sig, cid, SignedSemiChannel.from_cell(s.load_ref()),
                   SignedSemiChannel.from_cell(s.load_ref()))


@dataclass(frozen=True)
class ChallengeQuarantinedState(StartUncooperativeClose):
    """challenge_quarantined_state#088eaa32 challenged_by_A:Bool signature:bits512 tag:#43686751
    channel_id:uint128 sch_A:^SignedSemiChannel sch_B:^SignedSemiChannel = InternalMsgBody;"""

    TAG = TAG_CHALLENGE
    OP = OP_CHALLENGE


@dataclass(frozen=True)
class SettleConditionals:
    """settle_conditionals#66f6f069 from_A:Bool signature:bits512 tag:#436c436e channel_id:uint128
    conditionals_to_settle:(HashmapE 32 Cell) = InternalMsgBody;"""

    from_a: bool
    signature: bytes
    channel_id: int
    conditionals: Cell | None = None

    @staticmethod
    def payload(channel_id: int, conditionals: Cell | None) -> Cell:
        return (begin_cell().store_uint(TAG_SETTLE, 32).store_uint(channel_id, 128)
                .store_maybe_ref(conditionals).end_cell())

    @classmethod
    def signed(cls, key: PrivateKey, from_a: bool, channel_id: int,
               conditionals: Cell | None = None) -> SettleConditionals:
        return cls(from_a, key.sign(cls.payload(channel_id, conditionals).hash), channel_id, conditionals)

    def to_cell(self) -> Cell:
        return (begin_cell().store_uint(OP_SETTLE_CONDITIONALS, 32).store_int(-1 if self.from_a else 0, 1)
                .store_bytes(self.signature).store_cell(self.payload(self.channel_id, self.conditionals))
                .end_cell())

    @classmethod
    def load(cls, s: Slice) -> SettleConditionals:
        from_a, sig = s.load_int(1) != 0, s.load_bytes(64)
        s.load_uint(32)
        return cls(from_a, sig, s.load_uint(128), s.load_maybe_ref())


@dataclass(frozen=True)
class FinishUncooperativeClose:
    """finish_uncooperative_close#25432a91 = InternalMsgBody;"""

    def to_cell(self) -> Cell:
        return begin_cell().store_uint(OP_FINISH_UNCOOPERATIVE_CLOSE, 32).end_cell()

    @classmethod
    def load(cls, s: Slice) -> FinishUncooperativeClose:
        return cls()


@dataclass(frozen=True)
class Payout:
    """channel_closed#dddc88ba channel_id:uint128 = InternalMsgBody;  (sent by the contract with each payout)"""

    channel_id: int

    def to_cell(self) -> Cell:
        return begin_cell().store_uint(OP_PAYOUT, 32).store_uint(self.channel_id, 128).end_cell()

    @classmethod
    def load(cls, s: Slice) -> Payout:
        return cls(s.load_uint(128))


def sign_close(key: PrivateKey, channel_id: int, balance_a: int, balance_b: int, seqno_a: int,
               seqno_b: int) -> bytes:
    return key.sign(CooperativeClose.payload(channel_id, balance_a, balance_b, seqno_a, seqno_b).hash)


def sign_commit(key: PrivateKey, channel_id: int, seqno_a: int, seqno_b: int) -> bytes:
    return key.sign(CooperativeCommit.payload(channel_id, seqno_a, seqno_b).hash)


def verify_close_signature(key: PublicKey, sig: bytes, msg: CooperativeClose) -> bool:
    return key.is_valid(sig, msg.payload_hash())


Message = (TopUp | InitChannel | CooperativeClose | CooperativeCommit | StartUncooperativeClose
           | ChallengeQuarantinedState | SettleConditionals | FinishUncooperativeClose | Payout)
_BY_OP = {
    OP_TOP_UP: TopUp, OP_INIT: InitChannel, OP_COOPERATIVE_CLOSE: CooperativeClose,
    OP_COOPERATIVE_COMMIT: CooperativeCommit, OP_START_UNCOOPERATIVE_CLOSE: StartUncooperativeClose,
    OP_CHALLENGE: ChallengeQuarantinedState, OP_SETTLE_CONDITIONALS: SettleConditionals,
    OP_FINISH_UNCOOPERATIVE_CLOSE: FinishUncooperativeClose, OP_PAYOUT: Payout,
}


def parse_message(cell: Cell) -> Message:
    """A message body cell -> its typed message; raises InvalidRequestError for an unknown op."""
    s = cell.begin_parse()
    op = s.load_uint(32)
    cls = _BY_OP.get(op)
    if cls is None:
        raise InvalidRequestError(f"unknown payment-channel op {op:#010x}")
    return cls.load(s)  # type: ignore[attr-defined,no-any-return]


def store_message(b: Builder, msg: Message) -> Builder:
    return b.store_cell(msg.to_cell())
