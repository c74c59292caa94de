"""Unit and property tests of the sans-io SSE decoder and encoder."""

from __future__ import annotations

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from lm_gateway.wire.sse import DONE, DONE_EVENT, SSEDecoder, SSEEvent, encode_event

BOM = b"\xef\xbb\xbf"


def decode(*chunks: bytes) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.close())
    return events


def decode_with_comments(chunks: list[bytes]) -> tuple[list[SSEEvent], int]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.close())
    return events, decoder.comments


# --------------------------------------------------------------------------------------------
# Examples


def test_openai_style_stream() -> None:
    transcript = (
        b'data: {"id":"1","choices":[]}\n\n: keep-alive\n\ndata: {"id":"2"}\n\ndata: [DONE]\n\n'
    )
    decoder = SSEDecoder()
    events = decoder.feed(transcript)
    assert [e.data for e in events] == [b'{"id":"1","choices":[]}', b'{"id":"2"}', DONE]
    assert decoder.close() == []
    assert decoder.comments == 1


def test_fields() -> None:
    events = decode(
        b"event: ping\nid: 7\nretry: 1500\ndata: a\ndata:b\ndata:  c\n\ndata: second\n\n"
    )
    assert events == [
        SSEEvent(data=b"a\nb\n c", event="ping", id="7", retry=1500),
        # The event type resets after each event; the last event id persists (WHATWG).
        SSEEvent(data=b"second", event=None, id="7", retry=None),
    ]


def test_data_without_colon_and_empty_data() -> None:
    assert decode(b"data\n\n") == [SSEEvent(data=b"")]
    assert decode(b"data:\n\n") == [SSEEvent(data=b"")]
    assert decode(b"data\ndata\n\n") == [SSEEvent(data=b"\n")]


def test_blank_lines_without_data_dispatch_nothing() -> None:
    assert decode(b"\n\n\n") == []
    assert decode(b"event: x\n\n") == []
    assert decode(b"id: 3\n\ndata: y\n\n") == [SSEEvent(data=b"y", id="3")]


def test_unknown_fields_and_bad_retry_are_ignored() -> None:
    assert decode(b"foo: bar\nretry: soon\ndata: x\n\n") == [SSEEvent(data=b"x")]


def test_id_with_nul_is_ignored() -> None:
    assert decode(b"id: a\x00b\ndata: x\n\n") == [SSEEvent(data=b"x")]


def test_comments_are_skipped_and_counted() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(b": OPENROUTER PROCESSING\n\n:\ndata: x\n: inside\n\n")
    assert events == [SSEEvent(data=b"x")]
    assert decoder.comments == 3


def test_stream_ending_without_blank_line_still_dispatches() -> None:
    assert decode(b"data: [DONE]\n") == [SSEEvent(data=DONE)]
    assert decode(b"data: [DONE]") == [SSEEvent(data=DONE)]
    assert decode(b"data: a\n\ndata: b") == [SSEEvent(data=b"a"), SSEEvent(data=b"b")]


def test_feed_returns_events_as_soon_as_complete() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a") == []
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"\n") == [SSEEvent(data=b"a")]
    assert decoder.feed(b"") == []
    assert decoder.close() == []


def test_bom_is_stripped_only_at_the_start() -> None:
    assert decode(BOM + b"data: a\n\n") == [SSEEvent(data=b"a")]
    assert decode(b"data: a\n\n" + BOM + b"data: b\n\n") == [SSEEvent(data=b"a")]
    assert decode(b"data: " + BOM + b"\n\n") == [SSEEvent(data=BOM)]


def test_bom_split_across_chunks() -> None:
    assert decode(b"\xef", b"\xbb", b"\xbf", b"data: a\n\n") == [SSEEvent(data=b"a")]
    assert decode(b"\xef\xbb", b"\xbfdata: a\n\n") == [SSEEvent(data=b"a")]


def test_partial_bom_that_is_not_a_bom_is_kept() -> None:
    events = decode(b"\xef\xbb", b"Xdata: a\n\ndata: b\n\n")
    assert events == [SSEEvent(data=b"b")]  # the first line's field name is b"\xef\xbbXdata"


