"""A Python config: the same tables as TOML, plus live objects such as your own model function.

    lm-gateway --config examples/python_config.py

A connection can be any async function following lm-proxy's convention:
``await fn(messages, **params)`` returns the answer (for streams it also receives
``stream=True`` and ``callback``, awaited with each piece of text).
"""

from typing import Any


async def shouting_model(messages: list[dict[str, Any]], **params: Any) -> str:
    """A toy model: the last message, upper-cased; streamed word by word when asked."""
    text = str(messages[-1].get("content", "")).upper()
    callback = params.get("callback")
    if callback is not None:
        for word in text.split():
            await callback(word + " ")
    return text


config = {
    "host": "127.0.0.1",
    "port": 8000,
    "connections": {
        "shout": shouting_model,
        "echo": {"api_type": "echo"},
    },
    "routing": {"loud*": "shout.*", "*": "echo.*"},
    "groups": {"default": {"api_keys": ["env:DEMO_KEY"]}},
}
