"""Push: how an event reaches the riders and operators who may see it, on every transport.

Owns the event log (`events`: written once with the change that caused it, a cursor per client, live
subscriptions fed without a task per subscriber), its rows (`event_models`), the wires it writes to
(`wire`: an SSE stream or a WebSocket written straight to its socket; `ws_detach`: a WebSocket moved off
its ASGI call), the transports' routes (`routes`: SSE, long and short polls of /v1/events; `ws_routes`:
the WebSocket, which also takes commands), and the log across replicas on NATS JetStream (`nats_bus`).

May import: the API's ground (auth, db, clock, errors, metrics, models, pg_bus) and foundation/. Notifications
(api/notifications) build on it; commands, rides and fleet append to it.
"""
