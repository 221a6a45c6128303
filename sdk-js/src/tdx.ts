// Intel TDX DCAP quotes, v4 and v5, verified in the browser (Python: cocoon_faas/confidential/quote.py, tdx.py):
// parse by the length fields (little-endian; trailing bytes ignored), then `header` -> `pck_chain` (signatures and
// validity at `at` up to the pinned Intel SGX Root CA; a root inside the quote is ignored) -> `qe_report_signature`
// -> `qe_binding` -> `quote_signature`, with WebCrypto's ECDSA P-256 and @peculiar/x509 for the certificates.
// Collateral (CRLs, TCB info, QE identity) is checked by the Python SDK only; the JS verifier says so.
import "reflect-metadata"; // @peculiar/x509 resolves its ASN.1 parsers through tsyringe, which needs it
import * as x509 from "@peculiar/x509";
import { sha256 } from "@noble/hashes/sha2.js";
import { type Bytes, concat, equal, fromB64, hex, fromHex } from "./bytes.js";
import { CheckFailed } from "./errors.js";

export const INTEL_SGX_ROOT_CA_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3";
const INTEL_SGX_ROOT_CA_B64 = "MIICjzCCAjSgAwIBAgIUImUM1lqdNInzg7SVUr9QGzknBqwwCgYIKoZIzj0EAwIwaDEaMBgGA1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENvcnBvcmF0aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJBgNVBAYTAlVTMB4XDTE4MDUyMTEwNDUxMFoXDTQ5MTIzMTIzNTk1OVowaDEaMBgGA1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENvcnBvcmF0aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJBgNVBAYTAlVTMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEC6nEwMDIYZOj/iPWsCzaEKi71OiOSLRFhWGjbnBVJfVnkY4u3IjkDYYL0MxO4mqsyYjlBalTVYxFP2sJBK5zlKOBuzCBuDAfBgNVHSMEGDAWgBQiZQzWWp00ifODtJVSv1AbOScGrDBSBgNVHR8ESzBJMEegRaBDhkFodHRwczovL2NlcnRpZmljYXRlcy50cnVzdGVkc2VydmljZXMuaW50ZWwuY29tL0ludGVsU0dYUm9vdENBLmRlcjAdBgNVHQ4EFgQUImUM1lqdNInzg7SVUr9QGzknBqwwDgYDVR0PAQH/BAQDAgEGMBIGA1UdEwEB/wQIMAYBAf8CAQEwCgYIKoZIzj0EAwIDSQAwRgIhAOW/5QkR+S9CiSDcNoowLuPRLsWGf/Yi7GSX94BgwTwgAiEA4J0lrHoMs+Xo5o/sX6O9QWxHRAvZUGOdRQ7cvqRXaqI=";
const INTEL_QE_VENDOR_ID = "939a7233f79c4ca9940a0db3957f0607";
const HEADER_LEN = 48;
const TD10_LEN = 584;
const TD15_LEN = 648;
const QE_REPORT_LEN = 384;

export interface TdReport {
  teeTcbSvn: Bytes;
  tdAttributes: Bytes;
  mrTd: Bytes;
  rtmr: [Bytes, Bytes, Bytes, Bytes];
  reportData: Bytes;
  debug: boolean;
}

export interface TdxQuote {
  version: number;
  attKeyType: number;
  teeType: number;
  qeVendorId: string;
  bodyType: number;
  report: TdReport;
  signed: Bytes;
  signature: Bytes;
  attestationKey: Bytes;
  qeReport: Bytes;
  qeReportSignature: Bytes;
  qeAuthData: Bytes;
  pckChainPem: string[];
  length: number;
}

