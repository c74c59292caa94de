"""Usage loggers: lm-proxy's ``loggers`` section, with nothing lost and nothing blocking.

A logger turns each finished request (a :class:`~lm_gateway.context.RequestContext`) into an
entry and hands entries to a writer. :class:`BaseLogger` is lm-proxy's: a ``log_writer`` and an
optional ``entry_transformer`` (:class:`LogEntryTransformer`: output field = dotted path into
the context). Without a transformer the entry is :func:`default_entry`.

Delivery (:class:`LoggerRunner`): each logger has its own bounded queue, filled with
``send_nowait`` when a request finishes (never a wait on the request path) and drained by a
task in the server's nursery, which writes batches from a worker thread. A failing writer is
retried with backoff; while it fails the queue fills, and once it is full new entries are
dropped and counted (a metric and a warning) — never an unbounded buffer. A batch that still
fails after ``max_retries`` is dropped and counted too. On shutdown the queue is flushed, within
a deadline.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import trio

from ..context import RequestContext
from .queues import drain

log = logging.getLogger("lm_gateway.loggers")


def resolve_path(obj: Any, path: str) -> Any:
    """Follow ``a.b.0.c`` through attributes, mapping keys and list indices; None if absent."""
    current = obj
    for part in path.split("."):
        if current is None:
            return None
        if isinstance(current, Mapping):
            current = current.get(part)
        elif isinstance(current, list | tuple) and part.lstrip("-").isdigit():
            index = int(part)
            current = current[index] if -len(current) <= index < len(current) else None
        else:
            current = getattr(current, part, None)
    return current


def default_entry(
    ctx: RequestContext, *, include_prompt: bool = False, include_response: bool = False
) -> dict[str, Any]:
    """The standard log entry: who, what, where to, how it went, what it used and cost."""
    usage = ctx.usage if isinstance(ctx.usage, Mapping) else {}
    prompt_details = usage.get("prompt_tokens_details")
    completion_details = usage.get("completion_tokens_details")
    entry: dict[str, Any] = {
        "id": ctx.id,
        "created_at": ctx.created_at.isoformat(),
        "duration": ctx.duration,
        "time_to_first_token": ctx.time_to_first_chunk,
        "endpoint": ctx.endpoint,
        "status": ctx.status,
        "outcome": ctx.outcome,
        "error_type": ctx.error_type,
        "error_code": ctx.error_code,
        "group": ctx.group,
        "api_key_id": ctx.api_key_id,
        "user_info": ctx.user_info,
        "remote_addr": ctx.remote_addr,
        "model": ctx.model,
        "connection": ctx.connection,
        "upstream_model": ctx.upstream_model,
        "attempts": ctx.attempts,
        "served_by": ctx.served_by,
        "attempt_log": ctx.attempt_log if len(ctx.attempt_log) > 1 else None,
        "stream": ctx.stream,
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "total_tokens": usage.get("total_tokens"),
        "cached_tokens": prompt_details.get("cached_tokens")
        if isinstance(prompt_details, Mapping)
        else None,
        "reasoning_tokens": completion_details.get("reasoning_tokens")
        if isinstance(completion_details, Mapping)
        else None,
        "cost": ctx.cost,
        "finish_reasons": list(ctx.finish_reasons),
        "extra": ctx.extra,
    }
    if include_prompt:
        entry["prompt"] = (ctx.request or {}).get("messages")
    if include_response:
        entry["response"] = ctx.response
    return entry


class LogEntryTransformer:
    """lm-proxy's transformer: each keyword is an output field, its value a dotted path into
    the request context (``completion_tokens = "response.usage.completion_tokens"``)."""

    def __init__(self, **mapping: str) -> None:
        for field, path in mapping.items():
            if not isinstance(path, str) or not path:
                raise ValueError(
                    f"{field}: expected a dotted path such as 'response.usage', got {path!r}"
                )
        self.mapping = dict(mapping)

    def __call__(self, ctx: RequestContext) -> dict[str, Any]:
        entry = {}
        for field, path in self.mapping.items():
            value = resolve_path(ctx, path)
            if path == "created_at" and value is not None:
                value = ctx.created_at.isoformat()
            entry[field] = value
        return entry

    def reads_response(self) -> bool:
        """Whether an entry needs the answer's content (not just its usage)."""
        return any(
            p == "response" or (p.startswith("response.") and not p.startswith("response.usage"))
            for p in self.mapping.values()
        )


class LogWriter(Protocol):
    """Writes a batch of entries (blocking is fine: it runs in a worker thread)."""

    def write(self, entries: list[dict[str, Any]]) -> None: ...


_REDACTED = "[redacted]"


