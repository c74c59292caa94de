"""The gateway's exception tree.

Every failure a client can see is a :class:`GatewayError`; each class knows its HTTP status and
its OpenAI error ``type``/``code``, so the HTTP edge turns any of them into the OpenAI error shape
``{"error": {"message", "type", "param", "code"}}`` in one place. Startup problems are
:class:`ConfigError`, which never reaches a client::

    Exception
    ├── ConfigError                      bad configuration (startup, `lm-gateway check`)
    └── GatewayError                     answered to the client in the OpenAI error shape
        ├── InvalidRequest               400  invalid_request_error
        ├── AuthenticationFailed         401  invalid_api_key
        ├── PermissionDenied             403  connection_not_allowed / model_not_allowed
        ├── NotFound                     404  (ModelNotFound: model_not_found)
        ├── RequestTooLarge              413
        ├── ServiceDisabled              503  service_disabled
        ├── NotSupported                 400  a feature a connection cannot serve
        ├── RequestRejected              any  a request handler said no (also framework errors)
        ├── RateLimited                  429  the gateway's own rate limit, with Retry-After
        ├── AuthUnavailable              503  the key-validation service could not be asked
        ├── InternalError                500  a bug or a broken extension (logged with traceback)
        └── UpstreamError                the provider answered with an error (status kept)
            ├── UpstreamUnreachable      502  connect failure, connection reset
            ├── UpstreamTimeout          504  connect/read/total deadline passed
            └── UpstreamProtocolError    502  the provider's answer could not be understood

Errors are translated once per boundary with ``raise ... from exc`` (httpx's exceptions at the
provider boundary, these at the HTTP edge). ``detail`` holds information that is only shown to
clients in debug mode (upstream error bodies, exception text).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class ConfigError(Exception):
    """The configuration is invalid. ``path`` is the dotted key path (``connections.x.api_key``)."""

    def __init__(self, message: str, path: str | None = None) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class GatewayError(Exception):
    """An error answered to the client.

    Attributes:
        message: the client-facing message; never contains secrets or upstream internals.
        status: HTTP status code.
        type: OpenAI error ``type``.
        code: OpenAI error ``code`` (machine-readable), or None.
        param: the request field at fault (``messages[2].role``), or None.
        headers: extra response headers (``Retry-After``...).
        detail: extra text shown only in debug mode (upstream body, exception text).
    """

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code
        self.param = param
        self.headers: dict[str, str] = dict(headers or {})
        self.detail = detail

    @property
    def http_status(self) -> int:
        """The HTTP status to answer with (instances may override the class default)."""
        return self.status

    def to_body(self, *, debug: bool = False) -> dict[str, Any]:
        """The OpenAI error object; ``detail`` is appended to the message only in debug mode."""
        message = self.message
        if debug and self.detail:
            message = f"{message} [{self.detail}]"
        return {
            "error": {"message": message, "type": self.type, "param": self.param, "code": self.code}
        }


class InvalidRequest(GatewayError):
    """The request is malformed or has a field of the wrong type (400)."""

    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(GatewayError):
    """The API key is missing or not valid (401)."""

    status = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDenied(GatewayError):
    """The key is valid but its group may not use what the request routes to (403)."""

    status = 403
    type = "permission_error"


class NotFound(GatewayError):
    """No such endpoint or object (404)."""

    status = 404
    type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFound(NotFound):
    """No routing rule matches the requested model (404)."""

    default_code = "model_not_found"


class RequestTooLarge(GatewayError):
    """The request body exceeds the configured limit (413)."""

    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class ServiceDisabled(GatewayError):
    """``enabled = false`` in the config (503)."""

    status = 503
    type = "service_unavailable"
    default_code = "service_disabled"


class NotSupported(GatewayError):
    """The routed connection cannot serve this request or parameter (400)."""

    status = 400
    type = "invalid_request_error"
    default_code = "unsupported"


class RequestRejected(GatewayError):
    """A refusal with any status: raised by request handlers (and for the framework's own
    errors, such as a 408 when the body does not arrive in time).

    Args:
        message: shown to the client.
        status: the HTTP status (400 by default).
        error_type: the OpenAI error ``type`` (``invalid_request_error`` by default).
    """

    type = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        error_type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message, code=code, param=param, headers=headers, detail=detail)
        self._status = status
        self._type = error_type

    @property
    def http_status(self) -> int:
        return self._status

    def to_body(self, *, debug: bool = False) -> dict[str, Any]:
        body = super().to_body(debug=debug)
        if self._type:
            body["error"]["type"] = self._type
        return body


HTTPStatusError = RequestRejected


class RateLimited(GatewayError):
    """A rate limit of the gateway itself was reached (429, with ``Retry-After``)."""

    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class AuthUnavailable(GatewayError):
    """The service that validates keys could not be asked (503): not the same as a bad key."""

    status = 503
    type = "service_unavailable"
    default_code = "auth_unavailable"


class InternalError(GatewayError):
    """A bug in the gateway or a failure in a user extension (500); logged with traceback."""

    status = 500
    type = "server_error"
    default_code = "internal_error"


class UpstreamError(GatewayError):
    """The upstream provider answered with an error status.

    The status is kept (a 429 stays a 429, a 400 stays a 400) so clients and their SDKs react as
    they would to the provider itself; ``Retry-After`` and rate-limit headers travel in
    ``headers``.
    """

    status = 502
    type = "upstream_error"
    default_code = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        detail: str | None = None,
        connection: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message, code=code, param=param, headers=headers, detail=detail)
        self._status = status if status is not None else type(self).status
        self._type = error_type
        self.connection = connection
        #: Further fields of the upstream's error object, passed on as they were.
        self.extra: dict[str, Any] = dict(extra or {})

    @property
    def http_status(self) -> int:
        return self._status

    def to_body(self, *, debug: bool = False) -> dict[str, Any]:
        body = super().to_body(debug=debug)
        if self._type:
            body["error"]["type"] = self._type
        for key, value in self.extra.items():
            body["error"].setdefault(key, value)
        return body


class UpstreamUnreachable(UpstreamError):
    """The upstream could not be reached or dropped the connection (502)."""

    default_code = "upstream_unreachable"


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer within the configured deadline (504)."""

    status = 504
    default_code = "upstream_timeout"


