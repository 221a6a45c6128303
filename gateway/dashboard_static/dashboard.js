// The dashboard: logs in with an API key (or, for a provider, with the one-time code `cocoon provider login` prints:
// the gateway answers an HttpOnly session cookie this script never sees), then polls the gateway's JSON API every
// 2 s and draws with uPlot (bundled, served by the gateway). No framework; every number shown comes from a gateway
// response.
"use strict";
const $ = (s) => document.querySelector(s);
const state = { key: sessionStorage.getItem("cocoon-key") || "", selected: null, tab: "functions", timer: null,
  charts: {}, earnings: { t: [], earned: [], paid: [] }, csrf: "", provider: false };

async function api(method, path, body) {
  const r = await fetch(path, { method, headers: { Authorization: `Bearer ${state.key}`,
    ...(body ? { "Content-Type": "application/json" } : {}) }, body: body ? JSON.stringify(body) : undefined });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) { const e = new Error((data.error && data.error.message) || `HTTP ${r.status}`); e.status = r.status; throw e; }
  return data;
}

function cell(tr, v) { const td = document.createElement("td"); td.textContent = v === null || v === undefined ? "—" : String(v); tr.appendChild(td); return td; }
function rows(sel, items, fill) { const tb = $(sel + " tbody"); tb.replaceChildren(); for (const it of items) { const tr = document.createElement("tr"); fill(tr, it); tb.appendChild(tr); } }

async function login(ev) {
  if (ev) ev.preventDefault();
  state.key = $("#key").value.trim() || state.key;
  try {
    await api("GET", "/v1/functions");
  } catch (e) {
    $("#login-error").textContent = `login refused: ${e.message}`;
    return;
  }
  sessionStorage.setItem("cocoon-key", state.key);
  $("#login-view").hidden = true; $("#app").hidden = false; $("#logout").hidden = false;
  $("#who").textContent = "logged in";
  await refresh();
  state.timer = setInterval(refresh, 2000);
}

function logout() { sessionStorage.removeItem("cocoon-key"); location.reload(); }

function chart(id, series, data) {
  const el = $(id);
  const width = Math.max(320, Math.min(560, el.parentElement.clientWidth || 480));
  if (!state.charts[id] || state.charts[id].series.length !== series.length + 1) {
    if (state.charts[id]) state.charts[id].destroy();
    el.replaceChildren();
    state.charts[id] = new uPlot({ width, height: 200, series: [{}, ...series], scales: { x: { time: true } },
      axes: [{}, { size: 80 }] }, data, el);
  } else {
    state.charts[id].setData(data);
  }
  el.dataset.points = String(data[0].length);
}

async function refreshFunctions() {
  const [{ functions }, series] = await Promise.all([api("GET", "/v1/functions"), api("GET", "/dashboard/api/series")]);
  rows("#functions", functions, (tr, f) => {
    tr.className = "fn" + (f.name === state.selected ? " selected" : ""); tr.dataset.name = f.name;
    for (const k of ["name", "version", "replicas", "in_flight", "calls", "errors", "p50_ms", "p99_ms", "status"]) cell(tr, f[k]);
    tr.addEventListener("click", () => { state.selected = f.name; refresh(); });
  });
  if (!state.selected) return;
  const f = await api("GET", `/v1/functions/${encodeURIComponent(state.selected)}`);
  $("#detail").hidden = false;
  $("#detail-name").textContent = `${f.name} — version ${f.version}`;
  $("#detail").dataset.version = String(f.version);
  rows("#versions", [...f.versions].reverse(), (tr, v) => {
    cell(tr, v.version); cell(tr, String(v.measurement).slice(0, 16) + "…"); cell(tr, new Date(v.created * 1000).toLocaleString());
    const td = document.createElement("td");
    if (v.version !== f.version) {
      const b = document.createElement("button"); b.className = "rollback"; b.dataset.version = String(v.version);
      b.textContent = `roll back to v${v.version}`; b.addEventListener("click", () => rollback(f.name, v.version));
      td.appendChild(b);
    } else td.textContent = "live";
    tr.appendChild(td);
  });
  rows("#replicas", f.replica_list || [], (tr, r) => { for (const k of ["id", "state", "version", "in_flight", "calls"]) cell(tr, r[k]); });
  try {
    const { logs } = await api("GET", `/v1/functions/${encodeURIComponent(f.name)}/logs?limit=30`);
    $("#logs").textContent = logs.map((l) => typeof l === "string" ? l : JSON.stringify(l)).join("\n") || "(no logs yet)";
  } catch (e) { $("#logs").textContent = `logs: ${e.message}`; }
  const s = series.functions[f.name];
  if (s && s.t.length) {
    chart("#chart-latency", [{ label: "p50 ms", stroke: "#0f5bd8" }, { label: "p99 ms", stroke: "#d83a0f" }], [s.t, s.p50_ms, s.p99_ms]);
    chart("#chart-calls", [{ label: "calls", stroke: "#0a7a2f" }, { label: "errors", stroke: "#b00020" }], [s.t, s.calls, s.errors]);
  }
}

