// The rider's phone: log in, pick a bike near you (list + map), unlock, follow the command live with a
// countdown, lock, end the ride. Wording lives in phone_words.js, the map in phone_map.js.
"use strict";

const $ = (id) => document.getElementById(id);
const STEPS = ["queued", "sent", "received"];
const PAGE = 10;             // bikes per "show more"
const CURSOR_KEY = "latch-cursor";   // the event stream's last id, so a reload resumes (common.js LiveStream)
const POLL_MS = 5000;        // the list is re-read this often: riders' streams carry only their own events
const DOWN_GRACE_MS = 1500;  // a stream that stays down this long marks the server unreachable
const AVOID_MS = 120000;     // a bike that failed to open for you is not offered again for this long
const state = {
  ride: null, cmd: null, stream: null, page: null, limit: PAGE, origin: null, originLabel: null,
  pending: null, notes: new Map(), avoid: new Map(), fetchDown: false, streamDownSince: null,
  pollTimer: null, tickTimer: null, refreshTimer: null, started: false,
  // the newest status the stream said for recent commands and rides: a request's answer can arrive after
  // the events it would start tracking (a lock that answers before the page has read the POST's reply)
  heard: new Map(),
};
const HEARD_MAX = 50;
const RIDE_RANK = {starting: 0, active: 1, ended: 2, failed: 2};

function hear(id, status, reason) {
  state.heard.delete(id);
  state.heard.set(id, {status, reason});
  if (state.heard.size > HEARD_MAX) state.heard.delete(state.heard.keys().next().value);
}

// ---- logging in ---------------------------------------------------------------------------------
async function login(signup) {
  const err = $("login-error");
  err.textContent = "";
  const email = $("email").value.trim(), password = $("password").value;
  if (!email || !password) { err.textContent = "Enter your email and a password."; return; }
  if (signup && password.length < 8) { err.textContent = "The password needs at least 8 characters."; return; }
  for (const b of ["login-btn", "signup-btn"]) $(b).disabled = true;
  try {
    const r = await api.call("POST", signup ? "/v1/auth/signup" : "/v1/auth/login", {email, password});
    api.token = r.access_token;
    sessionStorage.setItem("latch-token", r.access_token);
    sessionStorage.removeItem(CURSOR_KEY);   // a new login starts its stream from now
    await start();
  } catch (e) {
    err.textContent = e.status === 409 && signup ? "There is already an account with this email. Press Log in."
      : humanError(e);
  } finally {
    for (const b of ["login-btn", "signup-btn"]) $(b).disabled = false;
  }
}

async function start() {
  const open = await api.call("GET", "/v1/rides?open=true");
  state.started = true;
  $("login").classList.add("hidden");
  $("bikes").classList.remove("hidden");
  $("logout-btn").classList.remove("hidden");
  $("conn").classList.remove("hidden");
  showRide(open[0] || null);
  if (state.ride) {
    const cmds = await api.call("GET", "/v1/commands?limit=1");
    if (cmds[0]) trackCommand(cmds[0]);
  }
  await loadBikes();
  state.stream = new LiveStream(onEvent, onStreamState, CURSOR_KEY);   // a reload resumes from the cursor
  state.stream.open();
  state.pollTimer = setInterval(() => { if (!document.hidden) loadBikes(); }, POLL_MS);
}

// ---- is the server there? -------------------------------------------------------------------------
const CONN_WORDS = {live: "Connected", connecting: "Connecting…", reconnecting: "Reconnecting…"};
function onStreamState(s) {
  $("conn").textContent = CONN_WORDS[s] || s;
  $("conn").dataset.state = s;
  $("conn").className = "conn " + (s === "live" ? "live" : "down");
  if (s === "live") {
    const wasDown = serverDown();
    state.streamDownSince = null;
    if (wasDown) loadBikes();
    refreshRide();   // catch up on anything final that happened while away
  } else if (state.streamDownSince === null) {
    state.streamDownSince = Date.now();
    setTimeout(renderConnection, DOWN_GRACE_MS + 50);
  }
  renderConnection();
}
function serverDown() {
  return state.fetchDown || (state.streamDownSince !== null && Date.now() - state.streamDownSince >= DOWN_GRACE_MS);
}
function renderConnection() {
  const down = serverDown();
  const banner = $("offline-banner");
  banner.textContent = down ? "Can't reach Latch right now, so bikes can't be unlocked. This page keeps " +
    "retrying and will update by itself." : "";
  banner.classList.toggle("hidden", !down);
  renderBikes();
}

