"""broker/ relies on amqtt internals; an upgrade must fail here first, loudly."""

import inspect
from importlib.metadata import version

from amqtt.broker import Broker

from broker.server import AMQTT_VERSION


def test_amqtt_is_the_pinned_release() -> None:
    assert version("amqtt") == AMQTT_VERSION, (
        f"amqtt {version('amqtt')} installed, broker/ was written against {AMQTT_VERSION}: "
        "re-check LatchBroker's overrides against the new source before changing the pin")


def test_the_internals_we_override_still_look_as_expected() -> None:
    for name in ("_run_broadcast", "_publish_retained_messages_for_subscription", "_topic_filtering",
                 "_get_handler", "_matches", "_retain_broadcast_message"):
        assert hasattr(Broker, name), name
    src = inspect.getsource(Broker._handle_client_session)
    assert "_publish_retained_messages_for_subscription((topic, QOS_0), client_session)" in src
    assert "for k_filter, subscriptions in self._subscriptions.items()" in inspect.getsource(Broker._run_broadcast)
