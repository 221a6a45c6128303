// Intel TDX DCAP quotes verified in the browser (Python: cocoon_faas/confidential/tdx.py), checks in the spec's
// order with the same names: `header` -> `pck_chain` (signatures and validity at `at` up to the pinned Intel SGX
// Root CA; a root inside the quote is ignored) -> `qe_report_signature` -> `qe_binding` -> `quote_signature`, then
// with collateral `crl_chain`, `crl`, `revoked`, `tcb_info`, `qe_identity`, `tcb_status` (collateral.ts). WebCrypto's
// ECDSA P-256 and @peculiar/x509 for the certificates and CRLs. Parsing: quote.ts.
import "reflect-metadata"; // @peculiar/x509 resolves its ASN.1 parsers through tsyringe, which needs it
import * as x509 from "@peculiar/x509";
import { sha256 } from "@noble/hashes/sha2.js";
import { type Bytes, concat, equal, hex, fromHex } from "./bytes.js";
import { ecKey, ecdsaOk, fingerprint, verifyChain } from "./chain.js";
import { type Collateral, DEFAULT_ACCEPTED_TCB, type TcbResult, checkRevocation, evaluateTcb } from "./collateral.js";
import { CheckFailed } from "./errors.js";
import { parsePckExtension } from "./pck.js";
import { type TdxQuote, parseQuote } from "./quote.js";
import { intelRootDer } from "./roots.js";

const INTEL_QE_VENDOR_ID = "939a7233f79c4ca9940a0db3957f0607";

async function p256Verify(key: CryptoKey, sig: Bytes, data: Bytes, check: string, what: string): Promise<void> {
  if (!await ecdsaOk(key, "SHA-256", sig, data)) {
    throw new CheckFailed(check, `${what} does not verify; the quote was altered or is not genuine`);
  }
}

/** A quote whose signatures verified to `rootSha256`; `tcb` is set when collateral was checked. */
export interface VerifiedQuote {
  quote: TdxQuote;
  rootSha256: string;
  tcb?: TcbResult;
}

export interface VerifyQuoteOptions {
  /** Evaluation time (evidence and collateral expire); default now. */
  at?: Date;
  /** DER of the root every chain must end at; default the pinned Intel SGX Root CA. */
  root?: Bytes;
  /** With collateral: revocation, TCB info, QE identity and the TCB status are checked too. */
  collateral?: Collateral;
  /** TCB statuses that pass; default DEFAULT_ACCEPTED_TCB. */
  acceptTcb?: readonly string[];
}

/** Verify a TDX quote's signatures (and, with collateral, revocation and TCB status) at `at`. */
export async function verifyQuote(data: Bytes | TdxQuote, opts: VerifyQuoteOptions = {}): Promise<VerifiedQuote> {
  const q = data instanceof Uint8Array ? parseQuote(data) : data;
  const at = opts.at ?? new Date();
  const root = new x509.X509Certificate(opts.root ?? intelRootDer());
  if (q.attKeyType !== 2) throw new CheckFailed("header", `attestation key type ${q.attKeyType} is not ECDSA-P256 (2)`);
  if (q.qeVendorId !== INTEL_QE_VENDOR_ID) throw new CheckFailed("header", `QE vendor id ${q.qeVendorId} is not Intel's`);
  let chain: x509.X509Certificate[];
  try {
    chain = q.pckChainPem.map((p) => new x509.X509Certificate(p));
  } catch (e) {
    throw new CheckFailed("pck_chain", `the PCK chain does not parse (${(e as Error).message})`);
  }
  const leaf = await verifyChain(chain, root, at, "pck_chain");
  const leafKey = await ecKey(leaf, "pck_chain");
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
  let tcb: TcbResult | undefined;
  if (opts.collateral) {
    await checkRevocation(opts.collateral, chain, root, at);
    tcb = await evaluateTcb(opts.collateral, parsePckExtension(leaf), q.report, q.qe, root, at);
    if (!(opts.acceptTcb ?? DEFAULT_ACCEPTED_TCB).includes(tcb.status)) {
      throw new CheckFailed("tcb_status", `TCB status is ${tcb.status} (platform ${tcb.platformStatus}, module `
        + `${tcb.moduleStatus}, QE ${tcb.qeStatus}); update the platform or accept this status explicitly`);
    }
  }
  return { quote: q, rootSha256: fingerprint(root), tcb };
}

/** What a relying party accepts; allow-lists are hex, `undefined` accepts anything. Debug TDs are refused;
 *  `requireCollateral` refuses a quote whose TCB status was not checked. */
export interface TdxPolicy {
  allowDebug?: boolean;
  mrtd?: string[];
  rtmr?: [string[]?, string[]?, string[]?, string[]?];
  requireCollateral?: boolean;
}

export function checkTdxPolicy(v: VerifiedQuote, policy: TdxPolicy, reportData?: Bytes): void {
  const rep = v.quote.report;
  if (rep.debug && !policy.allowDebug) {
    throw new CheckFailed("debug", "the TD runs in DEBUG mode (TDATTRIBUTES bit 0): its memory is readable by the "
      + "host; refuse it");
  }
  if (policy.requireCollateral && !v.tcb) {
    throw new CheckFailed("tcb_status", "policy requires collateral (TCB status) and none was checked; pass the "
      + "platform's collateral (policy.collateral)");
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
