// HPKE (RFC 9180) base mode, DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / ChaCha20-Poly1305, through hpke-js
// (@hpke/core with the X25519 KEM and ChaCha20-Poly1305 AEAD packages): the suite cocoon_faas/confidential/hpke.py
// implements. `ekm` fixes an ephemeral (known-answer tests only): hpke-js derives it with DeriveKeyPair(ekm), as
// the Python side does with derive_key_pair(rng(32)).
import { CipherSuite, HkdfSha256 } from "@hpke/core";
import { Chacha20Poly1305 } from "@hpke/chacha20poly1305";
import { DhkemX25519HkdfSha256 } from "@hpke/dhkem-x25519";
import type { Bytes } from "./bytes.js";

export const suite = new CipherSuite({
  kem: new DhkemX25519HkdfSha256(),
  kdf: new HkdfSha256(),
  aead: new Chacha20Poly1305(),
});

export interface ReplyKey {
  pair: CryptoKeyPair;
  publicKey: Bytes;
}

/** A fresh reply key, or one derived from `ikm` (known-answer tests). */
export async function replyKey(ikm?: Bytes): Promise<ReplyKey> {
  const pair = ikm ? await suite.kem.deriveKeyPair(ikm) : await suite.kem.generateKeyPair();
  return { pair, publicKey: new Uint8Array(await suite.kem.serializePublicKey(pair.publicKey)) };
}

/** SetupBaseS then one seal: enc ‖ ciphertext. */
export async function sealOnce(pk: Bytes, info: Bytes, aad: Bytes, pt: Bytes, ekm?: Bytes): Promise<Bytes> {
  const recipientPublicKey = await suite.kem.deserializePublicKey(pk);
  const ctx = await suite.createSenderContext({ recipientPublicKey, info, ...(ekm ? { ekm } : {}) });
  const ct = new Uint8Array(await ctx.seal(pt, aad));
  const out = new Uint8Array(32 + ct.length);
  out.set(new Uint8Array(ctx.enc));
  out.set(ct, 32);
  return out;
}

/** SetupBaseR: a context whose successive `open` calls use sequence numbers 0, 1, 2, ... */
export async function receiver(key: CryptoKeyPair, enc: Bytes, info: Bytes) {
  return suite.createRecipientContext({ recipientKey: key, enc, info });
}
