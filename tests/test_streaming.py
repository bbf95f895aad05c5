"""Coalescing: nothing delayed when idle, batches when the consumer lags, clean cancel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from cluster.config.catalog import Endpoint
from cluster.serving.coalesce import coalesce
from cluster.serving.messages import EngineCall, StreamBatch, StreamOpened


async def ticks(n: int, every_s: float, log: list[str] | None = None) -> AsyncIterator[int]:
    try:
        for i in range(n):
            await asyncio.sleep(every_s)
            yield i
    finally:
        if log is not None:
            log.append("closed")


async def test_keeping_up_yields_each_item_alone() -> None:
    batches = [b async for b in coalesce(ticks(5, 0.01))]
    assert batches == [[0], [1], [2], [3], [4]]


async def test_lagging_consumer_gets_batches_in_order() -> None:
    out: list[list[int]] = []
    async for batch in coalesce(ticks(20, 0.001)):
        out.append(batch)
        await asyncio.sleep(0.02)  # a slow consumer (the ingress under load)
    assert [i for b in out for i in b] == list(range(20))
    assert len(out) < 10


async def test_first_item_is_not_delayed_by_the_interval() -> None:
    start = time.monotonic()
    gen = coalesce(ticks(3, 0.0), min_interval=lambda: 0.2)
    first = await anext(gen)
    assert first == [0] and time.monotonic() - start < 0.1
    rest = [b async for b in gen]
    assert [i for b in rest for i in b] == [1, 2] and len(rest) == 1  # waited, then batched


async def test_error_is_raised_after_earlier_items() -> None:
    async def broken() -> AsyncIterator[int]:
        yield 1
        raise RuntimeError("boom")

    got: list[int] = []
    with pytest.raises(RuntimeError, match="boom"):
        async for batch in coalesce(broken()):
            got.extend(batch)
    assert got == [1]


async def test_closing_cancels_the_source() -> None:
    log: list[str] = []
    gen = coalesce(ticks(1000, 0.01, log))
    await anext(gen)
    await gen.aclose()
    assert log == ["closed"]


async def test_busy_replica_spaces_its_messages() -> None:
    from cluster.config.catalog import ModelSpec
    from cluster.serving.replica import ReplicaCore
    from tests.fakes import FakeEngine

    def core(busy_streams: int) -> ReplicaCore:
        spec = ModelSpec.model_validate({
            "id": "a/b", "profile": "local", "source": {"path": "/x"},
            "engine": {"max_model_len": 64},
            "streaming": {"busy_streams": busy_streams, "busy_interval_ms": 40},
            "pricing": {"input_per_million": 0, "output_per_million": 0}})
        engine = FakeEngine(spec)
        engine.delay_s = 0.004
        return ReplicaCore(spec, engine)

    payload = {"messages": [{"role": "user", "content": " ".join(["w"] * 30)}]}

    async def messages(replica: ReplicaCore) -> int:
        items = [i async for i in replica.stream(EngineCall(Endpoint.chat, payload))]
        assert items[0] == StreamOpened()
        batches = [i for i in items[1:] if isinstance(i, StreamBatch)]
        assert sum(b.chunks for b in batches) == 32  # role + 30 words + finish
        return len(items) - 1

    idle, busy = await messages(core(busy_streams=4)), await messages(core(busy_streams=0))
    assert idle >= 30 and busy < idle / 3
