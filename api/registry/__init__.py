"""The device registry and who may log into the broker.

Owns the devices (`devices`: registration, secrets, command keys sealed by `keyseal`, presence and reported
state; `routes`: /v1/devices), and every broker tier's login and fence decisions from it: Latch's own broker
(`credentials`, the CredentialStore broker/credentials.py asks), EMQX/VerneMQ HTTP hooks (`broker_auth`,
`broker_auth_routes`), Mosquitto's files (`mosquitto_config`), and the NATS auth callout (`nats_auth`,
`nats_jwt`).

May import: the API's ground (db, clock, errors, models, tokens), the riders' table (a rider's app logs in over
MQTT), commands/sql.py (the reported state is merged by the command path's statements), broker/identity.py and
foundation/.
"""
