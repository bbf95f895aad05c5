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


def main() -> int:
    import subprocess

    from cluster.tools.redis_server import free_port

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="8,32", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--itl-ms", type=float, default=10.0)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--prompts-per-concurrency", type=int, default=4)
    opts = p.parse_args()
    os.environ["STAND_IN_ITL_MS"] = str(opts.itl_ms)  # read by the replica's stand-in
    base = load_spec(DEFAULT_SPEC)
    tokenizer = base.source.resolve(Settings().cache_dir)  # the client counts tokens with it
    spec = ModelSpec.model_validate(base.model_dump(mode="json") | {
        "source": {"path": tokenizer}, "max_ongoing_requests": 256})
    rows = []
    with local_stack(spec, free_port(), engine_cls=StandInEngine) as target:
        procs = serve_processes()
        args = parse_args(["--output-len", str(opts.output_len), "--input-len", "32"])
        work = Settings().cache_dir / "capacity"
        work.mkdir(parents=True, exist_ok=True)
        for conc in opts.concurrency:
            result = work / f"c{conc}.json"
            cmd = client_command(target, spec, tokenizer, args, conc,
                                 conc * opts.prompts_per_concurrency, result)
            before = cpu_seconds(procs)
            run = subprocess.run(cmd, env=os.environ | {"OPENAI_API_KEY": target.api_key},
                                 capture_output=True, text=True, timeout=1800)
            after = cpu_seconds(procs)
            if run.returncode != 0:
                print(run.stderr[-3000:], file=sys.stderr)
                return 1
            data = json.loads(result.read_text())
            chunks = int(data["total_output_tokens"])  # one token per chunk
            spent = {k: after[k] - before[k] for k in procs}
            rows.append((conc, chunks / data["duration"], spent, chunks, data))
    print(f"stand-in engine: one token every {opts.itl_ms:g} ms per stream, "
          f"{opts.output_len} tokens per request")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