def test_crlf_split_between_chunks_is_one_line_end() -> None:
    assert decode(b"data: a\r", b"\n\r", b"\n") == [SSEEvent(data=b"a")]
    assert decode(b"data: a\r", b"\ndata: b\r\n\r\n") == [SSEEvent(data=b"a\nb")]
    # A CR, then a chunk that does not start with LF: the CR alone was the line end.
    assert decode(b"data: a\r", b"data: b\r\r") == [SSEEvent(data=b"a\nb")]


def test_empty_chunk_between_cr_and_lf() -> None:
    assert decode(b"data: a\r", b"", b"\ndata: b\n\n") == [SSEEvent(data=b"a\nb")]


def test_line_separator_u2028_is_not_a_line_break() -> None:
    payload = '{"content":"one\u2028two\u2029three\x85four"}'.encode()
    assert decode(b"data: " + payload + b"\n\n") == [SSEEvent(data=payload)]


def test_encode_event() -> None:
    assert encode_event(b'{"a":1}') == b'data: {"a":1}\n\n'
    assert encode_event(b"a\nb") == b"data: a\ndata: b\n\n"
    assert encode_event(b"x", event="error") == b"event: error\ndata: x\n\n"
    assert encode_event(b"") == b"data: \n\n"
    assert DONE_EVENT == b"data: [DONE]\n\n"


# --------------------------------------------------------------------------------------------
# Properties

_VALUE_BYTES = st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_TEXT_VALUE = st.text(
    alphabet=st.characters(blacklist_characters="\r\n\x00", blacklist_categories=("Cs",)),
    max_size=8,
)


@st.composite
def sse_lines(draw: st.DrawFn) -> list[bytes]:
    """The lines (without terminators) of an SSE transcript: events, comments, odd fields."""
    lines: list[bytes] = []
    for _ in range(draw(st.integers(0, 5))):
        for _ in range(draw(st.integers(0, 4))):
            kind = draw(
                st.sampled_from(
                    [
                        "data",
                        "data",
                        "nospace",
                        "bare",
                        "event",
                        "id",
                        "retry",
                        "comment",
                        "unknown",
                    ]
                )
            )
            if kind == "data":
                lines.append(b"data: " + draw(_VALUE_BYTES))
            elif kind == "nospace":
                lines.append(b"data:" + draw(_VALUE_BYTES))
            elif kind == "bare":
                lines.append(b"data")
            elif kind == "event":
                lines.append(b"event: " + draw(_TEXT_VALUE).encode())
            elif kind == "id":
                lines.append(b"id: " + draw(_TEXT_VALUE).encode())
            elif kind == "retry":
                lines.append(b"retry: " + str(draw(st.integers(0, 10_000))).encode())
            elif kind == "comment":
                lines.append(b":" + draw(_VALUE_BYTES))
            else:
                lines.append(b"x-custom: " + draw(_VALUE_BYTES))
        lines.append(b"")  # dispatch
    return lines


def join(lines: list[bytes], endings: list[bytes]) -> bytes:
    return b"".join(line + end for line, end in zip(lines, endings, strict=True))


def mixed_endings(draw: st.DrawFn, lines: list[bytes]) -> list[bytes]:
    """One terminator per line from LF, CR, CRLF, never letting a CR and the next LF merge."""
    endings: list[bytes] = []
    for i, line in enumerate(lines):
        choices = [b"\n", b"\r", b"\r\n"]
        if i > 0 and endings[-1] == b"\r" and line == b"":
            # "\r" followed by an empty line ended by "\n" would read as one CRLF.
            choices = [b"\r", b"\r\n"]
        endings.append(draw(st.sampled_from(choices)))
    return endings


