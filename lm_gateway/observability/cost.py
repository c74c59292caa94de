"""What a request cost: a price table per model, applied to the normalised usage.

Prices are US dollars per million tokens: ``input``, ``output``, ``cached_input`` (cache reads;
defaults to ``input``) and ``cache_write`` (Anthropic's cache creation; defaults to ``input``).
Usage is OpenAI-shaped, as every connection reports it (``prompt_tokens`` *includes* cached
tokens), so::

    cost = (prompt - cached - cache_write) * input + cached * cached_input
           + cache_write * cache_write_price + completion * output

(reasoning tokens are part of ``completion_tokens``). The same usage costs the same, streamed
or not.

The shipped table covers common OpenAI, Anthropic and Gemini models at list prices as of
2026-11; providers change prices, so override them in the config (``prices`` at the top level
or per connection; see :class:`PriceTable` for which wins). Model names match exactly first,
then by the longest matching glob (``claude-sonnet-4*`` covers dated names).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

import attrs


@attrs.frozen
class Price:
    """Dollars per million tokens."""

    input: float
    output: float
    cached_input: float | None = None
    cache_write: float | None = None

    def cost(self, usage: Mapping[str, Any]) -> float:
        """The cost of one request's usage."""
        prompt = _int(usage.get("prompt_tokens"))
        completion = _int(usage.get("completion_tokens"))
        details = usage.get("prompt_tokens_details")
        cached = _int(details.get("cached_tokens")) if isinstance(details, Mapping) else 0
        written = _int(details.get("cache_write_tokens")) if isinstance(details, Mapping) else 0
        uncached = max(0, prompt - cached - written)
        total = (
            uncached * self.input
            + cached * (self.cached_input if self.cached_input is not None else self.input)
            + written * (self.cache_write if self.cache_write is not None else self.input)
            + completion * self.output
        )
        return round(total / 1_000_000, 10)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


#: List prices (USD per million tokens), 2026-11. Verify against your contracts; override in
#: the config.
DEFAULT_PRICES: dict[str, Price] = {
    # OpenAI
    "gpt-5*": Price(1.25, 10.0, 0.125),
    "gpt-5-mini*": Price(0.25, 2.0, 0.025),
    "gpt-5-nano*": Price(0.05, 0.40, 0.005),
    "gpt-4.1*": Price(2.0, 8.0, 0.50),
    "gpt-4.1-mini*": Price(0.40, 1.60, 0.10),
    "gpt-4.1-nano*": Price(0.10, 0.40, 0.025),
    "gpt-4o*": Price(2.50, 10.0, 1.25),
    "gpt-4o-mini*": Price(0.15, 0.60, 0.075),
    "o3*": Price(2.0, 8.0, 0.50),
    "o3-mini*": Price(1.10, 4.40, 0.55),
    "o4-mini*": Price(1.10, 4.40, 0.275),
    "text-embedding-3-small": Price(0.02, 0.0),
    "text-embedding-3-large": Price(0.13, 0.0),
    # Anthropic (cache reads 0.1x input, 5-minute cache writes 1.25x input)
    "claude-opus-4*": Price(15.0, 75.0, 1.50, 18.75),
    "claude-opus-4-5*": Price(5.0, 25.0, 0.50, 6.25),
    "claude-sonnet-4*": Price(3.0, 15.0, 0.30, 3.75),
    "claude-3-7-sonnet*": Price(3.0, 15.0, 0.30, 3.75),
    "claude-3-5-sonnet*": Price(3.0, 15.0, 0.30, 3.75),
    "claude-haiku-4*": Price(1.0, 5.0, 0.10, 1.25),
    "claude-3-5-haiku*": Price(0.80, 4.0, 0.08, 1.0),
    # Google Gemini (prompts up to 200k tokens)
    "gemini-2.5-pro*": Price(1.25, 10.0, 0.31),
    "gemini-2.5-flash*": Price(0.30, 2.50, 0.075),
    "gemini-2.5-flash-lite*": Price(0.10, 0.40, 0.025),
    "gemini-2.0-flash*": Price(0.10, 0.40, 0.025),
    "gemini-3-pro*": Price(2.0, 12.0, 0.20),
}


class PriceTable:
    """Looks up the price of a model in layers: the last table given first (a connection's
    ``prices``), then the earlier ones (the global ``prices``, then the shipped list). Within
    a layer an exact name wins over a glob and a longer glob over a shorter one."""

    def __init__(self, *tables: Mapping[str, Price]) -> None:
        self._layers = [
            (
                {k: v for k, v in table.items() if not _is_glob(k)},
                sorted(
                    ((k, v) for k, v in table.items() if _is_glob(k)), key=lambda kv: -len(kv[0])
                ),
            )
            for table in reversed(tables)
        ]
        self._cache: dict[str, Price | None] = {}

    def price(self, model: str | None) -> Price | None:
        if not model:
            return None
        if model in self._cache:
            return self._cache[model]
        name = model.rsplit("/", 1)[-1]  # "models/gemini-..." , "openai/gpt-4o"
        found = None
        for exact, globs in self._layers:
            found = exact.get(model) or exact.get(name)
            if found is None:
                for pattern, price in globs:
                    if fnmatch.fnmatchcase(model, pattern) or fnmatch.fnmatchcase(name, pattern):
                        found = price
                        break
            if found is not None:
                break
        if len(self._cache) < 4096:
            self._cache[model] = found
        return found

    def cost(self, model: str | None, usage: Mapping[str, Any] | None) -> float | None:
        """The cost of ``usage`` on ``model``, or None when the model has no price or there is
        no usage."""
        if not isinstance(usage, Mapping):
            return None
        price = self.price(model)
        return price.cost(usage) if price is not None else None


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")
