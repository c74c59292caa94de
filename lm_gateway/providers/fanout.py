"""``n > 1`` for connections that can only produce one choice per call.

Anthropic has no ``n``, and neither does a user's callable. For those, the gateway runs ``n``
upstream calls concurrently in one nursery and merges them: choice ``i`` comes from call ``i``,
usage is summed over the calls (each call is billed for its prompt), and if any call fails the
others are cancelled (their upstream connections closed) and that failure is the answer.

Streaming: the ``n`` streams are opened concurrently, so a refusal still surfaces before the
first byte; then one task per stream, in the request's nursery and inside a cancel scope the
merged stream owns, feeds a channel. Chunks keep arriving in the order the upstreams produce
them, each choice re-indexed to its call, all under one chunk ``id``; the calls' usage chunks
are absorbed into one summed usage chunk sent after every stream has ended.
"""

from __future__ import annotations

import contextlib
import copy
import time
from typing import Any

import trio

from ..errors import GatewayError, InternalError
from .base import (
    ChatCall,
    ChatResult,
    ChatStream,
    Connection,
    JSONObject,
    close_quietly,
    raise_from_group,
)


def has_native_n(connection: Connection) -> bool:
    """Whether ``connection`` answers ``n > 1`` itself (the protocol's default: yes)."""
    return bool(getattr(connection, "native_n", True))


def _sub_call(call: ChatCall) -> ChatCall:
    body = dict(call.body)
    body.pop("n", None)
    sub = copy.copy(call)
    sub.body = body
    sub.headers = dict(call.headers)
    return sub


def add_usage(total: JSONObject | None, usage: Any) -> JSONObject | None:
    """Sum two OpenAI usage objects field by field (nested ``*_details`` included)."""
    if not isinstance(usage, dict):
        return total
    out: JSONObject = dict(total or {})
    for key, value in usage.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            previous = out.get(key)
            out[key] = (previous if isinstance(previous, int | float) else 0) + value
        elif isinstance(value, dict):
            previous = out.get(key)
            out[key] = add_usage(previous if isinstance(previous, dict) else None, value)
        elif key not in out:
            out[key] = value
    return out


async def fan_out_chat(connection: Connection, call: ChatCall, n: int) -> ChatResult:
    """``n`` calls of ``connection.chat`` in one nursery, merged into one completion.

    Raises:
        GatewayError: the first call that failed (the others were cancelled).
    """
    results: list[ChatResult | None] = [None] * n

    async def one(i: int) -> None:
        results[i] = await connection.chat(_sub_call(call))

    try:
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
    except BaseExceptionGroup as group:
        raise_from_group(group)
    done = [r for r in results if r is not None]
    body = dict(done[0].body)
    choices: list[Any] = []
    usage: JSONObject | None = None
    for i, result in enumerate(done):
        for choice in result.body.get("choices") or []:
            if isinstance(choice, dict):
                choices.append({**choice, "index": i})
        usage = add_usage(usage, result.body.get("usage"))
    body["choices"] = choices
    if usage is not None:
        body["usage"] = usage
    return ChatResult(body=body, headers=done[0].headers)


async def fan_out_stream(connection: Connection, call: ChatCall, n: int) -> ChatStream:
    """``n`` streams of ``connection`` merged into one; see the module docstring.

    Raises:
        GatewayError: one of the streams failed to open (the others are closed).
    """
    streams: list[ChatStream | None] = [None] * n

    async def open_one(i: int) -> None:
        streams[i] = await connection.open_chat_stream(_sub_call(call))

    try:
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(open_one, i)
    except BaseExceptionGroup as group:
        for stream in streams:
            if stream is not None:
                await close_quietly(stream)
        raise_from_group(group)
    merged = MergedStream([s for s in streams if s is not None], model=call.body.get("model"))
    # The merged stream always ends with a usage chunk; the relay drops it unless asked for.
    call.usage_requested_by_gateway = True
    await call.nursery.start(merged.run_feeders)
    return merged


class MergedStream:
    """Several single-choice streams as one multi-choice stream (see the module docstring)."""

    def __init__(self, streams: list[ChatStream], model: Any) -> None:
        self._streams = streams
        self._model = model
        self._send, self._receive = trio.open_memory_channel[
            tuple[int, list[JSONObject] | GatewayError | None]
        ](len(streams) * 4)
        self._scope = trio.CancelScope()
        self._running = len(streams)
        self._usage: JSONObject | None = None
        self._id: str | None = None
        self._created: Any = None
        self._ended = False

    async def run_feeders(self, task_status: trio.TaskStatus[None]) -> None:
        """Read every stream in its own task until all end, the merge fails, or aclose()."""
        with self._scope:
            async with self._send, trio.open_nursery() as nursery:
                for i, stream in enumerate(self._streams):
                    nursery.start_soon(self._feed, i, stream, self._send.clone())
                task_status.started()

    async def _feed(
        self,
        index: int,
        stream: ChatStream,
        send: trio.MemorySendChannel[tuple[int, list[JSONObject] | GatewayError | None]],
    ) -> None:
        async with send:
            try:
                while batch := await stream.receive():
                    await send.send((index, batch))
            except GatewayError as error:
                await send.send((index, error))
                return
            except Exception as exc:
                await send.send(
                    (index, InternalError("A fanned-out stream failed.", detail=repr(exc)))
                )
                return
            await send.send((index, None))

    async def receive(self) -> list[JSONObject]:
        while True:
            if self._ended:
                await trio.lowlevel.checkpoint()
                return []
            try:
                index, item = await self._receive.receive()
            except trio.EndOfChannel:
                item, index = None, -1
                self._running = 0
            if isinstance(item, GatewayError):
                self._scope.cancel()  # the other calls are pointless now
                raise item
            if item is None:
                self._running = max(0, self._running - 1)
                if self._running == 0:
                    self._ended = True
                    return [self._usage_chunk()] if self._usage is not None else []
                continue
            out = self._reindex(index, item)
            if out:
                return out

    def _reindex(self, index: int, batch: list[JSONObject]) -> list[JSONObject]:
        out = []
        for chunk in batch:
            if self._id is None:
                self._id = chunk.get("id")
                self._created = chunk.get("created")
            usage = chunk.get("usage")
            if isinstance(usage, dict):
                self._usage = add_usage(self._usage, usage)
            choices = chunk.get("choices") or []
            if not choices:
                continue  # a usage-only chunk: absorbed into the summed one
            merged = {k: v for k, v in chunk.items() if k != "usage"}
            if self._id is not None:
                merged["id"] = self._id
            merged["choices"] = [
                {**c, "index": index} if isinstance(c, dict) else c for c in choices
            ]
            out.append(merged)
        return out

    def _usage_chunk(self) -> JSONObject:
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created if self._created is not None else int(time.time()),
            "model": self._model,
            "choices": [],
            "usage": self._usage,
        }

    async def aclose(self) -> None:
        self._ended = True
        self._scope.cancel()
        with contextlib.suppress(Exception):
            self._receive.close()
        for stream in self._streams:
            await close_quietly(stream)
