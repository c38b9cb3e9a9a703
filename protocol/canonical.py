"""A canonical JSON text for signing: same bytes from CPython and MicroPython.

json.dumps differs between the two (key order, non-ASCII escaping, float
formatting), so signed content is rendered here: keys sorted, no spaces,
strings escaped only where JSON requires it, floats refused.
"""


def _string(s):
    out = ['"']
    for ch in s:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif code < 0x20:
            out.append("\\u%04x" % code)
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def dumps(value):
    """Canonical text of a JSON value made of dict/list/str/int/bool/None."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    if isinstance(value, dict):
        keys = sorted(value.keys())
        parts = []
        for k in keys:
            if not isinstance(k, str):
                raise ValueError("object keys must be strings")
            parts.append(_string(k) + ":" + dumps(value[k]))
        return "{" + ",".join(parts) + "}"
    raise ValueError("value of type %s cannot be signed (use str, int, bool, null, list, object)"
                     % type(value).__name__)
