// The epio dashboard: a small script over the JSON API (/api/v1), no build step.
// The token lives in localStorage and goes in an Authorization header (no cookie,
// so no CSRF). Every value from the API is inserted with textContent, never HTML.
"use strict";

const API = "/api/v1";
const TOKEN_KEY = "epio.token";
const $ = (sel) => document.querySelector(sel);

function token() { return localStorage.getItem(TOKEN_KEY); }

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(path, method, body) {
  const headers = { "Authorization": "Bearer " + token(), "Accept": "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(API + path, {
    method: method || "GET", headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let answer = null;
  try { answer = await resp.json(); } catch (e) { answer = null; }
  if (!resp.ok) {
    const err = (answer && answer.error) || { code: "http_error", message: resp.statusText };
    throw new ApiError(resp.status, err.code, err.message);
  }
  return answer;
}

function show(id) {
  for (const v of ["#signin-view", "#apps-view", "#app-view"]) $(v).hidden = v !== id;
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "-" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function ago(ts) {
  if (!ts) return "-";
  const s = Math.max(0, Math.floor(Date.now() / 1000 - ts));
  if (s >= 86400) return Math.floor(s / 86400) + "d ago";
  if (s >= 3600) return Math.floor(s / 3600) + "h ago";
  if (s >= 60) return Math.floor(s / 60) + "m ago";
  return s + "s ago";
}

function fill(tableSel, rows, render) {
  const tbody = $(tableSel + " tbody");
  tbody.replaceChildren();
  for (const r of rows) {
    const tr = document.createElement("tr");
    render(tr, r);
    tbody.appendChild(tr);
  }
}

async function signIn(ev) {
  ev.preventDefault();
  const value = $("#token").value.trim();
  localStorage.setItem(TOKEN_KEY, value);
  try {
    await api("/user");
  } catch (e) {
    localStorage.removeItem(TOKEN_KEY);
    $("#signin-error").textContent = e.message;
    return;
  }
  $("#token").value = "";
  history.pushState(null, "", "/dashboard/");
  route();
}

// `epio login --web` prints /dashboard/#signin=CODE: the code (in the fragment, which
// browsers never send) is taken off the address at once and exchanged, in a POST body,
// for a token of this page's own; it works once.  Answers why it failed (or null).
async function signInWithLink() {
  const m = location.hash.match(/^#signin=([A-Za-z0-9_-]{1,200})$/);
  if (!m) return null;
  history.replaceState(null, "", location.pathname + location.search);
  try {
    const resp = await fetch(API + "/login-codes/exchange", {
      method: "POST", headers: { "Content-Type": "application/json",
                                 "Accept": "application/json" },
      body: JSON.stringify({ code: m[1] }),
    });
    const answer = await resp.json();
    if (!resp.ok) throw new Error(answer.error ? answer.error.message : resp.statusText);
    localStorage.setItem(TOKEN_KEY, answer.token);
  } catch (e) {
    return e.message;
  }
  return null;
}

function signOut() {
  localStorage.removeItem(TOKEN_KEY);
  history.pushState(null, "", "/dashboard/");
  route();
}

async function showApps() {
  const apps = await api("/apps");
  fill("#apps", apps, (tr, a) => {
    tr.dataset.app = a.name;
    const link = document.createElement("a");
    link.href = "/dashboard/apps/" + encodeURIComponent(a.name);
    link.textContent = a.name;
    link.addEventListener("click", (ev) => { ev.preventDefault(); go(link.href); });
    cell(tr, "").appendChild(link);
    cell(tr, a.owner);
    cell(tr, a.release ? "v" + a.release : "-");
    cell(tr, Object.entries(a.processes).map(([t, n]) => t + "=" + n).join(" ") || "-");
    cell(tr, a.url);
  });
  $("#apps-empty").hidden = apps.length > 0;
  show("#apps-view");
}

function fillProcesses(ps) {
  fill("#processes", ps, (tr, p) => {
    tr.dataset.process = p.name;
    cell(tr, p.name); cell(tr, "v" + p.release); cell(tr, p.state, "state-" + p.state);
    cell(tr, p.node); cell(tr, ago(p.since)); cell(tr, p.restarts);
  });
}

async function refreshApp(name) {
  // processes and the log change on their own; the rest (and revealed values) stays
  const enc = encodeURIComponent(name);
  try {
    fillProcesses(await api("/apps/" + enc + "/ps"));
    if (tail === null) await loadLog(enc);  // the live tail is down: poll instead
    await loadStats(enc);
  } catch (e) {
    $("#error").textContent = e.message;
  }
  refresh = setTimeout(() => refreshApp(name), 5000);
}

// Actions: each calls the API, says what happened (#notice, a live region) or the
// API's error sentence (#error), then shows the app again.
let current = null;

async function act(what, call, pending) {
  $("#error").textContent = "";
  $("#notice").textContent = pending || "";
  let result;
  try {
    result = await call();
  } catch (e) {
    $("#notice").textContent = "";
    $("#error").textContent = e.message;
    return;
  }
  await showApp(current);  // the view shows the change when the notice says it
  $("#notice").textContent = typeof what === "function" ? what(result) : what;
}

function button(label, onClick, cls) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  if (cls) b.className = cls;
  b.addEventListener("click", onClick);
  return b;
}

// A destructive action asks once more in place (no dialog): the first click turns
// the button into "Confirm ..."; the second does it.
function confirmButton(label, confirmLabel, run) {
  const b = button(label, () => {
    if (b.dataset.armed === "true") { run(); return; }
    b.dataset.armed = "true";
    b.textContent = confirmLabel;
  });
  return b;
}

// A destructive action on data asks for the app's name to be typed (as the CLI does):
// the button opens an inline form whose confirm button is enabled only by that name.
function typedConfirm(label, appName, confirmLabel, run) {
  const wrap = document.createElement("span");
  wrap.className = "typed-confirm";
  const open = button(label, () => {
    open.hidden = true;
    const id = "confirm-" + Math.random().toString(36).slice(2);
    const lab = document.createElement("label");
    lab.htmlFor = id;
    lab.textContent = "Type " + appName + " to confirm";
    const input = document.createElement("input");
    input.id = id;
    input.autocomplete = "off";
    input.className = "confirm-name";
    // once: both disabled while the action runs (a second click would do it twice)
    const fire = () => {
      if (input.value !== appName || go.disabled) return;
      go.disabled = true; input.disabled = true;
      Promise.resolve(run()).finally(() => {
        input.disabled = false; go.disabled = input.value !== appName;
      });
    };
    const go = button(confirmLabel, fire, "danger");
    go.disabled = true;
    input.addEventListener("input", () => { go.disabled = input.value !== appName; });
    input.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter") { ev.preventDefault(); fire(); }
      if (ev.key === "Escape") { cancel.click(); }
    });
    const cancel = button("Cancel", () => {
      for (const el of [lab, input, go, cancel]) el.remove();
      open.hidden = false;
      open.focus();
    });
    wrap.append(lab, input, go, cancel);
    input.focus();
  });
  wrap.appendChild(open);
  return wrap;
}

