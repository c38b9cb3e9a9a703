#!/usr/bin/env bash
# CI proof of a bare install (issue 17, defect 1): the wheel, installed with no extras into a fresh venv,
# runs `latch --help` and a short `latch serve` that unlocks a demo bike through the HTTP API.
#   .ci/bare_install.sh            (PYTHON=python3.11 to choose the interpreter)
# Everything on loopback, ephemeral ports, bounded waits; the temporary directory is removed at exit.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/latch-bare.XXXXXX")
SERVE_PID=
cleanup() {
    if [ -n "$SERVE_PID" ] && kill -0 "$SERVE_PID" 2>/dev/null; then
        kill -KILL "$SERVE_PID" 2>/dev/null || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT
fail() { echo "bare install: $*" >&2; [ -f "$TMP/serve.out" ] && sed 's/^/  serve| /' "$TMP/serve.out" >&2; exit 1; }
# pip's output (this machine's pip configuration may warn about every package) is shown only when it fails
pip_quiet() { "$@" >"$TMP/pip.log" 2>&1 || { sed 's/^/  pip| /' "$TMP/pip.log" >&2; fail "$* failed"; }; }

echo "bare install: building the wheel" >&2
# from a copy of the source files (tracked, and new ones git does not ignore): setuptools writes build/ and
# *.egg-info where it builds, and a stale build/ in the tree could slip removed files into the wheel
mkdir "$TMP/src"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$TMP/src" 2>/dev/null || true
[ -f "$TMP/src/pyproject.toml" ] || fail "could not copy the source tree"
pip_quiet "$PYTHON" -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$TMP/dist" "$TMP/src"
wheel=$(ls "$TMP"/dist/latch-*.whl)

echo "bare install: $(basename "$wheel") into a fresh venv, no extras" >&2
"$PYTHON" -m venv "$TMP/venv"
pip_quiet "$TMP/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$wheel"
if "$TMP/venv/bin/python" -c 'import pytest' 2>/dev/null; then fail "pytest is installed: not a bare install"; fi

cd "$TMP"   # away from the source tree: only the installed package can be imported
"$TMP/venv/bin/latch" --help >/dev/null || fail "latch --help failed"

echo "bare install: latch serve with a demo fleet, one unlock" >&2
env -u LATCH_ADMIN_TOKEN -u LATCH_DATABASE_URL LATCH_LOG_FORMAT=text \
    "$TMP/venv/bin/latch" serve --data-dir "$TMP/data" --http-port 0 --mqtt-port 0 --demo-fleet 2 \
    >"$TMP/serve.out" 2>&1 &
SERVE_PID=$!
for _ in $(seq 1 600); do   # at most 60 s
    grep -q "Ctrl-C stops it." "$TMP/serve.out" 2>/dev/null && break
    kill -0 "$SERVE_PID" 2>/dev/null || fail "latch serve exited during start-up"
    sleep 0.1
done
grep -q "Ctrl-C stops it." "$TMP/serve.out" || fail "latch serve did not start within 60 s"
api=$(sed -n 's/^  API: *\(http[^ ]*\).*/\1/p' "$TMP/serve.out" | head -1)
[ -n "$api" ] || fail "no API address in the banner"

"$TMP/venv/bin/python" - "$api" "$TMP/data/admin.token" <<'EOF' || fail "the unlock did not succeed"
import sys, time
import httpx

api, token_file = sys.argv[1], sys.argv[2]
token = open(token_file).read().strip()
with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {token}"}, timeout=10) as http:
    deadline = time.monotonic() + 30
    while not http.get("/v1/devices/bike-0001").json()["online"]:   # the demo lock's presence, bounded
        if time.monotonic() > deadline:
            sys.exit("bike-0001 never came online")
        time.sleep(0.1)
    r = http.post("/v1/devices/bike-0001/commands", params={"wait": 10}, json={"action": "unlock"})
    body = r.json()
    print(f"bare install: unlock bike-0001 -> {r.status_code} {body.get('status')}", file=sys.stderr)
    sys.exit(0 if body.get("status") == "succeeded" else 1)
EOF

kill -INT "$SERVE_PID"
for _ in $(seq 1 300); do   # at most 30 s
    kill -0 "$SERVE_PID" 2>/dev/null || break
    sleep 0.1
done
kill -0 "$SERVE_PID" 2>/dev/null && fail "latch serve did not stop within 30 s of SIGINT"
wait "$SERVE_PID" && rc=0 || rc=$?
SERVE_PID=
[ "$rc" = 0 ] || fail "latch serve exited $rc after SIGINT"
grep -q "^Latch stopped\.$" "$TMP/serve.out" || fail "no 'Latch stopped.' line"
if grep -q "Traceback\|gmqtt" "$TMP/serve.out"; then fail "a traceback or gmqtt warning in the output"; fi
echo "bare install: OK (wheel, no extras: latch --help, serve, unlock succeeded, Ctrl-C)" >&2
