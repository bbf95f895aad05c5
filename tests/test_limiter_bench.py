"""The limiter benchmark runs end to end (a smoke test; its figures are not asserted)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from cluster.tools.checkout import REPO_ROOT


def load_bench() -> ModuleType:
    path = Path(REPO_ROOT) / "ops" / "bench" / "limiter_bench.py"
    spec = importlib.util.spec_from_file_location("limiter_bench", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["limiter_bench"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_bench_prints_both_levels_side_by_side(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_bench()
    assert bench.main(["--requests", "100", "--json"]) == 0  # starts its own Redis
    out = json.loads(capsys.readouterr().out)
    seen = {(r["gate"], r["clients"]) for r in out["rows"]}
    assert seen == {(g, c) for g in ("off", "redis", "redis+all", "redis+budget")
                    for c in (1, 50)}
    assert all(r["requests"] >= 50 and r["total_p99_ms"] >= r["total_p50_ms"] > 0
               for r in out["rows"])
    assert out["server_usec_per_evalsha"] > 0
