"""`latch --help` imports no heavy layer, and every bad option is one line naming it, before anything starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("sqlalchemy", "sqlmodel", "fastapi", "starlette", "uvicorn", "gmqtt", "pydantic", "pydantic_settings",
         "httpx", "api", "broker", "device_sim", "rich")


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["sim", "--help"], ["broker-config", "--help"]])
def test_help_imports_no_database_web_or_mqtt_layer(argv: list[str]) -> None:
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "latch.cli", *argv],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "usage: latch" in r.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in r.stderr.splitlines()
                if line.startswith("import time:")}
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


BAD = [
    (["serve", "--http-port", "70000"], "--http-port", "0-65535"),
    (["serve", "--mqtt-port", "x"], "--mqtt-port", "port number"),
    (["serve", "--log-level", "verbose"], "--log-level", "DEBUG"),
    (["serve", "--log-format", "xml"], "--log-format", "json"),
    (["serve", "--demo-fleet", "-3"], "--demo-fleet", "0 or more"),
    (["serve", "--broker", "nonsense"], "--broker", "mqtt://HOST:PORT"),
    (["serve", "--tls-cert", "/nonexistent/cert.pem"], "--tls-cert", "no such file"),
    (["serve", "--mqtt-max-inflight", "0"], "--mqtt-max-inflight", "1 or more"),
    (["serve", "--mqtt-session-expiry-s", "-1"], "--mqtt-session-expiry-s", "0 or more"),
    (["serve", "--database-url", "oracle://x"], "--database-url", "sqlite"),
    (["api", "--http-port", "-1"], "--http-port", "0-65535"),
    (["broker", "--ws-port", "65536"], "--ws-port", "0-65535"),
    (["sim", "--devices", "-1"], "--devices", "0 or more"),
    (["sim", "--jam-rate", "2"], "--jam-rate", "between 0 and 1"),
    (["sim", "--api", "localhost:8000"], "--api", "http://"),
    (["sim", "--broker", "mqtt://h:99999", "--token", "t"], "--broker", "HOST:PORT"),
    (["sim", "--cleanup", "--ephemeral"], "--ephemeral", "not allowed"),
    (["db", "upgrade", "--log-level", "loud"], "--log-level", "DEBUG"),
    (["broker-config", "mosquitto", "--out", "o", "--port", "0x"], "--port", "port number"),
]


@pytest.mark.parametrize("argv,option,accepts", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_a_bad_option_is_one_line_naming_it(tmp_path: Path, argv: list[str], option: str, accepts: str) -> None:
    # ephemeral ports everywhere else: nothing may start (./run serve may hold 8000/1883)
    data = ["--data-dir", str(tmp_path / "d")] if argv[0] in ("serve", "api", "broker", "sim") else []
    ports = ["--http-port", "0", "--mqtt-port", "0"] if argv[0] == "serve" and "--http-port" not in argv else []
    r = subprocess.run([sys.executable, "-m", "latch.cli", *argv, *data, *ports], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert len(out.strip().splitlines()) == 1 and "Traceback" not in out, out
    assert option in out and accepts in out, out
    assert not (tmp_path / "d").exists(), "something started before the options were checked"


def test_a_bad_environment_variable_is_one_line_naming_it(tmp_path: Path) -> None:
    import os
    for name, value, says in (("LATCH_HTTP_PORT", "abc", "LATCH_HTTP_PORT"),
                              ("LATCH_MQTT_PORT", "99999", "LATCH_MQTT_PORT"),
                              ("LATCH_LOG_FORMAT", "xml", "LATCH_LOG_FORMAT")):
        r = subprocess.run([sys.executable, "-m", "latch.cli", "serve", "--data-dir", str(tmp_path / "d")],
                           capture_output=True, text=True, timeout=60, env={**os.environ, name: value})
        out = r.stdout + r.stderr
        assert r.returncode != 0 and len(out.strip().splitlines()) == 1 and says in out, out
        assert not (tmp_path / "d").exists()
