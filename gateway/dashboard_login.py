"""The dashboard's provider session: a provider proves control of its wallet key, the browser gets a short cookie.

A provider holds the wallet key its nodes registered with (`cocoon provider join` signs the registration with it;
runtime/registration.py); nothing else names it. So logging in is a challenge signed with that key, done where the
key lives (`cocoon provider login`), and handed to the browser as a one-time code:

1. ``POST /dashboard/api/provider/challenge`` -> a random challenge (one use, ``CHALLENGE_S`` seconds).
2. The CLI signs ``DOMAIN + canonical_json({challenge, gateway, wallet, wallet_version, public_key})`` with the
   wallet key (Ed25519; ``gateway`` is the host[:port] it talks to, so a login signed for one gateway is refused
   by another) and posts it to ``/dashboard/api/provider/login``; the gateway checks the signature, that the key
   owns the wallet (the standard wallet contract of that key and version), that the challenge is its own, fresh
   and unused, and that the wallet has nodes here. It answers a one-time code (``CODE_S`` seconds).
3. The CLI prints ``<gateway>/dashboard#provider-code=<code>``; the page (the code is in the fragment, so it is
   neither sent in a request line nor logged) trades it once at ``/dashboard/api/provider/session`` for a session
   cookie (HttpOnly, SameSite=Strict, Path=/dashboard, ``SESSION_S`` seconds) and a CSRF token for state changes.

A TON Connect wallet can log in from the browser instead (gateway/ton_proof.py): its payload is a ``ton-proof``
token of this store, and a verified proof opens a session directly (:meth:`SessionBook.open_session`).

Challenges, codes and sessions live in the gateway's database (component ``dashboard``), so every gateway sharing
it honours them; the database keeps only SHA-256 digests of the secrets. The clock is passed in (tests).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cocoon_faas.errors import AuthenticationError, CocoonError, InvalidRequestError
from cocoon_faas.gateway.db import Database
from cocoon_faas.gateway.migrations import Migration, migrate
from cocoon_faas.runtime.registration import canonical_json, check_wallet_signature

DOMAIN = b"cocoon-dashboard-provider-login-v1\n"
CHALLENGE_S = 120.0
TON_PROOF_S = 600.0  # a TON Connect payload: time to open the wallet app and approve
TON_PROOF_FIX = "press \"Log in with a TON wallet\" again for a fresh payload"
CODE_S = 120.0
SESSION_S = 1800.0
MAX_PENDING = 10_000  # unused challenges at once: the challenge route needs no credentials, so it is bounded
KEEP_S = 3600.0  # used and expired rows are kept this long, so a replay is named as one rather than "unknown"

DASHBOARD_MIGRATIONS = [
    Migration(1, "dashboard: provider login challenges, one-time codes and sessions", """
