"""Every request ends by its deadline, and a client that goes away takes its work with it.

``Deadline``: ``api.timeout``, or the request's own ``timeout`` (no larger); past it the client
gets 504 (a stream: a last error event) and the run is closed, which aborts its sequences in
the LLM engine. ``CancelOnDisconnect`` (ASGI middleware) cancels a request whose client has
disconnected before its response started, so a non-streamed request frees its batch slot too
(Starlette already ends a streamed response whose client is gone).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, TypeVar

from lmm.errors import BadRequest, DeadlineExceeded

T = TypeVar("T")


@dataclass(frozen=True)
class Deadline:
    seconds: float
    at: float  # event-loop time

    @classmethod
    def start(cls, requested: float | None, limit: float) -> Deadline:
        if requested is not None and requested > limit:
            raise BadRequest(f"timeout is {requested:g} s; at most {limit:g} s (api.timeout).",
                             "timeout")
        seconds = requested or limit
        return cls(seconds, asyncio.get_running_loop().time() + seconds)

    def exceeded(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"the request did not finish within its {self.seconds:g} s "
                                "deadline; send a larger timeout or fewer max_tokens.", "timeout")

    async def run(self, awaitable: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout_at(self.at):
                return await awaitable
        except TimeoutError:
            raise self.exceeded() from None

    async def bound(self, stream: AsyncIterator[T]) -> AsyncIterator[T]:
        """``stream``'s items until the deadline; then ``DeadlineExceeded`` (stream closed)."""
        try:
            while True:
                try:
                    async with asyncio.timeout_at(self.at):
                        item = await anext(stream)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise self.exceeded() from None
                yield item
        finally:
            await stream.aclose()


class CancelOnDisconnect:
    """ASGI middleware: cancel the request's handler when its client disconnects before the
    response has started."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        started = False

        async def pump() -> None:
            while True:
                message = await receive()
                await inbox.put(message)
                if message["type"] == "http.disconnect":
                    if not started:
                        handler.cancel()
                    return

        async def sending(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        handler = asyncio.ensure_future(self.app(scope, inbox.get, sending))
        pumping = asyncio.ensure_future(pump())
        try:
            await handler
        except asyncio.CancelledError:
            if not pumping.done() or started:  # our own caller was cancelled
                raise
        finally:
            pumping.cancel()
