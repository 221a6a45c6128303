// "Log in with a TON wallet": TON Connect's ton_proof, with no library and nothing fetched from outside.
//
// The page speaks TON Connect's JS bridge (the spec's bridge.md): a wallet extension or a wallet's in-app browser
// puts `window[<key>].tonconnect` in the page; `connect(2, {manifestUrl, items: [ton_addr, ton_proof]})` asks it to
// sign the gateway's payload. Wallets reached through an HTTP bridge and a QR code (the phone apps) need
// @tonconnect/ui, which fetches its wallet list and talks to the bridges on other hosts at run time; the dashboard
// does neither (its Content-Security-Policy allows only this gateway). A page that embeds @tonconnect/ui anyway can
// hand the result to the same login:
//
//   const { payload } = await window.cocoonTonProof.payload();         // set it as tonProof in the connect request
//   tonConnectUI.setConnectRequestParameters({ state: "ready", value: { tonProof: payload } });
//   tonConnectUI.onStatusChange((wallet) => wallet && window.cocoonTonProof.login(wallet));  // -> provider view
//
// login() takes the SDK's `Wallet` ({account, connectItems: {tonProof}}) or a bridge's connect event payload
// ({items: [ton_addr, ton_proof]}); the gateway checks the proof and sets the HttpOnly session cookie.
"use strict";
(() => {
  const base = "/dashboard/api/provider";
  const manifestUrl = `${location.origin}/dashboard/tonconnect-manifest.json`;

  function injected() {  // wallets present in this page through TON Connect's JS bridge
    const found = [];
    for (const key of Object.keys(window)) {
      try {
        const tc = window[key] && window[key].tonconnect;
        if (tc && typeof tc.connect === "function") {
          found.push({ key, name: (tc.walletInfo && tc.walletInfo.name) || key, bridge: tc });
        }
      } catch (e) { /* a property that throws on read is no wallet */ }
    }
    return found;
  }

  function toBody(reply) {  // the SDK's Wallet or a connect event payload -> what /ton-proof takes
    let addr, proof;
    if (reply && reply.account) {
      addr = { address: reply.account.address, network: reply.account.chain, publicKey: reply.account.publicKey,
        walletStateInit: reply.account.walletStateInit };
      const tp = reply.connectItems && reply.connectItems.tonProof;
      proof = tp && tp.proof;
      if (tp && tp.error) throw new Error(`the wallet refused to sign: ${tp.error.message || tp.error.code}`);
    } else if (reply && Array.isArray(reply.items)) {
      addr = reply.items.find((i) => i.name === "ton_addr");
      const tp = reply.items.find((i) => i.name === "ton_proof");
      if (tp && tp.error) throw new Error(`the wallet refused to sign: ${tp.error.message || tp.error.code}`);
      proof = tp && tp.proof;
    }
    if (!addr || !proof) throw new Error("the wallet's reply has no ton_addr and ton_proof; connect with tonProof set");
    return { address: addr.address, network: String(addr.network), public_key: addr.publicKey,
      proof: { ...proof, state_init: proof.state_init || addr.walletStateInit } };
  }

  async function payload() {
    return papi("POST", `${base}/ton-proof/payload`);
  }

  async function login(reply) {
    const s = await papi("POST", `${base}/ton-proof`, toBody(reply));
    state.csrf = s.csrf;
    clearInterval(state.timer);
    await providerStart();
    return { wallet: s.wallet };
  }

  async function withWallet(w) {
    const out = $("#ton-error");
    out.textContent = `asking ${w.name} to sign in…`;
    try {
      const { payload: p } = await payload();
      const ev = await w.bridge.connect(2, { manifestUrl, items: [{ name: "ton_addr" }, { name: "ton_proof", payload: p }] });
      if (!ev || ev.event !== "connect") {
        throw new Error((ev && ev.payload && ev.payload.message) || "the wallet declined the connection");
      }
      out.textContent = "";
      await login(ev.payload);
    } catch (e) {
      out.textContent = `wallet login refused: ${e.message}`;
    }
  }

  function offer() {
    const wallets = injected(), box = $("#ton-wallets");
    box.replaceChildren();
    if (!wallets.length) {
      $("#ton-error").textContent = "No TON Connect wallet in this browser: install a wallet extension (Tonkeeper, " +
        "MyTonWallet) or open this page in a wallet's browser, then try again.";
      return;
    }
    $("#ton-error").textContent = "";
    if (wallets.length === 1) { withWallet(wallets[0]); return; }
    for (const w of wallets) {
      const b = document.createElement("button");
      b.textContent = w.name; b.dataset.wallet = w.key;
      b.addEventListener("click", () => withWallet(w));
      box.appendChild(b);
    }
  }

  window.cocoonTonProof = { payload, login, manifestUrl, wallets: injected };
  $("#ton-login").addEventListener("click", offer);
})();
