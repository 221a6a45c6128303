// Sealed-call wire formats, version 2 (docs/confidential.md; the Python side is cocoon_faas/confidential/
// envelope.py and caller.py). Sealing is done here, on the caller's own device: the content is encrypted once under
// a fresh content key, which is wrapped (with a fresh reply key) to every verified replica. The answer's frames are
// opened with the reply key and the final frame's receipt is checked: signature by the replica's receipt key,
// measurement, request and response hashes.
import { chacha20poly1305 } from "@noble/ciphers/chacha.js";
import { ed25519 } from "@noble/curves/ed25519.js";
import { sha256 } from "@noble/hashes/sha2.js";
import {
  type Bytes, type Rng, concat, equal, fromUtf8, hex, fromHex, randomBytes, readU16, readU32, readU64, slice,
  u16, u32, u64, u8, utf8,
} from "./bytes.js";
import { CheckFailed, FunctionError } from "./errors.js";
import { receiver, replyKey, sealOnce } from "./hpke.js";
import type { VerifiedQuote } from "./tdx.js";

export const SEALED_CONTENT_TYPE = "application/cocoon-sealed";
export const SEALED_FRAME_CONTENT_TYPE = "application/cocoon-sealed-frame";
export const VERSION = 2;
const REQUEST_MAGIC = Uint8Array.of(0x43, 0x53, 0x51, VERSION); // "CSQ" 2
const FRAME_MAGIC = Uint8Array.of(0x43, 0x53, 0x52, VERSION); // "CSR" 2
const WRAP_INFO = utf8("cocoon/v2 content-key");
const RESPONSE_INFO = utf8("cocoon/v2 response\x00");
const RECEIPT_DOMAIN = utf8("cocoon-receipt/v2\x00");
const FRAME_KINDS = ["res", "chunk", "end", "err"] as const;
export type FrameKind = (typeof FRAME_KINDS)[number];
const FINAL_KINDS: FrameKind[] = ["res", "end", "err"];
const WRAP_LEN = 32 + 64 + 16;
const FRAME_HEAD_LEN = 4 + 1 + 16 + 16 + 32 + 4;

/** The keys of a replica whose attestation document passed the caller's policy (document.ts). */
export interface VerifiedReplica {
  function: string;
  measurement: string;
  runtimeVersion: string;
  keyId: string;
  hpkePublicKey: Bytes;
  receiptPublicKey: Bytes;
  tee: string;
  expiresAt: number;
  insecure: boolean;
  document: Record<string, unknown>;
  /** For `tdx`: the verified quote (with `tcb` when collateral was checked). */
  quote?: VerifiedQuote;
}

function checkMagic(data: Bytes, magic: Bytes, what: string): void {
  if (data.length < 4 || !equal(data.subarray(0, 4), magic)) {
    if (data.length >= 4 && equal(data.subarray(0, 3), magic.subarray(0, 3))) {
      throw new CheckFailed("envelope", `sealed ${what} version ${data[3]} is not ${VERSION}; upgrade the client`);
    }
    throw new CheckFailed("envelope", `not a Cocoon sealed ${what}`);
  }
}

export function wrapAad(fn: string, requestId: string, kid: string): Bytes {
  return utf8(`${fn}\x00${requestId}\x00${kid}`);
}

export function encodePrefix(fn: string, rid: Bytes, tsMs: bigint, wraps: [Bytes, Bytes][]): Bytes {
  const f = utf8(fn);
  const parts: Bytes[] = [u16(f.length), f, rid, u64(tsMs), u8(wraps.length)];
  for (const [kid, wk] of wraps) {
    if (kid.length !== 16 || wk.length !== WRAP_LEN) throw new Error("a recipient is a 16-byte key id and a 112-byte wrap");
    parts.push(kid, wk);
  }
  const header = concat(...parts);
  return concat(REQUEST_MAGIC, u32(header.length), header);
}

// -- receipts ------------------------------------------------------------------------------------------------

