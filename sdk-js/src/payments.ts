// Paying for calls from a TON payment channel (Python: cocoon_faas/ton/channel.py and client.py). The caller (party
// A) signs cumulative states: each call gets `seqno+1` whose `sent` covers every charge so far plus every hold in
// flight, this call's included; `sent` never decreases. @ton/core builds the cells; the BOC goes base64 in
// `X-Cocoon-Payment`. The gateway answers the charge in `X-Cocoon-Charge` (or a stream's `end` event).
import { beginCell, Cell } from "@ton/core";
import { ed25519 } from "@noble/curves/ed25519.js";
import { Buffer } from "buffer";
import { type Bytes, b64, fromB64 } from "./bytes.js";
import { CocoonError } from "./errors.js";

export const PAYMENT_HEADER = "X-Cocoon-Payment";
export const CHARGE_HEADER = "X-Cocoon-Charge";
const TAG_SEMICHANNEL = 0x43685374; // "ChSt"

export interface SemiChannelBody {
  seqno: bigint;
  sent: bigint;
}

function bodyCell(b: SemiChannelBody): Cell {
  return beginCell().storeUint(b.seqno, 64).storeCoins(b.sent).storeMaybeRef(null).endCell();
}

/** semichannel_state#43685374 channel_id:uint128 data:SemiChannelBody counterparty_data:(Maybe ^SemiChannelBody) */
export function semiChannelCell(channelId: bigint, data: SemiChannelBody, counterparty: SemiChannelBody | null): Cell {
  return beginCell().storeUint(TAG_SEMICHANNEL, 32).storeUint(channelId, 128)
    .storeUint(data.seqno, 64).storeCoins(data.sent).storeMaybeRef(null)
    .storeMaybeRef(counterparty ? bodyCell(counterparty) : null).endCell();
}

/** signed_schs#_ signature:bits512 state:SemiChannel (state inline); the signature covers the state cell's hash. */
export function signedStateBoc(channelId: bigint, data: SemiChannelBody, counterparty: SemiChannelBody | null,
                               secretKey: Bytes): { boc: Bytes; signature: Bytes; hash: Bytes } {
  const state = semiChannelCell(channelId, data, counterparty);
  const hash = new Uint8Array(state.hash());
  const signature = ed25519.sign(hash, secretKey);
  const signed = beginCell().storeBuffer(Buffer.from(signature)).storeSlice(state.beginParse()).endCell();
  return { boc: new Uint8Array(signed.toBoc({ idx: false, crc32: false })), signature, hash };
}

export interface ChannelState {
  channelId: string;
  deposit: string;
  seqno: string;
  sent: string;
  charged: string;
  counterpartySeqno: string;
  counterpartySent: string;
}

export interface ResyncResult {
  seqnoBefore: bigint;
  sentBefore: bigint;
  chargedBefore: bigint;
  seqno: bigint;
  sent: bigint;
  charged: bigint;
}

export interface Ticket {
  seqno: bigint;
  hold: bigint;
  header: string;
}

/** Signs payment states for one channel. `save` persists the state before a signed state leaves (e.g. into
 *  localStorage), so a reloaded page never signs a seqno twice or lowers `sent`. */
export class ChannelPayer {
  private inflight = new Map<bigint, bigint>();
  channelId: bigint;
  deposit: bigint;
  seqno: bigint;
  sent: bigint;
  charged: bigint;
  private counterparty: SemiChannelBody;

  constructor(private readonly secretKey: Bytes, state: Partial<ChannelState> & { channelId: string | bigint;
    deposit: string | bigint }, private readonly save: (s: ChannelState) => void = () => {}) {
    if (secretKey.length !== 32) throw new CocoonError("a channel key is a 32-byte Ed25519 seed");
    this.channelId = BigInt(state.channelId);
    this.deposit = BigInt(state.deposit);
    this.seqno = BigInt(state.seqno ?? 0);
    this.sent = BigInt(state.sent ?? 0);
    this.charged = BigInt(state.charged ?? 0);
    this.counterparty = { seqno: BigInt(state.counterpartySeqno ?? 0), sent: BigInt(state.counterpartySent ?? 0) };
  }

  get publicKey(): Bytes {
    return ed25519.getPublicKey(this.secretKey);
  }

  state(): ChannelState {
    return {
      channelId: String(this.channelId), deposit: String(this.deposit), seqno: String(this.seqno),
      sent: String(this.sent), charged: String(this.charged), counterpartySeqno: String(this.counterparty.seqno),
      counterpartySent: String(this.counterparty.sent),
    };
  }

  /** The BOC of the signed state (seqno, sent) with this channel's counterparty body. */
  stateFor(seqno: bigint, sent: bigint): Bytes {
    return signedStateBoc(this.channelId, { seqno, sent }, this.counterparty, this.secretKey).boc;
  }

