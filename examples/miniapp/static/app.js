// The Mini App page: the user's prompt is sealed here, in the browser, to an attested replica of the chat function;
// the answer streams back sealed and is opened here; the receipt is verified here. The Mini App's server and the
// gateway relay ciphertext only. Telegram passes initData in the URL fragment (tgWebAppData), which is all this
// page needs; Telegram's WebApp object, when a page includes telegram-web-app.js, is used if present.
import { ChannelPayer, CheckFailed, Client, channelPublicKey, fromHex, hex, initChannelSignature } from "/sdk/cocoon-sdk.js";

const $ = (s) => document.querySelector(s);
const show = (sel, text) => { const el = $(sel); el.textContent = text; el.hidden = false; return el; };

function initData() {
  const tg = window.Telegram && window.Telegram.WebApp;
  if (tg && tg.initData) return tg.initData;
  return new URLSearchParams(location.hash.slice(1)).get("tgWebAppData") || "";
}

function fail(prefix, e) {
  const why = e instanceof CheckFailed ? `refused to send: attestation check '${e.check}' failed — ${e.message}`
    : `${e.message || e}`;
  const el = show("#error", `${prefix}: ${why}`);
  el.dataset.check = e instanceof CheckFailed ? e.check : (e.type || "error");
  $("#status").textContent = "not sent";
}

const ton = (n) => `${(Number(n) / 1e9).toFixed(9).replace(/0+$/, "").replace(/\.$/, "")} TON`;

async function post(path, body) {
  const r = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  return [r, await r.json()];
}

async function main() {
  const init = initData();
  let [r, s] = await post("/api/session", { init_data: init });
  if (!r.ok) {
    $("#status").textContent = "not signed in";
    show("#error", `Telegram sign-in refused (${s.error.reason}): ${s.error.message}`).dataset.check = s.error.reason;
    return;
  }
  $("#user").textContent = s.user.username ? `@${s.user.username}` : s.user.first_name;
  // The key that signs this user's payment states is made here and never leaves this browser.
  const keyName = `cocoon-key-${s.user.id}`;
  if (!localStorage.getItem(keyName)) localStorage.setItem(keyName, hex(crypto.getRandomValues(new Uint8Array(32))));
  const sk = fromHex(localStorage.getItem(keyName));
  const pk = hex(channelPublicKey(sk));
  if (s.offer) { // no channel yet: sign its init message; the server pays the deposit and deploys it
    $("#status").textContent = "opening your payment channel…";
    const sig = initChannelSignature(sk, BigInt(s.offer.channel_id), BigInt(s.offer.deposit), 0n);
    [r, s.channel] = await post("/api/channel", { init_data: init, public_key: pk, signature: hex(sig) }).then(([r, b]) => [r, b.channel || b]);
    if (!r.ok) throw new Error(`the channel could not be opened: ${s.channel.error.message}`);
  }
  if (s.channel.key_a !== pk) throw new Error("this user's channel belongs to a key kept in another browser");
  const storeKey = `cocoon-channel-${s.channel.channel_id}`;
  const saved = JSON.parse(localStorage.getItem(storeKey) || "null");
  // resume past both what this browser signed and what the gateway has seen: a seqno is never signed twice
  const big = (a, b) => String(BigInt(a || 0) > BigInt(b || 0) ? a : b);
  // `spendable`: the deposit less the closing fine, the most any state may send
  const st = { channelId: s.channel.channel_id, deposit: s.channel.spendable || s.channel.deposit,
    seqno: big(saved && saved.seqno, s.channel.seqno), sent: big(saved && saved.sent, s.channel.sent),
    charged: big(saved && saved.charged, s.channel.charged) };
  const payer = new ChannelPayer(sk, st, (x) => localStorage.setItem(storeKey, JSON.stringify(x)));
  const client = new Client({ url: `${location.origin}/gw`, payer });
  const history = [];
  $("#status").textContent = `paying from channel ${s.channel.channel_id}; calls sealed to attested replicas of ${s.function}`;
  $("#prompt").disabled = false; $("#send").disabled = false;

  $("#ask").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const text = $("#prompt").value.trim();
    if (!text) return;
    $("#prompt").value = ""; $("#error").hidden = true; $("#send").disabled = true;
    const mine = document.createElement("div"); mine.className = "msg user"; mine.textContent = text; $("#chat").appendChild(mine);
    history.push({ role: "user", content: text });
    const bot = document.createElement("div"); bot.className = "msg bot"; bot.dataset.done = "0"; $("#chat").appendChild(bot);
    $("#status").textContent = "verifying attestation and sealing…";
    try {
      const it = client.streamSealed(s.function, { messages: history, max_tokens: 64 }, s.policy);
      let step;
      while (!(step = await it.next()).done) {
        if (step.value.delta) { bot.textContent += step.value.delta; $("#status").textContent = "streaming (sealed)…"; }
      }
      const { receipt, charge, replica } = step.value;
      history.push({ role: "assistant", content: bot.textContent });
      bot.dataset.done = "1";
      $("#receipt").hidden = false;
      $("#receipt-ok").textContent = "✓ signature, request and response hashes verified on this device";
      $("#charge").textContent = `${charge} nanoton (${ton(charge)})`;
      $("#r-call").textContent = receipt.callId;
      $("#r-price").textContent = `${receipt.priceNanoton} nanoton`;
      $("#r-exec").textContent = `${receipt.execMs} ms, ${receipt.frames} frames`;
      $("#r-measurement").textContent = receipt.measurement;
      $("#r-key").textContent = receipt.keyId;
      $("#r-tee").textContent = replica.insecure ? `${replica.tee} — NOT SECURE (development key)` : replica.tee;
      $("#status").textContent = "done";
    } catch (e) {
      bot.remove();
      history.pop();
      fail("not sent", e);
    } finally {
      $("#send").disabled = false;
    }
  });
}

main().catch((e) => fail("error", e));
