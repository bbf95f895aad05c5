"""The benchmark as CI runs it: a short smoke run, this stack next to vLLM's own server,
both measured with vLLM's own client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.tools.checkout import REPO_ROOT
from cluster.tools.stack import LocalStack
from tests.integration.conftest import TINY_A


@pytest.mark.timeout(600)
def test_bench_smoke_side_by_side(stack: LocalStack, api_key: str, tmp_path: Path) -> None:
    spec = next(s for s in stack.specs if s.id == TINY_A)
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True)))
    out = tmp_path / "bench"
    run = subprocess.run(
        [sys.executable, str(REPO_ROOT / "ops" / "bench" / "bench.py"), "--smoke",
         "--spec", str(spec_file), "--stack-url", stack.base_url,
         "--api-key", "env:BENCH_KEY", "--out", str(out)],
        env=os.environ | {"BENCH_KEY": api_key}, capture_output=True, text=True, timeout=580)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    [result] = list(out.glob("bench-*.json"))
    data = json.loads(result.read_text())
    summaries = {s["target"]: s for s in data["summaries"]}
    assert set(summaries) == {"stack", "vllm"}
    for s in summaries.values():
        assert s["failed"] == 0 and s["output_tok_s"] > 0 and s["ttft_p50_ms"] > 0
        assert s["cpu_per_1k_total_s"] > 0  # both targets' processes were found
    assert [r["concurrency"] for r in data["ratios"]] == [1]
    assert list(out.glob("bench-*.png"))
    assert "stack / vLLM" in run.stdout