  /** A new state covering all charges, all holds in flight and `hold`; 402 past the deposit. */
  signForCall(hold: bigint): Ticket {
    let want = this.charged + hold;
    for (const h of this.inflight.values()) want += h;
    const sent = want > this.sent ? want : this.sent;
    if (sent > this.deposit) {
      throw new CocoonError(`channel ${this.channelId} has ${this.deposit - this.sent} nanoton of credit left, this `
        + `call may cost ${hold}; open a channel with a larger deposit`, 402, "payment_required");
    }
    this.seqno += 1n;
    this.sent = sent;
    this.inflight.set(this.seqno, hold);
    this.save(this.state());
    return { seqno: this.seqno, hold, header: b64(this.stateFor(this.seqno, sent)) };
  }

  /** Catch up with the gateway's newest state of this channel (`GET /v1/channels/{id}`: `latest_state`,
   *  `charged`) when this payer's saved state fell behind it (an older copy restored, or the channel used from
   *  another tab or device: the gateway then refuses its states as stale or replayed). Only a state this key
   *  signed for this channel is taken: the payer signs the same (seqno, sent) again and compares the bytes
   *  (Ed25519 signatures are deterministic). seqno and sent never go down; the gateway's `charged` is booked only
   *  up to what was signed. Throws (changing nothing) on anything else. Python: `cocoon channel resync`. */
  resync(summary: { latest_state?: string | null; charged?: string | number | bigint }): ResyncResult {
    const before = { seqnoBefore: this.seqno, sentBefore: this.sent, chargedBefore: this.charged };
    if (!summary.latest_state) return { ...before, seqno: this.seqno, sent: this.sent, charged: this.charged };
    const refuse = (why: string) => new CocoonError(`the gateway's newest state ${why}; nothing was changed: check `
      + "the gateway URL and the channel id", 400, "invalid_request");
    let boc: Bytes, channelId: bigint, data: SemiChannelBody, counterparty: SemiChannelBody | null;
    try {
      boc = fromB64(summary.latest_state);
      const sl = Cell.fromBoc(Buffer.from(boc))[0].beginParse();
      sl.skip(512);
      if (sl.loadUint(32) !== TAG_SEMICHANNEL) throw new Error("tag");
      channelId = sl.loadUintBig(128);
      data = { seqno: sl.loadUintBig(64), sent: sl.loadCoins() };
      if (sl.loadMaybeRef() !== null) throw new Error("conditionals");
      const cp = sl.loadMaybeRef();
      if (cp === null) counterparty = null;
      else {
        const c = cp.beginParse();
        counterparty = { seqno: c.loadUintBig(64), sent: c.loadCoins() };
      }
    } catch {
      throw refuse("is not a payment state this SDK reads");
    }
    if (channelId !== this.channelId) throw refuse(`is for channel ${channelId}, not ${this.channelId}`);
    if (b64(signedStateBoc(channelId, data, counterparty, this.secretKey).boc) !== b64(boc)) {
      throw refuse(`is not one this key signed for channel ${this.channelId}`);
    }
    if (counterparty !== null && counterparty.sent !== 0n) throw refuse("claims the operator paid this caller");
    if (data.sent > this.deposit) throw refuse(`sends ${data.sent}, beyond this channel's deposit ${this.deposit}`);
    if (data.seqno > this.seqno) this.seqno = data.seqno;
    if (data.sent > this.sent) this.sent = data.sent;
    const charged = BigInt(summary.charged ?? 0);
    const booked = charged < this.sent ? charged : this.sent;
    if (booked > this.charged) this.charged = booked;
    this.save(this.state());
    return { ...before, seqno: this.seqno, sent: this.sent, charged: this.charged };
  }

  /** Release the ticket's hold and book what the gateway charged (0 for a failed call). */
  complete(t: Ticket, charged: bigint): void {
    this.inflight.delete(t.seqno);
    this.charged += charged < t.hold ? charged : t.hold;
    this.save(this.state());
  }
}

const TAG_INIT = 0x696e6974; // "init"

/** The caller's signature for the channel contract's init_channel message: Ed25519 over the hash of
 *  `tag:#696e6974 channel_id:uint128 balance_A:Coins balance_B:Coins` (cocoon_faas.ton.messages.InitChannel). A
 *  Mini App's page makes its own key and signs this; its server funds and deploys the channel with it. */
export function initChannelSignature(secretKey: Bytes, channelId: bigint, balanceA: bigint, balanceB: bigint): Bytes {
  const payload = beginCell().storeUint(TAG_INIT, 32).storeUint(channelId, 128).storeCoins(balanceA)
    .storeCoins(balanceB).endCell();
  return ed25519.sign(new Uint8Array(payload.hash()), secretKey);
}

/** The Ed25519 public key of a channel key (32-byte seed): what a channel names as the caller's key. */
export function channelPublicKey(secretKey: Bytes): Bytes {
  return ed25519.getPublicKey(secretKey);
}
