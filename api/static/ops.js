// The operator console: overview (fleet counts, charts, live events with backfill, recent commands), the
// device list (search, filter, sort, pages: done by the API), a device's page (fields, actions, commands,
// presence, revoke), a command's page (timeline, who issued it, cancel) and fleet rollouts. Views are
// picked by the URL's hash (#/devices?filter=offline, #/device/<id>, #/command/<id>, #/fleet).
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = {succeeded: "#11632a", failed: "#a61b1b", rejected: "#c2410c", timed_out: "#7c3aed",
                expired: "#596072", cancelled: "#9aa1ad", queued: "#2457d6", sent: "#0e7490", received: "#0891b2"};
const STAGE_COLORS = {dispatch: "#2457d6", delivery: "#0e7490", actuation: "#c2410c", total: "#1d2330"};
const STATUS_ORDER = ["queued", "sent", "received", ...FINAL_STATUSES];
const state = {
  view: null, params: new URLSearchParams(), commands: new Map(), stream: null, timers: new Map(),
  devicePage: {offset: 0, rows: [], total: 0}, device: null, command: null, charts: null, lastMsg: null,
};

// ---- small helpers ----------------------------------------------------------------------------------

function later(key, ms, fn) {             // one pending call per key: bursts of events make one request
  if (state.timers.has(key)) return;
  state.timers.set(key, setTimeout(() => { state.timers.delete(key); fn(); }, ms));
}
function pillFor(status) {
  return status === "succeeded" ? "ok" : ["queued", "sent", "received"].includes(status) ? "" : "bad";
}
function pill(status) { return el("span", {class: "pill " + pillFor(status), "data-status": status}, status.replace("_", " ")); }
function ms(t) { return typeof t === "number" ? t : new Date(t).getTime(); }
function latency(c) { return c.final ? `${ms(c.updated_at) - ms(c.created_at)} ms` : ""; }
function clock(t) {
  const d = new Date(t);
  return d.toLocaleTimeString([], {hour12: false}) + "." + String(d.getMilliseconds()).padStart(3, "0");
}
function agoEl(t) { return el("span", {class: "ago", "data-since": t === null ? "" : String(ms(t))}, OpsWords.ago(t === null ? null : ms(t))); }
function field(dl, name, value, key) {
  dl.append(el("dt", {}, name), el("dd", key ? {"data-field": key} : {}, value));
}
function showError(id, e) { $(id).textContent = e ? humanError(e) : ""; }
function banner(text) { $("banner").textContent = text || ""; $("banner").classList.toggle("hidden", !text); }

setInterval(() => {                       // "12 s ago" keeps advancing
  for (const n of document.querySelectorAll(".ago[data-since]")) {
    n.textContent = OpsWords.ago(n.dataset.since ? Number(n.dataset.since) : null);
  }
}, 1000);

// ---- log in -----------------------------------------------------------------------------------------

async function loginWith(fn) {
  $("login-error").textContent = "";
  try {
    await fn();
    const me = await api.call("GET", "/v1/users/me");
    if (me.role !== "operator") throw Object.assign(new Error("This account is not an operator."), {status: 403});
  } catch (e) {
    api.token = null;
    sessionStorage.removeItem("latch-ops-token");
    $("login-error").textContent = e.status === 401 ? "Wrong email, password or token." : humanError(e);
    return;
  }
  sessionStorage.setItem("latch-ops-token", api.token);
  await start();
}

async function start() {
  $("login").classList.add("hidden");
  $("dash").classList.remove("hidden");
  $("nav").classList.remove("hidden");
  window.addEventListener("hashchange", route);
  await route();
  await backfill();
}

// the feed shows the newest events at once, then the stream continues from the last of them
async function backfill() {
  const stream = state.stream = new LiveStream(onEvent, (s) => {
    $("conn").textContent = s === "live" ? "live" : s;
    $("conn").className = "conn " + (s === "live" ? "live" : "down");
    banner(s === "live" || s === "connecting" ? "" : "Connection to Latch lost: retrying. What you see may be out of date.");
    if (s === "live" && state.wasDown) { state.wasDown = false; refreshView(); }
    if (s === "reconnecting") state.wasDown = true;
  });
  try {
    const recent = await api.call("GET", "/v1/ops/events/recent?limit=50");
    for (const ev of recent) addToFeed(ev);
    if (recent.length) stream.lastId = String(recent[recent.length - 1].id);
  } catch (e) { banner("Could not read the recent events: " + humanError(e)); }
  stream.open();
}

