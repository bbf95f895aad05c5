"""Unit tests of the pure parts of ops/bench/bench.py (no network, no server)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "ops" / "bench"


def _load_bench() -> ModuleType:
    # ops/bench is a tool folder, not a package: load the file by path.
    spec = importlib.util.spec_from_file_location("ops_bench", BENCH_DIR / "bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ops_bench"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def _chunk(content: str | None = None, role: str | None = None,
           finish: str | None = None) -> str:
    delta: dict[str, str] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return json.dumps({"id": "c1", "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


USAGE_CHUNK = json.dumps({"id": "c1", "object": "chat.completion.chunk", "choices": [],
                          "usage": {"prompt_tokens": 9, "completion_tokens": 5,
                                    "total_tokens": 14}})


def _feed(lines: list[tuple[float, str]]) -> Any:
    state = bench.StreamState()
    for t, line in lines:
        payload = bench.parse_sse_line(line)
        if payload is not None:
            bench.apply_event(state, payload, t)
    return state


# ------------------------------------------------------------------ percentiles


def test_percentile_matches_linear_interpolation() -> None:
    values = [10.0, 1.0, 4.0, 2.0, 3.0]  # unsorted on purpose
    assert bench.percentile(values, 50) == 3.0
    assert bench.percentile(values, 0) == 1.0
    assert bench.percentile(values, 100) == 10.0
    # rank = 4 * 0.99 = 3.96 -> 4 + 0.96 * (10 - 4)
    assert bench.percentile(values, 99) == pytest.approx(9.76)
    assert bench.percentile([1.0, 2.0], 50) == pytest.approx(1.5)


def test_percentile_edge_cases() -> None:
    assert bench.percentile([], 50) is None
    assert bench.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        bench.percentile([1.0], 101)


# ------------------------------------------------------------------ SSE parsing


def test_parse_sse_line_variants() -> None:
    assert bench.parse_sse_line('data: {"a": 1}') == '{"a": 1}'
    assert bench.parse_sse_line('data:{"a": 1}') == '{"a": 1}'
    assert bench.parse_sse_line("data: [DONE]\r\n") == "[DONE]"
    assert bench.parse_sse_line("") is None
    assert bench.parse_sse_line(": keep-alive") is None
    assert bench.parse_sse_line("event: message") is None


def test_stream_with_usage_chunk_and_done() -> None:
    lines = [
        (0.00, "data: " + _chunk(role="assistant", content="")),  # role only: not a token
        (0.10, "data: " + _chunk(content="Hi")),
        (0.00, ""),
        (0.15, "data: " + _chunk(content=" there")),
        (0.25, "data: " + _chunk(content="!")),
        (0.26, "data: " + _chunk(finish="stop")),  # empty delta: not a token
        (0.27, "data: " + USAGE_CHUNK),
        (0.28, "data: [DONE]"),
        (0.50, "data: " + _chunk(content="ignored after DONE")),
    ]
    state = _feed(lines)
    assert state.done and state.error is None
    assert state.first_token_t == 0.10
    assert state.last_token_t == 0.25
    assert state.content_chunks == 3
    assert state.gaps == pytest.approx([0.05, 0.10])
    assert state.usage_tokens == 5

    result = bench.finish_request(state, "p", start=1.0, sent_t=0.0, end_t=0.30)
    assert result.ok and result.token_source == "usage"
    assert result.output_tokens == 5
    assert result.ttft == pytest.approx(0.10)
    assert result.e2e == pytest.approx(0.30)
    # (e2e - ttft) / (tokens - 1) = 0.20 / 4
    assert result.itl == pytest.approx(0.05)


def test_stream_without_usage_counts_chunks() -> None:
    state = _feed([(0.2, "data: " + _chunk(content="a")),
                   (0.4, "data: " + _chunk(content="b")),
                   (0.5, "data: [DONE]")])
    result = bench.finish_request(state, "p", start=0.0, sent_t=0.0, end_t=0.5)
    assert result.ok and result.token_source == "chunks"
    assert result.output_tokens == 2
    assert result.itl == pytest.approx(0.3)


def test_stream_errors() -> None:
    mid_error = _feed([(0.1, "data: " + _chunk(content="a")),
                       (0.2, 'data: {"error": {"message": "engine died", "type": "x"}}')])
    res = bench.finish_request(mid_error, "p", 0.0, 0.0, 0.3)
    assert not res.ok and res.error == "engine died"

    truncated = _feed([(0.1, "data: " + _chunk(content="a"))])
    res = bench.finish_request(truncated, "p", 0.0, 0.0, 0.3)
    assert not res.ok and "DONE" in (res.error or "")

    garbage = _feed([(0.1, "data: {not json")])
    assert garbage.error is not None and garbage.error.startswith("bad SSE payload")


# ------------------------------------------------------------------ summaries and ratios


def _result(ttft: float, e2e: float, tokens: int, ok: bool = True) -> Any:
    if not ok:
        return bench.RequestResult("p", 0.0, ok=False, error="HTTP 500: boom")
    itl = (e2e - ttft) / (tokens - 1)
    return bench.RequestResult("p", 0.0, ok=True, ttft=ttft, e2e=e2e, output_tokens=tokens,
                               token_source="usage", itl=itl, gaps=[itl] * (tokens - 1))


def test_summarize_level() -> None:
    results = [_result(0.1, 1.1, 11), _result(0.3, 2.3, 11), _result(0, 0, 0, ok=False),
               _result(0.2, 1.2, 11)]
    s = bench.summarize(results, concurrency=4, duration_s=2.0)
    assert (s.requests, s.ok, s.errors) == (4, 3, 1)
    assert s.error_rate == 0.25
    assert s.ttft_p50_ms == pytest.approx(200.0)
    assert s.e2e_p50_ms == pytest.approx(1200.0)
    assert s.itl_p50_ms == pytest.approx(100.0)
    assert s.gap_p99_ms == pytest.approx(200.0)
    assert s.output_tokens == 33
    assert s.output_tok_s == pytest.approx(16.5)
    assert s.req_s == pytest.approx(1.5)
    assert s.sample_errors == ["HTTP 500: boom"]


def test_summarize_all_failed_has_no_rates() -> None:
    s = bench.summarize([_result(0, 0, 0, ok=False)] * 2, concurrency=1, duration_s=1.0)
    assert s.error_rate == 1.0
    assert s.ttft_p50_ms is None and s.output_tok_s is None and s.req_s is None
    assert bench.all_failed([s])
    assert bench.all_failed([])


def _level(conc: int, ttft: float, tok_s: float) -> Any:
    return bench.LevelStats(
        concurrency=conc, requests=4, ok=4, errors=0, error_rate=0.0, duration_s=1.0,
        ttft_p50_ms=ttft, ttft_p99_ms=ttft * 2, itl_p50_ms=10.0, itl_p99_ms=20.0,
        gap_p50_ms=10.0, gap_p99_ms=20.0, e2e_p50_ms=100.0, e2e_p99_ms=None,
        output_tokens=40, output_tok_s=tok_s, req_s=4.0, token_source="usage",
        sample_errors=[],
    )


def test_ratio_table_matches_levels_against_baseline() -> None:
    stats = {
        "cluster": [_level(1, 40.0, 100.0), _level(4, 80.0, 300.0)],
        "vllm": [_level(1, 10.0, 200.0), _level(4, 20.0, 600.0), _level(16, 30.0, 900.0)],
    }
    rows = bench.ratio_table(stats, baseline="cluster")
    # Level 16 has no baseline figure, so it gets no row.
    assert [(r["target"], r["concurrency"]) for r in rows] == [("vllm", 1), ("vllm", 4)]
    assert rows[0]["ttft_p50_ms"] == pytest.approx(0.25)
    assert rows[1]["output_tok_s"] == pytest.approx(2.0)
    assert rows[0]["itl_p50_ms"] == pytest.approx(1.0)
    assert rows[0]["e2e_p99_ms"] is None  # a missing figure gives no ratio
    assert set(rows[0]) == {"target", "concurrency", *(k for k, _ in bench.RATIO_METRICS)}


def test_ratio_helper() -> None:
    assert bench.ratio(3.0, 2.0) == 1.5
    assert bench.ratio(None, 2.0) is None
    assert bench.ratio(3.0, 0.0) is None


# ------------------------------------------------------------------ CLI parsing and guards


def test_parse_target_and_key() -> None:
    assert bench.parse_target("cluster=http://127.0.0.1:8000/v1/") == (
        "cluster", "http://127.0.0.1:8000/v1")
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_target("http://127.0.0.1:8000/v1")
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_target("x=ftp://127.0.0.1/v1")
    assert bench.parse_key("vllm=env:MY_KEY") == ("vllm", "env:MY_KEY")
    assert bench.resolve_key("env:MY_KEY", env={"MY_KEY": "sk-1"}) == "sk-1"
    assert bench.resolve_key("sk-literal", env={}) == "sk-literal"
    with pytest.raises(argparse.ArgumentTypeError):
        bench.resolve_key("env:MISSING", env={})


def test_loopback_guard() -> None:
    for host in ("127.0.0.1", "127.8.9.10", "localhost", "::1", "[::1]"):
        assert bench.is_loopback_host(host), host
    for host in ("10.0.0.5", "192.168.1.2", "example.com", "0.0.0.0"):
        assert not bench.is_loopback_host(host), host
    args = bench.build_parser().parse_args(["--target", "x=http://10.1.2.3:8000/v1"])
    assert "not loopback" in (bench.validate(args) or "")
    args = bench.build_parser().parse_args(
        ["--target", "x=http://10.1.2.3:8000/v1", "--allow-remote"])
    assert bench.validate(args) is None


def test_cli_parsing_smoke_and_spawn_spec() -> None:
    parser = bench.build_parser()
    args = parser.parse_args(["--target", "a=http://127.0.0.1:8000/v1",
                              "--concurrency", "2,8", "--smoke"])
    bench.apply_smoke(args)
    assert (args.concurrency, args.requests_per_level, args.max_tokens) == ([2], 2, 8)
    assert bench.validate(parser.parse_args([])) is not None
    dup = parser.parse_args(["--target", "vllm=http://127.0.0.1:1/v1", "--spawn-vllm", "/m"])
    assert "unique" in (bench.validate(dup) or "")
    assert bench.split_model_spec("/tmp/model:8123") == ("/tmp/model", 8123)
    assert bench.split_model_spec("/tmp/model") == ("/tmp/model", bench.DEFAULT_VLLM_PORT)
    with pytest.raises(SystemExit):
        parser.parse_args(["--concurrency", "0,4"])


def test_schedule_is_reproducible_and_prompt_file_is_valid() -> None:
    prompts = bench.load_prompts(BENCH_DIR / "prompts.json")
    assert 15 <= len(prompts) <= 30
    assert len({p["id"] for p in prompts}) == len(prompts)
    first = bench.level_schedule(len(prompts), 50, seed=7, concurrency=4)
    assert first == bench.level_schedule(len(prompts), 50, seed=7, concurrency=4)
    assert first != bench.level_schedule(len(prompts), 50, seed=8, concurrency=4)
    assert all(0 <= i < len(prompts) for i in first)


def test_build_body_requests_usage_and_stream() -> None:
    args = bench.build_parser().parse_args(["--target", "a=http://127.0.0.1:1/v1",
                                            "--max-tokens", "16", "--ignore-eos"])
    body = bench.build_body("m", [{"role": "user", "content": "hi"}], args, seed=3)
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["seed"], body["ignore_eos"]) == (16, 3, True)
    args.no_stream_usage = True
    assert "stream_options" not in bench.build_body("m", [], args, seed=0)