function humanSize(n) {
  if (!n) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function when(ts) {
  if (!ts) return "-";
  return new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";
}

// A custom domain's certificate state (GET /apps/{app}/certs, docs/https.md) in words;
// pending_dns is the issuer's own DNS check: the name does not reach the routers yet.
function certState(c) {
  const why = c.last_error ? ": " + c.last_error : "";
  if (c.state === "pending_dns") return "DNS not in place yet" + why;
  if (c.state === "issued") return "certificate issued" +
    (c.not_after ? ", expires " + when(c.not_after) : "");
  if (c.state === "failed") return "certificate failed" + why;
  if (c.state === "pending") return "certificate pending";
  return "no automatic certificate" + why;
}

// The DNS check that POST /apps/{app}/domains answers with (`dns`: state ok,
// pending_dns or unknown, a message, the records to create); null hides it.
let dnsShown = null;  // {app, hostname} of the answer shown
function showDns(added) {
  const box = $("#domain-dns");
  const table = $("#domain-records");
  const tbody = $("#domain-records tbody");
  tbody.replaceChildren();
  if (!added || !added.dns) { box.hidden = true; dnsShown = null; return; }
  const dns = added.dns;
  box.dataset.state = dns.state;
  box.dataset.hostname = added.hostname;
  $("#domain-dns-message").className = "state-" + dns.state;
  $("#domain-dns-message").textContent = added.hostname + ": " + (
    dns.state === "pending_dns" ? "DNS is not in place yet: " + dns.message : dns.message);
  for (const r of dns.records || []) {
    const tr = document.createElement("tr");
    cell(tr, r.name); cell(tr, r.type); cell(tr, r.value);
    tbody.appendChild(tr);
  }
  table.hidden = !(dns.records && dns.records.length);
  box.hidden = false;
  dnsShown = { app: current, hostname: added.hostname };
}

async function showApp(name) {
  current = name;
  const enc = encodeURIComponent(name);
  const [app, ps, releases, domains, config, formation, certs] = await Promise.all([
    api("/apps/" + enc), api("/apps/" + enc + "/ps"), api("/apps/" + enc + "/releases"),
    api("/apps/" + enc + "/domains"), api("/apps/" + enc + "/config"),
    api("/apps/" + enc + "/formation"),
    // the certificate states; an api without certificates (503) shows the names only
    api("/apps/" + enc + "/certs").catch(() => null),
  ]);
  $("#app-name").textContent = app.name;
  $("#app-url").textContent = app.url;
  $("#app-url").href = app.url;
  $("#app-release").textContent = app.release ? "release v" + app.release : "not deployed yet";
  fillProcesses(ps);
  fill("#formation", formation.processes, (tr, p) => {
    tr.dataset.type = p.type;
    cell(tr, p.type);
    const qty = document.createElement("input");
    qty.type = "number"; qty.min = "0"; qty.max = "100"; qty.value = String(p.quantity);
    qty.setAttribute("aria-label", "quantity of " + p.type);
    cell(tr, "").appendChild(qty);
    const size = document.createElement("select");
    size.setAttribute("aria-label", "size of " + p.type);
    for (const s of Object.keys(formation.sizes)) {
      const o = document.createElement("option");
      o.value = s; o.textContent = s; o.selected = s === p.size;
      size.appendChild(o);
    }
    cell(tr, "").appendChild(size);
    cell(tr, p.command);
    const actions = cell(tr, "");
    actions.appendChild(button("Scale " + p.type, () => act(
      "Scaled " + p.type + " to " + qty.value + " (" + size.value + ")",
      () => api("/apps/" + enc + "/formation", "PATCH", { processes: {
        [p.type]: { quantity: Number(qty.value), size: size.value } } }))));
    actions.appendChild(button("Restart " + p.type, () => restart(p.type)));
  });
  fill("#releases", releases, (tr, r) => {
    tr.dataset.version = String(r.version);
    cell(tr, "v" + r.version + (r.current ? " (current)" : "")); cell(tr, r.status);
    cell(tr, r.image ? r.image.slice(0, 12) : "-"); cell(tr, r.description);
    cell(tr, r.created_by); cell(tr, ago(r.created));
    const td = cell(tr, "");
    if (!r.current && r.image && r.status !== "failed") {
      td.appendChild(confirmButton("Roll back to v" + r.version,
        "Confirm: roll back to v" + r.version, () => act("Rolled back to v" + r.version,
          () => api("/apps/" + enc + "/rollback", "POST", { version: r.version }))));
    }
  });
  if (!dnsShown || dnsShown.app !== name ||
      !domains.some((d) => d.hostname === dnsShown.hostname)) showDns(null);
  const ul = $("#domains");
  ul.replaceChildren();
  for (const d of domains) {
    const li = document.createElement("li");
    li.dataset.hostname = d.hostname;
    li.textContent = d.hostname + (d.builtin ? " (built in)" : "") + " ";
    const cert = certs && certs.find((c) => c.hostname === d.hostname);
    if (cert) {
      const state = document.createElement("span");
      state.className = "domain-state state-" + cert.state;
      state.dataset.state = cert.state;
      state.textContent = certState(cert);
      li.appendChild(document.createTextNode("— "));
      li.appendChild(state);
      li.appendChild(document.createTextNode(" "));
    }
    if (!d.builtin) {
      li.appendChild(confirmButton("Remove", "Confirm: remove " + d.hostname,
        () => act("Removed " + d.hostname, () => api("/apps/" + enc + "/domains/" +
          encodeURIComponent(d.hostname), "DELETE"))));
    }
    ul.appendChild(li);
  }
  fill("#config", Object.entries(config.vars), (tr, [k, v]) => {
    tr.dataset.key = k;
    cell(tr, k);
    const value = cell(tr, "••••••••", "masked");
    const btn = document.createElement("button");
    btn.textContent = "Reveal";
    btn.addEventListener("click", () => {
      const masked = value.className === "masked";
      value.textContent = masked ? v : "••••••••";
      value.className = masked ? "revealed" : "masked";
      btn.textContent = masked ? "Hide" : "Reveal";
    });
    cell(tr, "").appendChild(btn);
    cell(tr, "").appendChild(confirmButton("Unset", "Confirm: unset " + k, () => act(
      "Unset " + k + " (new release)",
      () => api("/apps/" + enc + "/config", "PATCH", { [k]: null }))));
  });
  show("#app-view");
  followLog(enc);
  loadStats(enc);
  loadAddons(enc);
  loadBackups(enc);
  loadRuns(enc);
}

// Add-ons, backups and run sessions come from parts of the api that may be missing
// (no add-on or backup node): each section says so by itself; the page stays usable.
async function loadAddons(enc) {
  const name = current;
  let addons;
  try {
    addons = await api("/apps/" + enc + "/addons");
  } catch (e) {
    fill("#addons", [], () => {});
    $("#addons-empty").hidden = false;
    $("#addons-empty").textContent = "Add-ons unavailable: " + e.message;
    return;
  }
  fill("#addons", addons, (tr, a) => {
    tr.dataset.kind = a.kind;
    cell(tr, a.kind); cell(tr, a.plan); cell(tr, a.state, "state-" + a.state);
    cell(tr, a.config_var);
    cell(tr, a.host ? a.host + ":" + a.port + (a.database ? "/" + a.database : "") : a.node);
    cell(tr, ago(a.created));
    cell(tr, "").appendChild(typedConfirm("Destroy " + a.kind, name, "Destroy " + a.kind +
      " and its data", () => act((r) => "Destroyed " + a.kind + (r && r.final_backup
        ? " (final backup " + (r.final_backup.id || "") + " kept)" : ""),
      () => api("/apps/" + enc + "/addons/" + encodeURIComponent(a.kind), "DELETE"),
      "Destroying " + a.kind + " (a final backup first)...")));
  });
  $("#addons-empty").hidden = addons.length > 0;
  $("#addons-empty").textContent = "No add-ons.";
}

async function loadBackups(enc) {
  const name = current;
  let backups;
  try {
    backups = await api("/apps/" + enc + "/backups");
  } catch (e) {
    fill("#backups", [], () => {});
    $("#backups-empty").hidden = false;
    $("#backups-empty").textContent = "Backups unavailable: " + e.message;
    return;
  }
  fill("#backups", backups, (tr, b) => {
    tr.dataset.backup = b.id;
    cell(tr, b.id); cell(tr, b.kind);
    cell(tr, b.status === "verified" ? "verified" + (b.pinned ? " (kept: " + b.pinned + ")" : "")
      : b.status === "running" ? "running" : "FAILED" + (b.error ? ": " + b.error : ""),
      "state-" + b.status);
    cell(tr, ago(b.created)); cell(tr, humanSize(b.size));
    cell(tr, b.suspicious ? "FLAGGED: " + b.suspicious : "-");
    const dl = cell(tr, "");
    const rs = cell(tr, "");
    if (b.status === "verified") {
      dl.appendChild(button("Download", () => download(enc, b), "download"));
      rs.appendChild(typedConfirm("Restore", name, "Replace " + name + "'s data with " + b.id,
        () => act((r) => "Restored backup " + b.id + " into " + r.into +
          (r.kept_as ? "; the previous data is kept as " + r.kept_as : ""),
        () => api("/apps/" + enc + "/backups/" + encodeURIComponent(b.id) + "/restore",
          "POST", {}), "Restoring " + b.id + "...")));
    }
  });
  $("#backups-empty").hidden = backups.length > 0;
  $("#backups-empty").textContent = "No backups yet.";
}

// A download needs the Authorization header, so it is fetched here and handed to the
// browser as a blob (a plain link would need the token in its URL).
async function download(enc, b) {
  $("#error").textContent = "";
  $("#notice").textContent = "Downloading " + b.id + "...";
  try {
    const resp = await fetch(API + "/apps/" + enc + "/backups/" + encodeURIComponent(b.id) +
      "/download", { headers: { "Authorization": "Bearer " + token() } });
    if (!resp.ok) {
      let msg = resp.statusText;
      try { msg = (await resp.json()).error.message; } catch (e) { /* not JSON */ }
      throw new Error(msg);
    }
    const blob = await resp.blob();
    const disp = resp.headers.get("Content-Disposition") || "";
    const m = disp.match(/filename="([^"]+)"/);
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = m ? m[1] : b.id + ".dump";
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 60000);
    $("#notice").textContent = "Downloaded " + a.download + " (" + humanSize(blob.size) +
      "; sha256 " + (resp.headers.get("X-Backup-Sha256") || "-").slice(0, 12) + ")";
  } catch (e) {
    $("#notice").textContent = "";
    $("#error").textContent = "download failed: " + e.message;
  }
}

