// Payment states built here with @ton/core are byte-identical to cocoon_faas.ton's (cell path and hot-path
// template), their signed hash is the same, and Python accepts a state built here as signed by the caller's key.
import assert from "node:assert/strict";
import { after, test } from "node:test";
import { ed25519 } from "@noble/curves/ed25519.js";
import { b64, fromB64, fromHex, hex } from "../src/bytes.js";
import { ChannelPayer, initChannelSignature, signedStateBoc } from "../src/payments.js";
import { CocoonError } from "../src/errors.js";
import { closePy, py } from "./helpers.js";

after(closePy);

const CASES = [
  { channel_id: "1", seqno: "1", sent: "0", cp_seqno: "0", cp_sent: "0" },
  { channel_id: "9223372036854775807", seqno: "42", sent: "1500000000", cp_seqno: "0", cp_sent: "0" },
  { channel_id: "340282366920938463463374607431768211455", seqno: "18446744073709551615",
    sent: "1329227995784915872903807060280344575", cp_seqno: "7", cp_sent: "255" },
];

test("payment states are byte-identical to cocoon_faas.ton (cells and template) and sign the same hash", async () => {
  for (const c of CASES) {
    const want = await py("payment", { seed: `payer-${c.seqno}`, ...c });
    const got = signedStateBoc(BigInt(c.channel_id), { seqno: BigInt(c.seqno), sent: BigInt(c.sent) },
      { seqno: BigInt(c.cp_seqno), sent: BigInt(c.cp_sent) }, fromHex(want.secret_key));
    assert.equal(hex(got.hash), want.hash);
    assert.equal(hex(got.boc), want.boc);
    assert.equal(hex(got.boc), want.template_boc);
  }
});

test("the payer signs cumulative states Python accepts, refuses past the deposit, and books charges", async () => {
  const sk = fromHex("11".repeat(32));
  const saved: string[] = [];
  const p = new ChannelPayer(sk, { channelId: "5", deposit: "1000" }, (s) => saved.push(s.seqno));
  const t1 = p.signForCall(300n);
  const t2 = p.signForCall(300n); // in flight together: the second covers both
  const chk = await py("payment_check", { boc: hex(fromB64(t2.header)), public_key: hex(ed25519.getPublicKey(sk)) });
  assert.deepEqual(chk, { channel_id: "5", seqno: "2", sent: "600", cp_seqno: "0", signed_by: true });
  const other = await py("payment_check", { boc: hex(fromB64(t1.header)), public_key: "22".repeat(32) });
  assert.equal(other.signed_by, false);
  p.complete(t1, 120n);
  p.complete(t2, 0n);
  assert.equal(p.charged, 120n);
  const t3 = p.signForCall(300n);
  assert.equal(p.sent, 600n); // sent never goes down
  p.complete(t3, 300n);
  assert.throws(() => p.signForCall(600n), (e: unknown) => e instanceof CocoonError && e.status === 402);
  assert.deepEqual(saved, ["1", "2", "2", "2", "3", "3"]);
});

test("the init_channel signature made here is Python's InitChannel.signed, byte for byte", async () => {
  const want = await py("init_sig", { seed: "browser-key", channel_id: "1234567890123", balance_a: "2000000000" });
  const sig = initChannelSignature(fromHex(want.secret_key), 1234567890123n, 2000000000n, 0n);
  assert.equal(hex(sig), want.signature);
});

test("resync takes only a newer state this key signed for this channel, and never goes back", async () => {
  const sk = fromHex("33".repeat(32));
  const tabA = new ChannelPayer(sk, { channelId: "77", deposit: "10000" });
  const saved: string[] = [];
  const tabB = new ChannelPayer(sk, { channelId: "77", deposit: "10000" }, (s) => saved.push(`${s.seqno}/${s.sent}`));
  let last = tabA.signForCall(500n);
  tabA.complete(last, 200n);
  last = tabA.signForCall(500n);
  tabA.complete(last, 300n); // tab A: seqno 2, sent 700, charged 500
  const summary = { latest_state: last.header, charged: "500" };

  const refused = (e: unknown) => e instanceof CocoonError && e.status === 400 && /nothing was changed/.test(e.message);
  const stranger = new ChannelPayer(fromHex("44".repeat(32)), { channelId: "77", deposit: "10000" });
  assert.throws(() => stranger.resync(summary), refused); // not this key's state
  const elsewhere = new ChannelPayer(sk, { channelId: "78", deposit: "10000" });
  assert.throws(() => elsewhere.resync(summary), refused); // not this channel's state
  assert.throws(() => tabB.resync({ latest_state: "AAAA", charged: "0" }), refused);
  assert.deepEqual([stranger.seqno, elsewhere.seqno, tabB.seqno], [0n, 0n, 0n]);

  const r = tabB.resync(summary);
  assert.deepEqual([r.seqnoBefore, r.seqno, r.sent, r.charged], [0n, 2n, 700n, 500n]);
  assert.deepEqual(saved, ["2/700"]);
  const next = tabB.signForCall(100n); // past tab A's states (charged 500 + this hold fit in sent 700): accepted
  assert.equal(next.seqno, 3n);
  const chk = await py("payment_check", { boc: hex(fromB64(next.header)), public_key: hex(ed25519.getPublicKey(sk)) });
  assert.deepEqual(chk, { channel_id: "77", seqno: "3", sent: "700", cp_seqno: "0", signed_by: true });
  tabB.resync(summary); // older than what tab B has now: nothing goes down
  assert.deepEqual([tabB.seqno, tabB.sent], [3n, 700n]);

  // a state the Python SDK signed with the same key is read the same way
  const want = await py("payment", { seed: "resync-py", channel_id: "77", seqno: "9", sent: "900", cp_seqno: "0",
    cp_sent: "0" });
  const pyTab = new ChannelPayer(fromHex(want.secret_key), { channelId: "77", deposit: "10000" });
  const got = pyTab.resync({ latest_state: b64(fromHex(want.boc)), charged: "900" });
  assert.deepEqual([got.seqno, got.sent, got.charged], [9n, 900n, 900n]);
});
