"""Ed25519 keys and TON's 24-word mnemonics (see specs/ton-payment-channel.md, "Keys and addresses").

TON does not use BIP39 seeds, only BIP39's English word list:
``entropy = HMAC-SHA512(" ".join(words), b"")``; ``seed = PBKDF2-SHA512(entropy, "TON default seed", 100000)``;
the Ed25519 private key is ``seed[:32]``. A phrase (without password) is valid when
``PBKDF2-SHA512(entropy, "TON seed version", 390)[0] == 0`` — new phrases are drawn until that holds.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from functools import lru_cache

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cocoon_faas.errors import InvalidRequestError, PaymentError


@lru_cache(maxsize=1)
def wordlist() -> tuple[str, ...]:
    """BIP39's English list (2048 words), from the `mnemonic` package."""
    from mnemonic import Mnemonic

    words = tuple(Mnemonic("english").wordlist)
    if len(words) != 2048:  # pragma: no cover - packaging error
        raise RuntimeError("the BIP39 English word list must hold 2048 words")
    return words


def _entropy(words: list[str] | tuple[str, ...]) -> bytes:
    return hmac.new(" ".join(words).encode(), b"", hashlib.sha512).digest()


def is_valid_mnemonic(words: list[str] | tuple[str, ...]) -> bool:
    """True for 24 known words whose TON "seed version" check passes."""
    if len(words) != 24 or any(w not in _word_set() for w in words):
        return False
    return hashlib.pbkdf2_hmac("sha512", _entropy(words), b"TON seed version", 390)[0] == 0


@lru_cache(maxsize=1)
def _word_set() -> frozenset[str]:
    return frozenset(wordlist())


def new_mnemonic() -> list[str]:
    """Draw a fresh valid 24-word TON mnemonic (about 256 tries on average)."""
    words = wordlist()
    while True:
        phrase = [words[secrets.randbelow(2048)] for _ in range(24)]
        if is_valid_mnemonic(phrase):
            return phrase


def mnemonic_to_seed(words: list[str] | tuple[str, ...]) -> bytes:
    """24 words -> the 32-byte Ed25519 seed; raises InvalidRequestError for a phrase TON would reject."""
    words = [w.strip().lower() for w in words]
    if not is_valid_mnemonic(words):
        raise InvalidRequestError("not a valid 24-word TON mnemonic: check the words and their order")
    return hashlib.pbkdf2_hmac("sha512", _entropy(words), b"TON default seed", 100000)[:32]


@dataclass(frozen=True)
class PublicKey:
    """A 32-byte Ed25519 public key; `verify` raises PaymentError on a bad signature."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != 32:
            raise InvalidRequestError(f"an Ed25519 public key is 32 bytes, got {len(self.raw)}")

    def to_bytes(self) -> bytes:
        return self.raw

    @classmethod
    def from_bytes(cls, raw: bytes) -> PublicKey:
        return cls(bytes(raw))

    def to_int(self) -> int:
        return int.from_bytes(self.raw, "big")

    @classmethod
    def from_int(cls, value: int) -> PublicKey:
        return cls(value.to_bytes(32, "big"))

    def hex(self) -> str:
        return self.raw.hex()

    def is_valid(self, signature: bytes, message: bytes) -> bool:
        try:
            _load_public(self.raw).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True

    def verify(self, signature: bytes, message: bytes) -> None:
        if not self.is_valid(signature, message):
            raise PaymentError("signature does not verify under the expected key: the state is forged or "
                               "signed with another key", problem="forged")


@lru_cache(maxsize=4096)
def _load_public(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


@dataclass(frozen=True, repr=False)
class PrivateKey:
    """An Ed25519 private key held as its 32-byte seed (TON's form)."""

    seed: bytes

    def __post_init__(self) -> None:
        if len(self.seed) != 32:
            raise InvalidRequestError(f"an Ed25519 seed is 32 bytes, got {len(self.seed)}")

    def __repr__(self) -> str:
        return f"PrivateKey(public={self.public_key().hex()})"

    @classmethod
    def generate(cls) -> PrivateKey:
        return cls(secrets.token_bytes(32))

    @classmethod
    def from_mnemonic(cls, words: list[str] | tuple[str, ...]) -> PrivateKey:
        return cls(mnemonic_to_seed(words))

    def to_bytes(self) -> bytes:
        return self.seed

    @classmethod
    def from_bytes(cls, seed: bytes) -> PrivateKey:
        return cls(bytes(seed))

    def _key(self) -> Ed25519PrivateKey:
        return _load_private(self.seed)

    def public_key(self) -> PublicKey:
        return PublicKey(self._key().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

    def sign(self, message: bytes) -> bytes:
        return self._key().sign(message)


@lru_cache(maxsize=256)
def _load_private(seed: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(seed)
