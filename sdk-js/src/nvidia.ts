// NVIDIA Hopper GPU attestation reports (Python: cocoon_faas/confidential/nvidia.py, same checks and names): an SPDM
// 1.1 GET_MEASUREMENTS request (37 bytes: 0x11, 0xE0, param1, param2, 32-byte nonce, slot id) followed by the
// response (0x11, 0x60, param1, param2, block count u8, record length u24 LE, measurement blocks, 32-byte responder
// nonce, opaque length u16 LE, opaque data, 96-byte ECDSA-P384 r‖s). The GPU's attestation key signs
// SHA-384(request ‖ response without the signature); its certificate chain must end at the pinned NVIDIA Device
// Identity CA. Checks: `gpu_structure`, `gpu_chain`, `gpu_signature`, `gpu_nonce`. Comparing measurements to
// NVIDIA's signed reference manifests needs the network and is out of scope here (as in Python).
import "reflect-metadata";
import * as x509 from "@peculiar/x509";
import { sha256 } from "@noble/hashes/sha2.js";
import { type Bytes, concat, equal, hex, utf8 } from "./bytes.js";
import { ecKey, ecdsaOk, loadPemChain, verifyChain } from "./chain.js";
import { CheckFailed } from "./errors.js";
import { nvidiaRootDer } from "./roots.js";

const REQUEST_LEN = 37;
const SIG_LEN = 96;

export interface GpuReport {
  raw: Bytes;
  requestNonce: Bytes;
  responderNonce: Bytes;
  /** Measurement block index -> value. */
  measurements: Map<number, Bytes>;
  /** Opaque field type -> value. */
  opaque: Map<number, Bytes>;
  signature: Bytes;
}

export interface VerifiedGpuReport {
  report: GpuReport;
  leafSubject: string;
}

const TEXT_FIELDS: [number, string][] = [[3, "driver_version"], [15, "chip_sku"], [16, "chip_sku_mod"],
  [17, "project"], [18, "project_sku"], [11, "nvdec0_status"], [21, "protected_pcie_status"]];
const RAW_FIELDS: [number, string][] = [[14, "board_id"], [4, "gpu_info"], [13, "cpr_info"], [20, "fwid"]];

/** The opaque fields NVIDIA's verifier reports as `config` (names as in its claims). */
export function gpuConfig(rep: GpuReport): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [t, name] of TEXT_FIELDS) {
    const v = rep.opaque.get(t);
    if (v) out[name] = new TextDecoder().decode(v).replace(/\0+$/, "");
  }
  for (const [t, name] of RAW_FIELDS) {
    const v = rep.opaque.get(t);
    if (v) out[name] = hex(v);
  }
  return out;
}

function need(b: Bytes, n: number, what: string): void {
  if (b.length < n) throw new CheckFailed("gpu_structure", `GPU report truncated in ${what}`);
}

const le16 = (b: Bytes, o: number): number => b[o] | (b[o + 1] << 8);

export function parseGpuReport(raw: Bytes): GpuReport {
  need(raw, REQUEST_LEN + 8 + SIG_LEN, "header");
  if (raw[0] !== 0x11 || raw[1] !== 0xe0 || raw[REQUEST_LEN] !== 0x11 || raw[REQUEST_LEN + 1] !== 0x60) {
    throw new CheckFailed("gpu_structure", "not an SPDM 1.1 GET_MEASUREMENTS request/response pair");
  }
  const resp = raw.subarray(REQUEST_LEN);
  const nblocks = resp[4];
  const recLen = resp[5] | (resp[6] << 8) | (resp[7] << 16);
  need(resp, 8 + recLen + 34, "measurement record");
  const rec = resp.subarray(8, 8 + recLen);
  const measurements = new Map<number, Bytes>();
  let pos = 0;
  for (let i = 0; i < nblocks; i++) {
    need(rec.subarray(pos), 7, "measurement block");
    const index = rec[pos];
    const size = le16(rec, pos + 2);
    const vsize = le16(rec, pos + 5);
    measurements.set(index, rec.slice(pos + 7, pos + 7 + vsize));
    pos += 4 + size;
  }
  const p = 8 + recLen;
  const responderNonce = resp.slice(p, p + 32);
  const olen = le16(resp, p + 32);
  const opaqueRaw = resp.subarray(p + 34, p + 34 + olen);
  if (resp.length !== p + 34 + olen + SIG_LEN) {
    throw new CheckFailed("gpu_structure", "GPU report length does not match its length fields");
  }
  const opaque = new Map<number, Bytes>();
  for (let q = 0; q + 4 <= opaqueRaw.length;) {
    const n = le16(opaqueRaw, q + 2);
    opaque.set(le16(opaqueRaw, q), opaqueRaw.slice(q + 4, q + 4 + n));
    q += 4 + n;
  }
  return { raw: raw.slice(), requestNonce: raw.slice(4, 36), responderNonce, measurements, opaque,
    signature: raw.slice(raw.length - SIG_LEN) };
}

export interface VerifyGpuOptions {
  at?: Date;
  /** DER of the root the chain must end at; default the pinned NVIDIA Device Identity CA. */
  root?: Bytes;
  /** The 32-byte nonce this verifier asked the GPU to answer; a report for another nonce is a replay. */
  expectedNonce?: Bytes;
}

/** Verify the chain to the pinned NVIDIA root and the report's P-384 signature (and nonce, when expected). */
export async function verifyGpuReport(raw: Bytes, chainPem: string, opts: VerifyGpuOptions = {}): Promise<VerifiedGpuReport> {
  const rep = parseGpuReport(raw);
  const leaf = await verifyChain(loadPemChain(chainPem, "gpu_chain"),
    new x509.X509Certificate(opts.root ?? nvidiaRootDer()), opts.at ?? new Date(), "gpu_chain");
  const key = await ecKey(leaf, "gpu_chain");
  if (!await ecdsaOk(key, "SHA-384", rep.signature, rep.raw.subarray(0, rep.raw.length - SIG_LEN))) {
    throw new CheckFailed("gpu_signature", "the GPU report signature does not verify; the report was altered or "
      + "comes from another GPU");
  }
  if (opts.expectedNonce && !equal(rep.requestNonce, opts.expectedNonce)) {
    throw new CheckFailed("gpu_nonce", "the GPU report answers another nonce (a replayed report)");
  }
  return { report: rep, leafSubject: leaf.subject };
}

/** SHA-256(report ‖ 0x00 ‖ PEM chain): what a document's `gpu_evidence_sha256` commits to. */
export function gpuEvidenceSha256(report: Bytes, chainPem: string): string {
  return hex(sha256(concat(report, Uint8Array.of(0), utf8(chainPem))));
}
