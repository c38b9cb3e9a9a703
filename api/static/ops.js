// The operator dashboard: fleet at a glance, a live event feed, the command log with latency, device detail.
"use strict";

const $ = (id) => document.getElementById(id);
const LOW = 20;
const state = {devices: new Map(), commands: new Map(), openRides: 0, selected: null, timer: null};

async function loginWith(fn) {
  $("login-error").textContent = "";
  try {
    await fn();
    const me = await api.call("GET", "/v1/users/me");
    if (me.role !== "operator") throw new Error("this account is not an operator");
    await start();
  } catch (e) { api.token = null; $("login-error").textContent = e.message; }
}

async function start() {
  $("login").classList.add("hidden");
  $("dash").classList.remove("hidden");
  await Promise.all([loadDevices(), loadCommands(), loadRides()]);
  new LiveStream(onEvent, (s) => {
    $("conn").textContent = s; $("conn").className = "conn " + (s === "live" ? "live" : "down");
  }).open();
}

async function loadDevices() {
  for (const d of await api.call("GET", "/v1/devices?limit=1000")) state.devices.set(d.id, d);
  renderFleet();
}
async function loadCommands() {
  for (const c of (await api.call("GET", "/v1/commands?limit=100")).reverse()) state.commands.set(c.id, c);
  renderCommands();
}
async function loadRides() {
  state.openRides = (await api.call("GET", "/v1/rides?open=true&limit=500")).length;
  $("stat-rides").textContent = state.openRides;
}

function latency(c) {
  if (!c.final) return "";
  const ms = new Date(c.updated_at) - new Date(c.created_at);
  return ms + " ms";
}

function renderFleet() {
  const ds = [...state.devices.values()];
  const low = ds.filter((d) => typeof d.reported.battery === "number" && d.reported.battery < LOW);
  $("stat-total").textContent = ds.length;
  $("stat-online").textContent = ds.filter((d) => d.online).length;
  $("stat-offline").textContent = ds.filter((d) => !d.online).length;
  $("stat-low").textContent = low.length;
  $("low-list").textContent = low.length ? low.map((d) => `${d.id} (${d.reported.battery}%)`).join(", ") : "none";
  const body = $("devices");
  body.replaceChildren();
  for (const d of ds) {
    body.append(el("tr", {class: "clickable", "data-device": d.id, onclick: () => select(d.id)},
      el("td", {}, d.id), el("td", {}, el("span", {class: "pill " + (d.online ? "ok" : "bad")},
        d.online ? "online" : "offline")),
      el("td", {}, d.reported.battery === undefined ? "?" : d.reported.battery + "%"),
      el("td", {}, d.reported.locked === undefined ? "?" : (d.reported.locked ? "locked" : "open"))));
  }
}

function renderCommands() {
  const body = $("commands");
  body.replaceChildren();
  const cs = [...state.commands.values()].sort((a, b) => new Date(b.created_at) - new Date(a.created_at));
  for (const c of cs.slice(0, 100)) {
    body.append(el("tr", {"data-command": c.id}, el("td", {}, new Date(c.created_at).toLocaleTimeString()),
      el("td", {}, c.device_id), el("td", {}, c.action),
      el("td", {}, el("span", {class: "pill " + pillFor(c.status)}, c.status)),
      el("td", {}, latency(c)), el("td", {class: "wrap"}, c.reason || "")));
  }
}

function pillFor(status) {
  return status === "succeeded" ? "ok" : ["queued", "sent", "received"].includes(status) ? "" : "bad";
}

async function select(id) {
  state.selected = id;
  const d = state.devices.get(id);
  $("detail-id").textContent = id;
  $("detail-info").textContent = `${d.online ? "online" : "offline"}, last seen ${d.last_seen ?
    new Date(d.last_seen).toLocaleTimeString() : "never"}, reported ${JSON.stringify(d.reported)}`;
  const body = $("detail-commands");
  body.replaceChildren();
  for (const c of await api.call("GET", `/v1/devices/${id}/commands?limit=50`)) {
    body.append(el("tr", {}, el("td", {}, new Date(c.created_at).toLocaleTimeString()), el("td", {}, c.action),
      el("td", {}, el("span", {class: "pill " + pillFor(c.status)}, c.status)), el("td", {}, latency(c)),
      el("td", {class: "wrap"}, c.reason || "")));
  }
}

function describe(ev) {
  const d = ev.data;
  switch (ev.kind) {
    case "command": return `${d.device_id} ${d.action} → ${d.status}${d.reason ? " (" + d.reason + ")" : ""}`;
    case "presence": return `${d.device_id} ${d.online ? "online" : "offline"}`;
    case "lock_state": return `${d.device_id} ${d.locked ? "locked" : "unlocked"}`;
    case "low_battery": return `${d.device_id} battery low: ${d.battery}%`;
    case "ride": return `ride ${d.ride_id.slice(0, 8)} on ${d.device_id}: ${d.status}${d.reason ? " (" + d.reason + ")" : ""}`;
    default: return JSON.stringify(d);
  }
}

function onEvent(ev) {
  const feed = $("feed");
  feed.prepend(el("li", {"data-id": ev.id, "data-kind": ev.kind},
    el("span", {class: "muted"}, `#${ev.id} ${fmtTime(ev.at)} `), el("b", {}, ev.kind), " ", describe(ev)));
  while (feed.children.length > 200) feed.lastChild.remove();
  const d = ev.data;
  if (ev.kind === "command") {
    const c = state.commands.get(d.command_id) || {id: d.command_id, device_id: d.device_id, action: d.action,
      created_at: new Date(d.created_at).toISOString(), params: {}};
    Object.assign(c, {status: d.status, final: d.final, reason: d.reason || c.reason,
      updated_at: new Date(ev.at).toISOString()});
    state.commands.set(c.id, c);
    renderCommands();
  } else if (ev.kind === "ride") {
    clearTimeout(state.timer); state.timer = setTimeout(loadRides, 300);
  } else {
    const dev = state.devices.get(d.device_id);
    if (!dev) { loadDevices(); return; }
    if (ev.kind === "presence") dev.online = d.online;
    if (ev.kind === "lock_state") dev.reported.locked = d.locked;
    if (ev.kind === "low_battery") dev.reported.battery = d.battery;
    renderFleet();
  }
  if (state.selected && d.device_id === state.selected && ev.kind === "command" && d.final) select(state.selected);
}

$("login-btn").addEventListener("click", () => loginWith(async () => {
  api.token = (await api.call("POST", "/v1/auth/login",
    {email: $("email").value, password: $("password").value})).access_token;
}));
$("token-btn").addEventListener("click", () => loginWith(async () => { api.token = $("token").value.trim(); }));
