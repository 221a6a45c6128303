// Intel TDX DCAP quotes, v4 and v5: parsing by the length fields (Python: cocoon_faas/confidential/quote.py; spec:
// ../shared/specs/attestation.md). Integers little-endian; trailing bytes after the structure are ignored (real
// quote buffers carry padding or text). Parsing never verifies; see `verifyQuote` (tdx.ts).
import type { Bytes } from "./bytes.js";
import { hex } from "./bytes.js";
import { CheckFailed } from "./errors.js";

const HEADER_LEN = 48;
const TD10_LEN = 584;
const TD15_LEN = 648;
const QE_REPORT_LEN = 384;

export interface TdReport {
  teeTcbSvn: Bytes;
  mrSignerSeam: Bytes;
  seamAttributes: Bytes;
  tdAttributes: Bytes;
  mrTd: Bytes;
  rtmr: [Bytes, Bytes, Bytes, Bytes];
  reportData: Bytes;
  debug: boolean;
}

/** The quoting enclave's SGX report body fields that QE identity checks read. */
export interface QeReport {
  miscSelect: number;
  attributes: Bytes;
  mrSigner: Bytes;
  isvProdId: number;
  isvSvn: number;
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
  qe: QeReport;
  qeReportSignature: Bytes;
  qeAuthData: Bytes;
  pckChainPem: string[];
  length: number;
}

const le16 = (b: Bytes, o: number): number => b[o] | (b[o + 1] << 8);
const le32 = (b: Bytes, o: number): number => (b[o] | (b[o + 1] << 8) | (b[o + 2] << 16)) + b[o + 3] * 0x1000000;

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
    return le16(this.take(2, what), 0);
  }
  u32(what: string): number {
    return le32(this.take(4, what), 0);
  }
}

export function parseQuote(data: Bytes): TdxQuote {
  const r = new Reader(data);
  const header = r.take(HEADER_LEN, "header");
  const version = le16(header, 0);
  const attKeyType = le16(header, 2);
  const teeType = le32(header, 4);
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
    teeTcbSvn: b.slice(0, 16), mrSignerSeam: b.slice(64, 112), seamAttributes: b.slice(112, 120),
    tdAttributes: b.slice(120, 128), mrTd: b.slice(136, 184),
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
  const qe: QeReport = {
    miscSelect: le32(qeReport, 16), attributes: qeReport.slice(48, 64), mrSigner: qeReport.slice(128, 160),
    isvProdId: le16(qeReport, 256), isvSvn: le16(qeReport, 258),
  };
  const qeReportSignature = cd.take(64, "QE report signature");
  const qeAuthData = cd.take(cd.u16("QE auth data length"), "QE auth data");
  const inner = cd.u16("PCK certification data type");
  if (inner !== 5) throw new CheckFailed("structure", `PCK certification data type ${inner}; expected 5 (PEM chain)`);
  const pem = new TextDecoder("latin1").decode(cd.take(cd.u32("PCK chain size"), "PCK chain"));
  const pckChainPem = pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
  if (pckChainPem.length === 0) throw new CheckFailed("structure", "the quote carries no PCK certificate chain");
  return {
    version, attKeyType, teeType, qeVendorId: hex(header.slice(12, 28)), bodyType, report, signed, signature,
    attestationKey, qeReport, qe, qeReportSignature, qeAuthData, pckChainPem, length: r.pos,
  };
}
