"""docker-compose.yml, the Dockerfile and .dockerignore, checked without a Docker engine (none runs here).

- The compose file validates against the Compose specification: check-jsonschema's vendored copy of the
  schema, with every proxy pointing at a closed port so that a download attempt would fail the test.
- The profiles hold exactly the contract's services: `embedded`, one `latch serve`; `scale`, PostgreSQL,
  Mosquitto, two `latch api` replicas and a simulator, with the one-shots and the sidecar they need.
- Every `latch` command parses with the CLI's own parser, every LATCH_* variable is a setting, every
  depends_on names a service of the same profile with a condition that service can meet.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import pytest
from ruamel.yaml import YAML

from foundation.settings import Settings, parse_broker_url
from latch.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"

PROFILES = {
    "embedded": {"latch"},
    "scale": {"postgres", "migrate", "broker-config", "mosquitto", "mosquitto-reload", "nats", "api-1", "api-2",
              "sim"},
    "cluster": {"cluster-postgres", "cluster-migrate", "nats-config", "nats-1", "nats-2", "nats-3", "cluster-api-1",
                "cluster-api-2", "cluster-sim"},
    "observability": {"prometheus", "grafana"},   # checked further in tests/ops/test_observability_config.py
}
CLUSTER_REPLICAS = {"cluster-api-1", "cluster-api-2"}
NATS_NODES = ["nats-1", "nats-2", "nats-3"]
API_REPLICAS = {"api-1", "api-2"}
LATCH_MOSQUITTO_DIR = "/mosquitto/latch"   # the files `latch broker-config` and the API replicas write
# start-up order the contract requires (more edges may exist): service -> {dependency: condition}
REQUIRED_ORDER = {
    "migrate": {"postgres": "service_healthy"},
    "broker-config": {"migrate": "service_completed_successfully"},
    "mosquitto": {"broker-config": "service_completed_successfully"},
    "api-1": {"postgres": "service_healthy", "migrate": "service_completed_successfully",
              "mosquitto": "service_healthy", "nats": "service_healthy"},
    "api-2": {"postgres": "service_healthy", "migrate": "service_completed_successfully",
              "mosquitto": "service_healthy", "nats": "service_healthy"},
    "sim": {"api-1": "service_healthy"},
}
SCALE_SECRETS = ("LATCH_ADMIN_TOKEN", "LATCH_SERVICE_SECRET", "LATCH_JWT_SECRET", "LATCH_COMMAND_KEY_SECRET",
                 "LATCH_DATABASE_URL")


# ---------------------------------------------------------------------------------------------- helpers

_VARIABLE = re.compile(r"\$(?:(\$)|\{([A-Za-z_]\w*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_]\w*))")


def _interpolate(value: Any) -> Any:
    """Compose's interpolation with no variable set (a fresh checkout): every ${VAR} needs a default."""
    if isinstance(value, dict):
        return {k: _interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        dollar, name, op, arg, bare = m.groups()
        if dollar:
            return "$"
        if op in (":-", "-"):
            return arg
        raise AssertionError(f"${{{name or bare}}} in {value!r} has no default: "
                             "`docker compose --profile embedded up` must work with no variable set")

    return _VARIABLE.sub(one, value)


@cache
def _compose() -> dict[str, Any]:
    return _interpolate(YAML(typ="safe", pure=True).load(COMPOSE.read_text()))


def _services() -> dict[str, dict[str, Any]]:
    return _compose()["services"]


def _is_latch(service: dict[str, Any]) -> bool:
    return service.get("build") == "." or str(service.get("image", "")).startswith("latch")


def _latch_services() -> list[str]:
    return sorted(name for name, s in _services().items() if _is_latch(s))


def _parse(command: list[str]) -> argparse.Namespace:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return build_parser().parse_args(command)
        except SystemExit:
            pytest.fail(f"`latch {' '.join(command)}` is not a valid latch command:\n{err.getvalue()}")


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read_only), from the short syntax this file uses."""
    out = {}
    for v in service.get("volumes", []):
        source, target, *mode = v.split(":")
        out[target] = (source, mode == ["ro"])
    return out


def _has_healthcheck(service: dict[str, Any]) -> bool:
    hc = service.get("healthcheck")
    if hc is not None:
        return not hc.get("disable", False) and bool(hc.get("test"))
    return _is_latch(service) and any(op == "HEALTHCHECK" and " CMD " in f" {arg} "
                                      for op, arg in _dockerfile_instructions())


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [(m.group(1).upper(), m.group(2).strip())
            for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M) if not m.group(0).lstrip().startswith("#")]


# ---------------------------------------------------------------------------------------------- the schema

def _check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    assert CHECK_JSONSCHEMA.exists(), f"{CHECK_JSONSCHEMA}: install the test extra (pip install -e '.[test]')"
    offline = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):     # a download attempt would fail, not hang
        offline[var] = offline[var.lower()] = "http://127.0.0.1:9"
    return subprocess.run([str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120, env=offline)


def test_compose_file_matches_the_compose_spec() -> None:
    r = _check_jsonschema(COMPOSE)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validation done" in r.stdout


def test_the_schema_check_catches_a_misspelt_key(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("    restart: unless-stopped\n", "    restart_policy: always\n", 1))
    r = _check_jsonschema(broken)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "restart_policy" in r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------- profiles

def test_profiles_hold_exactly_the_contracts_services() -> None:
    by_profile: dict[str, set[str]] = {}
    for name, service in _services().items():
        profiles = service.get("profiles")
        assert profiles and len(profiles) == 1, f"{name}: exactly one profile, or it starts with every profile"
        by_profile.setdefault(profiles[0], set()).add(name)
    assert by_profile == PROFILES


def test_embedded_is_one_latch_serve() -> None:
    (name,) = PROFILES["embedded"]
    service = _services()[name]
    args = _parse(service["command"])
    assert args.command == "serve" and args.demo_fleet == 100
    assert args.broker is None, "embedded: the broker runs inside `latch serve`"
    assert _mounts(service)["/data"][0] in _compose()["volumes"], "SQLite and secrets on a named volume"


def test_scale_runs_postgres_mosquitto_two_api_replicas_and_a_simulator() -> None:
    s = _services()
    assert s["postgres"]["image"].startswith("postgres:")
    assert "pg_isready" in s["postgres"]["healthcheck"]["test"]
    assert s["mosquitto"]["image"] == "eclipse-mosquitto:2"
    assert s["mosquitto"]["command"] == ["mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]
    assert s["migrate"]["command"] == ["db", "upgrade"]
    assert s["broker-config"]["command"][:4] == ["broker-config", "mosquitto", "--out", LATCH_MOSQUITTO_DIR]
    scale = PROFILES["scale"]
    assert {n for n in _latch_services() if n in scale and s[n]["command"][0] == "api"} == API_REPLICAS
    assert {n for n in _latch_services() if n in scale and s[n]["command"][0] == "sim"} == {"sim"}
    assert {n for n in PROFILES["scale"] if s[n].get("restart") == "no"} == {"migrate", "broker-config"}


def test_scale_carries_events_between_the_replicas_on_nats_jetstream() -> None:
    s = _services()
    nats = s["nats"]
    assert nats["image"].startswith("nats:2.")
    assert "--jetstream" in nats["command"]
    store = nats["command"][nats["command"].index("--store_dir") + 1]
    assert _mounts(nats)[store][0] in _compose()["volumes"], "JetStream's store on a named volume"
    assert "js-enabled-only" in " ".join(nats["healthcheck"]["test"]), "healthy once JetStream is up"
    assert not nats.get("ports"), "NATS stays inside the compose network"
    for name in API_REPLICAS:
        url = urlsplit(_env(s[name])["LATCH_NATS_URL"])
        assert (url.scheme, url.hostname, url.port) == ("nats", "nats", 4222)


def test_cluster_runs_the_api_replicas_and_the_locks_on_three_nats_nodes() -> None:
    s = _services()
    config = _parse(s["nats-config"]["command"])
    assert (config.command, config.flavour, config.bind) == ("broker-config", "nats", "")
    nodes = [n.split(":") for n in config.nodes.split(",")]
    assert [n[0] for n in nodes] == NATS_NODES
    for i, name in enumerate(NATS_NODES):
        node = s[name]
        assert node["image"].startswith("nats:2.") and node["command"] == ["-c", f"{config.out}/node-{i + 1}.conf"]
        assert _mounts(node)[str(config.out)] == ("nats-conf", True)
        assert _mounts(node)[str(config.store_dir)][0] == f"{name}-data", "each node its own JetStream store"
        assert str(config.monitor_port) in " ".join(node["healthcheck"]["test"])
        assert node["depends_on"] == {"nats-config": {"condition": "service_completed_successfully"}}
    mqtt = {(host, int(mqtt_port)) for host, _, _, mqtt_port in nodes}
    clients = {(host, int(client)) for host, client, _, _ in nodes}
    for name in sorted(CLUSTER_REPLICAS):
        args, env = _parse(s[name]["command"]), _env(s[name])
        assert {parse_broker_url(u)[:2] for u in args.broker.split(",")} == mqtt, "every node, to move to another"
        assert {(u.hostname, u.port) for u in map(urlsplit, env["LATCH_NATS_AUTH_URL"].split(","))} == clients
        assert env["LATCH_NATS_URL"] == env["LATCH_NATS_AUTH_URL"] and env["LATCH_NATS_REPLICAS"] == "3"
        assert urlsplit(args.database_url).hostname == "cluster-postgres" \
            == urlsplit(env["LATCH_DATABASE_URL"]).hostname
        assert {d for d, c in s[name]["depends_on"].items() if c["condition"] == "service_healthy"} \
            == {"cluster-postgres", *NATS_NODES}
    one, two = (_env(s[n]) for n in sorted(CLUSTER_REPLICAS))
    assert {k for k in one if one[k] != two[k]} == {"LATCH_API_CLIENT_ID"}
    assert one["LATCH_NATS_AUTH_SECRET"] == _env(s["nats-config"])["LATCH_NATS_AUTH_SECRET"]
    sim = _parse(s["cluster-sim"]["command"])
    assert {parse_broker_url(u)[:2] for u in sim.broker.split(",")} == mqtt


def test_the_nodes_files_follow_the_compose_wiring(tmp_path: Path) -> None:
    """`latch broker-config nats` run with the compose file's own arguments (paths moved into tmp_path): a file per
    node, listening on the container's interfaces, the health check's monitoring port, and the callout's issuer
    the key the replicas sign with."""
    from api.registry import nats_jwt
    from latch import nats_config

    s = _services()
    args = _parse(s["nats-config"]["command"])
    env = {k: v for k, v in _env(s["nats-config"]).items()}
    seed = re.sub(r"\$\{[A-Z_]+:-(.*)\}", r"\1", env["LATCH_NATS_ISSUER_SEED"])
    secret = re.sub(r"\$\{[A-Z_]+:-(.*)\}", r"\1", env["LATCH_NATS_AUTH_SECRET"])
    settings = Settings(data_dir=tmp_path / "data", nats_issuer_seed=seed, nats_auth_secret=secret)
    paths = nats_config.write(tmp_path / "conf", settings, nats_config.parse_nodes(args.nodes), args.fleet,
                              args.store_dir, bind=args.bind, monitor_port=args.monitor_port)
    assert [p.name for p in paths] == [PurePosixPath(s[n]["command"][-1]).name for n in NATS_NODES]
    text = paths[1].read_text()
    for needle in ('listen: "0.0.0.0:4222"', 'listen: "0.0.0.0:1883"', f'http: "0.0.0.0:{args.monitor_port}"',
                   '"nats-route://nats-3:6222"', 'store_dir: "/data/node-2"', nats_jwt.public_key(seed.encode())):
        assert needle in text, needle
    assert secret not in text


# ---------------------------------------------------------------------------------------------- commands

@pytest.mark.parametrize("name", _latch_services())
def test_every_latch_command_parses(name: str) -> None:
    service = _services()[name]
    assert service.get("build") == "." and service.get("image") == "latch:dev", f"{name}: the one Latch image"
    _parse(service["command"])


def test_api_replicas_are_alike_but_for_their_client_id_and_port() -> None:
    s = _services()
    defaults = Settings.model_fields
    client_ids = set()
    for name in sorted(API_REPLICAS):
        args = _parse(s[name]["command"])
        env = _env(s[name])
        assert args.command == "api"
        assert parse_broker_url(args.broker) == ("mosquitto", _service_listener_port())
        url = urlsplit(args.database_url)
        assert url.scheme in ("postgresql+psycopg", "postgresql+asyncpg") and url.hostname == "postgres"
        assert args.database_url == env["LATCH_DATABASE_URL"]
        assert args.http_port == 8000 and any(p.endswith(":8000") for p in s[name]["ports"])
        client_ids.add(env["LATCH_API_CLIENT_ID"])
        assert env["LATCH_API_CLIENT_ID"] != defaults["api_client_id"].default
        assert _mounts(s[name])[env["LATCH_MOSQUITTO_CONFIG_DIR"]] == ("mosquitto-config", False)
        assert "LATCH_MOSQUITTO_PID_FILE" not in env, "Mosquitto's PID means nothing here: mosquitto-reload"
    assert client_ids == {"latch-api-1", "latch-api-2"}
    one, two = (s[n] for n in sorted(API_REPLICAS))
    assert one["command"] == two["command"] and one["depends_on"] == two["depends_on"]
    for key in SCALE_SECRETS:
        assert _env(one)[key] == _env(two)[key] == _env(s["broker-config"])[key] == _env(s["migrate"])[key], key
    assert _env(s["sim"])["LATCH_ADMIN_TOKEN"] == _env(one)["LATCH_ADMIN_TOKEN"]


def test_the_simulator_registers_through_an_api_replica_and_connects_to_mosquitto() -> None:
    s = _services()
    args = _parse(s["sim"]["command"])
    assert args.command == "sim" and args.devices == 100
    assert parse_broker_url(args.broker) == ("mosquitto", _device_listener()[0])
    api = urlsplit(args.api)
    assert api.hostname in API_REPLICAS and api.port == _parse(s[api.hostname]["command"]).http_port
    assert _mounts(s["sim"])["/data"][0] in _compose()["volumes"], "its cached credentials survive a rerun"


def _mosquitto_conf() -> str:
    (config,) = _services()["mosquitto"]["configs"]
    assert config["target"] == _services()["mosquitto"]["command"][-1]
    return _compose()["configs"][config["source"]]["content"]


def _device_listener() -> tuple[int, str]:
    """(port, bind) of the listener `latch broker-config` writes into latch.conf."""
    args = _parse(_services()["broker-config"]["command"])
    return args.port, args.bind


def _service_listener_port() -> int:
    """The API replicas' listener, which `latch broker-config` writes into latch.conf too."""
    args = _parse(_services()["broker-config"]["command"])
    assert args.service_port and args.service_bind == "", "the replicas' listener, on the container's network"
    assert not re.findall(r"^listener ", _mosquitto_conf(), re.M), "every listener comes from latch.conf"
    return args.service_port


