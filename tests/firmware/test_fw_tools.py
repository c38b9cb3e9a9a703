"""`latch firmware flash` and `latch firmware provision`, without hardware: esptool on generated
images, mpremote against the MicroPython Unix port over socket://, and the generated config
running the firmware against the real API."""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from firmware import config as fwconfig
from firmware.tools import add_parser
from firmware.tools.build import build
from tests.firmware.fwsupport import FirmwareProcess, ScratchCA, SocketBoard, need_module, need_tool


def parse(*argv):
    parser = argparse.ArgumentParser(prog="latch")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


@pytest.fixture(autouse=True)
def _tools():
    need_module("esptool")
    need_module("mpremote")
    need_module("cryptography")


def esp32_image(path: Path) -> Path:
    """A small, valid ESP32 application image made with esptool's own image writer."""
    from esptool.bin_image import ESP32FirmwareImage, ImageSegment
    img = ESP32FirmwareImage()
    img.entrypoint = 0x40080400
    segments = [ImageSegment(0x3FFB0000, b"\x11" * 64), ImageSegment(0x40080000, bytes(range(256)) * 8)]
    for s in segments:
        s.name = ""
    img.segments = segments
    img.append_digest = True
    img.save(str(path))
    return path


def test_flash_checks_the_image_then_erases_and_writes(tmp_path, capsys):
    image = esp32_image(tmp_path / "micropython.bin")
    info = subprocess.run([sys.executable, "-m", "esptool", "--chip", "esp32", "image-info", str(image)],
                          capture_output=True, text=True)
    assert info.returncode == 0 and "Checksum: 0x" in info.stdout and "(valid)" in info.stdout, info.stdout
    args = parse("firmware", "flash", "--port", "/dev/ttyUSB0", "--micropython-bin", str(image), "--dry-run")
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "[1/3] checking" in out and "[2/3] erasing the flash on /dev/ttyUSB0" in out
    assert "esptool --chip esp32 --port /dev/ttyUSB0 erase-flash" in out
    assert "write-flash -z 0x1000 " + str(image) in out
    assert "Entry point: 0x40080400" in out


