// The Intel SGX extension of a PCK leaf certificate (OID 1.2.840.113741.1.13.1): FMSPC, PCE-ID and TCB SVNs
// (Python: cocoon_faas/confidential/pck.py). The extension is a DER `SEQUENCE OF SEQUENCE { OID, value }`; the TCB
// entry (…13.1.2) nests 16 component SVNs (…2.1..2.16), the PCESVN (…2.17) and the CPUSVN (…2.18). A few lines of
// bounded DER reading; anything unexpected is `pck_extension`.
import type * as x509 from "@peculiar/x509";
import type { Bytes } from "./bytes.js";
import { CheckFailed } from "./errors.js";

export const SGX_EXTENSION_OID = "1.2.840.113741.1.13.1";

export interface PckExtension {
  fmspc: Bytes;
  pceId: Bytes;
  cpuSvn: Bytes;
  compSvns: number[];
  pceSvn: number;
}

interface Tlv { tag: number; content: Bytes; next: number }

function tlv(b: Bytes, pos: number): Tlv {
  const truncated = () => new CheckFailed("pck_extension", "truncated DER in the SGX extension");
  if (pos + 2 > b.length) throw truncated();
  const tag = b[pos];
  let n = b[pos + 1];
  pos += 2;
  if (n & 0x80) {
    const k = n & 0x7f;
    if (k > 4 || pos + k > b.length) throw truncated();
    n = 0;
    for (let i = 0; i < k; i++) n = n * 256 + b[pos + i];
    pos += k;
  }
  if (pos + n > b.length) throw truncated();
  return { tag, content: b.slice(pos, pos + n), next: pos + n };
}

function items(b: Bytes): Tlv[] {
  const out: Tlv[] = [];
  for (let pos = 0; pos < b.length;) {
    const t = tlv(b, pos);
    out.push(t);
    pos = t.next;
  }
  return out;
}

function oid(c: Bytes): string {
  if (!c.length) throw new CheckFailed("pck_extension", "an empty OID in the SGX extension");
  const parts = [Math.floor(c[0] / 40), c[0] % 40];
  let v = 0;
  for (const x of c.subarray(1)) {
    v = v * 128 + (x & 0x7f);
    if (!(x & 0x80)) {
      parts.push(v);
      v = 0;
    }
  }
  return parts.join(".");
}

function pairs(seq: Bytes): Map<string, Tlv> {
  const out = new Map<string, Tlv>();
  for (const t of items(seq)) {
    if (t.tag !== 0x30) continue;
    const inner = items(t.content);
    if (inner.length === 2 && inner[0].tag === 0x06) out.set(oid(inner[0].content), inner[1]);
  }
  return out;
}

function uint(b: Bytes): number {
  let v = 0;
  for (const x of b) v = v * 256 + x;
  return v;
}

export function parsePckExtension(cert: x509.X509Certificate): PckExtension {
  const ext = cert.getExtension(SGX_EXTENSION_OID);
  if (!ext) throw new CheckFailed("pck_extension", "the PCK leaf has no SGX extension; is this an Intel PCK cert?");
  const top = pairs(tlv(new Uint8Array(ext.value), 0).content);
  const need = (m: Map<string, Tlv>, key: string): Tlv => {
    const v = m.get(key);
    if (!v) throw new CheckFailed("pck_extension", `the SGX extension lacks entry ${key}`);
    return v;
  };
  const base = SGX_EXTENSION_OID;
  const fmspc = need(top, `${base}.4`).content;
  const pceId = need(top, `${base}.3`).content;
  const tcb = pairs(need(top, `${base}.2`).content);
  const compSvns = Array.from({ length: 16 }, (_, i) => uint(need(tcb, `${base}.2.${i + 1}`).content));
  return { fmspc, pceId, compSvns, pceSvn: uint(need(tcb, `${base}.2.17`).content), cpuSvn: need(tcb, `${base}.2.18`).content };
}