def test_mosquitto_listens_for_devices_and_for_the_api_replicas() -> None:
    args = _parse(_services()["broker-config"]["command"])
    assert args.flavour == "mosquitto" and args.out == Path(LATCH_MOSQUITTO_DIR)
    assert args.reload_pid_file is None, "Mosquitto is not running yet, and its PID means nothing here"
    port, bind = _device_listener()
    assert bind == "", "every interface of the container: other containers connect"
    assert f"127.0.0.1:{port}:{port}" in _services()["mosquitto"]["ports"]
    conf = _mosquitto_conf()
    assert f"include_dir {LATCH_MOSQUITTO_DIR}" in conf.splitlines(), "latch.conf: listener, password and ACL files"
    assert "persistence_location /mosquitto/data/" in conf.splitlines()
    assert _mounts(_services()["mosquitto"])["/mosquitto/data"][0] == "mosquitto-data"
    service_port = _service_listener_port()
    assert service_port != port
    assert not any(p.endswith(f":{service_port}") for p in _services()["mosquitto"]["ports"]), "not published"
    health = " ".join(_services()["mosquitto"]["healthcheck"]["test"])
    assert all(f"{p:04X}" in health for p in (port, service_port)), "the health check watches both listeners"


def test_mosquitto_config_is_one_volume_at_one_path() -> None:
    s = _services()
    writers = {"broker-config", *API_REPLICAS}
    readers = {"mosquitto", "mosquitto-reload"}
    for name in writers | readers:
        assert _mounts(s[name])[LATCH_MOSQUITTO_DIR] == ("mosquitto-config", name in readers), name
    assert f"{LATCH_MOSQUITTO_DIR}/password_file" in s["mosquitto-reload"]["command"][0]
    assert f"{LATCH_MOSQUITTO_DIR}/acl_file" in s["mosquitto-reload"]["command"][0]
    assert {n for n, svc in s.items() if any(src == "mosquitto-config" for src, _ in _mounts(svc).values())} \
        == writers | readers
    assert s["mosquitto-reload"]["pid"] == "service:mosquitto"
    # the sidecar signals as the user Mosquitto runs as, which is also the Latch image's user (file ownership)
    uid = re.search(r"useradd\b.*--uid (\d+)", DOCKERFILE.read_text()).group(1)   # type: ignore[union-attr]
    assert s["mosquitto"]["user"] == s["mosquitto-reload"]["user"] == f"{uid}:{uid}"


