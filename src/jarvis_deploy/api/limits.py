"""ASGI middleware that bounds the size of request bodies."""

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jarvis_deploy.api.problems import problem_response

# The rest of an oversized body stays unread, so the server should not reuse the connection.
CLOSE_HEADERS = {"Connection": "close"}


class BodyTooLarge(HTTPException):
    """Error that `receive` raises when the body grows past the limit. The problem handlers turn it into a 413."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, detail=_too_large_detail(max_bytes), headers=CLOSE_HEADERS)


def _too_large_detail(max_bytes: int) -> str:
    return (
        f"request body is larger than {max_bytes} bytes. Send a smaller body, "
        "or raise JARVIS_MAX_BODY_BYTES on the server"
    )


class BodySizeLimitMiddleware:
    """Reject a request whose body exceeds `max_bytes` with a 413 problem document.

    A `Content-Length` above the limit is rejected before the application runs. Without one
    (chunked transfer encoding), the body is counted as the application reads it, and `receive`
    raises BodyTooLarge at the first chunk that crosses the limit, so no later chunk is read.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._reject(scope, receive, send)
            return

        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            # Reached only when no exception handler inside turned the error into a response.
            if response_started:
                raise
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem_response(
            413,
            "Request too large",
            _too_large_detail(self.max_bytes),
            type_slug="http-413",
            headers=CLOSE_HEADERS,
        )
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    """Return the declared Content-Length, or None when it is missing or not a number."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
