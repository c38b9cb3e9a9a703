// What the rider reads: every command state and failure in words, with what to do next.
"use strict";

const Words = {
  // the label of each progress step
  step(action, s) {
    const done = {unlock: "Unlocked", lock: "Locked", locate: "Rang"}[action] || "Done";
    return {queued: "Requested", sent: "Sent", received: "Bike got it", succeeded: done}[s] || Words.short(s);
  },
  short(s) {
    return {failed: "Failed", timed_out: "No answer", expired: "Too late", rejected: "Refused",
            cancelled: "Cancelled"}[s] || s;
  },
  // the line under the ride title while a command moves, and once it is final
  status(action, s, reason) {
    if (s === "queued") return "Getting your request ready…";
    if (s === "sent") return "Sent to the bike. Waiting for it to answer…";
    if (s === "received") {
      return {unlock: "The bike is unlocking…", lock: "The bike is locking…", locate: "The bike is ringing…"}[action]
        || "The bike is working on it…";
    }
    if (s === "succeeded") {
      return {unlock: "Unlocked. Enjoy your ride!", lock: "Locked.", locate: "The bike rang its bell."}[action] || "Done.";
    }
    return Words.failure(action, s, reason);
  },
  // a final state other than succeeded: what happened and what to do now
  failure(action, s, reason) {
    const r = String(reason || "");
    if (s === "cancelled") return action === "unlock" ? "Unlock cancelled. The bike stayed locked." : "Cancelled.";
    if (s === "failed" && /jam|actuation timed out/i.test(r)) {
      return action === "unlock" ? "The lock didn't open. Try another bike."
        : action === "lock" ? "The lock didn't close. Push the bolt in firmly, then press Lock again."
          : "The bike couldn't do that. Try again.";
    }
    if (s === "failed" && /offline/i.test(r)) return "The bike is offline right now. Try another bike.";
    if (s === "failed" && /broker|handed/i.test(r)) return "We couldn't reach the bike just now. Try again in a moment.";
    if (s === "timed_out") {
      return action === "unlock"
        ? "The bike didn't answer in time, so your ride didn't start. It may have poor signal. Try another bike."
        : "The bike didn't answer in time. Move closer and try again.";
    }
    if (s === "expired") return "The request reached the bike too late, so it was ignored. Try again.";
    if (s === "rejected") {
      return action === "unlock" ? "The bike refused to unlock. Try another bike." : "The bike refused the request. Try again.";
    }
    return action === "unlock" ? "The bike couldn't be unlocked. Try another bike." : "That didn't work. Try again.";
  },
  // the ride's own reason ("unlock timed_out: ...", "the bike was locked", ...) for the ended card
  rideOver(ride) {
    const m = /^unlock (\w+)(?::\s*(.*))?$/.exec(ride.reason || "");
    if (ride.status === "failed") return m ? Words.failure("unlock", m[1], m[2]) : Words.failure("unlock", "failed", ride.reason);
    const why = ride.reason ? ride.reason.replace(/^ended by operator .*/, "ended by our team") : "";
    return `Ride ended${why ? ": " + why : ""}.`;
  },
  // a refused request (HTTP 4xx) about a bike
  refusal(e) {
    const msg = String((e && e.message) || "");
    if (/in use|just taken/i.test(msg)) return "Someone else just took this bike. Pick another one.";
    if (/offline/i.test(msg)) return "This bike is offline right now. Pick another one.";
    if (/out of service/i.test(msg)) return "This bike is out of service. Pick another one.";
    if (/already have an open ride/i.test(msg)) return "You already have a ride. End it before taking another bike.";
    if (/no bike/i.test(msg)) return "This bike is no longer available. Pick another one.";
    return humanError(e);
  },
  distance(m) {
    if (m === null || m === undefined) return "distance unknown";
    return m < 1000 ? `${Math.round(m / 10) * 10} m away` : `${(m / 1000).toFixed(1)} km away`;
  },
};
