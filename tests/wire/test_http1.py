"""The sans-io HTTP/1.1 response reader and request encoder (lm_gateway.wire.http1)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lm_gateway.wire.http1 import (
    MAX_HEAD_BYTES,
    BadRequest,
    HTTPProtocolError,
    RequestReader,
    ResponseReader,
    encode_request,
)

SIZED = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\nhello world"
)
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;ext=1\r\nhello\r\n6\r\n world\r\nA\r\n and more!\r\n0\r\nx-trailer: t\r\n\r\n"
)


def read_all(reader: ResponseReader, parts: list[bytes], eof: bool = False) -> bytes:
    body = b"".join(reader.feed(part) for part in parts)
    if eof:
        reader.feed_eof()
    return body


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    parts, last = [], 0
    for point in points:
        parts.append(data[last:point])
        last = point
    parts.append(data[last:])
    return parts


@settings(max_examples=200)
@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_any_split_of_a_sized_answer_reads_the_same(cuts: list[int]) -> None:
    reader = ResponseReader()
    assert read_all(reader, split_at(SIZED, cuts)) == b"hello world"
    assert reader.head is not None
    assert reader.head.status == 200
    assert reader.head.get("content-type") == "application/json"
    assert reader.done and reader.reusable


@settings(max_examples=200)
@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_any_split_of_a_chunked_answer_reads_the_same(cuts: list[int]) -> None:
    reader = ResponseReader()
    assert read_all(reader, split_at(CHUNKED, cuts)) == b"hello world and more!"
    assert reader.done and reader.reusable


def test_body_until_close() -> None:
    reader = ResponseReader()
    body = read_all(reader, [b"HTTP/1.1 200 OK\r\n\r\nsome", b" bytes"], eof=True)
    assert body == b"some bytes"
    assert reader.done and not reader.reusable


@pytest.mark.parametrize(
    ("head", "reusable"),
    [
        (b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, Close\r\ncontent-length: 0\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\nHTTP/1.1 200", False),  # junk after
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nabc", False),
    ],
)
def test_connection_reuse(head: bytes, reusable: bool) -> None:
    reader = ResponseReader()
    reader.feed(head)
    assert reader.done
    assert reader.reusable is reusable


def test_interim_answers_are_skipped() -> None:
    reader = ResponseReader()
    body = read_all(
        reader,
        [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n", SIZED],
    )
    assert reader.head is not None and reader.head.status == 200
    assert body == b"hello world"


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(status: int) -> None:
    reader = ResponseReader()
    reader.feed(f"HTTP/1.1 {status} X\r\ncontent-length: 5\r\n\r\n".encode())
    assert reader.done and reader.reusable


def test_head_request_has_no_body() -> None:
    reader = ResponseReader("HEAD")
    reader.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 500\r\n\r\n")
    assert reader.done


def test_chunked_wins_over_content_length() -> None:
    reader = ResponseReader()
    raw = CHUNKED.replace(b"\r\n\r\n", b"\r\ncontent-length: 3\r\n\r\n", 1)
    assert read_all(reader, [raw]) == b"hello world and more!"


def test_reason_phrase_may_be_empty_or_missing() -> None:
    for line in (b"HTTP/1.1 200 \r\n", b"HTTP/1.1 200\r\n"):
        reader = ResponseReader()
        reader.feed(line + b"content-length: 0\r\n\r\n")
        assert reader.head is not None and reader.head.status == 200


@st.composite
def chunked_answers(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(a chunked answer as sent, its body): any chunk sizes, size lines in either case, with
    or without leading zeros or an extension, maybe trailers."""
    pieces = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=8))
    wire = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    for piece in pieces:
        size = draw(st.sampled_from(["%x", "%X", "00%x"])) % len(piece)
        extension = draw(st.sampled_from(["", ";a=b", " "]))
        wire += f"{size}{extension}\r\n".encode() + piece + b"\r\n"
    wire += b"0\r\n" + draw(st.sampled_from([b"", b"x-t: 1\r\n"])) + b"\r\n"
    return wire, b"".join(pieces)


@settings(max_examples=300)
@given(chunked_answers(), st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_any_chunked_answer_split_anywhere_reads_its_body(
    answer: tuple[bytes, bytes], cuts: list[int]
) -> None:
    """Reads that hold whole chunks take a shorter path than the general decoder; both must
    agree on every framing, wherever the reads split it."""
    wire, body = answer
    reader = ResponseReader()
    assert read_all(reader, split_at(wire, cuts)) == body
    assert reader.done and reader.reusable


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno-colon-here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n bad: folded\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0x5\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\nabc",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\nab\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n+1\r\nb\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n1_0\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    ],
)
def test_malformed_answers_are_refused(raw: bytes) -> None:
    with pytest.raises(HTTPProtocolError):
        ResponseReader().feed(raw)