// ---- routing ----------------------------------------------------------------------------------------

async function route() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, query] = raw.split("?");
  const parts = path.split("/").map(decodeURIComponent);
  state.params = new URLSearchParams(query || "");
  const views = {"": "overview", devices: "devices", device: "device", command: "command", fleet: "fleet"};
  const view = views[parts[0]] || "overview";
  state.view = view;
  for (const v of document.querySelectorAll(".view")) v.classList.toggle("hidden", v.id !== "view-" + view);
  for (const a of document.querySelectorAll("#nav a")) {
    const on = a.dataset.view === view || (a.dataset.view === "devices" && view === "device");
    if (on) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  document.title = "Latch — " + ({overview: "operations", devices: "devices", device: parts[1] || "device",
                                   command: "command", fleet: "fleet rollouts"}[view]);
  if (view === "overview") await showOverview();
  else if (view === "devices") await showDevices();
  else if (view === "device") await showDevice(parts[1]);
  else if (view === "command") await showCommand(parts[1]);
  else if (view === "fleet") await showFleet();
}

function refreshView() {
  if (state.view === "overview") showOverview();
  else if (state.view === "devices") loadDevices();
  else if (state.view === "device" && state.device) loadDevice(state.device.id);
  else if (state.view === "command" && state.command) loadCommand(state.command.id);
  else if (state.view === "fleet") loadRollouts();
}

// ---- overview ---------------------------------------------------------------------------------------

async function showOverview() {
  await Promise.all([loadSummary(), loadCommands(), loadCharts()]);
}

async function loadSummary() {
  try {
    const s = await api.call("GET", "/v1/ops/summary");
    $("stat-total").textContent = s.total; $("stat-online").textContent = s.online;
    $("stat-offline").textContent = s.offline; $("stat-low").textContent = s.low_battery;
    $("stat-rides").textContent = s.in_ride; $("stat-jammed").textContent = s.jammed;
  } catch (e) { banner("Could not read the fleet counts: " + humanError(e)); }
}

async function loadCommands() {
  try {
    for (const c of (await api.call("GET", "/v1/commands?limit=100")).reverse()) state.commands.set(c.id, c);
  } catch (e) { banner("Could not read the commands: " + humanError(e)); }
  renderCommands();
}

function commandRow(c, withDevice) {
  return el("tr", {"data-command": c.id, "data-status": c.status},
    el("td", {class: "c-time"}, el("a", {href: `#/command/${encodeURIComponent(c.id)}`,
      "aria-label": `${c.action} to ${c.device_id} at ${new Date(c.created_at).toLocaleTimeString()}: timeline`},
      new Date(c.created_at).toLocaleTimeString([], {hour12: false}))),
    withDevice ? el("td", {class: "c-dev"}, el("a", {href: `#/device/${encodeURIComponent(c.device_id)}`}, c.device_id)) : null,
    el("td", {class: "c-act"}, c.action), el("td", {class: "c-st"}, pill(c.status)),
    el("td", {class: "c-lat"}, latency(c)),
    el("td", {class: "c-why"}, c.reason ? OpsWords.reason(c.reason) : ""));
}

function renderCommands() {
  const cs = [...state.commands.values()].sort((a, b) => ms(b.created_at) - ms(a.created_at)).slice(0, 100);
  for (const id of [...state.commands.keys()]) if (!cs.find((c) => c.id === id)) state.commands.delete(id);
  $("commands").replaceChildren(...cs.map((c) => commandRow(c, true)));
  if (!cs.length) $("commands").append(el("tr", {}, el("td", {colspan: 6, class: "muted"}, "No command yet.")));
}