async function loadRuns(enc) {
  let runs;
  try {
    runs = await api("/apps/" + enc + "/runs?history=true");
  } catch (e) {
    fill("#runs", [], () => {});
    $("#runs-empty").hidden = false;
    $("#runs-empty").textContent = "Run sessions unavailable: " + e.message;
    return;
  }
  fill("#runs", runs, (tr, r) => {
    tr.dataset.run = String(r.number);
    cell(tr, "run." + r.number); cell(tr, r.kind); cell(tr, r.user); cell(tr, when(r.started));
    cell(tr, when(r.ended));
    cell(tr, r.exit_signal ? "killed by " + r.exit_signal
      : r.exit_status !== null && r.exit_status !== undefined ? "exit " + r.exit_status : r.state);
    cell(tr, r.command, "command");
  });
  $("#runs-empty").hidden = runs.length > 0;
}

// Charts of the stats API (what `epio stats` shows), one SVG each with labelled axes
// and units, over the window chosen in #stats-window; built with DOM calls (the page's
// CSP allows no inline script or style).
const WINDOWS = { "15m": [900, "last 15 minutes"], "1h": [3600, "last hour"],
                  "6h": [21600, "last 6 hours"], "1d": [86400, "last day"],
                  "7d": [604800, "last 7 days"] };
