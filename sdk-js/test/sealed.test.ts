// Sealed calls against the Python implementation, both ways: documents Python issues verify here (and tampered
// ones do not); a body sealed here under the shared rng is byte-identical to Python's; a body sealed here is opened
// by a Python replica, whose sealed answers (unary, stream, error) open here with their receipts verified;
// receipts signed here verify in Python.
import assert from "node:assert/strict";
import { after, test } from "node:test";
import { ed25519 } from "@noble/curves/ed25519.js";
import { sha256 } from "@noble/hashes/sha2.js";
import { fromHex, hex, utf8 } from "../src/bytes.js";
import { type ClientPolicy, canonicalJson, verifyDocument } from "../src/document.js";
import { decodeFrame, sealRequest, signReceipt } from "../src/envelope.js";
import { CheckFailed, FunctionError } from "../src/errors.js";
import { closePy, py, streamRng } from "./helpers.js";

after(closePy);

const M = hex(sha256(utf8("chat-measurement")));
const NOW = 1780000000;
const R = { seed: "replica-1", function: "chat", measurement: M, now: NOW };
const { document: DOC, dev_public_key: DEV } = await py("replica", R);
const POLICY: ClientPolicy = { measurements: [M], trustedDevKeys: [DEV], function: "chat" };

async function refused(p: Promise<unknown>, check: string): Promise<void> {
  await assert.rejects(p, (e: unknown) => e instanceof CheckFailed && e.check === check);
}

test("canonical JSON matches Python's json.dumps(sort_keys, compact, ensure_ascii)", () => {
  const v = { b: [1, "é\u2028😀"], a: { z: null, y: true, x: "q\"\n\\" } };
  assert.equal(canonicalJson(v), '{"a":{"x":"q\\"\\n\\\\","y":true,"z":null},"b":[1,"\\u00e9\\u2028\\ud83d\\ude00"]}');
});

test("a Python dev document verifies with its key trusted, and every tampering is refused by name", async () => {
  const v = await verifyDocument(DOC, POLICY, NOW + 1);
  assert.equal(v.keyId, DOC.key_id);
  assert.equal(v.insecure, true);
  await refused(verifyDocument(DOC, { measurements: [M], function: "chat" }, NOW), "tee_kind");
  await refused(verifyDocument(DOC, { ...POLICY, trustedDevKeys: ["00".repeat(32)] }, NOW), "dev_key_untrusted");
  await refused(verifyDocument(DOC, { ...POLICY, measurements: ["11".repeat(32)] }, NOW), "measurement");
  await refused(verifyDocument(DOC, POLICY, DOC.expires_at + 1), "expired");
  await refused(verifyDocument({ ...DOC, expires_at: DOC.expires_at + 10 }, POLICY, NOW), "dev_signature");
  const other = (await py("replica", { ...R, seed: "replica-2" })).document;
  await refused(verifyDocument({ ...DOC, hpke_public_key: other.hpke_public_key }, POLICY, NOW), "key_id");
  await refused(verifyDocument({ ...DOC, hpke_public_key: other.hpke_public_key, key_id: other.key_id }, POLICY, NOW),
    "dev_signature");
});

test("a body sealed here under the shared rng is byte-identical to Python's seal_request", async () => {
  const args = { prompt: "hello sealed world", max_tokens: 8 };
  const v = await verifyDocument(DOC, POLICY, NOW);
  const { body } = await sealRequest(utf8(JSON.stringify(args)), "chat", [v], { rng: streamRng("kat", "seal"), nowMs: NOW * 1000 });
  const want = (await py("seal", { seed: "kat", args, function: "chat", document: DOC, now_ms: NOW * 1000 })).body;
  // Python's json.dumps puts a space after ':' and ','; seal the same bytes
  const { body: body2 } = await sealRequest(utf8('{"prompt": "hello sealed world", "max_tokens": 8}'), "chat", [v],
    { rng: streamRng("kat", "seal"), nowMs: NOW * 1000 });
  assert.notEqual(hex(body), want);
  assert.equal(hex(body2), want);
});

