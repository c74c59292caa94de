"""HTTP/1.1, client side, sans-io: request heads out, response heads and bodies in (RFC 9112).

:func:`encode_request` writes a request (head and body, one ``bytes``, so one write);
:class:`ResponseReader` takes the bytes a connection received and gives back the response head
and the body's decoded bytes (``Content-Length``, ``chunked``, or read-until-close framing),
and says whether the connection may carry another request. No I/O happens here; the pooled
client in :mod:`lm_gateway.providers.http1` does it.

Why not h11: it is correct and general, but on a gateway's hot path it cost more per request
than everything else in the upstream call (``doc/benchmarks.md``); a client that only ever
sends ``Content-Length`` requests and reads responses needs a small part of it.

Limits: a response head over :data:`MAX_HEAD_BYTES` is refused. Interim ``1xx`` responses
(``100 Continue``, ``103 Early Hints``) are skipped. ``101 Switching Protocols`` is an error:
the gateway never asks for an upgrade.
"""

from __future__ import annotations

from typing import NoReturn

import attrs

#: The largest response head (status line and headers) accepted.
MAX_HEAD_BYTES = 64 * 1024
#: The longest chunk-size line (size, extensions) accepted in a chunked body.
MAX_CHUNK_LINE_BYTES = 4096


class HTTPProtocolError(Exception):
    """The peer broke HTTP/1.1 framing (malformed head, bad chunk, body cut short)."""


@attrs.frozen
class ResponseHead:
    """A response's status line and headers; header names are lower-case, order kept."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    http_version: str

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of header ``name`` (lower-case), or ``default``."""
        for key, value in self.headers:
            if key == name:
                return value
        return default

    def items(self) -> tuple[tuple[str, str], ...]:
        return self.headers


