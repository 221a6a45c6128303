// Byte helpers shared by the SDK: hex, base64, big-endian integers and concatenation (no Node Buffer, so the same
// code runs in a browser).

export type Bytes = Uint8Array<ArrayBuffer>;

export function hex(b: Uint8Array): string {
  let s = "";
  for (const x of b) s += x.toString(16).padStart(2, "0");
  return s;
}

export function fromHex(s: string): Bytes {
  if (s.length % 2 !== 0 || /[^0-9a-fA-F]/.test(s)) throw new Error(`not hex: ${s.slice(0, 32)}`);
  const out = new Uint8Array(s.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(s.slice(2 * i, 2 * i + 2), 16);
  return out;
}

export function b64(b: Bytes): string {
  let s = "";
  for (let i = 0; i < b.length; i += 0x8000) s += String.fromCharCode(...b.subarray(i, i + 0x8000));
  return btoa(s);
}

export function fromB64(s: string): Bytes {
  const bin = atob(s.trim());
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

export function concat(...parts: Bytes[]): Bytes {
  let n = 0;
  for (const p of parts) n += p.length;
  const out = new Uint8Array(n);
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

export function u8(n: number): Bytes {
  return Uint8Array.of(n & 0xff);
}

export function u16(n: number): Bytes {
  return Uint8Array.of((n >>> 8) & 0xff, n & 0xff);
}

export function u32(n: number): Bytes {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, n);
  return b;
}

export function u64(n: bigint): Bytes {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, n);
  return b;
}

export function readU16(b: Bytes, off: number): number {
  if (off + 2 > b.length) throw new RangeError("truncated");
  return (b[off] << 8) | b[off + 1];
}

export function readU32(b: Bytes, off: number): number {
  if (off + 4 > b.length) throw new RangeError("truncated");
  return new DataView(b.buffer, b.byteOffset, b.byteLength).getUint32(off);
}

export function readU64(b: Bytes, off: number): bigint {
  if (off + 8 > b.length) throw new RangeError("truncated");
  return new DataView(b.buffer, b.byteOffset, b.byteLength).getBigUint64(off);
}

export function slice(b: Bytes, start: number, len: number): Bytes {
  if (start + len > b.length) throw new RangeError("truncated");
  return b.slice(start, start + len);
}

export function equal(a: Bytes, b: Bytes): boolean {
  if (a.length !== b.length) return false;
  let d = 0;
  for (let i = 0; i < a.length; i++) d |= a[i] ^ b[i];
  return d === 0;
}

export const utf8 = (s: string): Bytes => new TextEncoder().encode(s);
export const fromUtf8 = (b: Bytes): string => new TextDecoder("utf-8", { fatal: true }).decode(b);

export type Rng = (n: number) => Bytes;
export const randomBytes: Rng = (n) => crypto.getRandomValues(new Uint8Array(n));