async function loadCharts() {
  let s;
  try { s = await api.call("GET", "/v1/ops/series?minutes=60"); }
  catch (e) { $("charts-note").textContent = "Charts unavailable: " + humanError(e); return; }
  $("charts-note").textContent = `updated ${new Date(s.now).toLocaleTimeString()}` + (s.truncated ? " (busiest commands only)" : "");
  const order = ["succeeded", "failed", "rejected", "timed_out", "expired", "cancelled", "received", "sent", "queued"];
  OpsCharts.stacked($("chart-commands"), {start: s.start, step: s.step_ms, series: s.commands, colors: COLORS, order});
  const lines = [];
  for (const stage of ["dispatch", "delivery", "actuation", "total"]) {
    const l = s.latency_ms[stage];
    lines.push({name: `${stage} p50`, values: l.p50, color: STAGE_COLORS[stage]});
    lines.push({name: `${stage} p99`, values: l.p99, color: STAGE_COLORS[stage], dash: true});
  }
  OpsCharts.lines($("chart-latency"), {start: s.start, step: s.step_ms, lines, unit: "ms",
    label: "Latency per stage, p50 and p99, per minute over the last hour"});
  OpsCharts.lines($("chart-online"), {start: s.start, step: s.step_ms, unit: "",
    lines: [{name: "online", values: s.online, color: "#11632a"}],
    label: `Devices online per minute over the last hour; ${s.online_now} now`});
  state.charts = s;
}
setInterval(() => { if (state.view === "overview" && api.token) loadCharts(); }, 30000);

function describe(ev) {
  const d = ev.data;
  switch (ev.kind) {
    case "command": return `${d.device_id} ${d.action} → ${d.status}${d.reason ? " (" + d.reason + ")" : ""}`;
    case "presence": return `${d.device_id} ${d.online ? "online" : "offline"}`;
    case "lock_state": return `${d.device_id} ${d.locked ? "locked" : "unlocked"}`;
    case "low_battery": return `${d.device_id} battery low: ${d.battery}%`;
    case "ride": return `ride ${String(d.ride_id).slice(0, 8)} on ${d.device_id}: ${d.status}${d.reason ? " (" + d.reason + ")" : ""}`;
    case "fleet": return `rollout ${String(d.fleet_id).slice(0, 8)} ${d.action}: ${d.status}${d.reason ? " (" + d.reason + ")" : ""}`;
    case "notification": return d.silent ? "data message to riders" : `notification to riders: ${d.title}`;
    default: return JSON.stringify(d);
  }
}

function addToFeed(ev) {
  const feed = $("feed");
  if (feed.querySelector(`li[data-id="${ev.id}"]`)) return;
  feed.prepend(el("li", {"data-id": ev.id, "data-kind": ev.kind},
    el("span", {class: "muted"}, `#${ev.id} ${fmtTime(ev.at)} `), el("b", {}, ev.kind), " ", describe(ev)));
  while (feed.children.length > 200) feed.lastChild.remove();
}

// ---- live events ------------------------------------------------------------------------------------

function onEvent(ev) {
  addToFeed(ev);
  const d = ev.data || {};
  if (ev.kind === "command") {
    const c = state.commands.get(d.command_id) || {id: d.command_id, device_id: d.device_id, action: d.action,
      created_at: new Date(d.created_at || ev.at).toISOString(), params: {}};
    Object.assign(c, {status: d.status, final: d.final, reason: d.reason || c.reason, updated_at: new Date(ev.at).toISOString()});
    state.commands.set(c.id, c);
    if (state.commands.size > 1000) state.commands.delete(state.commands.keys().next().value);   // the oldest seen
    if (state.view === "overview") later("commands", 200, renderCommands);
    if (state.view === "device" && state.device && d.device_id === state.device.id) later("dev-cmds", 300, () => loadDeviceCommands(d.device_id));
    if (state.view === "command" && state.command && d.command_id === state.command.id) later("cmd", 150, () => loadCommand(d.command_id));
    if (state.lastMsg && state.lastMsg.id === d.command_id) showActionStatus(d.status, d.reason);
    if (d.final && state.view === "overview") later("charts", 3000, loadCharts);
  }
  if (state.view === "overview" && ["presence", "low_battery", "ride", "command"].includes(ev.kind)) later("summary", 1000, loadSummary);
  if (["presence", "lock_state", "low_battery"].includes(ev.kind)) {
    if (state.view === "device" && state.device && d.device_id === state.device.id) later("dev", 300, () => loadDevice(d.device_id, true));
    if (state.view === "devices") {
      const row = state.devicePage.rows.find((r) => r.id === d.device_id);
      if (row) {
        if (ev.kind === "presence") row.online = d.online;
        if (ev.kind === "lock_state") row.reported.locked = d.locked;
        if (ev.kind === "low_battery") row.reported.battery = d.battery;
        row.last_seen = new Date(ev.at).toISOString();
        later("dev-rows", 300, renderDevices);
      }
      if (ev.kind === "presence") later("dev-list", 3000, loadDevices);   // filters and counts may change
    }
  }
  if (ev.kind === "ride" && state.view === "devices") later("dev-list", 1000, loadDevices);
  if (ev.kind === "fleet" && state.view === "fleet") later("fleet", 300, loadRollouts);
}

