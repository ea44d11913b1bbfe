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

async function act(what, call) {
  $("#error").textContent = "";
  $("#notice").textContent = "";
  try {
    await call();
  } catch (e) {
    $("#error").textContent = e.message;
    return;
  }
  await showApp(current);  // the view shows the change when the notice says it
  $("#notice").textContent = what;
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

async function showApp(name) {
  current = name;
  const enc = encodeURIComponent(name);
  const [app, ps, releases, domains, config, formation] = await Promise.all([
    api("/apps/" + enc), api("/apps/" + enc + "/ps"), api("/apps/" + enc + "/releases"),
    api("/apps/" + enc + "/domains"), api("/apps/" + enc + "/config"),
    api("/apps/" + enc + "/formation"),
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
    cell(tr, "").appendChild(button("Scale " + p.type, () => act(
      "Scaled " + p.type + " to " + qty.value + " (" + size.value + ")",
      () => api("/apps/" + enc + "/formation", "PATCH", { processes: {
        [p.type]: { quantity: Number(qty.value), size: size.value } } }))));
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
  const ul = $("#domains");
  ul.replaceChildren();
  for (const d of domains) {
    const li = document.createElement("li");
    li.dataset.hostname = d.hostname;
    li.textContent = d.hostname + (d.builtin ? " (built in)" : "") + " ";
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
}

// Requests per 10 s over the last hour, from the stats API, as an SVG line (built
// with DOM calls: nothing here needs inline script or style).
async function loadStats(enc) {
  try {
    const body = await api("/apps/" + enc + "/stats?metric=requests&since=1h&resolution=10");
    drawChart($("#stats-chart"), (body.series || {}).requests || []);
  } catch (e) {
    $("#stats-note").textContent = e.status === 503 ? "stats unavailable" : e.message;
  }
}

function drawChart(svg, points) {
  const NS = "http://www.w3.org/2000/svg";
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  svg.dataset.points = String(points.length);
  if (!points.length) {
    $("#stats-note").textContent = "no requests in the last hour";
    return;
  }
  const W = 600, H = 80;
  const t0 = points[0][0], t1 = points[points.length - 1][0];
  const max = Math.max(1, ...points.map((p) => p[1]));
  const x = (t) => (t1 === t0 ? W : ((t - t0) / (t1 - t0)) * W);
  const y = (v) => H - 2 - (v / max) * (H - 4);
  const line = document.createElementNS(NS, "polyline");
  line.setAttribute("points", points.map(([t, v]) => x(t).toFixed(1) + "," + y(v).toFixed(1))
    .join(" "));
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "currentColor");
  line.setAttribute("stroke-width", "2");
  svg.appendChild(line);
  const total = points.reduce((n, p) => n + p[1], 0);
  $("#stats-note").textContent = total + " requests in the last hour (peak " + max +
    " per 10 s)";
}

// The live log: a websocket on the logs endpoint. Browsers cannot put the token in
// an Authorization header on a websocket, so it travels as a subprotocol
// ("epio.bearer.<token>"); the server selects "epio.v1" and never echoes it.
let tail = null;
const MAX_LOG_LINES = 1000;

function stopLog() {
  if (tail !== null) { const ws = tail; tail = null; ws.onclose = null; ws.close(); }
}

function followLog(enc) {
  stopLog();
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const when = (ts) => new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 19);
  const shown = [];
  let ws;
  try {
    ws = new WebSocket(scheme + location.host + API + "/apps/" + enc + "/logs?n=200",
                       ["epio.v1", "epio.bearer." + token()]);
  } catch (e) {
    loadLog(enc);
    return;
  }
  tail = ws;
  const render = () => {
    $("#log").textContent = shown.join("\n") || "(no log lines yet)";
    $("#log").scrollTop = $("#log").scrollHeight;
  };
  ws.onmessage = (ev) => {
    const msg = JSON.parse(ev.data);
    if (msg.type === "lines") {
      for (const l of msg.lines) shown.push([when(l.timestamp), l.source, l.text].join(" "));
    } else if (msg.type === "missed") {
      shown.push("... " + msg.count + " lines not shown (this page fell behind)");
    } else if (msg.type === "ready") {
      $("#log").dataset.live = "true";
    } else if (msg.type === "error" || msg.type === "notice") {
      shown.push("[" + msg.message + "]");
    }
    while (shown.length > MAX_LOG_LINES) shown.shift();
    render();
  };
  ws.onclose = () => { if (tail === ws) { tail = null; delete $("#log").dataset.live; } };
  render();
}

async function loadLog(enc) {
  try {
    const body = await api("/apps/" + enc + "/logs?n=200");
    const lines = Array.isArray(body) ? body : (body.lines || []);
    const when = (ts) => new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 19);
    $("#log").textContent = lines.map((l) => Array.isArray(l)
      ? [when(l[1]), l[2], l[3]].join(" ")
      : [when(l.timestamp), l.source, l.text].join(" ")).join("\n") || "(no log lines yet)";
  } catch (e) {
    if (e.status !== 404) $("#log").textContent = "log unavailable: " + e.message;
  }
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
    act("Added " + host + "; point its DNS at the routers", async () => {
      await api("/apps/" + encodeURIComponent(current) + "/domains", "POST", { hostname: host });
      $("#domain-host").value = "";
    });
  });
  window.addEventListener("popstate", route);
  route();
});