def test_flash_refuses_a_wrong_image_before_erasing(tmp_path, capsys):
    image = esp32_image(tmp_path / "app.bin")
    merged = tmp_path / "merged.bin"  # laid out for offset 0x0: 0xFF padding first
    r = subprocess.run([sys.executable, "-m", "esptool", "--chip", "esp32", "merge-bin", "-o", str(merged),
                        "0x1000", str(image), "0x10000", str(image)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert merged.stat().st_size > 0x10000
    (tmp_path / "notes.txt").write_text("not firmware")
    for bad in (merged, tmp_path / "notes.txt", tmp_path / "missing.bin"):
        args = parse("firmware", "flash", "--port", "/dev/ttyUSB0", "--micropython-bin", str(bad))
        assert args.func(args) == 2
        out = capsys.readouterr().out
        assert "error:" in out and "erasing" not in out, out


def test_flash_reports_a_missing_board(tmp_path, capsys):
    image = esp32_image(tmp_path / "micropython.bin")
    args = parse("firmware", "flash", "--port", str(tmp_path / "ttyNONE"), "--micropython-bin", str(image))
    assert args.func(args) != 0
    out = capsys.readouterr().out
    assert "[2/3] erasing the flash" in out and "esptool failed" in out


def test_generated_config_with_tls(tmp_path):
    ca = ScratchCA()
    pem = tmp_path / "ca.pem"
    pem.write_bytes(ca.pem())
    from firmware.tools.provision import make_config
    creds = {"id": "bike-0042", "mqtt_password": "pw", "command_key": "ab" * 32}
    cfg = make_config(creds, "mqtt.example.org", ca=pem, wifi_ssid="shop", wifi_password="secret")
    assert cfg["broker"] == {"host": "mqtt.example.org", "port": 8883, "tls": True,
                             "ca_der": base64.b64encode(ca.der()).decode()}
    assert base64.b64decode(cfg["broker"]["ca_der"])[:1] == b"\x30"  # DER, as MicroPython wants it
    assert cfg["wifi"] == {"ssid": "shop", "password": "secret"}
    parsed = fwconfig.loads(json.dumps(cfg))
    assert parsed["keepalive_s"] == fwconfig.DEFAULTS["keepalive_s"]
    der = tmp_path / "ca.der"
    der.write_bytes(ca.der())
    assert make_config(creds, "h", ca=der)["broker"]["ca_der"] == cfg["broker"]["ca_der"]
    plain = make_config(creds, "10.0.0.5")
    assert plain["broker"] == {"host": "10.0.0.5", "port": 1883, "tls": False}
    with pytest.raises(ValueError, match="command_key"):
        fwconfig.loads(json.dumps({**plain, "command_key": "abc"}))


def test_provision_takes_a_clusters_broker_nodes(tmp_path, capsys):
    """--broker as LATCH_BROKER takes it: mqtt[s]://HOST:PORT, a clustered broker's nodes comma-separated."""
    ca = ScratchCA()
    pem = tmp_path / "ca.pem"
    pem.write_bytes(ca.pem())
    creds = tmp_path / "bike-0042.json"
    creds.write_text(json.dumps({"id": "bike-0042", "mqtt_password": "pw", "command_key": "ab" * 32}))

    def provision(*extra):
        out = tmp_path / "config.json"
        out.unlink(missing_ok=True)
        args = parse("firmware", "provision", "--port", "socket://127.0.0.1:1", "--device-id", "bike-0042",
                     "--credentials", str(creds), "--no-copy", "--config-out", str(out), *extra)
        rc = args.func(args)
        return rc, capsys.readouterr().out, json.loads(out.read_text()) if out.exists() else None

    rc, out, cfg = provision("--broker", "mqtts://n1.example.org:8883, mqtts://n2.example.org:8884,mqtts://10.0.0.3",
                             "--ca", str(pem), "--server-hostname", "mqtt.example.org")
    assert rc == 0, out
    assert cfg["broker"] == {"hosts": [["n1.example.org", 8883], ["n2.example.org", 8884], ["10.0.0.3", 8883]],
                             "tls": True, "ca_der": base64.b64encode(ca.der()).decode(),
                             "server_hostname": "mqtt.example.org"}
    assert "connects to n1.example.org:8883, n2.example.org:8884, 10.0.0.3:8883 over TLS" in out
    assert [tuple(h) for h in fwconfig.loads(json.dumps(cfg))["broker"]["hosts"]] == [
        ("n1.example.org", 8883, "mqtt.example.org"), ("n2.example.org", 8884, "mqtt.example.org"),
        ("10.0.0.3", 8883, "mqtt.example.org")]
    # one address: written the single-host way, which every firmware reads
    rc, out, cfg = provision("--broker", "mqtt://10.0.0.5:1884")
    assert rc == 0 and cfg["broker"] == {"host": "10.0.0.5", "port": 1884, "tls": False}, out
    for extra, why in [
        (("--broker", "mqtts://a,mqtts://b"), "needs --ca"),
        (("--broker", "mqtt://a,mqtt://b", "--ca", str(pem)), "give the nodes as mqtts://"),
        (("--broker", "mqtt://a,mqtts://b", "--ca", str(pem)), "mix mqtt:// and mqtts://"),
        (("--broker", "mqtt://a:99999"), "must look like"),
        (("--broker", ",".join(f"mqtt://n{i}:1883" for i in range(9))), "at most 8"),
        (("--broker", "mqtt://a:1883", "--broker-port", "1884"), "--broker-port goes with --broker-host"),
    ]:
        rc, out, cfg = provision(*extra)
        assert rc == 2 and why in out and cfg is None, (extra, out)
    with pytest.raises(SystemExit):  # one or the other
        parse("firmware", "provision", "--port", "p", "--device-id", "d", "--broker", "mqtt://a:1",
              "--broker-host", "a")
    with pytest.raises(SystemExit):
        parse("firmware", "provision", "--port", "p", "--device-id", "d")
    capsys.readouterr()


async def test_provision_over_mpremote_then_the_board_unlocks(stack, micropython, mpy_cross, tmp_path, capsys):
    build_dir = tmp_path / "build"
    build(build_dir, mpy_cross=mpy_cross, log=lambda *a: None)
    creds = tmp_path / "creds" / "bike-0007.json"
    with SocketBoard(micropython, tmp_path / "board") as board:
        args = parse("firmware", "provision", "--port", board.url, "--device-id", "bike-0007",
                     "--api", stack.api_url, "--token", stack.admin_token, "--credentials", str(creds),
                     "--broker-host", stack.mqtt_host, "--broker-port", str(stack.mqtt_port),
                     "--build", str(build_dir), "--mpremote", need_tool("mpremote"))
        # provisioning is synchronous (httpx, mpremote): keep this loop free for the in-process API
        assert await asyncio.to_thread(args.func, args) == 0, capsys.readouterr().out
        out = capsys.readouterr().out
        assert "registering bike-0007" in out and "[1/3] copying the app" in out and "provisioned bike-0007" in out
        root = tmp_path / "board"
        assert (root / "main.py").exists() and (root / "firmware" / "mqtt.mpy").exists()
        assert (root / "protocol" / "messages.mpy").exists() and not (root / "firmware" / "tools").exists()
        cfg = json.loads((root / "config.json").read_text())
        saved = json.loads(creds.read_text())
        assert stat.S_IMODE(creds.stat().st_mode) == 0o600
        assert cfg["device_id"] == "bike-0007" and cfg["mqtt_password"] == saved["mqtt_password"]
        assert cfg["broker"] == {"host": stack.mqtt_host, "port": stack.mqtt_port, "tls": False}

    # again: the saved secrets are used, nothing registered twice, the same config comes out
    again = parse("firmware", "provision", "--port", board.url, "--device-id", "bike-0007",
                  "--api", stack.api_url, "--credentials", str(creds), "--broker-host", stack.mqtt_host,
                  "--broker-port", str(stack.mqtt_port), "--no-copy", "--config-out", str(tmp_path / "again.json"))
    assert await asyncio.to_thread(again.func, again) == 0
    assert "using the saved credentials of bike-0007" in capsys.readouterr().out
    assert json.loads((tmp_path / "again.json").read_text()) == cfg

    # an already registered device whose secrets are not at hand is refused, clearly
    args2 = parse("firmware", "provision", "--port", "socket://127.0.0.1:1", "--device-id", "bike-0007",
                  "--api", stack.api_url, "--token", stack.admin_token,
                  "--credentials", str(tmp_path / "none.json"), "--broker-host", "h", "--no-copy")
    assert await asyncio.to_thread(args2.func, args2) == 2
    assert "already registered" in capsys.readouterr().out

    # the provisioned board boots its main.py and opens for the API
    fw = FirmwareProcess(micropython, tmp_path / "board", None)
    await fw.start()
    stack.locks.append(fw)
    await fw.wait_line("clock synchronised", timeout=30)
    await stack.wait_presence("bike-0007", True)
    r = await stack.command("bike-0007", "unlock", wait=10)
    assert r.json()["status"] == "succeeded", r.text + "\n" + fw.output()
