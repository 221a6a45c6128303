// The SDK against a real gateway (run by tests/test_e2e_web.py with the gateway it started): plain call, SSE
// stream, spawn/poll/cancel, sealed unary and streamed calls verified on this side, a refused policy, and paid
// calls from a channel (no API key). Prints one JSON object of what it saw; the Python test asserts on it.
import { ChannelPayer, CheckFailed, Client, CocoonError, fromHex } from "../src/index.js";

const [url, apiKey, devKey, channelId, channelKey, deposit] = process.argv.slice(2);
const out: Record<string, unknown> = {};
const c = new Client({ url, apiKey });

out.call = await c.call("greet", { name: "Ada", excited: true });
const items: unknown[] = [];
for await (const it of c.stream("countdown", { start: 2, delay: 0.01 })) items.push(it);
out.stream = items;
const slow = await c.spawn("sleepy", { seconds: 4 });
await new Promise((r) => setTimeout(r, 300));
await c.cancel(slow);
out.cancelled = (await c.poll(slow)).status;
out.spawned = await c.result(await c.spawn("add", { a: 1.5, b: 2 }));

const measurement = (await c.request("GET", "/v1/functions/greet")).measurement;
const policy = { measurements: [measurement], trustedDevKeys: [devKey] };
const sealed = await c.callSealed("greet", { name: "sealed-Ada" }, policy);
out.sealed = { result: sealed.result, price: String(sealed.receipt.priceNanoton), measurement: sealed.receipt.measurement,
  insecure: sealed.replica.insecure };
const spawned = await c.spawnSealed("greet", { name: "later" }, policy);
const later = await spawned.wait();
out.spawned_sealed = { result: later.result, call: later.receipt.callId === spawned.id || later.receipt.callId.length > 0 };
const chatM = (await c.request("GET", "/v1/functions/Chat.generate")).measurement;
const it = c.streamSealed<{ delta?: string }>("Chat.generate", { messages: [{ role: "user", content: "abc def" }] },
  { measurements: [chatM], trustedDevKeys: [devKey] });
let text = "";
let step;
while (!(step = await it.next()).done) text += step.value.delta ?? "";
out.sealed_stream = { text, frames: step.value.receipt.frames };
try {
  await c.callSealed("greet", { name: "x" }, { measurements: ["00".repeat(32)], trustedDevKeys: [devKey] });
  out.wrong_measurement = "sent";
} catch (e) {
  out.wrong_measurement = e instanceof CheckFailed ? e.check : String(e);
}
try {
  await c.callSealed("greet", { name: "x" }, { measurements: [measurement] });
  out.untrusted_dev = "sent";
} catch (e) {
  out.untrusted_dev = e instanceof CheckFailed ? e.check : String(e);
}

const payer = new ChannelPayer(fromHex(channelKey), { channelId, deposit });
const paid = new Client({ url, payer });
out.paid_call = await paid.call("greet", { name: "payer" });
const paidItems: unknown[] = [];
for await (const x of paid.stream("countdown", { start: 1, delay: 0.01 })) paidItems.push(x);
const ps = await paid.callSealed("greet", { name: "paid-sealed" }, policy);
const refused = async (f: () => Promise<unknown>): Promise<string> => {
  try {
    await f();
    return "sent";
  } catch (e) {
    return e instanceof CocoonError ? `${e.status} ${e.type}: ${e.message}` : String(e);
  }
};
// a typo in sealed arguments is refused on this device (the gateway cannot read them): nothing signed or sent
out.sealed_typo = await refused(() => paid.callSealed("greet", { nmae: "typo" }, policy));
out.paid = { charged: String(payer.charged), seqno: String(payer.seqno), sent: String(payer.sent),
  stream_items: paidItems.length, sealed_charge: String(ps.charge), sealed_result: ps.result };
const countdownM = (await c.request("GET", "/v1/functions/countdown")).measurement;
// callSealed asks for one sealed frame: a generator is refused before it runs, with a hint to stream it
out.sealed_generator = await refused(() => paid.callSealed("countdown", { start: 1 },
  { measurements: [countdownM], trustedDevKeys: [devKey] }));
out.charged_after_refusal = String(payer.charged);
// another tab with the same key and no saved state: its first state repeats a seqno the gateway already has
// (refused, nothing charged); resync catches it up from the gateway's newest state and its next call is paid
const tab2Payer = new ChannelPayer(fromHex(channelKey), { channelId, deposit });
const tab2 = new Client({ url, payer: tab2Payer });
out.tab2_refused = await refused(() => tab2.call("greet", { name: "tab 2" }));
const resynced = await tab2.resyncChannel();
out.tab2 = { resynced: String(resynced.seqno), call: await tab2.call("greet", { name: "tab 2" }),
  seqno: String(tab2Payer.seqno), charged: String(tab2Payer.charged) };
console.log(JSON.stringify(out));