class UpstreamProtocolError(UpstreamError):
    """The upstream's answer was not valid OpenAI wire format (502)."""

    default_code = "upstream_invalid_response"


def upstream_status_error(
    connection: str,
    status: int,
    *,
    message: str | None,
    error_type: str | None = None,
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
    raw: str = "",
) -> UpstreamError:
    """The error for an upstream's non-2xx answer, by one policy for every provider.

    - 401/403 mean the *gateway's* provider credentials were refused: the status is kept, the
      message (which may quote part of the key) is replaced.
    - Other 4xx are about the client's own request (a bad parameter, a context too long): status,
      message, type, code, param and extra fields are passed on.
    - 5xx keep their status; the upstream's text is shown only in debug mode.

    Args:
        message, error_type, code, param, extra: what the provider's error body said, already
            mapped to OpenAI's vocabulary by the caller.
        raw: the start of the body, for debug details when there is no message.
    """
    detail = f"upstream HTTP {status}: {message or raw}"
    if status in (401, 403):
        return UpstreamError(
            f"The upstream provider rejected the gateway's credentials for connection "
            f"{connection!r} (HTTP {status}).",
            status=status,
            error_type="upstream_authentication_error",
            code="upstream_authentication_failed",
            headers=headers,
            detail=detail,
            connection=connection,
        )
    if 400 <= status < 500:
        error = UpstreamError(
            message or f"The upstream provider rejected the request (HTTP {status}).",
            status=status,
            error_type=error_type
            or ("rate_limit_error" if status == 429 else "invalid_request_error"),
            code=code,
            param=param,
            headers=headers,
            detail=None if message else detail,
            connection=connection,
            extra=extra,
        )
        error.code = code  # the provider's own code, or none: not our "upstream_error"
        return error
    return UpstreamError(
        f"The upstream provider failed (HTTP {status}) on connection {connection!r}.",
        status=status if status >= 500 else 502,
        error_type=error_type or "upstream_error",
        code=code or "upstream_error",
        headers=headers,
        detail=detail,
        connection=connection,
    )