def test_latch_environment_names_only_settings() -> None:
    for name in _latch_services():
        for key in _env(_services()[name]):
            assert key.startswith("LATCH_"), f"{name}: {key}"
            assert key.removeprefix("LATCH_").lower() in Settings.model_fields, \
                f"{name}: {key} is no setting (foundation/settings.py) and would be ignored"


# ---------------------------------------------------------------------------------------------- order

def test_every_dependency_exists_in_the_same_profile_with_a_condition_it_can_meet() -> None:
    s = _services()
    for name, service in s.items():
        deps = service.get("depends_on", {})
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for target, spec in deps.items():
            assert target in s, f"{name} depends on {target}, which is no service"
            assert s[target]["profiles"] == service["profiles"], f"{name} -> {target}: another profile"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert _has_healthcheck(s[target]), f"{name} waits for {target} to be healthy: it has no check"
            elif condition == "service_completed_successfully":
                assert s[target].get("restart") == "no", f"{name} waits for {target} to exit: not a one-shot"
            else:
                assert condition == "service_started", condition
    for name, required in REQUIRED_ORDER.items():
        got = {t: spec["condition"] for t, spec in s[name]["depends_on"].items()}
        assert required.items() <= got.items(), f"{name}: {got}"


def test_named_volumes_are_declared_and_ports_published_on_loopback_once_per_profile() -> None:
    declared = set(_compose()["volumes"])
    for profile, names in PROFILES.items():
        host_ports: list[str] = []
        for name in names:
            for source, _ in _mounts(_services()[name]).values():
                assert source in declared, f"{name}: volume {source} is not declared"
            for port in _services()[name].get("ports", []):
                address, host_port, _ = port.split(":")
                assert address == "127.0.0.1", f"{name}: {port} (development secrets: loopback only)"
                host_ports.append(host_port)
        assert len(host_ports) == len(set(host_ports)), f"{profile}: {host_ports}"