def test_oversized_head_is_refused() -> None:
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(HTTPProtocolError, match="larger than"):
        reader.feed(b"x-big: " + b"a" * MAX_HEAD_BYTES)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"HTTP/1.1 200 OK\r\ncontent-le",
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab",
    ],
)
def test_eof_before_the_end_is_an_error(raw: bytes) -> None:
    reader = ResponseReader()
    reader.feed(raw)
    with pytest.raises(HTTPProtocolError, match="closed the connection"):
        reader.feed_eof()


def test_encode_request() -> None:
    data = encode_request("POST", "/v1/x?a=1", [("host", "h:1"), ("x-k", "v")], b"{}")
    assert data == b"POST /v1/x?a=1 HTTP/1.1\r\nhost: h:1\r\nx-k: v\r\ncontent-length: 2\r\n\r\n{}"
    assert (
        encode_request("GET", "/m", [("host", "h")], None) == b"GET /m HTTP/1.1\r\nhost: h\r\n\r\n"
    )
    assert b"content-length: 0" in encode_request("POST", "/", [("host", "h")], b"")


@pytest.mark.parametrize("value", ["a\r\nx-injected: 1", "a\nb", "a\0b"])
def test_encode_request_refuses_header_injection(value: str) -> None:
    with pytest.raises(ValueError, match="line break or NUL"):
        encode_request("POST", "/", [("host", "h"), ("x-user", value)], b"")


# -- server side: RequestReader -------------------------------------------------------------

PIPELINE = (
    b"POST /a?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
    b"\r\n"  # an empty line between requests is tolerated
    b"POST /b HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n"
    b"3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nt: 1\r\n\r\n"
    b"GET /c HTTP/1.0\r\n\r\n"
)


def read_requests(parts: list[bytes]) -> list[tuple[str, str, bool, bytes]]:
    reader = RequestReader()
    out: list[tuple[str, str, bool, bytes]] = []
    head = None
    body = b""
    for part in [*parts, b""]:
        reader.feed(part)
        while True:
            if head is None:
                head = reader.next_head()
                if head is None:
                    break
                body = b""
            body += reader.read_body()
            if not reader.body_done:
                break
            out.append((head.method, head.target, head.keep_alive, body))
            head = None
    return out


@settings(max_examples=200)
@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_any_split_of_pipelined_requests_reads_the_same(cuts: list[int]) -> None:
    assert read_requests(split_at(PIPELINE, cuts)) == [
        ("POST", "/a?x=1", True, b"hello"),
        ("POST", "/b", True, b"abcde"),
        ("GET", "/c", False, b""),
    ]


def test_request_headers_and_expect() -> None:
    reader = RequestReader()
    reader.feed(
        b"POST / HTTP/1.1\r\nHost: h\r\nX-Key:  v \r\nExpect: 100-continue\r\n"
        b"Connection: close\r\ncontent-length: 0\r\n\r\n"
    )
    head = reader.next_head()
    assert head is not None
    assert head.headers[:2] == [(b"host", b"h"), (b"x-key", b"v")]
    assert head.expect_continue and not head.keep_alive
    assert reader.body_done


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (
            b"POST / HTTP/1.1\r\nhost: h\r\ncontent-length: 1\r\n"
            b"transfer-encoding: chunked\r\n\r\n",
            400,
        ),
        (b"POST / HTTP/1.1\r\nhost: h\r\ntransfer-encoding: gzip, chunked\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nhost: h\r\ncontent-length: +5\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET  / HTTP/1.1\r\nhost: h\r\n\r\n", 400),
        (b"get / HTTP/1.1\r\nhost: h\r\n\r\n", 400),
        (b"GET /\x01 HTTP/1.1\r\nhost: h\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nhost: h\r\n\r\n", 505),
        (b"CONNECT h:443 HTTP/1.1\r\nhost: h\r\n\r\n", 501),
        (b"GET / HTTP/1.1\r\nhost : h\r\n\r\n", 400),
    ],
)
def test_bad_requests(raw: bytes, status: int) -> None:
    reader = RequestReader()
    reader.feed(raw)
    with pytest.raises(BadRequest) as caught:
        reader.next_head()
    assert caught.value.status == status


def test_oversized_request_head() -> None:
    reader = RequestReader(max_head_bytes=100)
    reader.feed(b"GET / HTTP/1.1\r\nhost: h\r\nx: " + b"a" * 200)
    with pytest.raises(BadRequest) as caught:
        reader.next_head()
    assert caught.value.status == 431


def test_malformed_chunk_in_request_body() -> None:
    reader = RequestReader()
    reader.feed(b"POST / HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\nxyz\r\n")
    assert reader.next_head() is not None
    with pytest.raises(BadRequest, match="chunk size"):
        reader.read_body()