// ---- device list ------------------------------------------------------------------------------------

async function showDevices() {
  const p = state.params;
  $("dq").value = p.get("q") || "";
  $("dfilter").value = p.get("filter") || "";
  $("dsort").value = p.get("sort") || "id";
  $("dsize").value = p.get("limit") || "50";
  state.devicePage.offset = Number(p.get("offset") || 0);
  await loadDevices();
}

function deviceQuery() {
  const q = new URLSearchParams();
  if ($("dq").value.trim()) q.set("q", $("dq").value.trim());
  if ($("dfilter").value) q.set("filter", $("dfilter").value);
  if ($("dsort").value !== "id") q.set("sort", $("dsort").value);
  q.set("limit", $("dsize").value);
  if (state.devicePage.offset) q.set("offset", state.devicePage.offset);
  return q;
}

async function loadDevices() {
  const q = deviceQuery();
  const started = performance.now();
  try {
    const {data, response} = await api.request("GET", "/v1/devices?" + q);
    state.devicePage.rows = data;
    state.devicePage.total = Number(response.headers.get("X-Total-Count") || data.length);
    state.devicePage.tookMs = Math.round(performance.now() - started);
    showError("devices-error", null);
  } catch (e) { showError("devices-error", e); return; }
  renderDevices();
}

function renderDevices() {
  const {rows, total, offset} = state.devicePage;
  const size = Number($("dsize").value);
  $("devices").replaceChildren(...rows.map((d) => {
    const b = d.reported.battery;
    const low = typeof b === "number" && b < 20;
    const flags = [d.in_ride ? el("span", {class: "pill"}, "in ride") : null,
      d.jammed ? el("span", {class: "pill bad"}, "jammed") : null,
      d.revoked ? el("span", {class: "pill bad"}, "revoked") : null, low ? el("span", {class: "pill warn"}, "low battery") : null]
      .filter(Boolean);
    return el("tr", {"data-device": d.id, class: "clickable", onclick: (e) => {
      if (e.target.tagName !== "A") location.hash = `#/device/${encodeURIComponent(d.id)}`;
    }},
    el("td", {}, el("a", {href: `#/device/${encodeURIComponent(d.id)}`}, d.id), d.name ? el("span", {class: "muted"}, " " + d.name) : null),
    el("td", {}, el("span", {class: "pill " + (d.online ? "ok" : "bad")}, d.online ? "online" : "offline")),
    el("td", {class: low ? "warn-ink" : ""}, b === undefined ? "unknown" : b + "%"),
    el("td", {}, d.reported.locked === undefined ? "unknown" : (d.reported.locked ? "locked" : "open")),
    el("td", {}, d.online && !d.revoked ? "now" : agoEl(d.last_seen)), el("td", {}, ...flags));
  }));
  const first = total ? offset + 1 : 0;
  const last = Math.min(total, offset + rows.length);
  $("devices-count").textContent = total ? `${first}–${last} of ${total.toLocaleString()} devices` +
    (state.devicePage.tookMs !== undefined ? ` (${state.devicePage.tookMs} ms)` : "") : "No device matches.";
  $("page-info").textContent = total ? `page ${Math.floor(offset / size) + 1} of ${Math.max(1, Math.ceil(total / size))}` : "";
  $("prev-page").disabled = offset <= 0;
  $("next-page").disabled = offset + size >= total;
}

function devicesChanged(resetOffset) {
  if (resetOffset) state.devicePage.offset = 0;
  history.replaceState(null, "", "#/devices?" + deviceQuery());
  later("dev-list-now", 150, loadDevices);
}
$("dq").addEventListener("input", () => devicesChanged(true));
for (const id of ["dfilter", "dsort", "dsize"]) $(id).addEventListener("change", () => devicesChanged(true));
$("device-query").addEventListener("submit", (e) => { e.preventDefault(); devicesChanged(true); });
$("prev-page").addEventListener("click", () => {
  state.devicePage.offset = Math.max(0, state.devicePage.offset - Number($("dsize").value)); devicesChanged(false);
});
$("next-page").addEventListener("click", () => { state.devicePage.offset += Number($("dsize").value); devicesChanged(false); });

