"""Unit and property tests of model-name routing: glob rules, first match in file order."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lm_gateway.config import build_config
from lm_gateway.config.model import RouteRule
from lm_gateway.errors import ModelNotFound
from lm_gateway.routing import Route, Router, allowed_model, covers, is_pattern


def rules(*pairs: tuple[str, str]) -> list[RouteRule]:
    """``("gpt*", "openai.*")`` pairs -> rules, as the config would build them."""
    out = []
    for index, (pattern, target) in enumerate(pairs):
        connection, _, model = target.partition(".")
        out.append(
            RouteRule(
                pattern=pattern,
                connection=connection,
                model=None if model == "*" else model,
                index=index,
            )
        )
    return out


def brute_force(rule_list: Sequence[RouteRule], model: str) -> RouteRule | None:
    for rule in rule_list:
        if fnmatch.fnmatchcase(model, rule.pattern):
            return rule
    return None


# --------------------------------------------------------------------------------------------
# Examples


def test_first_match_in_file_order_wins() -> None:
    router = Router(
        rules(
            ("gpt-4o", "openai.gpt-4o-2024-08-06"),
            ("gpt*", "openai.*"),
            ("claude-?-*", "anthropic.*"),
            ("[lm]istral*", "mistral.*"),
            ("*", "local.llama3"),
        )
    )
    assert router.resolve("gpt-4o").upstream_model == "gpt-4o-2024-08-06"
    assert router.resolve("gpt-4o-mini").upstream_model == "gpt-4o-mini"
    assert router.resolve("gpt-4o-mini").connection == "openai"
    assert router.resolve("claude-3-opus").connection == "anthropic"
    assert router.resolve("mistral-large").connection == "mistral"
    assert router.resolve("listral").connection == "mistral"
    fallback = router.resolve("whatever")
    assert (fallback.connection, fallback.upstream_model, fallback.client_model) == (
        "local",
        "llama3",
        "whatever",
    )
    assert fallback.rule.index == 4


def test_matching_is_case_sensitive_and_whole_name() -> None:
    router = Router(rules(("gpt*", "openai.*"), ("o3", "openai.o3")))
    assert router.match("GPT-4") is None
    assert router.match("my-gpt-4") is None
    assert router.match("o3-mini") is None
    assert router.match("o3") is not None


def test_no_match_raises_model_not_found_naming_the_model() -> None:
    router = Router(rules(("gpt*", "openai.*")))
    with pytest.raises(ModelNotFound) as info:
        router.resolve("claude-3")
    assert info.value.param == "model"
    assert info.value.code == "model_not_found"
    assert info.value.http_status == 404
    assert "claude-3" in info.value.message
    assert Router([]).match("anything") is None


def test_wildcards_match_newlines_and_empty_names() -> None:
    router = Router(rules(("a*", "c.*"), ("*", "d.*")))
    assert router.resolve("a\nb").connection == "c"
    assert router.resolve("").connection == "d"


def test_brackets_and_question_mark() -> None:
    router = Router(rules(("gpt-[34]?", "c.*"), ("x[!0-9]", "d.*"), ("[", "e.*")))
    assert router.resolve("gpt-4o").connection == "c"
    assert router.match("gpt-5o") is None
    assert router.resolve("xa").connection == "d"
    assert router.match("x1") is None
    # An unclosed bracket is a literal, as in fnmatch.
    assert router.resolve("[").connection == "e"


def test_router_from_a_config() -> None:
    config = build_config(
        {
            "connections": {"openai": {}, "groq": {"api_type": "groq"}},
            "routing": {"fast": "groq.llama-3.1-8b-instant", "*": "openai.*"},
            "api_key_check": "AllowAll",
        },
        environ={},
    )
    router = Router(config.routing)
    assert router.resolve("fast").upstream_model == "llama-3.1-8b-instant"
    assert router.resolve("fast").connection == "groq"
    assert router.resolve("gpt-4.1").upstream_model == "gpt-4.1"


def test_route_is_a_value() -> None:
    router = Router(rules(("*", "c.*")))
    assert router.resolve("m") == Route(rule=router.rules[0], client_model="m", upstream_model="m")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gpt-4o", False),
        ("gpt*", True),
        ("gpt-?", True),
        ("gpt-[4]", True),
        ("a]b", False),
        ("!x", False),
        ("", False),
        ("a.b-c_d:e/f", False),
    ],
)
def test_is_pattern(text: str, expected: bool) -> None:
    assert is_pattern(text) is expected


def test_allowed_model() -> None:
    assert allowed_model(None, "anything")
    assert not allowed_model([], "anything")
    assert allowed_model(["gpt-4o*", "o3"], "gpt-4o-mini")
    assert allowed_model(["gpt-4o*", "o3"], "o3")
    assert not allowed_model(["gpt-4o*", "o3"], "o3-mini")
    assert not allowed_model(["gpt*"], "GPT-4")


# --------------------------------------------------------------------------------------------
# shadowed()


def test_shadowed_reports_a_literal_after_star() -> None:
    router = Router(rules(("*", "a.*"), ("my-gpt", "b.x")))
    assert router.shadowed() == [(router.rules[1], router.rules[0])]


def test_shadowed_reports_narrower_glob_after_wider() -> None:
    router = Router(rules(("gpt*", "a.*"), ("gpt-4*", "b.*")))
    assert router.shadowed() == [(router.rules[1], router.rules[0])]


def test_shadowed_does_not_report_wider_after_narrower() -> None:
    router = Router(rules(("gpt-4*", "a.*"), ("gpt*", "b.*"), ("*", "c.*")))
    assert router.shadowed() == []


def test_shadowed_reports_each_rule_once_with_its_first_cover() -> None:
    router = Router(rules(("gpt*", "a.*"), ("*", "b.*"), ("gpt-4", "c.x"), ("x?", "d.*")))
    assert router.shadowed() == [
        (router.rules[2], router.rules[0]),
        (router.rules[3], router.rules[1]),
    ]


def test_shadowed_reports_duplicates() -> None:
    router = Router(rules(("gpt-?", "a.*"), ("gpt-?", "b.*"), ("o3", "c.*"), ("o3", "d.*")))
    assert router.shadowed() == [
        (router.rules[1], router.rules[0]),
        (router.rules[3], router.rules[2]),
    ]


def test_shadowed_does_not_report_a_reachable_bracket_rule() -> None:
    router = Router(rules(("*4*", "a.*"), ("gpt-[34]", "b.*")))
    assert router.resolve("gpt-3").connection == "b"  # so the second rule is reachable
    assert router.shadowed() == []


@pytest.mark.parametrize(
    ("earlier", "later", "expected"),
    [
        ("*", "anything", True),
        ("*", "gpt-[45]*", True),
        ("gpt*", "gpt-4*", True),
        ("gpt-4*", "gpt*", False),
        ("gpt*", "gpt-4o", True),
        ("gpt?", "gpt4", True),
        ("gpt?", "gpt?", True),
        ("gpt?", "gpt*", False),
        ("*-mini", "gpt-*-mini", True),
        ("*-mini", "gpt-*", False),
        ("a*b", "a?b", True),
        # Sound but incomplete: "[...]" in the earlier rule is only compared for equality.
        ("gpt-[45]*", "gpt-4o", True),
    ],
)
def test_covers_examples(earlier: str, later: str, expected: bool) -> None:
    assert covers(earlier, later) is expected


@pytest.mark.parametrize(
    ("earlier", "later"),
    [
        ("*4*", "gpt-[34]"),  # "gpt-3" does not contain "4"
        ("*]", "[ab]"),  # "a" does not end with "]"
        ("*!*", "x[!a]"),  # "xb" contains no "!"
    ],
)
def test_covers_is_not_fooled_by_bracket_text(earlier: str, later: str) -> None:
    # The text of a "[...]" class is not what it matches: a rule written after "*4*" as
    # "gpt-[34]" still serves "gpt-3", so it must not be reported as unreachable.
    assert not covers(earlier, later)


# --------------------------------------------------------------------------------------------
# Properties

#: Pattern building blocks; "[ab]"-style classes stay whole so that names can be generated to
#: match a pattern by instantiating each token.
_TOKENS = ["a", "b", "c", "-", "*", "?", "[ab]", "[!a]", "[b-c]"]
_NAME_ALPHABET = "abc-"


def _instantiate(token: str) -> st.SearchStrategy[str]:
    if token == "*":
        return st.text(alphabet=_NAME_ALPHABET, max_size=3)
    if token == "?":
        return st.sampled_from(_NAME_ALPHABET)
    if token == "[ab]":
        return st.sampled_from("ab")
    if token == "[!a]":
        return st.sampled_from("bc-")
    if token == "[b-c]":
        return st.sampled_from("bc")
    return st.just(token)


_TOKEN_LISTS = st.lists(st.sampled_from(_TOKENS), max_size=5)
_NAMES = st.text(alphabet=_NAME_ALPHABET, max_size=6)


@st.composite
def pattern_and_instance(draw: st.DrawFn) -> tuple[str, str]:
    tokens = draw(_TOKEN_LISTS)
    instance = "".join(draw(_instantiate(t)) for t in tokens)
    return "".join(tokens), instance


#: Earlier patterns: covers() only reasons about those made of literals and "*" (for others it
#: checks equality), so they are generated more often; "]" and "!" are literals there.
_EARLIER_TOKEN_LISTS = st.lists(st.sampled_from(["a", "b", "c", "-", "]", "!", "*"]), max_size=5)


@st.composite
def earlier_like(draw: st.DrawFn, later: str) -> str:
    """A literals-and-stars pattern made from ``later``'s text, so that covers() is often true."""
    out = []
    for char in later:
        choice = draw(st.sampled_from(["keep", "star", "drop"]))
        if char in "?[" or choice == "star":
            out.append("*")
        elif choice == "keep":
            out.append(char)
    return "".join(out)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), later_tokens=_TOKEN_LISTS)
