"""Model-name routing: glob rules, first match in file order.

Pure logic, no I/O. A rule ``"gpt-4*" = "openai.*"`` sends any model name matching ``gpt-4*``
(``fnmatch`` syntax, case-sensitive: ``*``, ``?``, ``[seq]``, ``[!seq]``) to connection
``openai`` with the client's name passed through; ``"fast" = "groq.llama-3.1-8b-instant"``
rewrites the name. Rules are tried in file order and the first match wins, exactly as in
lm-proxy; :meth:`Router.shadowed` finds rules an earlier rule makes unreachable.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

import attrs

from .config.model import RouteRule
from .errors import ModelNotFound

_GLOB_CHARS = frozenset("*?[")
#: Bound on memoised resolutions; model names repeat, so a small table removes the regex work.
_CACHE_LIMIT = 4096


def is_pattern(text: str) -> bool:
    """Whether ``text`` contains glob syntax (``*``, ``?`` or ``[``)."""
    return not _GLOB_CHARS.isdisjoint(text)


@attrs.frozen
class Route:
    """Where a model name goes: the rule that matched, its connection and the upstream name."""

    rule: RouteRule
    client_model: str
    upstream_model: str

    @property
    def connection(self) -> str:
        return self.rule.connection


class Router:
    """Resolves model names to routes.

    Construction compiles every pattern once; :meth:`resolve` is a dict hit for names seen before.
    """

    def __init__(self, rules: Sequence[RouteRule]) -> None:
        self.rules: tuple[RouteRule, ...] = tuple(rules)
        self._matchers = [
            (
                rule,
                None
                if not is_pattern(rule.pattern)
                else re.compile(fnmatch.translate(rule.pattern)),
            )
            for rule in self.rules
        ]
        self._cache: dict[str, Route | None] = {}

    def match(self, model: str) -> Route | None:
        """The route for ``model``, or None when no rule matches. Never raises."""
        try:
            return self._cache[model]
        except KeyError:
            pass
        route = None
        for rule, regex in self._matchers:
            if (model == rule.pattern) if regex is None else (regex.match(model) is not None):
                route = Route(
                    rule=rule,
                    client_model=model,
                    upstream_model=model if rule.model is None else rule.model,
                )
                break
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[model] = route
        return route

    def resolve(self, model: str) -> Route:
        """The route for ``model``.

        Raises:
            ModelNotFound: no rule matches (the only exception this method raises).
        """
        route = self.match(model)
        if route is None:
            raise ModelNotFound(
                f"The model {model!r} does not exist or is not served by this gateway.",
                param="model",
            )
        return route

    def shadowed(self) -> list[tuple[RouteRule, RouteRule]]:
        """Rules that can never match because an earlier rule catches every name they would.

        Returns:
            ``(shadowed_rule, earlier_rule)`` pairs. The check is sound (every pair reported is
            truly unreachable) but not complete for patterns using ``?`` or ``[...]``.
        """
        found: list[tuple[RouteRule, RouteRule]] = []
        for i, later in enumerate(self.rules):
            for earlier in self.rules[:i]:
                if covers(earlier.pattern, later.pattern):
                    found.append((later, earlier))
                    break
        return found


def covers(earlier: str, later: str) -> bool:
    """Whether every name matching glob ``later`` also matches glob ``earlier`` (sufficient test).

    If ``later`` is a plain name, this is exact. If ``earlier`` uses only literal characters and
    ``*``, and ``later`` only literals, ``*`` and ``?``, matching ``later``'s text against
    ``earlier`` is sound: ``earlier``'s literals can only align with ``later``'s literals (they
    are never ``*`` or ``?``), and its ``*`` can absorb whatever ``later``'s wildcards expand
    to. A ``[...]`` class in ``later`` breaks that (its ``]`` or ``!`` could align with
    ``earlier``'s literals), so then only identical patterns or an all-``*`` ``earlier`` count.
    """
    if not is_pattern(later):
        return fnmatch.fnmatchcase(later, earlier)
    if earlier and set(earlier) == {"*"}:
        return True
    if "?" in earlier or "[" in earlier or "[" in later:
        return earlier == later
    return fnmatch.fnmatchcase(later, earlier)


def allowed_model(patterns: Sequence[str] | None, model: str) -> bool:
    """Whether ``model`` matches one of a group's ``allowed_models`` globs (None allows all)."""
    if patterns is None:
        return True
    return any(fnmatch.fnmatchcase(model, p) for p in patterns)
