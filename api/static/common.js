// Shared by the phone page and the dashboard: the API with a bearer token, and a resumable event stream.
"use strict";

const api = {
  token: null,
  async call(method, path, body) { return (await api.request(method, path, body)).data; },
  // the same, with the response too (its headers: X-Total-Count)
  async request(method, path, body) {
    const headers = {"Content-Type": "application/json"};
    if (api.token) headers.Authorization = "Bearer " + api.token;
    let r;
    try { r = await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)}); }
    catch (e) { const err = new Error("network: " + e.message); err.status = 0; err.network = true; throw err; }
    let data = null;
    try { data = await r.json(); } catch (e) { /* empty body */ }
    if (!r.ok) {
      const detail = data && data.detail;
      const msg = typeof detail === "string" ? detail : (detail ? JSON.stringify(detail) : r.statusText);
      const err = new Error(msg); err.status = r.status; err.detail = detail; throw err;
    }
    return {data, response: r};
  },
};

// An EventSource that survives drops: the browser reconnects by itself with Last-Event-ID; when the
// server refuses the reconnect (say the stream token expired) this opens a new one from the last id seen.
// With `storeKey` the last id seen is also kept in sessionStorage, so a reload of the page resumes where it
// was (what came meanwhile, a notification say, arrives once: the cursor decides); a stored cursor the
// server refuses (a database started anew) is dropped and the stream starts from now.
class LiveStream {
  constructor(onEvent, onState, storeKey = null) {
    this.onEvent = onEvent; this.onState = onState; this.es = null; this.stopped = false;
    this.retries = 0; this.storeKey = storeKey; this.stored = false;
    this.lastId = storeKey ? sessionStorage.getItem(storeKey) : null;
    if (this.lastId !== null) this.stored = true;
  }
  seen(id) {
    this.lastId = id;
    if (this.storeKey && id) sessionStorage.setItem(this.storeKey, id);
  }
  async open() {
    if (this.stopped) return;
    this.onState("connecting");
    let token;
    try { token = (await api.call("POST", "/v1/auth/stream-token")).token; }
    catch (e) { return this.later(); }
    const q = new URLSearchParams({token});
    if (this.lastId !== null) q.set("last_event_id", this.lastId);
    const es = this.es = new EventSource("/v1/events/stream?" + q);
    let ready = false;
    es.addEventListener("ready", (m) => {
      ready = true; this.stored = false; this.seen(m.lastEventId); this.retries = 0; this.onState("live");
    });
    for (const kind of ["command", "presence", "lock_state", "low_battery", "ride", "fleet", "notification"]) {
      es.addEventListener(kind, (m) => { this.seen(m.lastEventId); this.onEvent(JSON.parse(m.data)); });
    }
    es.addEventListener("error", (m) => {
      if (m.data) console.warn("stream:", m.data);     // the server's reason (e.g. too far behind)
      this.onState("reconnecting");
      if (es.readyState === EventSource.CLOSED) {
        es.close();
        if (!ready && this.stored) {   // the stored cursor was refused: from now on instead
          this.stored = false; this.lastId = null;
          if (this.storeKey) sessionStorage.removeItem(this.storeKey);
        }
        this.later();
      }
    });
  }
  later() {
    if (this.stopped) return;
    const delay = Math.min(10000, 500 * 2 ** this.retries++);
    setTimeout(() => this.open(), delay);
  }
  close() { this.stopped = true; if (this.es) this.es.close(); }
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "class") e.className = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

function fmtTime(ms) { return new Date(ms).toLocaleTimeString(); }

// What a person reads for a failed call: no JSON, no internal ids, and what to do next.
const FIELD_WORDS = {email: "email address", password: "password", new_password: "new password", name: "name"};
function humanError(e) {
  if (!e || e.network || e.status === 0) return "Can't reach Latch right now. Check your connection; this page keeps retrying.";
  if (e.status === 422 && Array.isArray(e.detail)) {
    return e.detail.map((d) => {
      const field = FIELD_WORDS[(d.loc || []).slice(-1)[0]] || "input";
      if (d.type === "string_too_short") {
        const n = (d.msg.match(/\d+/) || ["8"])[0];
        return `The ${field} needs at least ${n} characters.`;
      }
      if (d.type === "string_too_long") return `The ${field} is too long.`;
      if (d.type === "missing") return `Please enter your ${field}.`;
      if (/email/.test(d.msg)) return "That doesn't look like an email address.";
      return `Check the ${field}: ${String(d.msg).replace(/^Value error, /, "")}.`;
    }).join(" ");
  }
  if (e.status === 429) return "Too many tries in a row. Wait a few seconds and try again.";
  if (e.status === 503) return "Latch is busy right now. Try again in a few seconds.";
  if (e.status >= 500) return "Something went wrong on our side. Try again in a moment.";
  const msg = String(e.message || "").replace(/\s*\([0-9a-f]{8,}[^)]*\)/gi, "").replace(/\b[0-9a-f]{16,}\b/gi, "");
  return msg ? msg.charAt(0).toUpperCase() + msg.slice(1) + (/[.!?]$/.test(msg) ? "" : ".") : "That didn't work. Try again.";
}
