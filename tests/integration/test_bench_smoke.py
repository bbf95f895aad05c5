"""The benchmark as CI runs it: a short smoke run, this stack next to vLLM's own server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cluster.tools.checkout import REPO_ROOT
from cluster.tools.redis_server import free_port
from cluster.tools.stack import LocalStack
from tests.integration.conftest import TINY_A


def test_bench_smoke_side_by_side(stack: LocalStack, api_key: str, tiny_model: Path,
                                  tmp_path: Path) -> None:
    out = tmp_path / "bench"
    run = subprocess.run(
        [sys.executable, str(REPO_ROOT / "ops" / "bench" / "bench.py"), "--smoke",
         "--target", f"cluster={stack.base_url}/v1", "--key", "cluster=env:BENCH_KEY",
         "--model", TINY_A, "--spawn-vllm", f"{tiny_model}:{free_port()}",
         "--spawn-max-model-len", "1024", "--out", str(out)],
        env=os.environ | {"BENCH_KEY": api_key}, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    [result] = list(out.glob("bench-*.json"))
    data = json.loads(result.read_text())
    assert set(data["results"]) == {"cluster", "vllm"}
    for levels in data["results"].values():
        [level] = levels  # --smoke: one concurrency level
        assert level["ok"] == level["requests"] == 2 and level["errors"] == 0
        assert level["ttft_p50_ms"] > 0 and level["output_tokens"] > 0
    assert data["ratios"]
    assert list(out.glob("bench-*.png"))
    assert "TTFT" in run.stdout
