"""A TCP stream whose reads and writes skip trio's scheduler when the kernel can do them at once.

Why: ``trio.SocketStream`` makes every ``send_all`` and ``receive_some`` a full checkpoint — a
trip through the scheduler even when the system call completed at once — and wraps each call
in two context managers. A relayed stream chunk is one upstream read and one client write, so
that machinery was a large share of the gateway's CPU per chunk (``doc/benchmarks.md``:
profile of the relay). :class:`FastSocketStream` calls the non-blocking socket first and only
waits (``trio.lowlevel.wait_readable``/``wait_writable``, which are checkpoints) when the
kernel cannot complete the call.

Contract, and the one way it differs from ``trio.SocketStream``: :meth:`receive_some` and
:meth:`send_all` are checkpoints only when they wait, or once every :data:`YIELD_EVERY`
consecutive calls that did not wait. So a cancelled task is told (``trio.Cancelled``) at its
next wait, or within that many calls — never later — and a task whose peer is always ready
still lets the others run. Errors map as trio's do: a reset or broken connection is
``trio.BrokenResourceError``, use after :meth:`close` is ``trio.ClosedResourceError``, and a
task waiting on the socket when another closes it gets ``trio.ClosedResourceError``.

There is no conflict detector: each user (one connection of the edge server, one pooled
upstream connection) has one reader and one writer at a time by construction; two tasks waiting
to read (or to write) at once still get ``trio.BusyResourceError`` from trio.
"""

from __future__ import annotations

import math
import socket

import trio

#: Calls that complete without waiting before one yields to the scheduler anyway.
YIELD_EVERY = 16
_DEFAULT_READ = 65536


class FastSocketStream(trio.abc.Stream):
    """A :class:`trio.abc.Stream` over a connected non-blocking stdlib TCP socket, which it
    owns (see the module docstring for the checkpoint contract)."""

    __slots__ = ("_streak", "socket")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socket = sock
        self._streak = 0

    @classmethod
    def from_trio(cls, stream: trio.SocketStream) -> FastSocketStream:
        """Take over the socket of ``stream`` (which must not be used afterwards)."""
        tsock = stream.socket
        family, kind, proto = tsock.family, tsock.type, tsock.proto
        return cls(socket.socket(family, kind, proto, fileno=tsock.detach()))

    async def _passed(self) -> None:
        # A call completed without waiting: every YIELD_EVERY of those, be a checkpoint.
        self._streak += 1
        if self._streak >= YIELD_EVERY:
            self._streak = 0
            await trio.lowlevel.checkpoint()

    def _error(self, exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
        if self.socket.fileno() == -1:
            return trio.ClosedResourceError("the socket was closed")
        return trio.BrokenResourceError(f"the connection failed: {exc!r}")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to ``max_bytes`` (default 64 KiB) bytes; ``b""`` at end of stream."""
        return await self.receive_before(math.inf, max_bytes)

    async def receive_before(self, deadline: float, max_bytes: int | None = None) -> bytes:
        """:meth:`receive_some`, bounded by ``deadline`` (trio time) as ``trio.fail_at``
        would, but with a cancel scope only if the read has to wait: a scope costs about as
        much as the read itself, and data is often there already.

        Raises:
            trio.TooSlowError: the deadline passed before data (or the end) arrived.
        """
        size = _DEFAULT_READ if max_bytes is None else max_bytes
        if size < 1:
            raise ValueError("max_bytes must be >= 1")
        sock = self.socket
        try:
            data = sock.recv(size)
        except BlockingIOError:
            pass
        except OSError as exc:
            raise self._error(exc) from exc
        else:
            await self._passed()
            return data
        self._streak = 0
        if deadline == math.inf:
            return await self._wait_and_receive(size)
        with trio.CancelScope(deadline=deadline) as waiting:
            return await self._wait_and_receive(size)
        assert waiting.cancelled_caught
        raise trio.TooSlowError

    async def _wait_and_receive(self, size: int) -> bytes:
        sock = self.socket
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                return sock.recv(size)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise self._error(exc) from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``; returns once the kernel has taken it."""
        sock = self.socket
        size = len(data)
        if not size:
            if sock.fileno() == -1:
                raise trio.ClosedResourceError("the socket was closed")
            await trio.lowlevel.checkpoint()
            return
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise self._error(exc) from exc
        if sent == size:
            await self._passed()
            return
        self._streak = 0
        with memoryview(data) as view:
            while sent < size:
                await trio.lowlevel.wait_writable(sock)
                try:
                    sent += sock.send(view[sent:])
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise self._error(exc) from exc

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the socket is writable."""
        if self.socket.fileno() == -1:
            raise trio.ClosedResourceError("the socket was closed")
        await trio.lowlevel.wait_writable(self.socket)

    def is_readable(self) -> bool:
        """True if a read would not block: data, end of stream or an error is pending (for an
        idle pooled connection, any of these means it cannot be reused)."""
        try:
            self.socket.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        except OSError:
            return True  # broken or closed
        return True

    def close(self) -> None:
        """Close at once (idempotent); a task waiting on the socket gets ClosedResourceError."""
        sock = self.socket
        if sock.fileno() != -1:
            trio.lowlevel.notify_closing(sock)
            sock.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()
