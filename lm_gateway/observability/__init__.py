"""What happened to each request, and getting that out of the request path.

Every request, whatever its outcome (answered, failed upstream, rejected, cancelled by the
client), ends in exactly one :class:`RequestRecord`. Records go into a bounded memory channel with
``send_nowait`` (never a wait on the request path; when the channel is full the record is counted
as dropped) and a task in the server's nursery delivers them, in batches, to listeners in a worker
thread, so a slow listener or a slow stderr never blocks the event loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

import attrs
import trio

log = logging.getLogger("lm_gateway.access")

Outcome = Literal["ok", "error", "rejected", "cancelled"]

Listener = Callable[["RequestRecord"], None]


@attrs.define
class RequestRecord:
    """One request's story, filled in as it goes and frozen by :meth:`finish`.

    ``outcome``: ``ok`` (answered), ``error`` (the upstream or the gateway failed), ``rejected``
    (refused before any upstream call: auth, validation, routing), ``cancelled`` (the client
    left; ``usage`` then holds what was streamed so far, if known).
    """

    id: str
    endpoint: str
    method: str
    path: str
    client_addr: str | None
    created_at: datetime = attrs.field(factory=lambda: datetime.now(UTC))
    started: float = attrs.field(factory=time.perf_counter)
    model: str | None = None
    connection: str | None = None
    upstream_model: str | None = None
    group: str | None = None
    api_key_id: str | None = None
    user_info: dict[str, Any] = attrs.field(factory=dict)
    stream: bool = False
    status: int | None = None
    outcome: Outcome | None = None
    error_type: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    usage: dict[str, Any] | None = None
    finish_reasons: list[str] = attrs.field(factory=list)
    chunks: int = 0
    duration: float | None = None
    time_to_first_chunk: float | None = None

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    def mark_first_chunk(self) -> None:
        if self.time_to_first_chunk is None:
            self.time_to_first_chunk = time.perf_counter() - self.started

    def finish(self, outcome: Outcome, status: int | None) -> bool:
        """Set the outcome once; returns False if it was already set (later calls are no-ops)."""
        if self.outcome is not None:
            return False
        self.outcome = outcome
        self.status = status
        self.duration = time.perf_counter() - self.started
        return True

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (datetimes as ISO 8601 UTC)."""
        data = attrs.asdict(self)
        data["created_at"] = self.created_at.isoformat()
        data.pop("started", None)
        return data


class RecordSink:
    """A bounded queue of finished records, drained by :meth:`serve` into listeners.

    Args:
        capacity: records held while the drainer is behind; beyond it records are dropped
            (counted in ``dropped``), never buffered without bound.
        flush_seconds: how long a batch collects records before delivery.
        batch_size: the most records delivered in one worker-thread call.
    """

    def __init__(
        self, capacity: int = 10_000, *, flush_seconds: float = 0.05, batch_size: int = 512
    ) -> None:
        self.flush_seconds = flush_seconds
        self.batch_size = batch_size
        self._send, self._receive = trio.open_memory_channel[RequestRecord](capacity)
        self.listeners: list[Listener] = [_access_log]
        self.dropped = 0
        self.delivered = 0

    def submit(self, record: RequestRecord) -> None:
        """Queue a finished record; never blocks and never raises (safe in a cancelled scope)."""
        try:
            self._send.send_nowait(record)
        except trio.WouldBlock:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("request records dropped so far: %d (listeners too slow)", self.dropped)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self.dropped += 1

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver records until :meth:`close`; then deliver what is left and return."""
        task_status.started()
        async with self._receive:
            async for record in self._receive:
                batch = [record]
                # Collect for a moment: one thread hop per batch instead of per request.
                with trio.move_on_after(self.flush_seconds):
                    while len(batch) < self.batch_size:
                        try:
                            batch.append(await self._receive.receive())
                        except trio.EndOfChannel:
                            break
                await trio.to_thread.run_sync(self._deliver, batch)

    def _deliver(self, batch: list[RequestRecord]) -> None:
        for record in batch:
            for listener in list(self.listeners):
                try:
                    listener(record)
                except Exception:
                    log.exception("request listener %r failed", listener)
            self.delivered += 1

    def close(self) -> None:
        """No more records; :meth:`serve` returns once the queue is empty."""
        self._send.close()


def _access_log(record: RequestRecord) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    extra = ""
    if record.connection:
        extra += f" -> {record.connection}/{record.upstream_model}"
    if record.usage:
        extra += (
            f" tokens={record.usage.get('prompt_tokens', '?')}+"
            f"{record.usage.get('completion_tokens', '?')}"
        )
    if record.error_code:
        extra += f" error={record.error_code}"
    log.info(
        "%s %s %s %s %s model=%s%s %.1fms%s",
        record.id,
        record.client_addr or "-",
        record.method,
        record.path,
        record.status if record.status is not None else "-",
        record.model or "-",
        extra,
        (record.duration or 0.0) * 1000,
        " CANCELLED" if record.outcome == "cancelled" else "",
    )
