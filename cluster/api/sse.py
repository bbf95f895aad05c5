"""Server-sent events of a generation stream, settled however the response ends."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from cluster.api.errors import error_event, rate_headers
from cluster.errors import ClusterError
from cluster.serving.coalesce import close
from cluster.serving.service import InferenceStream


class SettlingEventSource(EventSourceResponse):
    """An SSE response that runs ``on_close`` however it ends.

    sse-starlette never starts the body when the client leaves before the response headers
    are sent; an unstarted generator's ``finally`` never runs, so the body cannot be the
    only place a stream is settled (its slot and reservation would leak).
    """

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]],
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.on_close()


async def _wire(events: AsyncIterator[bytes | ClusterError]) -> AsyncIterator[bytes]:
    """A mid-stream error becomes ``data: {"error": ...}`` (the openai SDK raises on it)."""
    try:
        async for item in events:
            yield error_event(item) if isinstance(item, ClusterError) else item
    finally:
        await close(events)


def stream_response(stream: InferenceStream) -> SettlingEventSource:
    return SettlingEventSource(_wire(stream.events), stream.on_unstarted,
                               headers=rate_headers(stream.rate), ping=15, sep="\n")
