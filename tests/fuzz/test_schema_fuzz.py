"""schemathesis over every operation of the live API, as the operator and as a rider who holds a bike.

The schema is the running server's own /openapi.json (schemathesis.openapi.from_url), and every case is
a real HTTP request to the real uvicorn on an ephemeral loopback port, with the real broker and a
simulated lock behind it. Checked on every response: no 5xx, a status code the schema documents, the
documented content type and headers, a body that matches the documented schema.

Bounded for CI: FUZZ_MAX_EXAMPLES per operation (conftest.py), derandomized, long-poll `wait`s cut to
WAIT_CAP_S and the event stream read for STREAM_READ_S (how long they hold is tested in tests/api).
Half of the generated path parameters are swapped for real ids (the rider's bike, ride, commands, a fleet
command), so cases reach past "no such device" into the code that acts on one.
"""

from __future__ import annotations

import json
import math
from typing import Any

import schemathesis
from hypothesis import given
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core import NotSet
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.fuzz.conftest import FUZZ_SETTINGS, World
from tests.fuzz.report import FAILURES, failure

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]
WAIT_CAP_S = 0.3
STREAM_PATH = "/v1/events/stream"
STREAM_READ_S = 0.3
REQUEST_TIMEOUT_S = 30.0
SERVER_LOG_WAIT_S = 2.0   # uvicorn logs a 500's exception after the response went out


def load_schema(world: World) -> Any:
    """The running server's own schema, as it serves it."""
    schema = schemathesis.openapi.from_url(f"{world.ts.url}/openapi.json", timeout=30)
    schema.config.generation.update(deterministic=True, database="none", max_examples=FUZZ_SETTINGS.max_examples)
    return schema


# Operations that end the caller's own session run last, so the rest of the run keeps a working token.
SESSION_ENDING = ("/v1/auth/password", "/v1/auth/logout")


def operations(schema: Any) -> list[Any]:
    out = []
    for result in schema.get_all_operations():
        out.append(result.ok())   # an operation schemathesis cannot read is a schema defect: raise here
    return sorted(out, key=lambda op: SESSION_ENDING.index(op.path) + 1 if op.path in SESSION_ENDING else 0)


def _swap_in_real_ids(case: Any, known: dict[str, list[str]], data: st.DataObject) -> None:
    """Half of the time, each path parameter Latch has real ids of becomes one of them."""
    params = case.path_parameters
    if not isinstance(params, dict):
        return
    for name in list(params):
        if name in known and data.draw(st.booleans(), label=f"real {name}"):
            params[name] = data.draw(st.sampled_from(known[name]), label=name)


# Values a careless or hostile client sends that generation from the schema alone rarely reaches:
# 64-bit overflow (issue 12 defect 3), and in JSON bodies NaN/Infinity literals, a lone surrogate, NUL, and a
# body past the request size limit (defects 4 and 5). Kept under 1 MiB: a bigger command param wedges the
# broker link (defect 1), which tests/api covers on its own.
EDGE_INTS = [2**63, 2**64, -(2**63) - 1, 10**30]
EDGE_BODY_VALUES: list[Any] = [*EDGE_INTS, math.nan, math.inf, "\ud800", "a\x00b", "x" * 70_000]


def _swap_in_edge_values(case: Any, data: st.DataObject) -> None:
    """A third of the cases get one field set to an edge value: an integer query parameter, or a top-level
    field of a JSON object body."""
    if not data.draw(st.integers(0, 2), label="edge value?") == 0:
        return
    targets: list[tuple[str, str]] = []
    if isinstance(case.query, dict):
        targets += [("query", k) for k, v in case.query.items() if isinstance(v, int) and not isinstance(v, bool)]
    if isinstance(case.body, dict):
        targets += [("body", k) for k in case.body]
    if not targets:
        return
    where, name = data.draw(st.sampled_from(targets), label="edge field")
    if where == "query":
        case.query[name] = data.draw(st.sampled_from(EDGE_INTS), label="edge int")
    else:
        value = data.draw(st.sampled_from(EDGE_BODY_VALUES), label="edge value")
        case.body[name] = value
        if isinstance(value, float):   # requests refuses to write NaN/Infinity: send the JSON text as a client would
            case.body = json.dumps(case.body, allow_nan=True).encode()