$("register-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  showError("reg-error", null);
  $("reg-result").classList.add("hidden");
  const id = $("reg-id").value.trim();
  if (!/^[A-Za-z0-9_-]{1,64}$/.test(id)) {
    $("reg-error").textContent = "A device id is 1–64 letters, digits, - or _ (no spaces).";
    $("reg-id").focus();
    return;
  }
  $("reg-btn").disabled = true;
  try {
    const c = await api.call("POST", "/v1/devices", {id, name: $("reg-name").value.trim()});
    const box = $("reg-result");
    showCredentials(box, c, `${c.id} registered.`);
    box.append(el("a", {href: `#/device/${encodeURIComponent(c.id)}`}, `Open ${c.id}`));
    $("reg-id").value = ""; $("reg-name").value = "";
    loadDevices();
  } catch (err) {
    $("reg-error").textContent = err.status === 409 ? `${id} is already registered. To issue new credentials, open it and rotate them.`
      : humanError(err);
  } finally { $("reg-btn").disabled = false; }
});

function showCredentials(box, c, title) {
  box.replaceChildren(el("p", {}, el("b", {}, title), " Copy these now: they are not shown again."));
  const dl = el("dl", {class: "fields"});
  field(dl, "MQTT username / client id", el("code", {}, c.mqtt_username));
  field(dl, "MQTT password", el("code", {"data-secret": "password"}, c.mqtt_password));
  field(dl, "Command key", el("code", {"data-secret": "key"}, c.command_key));
  box.append(dl);
  box.classList.remove("hidden");
}

// ---- one device -------------------------------------------------------------------------------------

async function showDevice(id) {
  state.device = {id};
  state.lastMsg = null;
  $("dev-id").textContent = id;
  $("dev-msg").textContent = ""; $("dev-msg").className = "msg";
  $("revoke-confirm").classList.add("hidden");
  $("dev-creds").classList.add("hidden");
  $("dev-fields").replaceChildren();
  $("dev-commands").replaceChildren(); $("dev-presence").replaceChildren();
  await loadDevice(id);
}

async function loadDevice(id, quiet) {
  let d;
  try { d = await api.call("GET", `/v1/devices/${encodeURIComponent(id)}`); }
  catch (e) {
    showError("dev-error", e.status === 404 ? Object.assign(new Error(`There is no device ${id}.`), {status: 404}) : e);
    $("dev-pill").textContent = "";
    for (const b of document.querySelectorAll("#dev-actions button")) b.disabled = true;
    return;
  }
  if (!state.device || state.device.id !== id) return;
  showError("dev-error", null);
  state.device = d;
  $("dev-pill").textContent = d.revoked ? "revoked" : d.online ? "online" : "offline";
  $("dev-pill").className = "pill " + (d.online && !d.revoked ? "ok" : "bad");
  const dl = $("dev-fields");
  dl.replaceChildren();
  const r = d.reported || {};
  field(dl, "Presence", d.online ? "online" : "offline", "online");
  // an online lock is connected now (the broker holds its session); its last message is when it last spoke
  field(dl, "Last seen", !d.last_seen ? "never" : d.online && !d.revoked
    ? el("span", {}, "now (connected); last message ", agoEl(d.last_seen))
    : el("span", {}, agoEl(d.last_seen), el("span", {class: "muted"}, ` (${new Date(d.last_seen).toLocaleString()})`)),
    "last_seen");
  field(dl, "Lock", r.locked === undefined ? "unknown" : r.locked ? "locked" : "open", "locked");
  field(dl, "Battery", r.battery === undefined ? "unknown" : `${r.battery}%` + (r.battery < 20 ? " (low)" : ""), "battery");
  if (r.pos) field(dl, "Position", `${Number(r.pos[0]).toFixed(5)}, ${Number(r.pos[1]).toFixed(5)}`, "pos");
  for (const [k, v] of Object.entries(r)) {
    if (!["locked", "battery", "pos"].includes(k)) field(dl, k, typeof v === "object" ? JSON.stringify(v) : String(v), k);
  }
  field(dl, "Reported", d.reported_at ? agoEl(d.reported_at) : "never", "reported_at");
  field(dl, "Name", d.name || "—"); field(dl, "Zone", d.zone || "—");
  field(dl, "Tags", d.tags.length ? d.tags.join(", ") : "—");
  field(dl, "Registered", new Date(d.created_at).toLocaleString());
  for (const b of document.querySelectorAll("#dev-actions button[data-action]")) b.disabled = d.revoked;
  $("revoke-btn").disabled = d.revoked;
  $("rotate-btn").disabled = false;
  $("revoke-name").textContent = d.id;
  if (!quiet) await Promise.all([loadDeviceCommands(id), loadPresence(id)]);
  else loadPresence(id);
}

