"""Coalescing a token stream so that per-message overhead does not cap throughput.

Every message that crosses Ray Serve (replica -> ingress -> proxy) costs milliseconds of CPU.
:func:`coalesce` reads its source in a background task and hands the consumer everything that
has arrived since it last asked: when the consumer keeps up, each item goes out alone and at
once (no added latency); when it falls behind, items pile up and leave together.

A Ray streaming generator does not wait for its consumer, so a replica cannot see the
ingress falling behind. ``min_interval`` lets the replica space its messages when it is
busy (many concurrent streams, hence many messages for the ingress): the first batch
still leaves at once, later ones at most every ``min_interval()`` seconds. An idle
replica passes 0 and adds no latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

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


async def close(stream: AsyncIterator[Any]) -> None:
    """Close an async generator now rather than at garbage collection: closing the streams
    here cancels the generation behind them. A no-op on one already finished."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


def _no_wait() -> float:
    return 0.0


async def coalesce(source: AsyncIterator[T], max_batch: int = 512,
                   min_interval: Callable[[], float] = _no_wait) -> AsyncIterator[list[T]]:
    """Yield lists of items from ``source``: the first as soon as it arrives, then all that
    are already waiting (at most ``max_batch``), no sooner than ``min_interval()`` seconds
    after the previous list. Closing the result cancels the source."""
    queue: asyncio.Queue[object] = asyncio.Queue()
    task = asyncio.create_task(_pump(source, queue))
    last_yield: float | None = None
    try:
        done = False
        while not done:
            batch: list[T] = []
            item = await queue.get()
            if last_yield is not None and item is not _END and (gap := min_interval()) > 0:
                # let more items arrive (the one we hold is never older than `gap`)
                await asyncio.sleep(max(0.0, last_yield + gap - time.monotonic()))
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
                last_yield = time.monotonic()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(Exception):
            await close(source)
