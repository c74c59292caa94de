"""FastSocketStream (lm_gateway.netio) over real loopback TCP connections.

What it must keep of trio's stream contract: every byte arrives, in order, however the kernel
splits a write; end of stream, resets and use after close give trio's errors; a task waiting
on the socket is woken when another closes it; and cancellation and fairness hold although
calls that complete at once skip the scheduler (bounded by ``YIELD_EVERY``).
"""

from __future__ import annotations

import socket
import struct

import pytest
import trio

from lm_gateway.netio import YIELD_EVERY, FastSocketStream

GUARD = 10  # seconds: a bound on each test's waits, never an assertion


async def connected_pair() -> tuple[FastSocketStream, trio.SocketStream]:
    """(our stream, trio's stream) connected over loopback TCP."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        accepted: list[trio.SocketStream] = []

        async def accept() -> None:
            accepted.append(await listeners[0].accept())

        nursery.start_soon(accept)
        ours = FastSocketStream.from_trio(await trio.open_tcp_stream("127.0.0.1", port))
    await listeners[0].aclose()
    return ours, accepted[0]


async def test_round_trip_and_end_of_stream() -> None:
    ours, peer = await connected_pair()
    with trio.fail_after(GUARD):
        await ours.send_all(b"ping")
        assert await peer.receive_some(10) == b"ping"
        await peer.send_all(b"pong")
        assert await ours.receive_some(10) == b"pong"
        await peer.aclose()
        assert await ours.receive_some(10) == b""
    ours.close()


async def test_a_write_larger_than_the_socket_buffers_arrives_whole_and_in_order() -> None:
    ours, peer = await connected_pair()
    ours.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payload = bytes(range(256)) * 20_000  # 5 MB: the kernel takes it in many parts
    received = bytearray()

    async def read_all() -> None:
        while len(received) < len(payload):
            received.extend(await peer.receive_some(65536))

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            await ours.send_all(payload)
    assert bytes(received) == payload
    ours.close()
    await peer.aclose()


async def test_a_reset_is_a_broken_resource() -> None:
    ours, peer = await connected_pair()
    # SO_LINGER 0: closing sends RST instead of FIN.
    peer.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await peer.aclose()
    with trio.fail_after(GUARD), pytest.raises(trio.BrokenResourceError):
        while True:  # the RST may take a moment to arrive
            await ours.receive_some(10)
            await trio.sleep(0.01)
    ours.close()


async def test_use_after_close_is_a_closed_resource() -> None:
    ours, peer = await connected_pair()
    ours.close()
    ours.close()  # idempotent
    with pytest.raises(trio.ClosedResourceError):
        await ours.receive_some(10)
    with pytest.raises(trio.ClosedResourceError):
        await ours.send_all(b"x")
    with pytest.raises(trio.ClosedResourceError):
        await ours.send_all(b"")
    assert ours.is_readable()  # a closed connection is never reusable
    await peer.aclose()


async def test_closing_wakes_a_task_waiting_to_read() -> None:
    ours, peer = await connected_pair()
    outcome: list[BaseException] = []

    async def wait_for_data() -> None:
        try:
            await ours.receive_some(10)
        except trio.ClosedResourceError as exc:
            outcome.append(exc)

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_data)
            await trio.testing.wait_all_tasks_blocked()
            ours.close()
    assert len(outcome) == 1
    await peer.aclose()


async def test_is_readable_tells_an_idle_connection_from_one_with_news() -> None:
    ours, peer = await connected_pair()
    assert not ours.is_readable()
    await peer.send_all(b"x")
    with trio.fail_after(GUARD):
        while not ours.is_readable():
            await trio.sleep(0.001)
    assert await ours.receive_some(10) == b"x"  # peeking consumed nothing
    assert not ours.is_readable()
    await peer.aclose()
    with trio.fail_after(GUARD):
        while not ours.is_readable():  # end of stream counts: the connection is done
            await trio.sleep(0.001)
    ours.close()


async def test_a_cancelled_task_is_told_within_the_yield_budget() -> None:
    """Writes that complete at once skip the scheduler, but not forever: a cancelled scope
    is raised within YIELD_EVERY calls."""
    ours, peer = await connected_pair()
    calls = 0
    with trio.CancelScope() as scope:
        scope.cancel()
        while True:
            calls += 1
            await ours.send_all(b"x")
            assert calls <= YIELD_EVERY, "cancellation was not delivered in time"
    assert scope.cancelled_caught
    ours.close()
    await peer.aclose()


async def test_a_task_whose_peer_is_always_ready_lets_others_run() -> None:
    ours, peer = await connected_pair()
    ran = trio.Event()

    async def other() -> None:
        ran.set()

    sent = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        while not ran.is_set():
            await ours.send_all(b"x")  # loopback takes these small writes at once
            sent += 1
            # The first yield puts both tasks in one scheduling batch, in either order.
            assert sent <= 2 * YIELD_EVERY, "the other task never ran"
    ours.close()
    await peer.aclose()


async def test_max_bytes_must_be_positive() -> None:
    ours, peer = await connected_pair()
    with pytest.raises(ValueError, match="max_bytes"):
        await ours.receive_some(0)
    ours.close()
    await peer.aclose()


async def test_receive_before_a_deadline() -> None:
    ours, peer = await connected_pair()
    with trio.fail_after(GUARD):
        with pytest.raises(trio.TooSlowError):
            await ours.receive_before(trio.current_time() + 0.05)
        await peer.send_all(b"late")
        assert await ours.receive_before(trio.current_time() + GUARD) == b"late"
        # Data already there is returned even with the deadline passed: nothing had to wait.
        await peer.send_all(b"ready")
        while not ours.is_readable():
            await trio.sleep(0.001)
        assert await ours.receive_before(trio.current_time() - 1) == b"ready"
    ours.close()
    await peer.aclose()