async function loadDeviceCommands(id) {
  try {
    const cs = await api.call("GET", `/v1/devices/${encodeURIComponent(id)}/commands?limit=50`);
    $("dev-commands").replaceChildren(...cs.map((c) => commandRow(c, false)));
    if (!cs.length) $("dev-commands").append(el("tr", {}, el("td", {colspan: 5, class: "muted"}, "No commands yet.")));
  } catch (e) { showError("dev-error", e); }
}

async function loadPresence(id) {
  try {
    const ps = await api.call("GET", `/v1/ops/devices/${encodeURIComponent(id)}/presence?limit=20`);
    $("dev-presence").replaceChildren(...ps.map((p) => el("li", {"data-online": String(p.online)},
      el("span", {class: "pill " + (p.online ? "ok" : "bad")}, p.online ? "online" : "offline"), " ",
      new Date(p.at).toLocaleString(), " ", el("span", {class: "muted"}, "(", agoEl(p.at), ")"))));
    if (!ps.length) $("dev-presence").append(el("li", {class: "muted"}, "No change in the last 24 hours."));
  } catch (e) { /* the fields above say enough */ }
}

function showActionStatus(status, reason) {
  const m = state.lastMsg;
  if (!m) return;
  const final = FINAL_STATUSES.includes(status);
  const words = final ? OpsWords.outcome({status, reason}) : `${status.replace("_", " ")}…`;
  $("dev-msg").replaceChildren(`${m.action}: `, el("b", {"data-status": status}, status.replace("_", " ")), ` — ${words} `,
    el("a", {href: `#/command/${encodeURIComponent(m.id)}`}, "Open its timeline"));
  $("dev-msg").className = "msg " + (status === "succeeded" ? "ok" : final ? "bad" : "");
}

for (const b of document.querySelectorAll("#dev-actions button[data-action]")) {
  b.addEventListener("click", async () => {
    const d = state.device;
    if (!d) return;
    const action = b.dataset.action;
    for (const x of document.querySelectorAll("#dev-actions button[data-action]")) x.disabled = true;
    $("dev-msg").textContent = `Sending ${action}…`; $("dev-msg").className = "msg";
    try {
      const c = await api.call("POST", `/v1/devices/${encodeURIComponent(d.id)}/commands`, {action});
      state.lastMsg = {id: c.id, action};
      // its events may have come in before this answer: the newest of the two is shown
      const seen = state.commands.get(c.id);
      const newer = seen && STATUS_ORDER.indexOf(seen.status) > STATUS_ORDER.indexOf(c.status) ? seen : c;
      showActionStatus(newer.status, newer.reason);
      if (!FINAL_STATUSES.includes(newer.status)) {   // and if the stream is away, the final state still comes
        api.call("GET", `/v1/commands/${encodeURIComponent(c.id)}?wait=60`).then((f) => {
          if (state.lastMsg && state.lastMsg.id === f.id && f.final) showActionStatus(f.status, f.reason);
        }).catch(() => {});
      }
    } catch (e) {
      $("dev-msg").textContent = `${action} refused: ${humanError(e)}`; $("dev-msg").className = "msg bad";
    } finally {
      for (const x of document.querySelectorAll("#dev-actions button[data-action]")) x.disabled = !!(state.device && state.device.revoked);
    }
  });
}

