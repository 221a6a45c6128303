// Certificate chains to a pinned root at a given time (Intel PCK and collateral chains, NVIDIA device chains), and
// ECDSA checks of raw r‖s signatures with WebCrypto (Python: cocoon_faas/confidential/x509chain.py). A root shipped
// inside the evidence is never trusted: the chain must end at the pinned one.
import "reflect-metadata"; // @peculiar/x509 resolves its ASN.1 parsers through tsyringe, which needs it
import * as x509 from "@peculiar/x509";
import { sha256 } from "@noble/hashes/sha2.js";
import { type Bytes, equal, hex } from "./bytes.js";
import { CheckFailed } from "./errors.js";

const PEM_CERT = /-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g;

export function fingerprint(cert: x509.X509Certificate): string {
  return hex(sha256(new Uint8Array(cert.rawData)));
}

/** The certificates of a PEM bundle, in order; `check` names the failure when one does not parse. */
export function loadPemChain(pem: string, check: string): x509.X509Certificate[] {
  const blocks = pem.match(PEM_CERT) ?? [];
  if (!blocks.length) throw new CheckFailed(check, "the certificate chain holds no PEM certificate");
  try {
    return blocks.map((p) => new x509.X509Certificate(p));
  } catch (e) {
    throw new CheckFailed(check, `the certificate chain does not parse (${(e as Error).message})`);
  }
}

function sameDer(a: x509.X509Certificate, b: x509.X509Certificate): boolean {
  return equal(new Uint8Array(a.rawData), new Uint8Array(b.rawData));
}

function isCa(c: x509.X509Certificate): boolean {
  const bc = c.getExtension(x509.BasicConstraintsExtension);
  return !!bc && bc.ca;
}

/** Verify `chain` (leaf first) up to the pinned `root` at `at`; return the leaf. */
export async function verifyChain(chain: x509.X509Certificate[], root: x509.X509Certificate, at: Date,
                                  check: string): Promise<x509.X509Certificate> {
  const certs = [...chain];
  while (certs.length && (sameDer(certs[certs.length - 1], root) || certs[certs.length - 1].issuer === certs[certs.length - 1].subject)) {
    certs.pop(); // a root shipped inside the evidence is ignored: the pinned one is used
  }
  if (!certs.length) throw new CheckFailed(check, "the chain holds no certificate below the root");
  const path = [...certs, root];
  for (let i = 0; i + 1 < path.length; i++) {
    const [cert, issuer] = [path[i], path[i + 1]];
    if (!isCa(issuer)) throw new CheckFailed(check, `issuer '${issuer.subject}' is not a CA certificate`);
    const ok = await cert.verify({ publicKey: issuer, signatureOnly: true }).catch(() => false);
    if (!ok || cert.issuer !== issuer.subject) {
      throw new CheckFailed(check, `'${cert.subject}' is not signed by '${issuer.subject}'; the chain does not lead `
        + `to the pinned root (sha256 ${fingerprint(root).slice(0, 16)}...)`);
    }
  }
  for (const c of path) {
    if (at < c.notBefore || at > c.notAfter) {
      throw new CheckFailed(check, `certificate '${c.subject}' is not valid at ${at.toISOString()} (valid `
        + `${c.notBefore.toISOString()} to ${c.notAfter.toISOString()}); refresh the evidence`);
    }
  }
  return certs[0];
}

const CURVES = new Set(["P-256", "P-384"]);

/** The certificate's EC public key for WebCrypto, on the curve it names (`curve` forces one). */
export async function ecKey(cert: x509.X509Certificate, check: string, curve?: "P-256" | "P-384"): Promise<CryptoKey> {
  const named = curve ?? String((cert.publicKey.algorithm as EcKeyAlgorithm).namedCurve ?? "");
  if (!CURVES.has(named)) throw new CheckFailed(check, `'${cert.subject}' does not hold a P-256 or P-384 EC key`);
  try {
    return await crypto.subtle.importKey("spki", cert.publicKey.rawData, { name: "ECDSA", namedCurve: named }, false, ["verify"]);
  } catch {
    throw new CheckFailed(check, `'${cert.subject}' does not hold a ${named} EC key`);
  }
}

/** Does the raw r‖s `sig` verify over `data` under `key` (hash: `hash`)? Never throws. */
export async function ecdsaOk(key: CryptoKey, hash: "SHA-256" | "SHA-384", sig: Bytes, data: Bytes): Promise<boolean> {
  return crypto.subtle.verify({ name: "ECDSA", hash }, key, sig, data).catch(() => false);
}
