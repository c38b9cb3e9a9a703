"""`latch firmware build|flash|provision`: tooling for a real board (runs on the host, CPython).

Wire into the `latch` CLI with `add_parser(subparsers)`.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    fw = subparsers.add_parser("firmware", help="build, flash and provision the ESP32 lock firmware")
    fw.set_defaults(log_level="WARNING")  # the latch CLI configures logging from it
    sub = fw.add_subparsers(dest="firmware_command", required=True)

    b = sub.add_parser("build", help="compile firmware/ and protocol/ with mpy-cross into a deployable folder")
    b.add_argument("--out", type=Path, default=Path("build/firmware"), help="output folder (default build/firmware)")
    b.add_argument("--mpy-cross", default=None, help="the mpy-cross command (default: from PATH / this venv)")
    b.add_argument("--source", action="store_true", help="copy .py sources instead of compiling (debugging)")
    b.set_defaults(func=_run_build)

    f = sub.add_parser("flash", help="erase the ESP32 and write MicroPython with esptool")
    f.add_argument("--port", required=True, help="serial port, e.g. /dev/ttyUSB0")
    f.add_argument("--micropython-bin", type=Path, help="MicroPython firmware image for the ESP32 "
                   "(default: $LATCH_MICROPYTHON_BIN)")
    f.add_argument("--chip", default="esp32")
    f.add_argument("--baud", type=int, default=460800)
    f.add_argument("--address", default="0x1000", help="flash offset of the image (ESP32: 0x1000; S3/C3: 0x0)")
    f.add_argument("--no-erase", action="store_true", help="skip erase-flash")
    f.add_argument("--dry-run", action="store_true", help="print the esptool commands, run nothing")
    f.set_defaults(func=_run_flash)

    p = sub.add_parser("provision", help="register the device (if needed) and copy the app and its config")
    p.add_argument("--port", required=True, help="serial port (or mpremote's socket://HOST:PORT)")
    p.add_argument("--device-id", required=True)
    p.add_argument("--api", default="http://127.0.0.1:8000", help="Latch API base URL")
    p.add_argument("--token", help="operator token (default: $LATCH_ADMIN_TOKEN)")
    p.add_argument("--credentials", type=Path,
                   help="JSON file with the device's secrets; written at registration, read if it exists "
                        "(default: ./latch-devices/DEVICE_ID.json, mode 0600)")
    p.add_argument("--wifi-ssid", help="(default: $LATCH_WIFI_SSID)")
    p.add_argument("--wifi-password", help="(default: $LATCH_WIFI_PASSWORD)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--broker-host", help="MQTT broker host name as the device reaches it")
    where.add_argument("--broker", help="the broker as mqtt[s]://HOST:PORT (as LATCH_BROKER); a clustered broker's "
                                        "nodes comma-separated, all mqtts:// (needs --ca) or all mqtt://: "
                                        "the lock moves to the next when its node goes away")
    p.add_argument("--broker-port", type=int, help="with --broker-host: default 8883 with --ca, else 1883")
    p.add_argument("--ca", type=Path, help="the broker's CA certificate (PEM or DER): enables TLS")
    p.add_argument("--server-hostname", help="name to check in the broker's certificate (default: the host of "
                                             "each node tried)")
    p.add_argument("--build", type=Path, default=Path("build/firmware"),
                   help="the folder `latch firmware build` made (built now if missing)")
    p.add_argument("--config-out", type=Path, help="also write the generated config.json here")
    p.add_argument("--no-copy", action="store_true", help="generate the config only; do not touch the board")
    p.add_argument("--mpremote", default=None, help="the mpremote command (default: from PATH / this venv)")
    p.add_argument("--no-resume", action="store_true",
                   help="let mpremote soft-reset the board first (default: resume, which also suits socket://)")
    p.set_defaults(func=_run_provision)


def _run_build(args: argparse.Namespace) -> int:
    from firmware.tools.build import build
    build(args.out, mpy_cross=args.mpy_cross, compile=not args.source)
    return 0


def _run_flash(args: argparse.Namespace) -> int:
    from firmware.tools.flash import flash
    return flash(args)


def _run_provision(args: argparse.Namespace) -> int:
    from firmware.tools.provision import provision
    return provision(args)
