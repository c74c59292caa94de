"""Server-sent events: a sans-io decoder and the encoder.

The decoder follows the WHATWG event-stream rules: lines end at CR, LF or CRLF (and nowhere
else: httpx's ``aiter_lines`` also splits on U+2028, which may appear inside JSON strings), a
line starting with ``:`` is a comment, a blank line dispatches the event, ``data`` lines are
joined with ``\\n``. Data stays ``bytes`` because the next step is ``orjson.loads``, which takes
bytes; decoding to ``str`` first would only cost time.

One deliberate leniency: at end of stream, an event whose terminating blank line never came is
still dispatched (some OpenAI-compatible servers end with ``data: [DONE]\\n`` and nothing more).
"""

from __future__ import annotations

import attrs

DONE = b"[DONE]"
_BOM = b"\xef\xbb\xbf"


@attrs.frozen
class SSEEvent:
    """One dispatched event. ``event`` is None for the default ("message") type."""

    data: bytes
    event: str | None = None
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    """Incremental decoder: ``feed(bytes) -> events`` as bytes arrive, then ``close()``.

    Any split of a transcript into chunks yields the same events as feeding it whole.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._skip_lf = False
        self._at_start = True
        self._data: list[bytes] = []
        self._has_data = False
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None
        #: Number of comment lines seen (upstream keep-alives such as ``: OPENROUTER PROCESSING``).
        self.comments = 0

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Consume bytes; return the events they complete (possibly none)."""
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        data = self._buffer + chunk if self._buffer else chunk
        if self._at_start:
            if len(data) < len(_BOM) and _BOM.startswith(data):
                self._buffer = data
                return []
            self._at_start = False
            if data.startswith(_BOM):
                data = data[len(_BOM) :]
        if b"\r" in data:
            # A CR at the very end may be the first half of a CRLF split across chunks.
            self._skip_lf = data.endswith(b"\r")
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = data.split(b"\n")
        self._buffer = lines.pop()
        events: list[SSEEvent] = []
        for line in lines:
            self._line(line, events)
        return events

    def close(self) -> list[SSEEvent]:
        """End of stream: dispatch what a missing final newline or blank line left pending."""
        events: list[SSEEvent] = []
        if self._buffer:
            self._line(self._buffer, events)
            self._buffer = b""
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[SSEEvent]) -> None:
        if not line:
            if self._has_data:
                events.append(
                    SSEEvent(
                        data=self._data[0] if len(self._data) == 1 else b"\n".join(self._data),
                        event=self._event,
                        id=self._id,
                        retry=self._retry,
                    )
                )
            self._data = []
            self._has_data = False
            self._event = None
            self._retry = None
            return
        if line[:1] == b":":
            self.comments += 1
            return
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
            self._has_data = True
        elif name == b"event":
            self._event = value.decode("utf-8", "replace") or None
        elif name == b"id":
            if b"\0" not in value:
                self._id = value.decode("utf-8", "replace")
        elif name == b"retry" and value.isdigit():
            self._retry = int(value)
        # Other field names are ignored, as the standard says.


def encode_event(data: bytes, event: str | None = None) -> bytes:
    """Frame one event. ``data`` may contain newlines; each line becomes a ``data:`` line."""
    head = b"event: " + event.encode() + b"\n" if event else b""
    if b"\n" in data or b"\r" in data:
        lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        return head + b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"
    return head + b"data: " + data + b"\n\n"


DONE_EVENT = encode_event(DONE)
