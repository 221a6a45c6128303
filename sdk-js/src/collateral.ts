// DCAP collateral for TDX: revocation lists, TCB info, QE identity, and the TCB status they give a quote (Python:
// cocoon_faas/confidential/collateral.py, same checks, order and names). Collateral comes in the JSON form
// dcap-qvl and a PCCS give (`pck_crl_issuer_chain`, `root_ca_crl`, `pck_crl`, `tcb_info_issuer_chain`, `tcb_info`,
// `tcb_info_signature`, `qe_identity_issuer_chain`, `qe_identity`, `qe_identity_signature`; CRLs hex DER or PEM,
// signatures hex r‖s). It may come from an untrusted cache (a page's own server, a CDN): every piece is verified to
// the same pinned root before use. The TCB evaluation follows Intel's quote verification library: TDX module
// identity (TEE_TCB_SVN[1] selects `TDX_NN`), the first platform level the PCK SVNs and TEE TCB SVNs meet (TEE SVN
// indexes 0 and 1 skipped when a module version is set), the QE identity level, then the worst status.
import "reflect-metadata";
import * as x509 from "@peculiar/x509";
import { type Bytes, equal, fromB64, fromHex, hex, utf8 } from "./bytes.js";
import { ecKey, ecdsaOk, loadPemChain, verifyChain } from "./chain.js";
import { CheckFailed } from "./errors.js";
import type { PckExtension } from "./pck.js";
import type { QeReport, TdReport } from "./quote.js";

/** TCB statuses a quote passes with by default (as the Python SDK's DEFAULT_ACCEPTED_TCB). */
export const DEFAULT_ACCEPTED_TCB: readonly string[] = ["UpToDate", "SWHardeningNeeded", "ConfigurationNeeded",
  "ConfigurationAndSWHardeningNeeded"];
const RANK = ["UpToDate", "SWHardeningNeeded", "ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded",
  "OutOfDate", "OutOfDateConfigurationNeeded", "Revoked"];

/** Verification collateral for one FMSPC; the signed JSON stays a string so signatures cover the exact bytes. */
export interface Collateral {
  pckCrlIssuerChain: string;
  rootCaCrl: Bytes;
  pckCrl: Bytes;
  tcbInfoIssuerChain: string;
  tcbInfo: string;
  tcbInfoSignature: Bytes;
  qeIdentityIssuerChain: string;
  qeIdentity: string;
  qeIdentitySignature: Bytes;
}

/** The outcome of the collateral checks: overall status and its parts. */
export interface TcbResult {
  status: string;
  platformStatus: string;
  moduleStatus: string;
  qeStatus: string;
  advisoryIds: string[];
  fmspc: string;
}

function crlBytes(v: string): Bytes {
  if (!v.trimStart().startsWith("-----BEGIN")) return fromHex(v);
  return fromB64(v.replace(/-----(BEGIN|END)[^-]*-----/g, "").replace(/\s+/g, ""));
}

/** Collateral from its JSON (text or parsed); `collateral` names what is missing or malformed. */
export function parseCollateral(data: string | Record<string, unknown>): Collateral {
  try {
    const d = (typeof data === "string" ? JSON.parse(data) : data) as Record<string, unknown>;
    const str = (k: string): string => {
      if (typeof d[k] !== "string") throw new Error(`'${k}' is missing or not a string`);
      return d[k] as string;
    };
    return {
      pckCrlIssuerChain: str("pck_crl_issuer_chain"), rootCaCrl: crlBytes(str("root_ca_crl")),
      pckCrl: crlBytes(str("pck_crl")), tcbInfoIssuerChain: str("tcb_info_issuer_chain"), tcbInfo: str("tcb_info"),
      tcbInfoSignature: fromHex(str("tcb_info_signature")), qeIdentityIssuerChain: str("qe_identity_issuer_chain"),
      qeIdentity: str("qe_identity"), qeIdentitySignature: fromHex(str("qe_identity_signature")),
    };
  } catch (e) {
    throw new CheckFailed("collateral", `collateral JSON is malformed (${(e as Error).message}); pass the JSON that `
      + "dcap-qvl or a PCCS returns");
  }
}

function parseTime(v: unknown, check: string, what: string): Date {
  const t = typeof v === "string" ? new Date(v) : new Date(NaN);
  if (Number.isNaN(t.getTime())) throw new CheckFailed(check, `${what} is missing or not an ISO time`);
  return t;
}

async function verifySignedJson(body: string, sig: Bytes, chainPem: string, root: x509.X509Certificate, at: Date,
                                check: string): Promise<Record<string, any>> {
  const signer = await verifyChain(loadPemChain(chainPem, check + "_chain"), root, at, check + "_chain");
  if (sig.length !== 64) throw new CheckFailed(check, `signature must be 64 bytes r||s, got ${sig.length}`);
  if (!await ecdsaOk(await ecKey(signer, check), "SHA-256", sig, utf8(body))) {
    throw new CheckFailed(check, "signature does not verify; the collateral was altered");
  }
  let doc: Record<string, any>;
  try {
    doc = JSON.parse(body);
  } catch {
    throw new CheckFailed(check, "the signed body is not JSON");
  }
  if (parseTime(doc.nextUpdate, check, "nextUpdate") < at) {
    throw new CheckFailed(check, `expired at ${doc.nextUpdate}; fetch fresh collateral or pass the evaluation time`);
  }
  if (parseTime(doc.issueDate, check, "issueDate") > at) {
    throw new CheckFailed(check, `issued ${doc.issueDate}, after the evaluation time`);
  }
  return doc;
}

