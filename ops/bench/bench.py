#!/usr/bin/env python
"""Streaming benchmark for OpenAI-compatible chat endpoints:

Runs the same concurrency sweep against one or more base URLs, one target after the
other, and reports TTFT, inter-token latency, end-to-end latency, output tokens/s,
requests/s and error rate, plus ratios against a baseline target. See README.md.

The pure parts (SSE parsing, percentiles, summaries, ratio table, argument parsing) are
module-level functions so tests/test_bench.py can import them without a network.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
DEFAULT_PROMPTS = HERE / "prompts.json"
DEFAULT_OUT = HERE / "results"
DEFAULT_VLLM_PORT = 8100
MAX_REQUESTS_PER_LEVEL = 10_000  # hard cap so no flag combination runs unbounded
MAX_ERROR_BODY = 300  # characters of an error body kept in the results

# Figures compared in the ratio table: (key in LevelStats, column title).
RATIO_METRICS: tuple[tuple[str, str], ...] = (
    ("ttft_p50_ms", "TTFT50"),
    ("ttft_p99_ms", "TTFT99"),
    ("itl_p50_ms", "ITL50"),
    ("itl_p99_ms", "ITL99"),
    ("e2e_p50_ms", "E2E50"),
    ("e2e_p99_ms", "E2E99"),
    ("output_tok_s", "tok/s"),
    ("req_s", "req/s"),
)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Target:
    name: str
    base_url: str  # ends with /v1 (no trailing slash)
    api_key: str | None = None


@dataclass
class StreamState:
    """What one streamed response told us, fed chunk by chunk (times in seconds)."""

    first_token_t: float | None = None
    last_token_t: float | None = None
    content_chunks: int = 0
    gaps: list[float] = field(default_factory=list)  # between consecutive content chunks
    usage_tokens: int | None = None
    done: bool = False
    error: str | None = None


@dataclass
class RequestResult:
    prompt_id: str
    start: float  # seconds since the level started
    ok: bool
    error: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    output_tokens: int = 0
    token_source: str = "none"  # "usage" (server count) or "chunks" (fallback)
    itl: float | None = None  # (e2e - ttft) / (output_tokens - 1)
    gaps: list[float] = field(default_factory=list)


@dataclass
class LevelStats:
    concurrency: int
    requests: int
    ok: int
    errors: int
    error_rate: float
    duration_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    gap_p50_ms: float | None
    gap_p99_ms: float | None
    e2e_p50_ms: float | None
    e2e_p99_ms: float | None
    output_tokens: int
    output_tok_s: float | None
    req_s: float | None
    token_source: str
    sample_errors: list[str]


# --------------------------------------------------------------------------- pure helpers


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); None for no data."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile out of range: {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def parse_sse_line(line: str) -> str | None:
    """The payload of an SSE ``data:`` line, or None for comments, other fields, blanks.

    OpenAI-compatible servers put each event on one ``data:`` line, so a line is an event;
    timing each line as it arrives is what makes TTFT and gaps exact.
    """
    line = line.rstrip("\r\n")
    if not line.startswith("data:"):
        return None
    payload = line[5:]
    return payload[1:] if payload.startswith(" ") else payload


def _delta_has_output(choice: dict[str, Any]) -> bool:
    """True when a choice carries generated output (text, reasoning or a tool call)."""
    delta = choice.get("delta") or {}
    if not isinstance(delta, dict):
        return False
    return bool(
        delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
        or delta.get("tool_calls") or choice.get("text")
    )


def apply_event(state: StreamState, payload: str, t: float) -> None:
    """Update ``state`` with one SSE payload received at time ``t``."""
    if state.done or state.error:
        return
    if payload.strip() == "[DONE]":
        state.done = True
        return
    try:
        chunk = json.loads(payload)
    except json.JSONDecodeError:
        state.error = f"bad SSE payload: {payload[:80]!r}"
        return
    if not isinstance(chunk, dict):
        state.error = f"bad SSE payload: {payload[:80]!r}"
        return
    if chunk.get("error"):
        # A mid-stream error, OpenAI style: data: {"error": {...}}.
        err = chunk["error"]
        state.error = str(err.get("message", err) if isinstance(err, dict) else err)
        return
    usage = chunk.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        state.usage_tokens = usage["completion_tokens"]
    choices = chunk.get("choices") or []
    if any(isinstance(c, dict) and _delta_has_output(c) for c in choices):
        _record_output_chunk(state, t)


def _record_output_chunk(state: StreamState, t: float) -> None:
    if state.first_token_t is None:
        state.first_token_t = t
    elif state.last_token_t is not None:
        state.gaps.append(t - state.last_token_t)
    state.last_token_t = t
    state.content_chunks += 1


def finish_request(
    state: StreamState, prompt_id: str, start: float, sent_t: float, end_t: float
) -> RequestResult:
    """Turn a fully read stream into a RequestResult (times relative to ``sent_t``)."""
    if state.error:
        return RequestResult(prompt_id, start, ok=False, error=state.error)
    if not state.done:
        return RequestResult(prompt_id, start, ok=False, error="stream ended without [DONE]")
    if state.usage_tokens is not None:
        tokens, source = state.usage_tokens, "usage"
    else:
        tokens, source = state.content_chunks, "chunks"
    ttft = None if state.first_token_t is None else state.first_token_t - sent_t
    e2e = end_t - sent_t
    itl = (e2e - ttft) / (tokens - 1) if ttft is not None and tokens > 1 else None
    return RequestResult(
        prompt_id, start, ok=True, ttft=ttft, e2e=e2e, output_tokens=tokens,
        token_source=source, itl=itl, gaps=list(state.gaps),
    )


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000.0


def _pct_ms(values: Sequence[float], q: float) -> float | None:
    return _ms(percentile(values, q))


def summarize(results: Sequence[RequestResult], concurrency: int, duration_s: float) -> LevelStats:
    """Aggregate one concurrency level; rates are over the level's wall-clock time."""
    good = [r for r in results if r.ok]
    ttfts = [r.ttft for r in good if r.ttft is not None]
    itls = [r.itl for r in good if r.itl is not None]
    e2es = [r.e2e for r in good if r.e2e is not None]
    gaps = [g for r in good for g in r.gaps]
    tokens = sum(r.output_tokens for r in good)
    sources = sorted({r.token_source for r in good})
    errors = len(results) - len(good)
    rate_ok = duration_s > 0 and bool(good)
    return LevelStats(
        concurrency=concurrency,
        requests=len(results),
        ok=len(good),
        errors=errors,
        error_rate=errors / len(results) if results else 0.0,
        duration_s=duration_s,
        ttft_p50_ms=_pct_ms(ttfts, 50), ttft_p99_ms=_pct_ms(ttfts, 99),
        itl_p50_ms=_pct_ms(itls, 50), itl_p99_ms=_pct_ms(itls, 99),
        gap_p50_ms=_pct_ms(gaps, 50), gap_p99_ms=_pct_ms(gaps, 99),
        e2e_p50_ms=_pct_ms(e2es, 50), e2e_p99_ms=_pct_ms(e2es, 99),
        output_tokens=tokens,
        output_tok_s=tokens / duration_s if rate_ok else None,
        req_s=len(good) / duration_s if rate_ok else None,
        token_source="+".join(sources) or "none",
        sample_errors=sorted({r.error for r in results if r.error})[:5],
    )


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def ratio_table(
    stats: dict[str, list[LevelStats]], baseline: str
) -> list[dict[str, Any]]:
    """Rows of target/baseline ratios, one per (other target, shared concurrency level)."""
    base_by_level = {s.concurrency: s for s in stats.get(baseline, [])}
    rows: list[dict[str, Any]] = []
    for name, levels in stats.items():
        if name == baseline:
            continue
        for level in levels:
            base = base_by_level.get(level.concurrency)
            if base is None:
                continue
            row: dict[str, Any] = {"target": name, "concurrency": level.concurrency}
            for key, _title in RATIO_METRICS:
                row[key] = ratio(getattr(level, key), getattr(base, key))
            rows.append(row)
    return rows


