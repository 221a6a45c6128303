// The HTTP client: plain calls, SSE streams, async calls (spawn / poll / cancel) and sealed calls, optionally paid
// from a channel. Works with the platform's fetch (browser, Node 20). Routes: docs/confidential.md and README.
import { type Bytes, fromB64, fromUtf8, utf8 } from "./bytes.js";
import { type ClientPolicy, verifyDocument } from "./document.js";
import { type CallContext, type Receipt, type VerifiedReplica, SEALED_CONTENT_TYPE, SEALED_FRAME_CONTENT_TYPE,
  sealRequest } from "./envelope.js";
import { CheckFailed, CocoonError } from "./errors.js";
import { CHARGE_HEADER, type ChannelPayer, PAYMENT_HEADER, type ResyncResult, type Ticket } from "./payments.js";
import { type FunctionSignature, checkArgs, parseSignature } from "./signature.js";

export interface ClientOptions {
  url: string;
  apiKey?: string;
  payer?: ChannelPayer;
  fetch?: typeof fetch;
}

export interface CallRecord {
  id: string;
  status: string;
  result?: unknown;
  error?: { type: string; message: string; [k: string]: unknown };
  charge?: number;
  [k: string]: unknown;
}

export interface SealedResult<T = unknown> {
  result: T;
  receipt: Receipt;
  charge: bigint;
  replica: VerifiedReplica;
}

/** Server-sent events from a fetch response: yields (event, data) pairs. */
export async function* sse(r: Response): AsyncGenerator<[string, string]> {
  if (!r.body) return;
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  let event = "message";
  let data: string[] = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (value) buf += dec.decode(value, { stream: true });
    let nl: number;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, nl).replace(/\r$/, "");
      buf = buf.slice(nl + 1);
      if (line === "") {
        if (data.length) yield [event, data.join("\n")];
        event = "message";
        data = [];
      } else if (line.startsWith("event:")) {
        event = line.slice(6).trim();
      } else if (line.startsWith("data:")) {
        data.push(line.slice(5).trimStart());
      }
    }
    if (done) {
      if (data.length) yield [event, data.join("\n")];
      return;
    }
  }
}

async function errorOf(r: Response): Promise<CocoonError> {
  const text = await r.text();
  try {
    const body = JSON.parse(text);
    const e = body.error ?? body;
    return new CocoonError(String(e.message ?? text), r.status, String(e.type ?? "error"), body);
  } catch {
    return new CocoonError(`HTTP ${r.status}: ${text.slice(0, 200)}`, r.status, "error", text);
  }
}

const ids = new WeakMap<object, number>();
let lastId = 0;
function objectId(o: object): string {
  if (!ids.has(o)) ids.set(o, ++lastId);
  return `#${ids.get(o)}`;
}

export class Client {
  readonly url: string;
  private readonly f: typeof fetch;
  private holds = new Map<string, bigint>();
  private replicas = new Map<string, { until: number; list: VerifiedReplica[] }>();
  private signatures = new Map<string, FunctionSignature>(); // listed beside the documents: sealed arguments checked here
  /** The receipt of the last sealed call (verified on this device). */
  lastReceipt: Receipt | null = null;

  constructor(readonly opts: ClientOptions) {
    this.url = opts.url.replace(/\/$/, "");
    this.f = opts.fetch ?? globalThis.fetch.bind(globalThis);
  }

  private headers(extra: Record<string, string> = {}): Record<string, string> {
    return { ...(this.opts.apiKey ? { Authorization: `Bearer ${this.opts.apiKey}` } : {}), ...extra };
  }