def _bound_waits(case: Any) -> None:
    """Cut a valid long-poll `wait` to WAIT_CAP_S (values the schema refuses are left as generated)."""
    q = case.query
    if isinstance(q, dict):
        w = q.get("wait")
        if isinstance(w, (int, float)) and not isinstance(w, bool) and WAIT_CAP_S < w <= 60:
            q["wait"] = WAIT_CAP_S


def _example(case: Any) -> str:
    parts = [f"{case.method} {case.formatted_path}"]
    if case.query:
        parts.append(f"query={case.query!r}")
    if case.headers:
        parts.append(f"headers={ {k: v for k, v in case.headers.items() if k.lower() != 'authorization'}!r}")
    if case.body is not None and not isinstance(case.body, NotSet):
        parts.append(f"body={case.body!r}"[:400])
    return " ".join(parts)


def call_and_check(case: Any, world: World, who: str, token: str) -> None:
    _bound_waits(case)
    log = world.ts.log
    mark = log.mark()
    timeout = STREAM_READ_S if case.operation.path == STREAM_PATH else REQUEST_TIMEOUT_S
    op = f"{case.method} {case.operation.path}"
    try:
        response = case.call(headers={"Authorization": f"Bearer {token}"}, timeout=timeout)
    except Exception as e:   # a dropped connection or a timeout: the server did not answer
        FAILURES.add(who, op, f"no response: {type(e).__name__}", None, "", _example(case))
        raise failure(f"no response {type(e).__name__}", f"{op}: no response ({e!r}) for {_example(case)}") from e
    status = response.status_code
    errors = log.since(mark, SERVER_LOG_WAIT_S if status >= 500 else 0.0)
    server = "; ".join(sorted({e.summary() for e in errors}))
    problems: list[tuple[str, str]] = []   # (kind, message)
    try:
        case.validate_response(response, checks=CHECKS)
    except BaseException as e:
        found = list(e.exceptions) if isinstance(e, BaseExceptionGroup) else [e]
        for f in found:
            title = getattr(f, "title", type(f).__name__)
            if status >= 500 and title == "Undocumented status code":
                continue   # the 5xx itself is the finding ("Server error")
            problems.append((f"{title} {status} {server}", f"{title}: {f}"))
    if errors and not problems:   # answered fine, but the server logged an error while doing it
        problems.append((f"logged error {status} {server}", "the server logged an error"))
    if not problems:
        return
    for kind, message in problems:
        FAILURES.add(who, op, message.split(":", 1)[0], status, server, _example(case))
    kind, message = problems[0] if len(problems) == 1 else (" + ".join(sorted(k for k, _ in problems)), "")
    text = "\n".join(m for _, m in problems)
    raise failure(f"{op} {kind}", f"{op} -> {status} for {_example(case)}\n{text}"
                  + (f"\nserver logged: {server}" if server else ""))


def fuzz_operation(op: Any, world: World, who: str, token: str) -> None:
    """FUZZ_MAX_EXAMPLES cases of `op`, schema-valid and schema-violating (negative) alike."""
    cases = st.one_of(op.as_strategy(GenerationMode.POSITIVE), op.as_strategy(GenerationMode.NEGATIVE))

    @FUZZ_SETTINGS
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        case = data.draw(cases, label="case")
        _swap_in_real_ids(case, world.known, data)
        _swap_in_edge_values(case, data)
        call_and_check(case, world, who, token)

    fuzz()


def fuzz_every_operation(world: World, subtests: Any, who: str, token: str) -> None:
    ops = operations(load_schema(world))
    assert len(ops) >= 30, f"the live schema lists only {len(ops)} operations"
    for op in ops:
        with subtests.test(msg=f"{who} {op.method.upper()} {op.path}"):
            fuzz_operation(op, world, who, token)


def test_every_operation_as_the_operator(world: World, subtests: Any) -> None:
    fuzz_every_operation(world, subtests, "operator", world.admin_token)


def test_every_operation_as_a_rider_on_a_ride(world: World, subtests: Any) -> None:
    fuzz_every_operation(world, subtests, "rider", world.rider_token)