$("rotate-btn").addEventListener("click", async () => {
  const d = state.device;
  $("rotate-btn").disabled = true;
  try {
    const c = await api.call("POST", `/v1/devices/${encodeURIComponent(d.id)}/credentials`);
    showCredentials($("dev-creds"), c, `New credentials for ${d.id}: the old ones stopped working.` +
      (d.revoked ? " It is no longer revoked." : ""));
    await loadDevice(d.id, true);
  } catch (e) { $("dev-msg").textContent = "New credentials failed: " + humanError(e); $("dev-msg").className = "msg bad"; }
  finally { $("rotate-btn").disabled = false; }
});
$("revoke-btn").addEventListener("click", () => { $("revoke-confirm").classList.remove("hidden"); $("revoke-no").focus(); });
$("revoke-no").addEventListener("click", () => { $("revoke-confirm").classList.add("hidden"); $("revoke-btn").focus(); });
$("revoke-yes").addEventListener("click", async () => {
  const d = state.device;
  $("revoke-confirm").classList.add("hidden");
  try {
    await api.call("DELETE", `/v1/devices/${encodeURIComponent(d.id)}`);
    $("dev-msg").textContent = `${d.id} is revoked: its login is refused from now on.`; $("dev-msg").className = "msg";
    await loadDevice(d.id, true);
  } catch (e) { $("dev-msg").textContent = "Revoke failed: " + humanError(e); $("dev-msg").className = "msg bad"; }
});

// ---- one command ------------------------------------------------------------------------------------

async function showCommand(id) {
  state.command = {id};
  $("timeline").replaceChildren(); $("cmd-fields").replaceChildren();
  $("cancel-msg").textContent = ""; $("cmd-words").textContent = "";
  await loadCommand(id);
}

async function loadCommand(id) {
  let c;
  try { c = await api.call("GET", `/v1/ops/commands/${encodeURIComponent(id)}`); }
  catch (e) {
    showError("cmd-error", e.status === 404 ? Object.assign(new Error("There is no such command."), {status: 404}) : e);
    $("cancel-btn").classList.add("hidden");
    return;
  }
  if (!state.command || state.command.id !== id) return;
  showError("cmd-error", null);
  state.command = c;
  $("cmd-action").textContent = c.action;
  $("cmd-device").textContent = c.device_id; $("cmd-device").href = `#/device/${encodeURIComponent(c.device_id)}`;
  $("cmd-pill").replaceWith(Object.assign(pill(c.status), {id: "cmd-pill"}));
  $("cmd-words").textContent = OpsWords.outcome(c);
  $("cmd-words").className = "words " + (c.status === "succeeded" ? "ok" : c.final ? "bad" : "");
  const dl = $("cmd-fields");
  dl.replaceChildren();
  const by = c.issued_by || {};
  field(dl, "Issued by", by.kind === "fleet" ? el("a", {href: "#/fleet"}, by.label) : by.label || c.owner, "issued_by");
  field(dl, "Created", clock(c.created_at)); field(dl, "Valid until", clock(c.expires_at));
  field(dl, "Latency", c.final ? latency(c) : "still in flight", "latency");
  if (c.reason) field(dl, "Reason (as recorded)", el("code", {}, c.reason), "reason");
  if (Object.keys(c.params || {}).length) field(dl, "Params", el("code", {}, JSON.stringify(c.params)));
  field(dl, "Id", el("code", {}, c.id));
  $("cancel-btn").classList.toggle("hidden", c.status !== "queued");
  const t0 = ms(c.created_at);
  const seen = new Set();
  const items = [el("li", {"data-event": "created"}, el("span", {class: "t"}, clock(t0)), el("span", {class: "dt"}, "+0 ms"),
    el("span", {class: "what"}, "Created", el("span", {class: "muted"}, ` by ${by.label || c.owner}`)), el("span", {class: "pill"}, "queued"))];
  for (const h of c.history) {
    const {text, mark} = OpsWords.event(h, seen);
    if (h.applied) seen.add(h.event);
    if (h.event === "create" || h.event === "created") continue;
    const at = ms(h.at);
    items.push(el("li", {"data-event": h.event, "data-applied": String(h.applied), class: h.applied ? "" : "not-applied"},
      el("span", {class: "t"}, clock(at)), el("span", {class: "dt"}, `+${at - t0} ms`),
      el("span", {class: "what"}, text, h.detail ? el("span", {class: "muted"}, ` — ${h.detail}`) : null,
        mark ? el("span", {class: "mark", "data-mark": mark}, ` ${OpsWords.markWords[mark]}`) : null),
      h.applied && h.to_status ? pill(h.to_status) : el("span", {class: "pill"}, "no change")));
  }
  $("timeline").replaceChildren(...items);
}

$("cancel-btn").addEventListener("click", async () => {
  const c = state.command;
  $("cancel-btn").disabled = true;
  try {
    await api.call("POST", `/v1/commands/${encodeURIComponent(c.id)}/cancel`);
    $("cancel-msg").textContent = "Cancelled: it will not be sent.";
  } catch (e) {
    $("cancel-msg").textContent = e.status === 409 ? "Too late to cancel: it has already been sent (only a queued command can be cancelled)."
      : "Cancel failed: " + humanError(e);
  } finally { $("cancel-btn").disabled = false; }
  await loadCommand(c.id);
});