const serial = (s: string): string => s.toLowerCase().replace(/^0+/, "");

/** Root CA CRL (signed by the root) and PCK CRL (signed by the PCK CA) are current and list no cert of ours. */
export async function checkRevocation(col: Collateral, pckChain: x509.X509Certificate[], root: x509.X509Certificate,
                                      at: Date): Promise<void> {
  const pckCa = await verifyChain(loadPemChain(col.pckCrlIssuerChain, "crl_chain"), root, at, "crl_chain");
  for (const [name, raw, issuer] of [["root CA CRL", col.rootCaCrl, root], ["PCK CRL", col.pckCrl, pckCa]] as const) {
    let crl: x509.X509Crl;
    try {
      crl = new x509.X509Crl(raw);
    } catch (e) {
      throw new CheckFailed("crl", `the ${name} does not parse (${(e as Error).message}); fetch fresh collateral`);
    }
    const signed = crl.issuer === issuer.subject
      && await crl.verify({ publicKey: issuer }).catch(() => false);
    if (!signed) throw new CheckFailed("crl", `the ${name} is not signed by '${issuer.subject}'`);
    if (crl.nextUpdate && crl.nextUpdate < at) {
      throw new CheckFailed("crl", `the ${name} expired at ${crl.nextUpdate.toISOString()}; fetch fresh collateral`);
    }
    const revoked = new Set(crl.entries.map((e) => serial(e.serialNumber)));
    for (const cert of pckChain) {
      if (cert.issuer === crl.issuer && revoked.has(serial(cert.serialNumber))) {
        throw new CheckFailed("revoked", `certificate '${cert.subject}' serial ${serial(cert.serialNumber)} is `
          + `revoked by the ${name}`);
      }
    }
  }
}

/** Intel's convergence of platform, module and QE statuses: Revoked or an unknown status wins, else flags merge. */
export function worstStatus(...statuses: string[]): string {
  const flags = new Set<string>();
  for (const s of statuses) {
    if (!RANK.includes(s) || s === "Revoked") return s;
    if (s.includes("OutOfDate")) flags.add("ood");
    if (s.includes("Configuration")) flags.add("cfg");
    if (s.includes("SWHardening")) flags.add("sw");
  }
  if (flags.has("ood")) return flags.has("cfg") ? "OutOfDateConfigurationNeeded" : "OutOfDate";
  if (flags.has("cfg")) return flags.has("sw") ? "ConfigurationAndSWHardeningNeeded" : "ConfigurationNeeded";
  return flags.has("sw") ? "SWHardeningNeeded" : "UpToDate";
}

function hexOf(v: unknown, check: string, what: string): Bytes {
  try {
    return fromHex(String(v ?? ""));
  } catch {
    throw new CheckFailed(check, `${what} is missing or not hex`);
  }
}

function maskedEq(value: Bytes, expectedHex: unknown, maskHex: unknown, check: string): boolean {
  const exp = hexOf(expectedHex, check, "an expected value");
  const mask = hexOf(maskHex, check, "a mask");
  return value.length === exp.length && exp.length === mask.length && value.every((v, i) => (v & mask[i]) === exp[i]);
}

function levels(v: unknown, check: string): Record<string, any>[] {
  if (!Array.isArray(v)) throw new CheckFailed(check, "tcbLevels is missing");
  return v as Record<string, any>[];
}

/** An SVN from signed JSON: a missing one must refuse, never compare as `undefined` (always false). */
function svn(v: unknown, check: string): number {
  if (typeof v !== "number" || !Number.isInteger(v)) throw new CheckFailed(check, "a TCB level has a missing or non-integer SVN");
  return v;
}

function moduleStatus(tcb: Record<string, any>, report: TdReport): string {
  const [isvsvn, version] = [report.teeTcbSvn[0], report.teeTcbSvn[1]];
  let ident: Record<string, any> | undefined;
  let identName = "tdxModule";
  let lv: Record<string, any>[] | null = null;
  if (version === 0) {
    ident = tcb.tdxModule;
  } else {
    identName = `TDX_${version.toString(16).toUpperCase().padStart(2, "0")}`;
    ident = (Array.isArray(tcb.tdxModuleIdentities) ? tcb.tdxModuleIdentities : [])
      .find((m: Record<string, any>) => String(m.id).toUpperCase() === identName);
    lv = ident ? levels(ident.tcbLevels, "tcb_status") : null;
  }
  if (!ident) throw new CheckFailed("tcb_status", `the TCB info names no TDX module identity ${identName}`);
  if (!equal(hexOf(ident.mrsigner, "tcb_status", "mrsigner"), report.mrSignerSeam)) {
    throw new CheckFailed("tcb_status", `MRSIGNERSEAM does not match TDX module identity ${identName}`);
  }
  if (!maskedEq(report.seamAttributes, ident.attributes, ident.attributesMask, "tcb_status")) {
    throw new CheckFailed("tcb_status", `SEAMATTRIBUTES do not match TDX module identity ${identName}`);
  }
  if (lv === null) return "UpToDate";
  for (const l of lv) if (isvsvn >= svn(l.tcb?.isvsvn, "tcb_status")) return String(l.tcbStatus);
  throw new CheckFailed("tcb_status", `TDX module ${identName} SVN ${isvsvn} is below every rated level`);
}

