"""Writers and loggers the tests name in configs (by dotted path, as users do)."""

from __future__ import annotations

import threading
import time
from typing import Any


class FailingWriter:
    """Every write raises (a database that is down)."""

    def __init__(self) -> None:
        self.attempts = 0

    def write(self, entries: list[dict[str, Any]]) -> None:
        self.attempts += 1
        raise ConnectionError("the sink is down")


class ListWriter:
    """Keeps what it is given; ``fail_first`` writes raise first; each write takes ``delay``
    seconds; ``gate`` (when set) makes writes wait until it is set."""

    def __init__(self, fail_first: int = 0, delay: float = 0.0) -> None:
        self.delay = delay
        self.entries: list[dict[str, Any]] = []
        self.fail_first = fail_first
        self.calls = 0
        self.gate: threading.Event | None = None
        self.closed = False

    def write(self, entries: list[dict[str, Any]]) -> None:
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(30)
        time.sleep(self.delay)
        if self.calls <= self.fail_first:
            raise ConnectionError(f"failure {self.calls}")
        self.entries.extend(entries)

    def close(self) -> None:
        self.closed = True
