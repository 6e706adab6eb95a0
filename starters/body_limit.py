"""A cap on the size of a request body, before anything reads it whole.

FastAPI reads and parses a JSON body before it runs the route's dependencies, so without a cap
anyone who can reach the API (the alert webhook is meant to be reachable by Alertmanager) could
make it hold and parse a body of any size before it checks their credentials. The cap is checked
twice: against ``Content-Length`` before a byte is read, and against the bytes actually received,
for a chunked body or one that lies about its length.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime.settings import ENV_PREFIX


class BodyTooLarge(HTTPException):
    """Raised while a route reads the body: an HTTPException, so the framework neither hides it
    behind a 400 "error parsing the body" nor a 500, and the API's handler answers it."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large_message(limit))


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes is answered 413 and never reaches a route."""

    def __init__(self, app: ASGIApp, limit: int, answer: ASGIApp) -> None:
        self.app = app
        self.limit = limit
        self.answer = answer
        """The 413 for a declared length, built by the API in its own error format."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self.answer(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counted, send)


def too_large_message(limit: int) -> str:
    return (
        f"the request body is larger than this API accepts ({limit} bytes); send less (an "
        f"Alertmanager: set max_alerts in its webhook_config), or raise "
        f"{ENV_PREFIX}API_MAX_BODY_BYTES"
    )
