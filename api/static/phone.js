// The rider's phone: log in, pick a free bike, unlock, follow the command live, lock, end the ride.
"use strict";

const $ = (id) => document.getElementById(id);
const STEPS = ["queued", "sent", "received"];
const state = {ride: null, cmd: null, stream: null, bikes: [], refreshTimer: null};

async function login(signup) {
  $("login-error").textContent = "";
  const body = {email: $("email").value, password: $("password").value};
  try {
    const r = await api.call("POST", signup ? "/v1/auth/signup" : "/v1/auth/login", body);
    api.token = r.access_token;
    sessionStorage.setItem("latch-token", r.access_token);
    await start();
  } catch (e) { $("login-error").textContent = e.message; }
}

async function start() {
  $("login").classList.add("hidden");
  $("bikes").classList.remove("hidden");
  $("logout-btn").classList.remove("hidden");
  const open = await api.call("GET", "/v1/rides?open=true");
  showRide(open[0] || null);
  if (state.ride) {
    const cmds = await api.call("GET", "/v1/commands?limit=1");
    if (cmds[0]) trackCommand(cmds[0]);
  }
  await loadBikes();
  state.stream = new LiveStream(onEvent, (s) => {
    $("conn").textContent = s; $("conn").className = "conn " + (s === "live" ? "live" : "down");
  });
  state.stream.open();
}

async function loadBikes() {
  try { state.bikes = await api.call("GET", "/v1/bikes"); renderBikes(); }
  catch (e) { $("bikes-error").textContent = e.message; }
}

function refreshBikesSoon() {
  clearTimeout(state.refreshTimer);
  state.refreshTimer = setTimeout(loadBikes, 300);
}

function renderBikes() {
  const list = $("bike-list");
  list.replaceChildren();
  const shown = state.bikes.filter((b) => b.free || b.yours).slice(0, 20);
  if (!shown.length) list.append(el("li", {class: "muted"}, "No free bikes right now."));
  for (const b of shown) {
    const battery = b.battery === null ? "?" : b.battery + "%";
    const btn = el("button", {class: "unlock", onclick: () => unlock(b.id)}, "Unlock");
    btn.disabled = !b.free || state.ride !== null;
    list.append(el("li", {"data-bike": b.id}, el("div", {class: "row"},
      el("div", {class: "grow"}, el("b", {}, b.id), " ", el("span", {class: "muted"}, b.name || "")),
      el("span", {class: "pill " + (b.battery !== null && b.battery < 20 ? "warn" : "")}, "battery " + battery),
      el("span", {class: "pill " + (b.online ? "ok" : "bad")}, b.online ? "online" : "offline"),
      b.yours ? el("span", {class: "pill ok"}, "yours") : btn)));
  }
}

async function unlock(bikeId) {
  $("bikes-error").textContent = "";
  try {
    const r = await api.call("POST", "/v1/rides", {bike_id: bikeId});
    showRide(r);
    trackCommand(r.unlock);
    renderBikes();
  } catch (e) { $("bikes-error").textContent = e.message; }
}

async function command(action) {
  $("ride-error").textContent = "";
  try {
    const c = await api.call("POST", `/v1/devices/${state.ride.bike_id}/commands`, {action});
    trackCommand(c);
  } catch (e) { $("ride-error").textContent = e.message; }
}

async function endRide() {
  $("ride-error").textContent = "";
  try {
    const r = await api.call("POST", `/v1/rides/${state.ride.id}/end`);
    if (r.end_command_id) trackCommand({id: r.end_command_id, action: "lock", status: "queued", reason: null});
    showRide(r);
  } catch (e) { $("ride-error").textContent = e.message; }
}

function showRide(r) {
  const open = r && (r.status === "starting" || r.status === "active");
  state.ride = open ? r : null;
  $("ride").classList.toggle("hidden", !open);
  if (r && !open) {
    $("ended").classList.remove("hidden");
    $("ended-text").textContent = r.status === "failed"
      ? `Could not start the ride on ${r.bike_id}: ${r.reason}` : `Ride on ${r.bike_id} ended: ${r.reason}`;
  } else if (open) {
    $("ended").classList.add("hidden");
  }
  if (!open) { refreshBikesSoon(); return; }
  $("ride-bike").textContent = r.bike_id;
  $("ride-status").textContent = r.status;
  $("ride-status").className = "pill " + (r.status === "active" ? "ok" : "warn");
  for (const id of ["lock-btn", "locate-btn", "end-btn"]) $(id).disabled = r.status !== "active";
}

function trackCommand(c) {
  state.cmd = {id: c.id, action: c.action, reached: new Set(), final: null, reason: null};
  applyStatus(c.status, c.reason);
}

function applyStatus(status, reason) {
  const cmd = state.cmd;
  if (STEPS.includes(status)) for (const s of STEPS.slice(0, STEPS.indexOf(status) + 1)) cmd.reached.add(s);
  else { for (const s of STEPS) cmd.reached.add(s); cmd.final = status; cmd.reason = reason; }
  renderCommand();
}

function renderCommand() {
  const cmd = state.cmd;
  $("cmd").classList.remove("hidden");
  $("cmd-action").textContent = cmd.action;
  $("cmd-status").textContent = cmd.final || [...STEPS].reverse().find((s) => cmd.reached.has(s)) || "";
  const steps = $("cmd-steps");
  steps.replaceChildren();
  for (const s of STEPS) steps.append(el("li", {class: cmd.reached.has(s) ? "done" : ""}, s));
  const last = cmd.final || "succeeded";
  steps.append(el("li", {class: cmd.final ? (cmd.final === "succeeded" ? "done" : "failed") : ""}, last));
  $("cmd-reason").textContent = cmd.final && cmd.final !== "succeeded" ? (cmd.reason || cmd.final) : "";
}

function onEvent(ev) {
  const d = ev.data;
  if (ev.kind === "command" && state.cmd && d.command_id === state.cmd.id) applyStatus(d.status, d.reason);
  else if (ev.kind === "ride") {
    if (state.ride && d.ride_id === state.ride.id) showRide({...state.ride, status: d.status, reason: d.reason});
    else if (!state.ride && (d.status === "starting" || d.status === "active")) refreshRide();
  } else if (["presence", "lock_state", "low_battery"].includes(ev.kind)) refreshBikesSoon();
}

async function refreshRide() {
  const open = await api.call("GET", "/v1/rides?open=true");
  if (open[0]) showRide(open[0]);
}

function logout() {
  sessionStorage.removeItem("latch-token");
  if (state.stream) state.stream.close();
  location.reload();
}

$("login-btn").addEventListener("click", () => login(false));
$("signup-btn").addEventListener("click", () => login(true));
$("password").addEventListener("keydown", (e) => { if (e.key === "Enter") login(false); });
$("lock-btn").addEventListener("click", () => command("lock"));
$("locate-btn").addEventListener("click", () => command("locate"));
$("end-btn").addEventListener("click", endRide);
$("logout-btn").addEventListener("click", logout);
api.token = sessionStorage.getItem("latch-token");
if (api.token) start().catch(() => { sessionStorage.removeItem("latch-token"); location.reload(); });
