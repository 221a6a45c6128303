"""Standard wallet contracts (v3R1, v3R2, v4R2, v5R1): addresses from a public key, and signed (v3) transfers.

The wallet code cells are the well-known public constants every TON SDK carries (their hashes are the code
hashes explorers show). A wallet's address is the hash of StateInit{code, data}; the data is

    v3R1, v3R2: seqno:uint32 subwallet_id:uint32 public_key:bits256
    v4R2:       seqno:uint32 subwallet_id:uint32 public_key:bits256 plugins:(HashmapE 267 bool), empty: bit 0
    v5R1:       is_signature_allowed:bit seqno:uint32 wallet_id:int32 public_key:bits256 extensions:(HashmapE), empty

(subwallet 698983191 + workchain by default; v5R1's wallet_id is the network's global id, -239 mainnet or -3
testnet, XOR the client context ``1:bit workchain:int8 version:uint8(0) subwallet:uint15(0)``). TON Connect
wallets (Tonkeeper, MyTonWallet, ...) are v4R2 and v5R1; the project's own wallets are v3R2. Transfers are
external messages the wallet checks (signature, subwallet, expiry, seqno) before it sends the internal messages
inside them; this module signs them for v3 wallets only (the gateway, callers and the CLI use no other).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from pytoniq_core import Builder, Cell, begin_cell

from cocoon_faas.errors import InvalidRequestError
from cocoon_faas.ton.address import Address
from cocoon_faas.ton.keys import PrivateKey, PublicKey

WALLET_CODES = {
    "v3r1": "B5EE9C724101010100620000C0FF0020DD2082014C97BA9730ED44D0D70B1FE0A4F2608308D71820D31FD31FD31FF82313BBF263ED44D0D31FD31FD3FFD15132BAF2A15144BAF2A204F901541055F910F2A3F8009320D74A96D307D402FB00E8D101A4C8CB1FCB1FCBFFC9ED543FBE6EE0",
    "v3r2": "B5EE9C724101010100710000DEFF0020DD2082014C97BA218201339CBAB19F71B0ED44D0D31FD31F31D70BFFE304E0A4F2608308D71820D31FD31FD31FF82313BBF263ED44D0D31FD31FD3FFD15132BAF2A15144BAF2A204F901541055F910F2A3F8009320D74A96D307D402FB00E8D101A4C8CB1FCB1FCBFFC9ED5410BD6DAD",
    "v4r2": (
        "B5EE9C72410214010002D4000114FF00F4A413F4BCF2C80B010201200203020148040504F8F28308D71820D31FD31FD31F02F823BBF2"
        "64ED44D0D31FD31FD3FFF404D15143BAF2A15151BAF2A205F901541064F910F2A3F80024A4C8CB1F5240CB1F5230CBFF5210F400C9ED"
        "54F80F01D30721C0009F6C519320D74A96D307D402FB00E830E021C001E30021C002E30001C0039130E30D03A4C8CB1F12CB1FCBFF10"
        "11121302E6D001D0D3032171B0925F04E022D749C120925F04E002D31F218210706C7567BD22821064737472BDB0925F05E003FA4030"
        "20FA4401C8CA07CBFFC9D0ED44D0810140D721F404305C810108F40A6FA131B3925F07E005D33FC8258210706C7567BA923830E30D03"
        "821064737472BA925F06E30D06070201200809007801FA00F40430F8276F2230500AA121BEF2E0508210706C7567831EB17080185004"
        "CB0526CF1658FA0219F400CB6917CB1F5260CB3F20C98040FB0006008A5004810108F45930ED44D0810140D720C801CF16F400C9ED54"
        "0172B08E23821064737472831EB17080185005CB055003CF1623FA0213CB6ACB1FCB3FC98040FB00925F03E20201200A0B0059BD242B"
        "6F6A2684080A06B90FA0218470D4080847A4937D29910CE6903E9FF9837812801B7810148987159F31840201580C0D0011B8C97ED44D"
        "0D70B1F8003DB29DFB513420405035C87D010C00B23281F2FFF274006040423D029BE84C600201200E0F0019ADCE76A26840206B90EB"
        "85FFC00019AF1DF6A26840106B90EB858FC0006ED207FA00D4D422F90005C8CA0715CBFFC9D077748018C8CB05CB0222CF165005FA02"
        "14CB6B12CCCCC973FB00C84014810108F451F2A7020070810108D718FA00D33FC8542047810108F451F2A782106E6F746570748018C8"
        "CB05CB025006CF165004FA0214CB6A12CB1FCB3FC973FB0002006C810108D718FA00D33F305224810108F459F2A78210647374727074"
        "8018C8CB05CB025005CF165003FA0213CB6ACB1F12CB3FC973FB00000AF400C9ED54696225E5"),
    "v5r1": (
        "B5EE9C7241021401000281000114FF00F4A413F4BCF2C80B01020120020302014804050102F20E02DCD020D749C120915B8F6320D70B"
        "1F2082106578746EBD21821073696E74BDB0925F03E082106578746EBA8EB48020D72101D074D721FA4030FA44F828FA443058BD915B"
        "E0ED44D0810141D721F4058307F40E6FA1319130E18040D721707FDB3CE03120D749810280B99130E070E2100F020120060702012008"
        "090019BE5F0F6A2684080A0EB90FA02C02016E0A0B0201480C0D0019ADCE76A2684020EB90EB85FFC00019AF1DF6A2684010EB90EB85"
        "8FC00017B325FB51341C75C875C2C7E00011B262FB513435C28020011E20D70B1F82107369676EBAF2E08A7F0F01E68EF0EDA2EDFB21"
        "8308D722028308D723208020D721D31FD31FD31FED44D0D200D31F20D31FD3FFD70A000AF90140CCF9109A28945F0ADB31E1F2C087DF"
        "02B35007B0F2D0845125BAF2E0855036BAF2E086F823BBF2D0882292F800DE01A47FC8CA00CB1F01CF16C9ED542092F80FDE70DB3CD8"
        "1003F6EDA2EDFB02F404216E926C218E4C0221D73930709421C700B38E2D01D72820761E436C20D749C008F2E09320D74AC002F2E093"
        "20D71D06C712C2005230B0F2D089D74CD7393001A4E86C128407BBF2E093D74AC000F2E093ED55E2D20001C000915BE0EBD72C081420"
        "91709601D72C081C12E25210B1E30F20D74A111213009601FA4001FA44F828FA443058BAF2E091ED44D0810141D718F405049D7FC8CA"
        "0040048307F453F2E08B8E14038307F45BF2E08C22D70A00216E01B3B0F2D090E2C85003CF1612F400C9ED54007230D72C08248E2D21"
        "F2E092D200ED44D0D2005113BAF2D08F54503091319C01810140D721D70A00F2E08EE2C8CA0058CF16C9ED5493F2C08DE20010935BDB"
        "31E1D74CD0A89FD648"),
}
DEFAULT_SUBWALLET = 698983191
MAINNET, TESTNET = -239, -3  # network global ids (TON Connect's "network"; v5R1 binds its wallet_id to one)


@cache
def _codes() -> dict[str, Cell]:
    return {v: Cell.one_from_boc(bytes.fromhex(boc)) for v, boc in WALLET_CODES.items()}


def version_of_code(code_hash: bytes) -> str | None:
    """The standard wallet version whose code has this hash, or None."""
    return next((v for v, c in _codes().items() if c.hash == code_hash), None)


def wallet_code(version: str) -> Cell:
    try:
        return _codes()[version.lower()]
    except KeyError:
        raise InvalidRequestError(f"unknown wallet version {version!r}; use one of {sorted(WALLET_CODES)}") from None


def state_init_cell(code: Cell, data: Cell) -> Cell:
    """_ split_depth:(Maybe (## 5)) special:(Maybe TickTock) code:(Maybe ^Cell) data:(Maybe ^Cell)
    library:(Maybe ^Cell) = StateInit;"""
    return begin_cell().store_uint(0b00110, 5).store_ref(code).store_ref(data).end_cell()


def v5r1_wallet_id(network: int, workchain: int) -> int:
    """v5R1's default wallet_id (subwallet 0) as the int32 the data cell stores."""
    context = (1 << 31) | ((workchain & 0xFF) << 23)  # client context, version 0, subwallet 0
    wid = (network & 0xFFFFFFFF) ^ context
    return wid - (1 << 32) if wid >= 1 << 31 else wid


@dataclass(frozen=True)
class Wallet:
    """A standard wallet of one public key (``version`` one of WALLET_CODES)."""

    public_key: PublicKey
    version: str = "v3r2"
    workchain: int = 0
    subwallet_id: int = DEFAULT_SUBWALLET  # v3/v4 (+ workchain)
    network: int = MAINNET  # v5R1 only

    def data_cell(self, seqno: int = 0) -> Cell:
        """The wallet's initial data, laid out as its version's code reads it (module docstring)."""
        version = self.version.lower()
        if version == "v5r1":
            return (begin_cell().store_bit(1).store_uint(seqno, 32)
                    .store_int(v5r1_wallet_id(self.network, self.workchain), 32)
                    .store_bytes(self.public_key.raw).store_bit(0).end_cell())
        b = (begin_cell().store_uint(seqno, 32).store_uint(self.subwallet_id + self.workchain, 32)
             .store_bytes(self.public_key.raw))
        return (b.store_bit(0) if version == "v4r2" else b).end_cell()

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
        if not self.version.lower().startswith("v3"):
            raise InvalidRequestError(f"transfers are signed for v3 wallets only, not {self.version}; use a v3r2 "
                                      "wallet for the CLI and the gateway")
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
