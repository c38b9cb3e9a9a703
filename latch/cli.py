"""The `latch` command line. Every option is also an environment variable (LATCH_<OPTION>)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from latch.settings import Settings

log = logging.getLogger("latch")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; env LATCH_HOST)")
    p.add_argument("--data-dir", type=Path, help="SQLite database and secrets (default ./latch-data)")
    p.add_argument("--database-url", help="SQLAlchemy URL (default sqlite:///DATA_DIR/latch.db)")
    p.add_argument("--log-level", default="INFO", type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])


def _broker_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mqtt-port", type=int, help="MQTT port (default 1883; 0 = any free port)")
    p.add_argument("--ws-port", type=int, help="MQTT over WebSocket port (off unless given)")
    p.add_argument("--tls-cert", type=Path, help="PEM server certificate for an MQTT TLS listener")
    p.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")
    p.add_argument("--tls-port", type=int, help="MQTT TLS port (default 8883)")
    p.add_argument("--allow-anonymous", action="store_true", default=None,
                   help="development only: accept MQTT clients without credentials (fenced off Latch topics)")
    p.add_argument("--tls-client-ca", type=Path, help="PEM CA: client certificates it signed log devices in (CN)")
    p.add_argument("--mqtt-session-expiry-s", type=float, metavar="S",
                   help="keep a disconnected persistent session this long (default 7 days; 0 = forever)")
    p.add_argument("--mqtt-max-queued", type=int, metavar="N", help="QoS 1/2 messages queued per session (1000)")
    p.add_argument("--mqtt-queue-policy", choices=("drop-new", "drop-oldest"), help="when a queue is full")
    p.add_argument("--mqtt-max-inflight", type=int, metavar="N", help="unacknowledged messages per session (100)")
    p.add_argument("--mqtt-max-packet-size", type=int, metavar="BYTES", help="larger packets close the connection")
    p.add_argument("--mqtt-connect-timeout-s", type=float, metavar="S", help="TCP accept to CONNECT (10)")
    p.add_argument("--mqtt-fsync", action="store_true", default=None,
                   help="fsync each broker commit: survive power loss, not only a killed process")


def _api_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--http-port", type=int, help="HTTP port (default 8000; 0 = any free port)")
    p.add_argument("--broker", help="use this MQTT broker (mqtt://HOST:PORT) instead of HOST:--mqtt-port")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latch", description="Latch: device commands over MQTT.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="broker + API (+ a simulated demo fleet), all in one process")
    _common(serve), _broker_opts(serve), _api_opts(serve)
    serve.add_argument("--demo-fleet", type=int, metavar="N", help="also run N simulated locks (bike-0001..)")
    serve.add_argument("--no-migrate", dest="migrate", action="store_false",
                       help="do not apply database migrations at start (refuse to start if any is missing)")

    broker = sub.add_parser("broker", help="the MQTT broker alone")
    _common(broker), _broker_opts(broker)
    broker.add_argument("--metrics-port", type=int,
                        help="Prometheus GET /metrics on --host:PORT (off unless given; 0 = any free port)")

    api = sub.add_parser("api", help="the control API alone, against a running broker")
    _common(api), _api_opts(api)
    api.add_argument("--mqtt-port", type=int, help="port of the broker on --host (when --broker is not given)")
    api.add_argument("--api-client-id", help="MQTT client id of this replica (default latch-api; unique per replica)")
    api.add_argument("--no-ingest", dest="ingest", action="store_false", default=None,
                     help="do not consume device messages here (an HTTP-only replica)")
    api.add_argument("--share-group", help="consume device messages as $share/GROUP/... (Mosquitto, EMQX, HiveMQ)")

    db = sub.add_parser("db", help="the database schema (Alembic migrations)")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    for name, text in (("upgrade", "apply every missing migration (run once before `latch api` replicas start)"),
                       ("check", "exit 0 when the database is at this Latch's revision, 1 (saying why) otherwise")):
        p = db_sub.add_parser(name, help=text)
        p.add_argument("--data-dir", type=Path, help="SQLite database and secrets (default ./latch-data)")
        p.add_argument("--database-url", help="SQLAlchemy URL (default sqlite:///DATA_DIR/latch.db)")
        p.add_argument("--log-level", default="INFO")

    sim = sub.add_parser("sim", help="simulated locks against a running broker")
    sim.add_argument("--devices", type=int, default=100)
    sim.add_argument("--broker", default="127.0.0.1:1883", help="HOST:PORT of the MQTT broker")
    sim.add_argument("--api", default="http://127.0.0.1:8000", help="API that registers the simulated locks")
    sim.add_argument("--token", help="operator token (default: LATCH_ADMIN_TOKEN or DATA_DIR/admin.token)")
    sim.add_argument("--data-dir", type=Path, help="where the fleet's credentials are kept")
    sim.add_argument("--prefix", default="sim-", help="device ids are PREFIX0001..")
    sim.add_argument("--actuation-delay", type=float, default=0.05, help="seconds the motor runs")
    sim.add_argument("--ack-delay", type=float, default=0.0, help="seconds before a lock reacts")
    sim.add_argument("--jam-rate", type=float, default=0.0, help="share of actuations that jam")
    sim.add_argument("--drop-rate", type=float, default=0.0, help="share of commands never answered")
    sim.add_argument("--log-level", default="INFO")

    from latch.mosquitto_config import add_parser as add_broker_config
    add_broker_config(sub)   # `latch broker-config mosquitto --out DIR`: dispatched through its args.func

    try:
        from firmware.tools import add_parser as add_firmware
    except ImportError:
        pass
    else:
        add_firmware(sub)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in vars(args).items()
                 if v is not None and k in Settings.model_fields}
    return Settings(**overrides)


async def _until_signalled(start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]) -> None:
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, done.set)
    await start()
    try:
        await done.wait()
    finally:
        await stop()


async def _serve(settings: Settings, demo_fleet: int, embedded_broker: bool, migrate: bool) -> None:
    from latch.stack import Stack

    stack = Stack(settings, embedded_broker=embedded_broker, demo_fleet=demo_fleet, migrate=migrate)

    async def start() -> None:
        await stack.start()
        host, port = settings.broker_address()
        print(f"Latch is running.\n"
              f"  API:            {stack.api_url}\n"
              f"  OpenAPI page:   {stack.api_url}/docs\n"
              f"  MQTT broker:    {'mqtts' if settings.broker_tls() else 'mqtt'}://{host}:{port}"
              + ("" if embedded_broker else " (external)") + "\n"
              + _operator_token_lines(settings)
              + (f"  Demo fleet:     {demo_fleet} simulated locks, bike-0001..bike-{demo_fleet:04d}\n" if demo_fleet else "")
              + f"Try:\n  curl -s -X POST -H \"Authorization: Bearer {_token_shell(settings)}\" "
              f"-H 'Content-Type: application/json' -d '{{\"action\": \"unlock\"}}' "
              f"'{stack.api_url}/v1/devices/bike-0001/commands?wait=5'\n", flush=True)

    await _until_signalled(start, stack.stop)


def _operator_token_lines(settings: Settings) -> str:
    """The operator token is printed once, on the start that generated it; afterwards only where it is kept
    (logs end up in journald and docker logs, where a token must not)."""
    source, path = settings.admin_token_source, settings.admin_token_file
    if source == "generated":
        return f"  Operator token: {settings.admin_token}\n                  (shown this once; kept in {path}, mode 0600)\n"
    if source == "file":
        return f"  Operator token: in {path}\n"
    return "  Operator token: the one set in LATCH_ADMIN_TOKEN\n"


def _token_shell(settings: Settings) -> str:
    """The token as a shell expression, never its value."""
    return f"$(cat {settings.admin_token_file})" if settings.admin_token_source != "setting" else "$LATCH_ADMIN_TOKEN"


async def _broker(settings: Settings) -> None:
    from api import schema
    from api.db import Database
    from broker.credentials import SqlCredentialStore
    from broker.server import EmbeddedBroker, broker_options, tune_gc

    settings.ensure_secrets()
    db = Database(settings.resolved_database_url())
    broker = EmbeddedBroker(broker_options(settings),
                            SqlCredentialStore(db, settings.service_secret or "", settings.jwt_secret))

    async def start() -> None:
        await schema.prepare(db, settings.resolved_database_url())   # a fresh SQLite data dir: created
        await broker.start()
        tune_gc()       # this process is only the broker: no full-heap collections mid-stream
        print("Latch broker listening: " + ", ".join(f"{k} {settings.host}:{v}" for k, v in broker.ports.items()),
              flush=True)

    async def stop() -> None:
        await broker.stop()
        await db.close()

    await _until_signalled(start, stop)


async def _db(settings: Settings, what: str) -> None:
    from api import schema
    from api.db import Database

    url = settings.resolved_database_url()
    db = Database(url)
    try:
        if what == "upgrade":
            before = await db.run_sync(schema.current_revision)
            await schema.upgrade(db)
            after = await schema.check(db, url)
            print(f"database {schema.display_url(url)}: " +
                  (f"at {after} (already)" if before == after else f"upgraded {before or 'empty'} -> {after}"))
        else:
            print(f"database {schema.display_url(url)}: at {await schema.check(db, url)}, as this Latch needs")
    finally:
        await db.close()


async def _sim(args: argparse.Namespace) -> None:
    from device_sim.lock import Behaviour
    from device_sim.provision import run_sim

    behaviour = Behaviour(ack_delay_s=args.ack_delay, actuation_delay_s=args.actuation_delay,
                          jam_rate=args.jam_rate, drop_rate=args.drop_rate)
    settings = Settings(**({"data_dir": args.data_dir} if args.data_dir else {}))
    token = args.token or settings.admin_token
    if token is None:
        token_file = settings.data_dir / "admin.token"
        if not token_file.exists():
            raise SystemExit(f"no operator token: pass --token, set LATCH_ADMIN_TOKEN or create {token_file}")
        token = token_file.read_text().strip()
    await run_sim(args.api, token, args.broker, args.devices, args.prefix, behaviour, settings.data_dir)


def main(argv: list[str] | None = None) -> None:
    # Database work runs on threads that hand the GIL back and forth with the event loop at every
    # statement; at the default 5 ms switch interval each hand-off can stall a transaction that long.
    sys.setswitchinterval(0.0005)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("amqtt").setLevel(logging.WARNING)
    logging.getLogger("gmqtt").setLevel(logging.WARNING)
    logging.getLogger("transitions").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    if args.command == "sim":
        asyncio.run(_sim(args))
        return
    if args.command not in ("serve", "broker", "api", "db"):
        sys.exit(args.func(args))  # subcommands that bring their own handler (firmware tools)
    from api.schema import SchemaNotReady

    settings = settings_from(args)
    if settings.broker is not None:   # checked before anything starts: one line naming the option
        from latch.settings import parse_broker
        try:
            parse_broker(settings.broker)
        except ValueError as e:
            raise SystemExit(f"latch {args.command}: --broker: {e}") from None
    try:
        if args.command == "db":
            asyncio.run(_db(settings, args.db_command))
        elif args.command == "serve":
            demo = args.demo_fleet if args.demo_fleet is not None else settings.demo_fleet
            asyncio.run(_serve(settings, demo, embedded_broker=settings.broker is None, migrate=args.migrate))
        elif args.command == "broker":
            from broker.server import run as run_broker   # with uvloop when installed
            run_broker(lambda: _broker(settings))
        else:
            asyncio.run(_serve(settings, 0, embedded_broker=False, migrate=False))
    except SchemaNotReady as e:
        raise SystemExit(f"latch {args.command}: {e}") from None
    except OSError as e:
        raise SystemExit(f"latch {args.command}: {e}") from e


if __name__ == "__main__":
    main(sys.argv[1:])