def test_covers_is_sound(data: st.DataObject, later_tokens: list[str]) -> None:
    later = "".join(later_tokens)
    earlier = data.draw(
        st.one_of(
            earlier_like(later),
            _EARLIER_TOKEN_LISTS.map("".join),
            _TOKEN_LISTS.map("".join),
        ),
        label="earlier",
    )
    # Test the instantiation too: every generated name matches the pattern it came from.
    for _ in range(5):
        instance = "".join(data.draw(_instantiate(t)) for t in later_tokens)
        assert fnmatch.fnmatchcase(instance, later)
        if covers(earlier, later):
            assert fnmatch.fnmatchcase(instance, earlier), (earlier, later, instance)


@settings(max_examples=200, deadline=None)
@given(pattern=_TOKEN_LISTS.map("".join), name=_NAMES)
def test_covers_is_exact_for_plain_names(pattern: str, name: str) -> None:
    assert covers(pattern, name) == fnmatch.fnmatchcase(name, pattern)


@settings(max_examples=200, deadline=None)
@given(tokens=_TOKEN_LISTS)
def test_covers_is_reflexive_and_star_covers_everything(tokens: list[str]) -> None:
    pattern = "".join(tokens)
    assert covers(pattern, pattern)
    assert covers("*", pattern)


@settings(max_examples=200, deadline=None)
@given(
    name=st.text(alphabet=_NAME_ALPHABET, min_size=1, max_size=6),
    wildcards=st.lists(_TOKEN_LISTS.map("".join).filter(is_pattern), max_size=4),
)
def test_exact_rule_wins_over_later_wildcards(name: str, wildcards: list[str]) -> None:
    pairs = [(name, "exact.target"), *[(w, f"wild{i}.*") for i, w in enumerate(wildcards)]]
    pairs.append(("*", "catchall.*"))
    route = Router(rules(*pairs)).resolve(name)
    assert route.rule.index == 0
    assert route.connection == "exact"
    assert route.upstream_model == "target"


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    patterns=st.lists(pattern_and_instance(), max_size=6),
    extra_names=st.lists(_NAMES, max_size=5),
)
def test_first_matching_rule_wins(
    data: st.DataObject, patterns: list[tuple[str, str]], extra_names: list[str]
) -> None:
    rule_list = rules(
        *[(p, f"c{i}.{'*' if i % 2 else f'm{i}'}") for i, (p, _) in enumerate(patterns)]
    )
    router = Router(rule_list)
    names = [instance for _, instance in patterns] + extra_names
    for name in data.draw(st.permutations(names)):
        expected = brute_force(rule_list, name)
        for _ in range(2):  # the second call is answered from the cache
            route = router.match(name)
            if expected is None:
                assert route is None
            else:
                assert route is not None
                assert route.rule is expected
                assert route.client_model == name
                want = name if expected.model is None else expected.model
                assert route.upstream_model == want


