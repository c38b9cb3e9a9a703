"""`latch firmware flash`: erase the ESP32 and write MicroPython with esptool.

The image is checked first (esptool image-info: an ESP32 image with a valid
checksum), so a wrong file never costs an erased board.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def esptool_cmd() -> list[str]:
    return [sys.executable, "-m", "esptool"]


def check_image(image: Path, chip: str = "esp32") -> str:
    """esptool's description of the image; raises ValueError if it is not a valid image for `chip`."""
    if not image.is_file():
        raise ValueError(f"{image}: no such file")
    r = subprocess.run([*esptool_cmd(), "--chip", chip, "image-info", str(image)],
                       capture_output=True, text=True)
    text = r.stdout + r.stderr
    if r.returncode != 0 or "(valid)" not in text or "invalid" in text.lower():
        raise ValueError(f"{image} is not a valid {chip} image for this offset:\n{text.strip()[-800:]}")
    return text


def commands(args) -> list[list[str]]:
    base = [*esptool_cmd(), "--chip", args.chip, "--port", args.port]
    cmds = []
    if not args.no_erase:
        cmds.append([*base, "erase-flash"])
    cmds.append([*base, "--baud", str(args.baud), "write-flash", "-z", args.address, str(args.micropython_bin)])
    return cmds


def flash(args, log=print) -> int:
    if args.micropython_bin is None and os.environ.get("LATCH_MICROPYTHON_BIN"):
        args.micropython_bin = Path(os.environ["LATCH_MICROPYTHON_BIN"])
    if args.micropython_bin is None:
        log("error: give --micropython-bin (the ESP32 MicroPython .bin from micropython.org/download)")
        return 2
    cmds = commands(args)
    steps = len(cmds) + 1
    log(f"[1/{steps}] checking {args.micropython_bin}")
    try:
        info = check_image(Path(args.micropython_bin), args.chip)
    except ValueError as e:
        log(f"error: {e}")
        return 2
    for line in info.splitlines():
        if line.startswith(("Image size", "Entry point", "Segments:", "Chip ID", "Checksum")):
            log("    " + line.strip())
    for i, cmd in enumerate(cmds, 2):
        what = "erasing the flash" if "erase-flash" in cmd else f"writing MicroPython at {args.address}"
        log(f"[{i}/{steps}] {what} on {args.port}")
        log("    $ " + " ".join(cmd[2:] if cmd[:2] == [sys.executable, "-m"] else cmd))
        if args.dry_run:
            continue
        r = subprocess.run(cmd)
        if r.returncode != 0:
            log(f"error: esptool failed ({r.returncode}); is the board on {args.port}? "
                "Hold BOOT while it connects if it does not enter the bootloader.")
            return r.returncode
    log("done" + (" (dry run: nothing written)" if args.dry_run else
                  f": next, `latch firmware provision --port {args.port} --device-id ...`"))
    return 0