# ---------------------------------------------------------------------------------------------- Dockerfile

def test_dockerfile_runs_latch_as_a_non_root_user_from_a_slim_python_3_11() -> None:
    instructions = _dockerfile_instructions()
    froms = [arg for op, arg in instructions if op == "FROM"]
    arg_image = next(arg for op, arg in instructions if op == "ARG" and arg.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11-slim(-\w+)?", arg_image)
    assert all(f.startswith("${PYTHON_IMAGE}") for f in froms)
    users = [arg for op, arg in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ("ENTRYPOINT", '["latch"]') in instructions
    installs = [arg for op, arg in instructions if op == "RUN" and "pip install" in arg]
    assert installs and not any("[" in i for i in installs), f"no extras (test, bench, firmware): {installs}"


async def test_dockerfile_healthcheck_asks_a_route_the_api_serves() -> None:
    from api.routes import health

    check = next(arg for op, arg in _dockerfile_instructions() if op == "HEALTHCHECK")
    path = re.search(r"http://127\.0\.0\.1:%s(/[\w/]+)", check).group(1)   # type: ignore[union-attr]
    route = next((r for r in health.router.routes if getattr(r, "path", None) == path), None)
    assert route is not None and "GET" in route.methods, f"{path} is not a GET route of api/routes/health.py"
    fields = set(re.findall(r"\.get\('(\w+)'\)", check))
    no_nats = SimpleNamespace(bus=None)
    response = await route.endpoint(SimpleNamespace(link=SimpleNamespace(is_connected=True), events=no_nats))
    answer = json.loads(bytes(response.body))
    assert response.status_code == 200 and fields and fields <= set(answer), (fields, answer)
    down = await route.endpoint(SimpleNamespace(link=SimpleNamespace(is_connected=False), events=no_nats))
    assert down.status_code == 503   # the healthcheck's urlopen raises on it: a degraded API is unhealthy
    assert json.loads(re.search(r"CMD (\[.*\])", check).group(1))[0] == "python"   # type: ignore[union-attr]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore matching, for patterns without exceptions: a path is out when it or a parent is."""
    def regex(p: str) -> str:
        out, i = "", 0
        while i < len(p):
            if p.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif p.startswith("**", i):
                out, i = out + ".*", i + 2
            else:
                out += {"*": "[^/]*", "?": "[^/]"}.get(p[i], re.escape(p[i]))
                i += 1
        return out

    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(re.fullmatch(regex(p.strip("/")), prefix) for p in patterns for prefix in prefixes)


def test_dockerignore_keeps_what_the_build_installs_and_drops_local_state() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "exceptions: teach _ignored() about them first"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    assert packages and all(p.isidentifier() for p in packages), packages
    needed = ["pyproject.toml", "README.md"] + [
        p.relative_to(ROOT).as_posix() for pkg in packages for p in (ROOT / pkg).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".html", ".js", ".css", ".mako")]
    assert not [p for p in needed if _ignored(p, patterns)]
    for state in (".git/config", ".venv/bin/python", "latch-data/admin.token", "latch-data/latch.db",
                  "api/__pycache__/app.cpython-311.pyc", "tests/conftest.py", ".env"):
        assert _ignored(state, patterns), state
