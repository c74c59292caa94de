"""Fetching an image a client gave as a URL, for providers that want the bytes (Gemini).

A client's URL makes the gateway open a connection on the client's behalf, so the fetch is
guarded: http(s) only; the host must resolve only to public addresses unless the connection
allows private ones (otherwise a request could make the gateway read from its own network);
redirects are followed by hand, at most three, each target checked again; the body is capped
in size and the whole fetch has a deadline. Failures are the client's: 400 naming the URL.

Known limit: the address check and the connection resolve the name separately, so a DNS
server answering differently the second time (rebinding) is not caught.
"""

from __future__ import annotations

import base64
import ipaddress
from urllib.parse import urljoin, urlsplit

import httpx2
import trio

from ..errors import InvalidRequest

_MAX_REDIRECTS = 3


async def _check_host(url: str, param: str) -> None:
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        raise InvalidRequest(f"The image URL in '{param}' has no host.", param=param)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    except OSError as exc:
        raise InvalidRequest(
            f"The image URL in '{param}' cannot be resolved ({host}).", param=param
        ) from exc
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            raise InvalidRequest(
                f"The image URL in '{param}' points to a private or loopback address; the "
                "gateway does not fetch from its own network.",
                param=param,
                code="image_url_not_allowed",
            )


async def fetch_image(
    client: httpx2.AsyncClient,
    url: str,
    *,
    param: str,
    max_bytes: int,
    timeout_seconds: float,
    allow_private: bool,
) -> tuple[str, str]:
    """Fetch an image; returns (mime type, base64 data).

    Raises:
        InvalidRequest: not an http(s) URL, a refused address, a failed or non-image answer,
            too large, or too slow.
    """
    try:
        with trio.fail_after(timeout_seconds):
            for _ in range(_MAX_REDIRECTS + 1):
                if urlsplit(url).scheme not in ("http", "https"):
                    raise InvalidRequest(f"'{param}' must be an http(s) URL.", param=param)
                if not allow_private:
                    await _check_host(url, param)
                async with client.stream("GET", url) as response:
                    if response.is_redirect and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise InvalidRequest(
                            f"Fetching the image in '{param}' failed (HTTP "
                            f"{response.status_code}).",
                            param=param,
                            code="image_fetch_failed",
                        )
                    mime = response.headers.get("content-type", "").split(";")[0].strip()
                    if not mime.startswith("image/"):
                        raise InvalidRequest(
                            f"The URL in '{param}' is not an image ({mime or 'no type'}).",
                            param=param,
                            code="image_fetch_failed",
                        )
                    data = bytearray()
                    async for piece in response.aiter_bytes():
                        data += piece
                        if len(data) > max_bytes:
                            raise InvalidRequest(
                                f"The image in '{param}' is larger than {max_bytes} bytes.",
                                param=param,
                                code="image_too_large",
                            )
                    return mime, base64.b64encode(bytes(data)).decode()
            raise InvalidRequest(
                f"The image URL in '{param}' redirects too often.",
                param=param,
                code="image_fetch_failed",
            )
    except trio.TooSlowError as exc:
        raise InvalidRequest(
            f"Fetching the image in '{param}' took longer than {timeout_seconds} s.",
            param=param,
            code="image_fetch_failed",
        ) from exc
    except httpx2.HTTPError as exc:
        raise InvalidRequest(
            f"Fetching the image in '{param}' failed ({type(exc).__name__}).",
            param=param,
            code="image_fetch_failed",
        ) from exc
