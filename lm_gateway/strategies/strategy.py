"""A connection made of other connections: fallback chains, load balancing and hedging.

One algorithm serves all three. Per request the targets are put in an order (``sequential``:
as configured; or by a load-balancing method), targets in cooldown go last, and attempts run
as tasks in a nursery the strategy owns:

* the first target starts; when it fails with an error worth it (:mod:`.policy`), the next one
  starts (**fallback**); an error not worth it (a 400) is answered at once;
* with ``hedge_after_seconds``, when the running attempts have produced no first token in that
  long, the next target starts as well (**hedging**, trio's happy-eyeballs pattern);
* the first attempt to produce its first token wins: the others are cancelled, which closes
  their upstream connections.

A streamed attempt "produces" when a chunk with content arrives (text, a tool call, a finish
reason); chunks before that (the role, empty deltas) are held back, so a fallback before the
first token is invisible to the client, and after it there is no second answer: a later
failure reaches the client as the stream's error event.

A prompt too long for a target goes to ``on_context_length`` (when set) instead of the next
target. Load-balancing state (in-flight counts, latency averages, the round-robin position) is
in-process and costs O(targets) per request.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from typing import Any, cast

import attrs
import trio

from ..config.model import StrategyConnection, Target
from ..errors import GatewayError, InternalError, UpstreamError, UpstreamTimeout
from ..providers.base import ChatCall, ChatResult, ChatStream, Connection, JSONObject, close_quietly
from .policy import failure_reason, is_context_length

#: Weight of the newest sample in the latency average.
_EWMA_ALPHA = 0.3


def has_content(chunk: JSONObject) -> bool:
    """Whether a chunk carries part of the answer (not just the role or an empty delta)."""
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if choice.get("finish_reason") or choice.get("text"):  # legacy completions: text
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict):
            for key, value in delta.items():
                if key != "role" and value not in (None, "", [], {}):
                    return True
    return False


class BufferedStream:
    """A stream whose first chunks were read ahead; it hands them out first."""

    def __init__(self, stream: ChatStream, head: list[JSONObject], ended: bool) -> None:
        self.inner = stream
        self._head = head
        self._ended = ended
        self.partial_usage = getattr(stream, "partial_usage", None)

    async def receive(self) -> list[JSONObject]:
        if self._head:
            head, self._head = self._head, []
            await trio.lowlevel.checkpoint()
            return head
        if self._ended:
            await trio.lowlevel.checkpoint()
            return []
        batch = await self.inner.receive()
        self.partial_usage = getattr(self.inner, "partial_usage", None)
        return batch

    async def aclose(self) -> None:
        await self.inner.aclose()


@attrs.define
class _TargetState:
    in_flight: int = 0
    latency: float | None = None


class StrategyProvider:
    """See the module docstring."""

    is_strategy = True

    def __init__(self, config: StrategyConnection, *, rng: random.Random | None = None) -> None:
        self.name = config.name
        self.config = config
        self._rng = rng or random.Random()
        # Keyed by identity: targets are the config's objects (and hold unhashable params).
        self._state = {id(target): _TargetState() for target in config.targets}
        self._round_robin = itertools.count()

    # -- validation and protocol ---------------------------------------------------------------

    def check_targets(self, connections: dict[str, Connection]) -> list[str]:
        """Problems with the targets (unknown connections, itself); empty when all is well."""
        problems = []
        targets = list(self.config.targets)
        if self.config.on_context_length is not None:
            targets.append(self.config.on_context_length)
        for target in targets:
            if target.connection == self.name:
                problems.append(f"target {target.connection!r} is the strategy itself")
            elif target.connection not in connections:
                problems.append(
                    f"target {target.connection!r} is not a connection (defined: "
                    f"{', '.join(sorted(connections))})"
                )
        return problems

    @property
    def native_n(self) -> bool:
        return True  # each target is guarded and fans out n itself when it must

    async def list_models(self) -> list[JSONObject] | None:
        return None

    async def aclose(self) -> None:
        pass

    # -- ordering --------------------------------------------------------------------------------

    def order(self, connections: dict[str, Connection]) -> list[Target]:
        """This request's targets, best first; targets cooling down go last."""
        targets = list(self.config.targets)
        method = self.config.order
        if method == "weighted":
            # Weighted random order without replacement (Efraimidis-Spirakis keys).
            targets.sort(key=lambda t: -(self._rng.random() ** (1.0 / max(t.weight, 1e-9))))
        elif method == "round_robin":
            start = next(self._round_robin) % len(targets)
            targets = targets[start:] + targets[:start]
        elif method == "least_in_flight":
            self._rng.shuffle(targets)  # ties broken at random
            targets.sort(key=lambda t: self._state[id(t)].in_flight)
        elif method == "latency":
            targets = self._power_of_two(targets)
        if not self.config.fallback:
            targets = targets[:1]

        def cooling(target: Target) -> bool:
            cooldown = getattr(connections.get(target.connection), "cooldown", None)
            return cooldown is not None and cooldown.state == "open"

        return sorted(targets, key=cooling)

    def _power_of_two(self, targets: list[Target]) -> list[Target]:
        """Two targets at random; the one with the lower latency average goes first (an
        unmeasured target counts as fastest, so every target gets measured)."""
        if len(targets) < 2:
            return targets
        a, b = self._rng.sample(range(len(targets)), 2)

        def latency(i: int) -> float:
            value = self._state[id(targets[i])].latency
            return -1.0 if value is None else value

        first = a if latency(a) <= latency(b) else b
        rest = [t for i, t in enumerate(targets) if i != first]

        def measured(target: Target) -> float:
            value = self._state[id(target)].latency
            return math.inf if value is None else value

        rest.sort(key=measured)
        return [targets[first], *rest]

    # -- calls -----------------------------------------------------------------------------------

    async def chat(self, call: ChatCall) -> ChatResult:
        result = await self._race(call, stream=False)
        assert isinstance(result, ChatResult)
        return result

    async def open_chat_stream(self, call: ChatCall) -> ChatStream:
        result = await self._race(call, stream=True)
        assert isinstance(result, BufferedStream)
        return result

    # Embeddings and legacy completions race the same way (every target must serve them).
    async def embeddings(self, call: ChatCall) -> ChatResult:
        result = await self._race(call, stream=False, method="embeddings")
        assert isinstance(result, ChatResult)
        return result

    async def completions(self, call: ChatCall) -> ChatResult:
        result = await self._race(call, stream=False, method="completions")
        assert isinstance(result, ChatResult)
        return result

    async def open_completions_stream(self, call: ChatCall) -> ChatStream:
        result = await self._race(call, stream=True, method="open_completions_stream")
        assert isinstance(result, BufferedStream)
        return result

    def serves(self, method: str) -> bool:
        return True  # each target's guard answers 400 if its connection cannot

    def _sub_call(self, call: ChatCall, target: Target) -> ChatCall:
        sub = copy.copy(call)
        sub.body = {**call.body, **target.params}
        if target.model:
            sub.body["model"] = target.model
        sub.headers = dict(call.headers)
        sub.usage_requested_by_gateway = False
        return sub

    async def _attempt(
        self, call: ChatCall, target: Target, connection: Connection, stream: bool, method: str
    ) -> tuple[ChatCall, ChatResult | BufferedStream]:
        """One target, up to its first token. Raises what the target raised."""
        sub = self._sub_call(call, target)
        state = self._state.get(id(target))
        started = trio.current_time()
        if state is not None:
            state.in_flight += 1
        try:
            if not stream:
                result: ChatResult | BufferedStream = await getattr(connection, method)(sub)
            else:
                upstream = await getattr(connection, method)(sub)
                try:
                    head: list[JSONObject] = []
                    ended = False
                    while True:
                        batch = await upstream.receive()
                        if not batch:
                            ended = True
                            break
                        head.extend(batch)
                        if any(has_content(chunk) for chunk in batch):
                            break
                except BaseException:
                    await close_quietly(upstream)
                    raise
                result = BufferedStream(upstream, head, ended)
            if state is not None:
                elapsed = trio.current_time() - started
                state.latency = (
                    elapsed
                    if state.latency is None
                    else _EWMA_ALPHA * elapsed + (1 - _EWMA_ALPHA) * state.latency
                )
            return sub, result
        finally:
            if state is not None:
                state.in_flight -= 1

    async def _race(
        self, call: ChatCall, *, stream: bool, method: str | None = None
    ) -> ChatResult | BufferedStream:
        method = method or ("open_chat_stream" if stream else "chat")
        connections = dict(call.connections)
        queue = self.order(connections)
        hedge = self.config.hedge_after_seconds
        results_send, results_receive = trio.open_memory_channel[
            tuple[Target, ChatCall | None, Any]
        ](len(queue) + 2)
        winner: tuple[ChatCall, ChatResult | BufferedStream] | None = None
        last_error: GatewayError | None = None
        context_target = self.config.on_context_length
        leftovers: list[Any] = []

        limit = self.config.attempt_timeout_seconds

        async def run(target: Target) -> None:
            connection = connections[target.connection]
            try:
                with trio.fail_after(limit if limit is not None else math.inf):
                    sub, result = await self._attempt(call, target, connection, stream, method)
            except trio.TooSlowError:
                results_send.send_nowait(
                    (
                        target,
                        None,
                        UpstreamTimeout(
                            f"The connection {target.connection!r} gave no answer within "
                            f"{limit:g} s.",
                            connection=target.connection,
                        ),
                    )
                )
            except GatewayError as error:
                results_send.send_nowait((target, None, error))
            except Exception as exc:  # a user's connection object misbehaving
                results_send.send_nowait(
                    (target, None, InternalError("A connection failed.", detail=repr(exc)))
                )
            else:
                results_send.send_nowait((target, sub, result))

        async with trio.open_nursery() as nursery:
            running = 0

            def start_next() -> bool:
                nonlocal running
                if not queue:
                    return False
                nursery.start_soon(run, queue.pop(0))
                running += 1
                return True

            start_next()
            while running:
                deadline = trio.current_time() + hedge if hedge is not None and queue else math.inf
                with trio.move_on_at(deadline):
                    _target, sub, outcome = await results_receive.receive()
                    running -= 1
                    if sub is not None:
                        winner = (sub, outcome)
                        nursery.cancel_scope.cancel()
                        break
                    error = cast(GatewayError, outcome)
                    last_error = error
                    if context_target is not None and is_context_length(error):
                        # Too long for this one: only the larger-context target makes sense.
                        queue[:] = [context_target]
                        context_target = None
                        start_next()
                        continue
                    if failure_reason(error, self.config.fallback_on_status) is None:
                        nursery.cancel_scope.cancel()
                        break
                    start_next()
                    continue
                # No first token in time: hedge with the next target.
                start_next()
        # A second attempt may have succeeded in the same instant: release what it opened.
        results_send.close()
        async for _target, sub, outcome in results_receive:
            if sub is not None:
                leftovers.append(outcome)
        for extra in leftovers:
            if isinstance(extra, BufferedStream):
                await close_quietly(extra)
        if winner is None:
            if last_error is not None:
                raise last_error
            raise UpstreamError(  # pragma: no cover - there is always a first target
                f"The strategy {self.name!r} has no target to try.", connection=self.name
            )
        sub, result = winner
        call.usage_requested_by_gateway = sub.usage_requested_by_gateway
        return result
