"""The benchmark's own parts (vLLM's client does the measuring): figures from its result
files, medians over rounds, ratios, CPU accounting, and vLLM's server arguments."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest

from cluster.tools.checkout import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "ops" / "bench"))
import bench
from figures import Run, ratio_rows, summarize, write_plot


def result(tok_s: float, ttft: float, tokens: int = 640, duration: float = 10.0
           ) -> dict[str, Any]:
    """The fields of a ``vllm bench serve --save-result`` file that the figures read."""
    return {"completed": 10, "failed": 0, "total_output_tokens": tokens, "duration": duration,
            "output_throughput": tok_s, "median_ttft_ms": ttft, "p99_ttft_ms": ttft * 2,
            "median_itl_ms": 40.0, "median_tpot_ms": 41.0, "median_e2el_ms": 2600.0}


def test_cpu_per_1k_tokens_total_and_marginal() -> None:
    run = Run.from_result("stack", 4, 0, result(64.0, 200.0), cpu_s=3.2, idle_cpu_per_s=0.1)
    assert run.cpu_per_1k(marginal=False) == pytest.approx(3.2 / 640 * 1000)
    assert run.cpu_per_1k(marginal=True) == pytest.approx((3.2 - 0.1 * 10) / 640 * 1000)
    idle_only = Run.from_result("stack", 4, 0, result(64.0, 200.0), 0.5, 0.1)
    assert idle_only.cpu_per_1k(marginal=True) == 0.0  # never negative


def test_medians_over_rounds_and_ratios() -> None:
    runs = [Run.from_result("vllm", 1, r, result(tok, 200.0), 1.0, 0.0)
            for r, tok in enumerate((20.0, 18.0, 30.0))]
    runs += [Run.from_result("stack", 1, r, result(tok, 230.0), 4.0, 0.0)
             for r, tok in enumerate((19.0, 17.0, 10.0))]
    summaries = summarize(runs)
    by = {s.target: s for s in summaries}
    assert (by["vllm"].output_tok_s, by["stack"].output_tok_s) == (20.0, 17.0)
    assert by["stack"].rounds == 3
    [row] = ratio_rows(summaries, "stack", "vllm")
    assert row["output_tok_s"] == pytest.approx(17.0 / 20.0)
    assert row["ttft_p50_delta_ms"] == pytest.approx(30.0)
    assert row["cpu_per_1k_total_s"] == pytest.approx(4.0)


def test_a_missing_baseline_gives_no_row_and_zero_gives_nan() -> None:
    runs = [Run.from_result("stack", 1, 0, result(10.0, 1.0), 1.0, 0.0)]
    assert ratio_rows(summarize(runs), "stack", "vllm") == []
    runs.append(Run.from_result("vllm", 1, 0, result(0.0, 1.0), 1.0, 0.0))
    assert math.isnan(ratio_rows(summarize(runs), "stack", "vllm")[0]["output_tok_s"])


def test_cpu_spent_counts_processes_alive_at_both_samples() -> None:
    assert bench.cpu_spent({1: 1.0, 2: 5.0}, {1: 1.5, 3: 9.0}) == pytest.approx(0.5)


def test_vllm_gets_the_stacks_engine_arguments() -> None:
    from cluster.config.catalog import load_spec
    from cluster.serving.engine import engine_args

    spec = load_spec(REPO_ROOT / "deployments" / "smollm2-135m-instruct.yaml")
    config = bench.vllm_server_config(spec, "/models/smol", 8123)
    assert config == engine_args(spec, "/models/smol") | {
        "host": "127.0.0.1", "port": 8123, "served_model_name": spec.id}
    assert bench.engine_env(spec)["OMP_NUM_THREADS"] == str(spec.engine.cpu_threads)


def test_smoke_is_small() -> None:
    args = bench.parse_args(["--smoke"])
    assert (args.concurrency, args.rounds, args.output_len) == ([1], 1, 8)
    assert bench.num_prompts(1, args) == 4


def test_the_plot_is_written(tmp_path: Path) -> None:
    runs = [Run.from_result(t, c, 0, result(10.0 * c, 100.0), 1.0, 0.0)
            for t in ("vllm", "stack") for c in (1, 4)]
    write_plot(summarize(runs), tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


async def test_the_stand_in_streams_what_a_replica_expects(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    from stand_in import StandInEngine

    from cluster.config.catalog import Endpoint, load_spec
    from cluster.serving.messages import EngineCall, StreamBatch, StreamOpened
    from cluster.serving.replica import ReplicaCore

    monkeypatch.setenv("STAND_IN_ITL_MS", "0")
    spec = load_spec(REPO_ROOT / "deployments" / "smollm2-135m-instruct.yaml")
    core = ReplicaCore(spec, StandInEngine(spec))
    payload = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    items = [i async for i in core.stream(EngineCall(Endpoint.chat, payload))]
    assert items[0] == StreamOpened()
    batches = [i for i in items[1:] if isinstance(i, StreamBatch)]
    assert sum(b.chunks for b in batches) == 21  # the role chunk and 20 tokens
    usage = [b.usage_chunk for b in batches if b.usage_chunk]
    assert usage and usage[0]["usage"]["completion_tokens"] == 20