@settings(max_examples=300, deadline=None)
@given(name=st.text())
def test_star_passthrough_preserves_the_name_exactly(name: str) -> None:
    route = Router(rules(("*", "conn.*"))).resolve(name)
    assert route.upstream_model == name
    assert route.client_model == name
    assert route.connection == "conn"


@settings(max_examples=300, deadline=None)
@given(patterns=st.lists(st.text(max_size=8), max_size=5), name=st.text())
def test_resolve_only_raises_model_not_found(patterns: list[str], name: str) -> None:
    rule_list = [
        RouteRule(pattern=p, connection=f"c{i}", model=None, index=i)
        for i, p in enumerate(patterns)
    ]
    router = Router(rule_list)
    expected = brute_force(rule_list, name)
    try:
        route = router.resolve(name)
    except ModelNotFound:
        assert expected is None
    else:
        assert route.rule is expected


def test_cache_does_not_change_results_past_its_limit() -> None:
    rule_list = rules(("a1*", "one.*"), ("a*7", "seven.fixed"), ("b?", "two.*"), ("*9", "nine.*"))
    router = Router(rule_list)
    fresh_answers = {}
    names = [f"{prefix}{i}" for i in range(3000) for prefix in ("a", "b")]
    assert len(set(names)) > 4096
    for name in names:
        route = router.match(name)
        expected = brute_force(rule_list, name)
        assert (route.rule if route else None) is expected, name
        fresh_answers[name] = route
    # Again, now that the cache has been filled and cleared at least once.
    for name in reversed(names):
        route = router.match(name)
        assert route == fresh_answers[name], name
        assert (route.rule if route else None) is brute_force(rule_list, name)


def test_cache_returns_equal_routes_for_repeated_names() -> None:
    router = Router(rules(("gpt*", "openai.*")))
    first = router.resolve("gpt-4o")
    second = router.resolve("gpt-4o")
    assert first == second
    with pytest.raises(ModelNotFound):
        router.resolve("claude")
    with pytest.raises(ModelNotFound):
        router.resolve("claude")
