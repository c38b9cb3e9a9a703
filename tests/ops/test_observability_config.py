"""The observability profile's files, checked without Docker: Prometheus's config with Debian's `promtool`
(which CI installs), its targets against docker-compose.yml, Grafana's provisioning, and the Latch dashboard:
every panel's PromQL parses (`promtool check rules`) and names only series a real scrape of Latch exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

from ruamel.yaml import YAML

from latch.cli import build_parser
from tests.ops.scrape import parse
from tests.support import LiveStack

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_YML = ROOT / "deploy/prometheus/prometheus.yml"
GRAFANA = ROOT / "deploy/grafana"
DASHBOARD = GRAFANA / "dashboards/latch.json"
DATASOURCE = GRAFANA / "provisioning/datasources/prometheus.yml"
PROVIDER = GRAFANA / "provisioning/dashboards/latch.yml"
METRIC = re.compile(r"\b((?:latch|process)_[a-z0-9_]+)\b")


def _yaml(path: Path) -> Any:
    return YAML(typ="safe", pure=True).load(path.read_text())


def _compose() -> dict[str, Any]:
    from tests.latch.test_compose import _compose as compose  # interpolated with every default
    return compose()


def _promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool not found: install Debian's `prometheus` package (.ci/run does)"
    return found


def _config_target(service: str, source: str) -> str:
    (target,) = [c["target"] for c in _compose()["services"][service]["configs"] if c["source"] == source]
    return target


def _exprs() -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        out += [(panel["title"], t["expr"]) for t in panel["targets"]]
    return out


def test_promtool_accepts_the_prometheus_config(tmp_path: Path) -> None:
    token_path = _config_target("prometheus", "prometheus-metrics-token")
    text = PROMETHEUS_YML.read_text()
    assert f"credentials_file: {token_path}" in text, "the file Compose mounts is the one Prometheus reads"
    token = tmp_path / "latch-metrics.token"
    token.write_text(_compose()["configs"]["prometheus-metrics-token"]["content"])
    config = tmp_path / "prometheus.yml"
    config.write_text(text.replace(token_path, str(token)))
    r = subprocess.run([_promtool(), "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def test_promtool_catches_a_broken_config(tmp_path: Path) -> None:
    config = tmp_path / "prometheus.yml"
    config.write_text("scrape_configs:\n  - job_name: x\n    scrape_interval: soon\n")
    r = subprocess.run([_promtool(), "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0


def test_prometheus_scrapes_every_latch_api_and_the_broker_listener() -> None:
    services = _compose()["services"]
    parser = build_parser()
    apis, brokers = {}, {}
    for name, service in services.items():
        if service.get("image") != "latch:dev":
            continue
        args = parser.parse_args(service["command"])
        env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
        if args.command in ("serve", "api"):
            apis[name] = args.http_port or 8000
            assert env.get("LATCH_METRICS_TOKEN") == _compose()["configs"]["prometheus-metrics-token"]["content"], \
                f"{name}: Prometheus's token must open its /metrics"
        if args.command in ("serve", "broker") and "LATCH_METRICS_PORT" in env:
            brokers[name] = int(env["LATCH_METRICS_PORT"])
    assert apis and brokers
    jobs = {j["job_name"]: j for j in _yaml(PROMETHEUS_YML)["scrape_configs"]}
    for job, wanted in (("latch-api", apis), ("latch-broker", brokers)):
        (sd,) = jobs[job]["dns_sd_configs"]
        assert set(sd["names"]) == set(wanted), (job, sd["names"], wanted)
        assert {sd["port"]} == set(wanted.values()), (job, sd["port"], wanted)
    assert jobs["latch-api"]["authorization"]["type"] == "Bearer"
    assert "authorization" not in jobs["latch-broker"], "the broker's listener takes no token"
    assert "9090:9090" in services["prometheus"]["ports"][0]


def test_grafana_provisions_the_prometheus_datasource_and_the_latch_dashboard() -> None:
    (ds,) = _yaml(DATASOURCE)["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090" and ds["isDefault"]
    (provider,) = _yaml(PROVIDER)["providers"]
    dashboard_target = _config_target("grafana", "grafana-latch-dashboard")
    assert str(PurePosixPath(dashboard_target).parent) == provider["options"]["path"]
    assert _config_target("grafana", "grafana-datasource").startswith("/etc/grafana/provisioning/datasources/")
    assert _config_target("grafana", "grafana-dashboards").startswith("/etc/grafana/provisioning/dashboards/")
    for name, path in (("prometheus-yml", PROMETHEUS_YML), ("grafana-datasource", DATASOURCE),
                       ("grafana-dashboards", PROVIDER), ("grafana-latch-dashboard", DASHBOARD)):
        assert (ROOT / _compose()["configs"][name]["file"]).resolve() == path.resolve(), name
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] == "Latch"
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == ds["uid"], panel["title"]
        assert all(t["datasource"]["uid"] == ds["uid"] for t in panel["targets"]), panel["title"]
    titles = " / ".join(p["title"] for p in dash["panels"]).lower()
    for wanted in ("commands / s by outcome", "p50 / p99", "devices online", "push subscribers"):
        assert wanted in titles, wanted


def test_every_dashboard_query_parses_as_promql(tmp_path: Path) -> None:
    rules = {"groups": [{"name": "latch-dashboard", "rules": [
        {"record": f"latch_dashboard:panel_{i}", "expr": expr} for i, (_, expr) in enumerate(_exprs())]}]}
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules))   # JSON is YAML
    r = subprocess.run([_promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


async def test_every_dashboard_query_names_series_latch_exports(stack: LiveStack) -> None:
    """Scraped from a stack with its embedded broker (whose families are on the API's page) after an unlock
    and a held poll: every histogram has observations, so its _bucket series exist."""
    await stack.lock("bike-7101")
    assert (await stack.command("bike-7101", "unlock")).json()["status"] == "succeeded"
    r = await stack.http.get("/metrics")
    assert r.status_code == 200
    exported = {name for name, _, _ in parse(r.text).samples}
    for title, expr in _exprs():
        names = set(METRIC.findall(expr))
        assert names, f"{title!r}: {expr} names no Latch metric"
        assert names <= exported, f"{title!r}: {sorted(names - exported)} not exported"
