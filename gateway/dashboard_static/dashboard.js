// The dashboard: logs in with an API key, then polls the gateway's JSON API every 2 s and draws with uPlot
// (bundled, served by the gateway). No framework; every number shown comes from a gateway response.
"use strict";
const $ = (s) => document.querySelector(s);
const state = { key: sessionStorage.getItem("cocoon-key") || "", selected: null, tab: "functions", timer: null,
  charts: {}, earnings: { t: [], earned: [], paid: [] } };

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
    state.charts[id] = new uPlot({ width, height: 200, series: [{}, ...series], scales: { x: { time: true } } }, data, el);
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
$("#login-form").addEventListener("submit", login);
$("#logout").addEventListener("click", logout);
if (state.key) login();
