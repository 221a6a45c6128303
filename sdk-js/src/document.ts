// Attestation documents (docs/confidential.md; Python: cocoon_faas/confidential/document.py): verify a replica's
// document against the caller's policy before anything is sealed to it. Same checks, same order, same check names.
import { ed25519 } from "@noble/curves/ed25519.js";
import { sha256, sha512 } from "@noble/hashes/sha2.js";
import { type Bytes, concat, fromB64, fromHex, hex, utf8 } from "./bytes.js";
import type { VerifiedReplica } from "./envelope.js";
import { CheckFailed } from "./errors.js";
import type { Collateral } from "./collateral.js";
import { gpuEvidenceSha256, verifyGpuReport } from "./nvidia.js";
import { type TdxPolicy, type VerifiedQuote, checkTdxPolicy, verifyQuote } from "./tdx.js";

export const DOCUMENT_VERSION = 1;
const DOMAIN = utf8("cocoon-attestation-document/v1\x00");
const KEY_ID_DOMAIN = utf8("cocoon-hpke-key-id/v1\x00");
export const INSECURE_WARNING = "NOT SECURE: development attestation signed by a local key; no TEE protects this replica";

/** What a caller accepts. `measurements: null` accepts any measurement (say so explicitly); dev evidence needs both
 *  "dev" in `teeKinds` and its key in `trustedDevKeys` (hex Ed25519 public keys). */
export interface ClientPolicy {
  measurements: string[] | null;
  teeKinds?: string[];
  trustedDevKeys?: string[];
  function?: string;
  maxClockSkewS?: number;
  tdx?: TdxPolicy;
  /** DCAP collateral of the platform (`parseCollateral` of the JSON a PCCS, Intel PCS or any cache serves: it is
   *  verified to the same root). With it a `tdx` document is also checked for revocation and TCB status. */
  collateral?: Collateral;
  /** DER of the root the PCK chain and collateral must end at; default: the pinned Intel SGX Root CA. */
  root?: Bytes;
  /** Refuse documents without NVIDIA GPU evidence. */
  requireGpu?: boolean;
}

/** Python's json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=True). */
export function canonicalJson(v: unknown): string {
  if (v === null || typeof v === "boolean") return JSON.stringify(v);
  if (typeof v === "number") {
    if (!Number.isFinite(v)) throw new Error("canonical JSON has no NaN or Infinity");
    return JSON.stringify(v);
  }
  if (typeof v === "string") {
    return JSON.stringify(v).replace(/[\u007f-\uffff]/g, (c) => (c === "\u007f" ? c : "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0")));
  }
  if (Array.isArray(v)) return "[" + v.map(canonicalJson).join(",") + "]";
  if (typeof v === "object") {
    const keys = Object.keys(v as object).sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
    return "{" + keys.map((k) => canonicalJson(k) + ":" + canonicalJson((v as Record<string, unknown>)[k])).join(",") + "}";
  }
  throw new Error(`cannot encode ${typeof v} as canonical JSON`);
}

export function keyId(hpkePublicKey: Bytes): string {
  return hex(sha256(concat(KEY_ID_DOMAIN, hpkePublicKey)).subarray(0, 16));
}

export function documentBinding(body: Record<string, unknown>): Bytes {
  return sha512(concat(DOMAIN, utf8(canonicalJson(body))));
}

function hexField(body: Record<string, unknown>, name: string, length: number): Bytes {
  let v: Bytes;
  try {
    v = fromHex(String(body[name] ?? ""));
  } catch {
    throw new CheckFailed("document", `document field \`${name}\` is missing or not hex`);
  }
  if (v.length !== length) throw new CheckFailed("document", `document field \`${name}\` must be ${length} bytes`);
  return v;
}