export interface Receipt {
  callId: string;
  requestId: string;
  function: string;
  measurement: string;
  keyId: string;
  requestSha256: string;
  responseSha256: string;
  execMs: number;
  priceNanoton: bigint;
  frames: number;
  signature: string;
  raw: Bytes;
}

export function parseReceipt(data: Bytes): Receipt {
  try {
    if (data[0] !== VERSION) throw new Error(`version ${data[0]}`);
    const n = data[1];
    const callId = fromUtf8(slice(data, 2, n));
    let pos = 2 + n;
    const rid = slice(data, pos, 16);
    const fnlen = readU16(data, pos + 16);
    pos += 18;
    const fn = fromUtf8(slice(data, pos, fnlen));
    pos += fnlen;
    const m = slice(data, pos, 32);
    pos += 32;
    const kid = slice(data, pos, 16);
    const req = slice(data, pos + 16, 32);
    const resp = slice(data, pos + 48, 32);
    const execUs = readU64(data, pos + 80);
    const price = readU64(data, pos + 88);
    const frames = readU32(data, pos + 96);
    pos += 100;
    const sig = data.slice(pos);
    if (sig.length !== 64) throw new Error("lengths");
    return {
      callId, requestId: hex(rid), function: fn, measurement: hex(m), keyId: hex(kid), requestSha256: hex(req),
      responseSha256: hex(resp), execMs: Number(execUs) / 1000, priceNanoton: price, frames, signature: hex(sig),
      raw: data.slice(),
    };
  } catch (e) {
    throw new CheckFailed("receipt", `receipt is malformed (${(e as Error).message})`);
  }
}

/** Check a receipt's Ed25519 signature (RFC 8032) by the replica's receipt key; throws `receipt_signature`. */
export function verifyReceipt(r: Receipt, receiptPublicKey: Bytes): void {
  const msg = concat(RECEIPT_DOMAIN, r.raw.subarray(0, r.raw.length - 64));
  let ok = false;
  try {
    ok = ed25519.verify(r.raw.subarray(r.raw.length - 64), msg, receiptPublicKey);
  } catch {
    ok = false;
  }
  if (!ok) {
    throw new CheckFailed("receipt_signature", "the receipt is not signed by the replica's receipt key (forged, or "
      + "from another replica)");
  }
}

// -- response frames ----------------------------------------------------------------------------------------

export interface Frame {
  kind: FrameKind;
  requestId: string;
  keyId: string;
  enc: Bytes;
  seq: number;
  aad: Bytes;
  ciphertext: Bytes;
  receipt: Receipt | null;
}

export function decodeFrame(data: Bytes): Frame {
  checkMagic(data, FRAME_MAGIC, "response");
  let f: Omit<Frame, "receipt">;
  let rlen: number;
  let pos: number;
  try {
    const code = data[4];
    if (code < 1 || code > FRAME_KINDS.length) throw new Error(`kind ${code}`);
    const clen = readU32(data, FRAME_HEAD_LEN);
    pos = FRAME_HEAD_LEN + 4 + clen;
    rlen = readU32(data, pos);
    if (pos + 4 + rlen !== data.length) throw new Error("lengths");
    f = {
      kind: FRAME_KINDS[code - 1], requestId: hex(slice(data, 5, 16)), keyId: hex(slice(data, 21, 16)),
      enc: slice(data, 37, 32), seq: readU32(data, 69), aad: slice(data, 0, FRAME_HEAD_LEN),
      ciphertext: slice(data, FRAME_HEAD_LEN + 4, clen),
    };
  } catch (e) {
    throw new CheckFailed("envelope", `sealed response frame is malformed (${(e as Error).message})`);
  }
  const receipt = rlen ? parseReceipt(data.slice(pos + 4)) : null;
  if ((receipt === null) === FINAL_KINDS.includes(f.kind)) {
    throw new CheckFailed("envelope", `a '${f.kind}' frame must ${FINAL_KINDS.includes(f.kind) ? "" : "not "}carry a receipt`);
  }
  return { ...f, receipt };
}

