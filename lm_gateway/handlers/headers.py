"""``HTTPHeadersForwarder``: pass chosen client headers on to the upstream.

Names are compared case-insensitively (lm-proxy lower-cased incoming names but not its
whitelist, so ``X-Trace-Id`` never matched). With a whitelist, exactly the listed headers are
forwarded — listing a sensitive one (``authorization``) is a deliberate choice and is honoured.
Without one, every header is forwarded except the sensitive and hop-by-hop ones below and any
``ignore_headers`` (which add to them: lm-proxy's replaced them, so a custom list silently
started forwarding cookies and keys).
"""

from __future__ import annotations

from collections.abc import Iterable

from ..context import RequestContext

#: Never forwarded unless whitelisted: credentials (the client's key for the gateway, cookies,
#: provider keys), what the gateway itself sets per request, hop-by-hop headers, conditional
#: and range requests, client-address headers, and provider account selectors (an
#: ``openai-organization`` header would bill another organisation on the gateway's key).
SENSITIVE_HEADERS = frozenset(
    {
        "authorization", "proxy-authorization", "www-authenticate", "cookie", "set-cookie",
        "x-api-key", "api-key", "x-goog-api-key", "anthropic-api-key", "openai-api-key",
        "host", "content-length", "content-type", "content-encoding", "transfer-encoding",
        "connection", "keep-alive", "upgrade", "proxy-connection", "te", "trailer", "expect",
        "accept-encoding", "cache-control", "pragma", "etag", "if-none-match", "if-match",
        "if-modified-since", "range", "if-range", "strict-transport-security",
        "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip",
        "anthropic-version", "anthropic-beta", "remote-addr",
        "openai-organization", "openai-project",
        ":method", ":path", ":scheme", ":authority",
    }
)  # fmt: skip


class HTTPHeadersForwarder:
    """A before-handler copying client headers into the upstream request.

    Args:
        white_list_headers: forward only these (any case); sensitive ones too if listed.
        ignore_headers: never forward these, on top of :data:`SENSITIVE_HEADERS`.
    """

    inline = True

    def __init__(
        self,
        white_list_headers: Iterable[str] | None = None,
        ignore_headers: Iterable[str] | None = None,
    ) -> None:
        if isinstance(white_list_headers, str) or isinstance(ignore_headers, str):
            raise TypeError("white_list_headers and ignore_headers are lists of header names")
        self.white_list = (
            frozenset(h.strip().lower() for h in white_list_headers) if white_list_headers else None
        )
        self.ignore = SENSITIVE_HEADERS | {h.strip().lower() for h in ignore_headers or ()}

    def __call__(self, ctx: RequestContext) -> None:
        for name, value in ctx.headers.items():
            lname = name.lower()
            if self.white_list is not None:
                if lname in self.white_list:
                    ctx.upstream_headers[lname] = value
            elif lname not in self.ignore:
                ctx.upstream_headers[lname] = value