test("sealed here, opened by a Python replica; its unary answer opens here with the receipt verified", async () => {
  const v = await verifyDocument(DOC, POLICY, NOW);
  const args = { prompt: "the secret is 42" };
  const { body, ctx } = await sealRequest(utf8(JSON.stringify(args)), "chat", [v], { nowMs: NOW * 1000 });
  const ans = await py("answer", { ...R, body: hex(body), mode: "unary" });
  assert.deepEqual(ans.args, args);
  const { result, receipt } = await ctx.openResponse(fromHex(ans.frames[0]));
  assert.deepEqual(JSON.parse(new TextDecoder().decode(result)), { echo: args });
  assert.equal(receipt.priceNanoton, 4321n);
  assert.equal(receipt.execMs, 12.5);
  assert.equal(receipt.callId, "call-1");
  assert.equal(receipt.requestSha256, hex(sha256(body)));
  await refused(ctx.openResponse(fromHex(ans.frames[0])), "order"); // nothing after the final frame
});

test("a sealed stream opens in order to its authenticated end; reordering, tampering and forged receipts are refused", async () => {
  const v = await verifyDocument(DOC, POLICY, NOW);
  const seal = () => sealRequest(utf8(JSON.stringify({ prompt: "one two three" })), "chat", [v], { nowMs: NOW * 1000 });
  const a = await seal();
  const ans = await py("answer", { ...R, body: hex(a.body), mode: "stream" });
  const items: string[] = [];
  for (const f of ans.frames) {
    const o = await a.ctx.openChunk(fromHex(f));
    if ("item" in o) items.push(JSON.parse(new TextDecoder().decode(o.item)));
    else assert.equal(o.receipt.frames, 4);
  }
  assert.deepEqual(items, ["one", "two", "three"]);
  assert.equal(a.ctx.finished, true);

  const b = await seal();
  const f2 = (await py("answer", { ...R, body: hex(b.body), mode: "stream" })).frames.map(fromHex);
  await refused(b.ctx.openChunk(f2[1]), "order");

  const c = await seal();
  const f3 = (await py("answer", { ...R, body: hex(c.body), mode: "stream" })).frames.map(fromHex);
  f3[0][f3[0].length - 10] ^= 1; // inside the ciphertext
  await refused(c.ctx.openChunk(f3[0]), "decrypt");

  const d = await seal();
  const f4 = (await py("answer", { ...R, body: hex(d.body), mode: "stream" })).frames.map(fromHex);
  for (const f of f4.slice(0, 3)) await d.ctx.openChunk(f);
  const end = f4[3];
  end[end.length - 1] ^= 1; // the receipt's signature
  await refused(d.ctx.openChunk(end), "receipt_signature");
});

test("a sealed function error opens here as a FunctionError; the body reaches no replica it was not sealed to", async () => {
  const v = await verifyDocument(DOC, POLICY, NOW);
  const { body, ctx } = await sealRequest(utf8("{}"), "chat", [v], { nowMs: NOW * 1000 });
  const ans = await py("answer", { ...R, body: hex(body), mode: "error" });
  await assert.rejects(ctx.openResponse(fromHex(ans.frames[0])),
    (e: unknown) => e instanceof FunctionError && e.exceptionType === "ValueError" && /secret stays sealed/.test(e.message));
  assert.equal((await py("answer", { ...R, seed: "replica-2", body: hex(body) })).error, "key_id");
  const tampered = body.slice();
  tampered[tampered.length - 1] ^= 1;
  assert.equal((await py("answer", { ...R, body: hex(tampered) })).error, "decrypt");
});

test("receipts both ways: signed here, Python verifies and re-encodes the same bytes; a wrong key is refused", async () => {
  const sk = sha256(utf8("receipt-key"));
  const r = signReceipt({
    callId: "c-77", requestId: "ab".repeat(16), function: "chat", measurement: M, keyId: "cd".repeat(16),
    requestSha256: "01".repeat(32), responseSha256: "02".repeat(32), execUs: 1500n, priceNanoton: 123456789n,
    frames: 3,
  }, sk);
  const ok = await py("receipt", { receipt: hex(r.raw), public_key: hex(ed25519.getPublicKey(sk)) });
  assert.equal(ok.ok, true);
  assert.equal(ok.reencoded, hex(r.raw));
  assert.equal(ok.exec_ms, 1.5);
  assert.equal(ok.price_nanoton, 123456789);
  const bad = await py("receipt", { receipt: hex(r.raw), public_key: hex(ed25519.getPublicKey(sha256(utf8("other")))) });
  assert.deepEqual(bad, { ok: false, check: "receipt_signature" });
  assert.equal(decodeFrame.name, "decodeFrame");
});
