"""The `latch` command line. Every option is also an environment variable (LATCH_<OPTION>).

Building the parser imports nothing but the standard library (`latch --help` in well under 0.3 s): each
command imports what it runs. Every option is checked before anything starts (argparse types below, then
the settings they and the environment make, in `_check`): a bad one is one line naming it, exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from foundation import logs

if TYPE_CHECKING:
    from foundation.settings import Settings

log = logging.getLogger("latch")


class _Parser(argparse.ArgumentParser):
    """A usage error is one line: `latch serve: argument --http-port: ...` (and where to read more)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0-65535)")
    return value


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: must be {minimum} or more")
        return value
    parse.__name__ = "count"
    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text}: must be 0 or more seconds")
    return value


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: must be between 0 and 1")
    return value


def _file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r}: no such file")
    return path


def _dir(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    return path


def _http_url(text: str) -> str:
    if not text.startswith(("http://", "https://")) or len(text) <= len("http://"):
        raise argparse.ArgumentTypeError(f"{text!r}: must look like http://HOST:PORT")
    return text.rstrip("/")


def _log_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default=os.environ.get("LATCH_LOG_LEVEL", "INFO"), type=str.upper,
                   choices=logs.LEVELS, help="default INFO (env LATCH_LOG_LEVEL)")
    p.add_argument("--log-format", choices=logs.FORMATS, default=None,
                   help="one event per line: json, or text (default: text on a terminal, json otherwise; "
                        "env LATCH_LOG_FORMAT)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="address to listen on (default 127.0.0.1, this machine only; "
                                  "0.0.0.0 = every interface; env LATCH_HOST)")
    p.add_argument("--data-dir", type=_dir, help="SQLite database and secrets (default ./latch-data)")
    p.add_argument("--database-url", help="SQLAlchemy URL (default sqlite:///DATA_DIR/latch.db)")
    _log_opts(p)


def _broker_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mqtt-port", type=_port, help="MQTT port (default 1883; 0 = any free port)")
    p.add_argument("--ws-port", type=_port, help="MQTT over WebSocket port (off unless given)")
    p.add_argument("--tls-cert", type=_file, help="PEM server certificate for an MQTT TLS listener")
    p.add_argument("--tls-key", type=_file, help="PEM private key for --tls-cert")
    p.add_argument("--tls-port", type=_port, help="MQTT TLS port (default 8883)")
    p.add_argument("--allow-anonymous", action="store_true", default=None,
                   help="development only: accept MQTT clients without credentials (fenced off Latch topics)")
    p.add_argument("--tls-client-ca", type=_file, help="PEM CA: client certificates it signed log devices in (CN)")
    p.add_argument("--mqtt-session-expiry-s", type=_seconds, metavar="S",
                   help="keep a disconnected persistent session this long (default 7 days; 0 = forever)")
    p.add_argument("--mqtt-max-queued", type=_count(0), metavar="N", help="QoS 1/2 messages queued per session (1000)")
    p.add_argument("--mqtt-queue-policy", choices=("drop-new", "drop-oldest"), help="when a queue is full")
    p.add_argument("--mqtt-max-inflight", type=_count(1), metavar="N", help="unacknowledged messages per session (100)")
    p.add_argument("--mqtt-max-packet-size", type=_count(64), metavar="BYTES",
                   help="larger packets close the connection")
    p.add_argument("--mqtt-connect-timeout-s", type=_seconds, metavar="S", help="TCP accept to CONNECT (10)")
    p.add_argument("--mqtt-fsync", action="store_true", default=None,
                   help="fsync each broker commit: survive power loss, not only a killed process")


def _api_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--http-port", type=_port, help="HTTP port (default 8000; 0 = any free port)")
    p.add_argument("--broker", help="use this MQTT broker (mqtt[s]://HOST:PORT; a cluster's nodes comma-separated) "
                                    "instead of HOST:--mqtt-port")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="latch", description="Latch: device commands over MQTT.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="broker + API (+ a simulated demo fleet), all in one process")
    _common(serve), _broker_opts(serve), _api_opts(serve)
    serve.add_argument("--demo-fleet", type=_count(0), metavar="N", help="also run N simulated locks (bike-0001..)")
    serve.add_argument("--no-migrate", dest="migrate", action="store_false",
                       help="do not apply database migrations at start (refuse to start if any is missing)")

    broker = sub.add_parser("broker", help="the MQTT broker alone")
    _common(broker), _broker_opts(broker)
    broker.add_argument("--metrics-port", type=int,
                        help="Prometheus GET /metrics on --host:PORT (off unless given; 0 = any free port)")

    api = sub.add_parser("api", help="the control API alone, against a running broker")
    _common(api), _api_opts(api)
    api.add_argument("--mqtt-port", type=_port, help="port of the broker on --host (when --broker is not given)")
    api.add_argument("--api-client-id", help="MQTT client id of this replica (default latch-api; unique per replica)")
    api.add_argument("--no-ingest", dest="ingest", action="store_false", default=None,
                     help="do not consume device messages here (an HTTP-only replica)")
    api.add_argument("--share-group", help="consume device messages as $share/GROUP/... (Mosquitto, EMQX, HiveMQ)")

    db = sub.add_parser("db", help="the database schema (Alembic migrations)")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    for name, text in (("upgrade", "apply every missing migration (run once before `latch api` replicas start)"),
                       ("check", "exit 0 when the database is at this Latch's revision, 1 (saying why) otherwise")):
        p = db_sub.add_parser(name, help=text)
        p.add_argument("--data-dir", type=_dir, help="SQLite database and secrets (default ./latch-data)")
        p.add_argument("--database-url", help="SQLAlchemy URL (default sqlite:///DATA_DIR/latch.db)")
        _log_opts(p)

    sim = sub.add_parser("sim", help="simulated locks against a running broker (registered through the API)")
    sim.add_argument("--devices", type=_count(0), default=100, help="how many locks (100)")
    sim.add_argument("--broker", default="127.0.0.1:1883",
                     help="HOST:PORT (or mqtt[s]://HOST:PORT) of the MQTT broker; a cluster's nodes comma-separated")
    sim.add_argument("--api", type=_http_url, default="http://127.0.0.1:8000",
                     help="API that registers the simulated locks")
    sim.add_argument("--token", help="operator token (default: LATCH_ADMIN_TOKEN or DATA_DIR/admin.token)")
    sim.add_argument("--data-dir", type=_dir, help="where the fleet's credentials are kept")
    sim.add_argument("--prefix", default="sim-", help="device ids are PREFIX0001..")
    sim.add_argument("--actuation-delay", type=_seconds, default=0.05, help="seconds the motor runs")
    sim.add_argument("--ack-delay", type=_seconds, default=0.0, help="seconds before a lock reacts")
    sim.add_argument("--jam-rate", type=_share, default=0.0, help="share of actuations that jam (0-1)")
    sim.add_argument("--drop-rate", type=_share, default=0.0, help="share of commands never answered (0-1)")
    gone = sim.add_mutually_exclusive_group()
    gone.add_argument("--cleanup", action="store_true",
                      help="revoke through the API the PREFIX locks this simulator registered "
                           "(DELETE /v1/devices/ID), then exit")
    gone.add_argument("--ephemeral", action="store_true",
                      help="revoke the locks it registered through the API when it stops (Ctrl-C)")
    _log_opts(sim)

    _broker_config_parser(sub)   # `latch broker-config mosquitto --out DIR` (api/registry/mosquitto_config.py)

    try:
        from firmware.tools import add_parser as add_firmware
    except ImportError:
        pass
    else:
        add_firmware(sub)
    return parser


def _broker_config_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`latch broker-config mosquitto ...`; its work is api/registry/mosquitto_config.py cli_main, imported when run."""
    p = sub.add_parser("broker-config", help="write an external broker's configuration from Latch's registry",
                       description="Write Mosquitto's password_file, acl_file and latch.conf from the device "
                                   "registry, or a NATS cluster's node files (docs/external-brokers.md).")
    p.add_argument("flavour", choices=["mosquitto", "nats"],
                   help="the broker: mosquitto (files from the registry), nats (a cluster whose logins Latch "
                        "answers: its auth callout); EMQX and VerneMQ call Latch's HTTP hooks instead")
    p.add_argument("--out", type=Path, required=True,
                   help="directory for password_file, acl_file, latch.conf (mosquitto) or node-N.conf (nats)")
    p.add_argument("--data-dir", type=_dir, help="Latch's data dir: database and service secret (./latch-data)")
    p.add_argument("--database-url", help="SQLAlchemy URL (default sqlite:///DATA_DIR/latch.db)")
    p.add_argument("--port", type=_port, default=1883, help="port of the listener in latch.conf (1883)")
    p.add_argument("--bind", help="address of that listener ('' = every interface; default 127.0.0.1); nats: of "
                                  "every node's listeners (default: the node's own host)")
    p.add_argument("--service-port", type=_port, default=1884,
                   help="a second listener for the API replicas, whose client ids are their own (1884; 0 = none)")
    p.add_argument("--service-bind", default="127.0.0.1", help="address of the service listener (127.0.0.1)")
    p.add_argument("--reload-pid-file", type=Path, metavar="F",
                   help="then SIGHUP the Mosquitto whose pid is in F (its pid_file), so it reloads the files")
    nats = p.add_argument_group("nats (latch/nats_config.py)")
    nats.add_argument("--nodes", metavar="HOST:CLIENT:CLUSTER:MQTT[,...]",
                      help="the cluster's nodes: each one's host and its client, route and MQTT ports")
    nats.add_argument("--fleet", type=int, metavar="N",
                      help="devices and riders to size the limits for (default: twice the registry's, >= 1000)")
    nats.add_argument("--store-dir", type=Path, metavar="D", help="JetStream stores, D/node-N (DATA_DIR/nats)")
    nats.add_argument("--tls-cert", type=Path, metavar="F", help="the MQTT listeners' certificate (PEM)")
    nats.add_argument("--tls-key", type=Path, metavar="F", help="its key")
    nats.add_argument("--monitor-port", type=_port, metavar="P", help="each node's HTTP monitoring port (/healthz)")
    _log_opts(p)

    def run(args: argparse.Namespace) -> int:
        if args.flavour == "nats":
            from latch import nats_config
            return nats_config.cli_main(args)
        from api.registry.mosquitto_config import cli_main
        return cli_main(args)

    p.set_defaults(func=run)


def settings_from(args: argparse.Namespace) -> Settings:
    from foundation.settings import Settings

    overrides = {k: v for k, v in vars(args).items()
                 if v is not None and k in Settings.model_fields}
    return Settings(**overrides)


async def _until_signalled(start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]],
                           what: str) -> None:
    """Start, run until SIGINT/SIGTERM (also one that comes during the start), stop in order, say so.
    Ctrl-C never ends in a traceback: the signals only set an event while this runs."""
    import asyncio
    import contextlib
    import signal

    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, done.set)
    starting = asyncio.ensure_future(start())
    waiting = asyncio.ensure_future(done.wait())
    failed = True
    try:
        await asyncio.wait({starting, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():   # signalled while starting: stop what started
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        else:
            starting.result()     # a failed start raises here (and what it started is stopped below)
            await waiting
        failed = False
    finally:
        waiting.cancel()
        if not failed:
            log.info("stopping %s", what)
        with logs.shutting_down():
            await stop()
        if not failed:
            print(f"{what} stopped.", flush=True)


async def _serve(settings: Settings, demo_fleet: int, embedded_broker: bool, migrate: bool) -> None:
    from latch.stack import Stack

    stack = Stack(settings, embedded_broker=embedded_broker, demo_fleet=demo_fleet, migrate=migrate)

    async def start() -> None:
        await stack.start()
        host, port = settings.broker_address()
        url = stack.api_url
        print(f"Latch is running.\n"
              f"  Rider page:     {url}/\n"
              f"  Operator console: {url}/ops\n"
              f"  API:            {url}  (OpenAPI page: {url}/docs, health: {url}/healthz)\n"
              f"  MQTT broker:    {'mqtts' if settings.broker_tls() else 'mqtt'}://{host}:{port}"
              + ("" if embedded_broker else " (external)") + "\n"
              + _operator_token_lines(settings)
              + (f"  Demo fleet:     {demo_fleet} simulated locks, bike-0001..bike-{demo_fleet:04d}\n"
                 if demo_fleet else "")
              + (f"  Listening on {settings.host} only: LATCH_HOST=0.0.0.0 opens it to your network (a phone)\n"
                 if settings.host in ("127.0.0.1", "localhost", "::1") else "")
              + f"Try:\n  curl -s -X POST -H \"Authorization: Bearer {_token_shell(settings)}\" "
              f"-H 'Content-Type: application/json' -d '{{\"action\": \"unlock\"}}' "
              f"'{url}/v1/devices/bike-0001/commands?wait=5'\n"
              f"Ctrl-C stops it.", flush=True)

    await _until_signalled(start, stack.stop, "Latch")


def _operator_token_lines(settings: Settings) -> str:
    """The operator token is printed once, on the start that generated it; afterwards only where it is kept
    (logs end up in journald and docker logs, where a token must not)."""
    source, path = settings.admin_token_source, settings.admin_token_file
    if source == "generated":
        return (f"  Operator token: {settings.admin_token}\n"
                f"                  (shown this once; kept in {path}, mode 0600)\n")
    if source == "file":
        return f"  Operator token: in {path}\n"
    return "  Operator token: the one set in LATCH_ADMIN_TOKEN\n"


def _token_shell(settings: Settings) -> str:
    """The token as a shell expression, never its value."""
    return f"$(cat {settings.admin_token_file})" if settings.admin_token_source != "setting" else "$LATCH_ADMIN_TOKEN"


async def _broker(settings: Settings) -> None:
    from api import schema
    from api.db import Database
    from api.registry.credentials import SqlCredentialStore
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
        log.info("stopping the broker")
        await broker.stop()
        await db.close()

    await _until_signalled(start, stop, "Latch broker")


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
    from device_sim.provision import SimError, cache_file, cleanup, run_sim
    from foundation.settings import Settings, parse_broker

    try:
        parse_broker(args.broker)
    except ValueError as e:
        raise SystemExit(f"latch sim: argument --broker: {e}") from None
    behaviour = Behaviour(ack_delay_s=args.ack_delay, actuation_delay_s=args.actuation_delay,
                          jam_rate=args.jam_rate, drop_rate=args.drop_rate)
    settings = Settings(**({"data_dir": args.data_dir} if args.data_dir else {}))
    token = args.token or settings.admin_token
    if token is None:
        token_file = settings.data_dir / "admin.token"
        if not token_file.exists():
            raise SystemExit(f"no operator token: pass --token, set LATCH_ADMIN_TOKEN or create {token_file}")
        token = token_file.read_text().strip()
    logs.redact(token)
    import httpx

    try:
        if args.cleanup:
            from device_sim.provision import _progress

            with _progress() as progress:
                n = await cleanup(args.api, token, cache_file(settings.data_dir, args.prefix), args.prefix, progress)
            print(f"revoked {n} simulated locks ({args.prefix}*) through the API at {args.api}", flush=True)
            return
        await run_sim(args.api, token, args.broker, args.devices, args.prefix, behaviour, settings.data_dir,
                      ephemeral=args.ephemeral)
    except SimError as e:
        raise SystemExit(f"latch sim: {e}") from None
    except httpx.HTTPError as e:
        raise SystemExit(f"latch sim: the API at {args.api}: {e!r}") from None


def _check(command: str, settings: Settings) -> None:
    """The settings the options and the environment made, checked before anything starts."""
    def bad(option: str, what: str) -> NoReturn:
        env = "LATCH_" + option.lstrip("-").replace("-", "_").upper()
        raise SystemExit(f"latch {command}: {option} ({env}): {what}")

    for name in ("http_port", "mqtt_port", "ws_port", "tls_port"):
        value = getattr(settings, name)
        if value is not None and not 0 <= value <= 65535:
            bad("--" + name.replace("_", "-"), f"{value} is not a port number (0-65535)")
    if settings.broker is not None:
        from foundation.settings import parse_brokers
        try:
            parse_brokers(settings.broker)
        except ValueError as e:
            bad("--broker", str(e))
    if (settings.tls_cert is None) != (settings.tls_key is None):
        bad("--tls-cert" if settings.tls_cert is None else "--tls-key", "--tls-cert and --tls-key go together")
    for name in ("tls_cert", "tls_key", "tls_client_ca", "broker_ca"):
        path = getattr(settings, name)
        if path is not None and not Path(path).is_file():
            bad("--" + name.replace("_", "-"), f"{str(path)!r}: no such file")
    if settings.data_dir.exists() and not settings.data_dir.is_dir():
        bad("--data-dir", f"{str(settings.data_dir)!r} exists and is not a directory")
    if settings.demo_fleet < 0:
        bad("--demo-fleet", "must be 0 or more")
    from api.db import driver_of
    try:
        driver_of(settings.resolved_database_url())
    except ValueError as e:
        bad("--database-url", str(e))


def main(argv: list[str] | None = None) -> None:
    # Database work runs on threads that hand the GIL back and forth with the event loop at every
    # statement; at the default 5 ms switch interval each hand-off can stall a transaction that long.
    sys.setswitchinterval(0.0005)
    args = build_parser().parse_args(argv)
    level = str(getattr(args, "log_level", None) or "INFO").upper()
    if level not in logs.LEVELS:   # LATCH_LOG_LEVEL (argparse checks only what is typed)
        raise SystemExit(f"latch {args.command}: LATCH_LOG_LEVEL: {level!r} is not one of {', '.join(logs.LEVELS)}")
    # (a subcommand that brings its own parser, firmware, may have neither option)
    log_format = getattr(args, "log_format", None) or os.environ.get("LATCH_LOG_FORMAT") or None
    if log_format is not None and log_format not in logs.FORMATS:
        raise SystemExit(f"latch {args.command}: LATCH_LOG_FORMAT: {log_format!r} is not one of json, text")
    logs.setup(level, log_format)
    if args.command == "sim":
        import asyncio
        asyncio.run(_sim(args))
        return
    if args.command not in ("serve", "broker", "api", "db"):
        sys.exit(args.func(args))  # subcommands that bring their own handler (broker-config, firmware tools)
    import asyncio

    from pydantic import ValidationError

    try:
        settings = settings_from(args)
    except ValidationError as e:   # an environment variable of the wrong type
        err = e.errors()[0]
        name = str(err["loc"][0]) if err.get("loc") else "?"
        raise SystemExit(f"latch {args.command}: LATCH_{name.upper()}: {err['msg']}") from None
    _check(args.command, settings)
    from api.schema import SchemaNotReady

    if args.command != "db":   # the secrets exist from here on; none of them may reach a log line
        settings.ensure_secrets()
        logs.redact(settings.admin_token, settings.service_secret, settings.jwt_secret,
                    settings.broker_hook_secret, settings.command_key_secret)
    try:
        if args.command == "db":
            asyncio.run(_db(settings, args.db_command))
        elif args.command == "serve":
            from broker.server import run as run_fast  # uvloop when installed: broker, API, demo locks
            demo = args.demo_fleet if args.demo_fleet is not None else settings.demo_fleet
            run_fast(lambda: _serve(settings, demo, embedded_broker=settings.broker is None, migrate=args.migrate))
        elif args.command == "broker":
            from broker.server import run as run_broker  # with uvloop when installed
            run_broker(lambda: _broker(settings))
        else:
            from broker.server import run as run_fast  # uvloop when installed (docs/performance.md)
            run_fast(lambda: _serve(settings, 0, embedded_broker=False, migrate=False))
    except SchemaNotReady as e:
        raise SystemExit(f"latch {args.command}: {e}") from None
    except OSError as e:
        raise SystemExit(f"latch {args.command}: {e}") from e


if __name__ == "__main__":
    main(sys.argv[1:])
