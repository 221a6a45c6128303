// The Mini App page: the user's prompt is sealed here, in the browser, to an attested replica of the chat function;
// the answer streams back sealed and is opened here; the receipt is verified here. The Mini App's server and the
// gateway relay ciphertext only. Telegram passes initData in the URL fragment (tgWebAppData), which is all this
// page needs; Telegram's WebApp object, when a page includes telegram-web-app.js, is used if present.
import { ChannelPayer, CheckFailed, Client, fromHex } from "/sdk/cocoon-sdk.js";

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

async function main() {
  const r = await fetch("/api/session", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ init_data: initData() }) });
  const s = await r.json();
  if (!r.ok) {
    $("#status").textContent = "not signed in";
    show("#error", `Telegram sign-in refused (${s.error.reason}): ${s.error.message}`).dataset.check = s.error.reason;
    return;
  }
  $("#user").textContent = s.user.username ? `@${s.user.username}` : s.user.first_name;
  const storeKey = `cocoon-channel-${s.channel.channel_id}`;
  const saved = JSON.parse(localStorage.getItem(storeKey) || "null");
  // resume past both what this browser signed and what the gateway has seen: a seqno is never signed twice
  const big = (a, b) => String(BigInt(a || 0) > BigInt(b || 0) ? a : b);
  const st = { channelId: s.channel.channel_id, deposit: s.channel.deposit,
    seqno: big(saved && saved.seqno, s.channel.seqno), sent: big(saved && saved.sent, s.channel.sent),
    charged: big(saved && saved.charged, s.channel.charged) };
  const payer = new ChannelPayer(fromHex(s.channel.key), st, (x) => localStorage.setItem(storeKey, JSON.stringify(x)));
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
