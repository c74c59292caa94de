"""A fake OpenAI upstream: a real HTTP/1.1 server on loopback, written on trio + h11.

The gateway's tests point a provider at :attr:`FakeOpenAI.base_url` and then check two
things the real API cannot show them: what the gateway sent (:attr:`FakeOpenAI.requests`)
and how it treated the TCP connection (:meth:`FakeOpenAI.wait_closed`,
:attr:`FakeOpenAI.closed_by_client`).

Contracts:

* The server binds ``127.0.0.1`` on an ephemeral port, only. One trio task serves each
  connection; a connection carries any number of requests in sequence (keep-alive).
* JSON bodies are sent with ``Content-Length``; server-sent event streams with
  ``Transfer-Encoding: chunked``, one HTTP chunk per element of the event list.
* Every request is recorded, in arrival order, once its body is complete, and *before* its
  reply starts. Each request pops the next :class:`Reply` queued with :meth:`FakeOpenAI.push`,
  whatever its path; with the queue empty, the default behaviour (see
  :meth:`FakeOpenAI.default_reply`) answers.
* While a request is read, answered, stalled or streamed, a concurrent receive loop watches
  the socket, so a client's close (EOF or reset) is seen at once and ends the reply in
  progress. A close is *recorded* (``closed_by_client`` / ``closed_by_server`` and
  ``close_times``) only after that connection's task has unwound, so when
  :meth:`FakeOpenAI.wait_closed` returns the reply it interrupted is no longer counted in
  :attr:`FakeOpenAI.active_replies`. (A reply that completes normally is still counted for
  a moment after its last byte reached the client: use :meth:`FakeOpenAI.wait_idle`.)
* An EOF while a request is being read still lets a request that arrived complete be
  recorded (its reply is skipped); so a half-close counts as the client leaving.
* A connection is "closed by the client" when the server saw EOF or a reset from the peer.
  Every other end (a scripted cut, ``Connection: close``, a protocol error, shutdown of the
  fake) is "closed by the server". Finishing a response closes nothing.
* Nothing a client does crashes the server: peer resets are recorded as closes, protocol
  errors get a 400 and a close, and any unexpected exception in a connection task is logged,
  appended to :attr:`FakeOpenAI.errors` and ends only that connection.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import enum
import hashlib
import http
import json as stdlib_json
import logging
import re
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any, Final, TypeVar

import attrs
import h11
import orjson
import trio

__all__ = [
    "CHUNK_DELAY_HEADER",
    "CREATED",
    "DEFAULT_MODELS",
    "SSE_DONE",
    "ConnectionClosedByServer",
    "FakeOpenAI",
    "RecordedRequest",
    "Reply",
    "ReplyKind",
    "open_fake_openai",
    "openai_error",
    "sse_event",
]

logger = logging.getLogger(__name__)

HOST: Final = "127.0.0.1"
DEFAULT_MODELS: Final[tuple[str, ...]] = ("gpt-4o", "gpt-4o-mini", "o3")
#: The ``created`` timestamp of every object the fake makes up (fixed, so tests can compare).
CREATED: Final = 1_700_000_000
SYSTEM_FINGERPRINT: Final = "fp_fake"
TOOL_CALL_ID: Final = "call_fake_1"
#: The final event of an OpenAI stream.
SSE_DONE: Final = b"data: [DONE]\n\n"
#: Request header that paces the *default* stream: seconds to sleep between chunks.
CHUNK_DELAY_HEADER: Final = "x-fake-chunk-delay"

_RECEIVE_SIZE: Final = 65536
# Framing is the fake's job; scripted headers with these names are dropped.
_FRAMING_HEADERS: Final = frozenset({"content-length", "transfer-encoding", "connection"})


def sse_event(obj: Any) -> bytes:
    """Return one SSE event carrying ``obj`` as JSON: ``b"data: " + json + b"\\n\\n"``."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def openai_error(
    message: str,
    type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
) -> dict[str, Any]:
    """Return an OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ConnectionClosedByServer(RuntimeError):
    """:meth:`FakeOpenAI.wait_closed` was asked about a connection the *server* closed."""


class ReplyKind(enum.Enum):
    """What a scripted :class:`Reply` does; see the constructors on :class:`Reply`."""

    DEFAULT = "default"
    BODY = "body"
    SSE = "sse"
    STALL = "stall"
    STREAM_THEN_STALL = "stream_then_stall"
    STREAM_THEN_CUT = "stream_then_cut"
    CLOSE_WITHOUT_RESPONSE = "close_without_response"


def _header_pairs(headers: dict[str, str] | None) -> tuple[tuple[str, str], ...]:
    return tuple((name.lower(), value) for name, value in (headers or {}).items())


@attrs.frozen
class Reply:
    """One scripted behaviour of the fake for one request. Build it with the class methods.

    Scripted ``headers`` are added to the response; they replace the default
    ``content-type`` if they name one, and framing headers (``content-length``,
    ``transfer-encoding``, ``connection``) among them are ignored: the fake frames bodies itself.
    """

    kind: ReplyKind
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    content_type: str = "application/json"
    events: tuple[bytes, ...] = ()
    delay: float = 0.0

    @classmethod
    def default(cls) -> Reply:
        """Answer as if the queue were empty (lets a script put a normal reply between others)."""
        return cls(ReplyKind.DEFAULT)

    @classmethod
    def json(
        cls,
        body: Any,
        status: int = 200,
        headers: dict[str, str] | None = None,
        delay: float = 0.0,
    ) -> Reply:
        """Answer ``status`` with ``body`` serialised as JSON, after sleeping ``delay`` seconds."""
        return cls(
            ReplyKind.BODY,
            status=status,
            headers=_header_pairs(headers),
            body=orjson.dumps(body),
            delay=delay,
        )

    @classmethod
    def raw(
        cls,
        body: bytes,
        status: int = 200,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
        delay: float = 0.0,
    ) -> Reply:
        """Answer ``status`` with exactly ``body`` (e.g. malformed JSON), after ``delay`` s."""
        return cls(
            ReplyKind.BODY,
            status=status,
            headers=_header_pairs(headers),
            body=body,
            content_type=content_type,
            delay=delay,
        )

    @classmethod
    def sse(
        cls,
        events: list[bytes],
        delay: float = 0.0,
        status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        """Answer a chunked ``text/event-stream``: each element of ``events`` is one chunk,
        written as is (the caller supplies the SSE framing, see :func:`sse_event` and
        :data:`SSE_DONE`), with ``delay`` seconds between chunks; then end the body properly.
        """
        return cls(
            ReplyKind.SSE,
            status=status,
            headers=_header_pairs(headers),
            content_type="text/event-stream",
            events=tuple(events),
            delay=delay,
        )

    @classmethod
    def stall(cls) -> Reply:
        """Read the request, then never answer; the reply ends only when the client closes."""
        return cls(ReplyKind.STALL)

    @classmethod
    def stream_then_stall(cls, events: list[bytes], delay: float = 0.0) -> Reply:
        """Send SSE headers and ``events`` (as :meth:`sse`), then hang until the client closes."""
        return cls(
            ReplyKind.STREAM_THEN_STALL,
            content_type="text/event-stream",
            events=tuple(events),
            delay=delay,
        )

    @classmethod
    def stream_then_cut(cls, events: list[bytes], delay: float = 0.0) -> Reply:
        """Send SSE headers and ``events`` (as :meth:`sse`), then close the TCP connection
        without the terminating chunk, so the client sees a truncated body."""
        return cls(
            ReplyKind.STREAM_THEN_CUT,
            content_type="text/event-stream",
            events=tuple(events),
            delay=delay,
        )

    @classmethod
    def close_without_response(cls) -> Reply:
        """Close the connection right after reading the request, sending nothing."""
        return cls(ReplyKind.CLOSE_WITHOUT_RESPONSE)


@attrs.frozen
class RecordedRequest:
    """One request as the fake received it.

    ``path`` includes the query string; ``headers`` has lower-cased names (for a repeated
    header the last value wins); ``received_at`` is ``trio.current_time()`` when the body
    was complete; ``connection_id`` names the TCP connection (1, 2, ... in accept order).
    """

    connection_id: int
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float

    @property
    def json(self) -> Any:
        """The body parsed as JSON (raises ``orjson.JSONDecodeError`` if it is not JSON)."""
        return orjson.loads(self.body)


class FakeOpenAI:
    """State and behaviour of one running fake; get one from :func:`open_fake_openai`.

    Attributes are plain data for tests to read; only :meth:`push` and the ``wait_*``
    methods are meant to be called. Everything runs in the test's trio run, so the
    attributes never change under a test between two of its checkpoints.
    """

    host: str
    port: int
    base_url: str
    #: Every request received, in order of completion of its body.
    requests: list[RecordedRequest]
    #: Model ids served by ``GET /v1/models``; may be changed while running.
    models: list[str]
    #: Connection ids whose peer closed (EOF) or reset the connection.
    closed_by_client: set[int]
    #: Connection ids the server closed (scripted cut, ``Connection: close``, error, shutdown).
    closed_by_server: set[int]
    #: Connection id -> ``trio.current_time()`` when the close was seen or made.
    close_times: dict[int, float]
    #: Connection ids currently open.
    open_connections: set[int]
    #: Replies started and not finished (including ones stalled waiting for the client).
    active_replies: int
    #: Unexpected exceptions raised in connection tasks (each ended only its connection).
    errors: list[Exception]

    def __init__(self, *, port: int, models: list[str] | None = None) -> None:
        self.host = HOST
        self.port = port
        self.base_url = f"http://{HOST}:{port}/v1"
        self.requests = []
        self.models = list(DEFAULT_MODELS) if models is None else list(models)
        self.closed_by_client = set()
        self.closed_by_server = set()
        self.close_times = {}
        self.open_connections = set()
        self.active_replies = 0
        self.errors = []
        self._replies: collections.deque[Reply] = collections.deque()
        self._changed = trio.Event()
        self._last_connection_id = 0
        self._last_completion_id = 0
        self._last_request_id = 0

    # -- scripting and waiting ------------------------------------------------------------

    def push(self, *replies: Reply) -> None:
        """Queue ``replies``; each following request pops one, in order."""
        self._replies.extend(replies)

    @property
    def pending_replies(self) -> int:
        """How many pushed replies no request has used yet."""
        return len(self._replies)

    async def wait_for_request(self, count: int = 1) -> RecordedRequest:
        """Wait until at least ``count`` requests have arrived; return ``requests[count - 1]``."""
        if count < 1:
            raise ValueError(f"count must be >= 1, not {count}")
        await self.wait_until(lambda: len(self.requests) >= count)
        return self.requests[count - 1]

    async def wait_closed(self, request: RecordedRequest) -> None:
        """Wait until the client closed (EOF or reset) the connection that carried ``request``.

        Returns only for a close by the client, never because a response finished. Raises
        :class:`ConnectionClosedByServer` if the server closed that connection instead (then
        the client's close can no longer be observed).
        """
        connection_id = request.connection_id

        def settled() -> bool:
            return connection_id in self.closed_by_client or connection_id in self.closed_by_server

        await self.wait_until(settled)
        if connection_id not in self.closed_by_client:
            raise ConnectionClosedByServer(
                f"connection {connection_id} was closed by the fake, not by the client"
            )

    async def wait_idle(self) -> None:
        """Wait until no reply is in progress (``active_replies == 0``)."""
        await self.wait_until(lambda: self.active_replies == 0)

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` is true; it is re-tested whenever the fake's state
        changes (connection opened or closed, request recorded, reply finished)."""
        # No checkpoint between testing the condition and taking the current event, so
        # no notification can slip in between.
        while not condition():
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- bookkeeping called by connections ------------------------------------------------

    def _new_connection_id(self) -> int:
        self._last_connection_id += 1
        return self._last_connection_id

    def _begin_reply(self, request: RecordedRequest) -> Reply:
        """Record ``request``, count its reply as active, and return the reply to run."""
        self.requests.append(request)
        self.active_replies += 1
        reply = self._replies.popleft() if self._replies else Reply.default()
        self._notify()
        return reply

    def _end_reply(self) -> None:
        self.active_replies -= 1
        self._notify()

    def _record_close(self, connection_id: int, *, client_closed_at: float | None) -> None:
        self.open_connections.discard(connection_id)
        if client_closed_at is not None:
            self.closed_by_client.add(connection_id)
            self.close_times[connection_id] = client_closed_at
        else:
            self.closed_by_server.add(connection_id)
            self.close_times[connection_id] = trio.current_time()
        self._notify()

    def _next_request_id(self) -> str:
        self._last_request_id += 1
        return f"req_fake_{self._last_request_id}"

    async def _handle_connection(self, stream: trio.SocketStream) -> None:
        connection_id = self._new_connection_id()
        self.open_connections.add(connection_id)
        self._notify()
        connection = _Connection(self, connection_id, stream)
        try:
            await connection.run()
        finally:
            try:
                # Closes the socket at once; its checkpoint raises Cancelled on shutdown.
                await trio.aclose_forcefully(stream)
            finally:
                self._record_close(connection_id, client_closed_at=connection.client_closed_at)

    # -- default behaviour ----------------------------------------------------------------

    def default_reply(self, request: RecordedRequest) -> Reply:
        """The reply used when no scripted reply is queued.

        ``GET /v1/models`` lists :attr:`models`; ``GET /v1/models/{id}`` returns one of them
        (404 ``model_not_found`` otherwise); ``POST /v1/chat/completions`` answers as
        described in :meth:`chat_completion_reply`; anything else is a 404 ``unknown_url``.
        """
        path = request.path.partition("?")[0]
        if request.method == "GET" and path == "/v1/models":
            return Reply.json({"object": "list", "data": [_model(m) for m in self.models]})
        if request.method == "GET" and path.startswith("/v1/models/"):
            model_id = path.removeprefix("/v1/models/")
            if model_id in self.models:
                return Reply.json(_model(model_id))
            return Reply.json(
                openai_error(
                    f"The model '{model_id}' does not exist",
                    param="model",
                    code="model_not_found",
                ),
                status=404,
            )
        if request.method == "POST" and path == "/v1/chat/completions":
            return self.chat_completion_reply(request)
        if request.method == "POST" and path == "/v1/embeddings":
            return embeddings_reply(request)
        if request.method == "POST" and path == "/v1/completions":
            return completions_reply(request)
        return Reply.json(
            openai_error(
                f"Unknown request URL: {request.method} {path}. Please check the URL for "
                "typos, or see the docs at https://platform.openai.com/docs/api-reference/.",
                code="unknown_url",
            ),
            status=404,
        )

    def chat_completion_reply(self, request: RecordedRequest) -> Reply:
        """Answer a chat completion request deterministically.

        The content of each of the ``n`` choices is ``"echo: "`` + the text of the last user
        message; with ``tools`` (and ``tool_choice`` not ``"none"``) each choice is instead
        one call (id ``call_fake_1``) to the first tool (or the one ``tool_choice`` names)
        with arguments ``{"q": <that text>}``. Tokens are whitespace-separated words. With
        ``"stream": true`` the same content is streamed in OpenAI's chunk format, paced by
        the ``x-fake-chunk-delay`` request header if present. Malformed requests get 400.
        """
        try:
            payload = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            return _bad_request(
                "We could not parse the JSON body of your request. (HINT: This likely means "
                "you aren't using your HTTP library correctly. The OpenAI API expects a JSON "
                "payload, but what was sent was not valid JSON.)"
            )
        if not isinstance(payload, dict):
            return _bad_request("The request body must be a JSON object.")
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            return _bad_request("you must provide a model parameter", param="model")
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            return _bad_request(
                "Missing required parameter: 'messages'.",
                param="messages",
                code="missing_required_parameter",
            )
        n = payload.get("n")
        if n is None:
            n = 1
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            return _bad_request(f"Invalid value for 'n': {n!r}.", param="n")
        chunk_delay = 0.0
        if CHUNK_DELAY_HEADER in request.headers:
            try:
                chunk_delay = float(request.headers[CHUNK_DELAY_HEADER])
            except ValueError:
                return _bad_request(f"Invalid {CHUNK_DELAY_HEADER} header.")

        self._last_completion_id += 1
        answer = _Answer(
            completion_id=f"chatcmpl-fake-{self._last_completion_id}",
            model=model,
            n=n,
            user_text=_last_user_text(messages),
            tool_name=_chosen_tool(payload),
            prompt_tokens=sum(
                _word_count(_text_of(m.get("content"))) for m in messages if isinstance(m, dict)
            ),
        )
        if payload.get("stream") is True:
            stream_options = payload.get("stream_options")
            include_usage = (
                isinstance(stream_options, dict) and stream_options.get("include_usage") is True
            )
            return Reply.sse(answer.stream_events(include_usage=include_usage), delay=chunk_delay)
        return Reply.json(answer.completion())


EMBEDDING_DIMENSIONS: Final = 8


def fake_embedding(item: Any, dimensions: int = EMBEDDING_DIMENSIONS) -> list[float]:
    """A deterministic vector for an input item (the same item, the same vector)."""
    seed = hashlib.sha256(stdlib_json.dumps(item).encode()).digest()
    return [round((byte - 128) / 128, 6) for byte in seed[:dimensions]]


def embeddings_reply(request: RecordedRequest) -> Reply:
    """``POST /v1/embeddings`` as OpenAI answers it: one vector per input item, float or
    base64 (little-endian float32, what ``encoding_format = "base64"`` returns), and usage
    (tokens: whitespace-separated words, or the token ids given)."""
    payload = orjson.loads(request.body)
    model = payload.get("model")
    raw = payload.get("input")
    if not isinstance(model, str) or raw is None:
        return _bad_request("you must provide a model and an input", param="input")
    items = [raw] if isinstance(raw, str) or (
        isinstance(raw, list) and raw and all(isinstance(t, int) for t in raw)
    ) else raw  # fmt: skip
    dimensions = payload.get("dimensions") or EMBEDDING_DIMENSIONS
    data = []
    tokens = 0
    for index, item in enumerate(items):
        vector = fake_embedding(item, dimensions)
        tokens += len(item) if isinstance(item, list) else max(1, _word_count(str(item)))
        embedding: Any = vector
        if payload.get("encoding_format") == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return Reply.json(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


def completions_reply(request: RecordedRequest) -> Reply:
    """Legacy ``POST /v1/completions``: the text is ``" echo: "`` + the prompt, streamed word
    by word as ``text_completion`` chunks when asked (with the usage chunk on request)."""
    payload = orjson.loads(request.body)
    prompt = payload.get("prompt")
    model = payload.get("model")
    if not isinstance(model, str) or not isinstance(prompt, str):
        return _bad_request("you must provide a model and a string prompt", param="prompt")
    text = " echo: " + prompt
    usage = {
        "prompt_tokens": _word_count(prompt),
        "completion_tokens": _word_count(text),
        "total_tokens": _word_count(prompt) + _word_count(text),
    }
    base = {"id": "cmpl-fake-1", "object": "text_completion", "created": CREATED, "model": model}
    if payload.get("stream") is True:
        events = [
            sse_event({**base, "choices": [
                {"text": piece, "index": 0, "logprobs": None, "finish_reason": None}]})
            for piece in _words(text)
        ]  # fmt: skip
        events.append(sse_event({**base, "choices": [
            {"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}]}))  # fmt: skip
        options = payload.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            events.append(sse_event({**base, "choices": [], "usage": usage}))
        events.append(SSE_DONE)
        return Reply.sse(events)
    return Reply.json(
        {
            **base,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}],
            "usage": usage,
        }
    )


def _model(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": CREATED, "owned_by": "fake"}


def _bad_request(message: str, param: str | None = None, code: str | None = None) -> Reply:
    return Reply.json(openai_error(message, param=param, code=code), status=400)


def _text_of(content: Any) -> str:
    """The text of a message's ``content``: a string, or its text parts concatenated."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        )
    return ""


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _text_of(message.get("content"))
    return ""


def _chosen_tool(payload: dict[str, Any]) -> str | None:
    """The name of the tool to call, or None to answer with text."""
    tools = payload.get("tools")
    tool_choice = payload.get("tool_choice")
    if not isinstance(tools, list) or not tools or tool_choice == "none":
        return None
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return str(function["name"])
    first = tools[0]
    function = first.get("function") if isinstance(first, dict) else None
    if isinstance(function, dict) and isinstance(function.get("name"), str):
        return str(function["name"])
    return "tool"


def _word_count(text: str) -> int:
    return len(text.split())


# Split points: after whitespace, before the next word. The pieces concatenate to the text.
_WORD_BOUNDARY: Final = re.compile(r"(?<=\s)(?=\S)")


def _words(text: str) -> list[str]:
    return [piece for piece in _WORD_BOUNDARY.split(text) if piece]


def _fragments(text: str, count: int = 3) -> list[str]:
    size = max(1, -(-len(text) // count))
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


@attrs.frozen
class _Answer:
    """The deterministic answer to one chat completion request, in both wire shapes."""

    completion_id: str
    model: str
    n: int
    user_text: str
    tool_name: str | None
    prompt_tokens: int

    @property
    def content(self) -> str:
        return "echo: " + self.user_text

    @property
    def arguments(self) -> str:
        return stdlib_json.dumps({"q": self.user_text})

    def _usage(self) -> dict[str, Any]:
        per_choice = _word_count(self.arguments if self.tool_name else self.content)
        completion_tokens = per_choice * self.n
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }

    def _tool_call(self) -> dict[str, Any]:
        return {
            "id": TOOL_CALL_ID,
            "type": "function",
            "function": {"name": self.tool_name, "arguments": self.arguments},
        }

    def completion(self) -> dict[str, Any]:
        """The ``chat.completion`` object."""
        if self.tool_name is None:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": self.content,
                "refusal": None,
            }
            finish_reason = "stop"
        else:
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [self._tool_call()],
                "refusal": None,
            }
            finish_reason = "tool_calls"
        return {
            "id": self.completion_id,
            "object": "chat.completion",
            "created": CREATED,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [
                {
                    "index": index,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
                for index in range(self.n)
            ],
            "usage": self._usage(),
        }

    def _deltas(self) -> list[tuple[dict[str, Any], str | None]]:
        """(delta, finish_reason) for one choice, in order."""
        if self.tool_name is None:
            return [
                ({"role": "assistant", "content": ""}, None),
                *(({"content": word}, None) for word in _words(self.content)),
                ({}, "stop"),
            ]
        first_call = {
            "index": 0,
            "id": TOOL_CALL_ID,
            "type": "function",
            "function": {"name": self.tool_name, "arguments": ""},
        }
        return [
            ({"role": "assistant", "content": None, "tool_calls": [first_call]}, None),
            *(
                ({"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}, None)
                for fragment in _fragments(self.arguments)
            ),
            ({}, "tool_calls"),
        ]

    def _chunk(self, choices: list[dict[str, Any]], include_usage: bool) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        }
        if include_usage:
            chunk["usage"] = None
        return chunk

    def stream_events(self, *, include_usage: bool) -> list[bytes]:
        """The SSE events of the streamed answer, ``data: [DONE]`` included.

        One choice per chunk; with ``n > 1`` the choices' chunks are interleaved step by step.
        """
        events = [
            sse_event(
                self._chunk(
                    [
                        {
                            "index": index,
                            "delta": delta,
                            "logprobs": None,
                            "finish_reason": finish_reason,
                        }
                    ],
                    include_usage,
                )
            )
            for delta, finish_reason in self._deltas()
            for index in range(self.n)
        ]
        if include_usage:
            final = self._chunk([], include_usage=False)
            final["usage"] = self._usage()
            events.append(sse_event(final))
        events.append(SSE_DONE)
        return events


class _ClientGone(Exception):
    """Internal: the client closed the connection while a request was being read."""


class _Connection:
    """One accepted TCP connection: an h11 request/response loop plus a receive loop.

    The receive loop is the only reader of the socket: it feeds h11 and wakes the request
    loop. On EOF or reset it notes the time; then, if a reply is in progress, it cancels the
    whole connection at once. If the request loop is instead reading, it is woken to finish
    with what was already received: a request that arrived complete just before the EOF is
    still recorded (its reply is skipped), a partial one is dropped. A half-close (shutdown
    of the client's write side) therefore counts as the client leaving. The request loop is
    the only writer.
    """

    def __init__(self, server: FakeOpenAI, connection_id: int, stream: trio.SocketStream):
        self.server = server
        self.connection_id = connection_id
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER)
        #: When the client's EOF or reset was seen, if it was.
        self.client_closed_at: float | None = None
        self._data_arrived = trio.Event()
        self._reading = False
        self._cancel_scope = trio.CancelScope()

    async def run(self) -> None:
        """Serve requests until either side closes; never raises (except Cancelled)."""
        with self._cancel_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive_loop)
                try:
                    await self._serve_requests()
                except trio.BrokenResourceError:
                    # A write met a reset: the client is gone.
                    self._client_gone()
                except _ClientGone:
                    pass
                except Exception as exc:
                    logger.exception("fake upstream: connection %d failed", self.connection_id)
                    self.server.errors.append(exc)
                nursery.cancel_scope.cancel()

    def _client_gone(self) -> None:
        if self.client_closed_at is None:
            self.client_closed_at = trio.current_time()
        if self._reading:
            self._wake_request_loop()
        else:
            self._cancel_scope.cancel()

    def _wake_request_loop(self) -> None:
        self._data_arrived.set()
        self._data_arrived = trio.Event()

    async def _receive_loop(self) -> None:
        while True:
            try:
                data = await self.stream.receive_some(_RECEIVE_SIZE)
            except trio.BrokenResourceError:
                self._client_gone()
                return
            except trio.ClosedResourceError:
                return
            if not data:
                self._client_gone()
                return
            self.h11.receive_data(data)
            self._wake_request_loop()

    async def _next_event(self) -> h11.Event:
        """The next h11 event of the request being read; raise _ClientGone if none will come."""
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                if self.client_closed_at is not None:
                    raise _ClientGone
                self._reading = True
                try:
                    await self._data_arrived.wait()
                finally:
                    self._reading = False
            elif event is h11.PAUSED:
                raise RuntimeError("h11 paused while reading a request")
            else:
                assert isinstance(event, h11.Event)
                return event

    async def _send(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data:
            await self.stream.send_all(data)

    async def _serve_requests(self) -> None:
        while True:
            request = await self._read_request()
            if request is None:
                return
            reply = self.server._begin_reply(request)
            try:
                if self.client_closed_at is not None:
                    return  # the client left before its reply could start
                keep_open = await self._run_reply(request, reply)
            finally:
                self.server._end_reply()
            if not keep_open:
                return
            if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
                self.h11.start_next_cycle()
            else:
                return  # e.g. the client sent "Connection: close"

    async def _read_request(self) -> RecordedRequest | None:
        """Read one whole request; None if the connection must close (after a 400)."""
        try:
            event, body = await self._read_request_events()
        except h11.RemoteProtocolError as exc:
            await self._send_protocol_error(exc)
            return None
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in event.headers}
        return RecordedRequest(
            connection_id=self.connection_id,
            method=event.method.decode("ascii"),
            path=event.target.decode("latin-1"),
            headers=headers,
            body=body,
            received_at=trio.current_time(),
        )

    async def _read_request_events(self) -> tuple[h11.Request, bytes]:
        """Read a request head and its body; raise h11.RemoteProtocolError if malformed."""
        event = await self._next_event()
        if not isinstance(event, h11.Request):
            raise h11.RemoteProtocolError(f"expected a request, got {event!r}")
        body = bytearray()
        while True:
            part = await self._next_event()
            if isinstance(part, h11.EndOfMessage):
                return event, bytes(body)
            if not isinstance(part, h11.Data):
                raise h11.RemoteProtocolError(f"unexpected {part!r} in a request body")
            body += part.data

    async def _send_protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        if self.h11.our_state not in {h11.IDLE, h11.SEND_RESPONSE}:
            return
        body = orjson.dumps(openai_error(f"Malformed HTTP request: {exc}"))
        await self._send(
            h11.Response(
                status_code=exc.error_status_hint,
                headers=[
                    ("content-type", "application/json"),
                    ("content-length", str(len(body))),
                    ("connection", "close"),
                ],
            )
        )
        await self._send(h11.Data(data=body))
        await self._send(h11.EndOfMessage())

    async def _send_head(self, reply: Reply, *, chunked: bool, length: int = 0) -> None:
        headers: list[tuple[str, str]] = []
        scripted = [(n, v) for n, v in reply.headers if n not in _FRAMING_HEADERS]
        if not any(name == "content-type" for name, _ in scripted):
            headers.append(("content-type", reply.content_type))
        if chunked:
            headers += [("cache-control", "no-cache"), ("transfer-encoding", "chunked")]
        else:
            headers.append(("content-length", str(length)))
        if not any(name == "x-request-id" for name, _ in scripted):
            headers.append(("x-request-id", self.server._next_request_id()))
        headers += scripted
        try:
            reason = http.HTTPStatus(reply.status).phrase.encode("ascii")
        except ValueError:
            reason = b""
        await self._send(h11.Response(status_code=reply.status, headers=headers, reason=reason))

    async def _run_reply(self, request: RecordedRequest, reply: Reply) -> bool:
        """Carry out ``reply``; return whether the connection may serve another request."""
        if reply.kind is ReplyKind.DEFAULT:
            reply = self.server.default_reply(request)
        if reply.kind is ReplyKind.STALL:
            await trio.sleep_forever()
        if reply.kind is ReplyKind.CLOSE_WITHOUT_RESPONSE:
            return False
        if reply.kind is ReplyKind.BODY:
            if reply.delay > 0:
                await trio.sleep(reply.delay)
            await self._send_head(reply, chunked=False, length=len(reply.body))
            if reply.body and request.method != "HEAD":
                await self._send(h11.Data(data=reply.body))
            await self._send(h11.EndOfMessage())
            return True
        if reply.kind is ReplyKind.DEFAULT:
            raise AssertionError("default_reply returned a DEFAULT reply")
        # SSE, STREAM_THEN_STALL, STREAM_THEN_CUT
        await self._send_head(reply, chunked=True)
        for index, event in enumerate(reply.events):
            if index and reply.delay > 0:
                await trio.sleep(reply.delay)
            await self._send(h11.Data(data=event))
        if reply.kind is ReplyKind.STREAM_THEN_STALL:
            await trio.sleep_forever()
        if reply.kind is ReplyKind.STREAM_THEN_CUT:
            return False
        await self._send(h11.EndOfMessage())
        return True


@contextlib.asynccontextmanager
async def open_fake_openai(*, models: list[str] | None = None) -> AsyncIterator[FakeOpenAI]:
    """Run a fake OpenAI upstream on ``127.0.0.1`` (ephemeral port) for the ``async with``.

    The server runs in a nursery this context manager owns. On exit the nursery is
    cancelled: the listener stops and every connection, stalled or not, is closed (those
    count as closed by the server), before the ``async with`` statement completes.
    """
    async with serve_fake(lambda port: FakeOpenAI(port=port, models=models)) as fake:
        yield fake


_F = TypeVar("_F", bound="FakeOpenAI")


@contextlib.asynccontextmanager
async def serve_fake(factory: Callable[[int], _F]) -> AsyncIterator[_F]:
    """Run any fake built on :class:`FakeOpenAI`'s server (a subclass speaking another
    provider's wire format overrides :meth:`FakeOpenAI.default_reply`); ``factory`` gets the
    port and returns the fake."""
    listeners = await trio.open_tcp_listeners(0, host=HOST)
    port = int(listeners[0].socket.getsockname()[1])
    fake = factory(port)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, fake._handle_connection, listeners)
        try:
            yield fake
        finally:
            nursery.cancel_scope.cancel()