@st.composite
def split(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    chunks = []
    start = 0
    for cut in [*cuts, len(data)]:
        chunks.append(data[start:cut])
        start = cut
    return chunks


@settings(max_examples=300, deadline=None)
@given(data=st.data(), lines=sse_lines(), bom=st.booleans())
def test_any_rechunking_decodes_the_same(
    data: st.DataObject, lines: list[bytes], bom: bool
) -> None:
    endings = mixed_endings(data.draw, lines)
    transcript = (BOM if bom else b"") + join(lines, endings)
    whole = decode_with_comments([transcript])
    # A leading BOM changes nothing.
    assert whole == decode_with_comments([join(lines, endings)])
    chunks = data.draw(split(transcript), label="chunks")
    assert b"".join(chunks) == transcript
    assert decode_with_comments(chunks) == whole


@settings(max_examples=200, deadline=None)
@given(data=st.data(), lines=sse_lines(), bom=st.booleans())
def test_byte_at_a_time_decodes_the_same(
    data: st.DataObject, lines: list[bytes], bom: bool
) -> None:
    endings = mixed_endings(data.draw, lines)
    transcript = (BOM if bom else b"") + join(lines, endings)
    whole = decode_with_comments([transcript])
    assert decode_with_comments([transcript[i : i + 1] for i in range(len(transcript))]) == whole


@settings(max_examples=300, deadline=None)
@given(data=st.data(), lines=sse_lines())
def test_line_endings_do_not_matter(data: st.DataObject, lines: list[bytes]) -> None:
    lf = decode_with_comments([join(lines, [b"\n"] * len(lines))])
    assert decode_with_comments([join(lines, [b"\r\n"] * len(lines))]) == lf
    assert decode_with_comments([join(lines, [b"\r"] * len(lines))]) == lf
    mixed = join(lines, mixed_endings(data.draw, lines))
    assert decode_with_comments([mixed]) == lf
    assert decode_with_comments(data.draw(split(mixed))) == lf


@settings(max_examples=300, deadline=None)
@given(lines=sse_lines())
def test_events_match_a_reference_reading(lines: list[bytes]) -> None:
    # An independent reading of the same lines: data joined by LF, comments skipped.
    expected_data = []
    current: list[bytes] | None = None
    comments = 0
    for line in lines:
        if line == b"":
            if current is not None:
                expected_data.append(b"\n".join(current))
            current = None
        elif line.startswith(b":"):
            comments += 1
        elif line == b"data" or line.startswith(b"data:"):
            value = line[5:]
            if value.startswith(b" "):
                value = value[1:]
            current = [*(current or []), value]
    events, seen_comments = decode_with_comments([join(lines, [b"\n"] * len(lines))])
    assert [e.data for e in events] == expected_data
    assert seen_comments == comments


_PAYLOADS = st.one_of(
    st.binary(max_size=40),
    st.lists(
        st.sampled_from([b"a", b"b", b"\n", b" ", b":", b"data: ", b"\xe2\x80\xa8"]), max_size=12
    ).map(b"".join),
)


@settings(max_examples=300, deadline=None)
@given(payload=_PAYLOADS, event=st.one_of(st.none(), st.sampled_from(["error", "ping"])))
def test_encode_round_trips(payload: bytes, event: str | None) -> None:
    # SSE cannot carry a CR: CR and CRLF inside data come back as LF.
    expected = payload.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    events = decode(encode_event(payload, event))
    assert events == [SSEEvent(data=expected, event=event)]


@settings(max_examples=200, deadline=None)
@given(data=st.data(), payloads=st.lists(_PAYLOADS, max_size=5))
def test_encoded_stream_round_trips_under_rechunking(
    data: st.DataObject, payloads: list[bytes]
) -> None:
    transcript = b"".join(encode_event(p) for p in payloads) + DONE_EVENT
    expected = [p.replace(b"\r\n", b"\n").replace(b"\r", b"\n") for p in payloads] + [DONE]
    chunks = data.draw(split(transcript))
    assert [e.data for e in decode(*chunks)] == expected


def test_event_is_a_frozen_value() -> None:
    event = SSEEvent(data=b"x")
    assert attrs.evolve(event, event="y") == SSEEvent(data=b"x", event="y")
    assert event == SSEEvent(data=b"x")
