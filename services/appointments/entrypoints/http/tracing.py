"""The server span of each API request (``/v1/…``), continuing the caller's trace."""

from __future__ import annotations

from typing import Final

from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from opentelemetry.trace import Status, StatusCode

from services.tracing import correlation_id_of, recording, serving

_TRACED_PREFIX: Final = "/v1/"
_WANTED: Final = (b"traceparent", b"x-correlation-id")


class RequestTracing(ASGIMiddleware):
    """Runs each API request in a server span: the child of its ``traceparent``, or in
    the trace of its ``X-Correlation-Id`` (see :func:`services.tracing.parent_context`).
    Health, metrics and the schema are not traced."""

    scopes = (ScopeType.HTTP,)

    @staticmethod
    def should_bypass_for_scope(scope: Scope) -> bool:
        """Only the API's own routes are traced."""
        return not scope["path"].startswith(_TRACED_PREFIX)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        headers = {
            name.decode(): value.decode("latin-1")
            for name, value in scope["headers"]
            if name in _WANTED
        }
        correlation = correlation_id_of(headers.get("x-correlation-id"))
        if not recording():  # no span records: only the caller's trace context matters
            if not headers:
                await next_app(scope, receive, send)
                return
            with serving("", headers, correlation):
                await next_app(scope, receive, send)
            return
        method = str(scope.get("method", ""))
        route = scope.get("path_template") or scope["path"]
        attributes = {"http.request.method": method, "http.route": route, "url.path": scope["path"]}
        with serving(f"{method} {route}", headers, correlation, attributes) as span:

            async def traced_send(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                await send(message)

            await next_app(scope, receive, traced_send)
