"""Coalescing a token stream so that per-message overhead does not cap throughput.

Every message that crosses Ray Serve (replica -> ingress -> proxy) costs milliseconds of CPU.
:func:`coalesce` reads its source in a background task and hands the consumer everything that
has arrived since it last asked: when the consumer keeps up, each item goes out alone and at
once (no added latency); when it falls behind, items pile up and leave together.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

T = TypeVar("T")

_END = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def _pump(source: AsyncIterator[T], queue: asyncio.Queue[object]) -> None:
    try:
        async for item in source:
            queue.put_nowait(item)
    except Exception as e:  # handed to the consumer, raised there
        queue.put_nowait(_Failure(e))
    finally:
        queue.put_nowait(_END)


async def coalesce(source: AsyncIterator[T], max_batch: int = 512) -> AsyncIterator[list[T]]:
    """Yield lists of items from ``source``: the first as soon as it arrives, then all that
    are already waiting (at most ``max_batch``). Closing the result cancels the source."""
    queue: asyncio.Queue[object] = asyncio.Queue()
    task = asyncio.create_task(_pump(source, queue))
    try:
        done = False
        while not done:
            batch: list[T] = []
            item = await queue.get()
            while True:
                if item is _END:
                    done = True
                    break
                if isinstance(item, _Failure):
                    if batch:  # deliver what came before the failure first
                        yield batch
                    raise item.exc
                batch.append(item)  # type: ignore[arg-type]
                if len(batch) >= max_batch or queue.empty():
                    break
                item = queue.get_nowait()
            if batch:
                yield batch
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