class ResponseHash {
  private parts: Bytes[] = [];
  update(ct: Bytes): void {
    this.parts.push(u32(ct.length), ct);
  }
  hexdigest(): string {
    return hex(sha256(concat(...this.parts)));
  }
}

export interface OpenedFrame {
  kind: FrameKind;
  data: Bytes;
  receipt: Receipt | null;
}

type Recipient = Awaited<ReturnType<typeof receiver>>;

/** What the caller keeps to open the answer to one sealed request (Python: ClientCallContext). */
export class CallContext {
  keyId: string | null = null;
  finished = false;
  readonly requestSha256: Bytes;
  private ctx: Recipient | null = null;
  private enc: Bytes | null = null;
  private nextSeq = 0;
  private hash = new ResponseHash();

  constructor(readonly fn: string, readonly requestId: string, readonly body: Bytes,
              readonly replicas: Map<string, VerifiedReplica>, private readonly reply: CryptoKeyPair) {
    this.requestSha256 = sha256(body);
  }

  /** Authenticate and decrypt the next frame of this call, in order. */
  async openFrame(data: Bytes): Promise<OpenedFrame> {
    const f = decodeFrame(data);
    if (this.finished) throw new CheckFailed("order", "a frame arrived after the call's final frame");
    if (f.requestId !== this.requestId) {
      throw new CheckFailed("request_id", "the response answers another request (replayed or misrouted)");
    }
    const replica = this.replicas.get(f.keyId);
    if (!replica) throw new CheckFailed("replica", "the response comes from a replica this call was not sealed to");
    if (this.ctx === null) {
      this.keyId = f.keyId;
      this.enc = f.enc;
      this.ctx = await receiver(this.reply, f.enc, concat(RESPONSE_INFO, this.requestSha256));
    } else if (f.keyId !== this.keyId || !equal(f.enc, this.enc!)) {
      throw new CheckFailed("replica", "frames of one call come from different replicas or sessions");
    }
    if (f.seq !== this.nextSeq) {
      throw new CheckFailed("order", `frame ${f.seq} arrived where frame ${this.nextSeq} was due (dropped, duplicated `
        + "or reordered)");
    }
    let pt: Bytes;
    try {
      pt = new Uint8Array(await this.ctx.open(f.ciphertext, f.aad));
    } catch {
      throw new CheckFailed("decrypt", "ciphertext does not authenticate: altered, reordered, or sealed to another key");
    }
    this.hash.update(f.ciphertext);
    this.nextSeq += 1;
    if (f.receipt) {
      this.checkReceipt(f, f.receipt, replica);
      this.finished = true;
    }
    return { kind: f.kind, data: pt, receipt: f.receipt };
  }

  private checkReceipt(f: Frame, r: Receipt, replica: VerifiedReplica): void {
    verifyReceipt(r, replica.receiptPublicKey);
    if (r.measurement !== replica.measurement) {
      throw new CheckFailed("measurement", `the receipt names measurement ${r.measurement.slice(0, 16)}..., the `
        + `verified replica runs ${replica.measurement.slice(0, 16)}...`);
    }
    if (r.requestId !== this.requestId || r.function !== this.fn || r.keyId !== replica.keyId) {
      throw new CheckFailed("receipt", "the receipt is for another call, function or replica");
    }
    if (r.requestSha256 !== hex(this.requestSha256)) {
      throw new CheckFailed("receipt_request", "the receipt covers a different request ciphertext");
    }
    if (r.responseSha256 !== this.hash.hexdigest() || r.frames !== f.seq + 1) {
      throw new CheckFailed("receipt_response", "the receipt covers a different response ciphertext");
    }
  }

  /** A unary answer: the result's JSON bytes and the verified receipt; a sealed function error throws. */
  async openResponse(data: Bytes): Promise<{ result: Bytes; receipt: Receipt }> {
    const o = await this.openFrame(data);
    if (o.kind === "err") throw sealedError(o);
    if (o.kind !== "res" || !o.receipt) throw new CheckFailed("order", `expected a unary response frame, got '${o.kind}'`);
    return { result: o.data, receipt: o.receipt };
  }

