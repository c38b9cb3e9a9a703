"""Commands: an action on a lock ("unlock bike-0042") from request to final outcome, exactly once.

Owns the command's one state machine (`states`), making and signing it (`service`: CommandService, idempotency,
TTL, priority of a rider's unlock over bulk work in `priority`, the params a lock accepts in `params`), its
statements on the driver's cursor (`sql`), the device's answers (`ingest`), the deadlines (`sweeper`), the
`?wait=` answers (`waiters`), its log lines (`log`), and its routes (`routes`: POST /v1/devices/{id}/commands,
GET /v1/commands).

`sql` holds the command path's statements on the driver's cursor; the registry (reported state), push (the event
log's append) and rides (a bike's open ride) run theirs from it too, inside the same transactions.

May import: the API's ground (db, group commit, clock, errors, metrics, models, hooks, link, pg_bus), the device
registry (api/registry) and foundation/. Rides, fleet rollouts and push build on it.
"""
