"""Fixtures for the firmware tests; the helpers live in tests/firmware/fwsupport.py."""
import pytest

from tests.firmware.fwsupport import need_tool


@pytest.fixture(scope="session")
def micropython():
    return need_tool("micropython")


@pytest.fixture(scope="session")
def mpy_cross():
    return need_tool("mpy-cross")
