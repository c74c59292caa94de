"""Local Hugging Face models (``api_type = "transformers"``), run without blocking the gateway.

lm-proxy ran ``model.generate`` on the event loop, so one generation froze the whole server.
Here the model is loaded once, at startup, in a worker thread (``lifetime()``), and every
generation runs in a worker thread too:

* **Concurrency**: at most ``max_concurrency`` generations run at once; up to ``max_queue``
  more requests wait for a slot (in arrival order); beyond that a request gets 503
  ``model_overloaded`` with ``Retry-After`` at once, instead of an unbounded queue.
* **Streaming**: a streamer object receives each step's tokens inside ``generate`` (in the
  worker thread), turns them into text deltas per choice and hands them to the request's task
  through a bounded trio channel (``trio.from_thread.run``), so a slow client slows generation
  down instead of growing a buffer. The role chunk goes out with the first token.
* **Cancellation**: a stopping criterion checks a flag before every step. The request's task
  sets it when it is cancelled (the client left, the deadline passed) or when every choice has
  finished; then it waits for the thread to return. So no thread keeps generating for nobody,
  and a freed slot really is free.

Parameters: ``max_tokens``/``max_completion_tokens`` (default ``max_new_tokens``),
``temperature`` (0: greedy), ``top_p``, ``stop`` (cut from the text, finish reason ``stop``),
``seed`` (exact only with ``max_concurrency = 1``: torch's generator is process-wide), ``n``
(``num_return_sequences``, every choice returned). Usage is counted with the tokenizer: the
prompt after the chat template, and each choice's generated tokens (an end-of-sequence token
included). Tools, images, ``response_format`` other than text and ``logprobs`` are refused with
400: a local model that silently ignored a JSON schema would be worse than an error.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import trio

from ..config.model import TransformersConnection
from ..errors import ConfigError, GatewayError, InternalError, NotSupported, UpstreamError
from ..wire.openai import wants_stream_usage
from .base import ChatCall, ChatResult, ChatStream, JSONObject

log = logging.getLogger("lm_gateway.local")

#: Request fields a local model cannot honour (answered with 400 when set to a real value).
_REFUSED = ("tools", "functions", "logprobs", "top_logprobs", "logit_bias", "audio", "prediction")
#: Chunks a stream may hold for a slow client before generation waits.
_STREAM_BUFFER = 64


class ModelUnavailable(UpstreamError):
    """The model could not be loaded (503)."""

    status = 503
    default_code = "model_unavailable"


def check_installed() -> None:
    """Raise ConfigError unless torch and transformers can be imported (no import happens)."""
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"api_type 'transformers' needs {' and '.join(missing)}: "
            "pip install 'lm-gateway[local]' (torch's CPU build: pip install torch)"
        )


class TransformersProvider:
    """See the module docstring."""

    native_n = True

    def __init__(self, config: TransformersConnection) -> None:
        check_installed()
        self.name = config.name
        self.config = config
        self._limiter = trio.CapacityLimiter(config.max_concurrency)
        self._waiting = 0
        self._load_lock = trio.Lock()
        self._model: Any = None
        self._tokenizer: Any = None
        self._device: Any = None
        self._load_error: str | None = None

    # -- loading ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifetime(self) -> AsyncIterator[None]:
        """Load the model before the server accepts requests (a failure stops the start)."""
        try:
            await self._ensure_loaded()
        except ModelUnavailable as exc:
            raise ConfigError(exc.detail or exc.message, f"connections.{self.name}") from exc
        try:
            yield
        finally:
            self._model = self._tokenizer = None

    async def _ensure_loaded(self) -> None:
        if self._model is not None:
            return
        async with self._load_lock:
            if self._model is None:
                try:
                    await trio.to_thread.run_sync(self._load)
                except Exception as exc:
                    self._load_error = f"{type(exc).__name__}: {exc}"
                    raise ModelUnavailable(
                        f"The local model of connection {self.name!r} could not be loaded.",
                        connection=self.name,
                        detail=f"loading {self.config.model!r} failed: {self._load_error}",
                    ) from exc

    def _load(self) -> None:
        """Load tokenizer and model (blocking; runs in a worker thread)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = self.config
        started = time.perf_counter()
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        where = Path(config.model).expanduser()
        looks_like_path = config.model.startswith((".", "/", "~")) or config.model.count("/") > 1
        if looks_like_path and not where.is_dir():
            raise FileNotFoundError(f"no model directory at {str(where)!r}")
        common = {"local_files_only": True, "trust_remote_code": config.trust_remote_code}
        tokenizer = AutoTokenizer.from_pretrained(config.model, **common)
        if config.chat_template:
            tokenizer.chat_template = config.chat_template
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "the tokenizer has no chat template; set chat_template in the connection"
            )
        kwargs: dict[str, Any] = {**common, **config.model_kwargs}
        if config.dtype != "auto":
            kwargs["dtype"] = getattr(torch, config.dtype)
        else:
            kwargs.setdefault("dtype", "auto")
        model: Any = AutoModelForCausalLM.from_pretrained(config.model, **kwargs)
        model.to(device)
        model.eval()
        self._tokenizer, self._model, self._device = tokenizer, model, device
        log.info(
            "connection %r: loaded %s on %s in %.1f s",
            self.name,
            config.model,
            device,
            time.perf_counter() - started,
        )

    # -- requests ---------------------------------------------------------------------------

    def _plan(self, call: ChatCall) -> _Plan:
        """Check the request and turn it into generation settings (on the event loop: cheap).

        Raises:
            NotSupported: a field this connection cannot honour.
        """
        body = call.body
        for field in _REFUSED:
            value = body.get(field)
            if value not in (None, False, [], {}):
                raise NotSupported(
                    f"The local model connection {self.name!r} does not support {field!r}.",
                    param=field,
                )
        choice = body.get("tool_choice")
        if choice not in (None, "none"):
            raise NotSupported(
                f"The local model connection {self.name!r} does not support tools.",
                param="tool_choice",
            )
        response_format = body.get("response_format")
        if isinstance(response_format, dict) and response_format.get("type") not in (None, "text"):
            raise NotSupported(
                f"The local model connection {self.name!r} does not support structured output.",
                param="response_format",
            )
        messages = []
        for i, message in enumerate(body.get("messages") or []):
            content = message.get("content")
            if isinstance(content, list):
                texts = []
                for j, part in enumerate(content):
                    if not isinstance(part, dict) or part.get("type") != "text":
                        raise NotSupported(
                            f"The local model connection {self.name!r} takes text only.",
                            param=f"messages[{i}].content[{j}]",
                        )
                    texts.append(str(part.get("text", "")))
                content = "".join(texts)
            if message.get("tool_calls") or message.get("role") in ("tool", "function"):
                raise NotSupported(
                    f"The local model connection {self.name!r} does not support tools.",
                    param=f"messages[{i}]",
                )
            role = "system" if message.get("role") == "developer" else message.get("role")
            messages.append({"role": role, "content": content if content is not None else ""})
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else [s for s in stop or [] if s]
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        temperature = body.get("temperature")
        return _Plan(
            messages=messages,
            n=body.get("n") or 1,
            max_new_tokens=max_tokens or self.config.max_new_tokens,
            temperature=1.0 if temperature is None else float(temperature),
            top_p=body.get("top_p"),
            seed=body.get("seed"),
            stops=stops,
            model=str(body.get("model", "")),
        )

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """A generation slot, waiting in line for one; 503 at once when the line is full."""
        await self._ensure_loaded()
        self._check_queue()
        self._waiting += 1
        try:
            await self._limiter.acquire()
        finally:
            self._waiting -= 1
        try:
            yield
        finally:
            self._limiter.release()

    def _check_queue(self) -> None:
        if self._limiter.available_tokens == 0 and self._waiting >= self.config.max_queue:
            raise UpstreamError(
                f"The local model of connection {self.name!r} is busy: "
                f"{self.config.max_concurrency} generating, {self._waiting} waiting.",
                status=503,
                code="model_overloaded",
                headers={"retry-after": "1"},
                connection=self.name,
            )

    async def _generate(self, job: _Generation) -> None:
        """Run ``job`` in a worker thread; if this task is cancelled, stop the generation and
        wait for the thread to return (it stops before its next token)."""
        async with trio.open_nursery() as nursery:

            async def stop_when_cancelled() -> None:
                try:
                    await trio.sleep_forever()
                finally:
                    job.cancel.set()

            nursery.start_soon(stop_when_cancelled)
            try:
                await trio.to_thread.run_sync(job.run)
            finally:
                nursery.cancel_scope.cancel()

    async def chat(self, call: ChatCall) -> ChatResult:
        plan = self._plan(call)
        async with self._slot():
            job = _Generation(self, plan, emit=None)
            with trio.move_on_at(call.deadline) as scope:
                await self._generate(job)
            if scope.cancelled_caught:
                raise self._timeout()
        if job.error is not None:
            raise job.error
        return ChatResult(body=job.completion())

    async def open_chat_stream(self, call: ChatCall) -> ChatStream:
        plan = self._plan(call)
        # Refusals (not loaded, queue full) before the stream starts: a real HTTP status.
        await self._ensure_loaded()
        self._check_queue()
        call.usage_requested_by_gateway = not wants_stream_usage(call.body)
        stream = LocalStream(self, plan)

        async def produce(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
            with trio.CancelScope(deadline=call.deadline) as scope:
                task_status.started(scope)
                try:
                    async with self._slot():
                        job = _Generation(self, plan, emit=stream.emit_from_thread)
                        stream.job = job
                        await self._generate(job)
                except GatewayError as error:
                    await stream.fail(error)
                    return
                if job.error is not None:
                    await stream.fail(job.error)
                    return
                await stream.finish(job)
            if scope.cancelled_caught and not stream.closed:
                await stream.fail(self._timeout())

        stream.scope = await call.nursery.start(produce)
        return stream

    def _timeout(self) -> UpstreamError:
        return UpstreamError(
            f"The local model of connection {self.name!r} did not finish in time.",
            status=504,
            code="upstream_timeout",
            connection=self.name,
        )

    async def list_models(self) -> list[JSONObject] | None:
        return [{"id": self.config.model, "object": "model", "created": 0, "owned_by": self.name}]

    async def aclose(self) -> None:
        pass


class _Plan:
    """Generation settings for one request."""

    def __init__(
        self,
        *,
        messages: list[dict[str, Any]],
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float | None,
        seed: int | None,
        stops: list[str],
        model: str,
    ) -> None:
        self.messages = messages
        self.n = n
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.stops = stops
        self.model = model


class _Choice:
    """One sequence being generated: its tokens, its text so far, and how it ended.

    Text is decoded incrementally (a few tokens at a time, so a long answer costs linear time)
    and held back while it ends in an incomplete character or could be the start of a stop
    string.
    """

    def __init__(self, index: int) -> None:
        self.index = index
        self.ids: list[int] = []
        self.tokens = 0
        self.text = ""
        self.sent = 0
        self.finish: str | None = None
        #: Whether the chunk with the finish reason went out (streams).
        self.finish_sent = False
        self._prefix = 0
        self._read = 0

    def add(self, token: int, tokenizer: Any) -> None:
        self.ids.append(token)
        prefix = tokenizer.decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        full = tokenizer.decode(self.ids[self._prefix :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self._prefix, self._read = self._read, len(self.ids)

    def flush(self, tokenizer: Any) -> None:
        """The choice has ended: take in what was held back as an incomplete character."""
        prefix = tokenizer.decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        full = tokenizer.decode(self.ids[self._prefix :], skip_special_tokens=True)
        self.text += full[len(prefix) :]
        self._prefix = self._read = len(self.ids)

    def delta(self, stops: list[str]) -> str:
        """Text ready to send: cut at a stop string (which finishes the choice), and keep back
        what may be the start of one, unless the choice has finished."""
        end = len(self.text)
        for stop in stops:
            at = self.text.find(stop, max(0, self.sent - len(stop)))
            if at != -1 and at < end:
                end = at
                self.finish = "stop"
        if end < len(self.text):
            self.text = self.text[:end]
        elif self.finish is None:
            for stop in stops:
                for size in range(min(len(stop) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(stop[:size]):
                        end = min(end, len(self.text) - size)
                        break
        piece = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece


class _Generation:
    """One ``generate`` call, run in a worker thread; it is its own streamer.

    ``emit`` (streams only) is called from the worker thread with ``[(index, text, finish)]``
    after each step that produced something; it blocks while the client is behind and raises
    when the stream is gone (which stops the generation).
    """

    def __init__(
        self,
        provider: TransformersProvider,
        plan: _Plan,
        emit: Callable[[list[tuple[int, str, str | None]]], None] | None,
    ) -> None:
        self.provider = provider
        self.plan = plan
        self.emit = emit
        self.cancel = threading.Event()
        self.choices = [_Choice(i) for i in range(plan.n)]
        self.prompt_tokens = 0
        self.error: GatewayError | None = None
        self.steps = 0
        self._eos: set[int] = set()
        self._prompt_seen = False

    # The streamer protocol ``generate`` calls (in this thread).
    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True  # the first call carries the prompt
            return
        self.steps += 1
        tokenizer = self.provider._tokenizer
        out: list[tuple[int, str, str | None]] = []
        tokens = value.reshape(-1).tolist()
        if len(tokens) == 1 < len(self.choices):  # greedy n > 1: one sequence, n copies
            tokens = tokens * len(self.choices)
        for choice, token in zip(self.choices, tokens, strict=False):
            if choice.finish is not None:
                continue
            choice.tokens += 1
            if token in self._eos:
                choice.finish = "stop"
            else:
                choice.add(token, tokenizer)
                if choice.tokens >= self.plan.max_new_tokens:
                    choice.finish = "length"
            if choice.finish is not None:
                choice.flush(tokenizer)
            piece = choice.delta(self.plan.stops)
            if piece or choice.finish:
                out.append((choice.index, piece, choice.finish))
                choice.finish_sent = choice.finish is not None
        if all(c.finish is not None for c in self.choices):
            self.cancel.set()  # stop strings end a choice before the model does
        if out and self.emit is not None:
            try:
                self.emit(out)
            except BaseException:  # the stream is gone (or the task cancelled): stop here
                self.cancel.set()

    def end(self) -> None:
        pass

    def run(self) -> None:
        """Tokenise, generate, and leave the result in the choices (worker thread)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        job = self

        class Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full(
                    (input_ids.shape[0],), job.cancel.is_set(), dtype=torch.bool,
                    device=input_ids.device,
                )  # fmt: skip

        provider, plan = self.provider, self.plan
        tokenizer, model = provider._tokenizer, provider._model
        try:
            encoded = tokenizer.apply_chat_template(
                plan.messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            encoded = {k: v.to(provider._device) for k, v in encoded.items()}
            self.prompt_tokens = int(encoded["input_ids"].shape[1])
            eos = model.generation_config.eos_token_id
            if eos is None:
                eos = tokenizer.eos_token_id
            self._eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
            sampling = plan.temperature > 0
            settings: dict[str, Any] = {
                "max_new_tokens": plan.max_new_tokens,
                "do_sample": sampling,
                # Greedy decoding gives n identical sequences: generate one, copy it (put()).
                "num_return_sequences": plan.n if sampling else 1,
                "pad_token_id": tokenizer.pad_token_id
                if tokenizer.pad_token_id is not None
                else next(iter(self._eos), 0),
                "stopping_criteria": StoppingCriteriaList([Stop()]),
                "streamer": self,
            }
            if sampling:
                settings["temperature"] = plan.temperature
                if plan.top_p is not None:
                    settings["top_p"] = plan.top_p
            else:  # greedy: no sampling settings (the model's defaults would warn)
                settings.update(temperature=None, top_p=None, top_k=None)
            if plan.seed is not None:
                torch.manual_seed(plan.seed)
            with torch.inference_mode():
                model.generate(**encoded, **settings)
        except Exception as exc:
            log.exception("connection %r: generation failed", provider.name)
            self.error = InternalError(
                f"The local model of connection {provider.name!r} failed.",
                detail=f"{type(exc).__name__}: {exc}",
            )
            return
        left: list[tuple[int, str, str | None]] = []
        for choice in self.choices:
            if choice.finish is None:
                # Generation ended without a decision for this choice: the model's own length
                # limit (or a cancellation, after which nothing is sent anyway).
                choice.finish = "length"
                choice.flush(tokenizer)
            rest = choice.delta(plan.stops)
            if not choice.finish_sent:
                left.append((choice.index, rest, choice.finish))
                choice.finish_sent = True
        if left and self.emit is not None and not self.cancel.is_set():
            with contextlib.suppress(BaseException):
                self.emit(left)

    def usage(self) -> JSONObject:
        completion = sum(c.tokens for c in self.choices)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def completion(self) -> JSONObject:
        return {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.plan.model,
            "choices": [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": c.finish,
                }
                for c in self.choices
            ],
            "usage": self.usage(),
        }


class LocalStream:
    """Chunks of a local generation, produced by a task in the request's nursery."""

    def __init__(self, provider: TransformersProvider, plan: _Plan) -> None:
        self.provider = provider
        self.scope: trio.CancelScope | None = None
        self.job: _Generation | None = None
        self.closed = False
        self._send, self._receive = trio.open_memory_channel[
            list[JSONObject] | GatewayError | None
        ](_STREAM_BUFFER)
        self._base = {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": plan.model,
        }
        self._n = plan.n
        # The role chunks go out with the first token, as upstream providers do: the answer's
        # headers (and the time-to-first-token metric) then mean "the model has started".
        self._role_sent = False

    def _roles(self) -> list[JSONObject]:
        if self._role_sent:
            return []
        self._role_sent = True
        return [self._chunk(i, {"role": "assistant", "content": ""}) for i in range(self._n)]

    def _chunk(self, index: int, delta: JSONObject, finish: str | None = None) -> JSONObject:
        return {
            **self._base,
            "choices": [
                {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            ],
        }

    def emit_from_thread(self, pieces: list[tuple[int, str, str | None]]) -> None:
        """Called in the worker thread: send chunks, waiting while the client is behind."""
        batch = self._roles()
        for index, text, finish in pieces:
            if text:
                batch.append(self._chunk(index, {"content": text}))
            if finish:
                batch.append(self._chunk(index, {}, finish))
        trio.from_thread.run(self._send.send, batch)

    async def finish(self, job: _Generation) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._send.send(
                [*self._roles(), {**self._base, "choices": [], "usage": job.usage()}]
            )
            await self._send.send(None)

    async def fail(self, error: GatewayError) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._send.send(error)

    async def receive(self) -> list[JSONObject]:
        try:
            item = await self._receive.receive()
        except trio.EndOfChannel as exc:  # pragma: no cover - the producer always ends it
            raise InternalError("The local generation ended without a result.") from exc
        if item is None:
            return []
        if isinstance(item, GatewayError):
            raise item
        return item

    async def aclose(self) -> None:
        """Stop the generation (the producer task sets the stop flag when cancelled)."""
        self.closed = True
        if self.job is not None:
            self.job.cancel.set()
        if self.scope is not None:
            self.scope.cancel()
        self._receive.close()
