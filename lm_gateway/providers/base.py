"""The seam every connection plugs into.

A *connection* serves OpenAI chat completions, whatever it talks to behind. The service layer
calls it with a :class:`ChatCall` and gets back either a whole :class:`ChatResult` or an open
:class:`ChatStream` of chunk objects (OpenAI ``chat.completion.chunk`` dicts). Connections
translate their own failures into :mod:`lm_gateway.errors` upstream errors at this boundary, so
nothing above them sees httpx or SDK exceptions.

Resource handling: ``open_chat_stream`` returns only once the upstream has accepted the request
(so an HTTP error status can still be answered as such); from then on the caller owns the stream
and must ``aclose()`` it, which closes the upstream connection if the stream did not finish.

Cancellation: every method may be cancelled at any checkpoint; a cancelled call leaves no
upstream connection open and no task running.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import attrs
import trio

from ..errors import GatewayError, InternalError

JSONObject = dict[str, Any]


@attrs.define
class Attempt:
    """One try of one upstream call, as logs and headers report it.

    ``outcome``: ``ok``; ``error`` (``error`` says which); ``cancelled`` (a hedged attempt that
    lost the race, or the client left); ``skipped`` (the connection was cooling down).
    """

    connection: str
    model: str | None
    outcome: str = "ok"
    error: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "connection": self.connection,
            "model": self.model,
            "outcome": self.outcome,
            "error": self.error,
            "seconds": round(self.seconds, 6),
        }


@attrs.define
class ChatCall:
    """One upstream chat call, prepared by the service layer.

    Attributes:
        body: the request body to send, already routed (``model`` is the upstream model name).
            The connection may modify it; the service will not look at it again.
        client_model: the model name the client asked for.
        stream: whether the client asked for a stream.
        deadline: ``trio.current_time()`` value by which the whole call must finish.
        request_id: the gateway's id for the request (for upstream logs and tracing headers).
        nursery: a nursery owned by the client's request, for connections that need a task
            (a callable fed through a callback); it is cancelled when the request ends.
        headers: extra headers for the upstream request.
        usage_requested_by_gateway: set by a connection that asked its upstream for usage the
            client did not ask for (``stream_options.include_usage``), so the relay strips the
            usage chunk again instead of handing the client something it did not request.
        connections: every connection of the gateway, by name: a connection made of other
            connections (a load balancer, a fallback chain) delegates through these.
        client_headers: the client's request headers (lower-case names), for connections that
            pass some on (``anthropic-beta``); never sent upstream wholesale.
        attempts: every upstream try made for this call, appended by the gateway's guard around
            each connection (shared by the sub-calls a strategy makes).
    """

    body: JSONObject
    client_model: str
    stream: bool
    deadline: float
    request_id: str
    nursery: trio.Nursery
    headers: dict[str, str] = attrs.field(factory=dict)
    usage_requested_by_gateway: bool = False
    connections: Mapping[str, Connection] = attrs.field(factory=dict, repr=False)
    client_headers: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    attempts: list[Attempt] = attrs.field(factory=list)


@attrs.define
class ChatResult:
    """A complete answer: the ``chat.completion`` object and headers worth relaying."""

    body: JSONObject
    headers: dict[str, str] = attrs.field(factory=dict)


@runtime_checkable
class ChatStream(Protocol):
    """An open stream of chunks from an upstream."""

    async def receive(self) -> list[JSONObject]:
        """The next chunks, in order; an empty list means the stream ended normally.

        Raises:
            UpstreamError: the upstream failed or sent something malformed; the stream is over.
        """
        ...

    async def aclose(self) -> None:
        """Release the upstream connection (idempotent; safe in a cancelled scope)."""
        ...


@runtime_checkable
class Connection(Protocol):
    """What the gateway needs from a connection. Users may implement it directly.

    A connection that can only produce one choice per call sets ``native_n = False``; the
    gateway then serves ``n > 1`` by running n calls concurrently
    (:mod:`lm_gateway.providers.fanout`).
    """

    name: str

    async def chat(self, call: ChatCall) -> ChatResult:
        """A whole (non-streaming) answer.

        Raises:
            UpstreamError: the upstream refused or failed.
            NotSupported: the connection cannot serve this request.
        """
        ...

    async def open_chat_stream(self, call: ChatCall) -> ChatStream:
        """Start a stream; returns once the upstream accepted it. The caller must aclose() it.

        Raises:
            UpstreamError: the upstream refused or failed before streaming.
        """
        ...

    async def list_models(self) -> list[JSONObject] | None:
        """The upstream's model objects (``{"id": ...}``), or None if it cannot list them."""
        ...

    async def aclose(self) -> None:
        """Release pooled connections; called once when the gateway shuts down."""
        ...


async def close_quietly(stream: ChatStream, *, grace_seconds: float = 2.0) -> None:
    """Close ``stream`` even inside a cancelled scope, waiting at most ``grace_seconds``.

    Shielded so a close that needs a checkpoint (TLS close_notify, returning a connection to the
    pool) completes; bounded so a stuck peer cannot hold the request open.
    """
    with trio.CancelScope(shield=True), trio.move_on_after(grace_seconds):
        await stream.aclose()


def raise_from_group(group: BaseExceptionGroup[Any]) -> None:
    """Turn what a fan-out nursery raised into one gateway error (cancellation passes through).

    Raises:
        BaseExceptionGroup: unchanged, if it holds a cancellation from outside.
        GatewayError: the first gateway error among the failures.
        InternalError: a failure that is not a gateway error.
    """
    if group.subgroup(trio.Cancelled) is not None:
        raise group
    errors = group.subgroup(GatewayError)
    if errors is not None:
        leaf: BaseException = errors
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        raise leaf from group
    raise InternalError(
        "The gateway failed while running concurrent calls.", detail=repr(group.exceptions[0])
    ) from group