// ---- the list of bikes ------------------------------------------------------------------------------
async function loadBikes() {
  const q = new URLSearchParams({limit: state.limit});
  if (state.origin) { q.set("lat", state.origin[0]); q.set("lon", state.origin[1]); }
  try {
    state.page = await api.call("GET", "/v1/bikes/nearby?" + q);
    state.fetchDown = false;
    $("bikes-error").textContent = "";
  } catch (e) {
    if (e.network) state.fetchDown = true;
    else $("bikes-error").textContent = humanError(e);
  }
  renderConnection();
}

function refreshBikesSoon() {
  clearTimeout(state.refreshTimer);
  state.refreshTimer = setTimeout(loadBikes, 200);
}

function note(bikeId, text, ms = 15000, avoid = false) {
  state.notes.set(bikeId, {text, until: Date.now() + ms});
  if (avoid) state.avoid.set(bikeId, Date.now() + ms);
  renderBikes();
  setTimeout(renderBikes, ms + 50);
}

function renderBikes() {
  if (!state.page) return;
  const now = Date.now();
  for (const [k, v] of state.notes) if (v.until <= now) state.notes.delete(k);
  for (const [k, v] of state.avoid) if (v <= now) state.avoid.delete(k);
  const down = serverDown();
  const riding = state.ride !== null;
  const bikes = state.page.bikes.map((b) => ({...b, avoid: state.avoid.has(b.id)}));
  // a bike with a note stays in view (greyed) while the note is up, even once the server stops listing it
  const listed = new Set(bikes.map((b) => b.id));
  for (const [id] of state.notes) {
    if (!listed.has(id) && state.lastSeen && state.lastSeen.has(id)) bikes.push({...state.lastSeen.get(id), gone: true});
  }
  state.lastSeen = new Map(bikes.map((b) => [b.id, b]));
  bikes.sort((a, b) => (b.yours - a.yours) || (a.avoid - b.avoid) || 0);
  const list = $("bike-list");
  const focused = document.activeElement && document.activeElement.closest && document.activeElement.closest("li[data-bike]");
  const focusedId = focused ? focused.dataset.bike : null;
  list.replaceChildren();
  if (!bikes.length) list.append(el("li", {class: "muted"}, "No free bikes near here right now. Try again in a minute."));
  for (const b of bikes) {
    const n = state.notes.get(b.id);
    const battery = b.battery === null ? null : b.battery;
    const unavailable = down || b.gone || b.avoid;
    const label = b.name || b.id;
    const pill = b.yours ? el("span", {class: "pill ok"}, "yours")
      : down ? el("span", {class: "pill bad"}, "unavailable")
        : b.gone ? el("span", {class: "pill bad"}, "taken")
          : b.avoid ? el("span", {class: "pill warn"}, "didn't open")
            : el("span", {class: "pill ok"}, "free");
    let action = null;
    if (!b.yours && !riding) {
      action = el("button", {class: "unlock", type: "button", "aria-label": `Unlock ${label}`,
                             onclick: () => unlock(b.id)}, state.pending === b.id ? "Unlocking…" : "Unlock");
      action.disabled = unavailable || state.pending !== null;
      if (state.pending === b.id) action.setAttribute("aria-busy", "true");
    }
    const li = el("li", {"data-bike": b.id, class: unavailable && !b.yours ? "unavailable" : ""},
      el("div", {class: "row"},
        el("div", {class: "grow"}, el("b", {}, label),
          el("div", {class: "muted"}, Words.distance(b.distance_m),
             battery === null ? "" : ` · battery ${battery}%`, battery !== null && battery < 20 ? " (low)" : "")),
        pill, action),
      el("p", {class: "bike-msg" + (n ? "" : " hidden"), role: "status"}, n ? n.text : ""));
    list.append(li);
  }
  if (focusedId) {
    const again = list.querySelector(`li[data-bike="${CSS.escape(focusedId)}"] button`);
    if (again && !again.disabled) again.focus();
  }
  const more = state.page.total - state.page.bikes.length;
  $("more-btn").classList.toggle("hidden", more <= 0);
  $("more-btn").textContent = `Show more bikes (${more} more)`;
  const from = state.originLabel ? `from ${state.originLabel}` : "from the town centre";
  $("bikes-note").textContent = riding ? "You're on a ride. End it to take another bike."
    : `${state.page.total} free bike${state.page.total === 1 ? "" : "s"}, nearest first, ${from}.`;
  LatchMap.draw($("map"), {area: state.page.area, origin: state.origin || (state.page.origin || null),
                           originLabel: state.originLabel || "Town centre", bikes});
}

