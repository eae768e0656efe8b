"""The listener's HTTP/1.1 server is protocol code of our own: its tests run on both loops the
proxy may run on (asyncio, and uvloop), as hooks in this directory apply to it alone."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