  /** The next stream frame: an item's JSON bytes, or at the authenticated end the verified receipt. */
  async openChunk(data: Bytes): Promise<{ item: Bytes } | { receipt: Receipt }> {
    const o = await this.openFrame(data);
    if (o.kind === "err") throw sealedError(o);
    if (o.kind === "chunk") return { item: o.data };
    if (o.kind === "end" && o.receipt) return { receipt: o.receipt };
    throw new CheckFailed("order", `a '${o.kind}' frame inside a stream`);
  }
}

function sealedError(o: OpenedFrame): FunctionError {
  let etype = "Error";
  let message: string;
  try {
    const err = JSON.parse(fromUtf8(o.data));
    etype = String(err.type);
    message = String(err.message);
  } catch {
    message = new TextDecoder().decode(o.data);
  }
  return new FunctionError(`${etype}: ${message}`, etype, o.receipt);
}

export interface SealOptions {
  /** Known-answer tests only: the source of the content key, request id and key material. */
  rng?: Rng;
  nowMs?: number;
}

/** Seal `argsJson` for `fn` to every replica: the body to POST and the context that opens the answer. */
export async function sealRequest(argsJson: Bytes, fn: string, replicas: VerifiedReplica[],
                                  opts: SealOptions = {}): Promise<{ body: Bytes; ctx: CallContext }> {
  if (replicas.length === 0) {
    throw new CheckFailed("no_replica", `no verified replica of '${fn}' to seal to; fetch and verify its attestation `
      + "documents first");
  }
  const rand = opts.rng ?? randomBytes;
  const contentKey = rand(32);
  const rid = rand(16);
  const requestId = hex(rid);
  const reply = await replyKey(opts.rng ? rand(32) : undefined);
  const keyAndReply = concat(contentKey, reply.publicKey);
  const wraps: [Bytes, Bytes][] = [];
  const byKid = new Map<string, VerifiedReplica>();
  for (const r of replicas) {
    if (r.function !== fn) throw new CheckFailed("function", `replica ${r.keyId} runs '${r.function}', not '${fn}'`);
    if (byKid.has(r.keyId)) continue;
    const wk = await sealOnce(r.hpkePublicKey, WRAP_INFO, wrapAad(fn, requestId, r.keyId), keyAndReply,
      opts.rng ? rand(32) : undefined);
    wraps.push([fromHex(r.keyId), wk]);
    byKid.set(r.keyId, r);
  }
  const ts = BigInt(opts.nowMs ?? Date.now());
  const prefix = encodePrefix(fn, rid, ts, wraps);
  const ct = chacha20poly1305(contentKey, new Uint8Array(12), prefix).encrypt(argsJson);
  const body = concat(prefix, ct);
  return { body, ctx: new CallContext(fn, requestId, body, byKid, reply.pair) };
}

/** A receipt's bytes, signed with `receiptSecretKey` (32-byte Ed25519 seed): what a replica produces. The SDK only
 *  verifies receipts; this exists so tests can check both directions against the Python side. */
export function signReceipt(f: Omit<Receipt, "signature" | "raw" | "execMs"> & { execUs: bigint },
                            receiptSecretKey: Bytes): Receipt {
  const cid = utf8(f.callId);
  const fn = utf8(f.function);
  const unsigned = concat(u8(VERSION), u8(cid.length), cid, fromHex(f.requestId), u16(fn.length), fn,
    fromHex(f.measurement), fromHex(f.keyId), fromHex(f.requestSha256), fromHex(f.responseSha256), u64(f.execUs),
    u64(f.priceNanoton), u32(f.frames));
  const sig = ed25519.sign(concat(RECEIPT_DOMAIN, unsigned), receiptSecretKey);
  return parseReceipt(concat(unsigned, sig));
}