  async request(method: string, path: string, body?: unknown): Promise<any> {
    const r = await this.f(this.url + path, {
      method, headers: this.headers(body === undefined ? {} : { "Content-Type": "application/json" }),
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (r.status >= 400) throw await errorOf(r);
    return r.json();
  }

  /** The most a call of `name` can cost (the function's pricing): what a payment state holds for it. */
  async holdFor(name: string): Promise<bigint> {
    let h = this.holds.get(name);
    if (h === undefined) {
      const fn = await this.request("GET", `/v1/functions/${encodeURIComponent(name)}`);
      h = BigInt(fn.pricing?.max_cost_nanoton ?? 0);
      this.holds.set(name, h);
    }
    return h;
  }

  /** Catch this client's payer up with the gateway's newest state of its channel (see `ChannelPayer.resync`):
   *  after the gateway refused a payment as stale or replayed because the channel was used elsewhere. */
  async resyncChannel(): Promise<ResyncResult> {
    if (!this.opts.payer) throw new CocoonError("this client has no payer: pass { payer } to resync its channel", 400,
      "invalid_request");
    const summary = await this.request("GET", `/v1/channels/${this.opts.payer.channelId}`);
    return this.opts.payer.resync(summary);
  }

  private async pay(name: string, headers: Record<string, string>): Promise<Ticket | null> {
    if (!this.opts.payer) return null;
    const t = this.opts.payer.signForCall(await this.holdFor(name));
    headers[PAYMENT_HEADER] = t.header;
    return t;
  }

  private settle(t: Ticket | null, charged: bigint): void {
    if (t) this.opts.payer!.complete(t, charged);
  }

  private async post(name: string, body: Bytes, headers: Record<string, string>): Promise<{ r: Response; t: Ticket | null }> {
    const h = this.headers(headers);
    const t = await this.pay(name, h);
    let r: Response;
    try {
      r = await this.f(`${this.url}/fn/${encodeURIComponent(name)}`, { method: "POST", headers: h, body });
    } catch (e) {
      this.settle(t, 0n);
      throw new CocoonError(`cannot reach the gateway at ${this.url} (${(e as Error).message})`, 0, "unreachable");
    }
    return { r, t };
  }

  // -- plain calls ----------------------------------------------------------------------------------------

  async call<T = unknown>(name: string, args: Record<string, unknown> = {}): Promise<T> {
    // JSON only: a generator function is then refused with a hint to stream it, before it runs or is charged
    const { r, t } = await this.post(name, utf8(JSON.stringify(args)),
      { "Content-Type": "application/json", Accept: "application/json" });
    this.settle(t, BigInt(r.headers.get(CHARGE_HEADER) ?? 0));
    if (r.status >= 400) throw await errorOf(r);
    return (await r.json()) as T;
  }

  /** A generator function's items as the gateway relays them (SSE). */
  async *stream<T = unknown>(name: string, args: Record<string, unknown> = {}): AsyncGenerator<T> {
    const { r, t } = await this.post(name, utf8(JSON.stringify(args)),
      { "Content-Type": "application/json", Accept: "text/event-stream" });
    let charged = 0n;
    try {
      if (r.status >= 400) {
        charged = BigInt(r.headers.get(CHARGE_HEADER) ?? 0);
        throw await errorOf(r);
      }
      for await (const [event, data] of sse(r)) {
        const v = JSON.parse(data || "null");
        if (event === "error") throw new CocoonError(String(v?.error?.message ?? data), 500, String(v?.error?.type ?? "error"), v);
        if (event === "end") {
          charged = BigInt(v?.charge ?? 0);
          return;
        }
        yield v as T;
      }
    } finally {
      this.settle(t, charged);
    }
  }

  /** Submit an async call (`Prefer: respond-async`); returns its id. */
  async spawn(name: string, args: Record<string, unknown> = {}): Promise<string> {
    const { r, t } = await this.post(name, utf8(JSON.stringify(args)),
      { "Content-Type": "application/json", Prefer: "respond-async" });
    this.settle(t, BigInt(r.headers.get(CHARGE_HEADER) ?? 0));
    if (r.status >= 400) throw await errorOf(r);
    return String((await r.json()).id);
  }

  getCall(id: string): Promise<CallRecord> {
    return this.request("GET", `/v1/calls/${encodeURIComponent(id)}`);
  }

  cancel(id: string): Promise<CallRecord> {
    return this.request("DELETE", `/v1/calls/${encodeURIComponent(id)}`);
  }

  /** Poll an async call until it is no longer queued or running. */
  async poll(id: string, { intervalMs = 50, timeoutMs = 330_000 } = {}): Promise<CallRecord> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const rec = await this.getCall(id);
      if (!["queued", "running", "pending"].includes(rec.status)) return rec;
      if (Date.now() > deadline) throw new CocoonError(`call ${id} still ${rec.status} after ${timeoutMs} ms`, 504, "timeout");
      await new Promise((res) => setTimeout(res, intervalMs));
    }
  }