// ---- fleet rollouts ---------------------------------------------------------------------------------

async function showFleet() { await loadRollouts(); }

async function loadRollouts() {
  let fs;
  try { fs = await api.call("GET", "/v1/fleet/commands?limit=20"); }
  catch (e) { $("fleet-error").textContent = "Could not read the rollouts: " + humanError(e); return; }
  $("rollouts").replaceChildren(...fs.map(rolloutItem));
  if (!fs.length) $("rollouts").append(el("li", {class: "muted"}, "No rollout yet."));
  if (fs.some((f) => !f.final) && state.view === "fleet") later("fleet-poll", 1500, loadRollouts);
}

function rolloutItem(f) {
  const done = Object.entries(f.counts).filter(([k]) => FINAL_STATUSES.includes(k)).reduce((a, [, v]) => a + v, 0);
  const target = f.target.kind === "devices" ? `${f.target.value} listed devices` : `${f.target.kind} ${f.target.value}`;
  const bar = el("progress", {max: String(Math.max(1, f.total)), value: String(done), "aria-label": `rollout ${f.id.slice(0, 8)}: ${done} of ${f.total} done`});
  const counts = el("ul", {class: "counts"}, ...Object.entries(f.counts).filter(([, v]) => v).map(([k, v]) =>
    el("li", {"data-count": k}, el("span", {class: "pill " + (k === "pending" ? "" : pillFor(k))}, k.replace("_", " ")), ` ${v}`)));
  const li = el("li", {"data-fleet": f.id, "data-status": f.status},
    el("div", {class: "row wrap"}, el("b", {}, `${f.action} → ${target}`),
      el("span", {class: "pill " + ({completed: "ok", running: ""}[f.status] ?? "bad"), "data-status": f.status}, f.status),
      el("span", {class: "muted grow"}, ` ${f.rate_per_min}/min, started ${new Date(f.created_at).toLocaleTimeString()}`),
      f.final ? null : el("button", {type: "button", class: "danger", onclick: () => cancelRollout(f.id)}, "Cancel rollout")),
    el("div", {class: "row"}, bar, el("span", {class: "muted"}, `${done} / ${f.total} done, ${f.issued} issued` +
      (f.excluded ? `, ${f.excluded} revoked left out` : ""))),
    counts, f.reason ? el("p", {class: "muted"}, f.reason) : null);
  return li;
}

async function cancelRollout(id) {
  try { await api.call("POST", `/v1/fleet/commands/${encodeURIComponent(id)}/cancel`); showError("fleet-error", null); }
  catch (e) {
    $("fleet-error").textContent = e.status === 409 ? "That rollout has already finished." : humanError(e);
  }
  await loadRollouts();
}

$("fleet-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  showError("fleet-error", null);
  const kind = $("f-kind").value, value = $("f-value").value.trim();
  if (!value) { $("fleet-error").textContent = "Say which devices: ids, a tag or a zone."; $("f-value").focus(); return; }
  const target = kind === "devices" ? {devices: value.split(/[\s,]+/).filter(Boolean)} : {[kind]: value};
  const body = {action: $("f-action").value, target, rate_per_min: Number($("f-rate").value), ttl_s: Number($("f-ttl").value)};
  $("f-start").disabled = true;
  try { await api.call("POST", "/v1/fleet/commands", body); }
  catch (err) {
    $("fleet-error").textContent = err.status === 422 && Array.isArray(err.detail)
      ? err.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${String(d.msg).replace(/^Value error, /, "")}`).join("; ")
      : humanError(err);
  } finally { $("f-start").disabled = false; }
  await loadRollouts();
});

// ---- start ------------------------------------------------------------------------------------------

$("login-form").addEventListener("submit", (e) => {
  e.preventDefault();
  loginWith(async () => {
    api.token = (await api.call("POST", "/v1/auth/login", {email: $("email").value, password: $("password").value})).access_token;
  });
});
$("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  loginWith(async () => { api.token = $("token").value.trim(); });
});
(function resume() {                      // a reload keeps the session (this tab only)
  const t = sessionStorage.getItem("latch-ops-token");
  if (t) loginWith(async () => { api.token = t; });
})();
