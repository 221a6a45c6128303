"""Nanoton amounts: TON values are integers of nanoton (1 TON = 10**9), never floats.

`to_nano` accepts what people type ("5", "0.05", 5, Decimal("1.5")) and refuses anything that is not a whole
number of nanoton; `format_ton` prints an amount back without losing a digit.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from cocoon_faas.errors import InvalidRequestError

NANO = 10**9
MAX_COINS = (1 << 120) - 1  # Coins = VarUInteger 16: at most 15 bytes


def to_nano(value: str | int | Decimal) -> int:
    """TON (as typed by a person) -> nanoton. Ints are whole TON; strings may carry up to 9 decimals."""
    if isinstance(value, bool) or isinstance(value, float):
        raise InvalidRequestError(f"amount {value!r}: pass TON as a string like '0.05' (floats lose nanoton)")
    try:
        dec = Decimal(str(value).strip())
    except InvalidOperation:
        raise InvalidRequestError(f"amount {value!r} is not a number; write TON like '5' or '0.05'") from None
    if not dec.is_finite():
        raise InvalidRequestError(f"amount {value!r} is not a finite amount of TON; write TON like '0.05'")
    if dec < 0:
        raise InvalidRequestError(f"amount {value!r} is negative; write a positive amount of TON like '0.05'")
    # exact, from the digits: Decimal arithmetic would round past 28 significant digits and accept them
    _, digits, exp = dec.as_tuple()
    whole = int("".join(map(str, digits)) or "0")
    shift = int(exp) + 9
    if whole and shift + len(digits) > 40:  # well past 2**120 nanoton, without building a huge number
        raise InvalidRequestError(f"amount {value!r} is too large: at most {format_ton(MAX_COINS)} TON")
    if shift < 0 and whole and (-shift > len(digits) or whole % 10**-shift):  # (0.000…0 is 0 however written)
        raise InvalidRequestError(f"amount {value!r} has more than 9 decimals (1 nanoton = 0.000000001 TON)")
    nano = 0 if not whole else whole * 10**shift if shift >= 0 else whole // 10**-shift
    if nano > MAX_COINS:
        raise InvalidRequestError(f"amount {value!r} is too large: at most {format_ton(MAX_COINS)} TON")
    return nano


def check_coins(nano: int) -> int:
    """Return `nano` if it fits the Coins type (0 <= x < 2**120), else raise."""
    if not isinstance(nano, int) or isinstance(nano, bool) or nano < 0 or nano > MAX_COINS:
        raise InvalidRequestError(f"amount {nano!r} nanoton is not a non-negative integer below 2**120")
    return nano


def format_ton(nano: int) -> str:
    """Nanoton -> exact decimal TON string ('1.5', '0.000000001')."""
    sign = "-" if nano < 0 else ""
    whole, frac = divmod(abs(nano), NANO)
    return f"{sign}{whole}" + (f".{frac:09d}".rstrip("0") if frac else "")