/** Verify a document's evidence and the policy; throw `CheckFailed` naming the failed check. `now`: seconds. */
export async function verifyDocument(doc: unknown, policy: ClientPolicy, now = Date.now() / 1000): Promise<VerifiedReplica> {
  if (typeof doc === "string") {
    try {
      doc = JSON.parse(doc);
    } catch {
      throw new CheckFailed("document", "the attestation document is not JSON");
    }
  }
  if (typeof doc !== "object" || doc === null || typeof (doc as Record<string, unknown>).evidence !== "object"
      || (doc as Record<string, unknown>).evidence === null) {
    throw new CheckFailed("document", "the attestation document has no `evidence` object");
  }
  const { evidence, ...body } = doc as Record<string, unknown>;
  const ev = evidence as Record<string, unknown>;
  if (body.v !== DOCUMENT_VERSION) throw new CheckFailed("document", `document version ${String(body.v)} is not ${DOCUMENT_VERSION}; upgrade`);
  for (const k of ["function", "measurement", "runtime_version", "tee", "issued_at", "expires_at"]) {
    if (body[k] === undefined || body[k] === null) throw new CheckFailed("document", `document field '${k}' is missing or malformed`);
  }
  const fn = String(body.function);
  const measurement = String(body.measurement).toLowerCase();
  const tee = String(body.tee);
  const issued = Number(body.issued_at);
  const expires = Number(body.expires_at);
  if (!Number.isFinite(issued) || !Number.isFinite(expires)) throw new CheckFailed("document", "document times are malformed");
  const hpkePk = hexField(body, "hpke_public_key", 32);
  const receiptPk = hexField(body, "receipt_public_key", 32);
  if (policy.function !== undefined && fn !== policy.function) {
    throw new CheckFailed("function", `document is for function '${fn}', not '${policy.function}'`);
  }
  if (now > expires) throw new CheckFailed("expired", `document expired ${(now - expires).toFixed(0)}s ago; refetch the documents`);
  if (issued > now + (policy.maxClockSkewS ?? 300)) throw new CheckFailed("document", "document issued in the future; check the clocks");
  if (policy.measurements !== null && !policy.measurements.map((m) => m.toLowerCase()).includes(measurement)) {
    throw new CheckFailed("measurement", `measurement ${measurement.slice(0, 16)}... is not one this client allows `
      + "(by default: the measurement `cocoon deploy` printed)");
  }
  const kinds = policy.teeKinds ?? (policy.trustedDevKeys?.length ? ["tdx", "dev"] : ["tdx"]);
  if (!kinds.includes(tee) || ev.kind !== tee) {
    throw new CheckFailed("tee_kind", `TEE kind '${String(ev.kind)}' (document says '${tee}') is not allowed; allowed: ${JSON.stringify([...kinds].sort())}`);
  }
  if (body.key_id !== keyId(hpkePk)) throw new CheckFailed("key_id", "document key_id is not the fingerprint of its HPKE key");
  const binding = documentBinding(body);
  let q: VerifiedQuote | undefined;
  if (tee === "dev") {
    const devPk = String(ev.dev_public_key ?? "").toLowerCase();
    if (!(policy.trustedDevKeys ?? []).map((k) => k.toLowerCase()).includes(devPk)) {
      throw new CheckFailed("dev_key_untrusted", `dev attestation key ${devPk.slice(0, 16)}... is not trusted. `
        + `${INSECURE_WARNING}. Trust it explicitly (trustedDevKeys) only for development`);
    }
    let ok = false;
    try {
      ok = ed25519.verify(fromHex(String(ev.signature ?? "")), binding, fromHex(devPk));
    } catch {
      ok = false;
    }
    if (!ok) throw new CheckFailed("dev_signature", "the dev attestation signature does not cover this document");
  } else if (tee === "tdx") {
    let quote: Bytes;
    try {
      quote = fromB64(String(ev.quote));
    } catch {
      throw new CheckFailed("document", "tdx evidence has no base64 `quote`");
    }
    q = await verifyQuote(quote, { at: new Date(now * 1000), root: policy.root, collateral: policy.collateral });
    checkTdxPolicy(q, policy.tdx ?? {}, binding);
  } else {
    throw new CheckFailed("tee_kind", `unknown TEE kind '${tee}'`);
  }
  await checkGpu(body, ev, policy, now);
  return {
    function: fn, measurement, runtimeVersion: String(body.runtime_version), keyId: String(body.key_id),
    hpkePublicKey: hpkePk, receiptPublicKey: receiptPk, tee, expiresAt: expires, insecure: tee === "dev",
    document: doc as Record<string, unknown>, quote: q,
  };
}

/** NVIDIA GPU evidence: its hash sits in the body (so the TEE evidence covers it); the SPDM report must verify to
 *  the pinned NVIDIA root. Present evidence is always checked; `requireGpu` refuses a document without it. */
async function checkGpu(body: Record<string, unknown>, ev: Record<string, unknown>, policy: ClientPolicy,
                        now: number): Promise<void> {
  const claimed = body.gpu_evidence_sha256;
  const nv = ev.nvidia as Record<string, unknown> | undefined;
  if ((claimed === undefined || claimed === null) && !policy.requireGpu) return;
  if (claimed === undefined || claimed === null) {
    throw new CheckFailed("gpu_evidence", "policy requires NVIDIA GPU evidence and the document has none");
  }
  if (typeof nv !== "object" || nv === null) {
    throw new CheckFailed("gpu_evidence", "the document commits to NVIDIA GPU evidence but carries none (evidence.nvidia); "
      + "refetch the documents");
  }
  let report: Bytes;
  try {
    report = fromHex(String(nv.report ?? ""));
  } catch {
    throw new CheckFailed("gpu_evidence", "the GPU evidence `report` is not hex");
  }
  const chain = String(nv.cert_chain ?? "");
  if (gpuEvidenceSha256(report, chain) !== claimed) {
    throw new CheckFailed("gpu_evidence", "the GPU evidence is not the one the document's binding covers");
  }
  await verifyGpuReport(report, chain, { at: new Date(now * 1000) });
}