const NS = "http://www.w3.org/2000/svg";

async function loadStats(enc) {
  const key = $("#stats-window").value in WINDOWS ? $("#stats-window").value : "1h";
  const [span, label] = WINDOWS[key];
  let body;
  try {
    body = await api("/apps/" + enc + "/stats?since=" + key);
  } catch (e) {
    $("#stats-note").textContent = e.status === 503 ? "stats unavailable" : e.message;
    return;
  }
  const res = body.resolution || 10;
  const until = Date.now() / 1000, since = until - span;
  const series = body.series || {};
  const rate = (pts) => pts.map(([t, v]) => [t, v / res]);
  // per process type: the sum of its instances' gauge at each time
  const perType = (gauge, scale) => {
    const byType = {};
    for (const [name, pts] of Object.entries(series)) {
      const [metric, instance] = name.split(":");
      if (metric !== gauge || !instance) continue;
      const type = instance.split(/[.@]/)[0];
      const sums = byType[type] || (byType[type] = new Map());
      for (const [t, v] of pts) sums.set(t, (sums.get(t) || 0) + v * scale);
    }
    return Object.keys(byType).sort().map((t) => [t, Array.from(byType[t].entries())
      .sort((a, b) => a[0] - b[0])]);
  };
  const charts = [
    { id: "stats-chart", title: "Requests", unit: "req/s",
      lines: [["requests", rate(series.requests || [])]] },
    { id: "latency-chart", title: "Latency", unit: "ms",
      lines: [["p50", series.latency_p50_ms || []], ["p99", series.latency_p99_ms || []]] },
    { id: "errors-chart", title: "5xx responses", unit: "req/s",
      lines: [["5xx", rate(series.status_5xx || [])]] },
    { id: "memory-chart", title: "Memory per process type", unit: "MiB",
      lines: perType("memory_bytes", 1 / (1024 * 1024)) },
    { id: "cpu-chart", title: "CPU per process type", unit: "% of a core",
      lines: perType("cpu_percent", 1) },
  ];
  const box = $("#charts");
  for (const c of charts) {
    let fig = document.getElementById(c.id + "-figure");
    if (!fig) {
      fig = document.createElement("figure");
      fig.id = c.id + "-figure";
      const cap = document.createElement("figcaption");
      const svg = document.createElementNS(NS, "svg");
      svg.id = c.id;
      svg.setAttribute("viewBox", "0 0 " + CW + " " + CH);
      svg.setAttribute("role", "img");
      fig.append(cap, svg);
      box.appendChild(fig);
    }
    fig.querySelector("figcaption").textContent = c.title + " (" + c.unit + "), " + label +
      ", " + res + " s buckets";
    drawChart(document.getElementById(c.id), c, since, until);
  }
  const total = (series.requests || []).reduce((n, p) => n + p[1], 0);
  const peak = Math.max(0, ...(series.requests || []).map((p) => p[1]));
  $("#stats-note").textContent = total + (total === 1 ? " request" : " requests") + " in the " +
    label + " (peak " + peak + " per " + res + " s).";
}

