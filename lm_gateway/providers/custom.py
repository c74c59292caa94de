"""Connections written by users: lm-proxy-style callables, or objects speaking our protocol.

lm-proxy's convention, which configs in the wild rely on (its load-balancer example): a
connection is ``await fn(messages, **params)`` returning the answer text (or a ``chat.completion``
dict); for streams it is called with ``stream=True, callback=cb`` and awaits ``cb(text)`` per
piece. ``params`` is the request body without ``messages`` and without null values, with
``model`` set to the routed model name.

An object that has ``chat``, ``open_chat_stream``, ``list_models`` and ``aclose`` (the
:class:`~lm_gateway.providers.base.Connection` protocol) is used as it is: that is the seam for
strategies that are themselves connections.

A synchronous callable runs in a worker thread, so it cannot block the event loop; it cannot be
interrupted either, so a request whose client left waits for it to return (make it async to get
prompt cancellation).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import trio

from ..errors import GatewayError, UpstreamError
from .base import ChatCall, ChatResult, ChatStream, Connection, JSONObject

log = logging.getLogger("lm_gateway.providers")

_PROTOCOL_METHODS = ("chat", "open_chat_stream", "list_models", "aclose")


def is_connection_object(obj: object) -> bool:
    """Whether ``obj`` implements the Connection protocol itself."""
    return all(callable(getattr(obj, m, None)) for m in _PROTOCOL_METHODS)


def wrap_custom(name: str, obj: object) -> Connection:
    """Make a Connection of a user's object: used as is if it speaks the protocol, else treated
    as an lm-proxy-style callable.

    Raises:
        TypeError: ``obj`` is neither.
    """
    if is_connection_object(obj):
        if not isinstance(getattr(obj, "name", None), str):
            with contextlib.suppress(AttributeError):
                obj.name = name  # type: ignore[attr-defined]
        return obj  # type: ignore[return-value]
    if callable(obj):
        return CallableConnection(name, obj)
    raise TypeError(f"{type(obj).__name__} is neither callable nor a connection object")


def _failure(name: str, exc: Exception) -> GatewayError:
    if isinstance(exc, GatewayError):
        return exc
    log.error("connection %r raised %s", name, type(exc).__name__, exc_info=exc)
    return UpstreamError(
        f"The connection {name!r} failed.",
        detail=f"{type(exc).__name__}: {exc}",
        connection=name,
    )


def _completion(result: Any, model: str) -> JSONObject:
    """Normalise what a callable returned into a ``chat.completion`` object."""
    if hasattr(result, "model_dump") and callable(result.model_dump):
        result = result.model_dump()
    if isinstance(result, dict) and isinstance(result.get("choices"), list):
        completion = dict(result)
        completion.setdefault("id", f"chatcmpl-{secrets.token_hex(12)}")
        completion.setdefault("object", "chat.completion")
        completion.setdefault("created", int(time.time()))
        completion.setdefault("model", model)
        return completion
    text = "" if result is None else str(result)
    return {
        "id": f"chatcmpl-{secrets.token_hex(12)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
    }


class CallableConnection:
    """An lm-proxy-style ``fn(messages, **params)`` as a connection."""

    #: One answer per call: the gateway fans ``n > 1`` out into n calls.
    native_n = False

    def __init__(self, name: str, fn: Callable[..., Any]) -> None:
        self.name = name
        self._fn = fn

    async def _call(self, messages: Any, params: JSONObject) -> Any:
        target = self._fn
        if inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
            getattr(target, "__call__", None)  # noqa: B004 - instances with async __call__
        ):
            return await target(messages, **params)
        result = await trio.to_thread.run_sync(functools.partial(target, messages, **params))
        if inspect.isawaitable(result):
            return await result
        return result

    @staticmethod
    def _params(call: ChatCall) -> tuple[Any, JSONObject]:
        body = call.body
        params = {k: v for k, v in body.items() if k != "messages" and v is not None}
        params.pop("stream", None)
        params.pop("stream_options", None)
        return body.get("messages"), params

    async def chat(self, call: ChatCall) -> ChatResult:
        messages, params = self._params(call)
        try:
            with trio.fail_at(call.deadline):
                result = await self._call(messages, params)
        except trio.TooSlowError as exc:
            raise UpstreamError(
                f"The connection {self.name!r} did not answer in time.",
                status=504,
                connection=self.name,
            ) from exc
        except Exception as exc:
            raise _failure(self.name, exc) from exc
        return ChatResult(body=_completion(result, call.body.get("model", "")))

    async def open_chat_stream(self, call: ChatCall) -> ChatStream:
        messages, params = self._params(call)
        stream = CallableStream(self.name, call.body.get("model", ""))
        params["stream"] = True
        params["callback"] = stream.callback

        async def produce(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
            with trio.CancelScope(deadline=call.deadline) as scope:
                task_status.started(scope)
                try:
                    result = await self._call(messages, params)
                except Exception as exc:
                    await stream.fail(_failure(self.name, exc))
                    return
                await stream.finish(result)
            if scope.cancelled_caught and not stream.closed:
                await stream.fail(
                    UpstreamError(
                        f"The connection {self.name!r} did not finish in time.",
                        status=504,
                        connection=self.name,
                    )
                )

        stream.scope = await call.nursery.start(produce)
        return stream

    async def list_models(self) -> list[JSONObject] | None:
        return None

    async def aclose(self) -> None:
        pass


class CallableStream:
    """Text pieces pushed by a callable's callback, turned into OpenAI chunks.

    A bounded channel gives backpressure: the callable's ``await callback(text)`` waits while the
    client is slow. If the callable never used the callback, its return value is sent as one
    piece (lm-proxy streamed nothing in that case).
    """

    def __init__(self, name: str, model: str) -> None:
        self.name = name
        self.scope: trio.CancelScope | None = None
        self._send, self._receive = trio.open_memory_channel[JSONObject | GatewayError | None](16)
        self._base = {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }
        self._started = False
        self._pieces = 0
        self.closed = False
        # An end marker or error taken off the channel while batching, delivered next time.
        self._held: list[GatewayError | None] = []

    def _chunk(self, delta: JSONObject, finish: str | None = None) -> JSONObject:
        return {
            **self._base,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    async def callback(self, piece: Any) -> None:
        """Called by the user's callable with each piece of text."""
        text = piece if isinstance(piece, str) else str(piece)
        if not text:
            return
        if not self._started:
            self._started = True
            await self._send.send(self._chunk({"role": "assistant", "content": ""}))
        self._pieces += 1
        await self._send.send(self._chunk({"content": text}))

    async def finish(self, result: Any) -> None:
        if not self._pieces and result:
            await self.callback(_completion(result, "")["choices"][0]["message"]["content"] or "")
        if not self._started:
            self._started = True
            await self._send.send(self._chunk({"role": "assistant", "content": ""}))
        await self._send.send(self._chunk({}, "stop"))
        await self._send.send(None)

    async def fail(self, error: GatewayError) -> None:
        """Deliver ``error`` as the end of the stream (nothing if the consumer has gone)."""
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            await self._send.send(error)

    async def receive(self) -> list[JSONObject]:
        if self._held:
            held = self._held.pop()
            await trio.lowlevel.checkpoint()
            if held is None:
                return []
            raise held
        try:
            item = await self._receive.receive()
        except trio.EndOfChannel as exc:
            raise UpstreamError(
                f"The connection {self.name!r} ended the stream early.", connection=self.name
            ) from exc
        if item is None:
            return []
        if isinstance(item, GatewayError):
            raise item
        batch = [item]
        # Take whatever else is already waiting: fewer, larger writes to the client.
        while True:
            try:
                more = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if more is None or isinstance(more, GatewayError):
                self._held.append(more)
                break
            batch.append(more)
        return batch

    async def aclose(self) -> None:
        self.closed = True
        if self.scope is not None:
            self.scope.cancel()
        self._receive.close()
