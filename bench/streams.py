"""Many concurrent paced streams on raw sockets: when does each chunk arrive, against its schedule?

    python bench/streams.py --port 8000 --streams 1000 --chunks 20 --delay-ms 1000 \\
        --header "Authorization: Bearer sk-bench"

One thread, one ``selectors`` loop, non-blocking sockets: cheap enough that 1,000 streams of 20
chunks (1,000-2,000 chunks/s) cost it a few percent of a core, so the figures are the
server's, not the client's (run it against the mock directly to see the client's own share).

The streams start ``--ramp-s`` apart in total (evenly spread), each one HTTP/1.1 request for an
SSE stream whose content chunks the upstream paces ``--delay-ms`` apart. For each stream, content
chunk k (k = 0, 1, ...) is expected at ``first + k * delay``, where ``first`` is when chunk 0
arrived; its *lateness* is how much later it came. The first chunk's own lateness is measured
against the request: ``first - (sent + delay)``. One JSON object goes to stdout.
"""

from __future__ import annotations

import argparse
import errno
import json
import resource
import selectors
import socket
import time
from typing import Any

#: What marks a content chunk, and the end of the stream, in each wire format.
MARKERS = {
    "openai": (b'"content":"tok', b"[DONE]"),
    "anthropic": (b'"text_delta","text":"tok', b"message_stop"),
}
OPENAI_BODY = '{"model":"mock","stream":true,"messages":[{"role":"user","content":"hello there"}]}'
ANTHROPIC_BODY = (
    '{"model":"mock","max_tokens":64,"stream":true,'
    '"messages":[{"role":"user","content":"hello there"}]}'
)
END = b"0\r\n\r\n"


class Stream:
    __slots__ = ("buf", "chunks", "done", "error", "index", "pos", "sent", "sock", "status")

    def __init__(self, index: int) -> None:
        self.index = index
        self.sock: socket.socket | None = None
        self.sent = 0.0
        self.buf = bytearray()
        self.pos = 0
        self.chunks: list[float] = []
        self.status = b""
        self.done = False
        self.error = ""


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def raise_fd_limit(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit(args.streams + 256)
    marker, done_marker = MARKERS[args.format]
    body = args.body or (ANTHROPIC_BODY if args.format == "anthropic" else OPENAI_BODY)
    head = "".join(f"{h}\r\n" for h in args.header)
    request = (
        f"POST {args.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"{head}Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()
    delay = args.delay_ms / 1000
    streams = [Stream(i) for i in range(args.streams)]
    sel = selectors.DefaultSelector()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    deadline = t0 + args.ramp_s + args.chunks * delay + args.timeout_s
    step = args.ramp_s / max(args.streams - 1, 1)
    started = 0
    open_count = 0

    def finish(s: Stream, error: str = "") -> None:
        nonlocal open_count
        if error and not s.error:
            s.error = error
        if s.sock is not None:
            sel.unregister(s.sock)
            s.sock.close()
            s.sock = None
            open_count -= 1

    while True:
        now = time.perf_counter()
        while started < len(streams) and now >= t0 + started * step:
            s = streams[started]
            started += 1
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = sock.connect_ex(("127.0.0.1", args.port))
            if code not in (0, errno.EINPROGRESS):
                sock.close()
                s.error = f"connect: {errno.errorcode.get(code, code)}"
                continue
            s.sock = sock
            open_count += 1
            sel.register(sock, selectors.EVENT_WRITE, s)
        if started == len(streams) and open_count == 0:
            break
        if now > deadline:
            for s in streams:
                if s.sock is not None:
                    finish(s, f"timed out after {len(s.chunks)} chunks")
            break
        timeout = 0.05
        if started < len(streams):
            timeout = max(0.0, min(timeout, t0 + started * step - now))
        for key, mask in sel.select(timeout):
            s = key.data
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if mask & selectors.EVENT_WRITE:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    finish(s, f"connect: {errno.errorcode.get(code, code)}")
                    continue
                s.sent = time.perf_counter()
                sock.send(request)  # a few hundred bytes: fits in an empty socket buffer
                sel.modify(sock, selectors.EVENT_READ, s)
                continue
            try:
                data = sock.recv(65536)
            except OSError as exc:
                finish(s, f"recv: {exc}")
                continue
            now = time.perf_counter()
            if not data:
                finish(s, f"closed after {len(s.chunks)} chunks")
                continue
            s.buf += data
            if not s.status:
                line_end = s.buf.find(b"\r\n")
                if line_end < 0:
                    continue
                s.status = bytes(s.buf[:line_end])
                if not s.status.startswith(b"HTTP/1.1 200"):
                    finish(s, s.status.decode("latin-1"))
                    continue
            while (found := s.buf.find(marker, s.pos)) >= 0:
                s.chunks.append(now)
                s.pos = found + len(marker)
            if s.buf.find(done_marker, max(0, s.pos - len(done_marker))) >= 0 and s.buf.endswith(
                END
            ):
                s.done = True
                finish(s)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0

    lateness: list[float] = []
    first_late: list[float] = []
    worst_by_second: dict[int, float] = {}
    errors: dict[str, int] = {}
    complete = 0
    for s in streams:
        if s.error:
            errors[s.error] = errors.get(s.error, 0) + 1
        if not s.chunks:
            continue
        first = s.chunks[0]
        first_late.append(first - s.sent - delay)
        for k, at in enumerate(s.chunks[1:], start=1):
            late = at - (first + k * delay)
            lateness.append(late)
            second = int(at - t0)
            worst_by_second[second] = max(worst_by_second.get(second, late), late)
        if s.done and not s.error and len(s.chunks) == args.chunks:
            complete += 1
        elif s.done and len(s.chunks) != args.chunks:
            key = f"{len(s.chunks)} chunks instead of {args.chunks}"
            errors[key] = errors.get(key, 0) + 1
    ms = 1000.0
    return {
        "streams": args.streams,
        "chunks_per_stream": args.chunks,
        "delay_ms": args.delay_ms,
        "ramp_s": args.ramp_s,
        "completed": complete,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "chunks_received": sum(len(s.chunks) for s in streams),
        "late_p50_ms": percentile(lateness, 50) * ms,
        "late_p99_ms": percentile(lateness, 99) * ms,
        "late_max_ms": max(lateness, default=0.0) * ms,
        "late_over_50ms": sum(1 for x in lateness if x > 0.05),
        "first_late_p50_ms": percentile(first_late, 50) * ms,
        "first_late_p99_ms": percentile(first_late, 99) * ms,
        "first_late_max_ms": max(first_late, default=0.0) * ms,
        "worst_late_by_second_ms": [
            round(worst_by_second[k] * ms, 1) for k in sorted(worst_by_second)
        ],
        "wall_s": wall,
        "client_cpu_s": cpu,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--format", choices=sorted(MARKERS), default="openai")
    parser.add_argument("--body", default="", help="the request body (default: a small chat)")
    parser.add_argument("--header", action="append", default=[], help='"Name: value"')
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--chunks", type=int, default=20, help="content chunks the mock sends")
    parser.add_argument("--delay-ms", type=float, default=1000, help="the mock's chunk spacing")
    parser.add_argument("--ramp-s", type=float, default=10.0, help="spread the starts over this")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="grace beyond the schedule")
    print(json.dumps(run(parser.parse_args())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
