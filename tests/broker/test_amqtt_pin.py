"""The amqtt pin, and proof that Latch's broker no longer relies on amqtt's internals.

broker/ replaced amqtt's broker core with its own (docs/broker.md), so no
amqtt internal can change Latch's broker behind its back: the second test
fails loudly the day someone imports amqtt into broker/ again. amqtt stays
pinned at the exact release because the conformance harness runs it as a
reference broker (tests/conformance, `amqtt_plain`/`amqtt_auth`), its strict
xfails and docs/amqtt-defects.md's line numbers describe exactly 0.12.1, and
the harness reaches into one amqtt internal to learn the bound port.
"""

import ast
import inspect
from importlib.metadata import version
from pathlib import Path

import amqtt.broker

ROOT = Path(__file__).resolve().parents[2]
AMQTT_VERSION = "0.12.1"


def test_amqtt_is_the_pinned_release() -> None:
    assert version("amqtt") == AMQTT_VERSION, (
        f"amqtt {version('amqtt')} installed, the conformance references and docs/amqtt-defects.md describe "
        f"{AMQTT_VERSION}: re-run tests/conformance and re-check every amqtt xfail before changing the pin")
    assert f'"amqtt=={AMQTT_VERSION}"' in (ROOT / "pyproject.toml").read_text()


def test_latchs_broker_imports_nothing_from_amqtt() -> None:
    offenders = []
    for path in sorted((ROOT / "broker").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n == "amqtt" or n.startswith("amqtt.")]
    assert not offenders, f"broker/ must not depend on amqtt internals again: {offenders}"


def test_the_amqtt_internal_the_harness_uses_is_still_there() -> None:
    """tests/conformance/amqtt_server.py learns the bound port from Broker._servers[name].instance."""
    src = inspect.getsource(amqtt.broker.Broker._start_listeners)
    assert "self._servers[listener_name] = Server(listener_name, instance" in src
    assert "self.instance = server_instance" in inspect.getsource(amqtt.broker.Server.__init__)