const CW = 640, CH = 180, PAD = { left: 56, right: 12, top: 10, bottom: 34 };
const COLOURS = ["#1d3557", "#e63946", "#2a9d8f", "#e9c46a", "#6d597a", "#f4a261"];

function niceMax(v) {
  if (v <= 0) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function fmt(v) {
  if (v === 0) return "0";
  if (Math.abs(v) >= 1000) return v.toFixed(0);
  return String(Number(v.toPrecision(3)));
}

function svgEl(svg, tag, attrs, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  svg.appendChild(el);
  return el;
}

function drawChart(svg, chart, since, until) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const points = chart.lines.reduce((n, [, pts]) => n + pts.length, 0);
  svg.dataset.points = String(points);
  const W = CW - PAD.left - PAD.right, H = CH - PAD.top - PAD.bottom;
  const top = niceMax(Math.max(0, ...chart.lines.flatMap(([, pts]) => pts.map((p) => p[1]))));
  const x = (t) => PAD.left + Math.min(1, Math.max(0, (t - since) / (until - since))) * W;
  const y = (v) => PAD.top + H - (v / top) * H;
  const summary = [];
  // axes, grid and tick labels
  svgEl(svg, "line", { x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: PAD.top + H, class: "axis" });
  svgEl(svg, "line", { x1: PAD.left, y1: PAD.top + H, x2: PAD.left + W, y2: PAD.top + H,
                       class: "axis" });
  for (let i = 0; i <= 4; i++) {
    const v = (top * i) / 4;
    if (i) svgEl(svg, "line", { x1: PAD.left, y1: y(v), x2: PAD.left + W, y2: y(v), class: "grid" });
    svgEl(svg, "text", { x: PAD.left - 4, y: y(v) + 4, "text-anchor": "end", class: "tick" }, fmt(v));
  }
  const span = until - since;
  for (let i = 0; i <= 4; i++) {
    const t = since + (span * i) / 4;
    const d = new Date(t * 1000).toISOString();
    const text = span > 86400 ? d.slice(5, 10) + " " + d.slice(11, 16) : d.slice(11, 16);
    svgEl(svg, "text", { x: x(t), y: PAD.top + H + 14, "text-anchor": i === 0 ? "start"
      : i === 4 ? "end" : "middle", class: "tick" }, text);
  }
  svgEl(svg, "text", { x: PAD.left + W / 2, y: CH - 4, "text-anchor": "middle", class: "label" },
        "time (UTC)");
  svgEl(svg, "text", { x: 12, y: PAD.top + H / 2, "text-anchor": "middle", class: "label",
                       transform: "rotate(-90 12 " + (PAD.top + H / 2) + ")" }, chart.unit);
  chart.lines.forEach(([name, pts], i) => {
    const colour = COLOURS[i % COLOURS.length];
    if (pts.length) {
      const coords = pts.map(([t, v]) => x(t).toFixed(1) + "," + y(v).toFixed(1));
      if (pts.length === 1) {
        svgEl(svg, "circle", { cx: x(pts[0][0]), cy: y(pts[0][1]), r: 3, fill: colour });
      } else {
        svgEl(svg, "polyline", { points: coords.join(" "), fill: "none", stroke: colour,
                                 "stroke-width": 2, class: "series", "data-series": name });
      }
      const last = pts[pts.length - 1][1], max = Math.max(...pts.map((p) => p[1]));
      summary.push(name + ": last " + fmt(last) + " " + chart.unit + ", max " + fmt(max) + " " +
                   chart.unit);
    }
    // legend
    const lx = PAD.left + 8 + i * 90;
    svgEl(svg, "rect", { x: lx, y: PAD.top + 2, width: 10, height: 10, fill: colour });
    svgEl(svg, "text", { x: lx + 14, y: PAD.top + 11, class: "legend" }, name);
  });
  if (!points) {
    svgEl(svg, "text", { x: PAD.left + W / 2, y: PAD.top + H / 2, "text-anchor": "middle",
                         class: "empty" }, "no data in this window");
  }
  svg.setAttribute("aria-label", chart.title + " in " + chart.unit + ": " +
                   (summary.join("; ") || "no data in this window"));
}

// The live log: a websocket on the logs endpoint. Browsers cannot put the token in
// an Authorization header on a websocket, so it travels as a subprotocol
// ("epio.bearer.<token>"); the server selects "epio.v1" and never echoes it.
// Lines are kept as records; the view shows those matching the source and text
// filters; paused, it stops redrawing (new lines are counted, kept and shown on resume).
let tail = null;
const MAX_LOG_LINES = 2000;
let logLines = [];
let paused = false;
let unseen = 0;
let logApp = null;

function stopLog() {
  if (tail !== null) { const ws = tail; tail = null; ws.onclose = null; ws.close(); }
}

const stamp = (ts) => new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 19);

function logMatches(l) {
  const src = $("#log-source").value;
  if (src) {
    const kind = src.slice(0, src.indexOf(":")), want = src.slice(src.indexOf(":") + 1);
    if (kind === "source" && l.source !== want) return false;
    if (kind === "type" && (l.source || "").split(/[.@]/)[0] !== want) return false;
  }
  const text = $("#log-text").value.toLowerCase();
  return !text || (l.source + " " + l.text).toLowerCase().includes(text);
}

