"""Small state, written atomically: temp file + rename, and a loader that
recovers a leftover temp file.

Runs under MicroPython (littlefs or FAT on the board's flash) and CPython.

A saved file is two lines:

    {"seq": 7, "data": {...}}
    <sha256 hex of the first line>

`save` writes the temp file completely, closes it, then renames it over the
real file. On littlefs (and POSIX) the rename is atomic. On FAT, MicroPython's
rename removes the destination first and renames second, so a power cut in
between leaves only the temp file: the loader takes whichever of the two files
is intact and has the higher sequence number, and finishes the rename. A torn
write is caught by the checksum, so a half-written file is never believed.
The record is streamed to the file (json.dump), never held as one string.
"""

import json
import os
from binascii import hexlify
from hashlib import sha256

try:
    from io import IOBase
except ImportError:  # a MicroPython build without user streams
    IOBase = object


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def _rename(path, target):
    try:
        os.rename(path, target)
    except OSError:
        # FAT may refuse an existing destination; what is renamed is intact, so the old can go
        _remove(target)
        os.rename(path, target)


class _Hashing(IOBase):
    """Passes json.dump's pieces to the file, hashing them on the way."""

    def __init__(self, stream):
        self.stream = stream
        self.hash = sha256()

    def write(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.hash.update(data)
        return self.stream.write(data)


def encode(seq, data):
    """The bytes `save` writes for this record (for tests and tools)."""
    body = json.dumps({"seq": seq, "data": data}).encode()
    return body + b"\n" + hexlify(sha256(body).digest()) + b"\n"


def decode(data):
    """(seq, record) of an intact file's bytes, or None for anything else."""
    try:
        n = data.index(b"\n")
        if len(data) != n + 66 or data[-1:] != b"\n" or hexlify(sha256(data[:n]).digest()) != data[n + 1:n + 65]:
            return None
        obj = json.loads(data[:n])
        if not isinstance(obj["seq"], int):
            return None
        return obj["seq"], obj["data"]
    except Exception:
        return None


class Store:
    """One small JSON-able record kept in `path` (e.g. "state.json"), its temp file beside it."""

    def __init__(self, path):
        self.path = path
        self.seq = 0
        self.recovered = None  # what load() found: "file", "tmp" or "none"

    def read(self, path):
        try:
            with open(path, "rb") as f:
                return decode(f.read())
        except OSError:
            return None

    def load(self):
        """The last record saved completely, or None when there is none.

        Also tidies up after a power cut: an intact temp file newer than the
        real one is renamed into place, a torn one is removed.
        """
        tmp = self.path + ".tmp"
        best = self.read(self.path)
        new = self.read(tmp)
        self.recovered = "none" if best is None else "file"
        if new is not None and (best is None or new[0] > best[0]):
            best = new
            self.recovered = "tmp"
            _rename(tmp, self.path)
        else:
            _remove(tmp)
        self.seq = best[0] if best else 0
        return best[1] if best else None

    def save(self, data):
        """Write `data` so that a power cut at any instant leaves either the
        previous record or this one, intact. Returns when this one is durable.
        """
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            w = _Hashing(f)
            json.dump({"seq": self.seq + 1, "data": data}, w)
            f.write(b"\n" + hexlify(w.hash.digest()) + b"\n")
            if hasattr(os, "fsync"):  # CPython; MicroPython's VFS commits on close
                f.flush()
                os.fsync(f.fileno())
        _rename(tmp, self.path)
        self.seq += 1