async function unlock(bikeId) {
  if (state.pending !== null || state.ride !== null) return;   // one request at a time: no double tap
  state.pending = bikeId;
  state.notes.delete(bikeId);
  renderBikes();
  try {
    const r = await api.call("POST", "/v1/rides", {bike_id: bikeId});
    state.pending = null;
    showRide(r);
    trackCommand(r.unlock);
    $("ride-title").focus();
    $("ride").scrollIntoView({block: "start"});
    loadBikes();
  } catch (e) {
    state.pending = null;
    if (e.network) { state.fetchDown = true; renderConnection(); }
    note(bikeId, Words.refusal(e));
    if (e.status === 409) loadBikes();
    const msg = document.querySelector(`li[data-bike="${CSS.escape(bikeId)}"] .bike-msg`);
    if (msg) msg.scrollIntoView({block: "nearest"});
  }
}

// ---- the ride -----------------------------------------------------------------------------------
async function command(action) {
  $("ride-error").textContent = "";
  try {
    const c = await api.call("POST", `/v1/devices/${state.ride.bike_id}/commands`, {action});
    trackCommand(c);
  } catch (e) { $("ride-error").textContent = humanError(e); }
}

async function endRide() {
  $("ride-error").textContent = "";
  $("end-btn").disabled = true;
  try {
    const r = await api.call("POST", `/v1/rides/${state.ride.id}/end`);
    if (r.end_command_id) trackCommand(await api.call("GET", `/v1/commands/${r.end_command_id}`));
    showRide(r);
  } catch (e) { $("ride-error").textContent = humanError(e); $("end-btn").disabled = false; }
}

function showRide(r) {
  if (r && r.id) {   // never back to an older state of the same ride than the stream already said
    const known = state.ride && state.ride.id === r.id ? state.ride.status : (state.heard.get(r.id) || {}).status;
    if (known && RIDE_RANK[known] > RIDE_RANK[r.status]) r = {...r, status: known};
  }
  const open = r && (r.status === "starting" || r.status === "active");
  const was = state.ride;
  state.ride = open ? r : null;
  $("ride").classList.toggle("hidden", !open);
  if (r && !open) {
    const failed = r.status === "failed";
    $("ended").classList.remove("hidden");
    $("ended").classList.toggle("bad", failed);
    $("ended-text").textContent = Words.rideOver(r);
    if (failed) {
      note(r.bike_id, "Didn't open for you just now.", AVOID_MS, true);
      $("ended-text").focus();
    }
  } else if (open) {
    $("ended").classList.add("hidden");
  }
  if (!open) {
    if (was) refreshBikesSoon();
    renderCommand();
    renderBikes();
    return;
  }
  $("ride-bike").textContent = r.bike_id;
  $("ride-status").textContent = r.status === "active" ? "Riding" : "Starting";
  $("ride-status").dataset.status = r.status;
  $("ride-status").className = "pill " + (r.status === "active" ? "ok" : "warn");
  for (const id of ["lock-btn", "locate-btn", "end-btn"]) $(id).disabled = r.status !== "active";
  $("ride-actions").classList.toggle("hidden", r.status !== "active");   // while starting: only the unlock
  if (!was || was.status !== r.status) refreshBikesSoon();
  renderCommand();
}

function trackCommand(c) {
  const ttl = c.expires_at && c.created_at ? new Date(c.expires_at) - new Date(c.created_at) : 30000;
  state.cmd = {id: c.id, action: c.action, reached: new Set(), final: null, reason: null, status: c.status,
               deadline: Date.now() + ttl};
  clearInterval(state.tickTimer);
  state.tickTimer = setInterval(renderCountdown, 1000);
  applyStatus(c.status, c.reason);
  const heard = state.heard.get(c.id);   // the stream was faster than this request's reply
  if (heard && (!STEPS.includes(heard.status) || STEPS.indexOf(heard.status) > STEPS.indexOf(c.status))) {
    applyStatus(heard.status, heard.reason);
  }
}

function applyStatus(status, reason) {
  const cmd = state.cmd;
  if (cmd.final) return;   // a late event after the final one changes nothing
  cmd.status = status;
  if (STEPS.includes(status)) for (const s of STEPS.slice(0, STEPS.indexOf(status) + 1)) cmd.reached.add(s);
  else {
    for (const s of STEPS) cmd.reached.add(s);
    cmd.final = status; cmd.reason = reason;
    clearInterval(state.tickTimer);
  }
  renderCommand();
}

function renderCountdown() {
  const cmd = state.cmd;
  const out = $("cmd-countdown");
  if (!cmd || cmd.final) { out.textContent = ""; $("cmd-hint").textContent = ""; return; }
  const left = Math.ceil((cmd.deadline - Date.now()) / 1000);
  out.textContent = left > 0 ? `${left} s left` : "Still waiting for the bike, a few more seconds…";
  // an unlock goes out to the lock at once (it is never queued): nothing can call it back safely
  $("cmd-hint").textContent = cmd.action === "unlock" && cmd.status !== "queued"
    ? "The request is with the bike and can't be called back. If it doesn't answer in time, the ride won't start." : "";
}

