"""The built-in echo connection: answers with the last user message, streamed word by word.

It needs no keys and no network, so the gateway runs out of the box (the embedded default config
uses it), and demos and tests have a deterministic model. It honours ``n`` and
``stream_options.include_usage``; token counts are whitespace-separated words.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

import trio

from ..config.model import EchoConnection
from ..wire.openai import message_text, wants_stream_usage
from .base import ChatCall, ChatResult, ChatStream, JSONObject

_WORDS = re.compile(r"\S+\s*|\s+")


def _answer(body: JSONObject) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return message_text(message)
    return ""


def _usage(body: JSONObject, answer: str, n: int) -> JSONObject:
    prompt = sum(
        len(message_text(m).split()) for m in body.get("messages") or [] if isinstance(m, dict)
    )
    completion = len(answer.split()) * n
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


class EchoProvider:
    """See the module docstring."""

    def __init__(self, config: EchoConnection) -> None:
        self.name = config.name
        self.config = config

    async def chat(self, call: ChatCall) -> ChatResult:
        await trio.lowlevel.checkpoint()
        body = call.body
        answer = _answer(body)
        n = body.get("n") or 1
        return ChatResult(
            body={
                "id": f"chatcmpl-echo-{secrets.token_hex(12)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", ""),
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": answer, "refusal": None},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                    for i in range(n)
                ],
                "usage": _usage(body, answer, n),
            }
        )

    async def open_chat_stream(self, call: ChatCall) -> ChatStream:
        await trio.lowlevel.checkpoint()
        # The usage chunk is always produced (for accounting); the relay drops it again when
        # the client did not ask for it.
        call.usage_requested_by_gateway = not wants_stream_usage(call.body)
        return EchoStream(call.body, self.config.chunk_delay_seconds)

    async def list_models(self) -> list[JSONObject] | None:
        return None  # echo serves any name; there is no list to expand wildcards from

    async def aclose(self) -> None:
        pass


class EchoStream:
    """The echo answer as OpenAI chunks: role, one chunk per word, finish, usage."""

    def __init__(self, body: JSONObject, delay: float) -> None:
        self._delay = delay
        answer = _answer(body)
        n = body.get("n") or 1
        base: dict[str, Any] = {
            "id": f"chatcmpl-echo-{secrets.token_hex(12)}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model", ""),
        }

        def chunk(index: int, delta: JSONObject, finish: str | None = None) -> JSONObject:
            return {
                **base,
                "choices": [
                    {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }

        # Each entry is one batch, delivered by one receive(); the delay goes between batches.
        self._batches: list[list[JSONObject]] = [
            [chunk(i, {"role": "assistant", "content": ""}) for i in range(n)]
        ]
        for word in _WORDS.findall(answer):
            self._batches.append([chunk(i, {"content": word}) for i in range(n)])
        self._batches.append([chunk(i, {}, "stop") for i in range(n)])
        self._batches.append([{**base, "choices": [], "usage": _usage(body, answer, n)}])
        self._position = 0

    async def receive(self) -> list[JSONObject]:
        if self._position >= len(self._batches):
            await trio.lowlevel.checkpoint()
            return []
        if self._position and self._delay:
            await trio.sleep(self._delay)
        else:
            await trio.lowlevel.checkpoint()
        batch = self._batches[self._position]
        self._position += 1
        return batch

    async def aclose(self) -> None:
        self._position = len(self._batches)
