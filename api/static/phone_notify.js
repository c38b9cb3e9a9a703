// Notifications on the rider's page: an event of kind "notification" on the stream is shown as a card
// (title, body, action buttons). Showing it reports {"seen": true}; pressing an action reports
// {"action": id} (POST /v1/notifications/{id}/receipt), retried a few times if the server is away.
// A data message (silent: no title or body) is handled without showing anything.
"use strict";

const Notices = (() => {
  const MAX_SHOWN = 3;
  const shown = new Set();      // notification ids already shown (a stream replay shows nothing twice)
  const data = [];              // the silent data messages received, newest last (for the app's own use)
  const delivery = {failed: 0}; // receipts that could not be sent yet (each is retried)

  function report(id, body, tries = 0) {
    return api.call("POST", `/v1/notifications/${encodeURIComponent(id)}/receipt`, body).catch((e) => {
      if (e.status === 409 || e.status === 404 || e.status === 422) return;   // final answers: nothing to retry
      delivery.failed += 1;
      if (tries < 5) setTimeout(() => report(id, body, tries + 1), 1000 * 2 ** tries);
    });
  }

  function seenWhenVisible(id) {
    if (!document.hidden) { report(id, {seen: true}); return; }
    const later = () => {
      if (document.hidden) return;
      document.removeEventListener("visibilitychange", later);
      report(id, {seen: true});
    };
    document.addEventListener("visibilitychange", later);
  }

  function close(card) {
    card.remove();
    const box = $("notices");
    if (!box.children.length) box.classList.add("hidden");
  }

  function show(n) {
    if (!n || !n.notification_id || shown.has(n.notification_id)) return;
    if (n.expires_at && n.expires_at < Date.now()) return;   // past its TTL: never shown
    shown.add(n.notification_id);
    if (n.silent) { data.push(n.data || {}); return; }
    const box = $("notices");
    const titleId = "notice-title-" + n.notification_id;
    const card = el("article", {class: "notice", "data-notification": n.notification_id, "data-category": n.category || "",
                                "aria-labelledby": titleId},
      el("h2", {id: titleId, class: "notice-title"}, n.title || "Latch"),
      n.body ? el("p", {class: "notice-body"}, n.body) : null);
    const row = el("div", {class: "row notice-actions"});
    for (const a of n.actions || []) {
      row.append(el("button", {type: "button", "data-action": a.id, onclick: async () => {
        for (const b of row.querySelectorAll("button")) b.disabled = true;
        await report(n.notification_id, {action: a.id});
        close(card);
      }}, a.label));
    }
    row.append(el("button", {type: "button", class: "secondary", "data-dismiss": "", "aria-label": `Dismiss: ${n.title || "notification"}`,
                             onclick: () => close(card)}, "Dismiss"));
    card.append(row);
    box.prepend(card);
    box.classList.remove("hidden");
    while (box.children.length > MAX_SHOWN) box.lastChild.remove();
    seenWhenVisible(n.notification_id);
  }

  return {show, data, delivery};
})();