CREATE TABLE IF NOT EXISTS dashboard_tokens (
    digest TEXT PRIMARY KEY, kind TEXT NOT NULL, wallet TEXT, csrf TEXT, expires REAL NOT NULL,
    used INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS dashboard_tokens_expiry ON dashboard_tokens (expires)
"""),
]


class TooManyLoginsError(CocoonError):
    """Raised when too many provider logins are pending at once; retry in a minute."""

    status = 429
    type = "overloaded"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class ProviderLogin:
    """What the wallet key signs to open a dashboard session (wire: ``{"login": {...}, "signature": "<hex>"}``)."""

    challenge: str
    gateway: str  # host[:port] of the gateway the login is for (the audience)
    wallet: str
    wallet_version: str
    public_key: str  # hex, 32 bytes

    def to_dict(self) -> dict[str, str]:
        return {"challenge": self.challenge, "gateway": self.gateway, "wallet": self.wallet,
                "wallet_version": self.wallet_version, "public_key": self.public_key}

    def message(self) -> bytes:
        return DOMAIN + canonical_json(self.to_dict())

    def signed(self, key: Any) -> dict[str, Any]:
        """The wire form; ``key`` is the wallet's PrivateKey (``.sign(bytes) -> bytes``)."""
        return {"login": self.to_dict(), "signature": key.sign(self.message()).hex()}

    @classmethod
    def from_wire(cls, body: Any) -> tuple[ProviderLogin, bytes]:
        """Parse (login, signature); checks shapes, not the signature."""
        if not isinstance(body, dict) or not isinstance(body.get("login"), dict):
            raise InvalidRequestError('expected {"login": {...}, "signature": "<hex>"}; `cocoon provider login` '
                                      "makes it")
        d = body["login"]
        try:
            login = cls(*(str(d[k])[:256] for k in ("challenge", "gateway", "wallet", "wallet_version",
                                                    "public_key")))
            sig, pk = bytes.fromhex(str(body.get("signature", ""))), bytes.fromhex(login.public_key)
        except KeyError as exc:
            raise InvalidRequestError(f"login lacks {exc.args[0]!r}") from None
        except ValueError:
            raise InvalidRequestError("public_key and signature must be hex") from None
        if len(pk) != 32 or len(sig) != 64:
            raise InvalidRequestError("public_key must be 32 bytes and signature 64 bytes, hex-encoded")
        return login, sig

    def verify(self, signature: bytes) -> None:
        """Raise AuthenticationError unless the signature holds under public_key and that key owns the wallet."""
        check_wallet_signature(
            self.public_key, self.wallet, self.wallet_version, self.message(), signature,
            bad_signature="login signature does not verify under public_key (forged or altered); run `cocoon "
                          "provider login` again",
            not_owner="public_key does not own wallet {wallet} as a {version} wallet; log in with the key your "
                      "nodes joined with (--key-file)")


@dataclass(frozen=True)
class ProviderSession:
    """A logged-in provider: its wallet (raw form), the CSRF token its state changes must carry, the expiry."""

    wallet: str
    csrf: str
    expires: float

    def check_csrf(self, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf.encode(), str(token).encode())


class SessionBook:
    """Challenges, one-time codes and sessions over the gateway's database."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock
        migrate(db, "dashboard", DASHBOARD_MIGRATIONS)

    def _add(self, kind: str, ttl: float, wallet: str | None = None, csrf: str | None = None) -> tuple[str, float]:
        secret, expires = secrets.token_urlsafe(32), self.clock() + ttl
        self.db.execute("INSERT INTO dashboard_tokens (digest, kind, wallet, csrf, expires) VALUES (?,?,?,?,?)",
                        (_digest(secret), kind, wallet, csrf, expires))
        return secret, expires

    def _use(self, kind: str, secret: str, what: str, fix: str) -> tuple[str | None, str | None]:
        """Mark a one-use token used, once, on whichever gateway gets there first; name why when it cannot be."""
        now, digest = self.clock(), _digest(secret)
        if self.db.execute("UPDATE dashboard_tokens SET used=1 WHERE digest=? AND kind=? AND used=0 AND expires>?",
                           (digest, kind, now)):
            row = self.db.query("SELECT wallet, csrf FROM dashboard_tokens WHERE digest=?", (digest,))
            return row[0][0], row[0][1]
        raise self._refusal(kind, digest, what, fix, now)

    def _check(self, kind: str, secret: str, what: str, fix: str) -> None:
        """Raise what :meth:`_use` would, changing nothing (a refused proof does not burn its payload)."""
        now, digest = self.clock(), _digest(secret)
        if not self.db.query("SELECT 1 FROM dashboard_tokens WHERE digest=? AND kind=? AND used=0 AND expires>?",
                             (digest, kind, now)):
            raise self._refusal(kind, digest, what, fix, now)

    def _refusal(self, kind: str, digest: str, what: str, fix: str, now: float) -> AuthenticationError:
        rows = self.db.query("SELECT used, expires FROM dashboard_tokens WHERE digest=? AND kind=?", (digest, kind))
        if not rows:
            return AuthenticationError(f"unknown {what} (forged, or issued by another gateway's database); {fix}",
                                       reason="unknown")
        if rows[0][0]:
            return AuthenticationError(f"this {what} was already used (a replay); {fix}", reason="replayed")
        return AuthenticationError(f"this {what} expired {now - rows[0][1]:.0f}s ago; {fix}", reason="expired")

    def new_challenge(self, kind: str = "challenge") -> tuple[str, float]:
        """A one-use secret for a login: ``challenge`` (the CLI's) or ``ton-proof`` (a TON Connect payload); both
        kinds count against one bound, since neither route needs credentials."""
        now = self.clock()
        self.db.execute("DELETE FROM dashboard_tokens WHERE expires<?", (now - KEEP_S,))
        (pending,), = self.db.query("SELECT COUNT(*) FROM dashboard_tokens WHERE kind IN ('challenge', 'ton-proof') "
                                    "AND used=0 AND expires>?", (now,))
        if pending >= MAX_PENDING:
            raise TooManyLoginsError("too many provider logins are pending; retry in a minute", retry_after=60)
        return self._add(kind, TON_PROOF_S if kind == "ton-proof" else CHALLENGE_S)

    def use_challenge(self, challenge: str) -> None:
        self._use("challenge", challenge, "login challenge", "run `cocoon provider login` again")

    def check_ton_proof_payload(self, payload: str) -> None:
        self._check("ton-proof", payload, "ton_proof payload", TON_PROOF_FIX)

    def use_ton_proof_payload(self, payload: str) -> None:
        self._use("ton-proof", payload, "ton_proof payload", TON_PROOF_FIX)

    def new_code(self, wallet: str) -> tuple[str, float]:
        return self._add("code", CODE_S, wallet=wallet)

    def redeem(self, code: str) -> tuple[str, ProviderSession]:
        """Trade a one-time code for a session: (the cookie's secret, the session)."""
        wallet, _ = self._use("code", code, "login code", "run `cocoon provider login` and open the new link")
        assert wallet is not None  # codes are always written with their wallet
        return self.open_session(wallet)

    def open_session(self, wallet: str) -> tuple[str, ProviderSession]:
        """A new session for a wallet that just proved itself (a redeemed code, or a verified ton_proof)."""
        csrf = secrets.token_urlsafe(24)
        sid, expires = self._add("session", SESSION_S, wallet=wallet, csrf=csrf)
        return sid, ProviderSession(wallet, csrf, expires)

    def session(self, sid: str | None) -> ProviderSession:
        if not sid:
            raise AuthenticationError("provider data needs a provider session; run `cocoon provider login` and "
                                      "open the link it prints (an API key does not open it)", reason="missing")
        now = self.clock()
        rows = self.db.query("SELECT wallet, csrf, expires FROM dashboard_tokens WHERE digest=? AND kind='session'",
                             (_digest(sid),))
        if not rows:
            raise AuthenticationError("unknown or ended provider session; log in again with `cocoon provider login`",
                                      reason="unknown")
        wallet, csrf, expires = rows[0]
        if expires <= now:
            raise AuthenticationError("the provider session expired; log in again with `cocoon provider login`",
                                      reason="expired")
        return ProviderSession(wallet, csrf, expires)

    def end(self, sid: str) -> None:
        self.db.execute("DELETE FROM dashboard_tokens WHERE digest=? AND kind='session'", (_digest(sid),))
