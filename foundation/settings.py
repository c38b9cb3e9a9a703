"""Every setting of Latch, in one place. Each is also an environment variable LATCH_<NAME>."""

from __future__ import annotations

import os
import secrets
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import Field, PrivateAttr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LATCH_", extra="ignore")

    host: str = "127.0.0.1"
    http_port: int = 8000
    mqtt_port: int = 1883
    ws_port: int | None = None
    data_dir: Path = Path("latch-data")
    database_url: str | None = None
    # where SQLite's one writer runs (api/db.py): "loop" (api/loop_commit.py, the default: no thread hop per
    # transaction) or "thread" (api/group_commit.py); other databases ignore it
    sqlite_writer: Literal["loop", "thread"] = "loop"
    # where the API and simulator find the broker; default: the embedded one on host:mqtt_port
    broker: str | None = None
    admin_token: str | None = None
    service_secret: str | None = None
    allow_anonymous: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_port: int | None = None
    # the broker's own settings (broker/server.py broker_options; docs/broker.md)
    tls_client_ca: Path | None = None      # client certificates signed by this CA log devices in (CN = id)
    mqtt_session_expiry_s: float = 7 * 86400.0  # a disconnected persistent session is kept this long (0 = forever)
    mqtt_max_queued: int = 1000            # QoS 1/2 messages queued per session beyond the in-flight window
    mqtt_queue_policy: str = "drop-new"    # when that queue is full: drop-new | drop-oldest
    mqtt_max_inflight: int = 100           # unacknowledged QoS 1/2 messages per session
    mqtt_max_packet_size: int = 1 << 20    # bytes; a bigger packet closes the connection
    mqtt_connect_timeout_s: float = 10.0   # from TCP accept to CONNECT
    mqtt_fsync: bool = False               # fsync every broker commit (survive power loss, not only kill -9)
    # Prometheus (docs/observability.md): the broker's own /metrics listener on host:metrics_port (None = off,
    # 0 = any free port); the API's GET /metrics takes an operator's token or metrics_token, or none if public
    metrics_port: int | None = None
    metrics_token: str | None = None
    metrics_public: bool = False

    # command timing
    settle_grace_s: float = Field(5.0, description="after expiry, how long a device may still report the outcome")
    max_wait_s: float = 60.0
    max_ttl_s: int = 3600
    default_ttl_s: int = 30
    # each API replica needs its own (LATCH_API_CLIENT_ID=latch-api-2 ...); the characters of a device id, which
    # every MQTT broker Latch runs on accepts (NATS refuses a space in a client id: tests/external/test_nats_mqtt.py)
    api_client_id: str = Field("latch-api", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    # several API replicas (PostgreSQL; docs/scaling.md)
    ingest: bool = True                    # consume device uplink here; False: an HTTP-only replica
    share_group: str | None = None         # subscribe to uplink as $share/<group>/... (brokers that support it)
    # events across replicas on NATS JetStream instead of PostgreSQL NOTIFY (api/push/nats_bus.py, docs/scaling.md):
    # the server(s), comma-separated (nats://host:4222,...); None: no NATS (the single-process default)
    nats_url: str | None = None
    nats_stream: str = "LATCH_EVENTS"      # the JetStream stream of events; its sequence is every client's cursor
    nats_replicas: int = Field(1, ge=1, le=5)   # copies of the stream in a NATS cluster (3 for a 3-node cluster)
    nats_max_age_s: float = 7 * 86_400.0   # events older than this leave the stream (a cursor before them: 400)
    nats_duplicate_window_s: float = 600.0   # a relay retried within this after NATS comes back is stored once
    # a NATS cluster as the MQTT broker (issue 18; docs/external-brokers.md, latch/nats_config.py): its client
    # URL(s), comma-separated; set, this API answers the cluster's auth callout (every MQTT login, against the
    # registry and the fence: api/registry/nats_auth.py) and disconnects a revoked or rotated device there. The two
    # secrets below are generated into DATA_DIR (nats-auth.secret, nats-issuer.seed) by the API or by
    # `latch broker-config nats`, whichever runs first; every replica and the cluster's files share them
    nats_auth_url: str | None = None
    nats_auth_secret: str | None = None    # the password of the callout's own NATS user (latch-auth)
    nats_issuer_seed: str | None = None    # the account nkey seed that signs the callout's answers ("SA...")

    demo_fleet: int = 0
    # the simulated city: locks report a position inside this disc, "lat,lon,radius_m" (foundation/geo.py);
    # the rider page centres its map here until the browser gives a location
    sim_area: str = "52.5200,13.4050,2500"

    # riders: accounts, tokens, rights (see api/riders/users.py, api/riders/rides.py)
    jwt_secret: str | None = None          # HS256 signing key; generated into DATA_DIR/jwt.secret
    # seals device command keys at rest (api/registry/keyseal.py); generated into DATA_DIR/command-keys.secret.
    # Every API replica must hold the same one (like jwt_secret)
    command_key_secret: str | None = None
    token_ttl_s: int = 12 * 3600           # access tokens (Authorization: Bearer, MQTT password)
    stream_token_ttl_s: int = 120          # short-lived tokens for ?token= (EventSource, WebSocket)
    # a session's standing/role cached per process (api/riders/sessions.py says why)
    session_cache_s: float = 5.0
    # login and sign-up (api/riders/user_routes.py, api/hashing.py): token buckets per client address and per account
    login_rate_per_address_per_s: float = 0.2   # sustained: 12 a minute per address (an IPv6 /64 counts as one)
    login_burst_per_address: int = 20
    login_rate_per_account_per_s: float = 1 / 30   # after the burst, one try per account every 30 s
    login_burst_per_account: int = 5
    signup_rate_per_address_per_s: float = 1 / 60
    signup_burst_per_address: int = 10
    trust_forwarded_for: bool = False      # behind a reverse proxy: the client address is X-Forwarded-For's last hop
    password_hash_workers: int = 1         # argon2 hashes at once (each ~1 core and 64 MiB while it runs)
    password_hash_queue: int = 8           # more waiting beyond those; the rest get 503 + Retry-After
    command_rate_per_s: float = Field(1.0, description="per-user command rate (token bucket, per process)")
    command_burst: int = 10
    low_battery_pct: int = 20

    # the event log and its transports (see api/push/events.py)
    event_ring: int = 10_000               # recent events kept in memory for resume without a query
    subscriber_buffer: int = 500           # events queued for one connection before it is cut off
    sse_keepalive_s: float = 15.0
    event_page: int = 500                  # most events in one poll/backlog page
    max_streams_per_user: int = 10         # open SSE/WebSocket/long-poll streams one user account may hold (429 past)

    # admission control for commands (api/admission.py): refuse at once (503) what cannot be finished in time
    admit_max_creating: int = 64           # commands being created at once in this process
    admit_max_queue_ms: float = 100.0      # the database writer's standing queue above which new commands wait outside

    # the HTTP boundary (api/boundary.py, api/security_headers.py)
    max_body_bytes: int = 64 * 1024        # larger request bodies get 413 before they are read
    ws_allowed_origins: list[str] = []     # browser Origins /v1/ws accepts besides the API's own (same-origin)

    # notifications to riders (api/notifications, docs/notifications.md)
    notify_max_ttl_s: int = 7 * 86_400     # the longest a notification may live
    notify_tick_s: float = 10.0            # releases of quiet-hours holds, preference reloads, count flushes this often
    # at most this many notifications of a category handed to one rider per local day (0: no cap)
    notify_daily_cap: dict[str, int] = {"transactional": 0, "service": 10, "marketing": 3}
    # a notification's MQTT copies (one QoS 1 message per rider) wait while this many of the API link's
    # messages are unacknowledged: MQTT allows a connection 65,535, and commands need the rest
    notify_mqtt_window: int = Field(20_000, ge=1, le=60_000)
    # MQTT copies go to riders whose app logged into the broker within this many seconds: the life of their
    # persistent session there (LATCH_MQTT_SESSION_EXPIRY_S on Latch's broker); others read by cursor
    notify_mqtt_session_s: float = Field(7 * 86_400.0, gt=0)

    # fleet commands (api/fleet/service.py)
    fleet_max_devices: int = 100_000       # devices one fleet command may target
    fleet_max_rate_per_min: int = 60_000   # highest rollout rate a fleet command may ask for
    fleet_tick_s: float = 0.25             # the rollout worker issues each running fleet's due devices this often
    fleet_concurrency: int | None = None   # device commands the rollout creates at once; None: 16 SQLite, 4 PostgreSQL

    # external MQTT brokers: Mosquitto, EMQX, VerneMQ (docs/external-brokers.md)
    broker_ca: Path | None = None          # PEM CA bundle for an mqtts:// broker (default: the system's trust store)
    broker_hook_secret: str | None = None  # what EMQX/VerneMQ must send to /v1/broker/...; DATA_DIR/broker-hook.secret
    mosquitto_config_dir: Path | None = None  # set: rewrite Mosquitto's password/ACL files here on every device change
    mosquitto_pid_file: Path | None = None    # ... and SIGHUP the pid in this file so Mosquitto reloads them

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'latch.db'}"

    def broker_address(self) -> tuple[str, int]:
        """The broker's (first) address."""
        return self.broker_addresses()[0]

    def broker_addresses(self) -> list[tuple[str, int]]:
        """Every node of the broker (LATCH_BROKER may list several, comma-separated: a clustered broker); the
        API and the simulator start on the first that answers and move to the next when theirs goes away."""
        if self.broker:
            return [(b.host, b.port) for b in parse_brokers(self.broker)]
        return [(self.host, self.mqtt_port)]

    def broker_tls(self) -> ssl.SSLContext | None:
        """The TLS context for an mqtts:// broker (CA: broker_ca, else the system's); None for plain MQTT."""
        return broker_tls_context(self.broker, self.broker_ca) if self.broker else None

    # where the admin token came from: "generated" (this start made it: print it, once), "file" (an earlier
    # start made it: print only the file's path) or "setting" (LATCH_ADMIN_TOKEN / --token: print neither)
    _admin_token_source: str | None = PrivateAttr(None)

    @property
    def admin_token_file(self) -> Path:
        return self.data_dir / "admin.token"

    @property
    def admin_token_source(self) -> str:
        return self._admin_token_source or "setting"

    def ensure_nats_auth_secrets(self) -> None:
        """The NATS auth callout's secrets, from the data dir or generated there (0600)."""
        _private_dir(self.data_dir)
        if self.nats_auth_secret is None:
            self.nats_auth_secret = _stored_secret(self.data_dir / "nats-auth.secret")
        if self.nats_issuer_seed is None:
            self.nats_issuer_seed = _stored_secret(self.data_dir / "nats-issuer.seed",
                                                   lambda: new_nats_account_seed().decode())

    def nats_auth_servers(self) -> list[str]:
        return [u.strip() for u in (self.nats_auth_url or "").split(",") if u.strip()]

    def ensure_secrets(self) -> None:
        """Fill the secrets from the data dir, generating them on first start; make the data dir private.

        Everything Latch keeps in the data dir is readable by its owner only: the directory 0700, the secret
        files, latch.db and broker.db (and their -wal/-shm/-journal, which SQLite creates with the database
        file's mode), the cached device credentials (*.json) 0600. The two databases are created empty here
        with that mode when they do not exist yet (SQLite takes an empty file as a new database), and
        tightened when an earlier Latch left them 0644."""
        _private_dir(self.data_dir)
        if self.admin_token is None:
            self.admin_token, generated = _stored_secret_of(self.admin_token_file)
            self._admin_token_source = "generated" if generated else "file"
        if self.service_secret is None:
            self.service_secret = _stored_secret(self.data_dir / "service.secret")
        if self.jwt_secret is None:
            self.jwt_secret = _stored_secret(self.data_dir / "jwt.secret")
        if self.broker_hook_secret is None:
            self.broker_hook_secret = _stored_secret(self.data_dir / "broker-hook.secret")
        if self.command_key_secret is None:
            self.command_key_secret = _stored_secret(self.data_dir / "command-keys.secret")
        if self.nats_auth_url is not None:   # the API decides a NATS cluster's MQTT logins (api/registry/nats_auth.py)
            self.ensure_nats_auth_secrets()
        # the registry finds the master key of its database's command-key seal here (api/registry/keyseal.py)
        _COMMAND_KEY_SECRETS[self.resolved_database_url()] = self.command_key_secret
        databases = [self.data_dir / "broker.db"]
        sqlite_file = _sqlite_file(self.resolved_database_url())   # also a SQLite database outside the data dir
        if sqlite_file is not None:
            sqlite_file.parent.mkdir(parents=True, exist_ok=True)
            databases.append(sqlite_file)
        for path in databases:
            _private_file(path, create=True)
            for suffix in ("-wal", "-shm", "-journal"):
                _private_file(path.with_name(path.name + suffix), create=False)
        for path in self.data_dir.glob("*.json"):   # cached device credentials (demo fleet, `latch sim`)
            _private_file(path, create=False)