class Reader {
  pos = 0;
  constructor(readonly data: Bytes) {}
  take(n: number, what: string): Bytes {
    if (n < 0 || this.pos + n > this.data.length) {
      throw new CheckFailed("structure", `quote truncated reading ${what}: need ${n} bytes at offset ${this.pos}, `
        + `have ${this.data.length - this.pos}; pass the whole quote`);
    }
    const out = this.data.slice(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }
  u16(what: string): number {
    const b = this.take(2, what);
    return b[0] | (b[1] << 8);
  }
  u32(what: string): number {
    const b = this.take(4, what);
    return (b[0] | (b[1] << 8) | (b[2] << 16)) + b[3] * 0x1000000;
  }
}

export function parseQuote(data: Bytes): TdxQuote {
  const r = new Reader(data);
  const header = r.take(HEADER_LEN, "header");
  const version = header[0] | (header[1] << 8);
  const attKeyType = header[2] | (header[3] << 8);
  const teeType = (header[4] | (header[5] << 8) | (header[6] << 16)) + header[7] * 0x1000000;
  let bodyType = 2;
  let bodyLen = TD10_LEN;
  if (version === 5) {
    bodyType = r.u16("body type");
    bodyLen = r.u32("body size");
    const expected = bodyType === 2 ? TD10_LEN : bodyType === 3 ? TD15_LEN : -1;
    if (expected !== bodyLen) {
      throw new CheckFailed("structure", `v5 body type ${bodyType} with size ${bodyLen} is not a TD report`);
    }
  } else if (version !== 4) {
    throw new CheckFailed("header", `quote version ${version} is not supported; only TDX v4 and v5 are`);
  }
  if (teeType !== 0x81) throw new CheckFailed("header", `tee_type 0x${teeType.toString(16)} is not TDX (0x81)`);
  const b = r.take(bodyLen, "TD report");
  const report: TdReport = {
    teeTcbSvn: b.slice(0, 16), tdAttributes: b.slice(120, 128), mrTd: b.slice(136, 184),
    rtmr: [b.slice(328, 376), b.slice(376, 424), b.slice(424, 472), b.slice(472, 520)],
    reportData: b.slice(520, 584), debug: (b[120] & 1) === 1,
  };
  const signed = data.slice(0, r.pos);
  const sig = new Reader(r.take(r.u32("signature data length"), "signature data"));
  const signature = sig.take(64, "quote signature");
  const attestationKey = sig.take(64, "attestation key");
  const certType = sig.u16("certification data type");
  if (certType !== 6) throw new CheckFailed("structure", `certification data type ${certType}; expected 6 (QE report)`);
  const cd = new Reader(sig.take(sig.u32("certification data size"), "certification data"));
  const qeReport = cd.take(QE_REPORT_LEN, "QE report");
  const qeReportSignature = cd.take(64, "QE report signature");
  const qeAuthData = cd.take(cd.u16("QE auth data length"), "QE auth data");
  const inner = cd.u16("PCK certification data type");
  if (inner !== 5) throw new CheckFailed("structure", `PCK certification data type ${inner}; expected 5 (PEM chain)`);
  const pem = new TextDecoder("latin1").decode(cd.take(cd.u32("PCK chain size"), "PCK chain"));
  const pckChainPem = pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
  if (pckChainPem.length === 0) throw new CheckFailed("structure", "the quote carries no PCK certificate chain");
  return {
    version, attKeyType, teeType, qeVendorId: hex(header.slice(12, 28)), bodyType, report, signed, signature,
    attestationKey, qeReport, qeReportSignature, qeAuthData, pckChainPem, length: r.pos,
  };
}

export function intelRootDer(): Bytes {
  const der = fromB64(INTEL_SGX_ROOT_CA_B64);
  if (hex(sha256(der)) !== INTEL_SGX_ROOT_CA_SHA256) throw new Error("the pinned Intel SGX Root CA was altered");
  return der;
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
        + `to the pinned root (sha256 ${hex(sha256(new Uint8Array(root.rawData))).slice(0, 16)}...)`);
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

async function p256Verify(key: CryptoKey, sig: Bytes, data: Bytes, check: string, what: string): Promise<void> {
  const ok = await crypto.subtle.verify({ name: "ECDSA", hash: "SHA-256" }, key, sig, data).catch(() => false);
  if (!ok) throw new CheckFailed(check, `${what} does not verify; the quote was altered or is not genuine`);
}

export interface VerifiedQuote {
  quote: TdxQuote;
  rootSha256: string;
}

/** Verify a TDX quote's signatures to the pinned root (or `root`, DER) at time `at`. */
export async function verifyQuote(data: Bytes | TdxQuote, opts: { at?: Date; root?: Bytes } = {}): Promise<VerifiedQuote> {
  const q = data instanceof Uint8Array ? parseQuote(data) : data;
  const at = opts.at ?? new Date();
  const rootDer = opts.root ?? intelRootDer();
  const root = new x509.X509Certificate(rootDer);
  if (q.attKeyType !== 2) throw new CheckFailed("header", `attestation key type ${q.attKeyType} is not ECDSA-P256 (2)`);
  if (q.qeVendorId !== INTEL_QE_VENDOR_ID) throw new CheckFailed("header", `QE vendor id ${q.qeVendorId} is not Intel's`);
  let chain: x509.X509Certificate[];
  try {
    chain = q.pckChainPem.map((p) => new x509.X509Certificate(p));
  } catch (e) {
    throw new CheckFailed("pck_chain", `the PCK chain does not parse (${(e as Error).message})`);
  }
  const leaf = await verifyChain(chain, root, at, "pck_chain");
  let leafKey: CryptoKey;
  try {
    leafKey = await crypto.subtle.importKey("spki", leaf.publicKey.rawData, { name: "ECDSA", namedCurve: "P-256" }, false, ["verify"]);
  } catch {
    throw new CheckFailed("pck_chain", "the PCK leaf does not hold a P-256 key");
  }
  await p256Verify(leafKey, q.qeReportSignature, q.qeReport, "qe_report_signature", "QE report signature");
  const binding = concat(sha256(concat(q.attestationKey, q.qeAuthData)), new Uint8Array(32));
  if (!equal(q.qeReport.slice(320, 384), binding)) {
    throw new CheckFailed("qe_binding", "the QE report does not bind the attestation key (REPORTDATA != "
      + "SHA-256(attestation_key || qe_auth_data) || zeros)");
  }
  let attKey: CryptoKey;
  try {
    attKey = await crypto.subtle.importKey("raw", concat(Uint8Array.of(4), q.attestationKey),
      { name: "ECDSA", namedCurve: "P-256" }, false, ["verify"]);
  } catch {
    throw new CheckFailed("quote_signature", "the attestation key is not a P-256 point");
  }
  await p256Verify(attKey, q.signature, q.signed, "quote_signature", "quote signature");
  return { quote: q, rootSha256: hex(sha256(rootDer)) };
}

/** What a relying party accepts; allow-lists are hex, `undefined` accepts anything. Debug TDs are refused. */
export interface TdxPolicy {
  allowDebug?: boolean;
  mrtd?: string[];
  rtmr?: [string[]?, string[]?, string[]?, string[]?];
}

export function checkTdxPolicy(v: VerifiedQuote, policy: TdxPolicy, reportData?: Bytes): void {
  const rep = v.quote.report;
  if (rep.debug && !policy.allowDebug) {
    throw new CheckFailed("debug", "the TD runs in DEBUG mode (TDATTRIBUTES bit 0): its memory is readable by the "
      + "host; refuse it");
  }
  if (policy.mrtd && !policy.mrtd.some((m) => equal(fromHex(m), rep.mrTd))) {
    throw new CheckFailed("mrtd", `MRTD ${hex(rep.mrTd).slice(0, 24)}... is not in the allow-list`);
  }
  (policy.rtmr ?? []).forEach((allowed, i) => {
    if (allowed && !allowed.some((m) => equal(fromHex(m), rep.rtmr[i]))) {
      throw new CheckFailed(`rtmr${i}`, `RTMR${i} ${hex(rep.rtmr[i]).slice(0, 24)}... is not in the allow-list`);
    }
  });
  if (reportData && !equal(rep.reportData, reportData)) {
    throw new CheckFailed("report_data", "REPORTDATA does not equal the binding of the presented document: the quote "
      + "belongs to other keys");
  }
}