async function rollback(name, version) {
  const out = $("#rollback-result");
  try {
    const r = await api("POST", `/v1/functions/${encodeURIComponent(name)}/rollback`, { version });
    out.className = "ok"; out.textContent = `rolled back: ${name} now serves version ${r.version ?? version}`;
  } catch (e) { out.className = "error"; out.textContent = `rollback refused: ${e.message}`; }
  await refresh();
}

async function refreshProviders() {
  const [{ providers }, earnings] = await Promise.all([api("GET", "/v1/providers"),
    api("GET", "/v1/ledger/providers").catch(() => null)]);
  const by = {};
  for (const e of (earnings && earnings.providers) || (Array.isArray(earnings) ? earnings : [])) by[e.provider_id] = e;
  rows("#providers", providers, (tr, p) => {
    const e = by[p.node_id] || by[p.provider_id] || {};
    cell(tr, p.node_id || p.id); cell(tr, p.gpu || JSON.stringify(p.hardware)); cell(tr, p.health ?? p.status);
    cell(tr, p.load); cell(tr, p.price_nanoton_per_s ?? p.price); cell(tr, e.earned); cell(tr, e.paid); cell(tr, e.due);
  });
  if (earnings) {
    const list = earnings.providers || earnings;
    const sum = (k) => (Array.isArray(list) ? list : []).reduce((a, e) => a + Number(e[k] || 0), 0);
    const E = state.earnings; E.t.push(Date.now() / 1000); E.earned.push(sum("earned")); E.paid.push(sum("paid"));
    chart("#chart-earnings", [{ label: "earned", stroke: "#0a7a2f" }, { label: "paid out", stroke: "#0f5bd8" }], [E.t, E.earned, E.paid]);
  }
}

async function refreshLedger() {
  try {
    const l = await api("GET", "/v1/ledger?verify=1");
    $("#ledger-note").textContent = "operator view";
    $("#ledger-verify").textContent = JSON.stringify(l.verify, null, 2);
    $("#ledger-balances").textContent = JSON.stringify(l.balances, null, 2);
  } catch (e) {
    $("#ledger-note").textContent = `the ledger is for the gateway operator (${e.message})`;
  }
}

async function refresh() {
  try {
    if (state.tab === "functions") await refreshFunctions();
    else if (state.tab === "providers") await refreshProviders();
    else await refreshLedger();
    $("#updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    $("#updated").textContent = `update failed: ${e.message}`;
    if (e.status === 401) logout();
  }
}

document.querySelectorAll(".tab").forEach((b) => b.addEventListener("click", () => {
  state.tab = b.dataset.tab;
  document.querySelectorAll(".tab").forEach((x) => x.classList.toggle("active", x === b));
  for (const t of ["functions", "providers", "ledger"]) $(`#tab-${t}`).hidden = t !== state.tab;
  refresh();
}));
// -- the provider view (a session cookie; its CSRF token, from the gateway, rides on state changes) ----------------
async function papi(method, path, body) {
  const r = await fetch(path, { method, credentials: "same-origin", headers: {
    ...(body ? { "Content-Type": "application/json" } : {}), ...(state.csrf ? { "X-Cocoon-CSRF": state.csrf } : {}) },
    body: body ? JSON.stringify(body) : undefined });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) { const e = new Error((data.error && data.error.message) || `HTTP ${r.status}`); e.status = r.status; throw e; }
  return data;
}

async function providerLogin(code) {
  try {
    const s = await papi("POST", "/dashboard/api/provider/session", { code });
    state.csrf = s.csrf;
  } catch (e) {
    $("#provider-error").textContent = `provider login refused: ${e.message}`;
    return;
  }
  await providerStart();
}

async function providerStart() {
  sessionStorage.removeItem("cocoon-key"); state.key = "";  // one identity per tab: the provider's, now
  $("#login-view").hidden = true; $("#app").hidden = true; $("#provider-app").hidden = false;
  $("#logout").hidden = false; state.provider = true;
  await providerRefresh();
  state.timer = setInterval(providerRefresh, 2000);
}

