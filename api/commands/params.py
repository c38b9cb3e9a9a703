"""What a command's `params` may hold: exactly what the lock's signer and JSON decoder carry.

The API signs `params` in protocol/canonical.py's text and the lock checks that signature over the
same text under MicroPython, so params are JSON made of objects (string keys), arrays, strings,
integers, booleans and null — never floats (their text differs between CPython and MicroPython, so
a float can not be signed). Bounds, and why:

- depth <= MAX_DEPTH (8): the lock parses and re-renders params recursively on a 64 KiB heap; real
  actions take flat params (`{"volume": 3}`), and 8 leaves room for structured ones.
- integers within +-(2**53 - 1): the phone page and the console read them as JavaScript numbers,
  which hold no more exactly.
- strings valid Unicode (no lone surrogates: they have no UTF-8 form to sign or store) without NUL.
- the whole signed command at most protocol.messages.MAX_PAYLOAD bytes (4 KiB), the most a lock
  reads; checked where the message is built (api/commands/service.py), before anything is written.
"""

from __future__ import annotations

from typing import Any

MAX_DEPTH = 8
MAX_SAFE_INT = 2**53 - 1


def check_params(value: Any, path: str = "params", depth: int = 1) -> None:
    """ValueError naming the first part of `value` a lock could not be sent."""
    if depth > MAX_DEPTH:
        raise ValueError(f"{path}: nested more than {MAX_DEPTH} levels deep")
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if not -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
            raise ValueError(f"{path}: integers must be within +-(2**53 - 1)")
        return
    if isinstance(value, float):
        raise ValueError(f"{path}: numbers must be integers (a float cannot be signed identically "
                         "on the server and on the lock); send e.g. a percentage or milli-units")
    if isinstance(value, str):
        _check_text(value, path)
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            check_params(v, f"{path}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{path}: object keys must be strings")
            _check_text(k, f"{path} key")
            check_params(v, f"{path}.{k[:40]}", depth + 1)
        return
    raise ValueError(f"{path}: {type(value).__name__} is not JSON a lock can be sent")


def _check_text(s: str, path: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{path}: not valid Unicode (a lone surrogate)") from None
    if "\x00" in s:
        raise ValueError(f"{path}: strings may not contain NUL")