  /** The result of an async call (throws its error). */
  async result<T = unknown>(id: string, opts?: { intervalMs?: number; timeoutMs?: number }): Promise<T> {
    const rec = await this.poll(id, opts);
    if (rec.status !== "succeeded") {
      throw new CocoonError(String(rec.error?.message ?? rec.status), 500, String(rec.error?.type ?? rec.status), rec);
    }
    return rec.result as T;
  }

  // -- sealed calls ---------------------------------------------------------------------------------------

  async attestation(name: string): Promise<{ documents: unknown[]; [k: string]: unknown }> {
    return this.request("GET", `/v1/functions/${encodeURIComponent(name)}/attestation`);
  }

  /** The live replicas whose documents pass `policy` (cached until 60 s before the first expiry). The first
   *  refusal is thrown when none passes: nothing is sealed to a replica that failed verification. */
  async verifiedReplicas(name: string, policy: ClientPolicy, refresh = false): Promise<VerifiedReplica[]> {
    // cached per function AND policy: replicas verified under one policy say nothing about another
    // (collateral by identity, as the Python client does: its bytes are large and the same object is reused)
    const key = `${name}\u0000${JSON.stringify(policy, (k, v) => (k === "collateral" && v ? objectId(v)
      : v instanceof Uint8Array ? Array.from(v) : v))}`;
    const hit = this.replicas.get(key);
    const now = Date.now() / 1000;
    if (hit && !refresh && hit.until > now) return hit.list;
    const listing = await this.attestation(name);
    const sig = parseSignature(listing.signature);
    if (sig) this.signatures.set(name, sig);
    else this.signatures.delete(name);
    const docs = listing.documents ?? [];
    const good: VerifiedReplica[] = [];
    const refused: CheckFailed[] = [];
    for (const d of docs) {
      try {
        good.push(await verifyDocument(d, { function: name, ...policy }, now));
      } catch (e) {
        if (e instanceof CheckFailed) refused.push(e);
        else throw e;
      }
    }
    if (!good.length) {
      this.replicas.delete(key);
      if (refused.length) throw refused[0];
      throw new CocoonError(`function '${name}' has no live replica documents to seal to; retry shortly`, 503, "attestation");
    }
    this.replicas.set(key, { until: Math.min(...good.map((r) => r.expiresAt)) - 60, list: good });
    return good;
  }

  private async sealedPost(name: string, args: Record<string, unknown>, policy: ClientPolicy,
                           extra: Record<string, string>): Promise<{ r: Response; ctx: CallContext; t: Ticket | null }> {
    const argsJson = utf8(JSON.stringify(args));
    for (const attempt of [0, 1]) {
      const replicas = await this.verifiedReplicas(name, policy, attempt > 0);
      const sig = this.signatures.get(name); // a typo is refused here: never sealed, sent or charged
      if (sig) checkArgs(name, sig, args);
      const { body, ctx } = await sealRequest(argsJson, name, replicas);
      const { r, t } = await this.post(name, body, { "Content-Type": SEALED_CONTENT_TYPE, ...extra });
      if (r.status === 421 && attempt === 0) {
        this.settle(t, 0n);
        await r.body?.cancel();
        continue; // stale keys: refetch the documents and reseal once
      }
      return { r, ctx, t };
    }
    throw new Error("unreachable");
  }