class BrokerURL(NamedTuple):
    host: str
    port: int
    tls: bool


_BROKER_SCHEMES = {"mqtt": False, "tcp": False, "mqtts": True, "ssl": True}


def parse_broker(url: str) -> BrokerURL:
    """'mqtt://host:port', 'mqtts://host:port' (TLS) or 'host:port'; with a scheme the port may be left
    out (1883, or 8883 for mqtts)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    elif scheme.lower() not in _BROKER_SCHEMES:
        raise ValueError(f"broker address {url!r}: unknown scheme {scheme!r} (use mqtt:// or mqtts://)")
    tls = _BROKER_SCHEMES.get(scheme.lower(), False)
    rest = rest.rstrip("/")
    if rest.startswith("[") and "]" in rest:                  # [IPv6] or [IPv6]:PORT
        host, _, after = rest[1:].partition("]")
        port = after[1:] if after.startswith(":") else after
    elif ":" in rest:
        host, _, port = rest.rpartition(":")
    else:
        host, port = rest, ""
    if not port and scheme:
        port = str(8883 if tls else 1883)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"broker address {url!r} must look like mqtt://HOST:PORT, mqtts://HOST:PORT or HOST:PORT")
    return BrokerURL(host.strip("[]"), int(port), tls)


def parse_brokers(urls: str) -> list[BrokerURL]:
    """Several broker addresses, comma-separated (the nodes of one clustered broker), all with TLS or none."""
    parsed = [parse_broker(u.strip()) for u in urls.split(",") if u.strip()]
    if not parsed:
        raise ValueError("no broker address given")
    if len({b.tls for b in parsed}) > 1:
        raise ValueError(f"broker addresses {urls!r} mix mqtt:// and mqtts://: a cluster's nodes are one or the other")
    return parsed


def parse_broker_url(url: str) -> tuple[str, int]:
    """'mqtt://host:port', 'mqtts://host:port' or 'host:port' -> (host, port); see parse_broker for TLS."""
    host, port, _ = parse_broker(url)
    return host, port


def broker_tls_context(url: str, ca: Path | None = None) -> ssl.SSLContext | None:
    """A client TLS context verifying the broker (against `ca`, else the system's trust store) when `url`
    is mqtts://; None for plain MQTT."""
    if not parse_brokers(url)[0].tls:
        return None
    if ca is not None and not Path(ca).is_file():
        raise ValueError(f"broker CA file {str(ca)!r} (LATCH_BROKER_CA) does not exist")
    return ssl.create_default_context(cafile=str(ca) if ca is not None else None)


def _sqlite_file(url: str) -> Path | None:
    """The file of a sqlite:/// URL (None for PostgreSQL and in-memory databases)."""
    if not url.startswith("sqlite"):
        return None
    path = url.partition(":///")[2].partition("?")[0]
    return Path(path) if path and path != ":memory:" else None


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)


