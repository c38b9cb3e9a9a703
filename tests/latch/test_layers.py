"""Imports point down the layers (docs/architecture.md, "Layers"): a small import graph over the source, read with
`ast` (every import, also those inside functions), no module imported.

    latch (the CLI, settings, composition)         4
    api                                            3
    broker, device_sim                             2
    mqtt_client, firmware (the device's own code)  1
    protocol                                       0

A module may import its own package and the packages of lower layers. The imports that run up today are listed in
KNOWN_UPWARD, each to be removed by issue 16 (settings and the registry access broker and API share move to a
ground floor): the test fails on a new one, and also when a listed one is gone, so the list only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYER = {"protocol": 0, "mqtt_client": 1, "firmware": 1, "broker": 2, "device_sim": 2, "api": 3, "latch": 4}
HOST_TOOLS = ("firmware/tools/",)   # `latch firmware ...`: host-side commands, part of the CLI's layer

KNOWN_UPWARD = {
    ("api/app.py", "latch.mosquitto_config"), ("api/app.py", "latch.settings"),
    ("api/command_log.py", "latch.logs"), ("api/commands.py", "latch.settings"), ("api/events.py", "latch.settings"),
    ("api/fleet.py", "latch.settings"), ("api/journal.py", "latch.settings"), ("api/nats_auth.py", "latch.settings"),
    ("api/nats_bus.py", "latch.settings"), ("api/notifications/service.py", "latch.settings"),
    ("api/request_id.py", "latch.logs"), ("api/rights.py", "latch.settings"), ("api/routes/nearby.py", "latch.geo"),
    ("api/runtime.py", "latch.settings"), ("api/users.py", "latch.settings"),
    ("broker/credentials.py", "api"), ("broker/credentials.py", "api.db"),
    ("device_sim/position.py", "latch.geo"), ("device_sim/position.py", "latch.settings"),
    ("device_sim/provision.py", "latch.logs"), ("device_sim/provision.py", "latch.settings"),
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def upward_imports(root: Path = ROOT) -> set[tuple[str, str]]:
    found = set()
    for package in LAYER:
        for path in sorted((root / package).rglob("*.py")):
            name = path.relative_to(root).as_posix()
            home = "latch" if name.startswith(HOST_TOOLS) else package
            for imported in _imports(path):
                top = imported.split(".")[0]
                if top in LAYER and top not in (package, home) and LAYER[top] >= LAYER[home]:
                    found.add((name, imported))
    return found


def test_imports_point_down_the_layers() -> None:
    found = upward_imports()
    new = sorted(found - KNOWN_UPWARD)
    assert not new, f"imports that run up (or across) the layers: {new}; point them down (docs/architecture.md)"
    gone = sorted(KNOWN_UPWARD - found)
    assert not gone, f"fixed, good: remove {gone} from KNOWN_UPWARD"


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    for rel, text in {"broker/m.py": "def f():\n    from api.db import Database\n",
                      "api/ok.py": "from broker.fence import TopicFence\nfrom api import db\n",
                      "protocol/m.py": "import mqtt_client\n",
                      "firmware/tools/t.py": "from latch.settings import Settings\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert upward_imports(tmp_path) == {("broker/m.py", "api.db"), ("protocol/m.py", "mqtt_client")}