def encode_request(
    method: str, target: str, headers: list[tuple[str, str]], body: bytes | None
) -> bytes:
    """One request, head and body. ``headers`` must not hold ``Content-Length`` or
    ``Transfer-Encoding`` (the body's length is set here); ``Host`` must be among them.

    Raises:
        ValueError: a header name or value holds CR, LF or NUL (request smuggling).
    """
    lines = [f"{method} {target} HTTP/1.1"]
    for name, value in headers:
        if "\r" in value or "\n" in value or "\0" in value or "\r" in name or "\n" in name:
            raise ValueError(f"header {name!r} holds a line break or NUL")
        lines.append(f"{name}: {value}")
    if body is not None or method in ("POST", "PUT", "PATCH"):
        lines.append(f"content-length: {len(body) if body else 0}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + body if body else head


_HEX_DIGITS = b"0123456789abcdefABCDEF"


def _chunk_size(digits: bytes) -> int | None:
    """A chunk size line's value (extensions already removed); None unless it is 1 to 16
    hex digits (``int()`` alone would also take signs, ``0x``, ``_`` and spaces)."""
    if not digits or len(digits) > 16 or digits.strip(_HEX_DIGITS):
        return None
    return int(digits, 16)


# Body framing states.
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


class _BodyDecoder:
    """What both readers share: a receive buffer, and decoding a body framed by
    ``Content-Length`` (state ``_LENGTH``) or ``chunked`` (``_CHUNK_*``, ``_TRAILERS``) from it.
    Bytes after the body stay in the buffer."""

    def __init__(self, *, max_trailer_bytes: int) -> None:
        self._buffer = bytearray()
        self._state = _HEAD
        self._remaining = 0
        self._max_trailer = max_trailer_bytes

    def _fail(self, message: str, status: int = 400) -> NoReturn:
        """Raise this reader's error for broken framing (``status``: what a server answers)."""
        raise HTTPProtocolError(message)

    def _end_body(self) -> None:
        self._state = _DONE

    def _decode_body(self, out: list[bytes]) -> None:
        """Move decoded body bytes from the buffer to ``out`` until the buffer runs dry or the
        body ends (then :meth:`_end_body` is called)."""
        buffer = self._buffer
        while buffer:
            state = self._state
            if state in (_LENGTH, _CHUNK_DATA):
                take = min(self._remaining, len(buffer))
                out.append(bytes(buffer[:take]))
                del buffer[:take]
                self._remaining -= take
                if not self._remaining:
                    if state == _LENGTH:
                        self._end_body()
                        return
                    self._state = _CHUNK_CRLF
            elif state == _CHUNK_SIZE:
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > MAX_CHUNK_LINE_BYTES:
                        self._fail("chunk-size line too long")
                    return
                line = bytes(buffer[:end]).split(b";", 1)[0].strip()
                del buffer[: end + 2]
                size = _chunk_size(line)
                if size is None:
                    self._fail(f"malformed chunk size {line[:40]!r}")
                self._remaining = size
                self._state = _CHUNK_DATA if self._remaining else _TRAILERS
            elif state == _CHUNK_CRLF:
                if len(buffer) < 2:
                    return
                if buffer[:2] != b"\r\n":
                    self._fail("chunk data not followed by CRLF")
                del buffer[:2]
                self._state = _CHUNK_SIZE
            elif state == _TRAILERS:
                # Trailer fields are read and dropped; the empty line ends the message.
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > self._max_trailer:
                        self._fail("trailer section too large", 431)
                    return
                empty = end == 0
                del buffer[: end + 2]
                if empty:
                    self._end_body()
                    return
            else:
                return


class ResponseReader(_BodyDecoder):
    """Parses one response on a connection. Feed it bytes as they arrive.

    After :meth:`feed` returns, :attr:`head` is set once the head is complete, and
    :attr:`done` once the body is. :attr:`reusable` says whether the connection may carry
    another request afterwards (the body ended by its framing, no ``Connection: close``, no
    bytes beyond this response).

    Args:
        method: the request's method (a ``HEAD`` response has no body).
    """

    def __init__(self, method: str = "POST") -> None:
        super().__init__(max_trailer_bytes=MAX_HEAD_BYTES)
        self._method = method
        self._keep_alive = True
        self.head: ResponseHead | None = None
        self.done = False
        #: Bytes that came after the end of this response (a protocol violation for a client
        #: that sends one request at a time; the connection is then not reused).
        self._extra = False

    @property
    def reusable(self) -> bool:
        return self.done and self._keep_alive and not self._extra

    def feed(self, data: bytes) -> bytes:
        """Take received bytes; return the body bytes (decoded from framing) they completed.

        Raises:
            HTTPProtocolError: the bytes break HTTP/1.1 framing.
        """
        if self._state == _DONE:
            if data:
                self._extra = True
            return b""
        if self._state == _UNTIL_CLOSE:
            return data
        if self._state == _LENGTH and not self._buffer:
            # The common case on a hot path: plain bytes of a sized body, nothing buffered.
            return self._take_sized(data)
        out: list[bytes] = []
        if self._state == _CHUNK_SIZE and not self._buffer:
            # The other one: a relayed stream, each read holding whole chunks.
            data = self._take_whole_chunks(data, out)
            if not data:
                return b"".join(out) if len(out) != 1 else out[0]
        self._buffer += data
        while self._state == _HEAD and self._parse_head():
            pass  # (a loop: interim 1xx heads come before the real one)
        if self._state != _HEAD:
            self._decode_body(out)
        if self._state == _UNTIL_CLOSE:
            out.append(bytes(self._buffer))
            self._buffer.clear()
        elif self._state == _DONE and self._buffer:
            self._extra = True
            self._buffer.clear()
        return b"".join(out) if len(out) != 1 else out[0]

    def feed_eof(self) -> None:
        """The peer closed the connection.

        Raises:
            HTTPProtocolError: the response was not complete (head or body cut short).
        """
        if self._state == _UNTIL_CLOSE:
            self._state = _DONE
            self.done = True
            self._keep_alive = False
            return
        if self._state != _DONE:
            where = "before the response head" if self.head is None else "mid-body"
            raise HTTPProtocolError(f"the server closed the connection {where}")

    # -- internals ---------------------------------------------------------------------------

    @staticmethod
    def _take_whole_chunks(data: bytes, out: list[bytes]) -> bytes:
        """Append the data of the whole chunks at the start of ``data`` to ``out``; return
        the rest, from the first chunk this does not take: one not whole in ``data``, the
        last (zero-size) chunk, or a size line with anything but hex digits (extensions,
        spaces, junk). The general decoder reads that rest, so the framing rules stay in one
        place; this only skips its buffer copies for the usual input."""
        pos = 0
        while True:
            end = data.find(b"\r\n", pos)
            size = _chunk_size(data[pos:end]) if end >= 0 else None
            if not size:  # not a plain size line, or the last chunk
                break
            start = end + 2
            stop = start + size
            if data[stop : stop + 2] != b"\r\n":
                break
            out.append(data[start:stop])
            pos = stop + 2
        return data[pos:] if pos else data

    def _take_sized(self, data: bytes) -> bytes:
        if len(data) < self._remaining:
            self._remaining -= len(data)
            return data
        body = data[: self._remaining]
        if len(data) > self._remaining:
            self._extra = True
        self._remaining = 0
        self._end_body()
        return body

    def _end_body(self) -> None:
        self._state = _DONE
        self.done = True

    def _parse_head(self) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD_BYTES:
                raise HTTPProtocolError(f"response head larger than {MAX_HEAD_BYTES} bytes")
            return False
        raw = bytes(self._buffer[:end])
        del self._buffer[: end + 4]
        lines = raw.decode("latin-1").split("\r\n")
        status_line = lines[0]
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise HTTPProtocolError(f"malformed status line {status_line[:100]!r}")
        try:
            status = int(parts[1])
        except ValueError:
            raise HTTPProtocolError(f"malformed status line {status_line[:100]!r}") from None
        if not 100 <= status <= 999 or len(parts[1]) != 3:
            raise HTTPProtocolError(f"malformed status code in {status_line[:100]!r}")
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise HTTPProtocolError(f"malformed header line {line[:100]!r}")
            headers.append((name.lower(), value.strip(" \t")))
        if 100 <= status < 200:
            if status == 101:
                raise HTTPProtocolError("unexpected 101 Switching Protocols")
            return True  # an interim response: the real one follows
        version = parts[0]
        head = ResponseHead(status, parts[2] if len(parts) > 2 else "", tuple(headers), version)
        self.head = head
        connection = ",".join(v for k, v in headers if k == "connection").lower()
        if version == "HTTP/1.0":
            self._keep_alive = "keep-alive" in connection
        elif "close" in connection:
            self._keep_alive = False
        self._choose_framing(head, status)
        return True

    def _choose_framing(self, head: ResponseHead, status: int) -> None:
        # RFC 9112 section 6.3, in order.
        if self._method == "HEAD" or status in (204, 304):
            self._end_body()
            return
        codings = [v for k, v in head.headers if k == "transfer-encoding"]
        if codings:
            last = ",".join(codings).split(",")[-1].strip().lower()
            if last != "chunked":
                self._state = _UNTIL_CLOSE
                self._keep_alive = False
                return
            self._state = _CHUNK_SIZE
            return
        lengths = {v.strip() for k, v in head.headers if k == "content-length"}
        if lengths:
            if len(lengths) != 1 or not next(iter(lengths)).isdigit():
                raise HTTPProtocolError(f"invalid Content-Length {sorted(lengths)!r}")
            self._remaining = int(next(iter(lengths)))
            if self._remaining == 0:
                self._end_body()
            else:
                self._state = _LENGTH
            return
        self._state = _UNTIL_CLOSE
        self._keep_alive = False


# -- server side ------------------------------------------------------------------------------

#: Request methods the server side accepts (anything else: 501).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class BadRequest(HTTPProtocolError):
    """A request that breaks HTTP/1.1; ``status`` is the answer to give before closing."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@attrs.frozen
class RequestHead:
    """A request line and headers. ``headers`` keeps raw (lower-cased name, value) bytes pairs,
    as ASGI wants them."""

    method: str
    target: str
    http_version: str
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    expect_continue: bool


class RequestReader(_BodyDecoder):
    """Parses the requests arriving on one server-side connection, one after another.

    Feed bytes with :meth:`feed`; :meth:`next_head` returns the next request head once
    complete; :meth:`read_body` returns decoded body bytes of the current request (its
    ``Content-Length`` or chunked framing) as they become available, and :attr:`body_done`
    says when the body is complete. Bytes beyond the current request (pipelining) stay
    buffered for the next one.

    Raises (from each method): :class:`BadRequest` with the status to answer.
    """

    def __init__(self, *, max_head_bytes: int = MAX_HEAD_BYTES) -> None:
        super().__init__(max_trailer_bytes=max_head_bytes)
        self._max_head = max_head_bytes
        self._state = _DONE  # between requests
        self.body_done = True

    def _fail(self, message: str, status: int = 400) -> NoReturn:
        raise BadRequest(message, status)

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def next_head(self) -> RequestHead | None:
        """The next request's head, or None until it is complete."""
        if not self.body_done:
            raise RuntimeError("the previous request's body was not read")
        # Tolerate empty lines between requests (RFC 9112 section 2.2).
        while self._buffer[:2] == b"\r\n":
            del self._buffer[:2]
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > self._max_head:
                raise BadRequest(f"request head larger than {self._max_head} bytes", 431)
            return None
        if end > self._max_head:
            raise BadRequest(f"request head larger than {self._max_head} bytes", 431)
        raw = bytes(self._buffer[:end])
        del self._buffer[: end + 4]
        return self._parse(raw)

    def _parse(self, raw: bytes) -> RequestHead:
        lines = raw.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            raise BadRequest(f"malformed request line {lines[0][:100]!r}")
        method_b, target_b, version_b = parts
        if version_b not in (b"HTTP/1.1", b"HTTP/1.0"):
            if version_b.startswith(b"HTTP/"):
                raise BadRequest(f"HTTP version {version_b[:20]!r} not supported", 505)
            raise BadRequest(f"malformed request line {lines[0][:100]!r}")
        method = method_b.decode("ascii", "replace")
        if not method.isalpha() or not method.isupper():
            raise BadRequest(f"malformed method {method[:20]!r}")
        if method not in KNOWN_METHODS:
            raise BadRequest(f"method {method[:20]!r} not implemented", 501)
        if not target_b or any(c <= 0x20 or c == 0x7F for c in target_b):
            raise BadRequest("malformed request target")
        headers: list[tuple[bytes, bytes]] = []
        lengths: list[bytes] = []
        codings: list[bytes] = []
        connection = b""
        expect = b""
        has_host = False
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip() or b" " in name or b"\t" in name:
                raise BadRequest(f"malformed header line {line[:100]!r}")
            if b"\0" in value or b"\r" in value or b"\n" in value:
                raise BadRequest("header value holds a control character")
            name = name.lower()
            value = value.strip(b" \t")
            headers.append((name, value))
            if name == b"content-length":
                lengths.append(value)
            elif name == b"transfer-encoding":
                codings.append(value)
            elif name == b"connection":
                connection += b"," + value.lower()
            elif name == b"expect":
                expect = value.lower()
            elif name == b"host":
                has_host = True
        http11 = version_b == b"HTTP/1.1"
        if http11 and not has_host:
            raise BadRequest("HTTP/1.1 request without Host")
        if codings:
            if lengths:  # request smuggling: never guess which one the sender meant
                raise BadRequest("both Transfer-Encoding and Content-Length")
            if b",".join(codings).strip().lower() != b"chunked":
                raise BadRequest("only the chunked transfer coding is supported", 501)
            self._state = _CHUNK_SIZE
            self.body_done = False
        elif lengths:
            if len(set(lengths)) != 1 or not lengths[0].isdigit() or len(lengths[0]) > 18:
                raise BadRequest(f"invalid Content-Length {lengths[0][:30]!r}")
            self._remaining = int(lengths[0])
            self._state = _LENGTH if self._remaining else _DONE
            self.body_done = self._remaining == 0
        else:
            self._state = _DONE
            self.body_done = True
        keep_alive = (b"close" not in connection) if http11 else (b"keep-alive" in connection)
        return RequestHead(
            method=method,
            target=target_b.decode("latin-1"),
            http_version=version_b[5:].decode(),
            headers=headers,
            keep_alive=keep_alive,
            expect_continue=http11 and expect == b"100-continue",
        )

    def read_body(self) -> bytes:
        """Body bytes of the current request available so far (``b""`` if none yet)."""
        if self.body_done:
            return b""
        out: list[bytes] = []
        self._decode_body(out)
        return b"".join(out) if len(out) != 1 else out[0]

    def _end_body(self) -> None:
        self._state = _DONE
        self.body_done = True
