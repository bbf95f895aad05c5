#!/usr/bin/env python
"""Where the stack's CPU goes, idle and under load: the idle CPU of each kind of
process, then py-spy (installed with Ray) samples the ingress and the model replica (HAProxy,
native, is only timed) while vLLM's client drives the stack, and this prints,
per process, the CPU it used and the share of its samples in each layer (Ray's core
worker and serialisation, Serve, the HTTP stack, this project, vLLM, Redis, asyncio).

    .venv/bin/python ops/bench/cpu_profile.py --concurrency 16 --seconds 20
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE))

from bench import (  # noqa: E402
    DEFAULT_SPEC,
    PYTHON_ROLES,
    client_command,
    cpu_seconds,
    local_stack,
    parse_args,
    serve_processes,
)

from cluster.config.catalog import load_spec  # noqa: E402
from cluster.config.settings import Settings  # noqa: E402
from cluster.tools.redis_server import free_port  # noqa: E402

# What a sampled frame's file says about the layer it belongs to; the first match wins.
LAYERS = (
    ("vllm", "(vllm/"), ("cluster", "(cluster/"), ("redis", "(redis/"),
    ("http (uvicorn, starlette, fastapi, sse)", ("(uvicorn/", "(starlette/", "(fastapi/",
                                                 "(sse_starlette/", "(h11/", "(httptools/")),
    ("serve", "(ray/serve/"), ("ray core (rpc, serialisation)", "(ray/"),
    ("asyncio", "(asyncio/"), ("pydantic", "(pydantic"), ("json", "(json/"),
)


# Leaves that are Python frames sitting in native code: py-spy (without --native) stops there.
NATIVE = (("native: Ray core worker threads (gRPC, serialisation)",
           ("Thread.run (threading", "Worker.main_loop", "_WorkItem.run", "_worker (concurrent")),
          ("native: event loop (uvloop, Serve's loops)",
           ("_run_user_code_event_loop", "_run_router_event_loop", "run_forever")))


def layer_of(frame: str) -> str:
    for name, marks in NATIVE:
        if any(m in frame for m in marks):
            return name
    for name, marks in LAYERS:
        if any(m in frame for m in ((marks,) if isinstance(marks, str) else marks)):
            return name
    return "other"


def leaf_layers(raw: Path) -> collections.Counter[str]:
    """py-spy's raw (collapsed) output: 'frame;frame;...;leaf COUNT' per line. The leaf's
    layer is where the time went; idle frames (waiting in epoll/select) are counted apart."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        leaf = frames[-1] if frames else ""
        idle = any(w in leaf for w in ("select", "epoll", "poll (", "wait (", "_wait_for"))
        counts["(idle)" if idle else layer_of(leaf)] += int(n)
    return counts


PY_SPY = str(Path(sys.executable).parent / "py-spy")  # Ray installs it beside python
PROCESS_KINDS = ("haproxy", "HAProxyManager", "ProxyActor", "ServeController", "Ingress",
                 "ServeReplica:llm:model", "EngineCore", "raylet", "gcs_server", "dashboard",
                 "DashboardAgent", "log_monitor", "monitor.py", "runtime_env", "valkey-server")


def idle_breakdown(seconds: float) -> collections.Counter[str]:
    """CPU (% of one core) of each kind of stack process while nothing is in flight."""
    procs = [p for p in psutil.process_iter(["cmdline"])
             if any(k in " ".join(p.info["cmdline"] or []) for k in PROCESS_KINDS)]
    before = {p.pid: sum(p.cpu_times()[:2]) for p in procs}
    time.sleep(seconds)
    out: collections.Counter[str] = collections.Counter()
    for p in procs:
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(p.cmdline())
            kind = next(k for k in PROCESS_KINDS if k in cmd)
            out[kind] += (sum(p.cpu_times()[:2]) - before[p.pid]) / seconds * 100
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", type=Path, default=DEFAULT_SPEC)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--idle-seconds", type=float, default=30)
    opts = p.parse_args()
    spec = load_spec(opts.spec)
    model_dir = spec.source.resolve(Settings().cache_dir)
    bench_args = parse_args(["--output-len", "64", "--input-len", "96"])
    work = Path(tempfile.mkdtemp(prefix="profile-"))
    with local_stack(spec, free_port()) as target:
        time.sleep(10)  # past the start-up work
        idle = idle_breakdown(opts.idle_seconds)
        print(f"idle, {opts.idle_seconds:.0f} s: {sum(idle.values()):.1f}% of one core: "
              + ", ".join(f"{k} {v:.1f}%" for k, v in idle.most_common() if v >= 0.1))
        procs = serve_processes()
        n = max(8, int(opts.concurrency * opts.seconds / 3))  # enough to outlast sampling
        cmd = client_command(target, spec, model_dir, bench_args, opts.concurrency, n,
                             work / "load.json")
        load = subprocess.Popen(cmd, env=os.environ | {"OPENAI_API_KEY": target.api_key},
                                stdout=(work / "load.log").open("w"), stderr=subprocess.STDOUT)
        time.sleep(3)  # past the first requests' ramp
        before = cpu_seconds(procs)
        spies = {k: subprocess.Popen([PY_SPY, "record", "--pid", str(v.pid), "--duration",
                                      str(int(opts.seconds)), "--rate", "50", "--format",
                                      "raw", "--nonblocking", "-o", str(work / f"{k}.txt")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for k, v in procs.items() if k in PYTHON_ROLES}
        for spy in spies.values():
            spy.wait()
        after = cpu_seconds(procs)
        with contextlib.suppress(Exception):
            load.kill()
    print(f"c={opts.concurrency}, {opts.seconds:.0f} s sampled; CPU as % of one core:")
    for name in procs:
        cpu = (after[name] - before[name]) / opts.seconds * 100
        if name not in PYTHON_ROLES:
            print(f"  {name:<8} {cpu:5.1f}%  (native)")
            continue
        counts = leaf_layers(work / f"{name}.txt")
        busy = sum(v for k, v in counts.items() if k != "(idle)") or 1
        shares = ", ".join(f"{k} {v / busy:.0%}" for k, v in counts.most_common()
                           if k != "(idle)" and v / busy >= 0.02)
        print(f"  {name:<8} {cpu:5.1f}%  busy samples by layer: {shares}")
    print(f"raw py-spy output: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
