"""Imports point down the layers (docs/architecture.md, "Layers"): a small import graph over the source, read with
`ast` (every import, also those inside functions), no module imported.

    latch (the CLI, composition)                   4
    api                                            3
    broker, device_sim                             2
    mqtt_client, firmware (the device's own code)  1
    protocol, foundation (settings, logs, geo)     0

A module may import its own package and the packages of lower layers (two packages on one floor may not import each
other). KNOWN_UPWARD lists imports that run up and are tolerated for now: the test fails on a new one, and also when a
listed one is gone, so the list only shrinks. Issue 16's first step emptied it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYER = {"foundation": 0, "protocol": 0, "mqtt_client": 1, "firmware": 1, "broker": 2, "device_sim": 2, "api": 3,
         "latch": 4}
HOST_TOOLS = ("firmware/tools/",)   # `latch firmware ...`: host-side commands, part of the CLI's layer

KNOWN_UPWARD: set[tuple[str, str]] = set()   # emptied by issue 16's first step (docs/architecture.md)


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
                      "firmware/tools/t.py": "from latch.cli import main\n",
                      "device_sim/ok.py": "from foundation.settings import Settings\n",
                      "foundation/m.py": "from api import db\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert upward_imports(tmp_path) == {("broker/m.py", "api.db"), ("protocol/m.py", "mqtt_client"),
                                        ("foundation/m.py", "api")}
