"""Replica tests need PostgreSQL whatever the pass: they run once, in the PostgreSQL pass of ./run test."""

from __future__ import annotations

import pytest

from tests.dbs import ON_POSTGRES


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if ON_POSTGRES:
        return
    mine = [i for i in items if "tests/scale/" in str(i.path).replace("\\", "/")]
    if mine:
        config.hook.pytest_deselected(items=mine)
        items[:] = [i for i in items if i not in mine]
