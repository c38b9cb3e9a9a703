// What an operator reads: statuses, reasons and a command's history in words.
"use strict";

const OpsWords = {
  // a final (or current) status with its reason, in a sentence that says what happened and what to do
  outcome(c) {
    const r = String(c.reason || "");
    switch (c.status) {
      case "queued": return "Waiting to be sent (the lock is offline or the link is busy); it expires if not sent in time.";
      case "sent": return "Sent to the lock; waiting for it to confirm it got it.";
      case "received": return "The lock has it and is acting on it.";
      case "succeeded": return "Done: the lock confirmed it from its own sensor.";
      case "cancelled": return "Cancelled by an operator before it was sent. Nothing reached the lock.";
      case "expired": return "Never sent: it expired while the lock was offline. Nothing reached the lock.";
      case "timed_out": return "No answer from the lock before its deadline (validity + grace). It may have poor "
        + "signal or be powered off; check its presence, then try again.";
      case "rejected": return "The lock refused it: " + OpsWords.reason(r);
      case "failed": return "Failed: " + OpsWords.reason(r);
      default: return c.status + (r ? ": " + r : "");
    }
  },
  reason(r) {
    if (!r) return "no reason given.";
    if (/^jammed/i.test(r)) return "the bolt jammed and did not move. Send someone to look at the lock.";
    if (/actuation timed out/i.test(r)) return "the motor never finished (a hung driver). The lock needs a look; a reboot may help.";
    if (/^device offline/i.test(r)) return "the lock was offline, so it was refused at once (an unlock is never queued to fire late).";
    if (/broker unreachable|handed to the broker|kept closing/i.test(r)) return "the broker could not take it. Check the broker, then retry.";
    if (/bad signature/i.test(r)) return "the signature did not verify: the lock's command key is out of date. Rotate its credentials.";
    if (/expired on device/i.test(r)) return "it arrived after its validity ended (delivery delay or the lock's clock).";
    if (/another device/i.test(r)) return "it was addressed to another device.";
    if (/unknown action/i.test(r)) return "the lock's firmware does not know this action.";
    if (/^busy/i.test(r)) return "the lock was busy with another command. Retry in a moment.";
    if (/cancelled by/i.test(r)) return "cancelled by an operator.";
    return r.charAt(0).toLowerCase() + r.slice(1) + (/[.!?]$/.test(r) ? "" : ".");
  },
  // one history entry: what happened, and whether it changed anything
  event(h, seen) {
    const names = {
      create: "Created", created: "Created", dispatch: "Sent to the broker", device_received: "Lock: got it",
      device_succeeded: "Lock: done", device_failed: "Lock: failed", device_rejected: "Lock: refused",
      device_offline: "Refused: lock offline", publish_failed: "Broker did not take it", expire: "Expired unsent",
      timeout: "Timed out (no answer)", cancel: "Cancelled",
    };
    let text = names[h.event] || h.event;
    let mark = "";
    if (!h.applied) {
      const fromDevice = /^device_/.test(h.event);
      if (seen.has(h.event)) mark = "duplicate";
      else if (fromDevice && FINAL_STATUSES.includes(h.from_status)) mark = "late";
      else mark = "ignored";
    }
    return {text, mark};
  },
  markWords: {
    duplicate: "duplicate answer: already applied, changed nothing",
    late: "late answer: the command was already final, changed nothing",
    ignored: "did not apply in this state, changed nothing",
  },
  ago(ms) {
    if (ms === null || ms === undefined) return "never";
    const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
    if (s < 60) return `${s} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min ago`;
    return `${Math.floor(s / 86400)} d ago`;
  },
};

const FINAL_STATUSES = ["succeeded", "failed", "rejected", "expired", "timed_out", "cancelled"];
