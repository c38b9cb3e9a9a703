"""`latch firmware provision`: register the device with the API if needed, generate its
config.json, and copy the app plus the config onto the board with mpremote.

Secrets are shown by the API exactly once, at registration, so they are kept
in a credentials file (mode 0600) to provision the same device again.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import sys
from pathlib import Path

from firmware import config as fwconfig


class ProvisionError(RuntimeError):
    pass


def ca_der(path: Path) -> bytes:
    """The CA certificate as DER (MicroPython's cadata takes DER, not PEM)."""
    raw = path.read_bytes()
    if b"-----BEGIN CERTIFICATE-----" in raw:
        text = raw.decode()
        start = text.index("-----BEGIN CERTIFICATE-----")
        end = text.index("-----END CERTIFICATE-----", start) + len("-----END CERTIFICATE-----")
        return ssl.PEM_cert_to_DER_cert(text[start:end])
    if raw[:1] != b"\x30":
        raise ProvisionError(f"{path} is neither a PEM nor a DER certificate")
    return raw


def credentials(api: str, token: str | None, device_id: str, path: Path, log=print) -> dict:
    """The device's secrets: from `path` if it exists, else by registering it (then saved to `path`)."""
    if path.exists():
        creds = json.loads(path.read_text())
        if creds.get("id") != device_id:
            raise ProvisionError(f"{path} holds the secrets of {creds.get('id')!r}, not {device_id!r}")
        log(f"using the saved credentials of {device_id} ({path})")
        return creds
    if not token:
        raise ProvisionError("registering needs the operator token: --token or LATCH_ADMIN_TOKEN")
    import httpx
    log(f"registering {device_id} with {api}")
    r = httpx.post(api.rstrip("/") + "/v1/devices", json={"id": device_id},
                   headers={"Authorization": f"Bearer {token}"}, timeout=30)
    if r.status_code == 409:
        raise ProvisionError(f"{device_id} is already registered and its secrets are not in {path}: "
                             "rotate its secrets in the API, or pass --credentials with the saved file")
    if r.status_code != 201:
        raise ProvisionError(f"registration failed: HTTP {r.status_code}: {r.text[:300]}")
    reg = r.json()
    creds = {"id": reg["id"], "mqtt_password": reg["mqtt_password"], "command_key": reg["command_key"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(creds, f, indent=1)
    log(f"registered; secrets saved to {path} (mode 0600): keep it safe, the API shows them only once")
    return creds


def broker_addresses(urls: str, ca: Path | None) -> list[tuple[str, int]]:
    """`--broker`: mqtt[s]://HOST:PORT, a clustered broker's nodes comma-separated (as LATCH_BROKER), all
    mqtts:// (TLS: the lock checks them against --ca, it has no other trust store) or all mqtt://."""
    from foundation.settings import parse_brokers
    try:
        nodes = parse_brokers(urls)
    except ValueError as e:
        raise ProvisionError(f"--broker: {e}") from None
    if nodes[0].tls and ca is None:
        raise ProvisionError("--broker mqtts://... needs --ca: the lock verifies the broker against that CA only")
    if not nodes[0].tls and ca is not None:
        raise ProvisionError("--ca with --broker mqtt://...: give the nodes as mqtts:// for TLS")
    if len(nodes) > 8:
        raise ProvisionError(f"--broker lists {len(nodes)} addresses: the lock keeps at most 8")
    return [(n.host, n.port) for n in nodes]


def make_config(creds: dict, broker_host: str | None = None, broker_port: int | None = None, ca: Path | None = None,
                server_hostname: str | None = None, wifi_ssid: str | None = None,
                wifi_password: str | None = None, brokers: list[tuple[str, int]] | None = None) -> dict:
    """config.json: the broker as `broker_host`/`broker_port`, or `brokers` (a clustered broker's nodes; one
    is written the single-host way, which every firmware reads)."""
    broker: dict = {"tls": ca is not None}
    if brokers and len(brokers) > 1:
        broker["hosts"] = [[h, p] for h, p in brokers]
    else:
        if brokers:
            broker_host, broker_port = brokers[0]
        if not broker_host:
            raise ProvisionError("no broker given (--broker or --broker-host)")
        broker["host"] = broker_host
        broker["port"] = broker_port or (8883 if ca is not None else 1883)
    if ca is not None:
        broker["ca_der"] = base64.b64encode(ca_der(ca)).decode()
        if server_hostname:
            broker["server_hostname"] = server_hostname
    cfg = {"device_id": creds["id"], "mqtt_password": creds["mqtt_password"],
           "command_key": creds["command_key"], "broker": broker}
    if wifi_ssid:
        cfg["wifi"] = {"ssid": wifi_ssid, "password": wifi_password or ""}
    try:
        fwconfig.loads(json.dumps(cfg))  # what the firmware will accept at boot
    except ValueError as e:
        raise ProvisionError(f"the firmware would refuse this config: {e}") from None
    return cfg


def mpremote_cmd(given: str | None = None) -> list[str]:
    if given:
        return [given]
    return [sys.executable, "-m", "mpremote"]


def copy_to_board(port: str, build_dir: Path, config_path: Path, mpremote: list[str], resume: bool = True,
                  reset: bool = False, log=print) -> None:
    base = [*mpremote, "connect", port]
    if resume:
        base.append("resume")  # no soft reset first: also what a socket:// link needs
    items = sorted(p.name for p in build_dir.iterdir())
    steps = [
        (f"copying the app ({', '.join(items)})", ["fs", "cp", "-r", *items, ":."], build_dir),
        ("copying config.json", ["fs", "cp", str(config_path), ":config.json"], None),
        ("listing the board", ["fs", "ls", ":."], None),
    ]
    if reset:
        steps.append(("resetting the board", ["reset"], None))
    for i, (what, cmd, cwd) in enumerate(steps, 1):
        log(f"[{i}/{len(steps)}] {what}")
        r = subprocess.run([*base, *cmd], cwd=cwd, capture_output=True, text=True, timeout=300)
        out = (r.stdout + r.stderr).strip()
        if out:
            log("\n".join("    " + line for line in out.splitlines()[-20:]))
        if r.returncode != 0:
            raise ProvisionError(f"mpremote failed ({r.returncode}) while {what} on {port}")


def provision(args, log=print) -> int:
    token = args.token or os.environ.get("LATCH_ADMIN_TOKEN")
    cred_path = args.credentials or Path("latch-devices") / f"{args.device_id}.json"
    try:
        creds = credentials(args.api, token, args.device_id, cred_path, log=log)
        brokers = broker_addresses(args.broker, args.ca) if getattr(args, "broker", None) else None
        if brokers and args.broker_port:
            raise ProvisionError("--broker-port goes with --broker-host; --broker URLs carry their ports")
        cfg = make_config(creds, args.broker_host, args.broker_port, args.ca, args.server_hostname,
                          args.wifi_ssid or os.environ.get("LATCH_WIFI_SSID"),
                          args.wifi_password or os.environ.get("LATCH_WIFI_PASSWORD"), brokers=brokers)
        if "wifi" not in cfg and not args.port.startswith("socket://"):
            log("warning: no WiFi given (--wifi-ssid): the board will not reach the broker")
        text = json.dumps(cfg)
        out = args.config_out
        if out is not None:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            log(f"wrote {out}")
        b = cfg["broker"]
        where = (", ".join(f"{h}:{p}" for h, p in b.get("hosts") or [(b["host"], b["port"])])
                 + (" over TLS" if b["tls"] else " WITHOUT TLS"))
        if args.no_copy:
            log(f"config of {args.device_id}: it connects to {where}")
            return 0
        build_dir = args.build
        if not (build_dir / "main.py").exists():
            from firmware.tools.build import build
            log(f"no build in {build_dir}: building")
            build(build_dir, log=log)
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            cfg_file = Path(tmp) / "config.json"
            cfg_file.write_text(text)
            copy_to_board(args.port, build_dir, cfg_file, mpremote_cmd(args.mpremote), resume=not args.no_resume,
                          reset=not args.port.startswith("socket://"), log=log)
    except ProvisionError as e:
        log(f"error: {e}")
        return 2
    log(f"provisioned {args.device_id}: it connects to {where}")
    return 0