  /** Call `name` sealed end to end: verified replicas only, answer opened and receipt checked on this device. */
  async callSealed<T = unknown>(name: string, args: Record<string, unknown>, policy: ClientPolicy): Promise<SealedResult<T>> {
    // one sealed frame, not a stream: a generator function is then refused with a hint to stream it, before it runs
    const { r, ctx, t } = await this.sealedPost(name, args, policy, { Accept: SEALED_FRAME_CONTENT_TYPE });
    const charge = BigInt(r.headers.get(CHARGE_HEADER) ?? 0);
    this.settle(t, charge);
    if (r.status >= 400) throw await errorOf(r);
    const { result, receipt } = await ctx.openResponse(new Uint8Array(await r.arrayBuffer()));
    this.lastReceipt = receipt;
    return { result: JSON.parse(fromUtf8(result)) as T, receipt, charge, replica: ctx.replicas.get(ctx.keyId!)! };
  }

  /** A sealed stream: yields each item in order; returns the verified receipt and the charge at the
   *  authenticated end (a stream without its end frame throws `truncated`). */
  async *streamSealed<T = unknown>(name: string, args: Record<string, unknown>, policy: ClientPolicy
  ): AsyncGenerator<T, { receipt: Receipt; charge: bigint; replica: VerifiedReplica }> {
    const { r, ctx, t } = await this.sealedPost(name, args, policy, { Accept: "text/event-stream" });
    let charge = 0n;
    let receipt: Receipt | null = null;
    try {
      if (r.status >= 400) {
        charge = BigInt(r.headers.get(CHARGE_HEADER) ?? 0);
        throw await errorOf(r);
      }
      for await (const [event, data] of sse(r)) {
        if (event === "frame") {
          const o = await ctx.openChunk(fromB64(data));
          if ("item" in o) yield JSON.parse(fromUtf8(o.item)) as T;
          else receipt = o.receipt;
        } else if (event === "error") {
          const v = JSON.parse(data);
          throw new CocoonError(String(v?.error?.message ?? data), 500, String(v?.error?.type ?? "error"), v);
        } else if (event === "end") {
          charge = BigInt(JSON.parse(data)?.charge ?? 0);
          break;
        }
      }
    } finally {
      this.settle(t, charge);
    }
    if (!ctx.finished || !receipt) throw new CheckFailed("truncated", "the sealed stream ended without its authenticated end frame");
    this.lastReceipt = receipt;
    return { receipt, charge, replica: ctx.replicas.get(ctx.keyId!)! };
  }

  /** Submit a sealed async call; `wait()` polls and opens the sealed result on this device. */
  async spawnSealed<T = unknown>(name: string, args: Record<string, unknown>, policy: ClientPolicy
  ): Promise<{ id: string; wait: () => Promise<{ result: T; receipt: Receipt }> }> {
    const { r, ctx, t } = await this.sealedPost(name, args, policy, { Prefer: "respond-async" });
    this.settle(t, BigInt(r.headers.get(CHARGE_HEADER) ?? 0));
    if (r.status >= 400) throw await errorOf(r);
    const id = String((await r.json()).id);
    return {
      id,
      wait: async () => {
        const rec = await this.poll(id);
        const frame = (rec.result as { sealed_frame?: string } | undefined)?.sealed_frame
          ?? (rec.error?.sealed_frame as string | undefined);
        if (!frame) throw new CocoonError(String(rec.error?.message ?? rec.status), 500, String(rec.error?.type ?? rec.status), rec);
        const { result, receipt } = await ctx.openResponse(fromB64(frame));
        this.lastReceipt = receipt;
        return { result: JSON.parse(fromUtf8(result)) as T, receipt };
      },
    };
  }
}