def redact(entry: dict[str, Any], paths: Sequence[str]) -> dict[str, Any]:
    """Replace the values at ``paths`` (dotted; ``*`` matches every key or list item) with
    ``"[redacted]"``, in place. Missing paths are ignored."""
    for path in paths:
        _redact(entry, path.split("."))
    return entry


def _redact(node: Any, parts: list[str]) -> None:
    if not parts:
        return
    head, rest = parts[0], parts[1:]
    if isinstance(node, dict):
        keys = list(node) if head == "*" else [head] if head in node else []
        for key in keys:
            if rest:
                _redact(node[key], rest)
            else:
                node[key] = _REDACTED
    elif isinstance(node, list):
        indices = (
            range(len(node))
            if head == "*"
            else ([int(head)] if head.isdigit() and int(head) < len(node) else [])
        )
        for i in indices:
            if rest:
                _redact(node[i], rest)
            else:
                node[i] = _REDACTED


class BaseLogger:
    """lm-proxy's logger: ``log_writer`` + optional ``entry_transformer``.

    Args:
        log_writer: anything with ``write(entries)`` (or a callable taking one entry).
        entry_transformer: ``ctx -> dict``; default :func:`default_entry`.
        log_prompts: put the request's messages in default entries (off: prompts are data).
        log_responses: put the answer in default entries (off).
        redact: dotted paths in each entry replaced by ``"[redacted]"``
            (``prompt.*.content``, ``user_info.email``).
        only: log only these outcomes (``ok``, ``error``, ``rejected``, ``cancelled``).
        queue_size: entries waiting at most (beyond: dropped and counted).
        batch_size: entries per write.
        max_retries: attempts for a failing batch before it is dropped (and counted).
    """

    def __init__(
        self,
        log_writer: Any,
        entry_transformer: Callable[[RequestContext], dict[str, Any]] | None = None,
        *,
        log_prompts: bool = False,
        log_responses: bool = False,
        redact: Iterable[str] = (),
        only: Iterable[str] | None = None,
        queue_size: int = 10_000,
        batch_size: int = 200,
        max_retries: int = 8,
    ) -> None:
        if isinstance(log_writer, Mapping):
            raise TypeError("log_writer: give a writer (a table with 'class'), not plain data")
        if not (callable(getattr(log_writer, "write", None)) or callable(log_writer)):
            raise TypeError(f"log_writer: {type(log_writer).__name__} has no write() method")
        if entry_transformer is not None and not callable(entry_transformer):
            raise TypeError("entry_transformer: must be callable (a LogEntryTransformer)")
        for label, value in (("queue_size", queue_size), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{label}: must be a whole number of at least 1, got {value!r}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries: must be a whole number, got {max_retries!r}")
        self.log_writer = log_writer
        self.entry_transformer = entry_transformer
        self.log_prompts = log_prompts
        self.log_responses = log_responses
        self.redact = [str(p) for p in redact]
        self.only = frozenset(only) if only is not None else None
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.max_retries = max_retries

    def wants(self, ctx: RequestContext) -> bool:
        return self.only is None or ctx.outcome in self.only

    def entry(self, ctx: RequestContext) -> dict[str, Any]:
        if self.entry_transformer is not None:
            entry = dict(self.entry_transformer(ctx))
        else:
            entry = default_entry(
                ctx, include_prompt=self.log_prompts, include_response=self.log_responses
            )
        return redact(entry, self.redact) if self.redact else entry

    def write(self, entries: list[dict[str, Any]]) -> None:
        writer = self.log_writer
        if callable(getattr(writer, "write", None)):
            writer.write(entries)
        else:
            for entry in entries:
                writer(entry)

    def reads_response(self) -> bool:
        transformer = self.entry_transformer
        if isinstance(transformer, LogEntryTransformer):
            return transformer.reads_response()
        return self.log_responses or transformer is not None

    def close(self) -> None:
        close = getattr(self.log_writer, "close", None)
        if callable(close):
            close()


class CallableLogger:
    """A user's function or object ``logger(ctx)``, sync or async, as a logger."""

    def __init__(self, target: Callable[[RequestContext], Any], is_async: bool) -> None:
        self.target = target
        self.is_async = is_async
        self.queue_size = 10_000
        self.batch_size = 200
        self.max_retries = 3

    def wants(self, ctx: RequestContext) -> bool:
        return True

    def reads_response(self) -> bool:
        return True


class LoggerRunner:
    """Delivers finished requests to one logger (see the module docstring)."""

    def __init__(self, logger: BaseLogger | CallableLogger, name: str) -> None:
        self.logger = logger
        self.name = name
        self._send, self._receive = trio.open_memory_channel[RequestContext](logger.queue_size)
        self.dropped = 0
        self.written = 0
        self._in_hand = 0
        #: How long a batch collects entries before it is written.
        self.collect_seconds = 0.05
        self.on_drop: Callable[[str, int], None] | None = None

    def submit(self, ctx: RequestContext) -> None:
        """Queue a finished request; never blocks, never raises."""
        if not self.logger.wants(ctx):
            return
        try:
            self._send.send_nowait(ctx)
        except trio.WouldBlock:
            self._dropped(1, "its queue is full (the writer is slow or failing)")
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._dropped(1, "the gateway is shutting down")

    def _dropped(self, count: int, why: str) -> None:
        self.dropped += count
        if self.on_drop is not None:
            self.on_drop(self.name, count)
        if self.dropped == count or self.dropped % 1000 < count:
            log.warning("logger %s: %d entries dropped so far (%s)", self.name, self.dropped, why)

    def close(self) -> None:
        """No more entries: :meth:`serve` returns once the queue is written."""
        self._send.close()

    def close_logger(self) -> None:
        """Release the logger's writer (a database pool, say); blocking, call from a thread."""
        close = getattr(self.logger, "close", None)
        if callable(close):
            try:
                close()
            except Exception:
                log.exception("logger %s: closing its writer failed", self.name)

    async def serve(self) -> None:
        """Drain the queue until :meth:`close`; then write what is left and return.

        If cancelled (the shutdown flush ran out of time), the entries not written are counted
        as dropped.
        """
        logger = self.logger
        async with self._receive:
            try:
                async for ctx in self._receive:
                    batch = [ctx]
                    # Collect for a moment: one worker-thread hop per batch, not per request.
                    # Taken with receive_nowait: each awaited receive() is a checkpoint, and
                    # under load a checkpoint waits a whole scheduling round (that capped
                    # delivery near 400 entries/s while 1,600 requests/s arrived).
                    if not drain(self._receive, batch, logger.batch_size):
                        self._in_hand = len(batch)  # counted if the shutdown cuts the wait
                        await trio.sleep(self.collect_seconds)
                        drain(self._receive, batch, logger.batch_size)
                    self._in_hand = len(batch)
                    await self._deliver(batch)
                    self._in_hand = 0
            finally:
                # Counted before the channel closes (closing discards what it holds).
                left = self._in_hand + self._receive.statistics().current_buffer_used
                if left:
                    self._dropped(left, "the shutdown flush ran out of time")
                self._in_hand = 0

    async def _deliver(self, batch: list[RequestContext]) -> None:
        logger = self.logger
        if isinstance(logger, CallableLogger):
            await self._deliver_callable(logger, batch)
            return
        try:
            entries = [logger.entry(ctx) for ctx in batch]
        except Exception:
            log.exception("logger %s: building entries failed; %d dropped", self.name, len(batch))
            self._dropped(len(batch), "its entry transformer failed")
            return
        delay = 0.5
        for attempt in range(logger.max_retries + 1):
            try:
                # Only the shutdown flush's deadline cancels a runner: a write stuck on a dead
                # database must not hold the process, so its thread is left to finish alone
                # (its batch is counted as dropped, though it may still land).
                await trio.to_thread.run_sync(logger.write, entries, abandon_on_cancel=True)
            except Exception as exc:
                if attempt == logger.max_retries:
                    log.error(  # noqa: TRY400 - the cause is in the message; no traceback
                        "logger %s: writing failed %d times (%s: %s); %d entries dropped",
                        self.name,
                        attempt + 1,
                        type(exc).__name__,
                        exc,
                        len(entries),
                    )
                    self._dropped(len(entries), "its writer keeps failing")
                    return
                log.warning(
                    "logger %s: writing failed (%s: %s); retrying in %.1f s",
                    self.name,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                await trio.sleep(delay)
                delay = min(delay * 2, 30.0)
            else:
                self.written += len(entries)
                return

    async def _deliver_callable(self, logger: CallableLogger, batch: list[RequestContext]) -> None:
        for ctx in batch:
            try:
                if logger.is_async:
                    await logger.target(ctx)
                else:
                    await trio.to_thread.run_sync(logger.target, ctx, abandon_on_cancel=True)
                self.written += 1
            except Exception:
                log.exception("logger %s failed on request %s", self.name, ctx.id)
                self._dropped(1, "it raised")


def logger_name(obj: Any, index: int) -> str:
    """A readable name for metrics and messages: ``loggers[0]:JsonLogWriter``."""
    target = getattr(obj, "log_writer", obj)
    return f"loggers[{index}]:{re.sub(r'[^A-Za-z0-9_]', '', type(target).__name__)}"