def parse_concurrency(text: str) -> list[int]:
    levels = [int(part) for part in text.split(",") if part.strip()]
    if not levels or any(n < 1 for n in levels):
        raise argparse.ArgumentTypeError(f"concurrency must be positive integers: {text!r}")
    return levels


def parse_target(text: str) -> tuple[str, str]:
    """``NAME=BASE_URL`` -> (name, base url without trailing slash)."""
    name, sep, url = text.partition("=")
    if not sep or not name or not url:
        raise argparse.ArgumentTypeError(f"expected NAME=BASE_URL, got {text!r}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"not an http(s) URL: {url!r}")
    return name, url.rstrip("/")


def resolve_key(text: str, env: dict[str, str] | None = None) -> str:
    """A key given as ``env:VAR`` is read from the environment (keeps it out of argv)."""
    env = dict(os.environ) if env is None else env
    if text.startswith("env:"):
        var = text[4:]
        if var not in env:
            raise argparse.ArgumentTypeError(f"environment variable {var} is not set")
        return env[var]
    return text


def parse_key(text: str) -> tuple[str, str]:
    """``NAME=KEY`` (KEY may be ``env:VAR``) -> (name, raw key text)."""
    name, sep, key = text.partition("=")
    if not sep or not name or not key:
        raise argparse.ArgumentTypeError(f"expected NAME=KEY, got {text!r}")
    return name, key


def is_loopback_host(host: str) -> bool:
    """True for localhost and loopback IPs; names are not resolved (no DNS tricks)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_model_spec(spec: str) -> tuple[str, int]:
    """``MODEL_DIR[:PORT]`` -> (dir, port); a trailing ``:digits`` is the port."""
    head, sep, tail = spec.rpartition(":")
    if sep and tail.isdigit() and head:
        return head, int(tail)
    return spec, DEFAULT_VLLM_PORT


def level_schedule(prompt_count: int, requests: int, seed: int, concurrency: int) -> list[int]:
    """Prompt indices for one level: same for every target, so targets see equal work."""
    rng = random.Random(f"{seed}:{concurrency}")
    return [rng.randrange(prompt_count) for _ in range(requests)]


def load_prompts(path: Path) -> list[dict[str, Any]]:
    data = json.loads(path.read_text())
    prompts: list[dict[str, Any]] = data["prompts"] if isinstance(data, dict) else data
    if not prompts or not all(isinstance(p.get("messages"), list) for p in prompts):
        raise ValueError(f"{path}: expected a non-empty list of {{id, messages}}")
    return prompts


def build_body(
    model: str, messages: list[dict[str, Any]], args: argparse.Namespace, seed: int
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": seed,
        "stream": True,
    }
    if not args.no_stream_usage:
        body["stream_options"] = {"include_usage": True}
    if args.ignore_eos:
        body["ignore_eos"] = True  # vLLM extension: fixed output length per request
    return body


# --------------------------------------------------------------------------- network


async def stream_one(
    client: Any, target: Target, body: dict[str, Any], prompt_id: str, level_t0: float
) -> RequestResult:
    """Send one streaming chat completion and time every SSE line as it arrives."""
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    state = StreamState()
    sent = time.perf_counter()
    start = sent - level_t0
    try:
        async with client.stream(
            "POST", f"{target.base_url}/chat/completions", json=body, headers=headers
        ) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")[:MAX_ERROR_BODY]
                return RequestResult(prompt_id, start, ok=False,
                                     error=f"HTTP {resp.status_code}: {text}")
            async for line in resp.aiter_lines():
                payload = parse_sse_line(line)
                if payload is not None:
                    apply_event(state, payload, time.perf_counter())
                if state.done or state.error:
                    break
    except Exception as exc:  # any transport failure counts as a failed request
        return RequestResult(prompt_id, start, ok=False, error=f"{type(exc).__name__}: {exc}")
    return finish_request(state, prompt_id, start, sent, time.perf_counter())


async def run_level(
    client: Any, target: Target, model: str, prompts: list[dict[str, Any]],
    concurrency: int, args: argparse.Namespace, on_done: Any,
) -> LevelStats:
    """Closed loop: ``concurrency`` workers share the level's request schedule."""
    schedule = level_schedule(len(prompts), args.requests_per_level, args.seed, concurrency)
    results: list[RequestResult] = []
    next_index = iter(range(len(schedule)))
    t0 = time.perf_counter()
    stop_starting = t0 + args.duration if args.duration else math.inf

    async def worker() -> None:
        for i in next_index:  # shared iterator: each index is taken once
            if time.perf_counter() >= stop_starting:
                return
            prompt = prompts[schedule[i]]
            body = build_body(model, prompt["messages"], args, args.seed + i)
            results.append(await stream_one(client, target, body, prompt["id"], t0))
            on_done()

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    _done, pending = await asyncio.wait(tasks, timeout=args.level_timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if pending:
        results.extend(RequestResult("-", args.level_timeout, ok=False, error="level timeout")
                       for _ in pending)
    return summarize(results, concurrency, time.perf_counter() - t0)


async def discover_model(client: Any, target: Target) -> str:
    """First model id of ``GET /models``: used when --model is not given."""
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    resp = await client.get(f"{target.base_url}/models", headers=headers)
    resp.raise_for_status()
    return str(resp.json()["data"][0]["id"])


async def warm_up(client: Any, target: Target, model: str,
                  prompts: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """A few unmeasured requests so first-request costs do not land in level 1."""
    for i in range(args.warmup):
        prompt = prompts[i % len(prompts)]
        await stream_one(client, target, build_body(model, prompt["messages"], args, i),
                         prompt["id"], time.perf_counter())


async def bench_target(
    target: Target, prompts: list[dict[str, Any]], args: argparse.Namespace, progress: Any
) -> tuple[str, list[LevelStats]]:
    import httpx

    timeout = httpx.Timeout(args.request_timeout, connect=10.0)
    limits = httpx.Limits(max_connections=max(args.concurrency) + 4)
    # trust_env=False: a proxy from the environment must never see loopback traffic.
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        model = args.model or await discover_model(client, target)
        await warm_up(client, target, model, prompts, args)
        levels = []
        for conc in args.concurrency:
            task = progress.add_task(f"{target.name} c={conc}", total=args.requests_per_level)
            stats = await run_level(client, target, model, prompts, conc, args,
                                    lambda t=task: progress.advance(t))
            progress.update(task, completed=args.requests_per_level)
            levels.append(stats)
    return model, levels


# --------------------------------------------------------------------------- vLLM spawn


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def vllm_command(model_dir: str, served_name: str, port: int,
                 max_model_len: int = 2048) -> list[str]:
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model_dir, "--served-model-name", served_name,
        "--dtype", "float32", "--enforce-eager", "--max-model-len", str(max_model_len),
        "--port", str(port), "--host", "127.0.0.1",
    ]


@dataclass
class SpawnedServer:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, grace_s: float = 20.0) -> None:
        """Terminate the process group we started (the engine is a child), then kill."""
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def start_vllm(model_dir: str, served_name: str, port: int, out_dir: Path,
               max_model_len: int = 2048) -> SpawnedServer:
    if port_in_use(port):
        # Never benchmark (or later stop) a server someone else started.
        raise RuntimeError(f"port {port} is already in use")
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # default asks for 92% of a NUMA node
    # the engine in-process, as the stack's CPU replicas run it (cluster/engine.py)
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    log_path = out_dir / f"vllm-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(vllm_command(model_dir, served_name, port, max_model_len),
                                env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return SpawnedServer(proc, log_path)


def wait_healthy(server: SpawnedServer, port: int, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {server.proc.returncode}; see {server.log_path}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2.0,
                         trust_env=False).status_code == 200:
                return
        time.sleep(1.0)
    raise RuntimeError(f"vLLM not healthy after {timeout_s:.0f}s; see {server.log_path}")


# --------------------------------------------------------------------------- output


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def target_table(name: str, levels: Iterable[LevelStats]) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(title=f"{name}: latencies in ms", box=box.SIMPLE_HEAD)
    for col in ("conc", "reqs", "err%", "TTFT50", "TTFT99", "ITL50", "ITL99",
                "gap50", "gap99", "E2E50", "E2E99", "tok/s", "req/s", "count"):
        table.add_column(col, justify="right")
    for s in levels:
        table.add_row(
            str(s.concurrency), str(s.requests), _fmt(100 * s.error_rate),
            _fmt(s.ttft_p50_ms), _fmt(s.ttft_p99_ms), _fmt(s.itl_p50_ms), _fmt(s.itl_p99_ms),
            _fmt(s.gap_p50_ms), _fmt(s.gap_p99_ms), _fmt(s.e2e_p50_ms), _fmt(s.e2e_p99_ms),
            _fmt(s.output_tok_s), _fmt(s.req_s, 2), s.token_source,
        )
    return table


def ratios_rich_table(rows: list[dict[str, Any]], baseline: str) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(title=f"ratio target / {baseline} (latency <1: faster; tok/s, req/s >1: more)",
                  box=box.SIMPLE_HEAD)
    table.add_column("target")
    table.add_column("conc", justify="right")
    for _key, title in RATIO_METRICS:
        table.add_column(title, justify="right")
    for row in rows:
        table.add_row(row["target"], str(row["concurrency"]),
                      *(_fmt_ratio(row[key]) for key, _t in RATIO_METRICS))
    return table


def _nan(value: float | None) -> float:
    return math.nan if value is None else value  # matplotlib leaves a gap for NaN


def write_plot(stats: dict[str, list[LevelStats]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers or CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, (ax_ttft, ax_tput) = plt.subplots(1, 2, figsize=(11, 4.2))
    ticks = sorted({s.concurrency for levels in stats.values() for s in levels})
    for name, levels in stats.items():
        xs = [s.concurrency for s in levels]
        ax_ttft.plot(xs, [_nan(s.ttft_p50_ms) for s in levels], marker="o", label=name)
        ax_tput.plot(xs, [_nan(s.output_tok_s) for s in levels], marker="o", label=name)
    for ax, ylabel in ((ax_ttft, "TTFT p50 (ms)"), (ax_tput, "output tokens/s")):
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        if ticks:  # label the levels that were run, as plain numbers
            ax.set_xticks(ticks)
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax_ttft.set_title("Time to first token")
    ax_tput.set_title("Throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, args: argparse.Namespace, targets: list[Target],
               models: dict[str, str], stats: dict[str, list[LevelStats]],
               ratios: list[dict[str, Any]], baseline: str) -> None:
    doc = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {
            "concurrency": args.concurrency, "requests_per_level": args.requests_per_level,
            "duration_s": args.duration, "max_tokens": args.max_tokens,
            "temperature": args.temperature, "seed": args.seed, "warmup": args.warmup,
            "ignore_eos": args.ignore_eos, "prompts": str(args.prompts),
        },
        # Keys are never written out, only whether one was used.
        "targets": [{"name": t.name, "base_url": t.base_url, "model": models.get(t.name),
                     "api_key": bool(t.api_key)} for t in targets],
        "baseline": baseline,
        "results": {name: [dataclasses.asdict(s) for s in levels]
                    for name, levels in stats.items()},
        "ratios": ratios,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Streaming benchmark for OpenAI-compatible chat endpoints.")
    p.add_argument("--target", action="append", type=parse_target, default=[],
                   metavar="NAME=BASE_URL", help="endpoint to drive, e.g. "
                   "cluster=http://127.0.0.1:8000/v1 (repeatable; run in the order given)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="bearer key for every target; env:VAR reads it from $VAR")
    p.add_argument("--key", action="append", type=parse_key, default=[], metavar="NAME=KEY",
                   help="bearer key for one target (overrides --api-key); KEY may be env:VAR")
    p.add_argument("--model", default=None,
                   help="model name to request (default: first id of GET /models per target)")
    p.add_argument("--concurrency", type=parse_concurrency, default=[1, 4, 16],
                   metavar="N,N,...", help="concurrency levels to sweep (default 1,4,16)")
    p.add_argument("--requests-per-level", type=int, default=32, metavar="N",
                   help="requests sent at each level (default 32)")
    p.add_argument("--duration", type=float, default=None, metavar="S",
                   help="stop starting requests after S seconds per level "
                        "(still at most --requests-per-level)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0,
                   help="prompt order and per-request sampling seed (default 0)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="send ignore_eos=true (vLLM extension) for fixed output lengths")
    p.add_argument("--no-stream-usage", action="store_true",
                   help="do not send stream_options.include_usage; count content chunks")
    p.add_argument("--warmup", type=int, default=1, metavar="N",
                   help="unmeasured requests per target before the sweep (default 1)")
    p.add_argument("--request-timeout", type=float, default=120.0, metavar="S")
    p.add_argument("--level-timeout", type=float, default=600.0, metavar="S",
                   help="hard limit for one concurrency level (default 600)")
    p.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                   help="where the JSON, PNG (and a spawned vLLM's log) go")
    p.add_argument("--baseline", default=None, metavar="NAME",
                   help="target the ratios divide by (default: the first target)")
    p.add_argument("--spawn-vllm", default=None, metavar="MODEL_DIR[:PORT]",
                   help="start vLLM's own OpenAI server on MODEL_DIR (port 8100 by default), "
                        "benchmark it as target 'vllm' after the others, then stop it")
    p.add_argument("--spawn-timeout", type=float, default=300.0, metavar="S")
    p.add_argument("--spawn-max-model-len", type=int, default=2048, metavar="N",
                   help="the spawned server's context (match the deployment file's)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow non-loopback targets (refused by default)")
    p.add_argument("--smoke", action="store_true",
                   help="CI mode: one level (concurrency 1), 2 requests, max_tokens 8, no warmup")
    return p


def apply_smoke(args: argparse.Namespace) -> None:
    if args.smoke:
        args.concurrency = args.concurrency[:1]  # the first level only; 1 by default
        args.requests_per_level, args.max_tokens, args.warmup = 2, 8, 0


def validate(args: argparse.Namespace) -> str | None:
    """An error message for a bad combination of flags, else None."""
    if not args.target and not args.spawn_vllm:
        return "give at least one --target or --spawn-vllm"
    if not 1 <= args.requests_per_level <= MAX_REQUESTS_PER_LEVEL:
        return f"--requests-per-level must be within 1..{MAX_REQUESTS_PER_LEVEL}"
    if args.max_tokens < 1 or args.warmup < 0:
        return "--max-tokens must be >= 1 and --warmup >= 0"
    names = [name for name, _url in args.target] + (["vllm"] if args.spawn_vllm else [])
    if len(set(names)) != len(names):
        return f"target names must be unique: {names}"
    if args.baseline and args.baseline not in names:
        return f"--baseline {args.baseline} is not a target"
    for name, url in args.target:
        host = urlsplit(url).hostname or ""
        if not args.allow_remote and not is_loopback_host(host):
            return f"target {name} ({host}) is not loopback; pass --allow-remote to allow it"
    return None


def make_targets(args: argparse.Namespace) -> list[Target]:
    keys = dict(args.key)
    default = resolve_key(args.api_key) if args.api_key else None
    return [Target(name, url, resolve_key(keys[name]) if name in keys else default)
            for name, url in args.target]


def run_targets(targets: list[Target], prompts: list[dict[str, Any]],
                args: argparse.Namespace, progress: Any, console: Any,
                stats: dict[str, list[LevelStats]], models: dict[str, str]) -> None:
    """Benchmark targets one after the other (never concurrently: small machine)."""
    for target in targets:
        try:
            models[target.name], stats[target.name] = asyncio.run(
                bench_target(target, prompts, args, progress))
        except Exception as exc:  # e.g. /models unreachable: the whole target failed
            console.print(f"[red]{target.name}: {type(exc).__name__}: {exc}[/red]")
            stats[target.name] = []


def run_spawned_vllm(args: argparse.Namespace, prompts: list[dict[str, Any]], progress: Any,
                     console: Any, stats: dict[str, list[LevelStats]],
                     models: dict[str, str]) -> Target | None:
    model_dir, port = split_model_spec(args.spawn_vllm)
    served = args.model or Path(model_dir).name
    target = Target("vllm", f"http://127.0.0.1:{port}/v1",
                    resolve_key(dict(args.key)["vllm"]) if "vllm" in dict(args.key) else None)
    console.print(f"starting vLLM on {model_dir} as {served!r}, port {port}")
    try:
        server = start_vllm(model_dir, served, port, args.out, args.spawn_max_model_len)
    except RuntimeError as exc:
        console.print(f"[red]vllm: {exc}[/red]")
        stats["vllm"] = []
        return target
    try:
        wait_healthy(server, port, args.spawn_timeout)
        run_targets([target], prompts, args, progress, console, stats, models)
    except RuntimeError as exc:
        console.print(f"[red]vllm: {exc}[/red]")
        stats["vllm"] = []
    finally:
        server.stop()
    return target


def report(
    console: Any, stats: dict[str, list[LevelStats]], baseline: str
) -> list[dict[str, Any]]:
    for name, levels in stats.items():
        console.print(target_table(name, levels))
        for s in levels:
            for err in s.sample_errors:
                console.print(f"  [yellow]{name} c={s.concurrency} error:[/yellow] {err}")
    rows = ratio_table(stats, baseline) if len(stats) > 1 else []
    if rows:
        console.print(ratios_rich_table(rows, baseline))
    return rows


def all_failed(levels: list[LevelStats]) -> bool:
    return not levels or sum(s.ok for s in levels) == 0


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    parser = build_parser()
    args = parser.parse_args(argv)
    apply_smoke(args)
    if problem := validate(args):
        parser.error(problem)  # exits with status 2
    args.out.mkdir(parents=True, exist_ok=True)
    # SIGTERM unwinds like Ctrl-C, so a spawned vLLM is still stopped by its finally.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    prompts = load_prompts(args.prompts)
    targets = make_targets(args)
    # Piped output (CI logs, files) gets a fixed width instead of rich's 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 160)
    stats: dict[str, list[LevelStats]] = {}
    models: dict[str, str] = {}
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        run_targets(targets, prompts, args, progress, console, stats, models)
        if args.spawn_vllm:
            spawned = run_spawned_vllm(args, prompts, progress, console, stats, models)
            if spawned is not None:
                targets.append(spawned)
    baseline = args.baseline or targets[0].name
    rows = report(console, stats, baseline)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path, png_path = args.out / f"bench-{stamp}.json", args.out / f"bench-{stamp}.png"
    write_json(json_path, args, targets, models, stats, rows, baseline)
    write_plot(stats, png_path)
    console.print(f"wrote {json_path} and {png_path}")
    failed = [name for name, levels in stats.items() if all_failed(levels)]
    if failed:
        console.print(f"[red]every request failed for: {', '.join(failed)}[/red]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