/** Verify TCB info and QE identity to `root` at `at` and return the TCB status of this quote. */
export async function evaluateTcb(col: Collateral, pck: PckExtension, report: TdReport, qe: QeReport,
                                  root: x509.X509Certificate, at: Date): Promise<TcbResult> {
  const tcb = await verifySignedJson(col.tcbInfo, col.tcbInfoSignature, col.tcbInfoIssuerChain, root, at, "tcb_info");
  const qei = await verifySignedJson(col.qeIdentity, col.qeIdentitySignature, col.qeIdentityIssuerChain, root, at,
    "qe_identity");
  if (tcb.id !== "TDX" || tcb.version !== 3) {
    throw new CheckFailed("tcb_info", `TCB info id ${tcb.id} v${tcb.version} is not TDX v3`);
  }
  if (!equal(hexOf(tcb.fmspc, "tcb_info", "fmspc"), pck.fmspc) || !equal(hexOf(tcb.pceId, "tcb_info", "pceId"), pck.pceId)) {
    throw new CheckFailed("tcb_info", `TCB info is for FMSPC ${tcb.fmspc}, the PCK leaf says `
      + `${hex(pck.fmspc).toUpperCase()}; fetch the collateral of this platform`);
  }
  if (qei.id !== "TD_QE") throw new CheckFailed("qe_identity", `QE identity id ${qei.id} is not TD_QE`);
  if (!equal(hexOf(qei.mrsigner, "qe_identity", "mrsigner"), qe.mrSigner) || qei.isvprodid !== qe.isvProdId) {
    throw new CheckFailed("qe_identity", "the quoting enclave's MRSIGNER/ISVPRODID are not Intel's TD QE");
  }
  const misc = Uint8Array.of(qe.miscSelect & 0xff, (qe.miscSelect >>> 8) & 0xff, (qe.miscSelect >>> 16) & 0xff,
    (qe.miscSelect >>> 24) & 0xff);
  if (!maskedEq(misc, qei.miscselect, qei.miscselectMask, "qe_identity")
      || !maskedEq(qe.attributes, qei.attributes, qei.attributesMask, "qe_identity")) {
    throw new CheckFailed("qe_identity", "the quoting enclave's MISCSELECT/ATTRIBUTES do not match");
  }
  const qeLevel = levels(qei.tcbLevels, "qe_identity").find((l) => qe.isvSvn >= svn(l.tcb?.isvsvn, "qe_identity"));
  if (!qeLevel) throw new CheckFailed("qe_identity", `QE ISVSVN ${qe.isvSvn} is below every rated level`);
  const qeStatus = String(qeLevel.tcbStatus);
  const modStatus = moduleStatus(tcb, report);
  const start = report.teeTcbSvn[1] > 0 ? 2 : 0;
  let platform: string | null = null;
  let advisories: string[] = [];
  for (const l of levels(tcb.tcbLevels, "tcb_info")) {
    const t = l.tcb ?? {};
    const sgx: number[] = (t.sgxtcbcomponents ?? []).map((c: Record<string, any>) => svn(c?.svn, "tcb_info"));
    const tdx: number[] = (t.tdxtcbcomponents ?? []).map((c: Record<string, any>) => svn(c?.svn, "tcb_info"));
    if (sgx.length !== 16 || tdx.length !== 16) {
      throw new CheckFailed("tcb_info", "a TCB level does not list 16 SGX and 16 TDX components");
    }
    if (pck.pceSvn < svn(t.pcesvn, "tcb_info") || pck.compSvns.some((a, i) => a < sgx[i])) continue;
    if (Array.from(report.teeTcbSvn.subarray(start), (a, i) => a < tdx[start + i]).some(Boolean)) continue;
    platform = String(l.tcbStatus);
    advisories = Array.isArray(l.advisoryIDs) ? l.advisoryIDs.map(String) : [];
    break;
  }
  if (platform === null) {
    throw new CheckFailed("tcb_status", "the platform's TCB is below every level the TCB info rates");
  }
  return { status: worstStatus(platform, modStatus, qeStatus), platformStatus: platform, moduleStatus: modStatus,
    qeStatus, advisoryIds: advisories, fmspc: hex(pck.fmspc) };
}
