"""Notifications to riders: written once, fanned out through the event log, filtered per rider at read time.

    models.py   the tables (notification, notification_pref, notification_receipt) and the API's shapes
    rules.py    pure per-rider rules: opt-out, quiet hours, a day in the rider's time zone
    fanout.py   the per-rider decision for one position of a notification in the event stream, and the counts
    service.py  sending, preferences, receipts, the release of held notifications, MQTT fan-out, flushing counts
    routes.py   the HTTP surface

One notification is one `notification` row and one `event` row (kind "notification", audience
event_models.RIDERS). Every transport reads the event log, and the log asks fanout.py, per rider,
whether and how that rider sees it (docs/notifications.md).
"""
