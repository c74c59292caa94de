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


# Body framing states.
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


class ResponseReader:
    """Parses one response on a connection. Feed it bytes as they arrive.

    After :meth:`feed` returns, :attr:`head` is set once the head is complete, and
    :attr:`done` once the body is. :attr:`reusable` says whether the connection may carry
    another request afterwards (the body ended by its framing, no ``Connection: close``, no
    bytes beyond this response).

    Args:
        method: the request's method (a ``HEAD`` response has no body).
    """

    def __init__(self, method: str = "POST") -> None:
        self._method = method
        self._buffer = bytearray()
        self._state = _HEAD
        self._remaining = 0
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
        self._buffer += data
        out: list[bytes] = []
        while True:
            state = self._state
            if state == _HEAD:
                if not self._parse_head():
                    break
            elif state == _LENGTH:
                if not self._buffer:
                    break
                data = bytes(self._buffer)
                self._buffer.clear()
                out.append(self._take_sized(data))
            elif state == _CHUNK_SIZE:
                if not self._parse_chunk_size():
                    break
            elif state == _CHUNK_DATA:
                if not self._buffer:
                    break
                take = min(self._remaining, len(self._buffer))
                out.append(bytes(self._buffer[:take]))
                del self._buffer[:take]
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _CHUNK_CRLF
            elif state == _CHUNK_CRLF:
                if len(self._buffer) < 2:
                    break
                if self._buffer[:2] != b"\r\n":
                    raise HTTPProtocolError("chunk data not followed by CRLF")
                del self._buffer[:2]
                self._state = _CHUNK_SIZE
            elif state == _TRAILERS:
                if not self._parse_trailers():
                    break
            elif state == _UNTIL_CLOSE:
                out.append(bytes(self._buffer))
                self._buffer.clear()
                break
            else:  # _DONE
                if self._buffer:
                    self._extra = True
                    self._buffer.clear()
                break
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

    def _take_sized(self, data: bytes) -> bytes:
        if len(data) < self._remaining:
            self._remaining -= len(data)
            return data
        body = data[: self._remaining]
        if len(data) > self._remaining:
            self._extra = True
        self._remaining = 0
        self._finish()
        return body

    def _finish(self) -> None:
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
            self._finish()
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
                self._finish()
            else:
                self._state = _LENGTH
            return
        self._state = _UNTIL_CLOSE
        self._keep_alive = False

    def _parse_chunk_size(self) -> bool:
        end = self._buffer.find(b"\r\n")
        if end < 0:
            if len(self._buffer) > MAX_CHUNK_LINE_BYTES:
                raise HTTPProtocolError("chunk-size line too long")
            return False
        line = bytes(self._buffer[:end]).split(b";", 1)[0].strip()
        del self._buffer[: end + 2]
        if not line or line.strip(b"0123456789abcdefABCDEF") or len(line) > 16:
            raise HTTPProtocolError(f"malformed chunk size {line[:40]!r}")
        size = int(line, 16)
        if size == 0:
            self._state = _TRAILERS
        else:
            self._remaining = size
            self._state = _CHUNK_DATA
        return True

    def _parse_trailers(self) -> bool:
        # Trailer fields are read and dropped; the empty line ends the message.
        while True:
            end = self._buffer.find(b"\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD_BYTES:
                    raise HTTPProtocolError("trailer section too large")
                return False
            line = self._buffer[:end]
            del self._buffer[: end + 2]
            if not line:
                self._finish()
                if self._buffer:
                    self._extra = True
                    self._buffer.clear()
                return False