function renderCommand() {
  const cmd = state.cmd;
  const box = $("cmd");
  if (!cmd || !state.ride) { box.classList.add("hidden"); return; }
  box.classList.remove("hidden");
  box.dataset.action = cmd.action;
  $("cmd-action").textContent = cmd.action;
  $("cmd-status").textContent = Words.status(cmd.action, cmd.final || cmd.status, cmd.reason);
  $("cmd-status").dataset.status = cmd.final || cmd.status;
  $("cmd-status").className = cmd.final && cmd.final !== "succeeded" ? "bad" : "";
  const steps = $("cmd-steps");
  steps.replaceChildren();
  for (const s of STEPS) {
    steps.append(el("li", {class: cmd.reached.has(s) ? "done" : "", "data-step": s}, Words.step(cmd.action, s)));
  }
  const last = cmd.final || "succeeded";
  steps.append(el("li", {class: cmd.final ? (cmd.final === "succeeded" ? "done" : "failed") : "", "data-step": last},
                  Words.step(cmd.action, last)));
  $("cmd-reason").textContent = "";
  renderCountdown();
}

// ---- live events ----------------------------------------------------------------------------------
function onEvent(ev) {
  const d = ev.data;
  if (ev.kind === "command") hear(d.command_id, d.status, d.reason);
  if (ev.kind === "ride") hear(d.ride_id, d.status, d.reason);
  if (ev.kind === "command" && state.cmd && d.command_id === state.cmd.id) applyStatus(d.status, d.reason);
  else if (ev.kind === "ride") {
    if (state.ride && d.ride_id === state.ride.id) showRide({...state.ride, status: d.status, reason: d.reason});
    else if (!state.ride && (d.status === "starting" || d.status === "active")) refreshRide();
    refreshBikesSoon();
  } else if (["presence", "lock_state", "low_battery"].includes(ev.kind)) refreshBikesSoon();
  else if (ev.kind === "notification") Notices.show(d);   // phone_notify.js
}

async function refreshRide() {
  try {
    const open = await api.call("GET", "/v1/rides?open=true");
    if (open[0]) showRide(open[0]);
    else if (state.ride) showRide(await api.call("GET", `/v1/rides/${state.ride.id}`));
    if (state.cmd && !state.cmd.final) {
      const c = await api.call("GET", `/v1/commands/${state.cmd.id}`);
      applyStatus(c.status, c.reason);
    }
  } catch (e) { /* the next stream event or poll tries again */ }
}

// ---- where the rider is ------------------------------------------------------------------------------
function setOrigin(pos, label) {
  state.origin = pos; state.originLabel = label;
  state.limit = PAGE;
  loadBikes();
}

function locateMe() {
  if (!navigator.geolocation) { $("bikes-error").textContent = "This browser can't tell where you are. Tap the map instead."; return; }
  $("bikes-note").textContent = "Finding where you are…";
  navigator.geolocation.getCurrentPosition(
    (p) => setOrigin([p.coords.latitude, p.coords.longitude], "your location"),
    () => { $("bikes-error").textContent = "We couldn't get your location. Tap the map to choose where you are."; },
    {timeout: 10000, maximumAge: 60000});
}

function logout() {
  sessionStorage.removeItem("latch-token");
  sessionStorage.removeItem(CURSOR_KEY);
  if (state.stream) state.stream.close();
  location.reload();
}

$("login-form").addEventListener("submit", (e) => { e.preventDefault(); login(false); });
$("signup-btn").addEventListener("click", () => login(true));
$("lock-btn").addEventListener("click", () => command("lock"));
$("locate-btn").addEventListener("click", () => command("locate"));
$("end-btn").addEventListener("click", endRide);
$("logout-btn").addEventListener("click", logout);
$("more-btn").addEventListener("click", () => { state.limit += PAGE; loadBikes(); });
$("locate-me").addEventListener("click", locateMe);
$("map").addEventListener("click", (e) => {
  const p = LatchMap.pointAt($("map"), e);
  if (p) setOrigin(p, "the point you chose");
});

function resume() {
  start().catch((e) => {
    if (e.status === 401 || e.status === 403) { sessionStorage.removeItem("latch-token"); api.token = null; return; }
    $("login-error").textContent = humanError(e);
    setTimeout(resume, 3000);   // the server is down: try again, without a reload loop
  });
}
api.token = sessionStorage.getItem("latch-token");
if (api.token) resume();
