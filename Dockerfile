# syntax=docker/dockerfile:1
# One image for every Latch process: `latch serve`, `latch broker`, `latch api`, `latch sim`, and the one-shots
# `latch db upgrade` and `latch broker-config` (docker-compose.yml runs them all).
#
#   docker build -t latch .
#   docker run --rm -p 127.0.0.1:8000:8000 -p 127.0.0.1:1883:1883 -v latch-data:/data latch   # serve + 100 demo locks
#   docker run --rm latch api --help
#
# Keep /data on a volume: SQLite database, broker store, generated secrets. No Docker engine runs where Latch is
# developed; tests/latch/test_compose.py checks what can be checked without one.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: the package and its runtime dependencies into a venv (no test, bench or firmware extras)
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/latch
# what is sent is filtered by .dockerignore; pyproject.toml decides what is installed
COPY . /src
RUN /opt/latch/bin/pip install /src

# ---- runtime
FROM ${PYTHON_IMAGE}
# uid/gid 1883 is the `mosquitto` user of the eclipse-mosquitto image: in the scale profile (docker-compose.yml)
# Latch writes Mosquitto's password_file (0640) and acl_file into a volume Mosquitto reads, as the user Mosquitto
# runs as. /mosquitto/latch exists, owned by that user, so that a fresh volume mounted there takes the ownership.
RUN groupadd --system --gid 1883 latch \
 && useradd --system --uid 1883 --gid latch --home-dir /data --no-create-home --shell /usr/sbin/nologin latch \
 && mkdir -p /data /mosquitto/latch \
 && chown latch:latch /data /mosquitto/latch
COPY --from=build /opt/latch /opt/latch
ENV PATH=/opt/latch/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LATCH_HOST=0.0.0.0 \
    LATCH_DATA_DIR=/data
# Fail the build, not the first request, if the installed package is incomplete: the pages' static files are
# package data pyproject.toml must declare, the migrations a directory without __init__.py.
RUN latch --help >/dev/null \
 && python -c "from api.routes.pages import STATIC; assert (STATIC / 'phone.html').is_file(), f'{STATIC}: not installed (pyproject.toml package data)'" \
 && python -c "import api.migrations as m, pathlib; assert any(pathlib.Path(m.__file__).with_name('versions').glob('0*.py')), 'api/migrations/versions: not installed'"
USER latch
WORKDIR /data
EXPOSE 8000 1883
# GET /healthz (api/routes/health.py) answers 200 with broker_connected; healthy = answering and linked to the
# broker. For processes without the HTTP API (`latch broker`, `latch sim`, the one-shots) disable it
# (compose: `healthcheck: {disable: true}`; docker run: --no-healthcheck).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import json, os, urllib.request as u; r = u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LATCH_HTTP_PORT', '8000'), timeout=2); raise SystemExit(0 if json.load(r).get('broker_connected') else 1)"]
ENTRYPOINT ["latch"]
CMD ["serve", "--demo-fleet", "100"]
