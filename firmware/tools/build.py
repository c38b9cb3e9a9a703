"""Compile the firmware (and the shared protocol/) with mpy-cross into a folder laid out like the
board's filesystem:

    OUT/main.py                 (stays source: MicroPython runs /main.py)
    OUT/firmware/*.mpy          (firmware/tools/ is host tooling and is left out)
    OUT/protocol/*.mpy

Compiling proves MicroPython accepts every file's syntax, and .mpy files load without the
compiler's memory peak on the board.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("firmware", "protocol")
EXCLUDE_DIRS = {"tools", "__pycache__"}
BOARD_MAIN = REPO / "firmware" / "board_main.py"


# protocol/ also carries the server's half of the contract (signing commands, decoding uplink
# messages, the broker's topic fence). The board never calls those functions, and the board's
# RAM holds every function it loads, so the build leaves them out of the device's copy (the
# source is not edited; what stays is byte-for-byte the same code).
SERVER_ONLY = {
    "protocol/messages.py": ("sign_command", "make_command", "encode_command", "make_time_reply",
                             "decode_sync", "decode_ack", "decode_state", "decode_telemetry",
                             "decode_presence", "_check_state", "FAIL_FAST_OFFLINE", "RESULTS", "MAX_REASON"),
    "protocol/topics.py": ("all_devices_filter", "parse", "device_may_publish", "device_may_subscribe",
                           "device_may_receive", "USER_PREFIX", "USER_EVENTS", "user_events_topic",
                           "user_may_subscribe", "user_may_receive", "DEVICE_PUBLISH_KINDS",
                           "DEVICE_SUBSCRIBE_KINDS", "SVC_PREFIX", "SVC_DROP", "drop_topic", "parse_drop_topic"),
    # the firmware's own host-side helpers: encode() serves the tests and the simulator, not the board
    "firmware/store.py": ("encode",),
}
# Every name left in is also an interned string in RAM, and the board's dynamic string pools grow
# in steps (on the 64-bit Unix port the step after 300 names costs 3.6 KiB at once): a name the
# board never uses is not only its function's bytecode.
#
# Where the 64 KiB heap of tests/firmware/test_fw_process.py goes (64-bit Unix port, 2026-12-07,
# gc.mem_free() after gc.collect()): asyncio 4.1 KB; firmware/ and protocol/ as loaded ~34 KB (mqtt
# 7.8, controller 6.4, messages 5.9, app 4.6, hal_unix 2.8, store 2.1, topics 2.0, canonical 1.7,
# link 1.3, signing 1.1), in which are the string pools, 6.3 KB for ~290 names (a few short of that
# step: mind new names), and the long string constants, a heap object each (~90 bytes), ~5 KB. Once
# Firmware() stands 18.0 KB is free. Connecting takes ~4.5 KB (asyncio's stream and funcs modules
# 2.5 KB, the socket, three tasks); a command's record, its queued answers and the lock's other state
# take the rest: ~10.3 KB free after the first command, 7.6-8.4 KB once 8 records are kept. What a
# command allocates and drops (~21 KB, a third of the heap, down from ~33 KB) is what fragments it, but
# those free figures hardly depend on it. Trimming code gains some hundred bytes a step (this list:
# ~100; dropping asyncio.Lock: 0.8 KB); 12 KB free after a command would take code out of RAM (frozen
# into the board's flash, as an ESP32 image can be built).


class BuildError(RuntimeError):
    pass


def device_source(rel: Path) -> str:
    """The text that goes onto the board for `rel`: server-only functions removed."""
    text = (REPO / rel).read_text()
    names = SERVER_ONLY.get(rel.as_posix())
    if not names:
        return text
    import ast
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    cut = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
            cut.append((start, node.end_lineno))
        elif (isinstance(node, ast.Assign) and len(node.targets) == 1
              and isinstance(node.targets[0], ast.Name) and node.targets[0].id in names):
            cut.append((node.lineno - 1, node.end_lineno))
    for start, end in reversed(cut):
        del lines[start:end]
    return "".join(lines)


def find_tool(name: str, given: str | None = None) -> str:
    if given:
        return given
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise BuildError(f"{name} not found: pip install {name} (or pass its path)")
    return found


def sources() -> list[Path]:
    """Every file that goes onto the board, relative to the repository root."""
    out = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO)
            if EXCLUDE_DIRS & set(rel.parts[1:-1]) or path == BOARD_MAIN:
                continue
            out.append(rel)
    return out


def build(out: Path, mpy_cross: str | None = None, compile: bool = True, log=print) -> list[Path]:
    """Build into `out` (emptied first). Returns the files written, relative to `out`."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tool = find_tool("mpy-cross", mpy_cross) if compile else None
    if tool:
        version = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.strip()
        log(f"mpy-cross: {version}")
    written = []
    files = sources()
    for i, rel in enumerate(files, 1):
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        text = device_source(rel)
        if compile:
            src = out / ".src" / rel
            src.parent.mkdir(parents=True, exist_ok=True)
            src.write_text(text)
            dest = dest.with_suffix(".mpy")
            # -s: the source name tracebacks show. "firmware/app.mpy" is also the module's __file__
            # when the board imports it from its root, and the two then share one interned
            # string: every byte of RAM counts on the board
            # -X no-source-lines: no line-number tables (tracebacks still name every function); on a
            # 64 KiB heap the ~900 bytes they take are the difference between booting and not
            r = subprocess.run([tool, "-X", "no-source-lines", "-s", rel.with_suffix(".mpy").as_posix(),
                                "-o", str(dest), str(src)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise BuildError(f"mpy-cross rejected {rel}:\n{r.stderr or r.stdout}")
        else:
            dest.write_text(text)
        written.append(dest.relative_to(out))
        log(f"[{i}/{len(files)}] {rel} -> {dest.relative_to(out)}")
    if compile:
        shutil.rmtree(out / ".src")
    shutil.copy2(BOARD_MAIN, out / "main.py")
    written.append(Path("main.py"))
    log(f"built {len(written)} files into {out}")
    return written