async function providerLogout() {
  clearInterval(state.timer);
  try { await papi("POST", "/dashboard/api/provider/logout", {}); } catch (e) { /* ended or expired already */ }
  location.replace("/dashboard");
}

const ton = (n) => n === null || n === undefined ? "—" : `${n} (${(Number(n) / 1e9).toFixed(9)} TON)`;

async function providerRefresh() {
  let me;
  try { me = await papi("GET", "/dashboard/api/provider/me"); } catch (e) {
    $("#provider-updated").textContent = `update failed: ${e.message}`;
    if (e.status === 401) { clearInterval(state.timer); $("#provider-app").hidden = true; $("#login-view").hidden = false;
      $("#logout").hidden = true; $("#provider-error").textContent = e.message; }
    return;
  }
  state.csrf = me.csrf;
  $("#who").textContent = "provider"; $("#provider-wallet").textContent = `wallet ${me.wallet}`;
  $("#provider-app").dataset.wallet = me.wallet;
  $("#provider-totals").textContent = `earned ${ton(me.totals.earned)} · paid out ${ton(me.totals.paid)}`;
  const last = me.pending.last_payout;
  $("#provider-pending").textContent = `due ${ton(me.pending.due)}: ${me.pending.state}` +
    (last ? ` · last payout ${last.amount} nanoton on channel ${last.channel_id} (seqno ${last.seqno}), ${new Date(last.at * 1000).toLocaleString()}` : "");
  $("#provider-pending").dataset.due = String(me.pending.due);
  rows("#provider-nodes", me.nodes, (tr, n) => {
    tr.dataset.node = n.node_id;
    cell(tr, n.node_id); cell(tr, n.name); cell(tr, n.gpu);
    cell(tr, n.excluded ? `excluded: ${n.excluded}` : n.status + (n.healthy || n.status !== "up" ? "" : " (silent)"));
    cell(tr, Number(n.load).toFixed(2)); cell(tr, n.replicas); cell(tr, n.calls); cell(tr, `${(n.success_rate * 100).toFixed(1)}%`);
    cell(tr, n.ledger_earned); cell(tr, n.ledger_paid); cell(tr, n.due);
  });
  rows("#provider-payouts", me.payouts, (tr, p) => {
    cell(tr, new Date(p.at * 1000).toLocaleString()); cell(tr, p.provider_id); cell(tr, p.amount); cell(tr, p.channel_id); cell(tr, p.seqno);
  });
  rows("#provider-channels", me.pending.channels, (tr, c) => {
    tr.dataset.channel = String(c.channel_id);
    for (const k of ["channel_id", "provider_id", "deposit", "sent", "left", "seqno", "status"]) cell(tr, c[k]);
    const td = cell(tr, c.latest_state ? `${c.latest_state.slice(0, 24)}…` : "(none yet)");
    td.title = c.latest_state || ""; td.dataset.boc = c.latest_state || "";
  });
  if (me.series) {
    const s = me.series;
    chart("#chart-provider-earnings", [{ label: "earned", stroke: "#0a7a2f" }, { label: "paid out", stroke: "#0f5bd8" }], [s.t, s.earned, s.paid]);
    chart("#chart-provider-due", [{ label: "due", stroke: "#d83a0f" }], [s.t, s.due]);
  }
  $("#provider-updated").textContent = `updated ${new Date().toLocaleTimeString()} · session ends ${new Date(me.expires_at * 1000).toLocaleTimeString()}`;
}

$("#login-form").addEventListener("submit", login);
$("#logout").addEventListener("click", () => (state.provider ? providerLogout() : logout()));
$("#provider-form").addEventListener("submit", (ev) => { ev.preventDefault(); providerLogin($("#provider-code").value.trim()); });
function codeFromLink() {  // the one-time link: take the code out of the address bar and history before using it
  const m = /provider-code=([^&]+)/.exec(location.hash);
  if (!m) return false;
  history.replaceState(null, "", location.pathname);
  clearInterval(state.timer);
  providerLogin(decodeURIComponent(m[1]));
  return true;
}
window.addEventListener("hashchange", codeFromLink);  // the link pasted into a tab already on the dashboard
(async () => {
  if (codeFromLink()) return;
  if (state.key) login();
  else {  // a provider session from before this reload (the cookie is HttpOnly: ask the gateway)
    try { await papi("GET", "/dashboard/api/provider/me"); await providerStart(); } catch (e) { /* not logged in */ }
  }
})();
