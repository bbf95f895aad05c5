#!/usr/bin/env python
"""Ingress capacity: streamed chunks per second per CPU core of the ingress, with a fast
engine stand-in (ops/bench/stand_in.py) behind a real stack (HAProxy, ingress with keys,
limits and metrics on, replica), driven by vLLM's own client. An operator sizes ingress
replicas on GPU nodes from it, where the engine no longer competes for these cores.

    .venv/bin/python ops/bench/capacity.py --concurrency 8,32 --itl-ms 10
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE))

from bench import (  # noqa: E402
    DEFAULT_SPEC,
    client_command,
    cpu_seconds,
    local_stack,
    parse_args,
    serve_processes,
)
from stand_in import StandInEngine  # noqa: E402

from cluster.config.catalog import ModelSpec, load_spec  # noqa: E402
from cluster.config.settings import Settings  # noqa: E402

# concurrency, chunks/s, CPU seconds by role, chunks, the client's result
Row = tuple[int, float, dict[str, float], int, dict[str, Any]]


def measure(concurrency: list[int], itl_ms: float = 10.0, output_len: int = 256,
            prompts_per_concurrency: int = 4) -> list[Row]:
    """Drive a stack with the stand-in engine at each concurrency; raise if the client fails."""
    import subprocess

    from cluster.tools.redis_server import free_port

    os.environ["STAND_IN_ITL_MS"] = str(itl_ms)  # read by the replica's stand-in
    base = load_spec(DEFAULT_SPEC)
    tokenizer = base.source.resolve(Settings().cache_dir)  # the client counts tokens with it
    spec = ModelSpec.model_validate(base.model_dump(mode="json") | {
        "source": {"path": tokenizer}, "max_ongoing_requests": 256})
    rows: list[Row] = []
    with local_stack(spec, free_port(), engine_cls=StandInEngine) as target:
        procs = serve_processes()
        args = parse_args(["--output-len", str(output_len), "--input-len", "32"])
        work = Settings().cache_dir / "capacity"
        work.mkdir(parents=True, exist_ok=True)
        for conc in concurrency:
            result = work / f"c{conc}.json"
            cmd = client_command(target, spec, tokenizer, args, conc,
                                 conc * prompts_per_concurrency, result)
            before = cpu_seconds(procs)
            run = subprocess.run(cmd, env=os.environ | {"OPENAI_API_KEY": target.api_key},
                                 capture_output=True, text=True, timeout=1800)
            after = cpu_seconds(procs)
            if run.returncode != 0:
                raise RuntimeError(f"vLLM's client failed:\n{run.stderr[-3000:]}")
            data = json.loads(result.read_text())
            chunks = int(data["total_output_tokens"])  # one token per chunk
            spent = {k: after[k] - before[k] for k in procs}
            rows.append((conc, chunks / data["duration"], spent, chunks, data))
    return rows


def print_rows(rows: list[Row], itl_ms: float, output_len: int) -> None:
    print(f"Ingress capacity, stand-in engine: one token every {itl_ms:g} ms per stream, "
          f"{output_len} tokens per request")
    print(f"{'c':>4} {'chunks/s':>9} {'ingress core':>12} {'chunks/s per ingress core':>26} "
          f"{'haproxy core':>12} {'proxy core':>10} {'replica core':>12} {'TTFT p50':>9} "
          f"{'ITL p50':>8}")
    for conc, rate, spent, chunks, data in rows:
        dur = data["duration"]
        per_core = chunks / spent["ingress"] if spent["ingress"] else float("nan")
        print(f"{conc:>4} {rate:>9.0f} {spent['ingress'] / dur:>12.2f} {per_core:>26.0f} "
              f"{spent.get('haproxy', 0) / dur:>12.2f} {spent['proxy'] / dur:>10.2f} "
              f"{spent['replica'] / dur:>12.2f} "
              f"{data['median_ttft_ms']:>8.1f}ms {data['median_itl_ms']:>6.1f}ms")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="8,32", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--itl-ms", type=float, default=10.0)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--prompts-per-concurrency", type=int, default=4)
    opts = p.parse_args()
    rows = measure(opts.concurrency, opts.itl_ms, opts.output_len, opts.prompts_per_concurrency)
    print_rows(rows, opts.itl_ms, opts.output_len)
    return 0


if __name__ == "__main__":
    sys.exit(main())