def _private_file(path: Path, create: bool) -> None:
    """Mode 0600; with `create`, an empty file is made so when missing (created 0600, not chmod-ed after)."""
    if create:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            return
        except FileExistsError:
            pass
    try:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
    except FileNotFoundError:
        pass


def _stored_secret_of(path: Path, make: Callable[[], str] = lambda: secrets.token_urlsafe(32)) -> tuple[str, bool]:
    """(the secret in `path`, whether it was generated now by `make`); created 0600 from the start."""
    if path.exists():
        _private_file(path, create=False)
        return path.read_text().strip(), False
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value, True


def _stored_secret(path: Path, make: Callable[[], str] = lambda: secrets.token_urlsafe(32)) -> str:
    return _stored_secret_of(path, make)[0]


_COMMAND_KEY_SECRETS: dict[str, str] = {}   # database URL -> the command-key master secret ensure_secrets() found


def command_key_secret_for(database_url: str) -> str | None:
    """The command-key master secret of the database at `database_url`, once Settings.ensure_secrets() ran for it
    in this process (api/registry/keyseal.py seals the locks' command keys with it)."""
    return _COMMAND_KEY_SECRETS.get(database_url)


def new_nats_account_seed() -> bytes:
    """A fresh NATS account nkey seed (``SA...``): the auth callout's issuer (api/registry/nats_jwt.py signs
    with it)."""
    import nkeys

    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_ACCOUNT))