function updateSources() {
  const sel = $("#log-source");
  const have = new Set(Array.from(sel.options).map((o) => o.value));
  const sources = new Set(logLines.filter((l) => l.source).map((l) => l.source));
  const types = new Set(Array.from(sources).map((s) => s.split(/[.@]/)[0])
    .filter((t) => !sources.has(t)));
  for (const t of Array.from(types).sort()) {
    if (have.has("type:" + t)) continue;
    const o = document.createElement("option");
    o.value = "type:" + t; o.textContent = t + " (every process)";
    sel.appendChild(o);
  }
  for (const s of Array.from(sources).sort()) {
    if (have.has("source:" + s)) continue;
    const o = document.createElement("option");
    o.value = "source:" + s; o.textContent = s;
    sel.appendChild(o);
  }
}

function renderLog() {
  if (paused) {
    $("#log-status").textContent = "paused" + (unseen ? ", " + unseen + " new lines" : "");
    return;
  }
  unseen = 0;
  updateSources();
  const shown = logLines.filter(logMatches).map((l) => l.note ? l.note
    : [stamp(l.timestamp), l.source, l.text].join(" "));
  const log = $("#log");
  const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  log.textContent = shown.join("\n") || (logLines.length ? "(no line matches the filter)"
    : "(no log lines yet)");
  if (atEnd) log.scrollTop = log.scrollHeight;
  $("#log-status").textContent = shown.length === logLines.length ? ""
    : shown.length + " of " + logLines.length + " lines shown";
}

function togglePause() {
  paused = !paused;
  $("#log-pause").textContent = paused ? "Resume" : "Pause";
  $("#log-pause").setAttribute("aria-pressed", String(paused));
  $("#log").dataset.paused = String(paused);
  renderLog();
}

function addLines(lines) {
  logLines.push(...lines);
  if (paused) unseen += lines.length;
  if (logLines.length > MAX_LOG_LINES) logLines = logLines.slice(-MAX_LOG_LINES);
  renderLog();
}

function followLog(enc) {
  stopLog();
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  let ws;
  logLines = [];
  unseen = 0;
  if (logApp !== enc) {  // another app: its own sources
    logApp = enc;
    const sel = $("#log-source");
    while (sel.options.length > 1) sel.remove(1);
  }
  try {
    ws = new WebSocket(scheme + location.host + API + "/apps/" + enc + "/logs?n=200",
                       ["epio.v1", "epio.bearer." + token()]);
  } catch (e) {
    loadLog(enc);
    return;
  }
  tail = ws;
  ws.onmessage = (ev) => {
    const msg = JSON.parse(ev.data);
    if (msg.type === "lines") {
      addLines(msg.lines.map((l) => ({ timestamp: l.timestamp, source: l.source, text: l.text })));
    } else if (msg.type === "missed") {
      addLines([{ note: "... " + msg.count + " lines not shown (this page fell behind)" }]);
    } else if (msg.type === "ready") {
      $("#log").dataset.live = "true";
    } else if (msg.type === "error" || msg.type === "notice") {
      addLines([{ note: "[" + msg.message + "]" }]);
    }
  };
  ws.onclose = () => { if (tail === ws) { tail = null; delete $("#log").dataset.live; } };
  renderLog();
}

async function loadLog(enc) {
  try {
    const body = await api("/apps/" + enc + "/logs?n=200");
    const lines = Array.isArray(body) ? body : (body.lines || []);
    logLines = lines.map((l) => Array.isArray(l)
      ? { timestamp: l[1], source: l[2], text: l[3] }
      : { timestamp: l.timestamp, source: l.source, text: l.text });
    renderLog();
  } catch (e) {
    if (e.status !== 404) $("#log").textContent = "log unavailable: " + e.message;
  }
}

// --- deploy by upload: the same endpoint as `epio deploy` (POST .../deploys, a gzip
// tarball as the body), then the deploy followed as the CLI follows it.

const DEFAULT_IGNORES = [".git/", ".hg/", ".svn/", "__pycache__/", "*.py[co]", ".epio-app"];

// .epioignore in gitignore syntax, as epio/appdir.py reads it
function globToRegex(pat) {
  let out = "";
  for (let i = 0; i < pat.length;) {
    const c = pat[i];
    if (pat.startsWith("**/", i)) { out += "(?:.*/)?"; i += 3; }
    else if (pat.startsWith("/**", i) && i + 3 === pat.length) { out += "/.*"; i += 3; }
    else if (pat.startsWith("**", i)) { out += ".*"; i += 2; }
    else if (c === "*") { out += "[^/]*"; i += 1; }
    else if (c === "?") { out += "[^/]"; i += 1; }
    else if (c === "[") {
      const j = pat.indexOf("]", "!^".includes(pat[i + 1]) ? i + 2 : i + 1);
      if (j === -1) { out += "\\["; i += 1; continue; }
      let body = pat.slice(i + 1, j);
      if ("!^".includes(body[0])) body = "^" + body.slice(1);
      out += "[" + body.replace(/\\/g, "\\\\") + "]";
      i = j + 1;
    } else if (c === "\\" && i + 1 < pat.length) {
      out += pat[i + 1].replace(/[.*+?^${}()|[\]\\/]/g, "\\$&"); i += 2;
    } else { out += c.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&"); i += 1; }
  }
  return out;
}

function ignoreRules(lines) {
  const rules = [];
  for (let line of lines) {
    while (line.endsWith(" ") && !line.endsWith("\\ ")) line = line.slice(0, -1);
    if (!line || line.startsWith("#")) continue;
    let negate = false;
    if (line.startsWith("!")) { negate = true; line = line.slice(1); }
    else if (line.startsWith("\\!") || line.startsWith("\\#")) line = line.slice(1);
    const dirOnly = line.endsWith("/");
    line = line.replace(/\/+$/, "");
    if (!line) continue;
    const anchored = line.includes("/");
    line = line.replace(/^\/+/, "");
    rules.push({ re: new RegExp("^" + (anchored ? "" : "(?:.*/)?") + globToRegex(line) + "$", "s"),
                 negate, dirOnly });
  }
  const ignored = (rel, isDir) => {
    let result = false;
    for (const r of rules) if ((!r.dirOnly || isDir) && r.re.test(rel)) result = !r.negate;
    return result;
  };
  // as in git, a file inside an excluded directory cannot be re-included
  return (rel) => {
    const parts = rel.split("/");
    for (let i = 1; i < parts.length; i++) if (ignored(parts.slice(0, i).join("/"), true)) return true;
    return ignored(rel, false);
  };
}

function octal(n, width) { return n.toString(8).padStart(width - 1, "0") + "\0"; }

// One ustar header: the name split into prefix/name when longer than 100 bytes.
function tarHeader(path, size, mtime) {
  const enc = new TextEncoder();
  let name = enc.encode(path), prefix = new Uint8Array(0);
  if (name.length > 100) {
    const cut = path.lastIndexOf("/", path.length - 1);
    for (let i = cut; i > 0; i = path.lastIndexOf("/", i - 1)) {
      const p = enc.encode(path.slice(0, i)), n = enc.encode(path.slice(i + 1));
      if (p.length <= 155 && n.length <= 100) { prefix = p; name = n; break; }
    }
    if (name.length > 100) throw new Error("path too long for a tarball: " + path);
  }
  const h = new Uint8Array(512);
  const put = (off, bytes) => h.set(bytes, off);
  put(0, name);
  put(100, enc.encode(octal(0o644, 8)));
  put(108, enc.encode(octal(0, 8)));
  put(116, enc.encode(octal(0, 8)));
  put(124, enc.encode(octal(size, 12)));
  put(136, enc.encode(octal(Math.floor(mtime / 1000), 12)));
  put(148, enc.encode("        "));
  h[156] = 0x30;  // "0": a regular file
  put(257, enc.encode("ustar\0"));
  put(263, enc.encode("00"));
  put(345, prefix);
  let sum = 0;
  for (const b of h) sum += b;
  put(148, enc.encode(sum.toString(8).padStart(6, "0") + "\0 "));
  return h;
}

// The files of an <input webkitdirectory> as the CLI would pack that directory:
// paths relative to the chosen directory, .epioignore honoured. (Browsers do not
// expose file modes or symlinks: every file is packed as a plain 0644 file.)
async function packDirectory(files) {
  const list = Array.from(files).map((f) => ({ f, rel: f.webkitRelativePath.split("/").slice(1).join("/") }))
    .filter((e) => e.rel);
  const ignoreFile = list.find((e) => e.rel === ".epioignore");
  const lines = DEFAULT_IGNORES.slice();
  if (ignoreFile) lines.push(...(await ignoreFile.f.text()).split(/\r?\n/));
  const ignored = ignoreRules(lines);
  const kept = list.filter((e) => !ignored(e.rel)).sort((a, b) => a.rel < b.rel ? -1 : 1);
  const parts = [];
  for (const e of kept) {
    parts.push(tarHeader(e.rel, e.f.size, e.f.lastModified || Date.now()));
    parts.push(new Uint8Array(await e.f.arrayBuffer()));
    const pad = (512 - (e.f.size % 512)) % 512;
    if (pad) parts.push(new Uint8Array(pad));
  }
  parts.push(new Uint8Array(1024));
  return { tar: new Blob(parts), count: kept.length, skipped: list.length - kept.length };
}

async function gzip(blob) {
  if (typeof CompressionStream === "undefined") {
    throw new Error("this browser cannot gzip (no CompressionStream): upload a .tar.gz instead");
  }
  return await new Response(blob.stream().pipeThrough(new CompressionStream("gzip"))).blob();
}

async function deployBody() {
  const file = $("#deploy-file").files[0];
  const dir = $("#deploy-dir").files;
  if (file) {
    const head = new Uint8Array(await file.slice(0, 2).arrayBuffer());
    const gz = head[0] === 0x1f && head[1] === 0x8b;
    return { body: gz ? file : await gzip(file), what: file.name };
  }
  if (dir && dir.length) {
    const packed = await packDirectory(dir);
    if (!packed.count) throw new Error("nothing to deploy: every file of that directory is ignored");
    const top = dir[0].webkitRelativePath.split("/")[0];
    return { body: await gzip(packed.tar), what: top + "/ (" + packed.count + " files" +
      (packed.skipped ? ", " + packed.skipped + " ignored" : "") + ")" };
  }
  throw new Error("choose a tarball or a directory to deploy");
}

const DEPLOY_FINAL = ["succeeded", "failed", "cancelled"];

async function deploy(ev) {
  ev.preventDefault();
  const name = current, enc = encodeURIComponent(name);
  const log = $("#deploy-log");
  $("#error").textContent = "";
  $("#notice").textContent = "";
  $("#deploy").disabled = true;
  log.hidden = false;
  log.textContent = "";
  const say = (text) => { log.textContent += text; log.scrollTop = log.scrollHeight; };
  try {
    const { body, what } = await deployBody();
    say("Uploading " + what + ", " + humanSize(body.size) + "...\n");
    const resp = await fetch(API + "/apps/" + enc + "/deploys", {
      method: "POST", body,
      headers: { "Authorization": "Bearer " + token(), "Content-Type": "application/gzip",
                 "Accept": "application/json" },
    });
    let d = null;
    try { d = await resp.json(); } catch (e) { d = null; }
    if (!resp.ok) {
      const err = (d && d.error) || {};
      throw new Error((err.message || resp.statusText) + (err.code === "payload_too_large"
        ? " (leave big files out of the upload with an .epioignore file)" : ""));
    }
    say("Uploaded; deploy " + d.id.slice(0, 12) + "\n");
    let offset = 0;
    for (;;) {
      d = await api("/apps/" + enc + "/deploys/" + encodeURIComponent(d.id) +
        "?log_offset=" + offset);
      if (d.log) say(d.log);
      offset = d.log_offset;
      if (DEPLOY_FINAL.includes(d.status)) break;
      if (current !== name) return;  // the page moved on
      await new Promise((r) => setTimeout(r, 500));
    }
    $("#deploy-file").value = "";
    $("#deploy-dir").value = "";
    if (d.status !== "succeeded") throw new Error("deploy failed: " + (d.reason || d.status));
    await showApp(name);
    $("#notice").textContent = "Deployed v" + d.release + (d.url ? " at " + d.url : "");
  } catch (e) {
    $("#error").textContent = e.message;
  } finally {
    $("#deploy").disabled = false;
  }
}

// A restart is a new release with the same code and config, rolled out like a config
// change: the new processes serve before the old ones stop (start-first types).
function restart(type) {
  const what = type ? type + " processes" : "every process";
  return act((r) => "Restarting " + what + ": v" + r.version + " rolls out on new processes",
    () => api("/apps/" + encodeURIComponent(current) + "/restart", "POST",
      type ? { type } : {}), "Restarting " + what + "...");
}

function go(href) {
  history.pushState(null, "", href);
  route();
}

let refresh = null;

async function route() {
  $("#error").textContent = "";
  stopLog();
  if (refresh !== null) { clearTimeout(refresh); refresh = null; }
  if (!token()) {
    $("#whoami").textContent = "";
    $("#signout").hidden = true;
    show("#signin-view");
    return;
  }
  try {
    const me = await api("/user");
    $("#whoami").textContent = me.name;
    $("#signout").hidden = false;
    const m = location.pathname.match(/^\/dashboard\/apps\/([^/]+)\/?$/);
    if (m) {
      await showApp(decodeURIComponent(m[1]));
      refresh = setTimeout(() => refreshApp(decodeURIComponent(m[1])), 5000);
    } else {
      await showApps();
      refresh = setTimeout(route, 5000);
    }
  } catch (e) {
    if (e.status === 401) { localStorage.removeItem(TOKEN_KEY); show("#signin-view");
      $("#signin-error").textContent = e.message; return; }
    $("#error").textContent = e.message;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#signin-form").addEventListener("submit", signIn);
  $("#signout").addEventListener("click", signOut);
  $("#config-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = $("#config-key").value.trim();
    const value = $("#config-value").value;
    act("Set " + key + " (new release)", async () => {
      await api("/apps/" + encodeURIComponent(current) + "/config", "PATCH", { [key]: value });
      $("#config-key").value = ""; $("#config-value").value = "";
    });
  });
  $("#domain-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const host = $("#domain-host").value.trim();
    showDns(null);
    act((added) => "Added " + added.hostname + (added.dns.state === "ok" ? "; DNS is in place"
      : added.dns.state === "pending_dns" ? "; create the DNS records below" : ""),
    async () => {
      const added = await api("/apps/" + encodeURIComponent(current) + "/domains", "POST",
        { hostname: host });
      $("#domain-host").value = "";
      showDns(added);
      return added;
    });
  });
  $("#restart-all").addEventListener("click", () => restart(null));
  $("#deploy-form").addEventListener("submit", deploy);
  // one source at a time: choosing a tarball forgets the directory, and back
  $("#deploy-file").addEventListener("change", () => { $("#deploy-dir").value = ""; });
  $("#deploy-dir").addEventListener("change", () => { $("#deploy-file").value = ""; });
  $("#addon-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const kind = $("#addon-kind").value, plan = $("#addon-plan").value;
    act((a) => "Created " + a.kind + " (" + a.plan + "); " + a.config_var +
      " is set in a new release",
    () => api("/apps/" + encodeURIComponent(current) + "/addons", "POST",
      plan ? { kind, plan } : { kind }), "Creating " + kind + "...");
  });
  $("#backup-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const kind = $("#backup-kind").value;
    act((made) => {
      const bad = made.filter((b) => b.status !== "verified");
      return bad.length ? bad.length + " backup(s) FAILED verification; they do not count"
        : "Backed up: " + made.map((b) => b.kind + " " + b.id).join(", ") + " (verified)";
    }, () => api("/apps/" + encodeURIComponent(current) + "/backups", "POST",
      kind ? { kind } : {}), "Backing up (waits for verification)...");
  });
  $("#stats-window").addEventListener("change", () => loadStats(encodeURIComponent(current)));
  $("#log-source").addEventListener("change", renderLog);
  $("#log-text").addEventListener("input", renderLog);
  $("#log-pause").addEventListener("click", togglePause);
  window.addEventListener("popstate", route);
  const linked = () => signInWithLink().then(async (failed) => {
    await route();
    if (failed) $(token() ? "#error" : "#signin-error").textContent = failed;
  });
  // a link opened where the page already is only changes the fragment
  window.addEventListener("hashchange", () => { if (location.hash) linked(); });
  linked();
});
