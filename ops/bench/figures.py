"""The benchmark's figures: one run of vLLM's client against one target at one concurrency,
the medians over rounds, the ratio table and the plot. Pure functions (no network), so
tests/test_bench.py covers them.

Metric names are vLLM's (``vllm bench serve``): TTFT, TPOT, ITL, E2EL, output tokens/s.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# (field of Summary, column title, higher is better)
RATIO_COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("output_tok_s", "tok/s", True),
    ("ttft_p50_ms", "TTFT p50", False),
    ("ttft_p99_ms", "TTFT p99", False),
    ("itl_p50_ms", "ITL p50", False),
    ("tpot_p50_ms", "TPOT p50", False),
    ("cpu_per_1k_total_s", "CPU/1k tok", False),
    ("cpu_per_1k_marginal_s", "marginal CPU/1k", False),
)


@dataclass(frozen=True)
class Run:
    """One ``vllm bench serve`` run, with the CPU the target spent outside its engine."""

    target: str
    concurrency: int
    round: int
    completed: int
    failed: int
    output_tokens: int
    duration_s: float
    output_tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    tpot_p50_ms: float
    e2el_p50_ms: float
    cpu_s: float  # CPU seconds of the target's processes outside the engine core, this run
    idle_cpu_per_s: float  # the same processes' CPU per second while idle, just before

    @classmethod
    def from_result(cls, target: str, concurrency: int, round_: int, result: dict[str, Any],
                    cpu_s: float, idle_cpu_per_s: float) -> Run:
        """From the JSON ``vllm bench serve --save-result`` writes."""
        return cls(target, concurrency, round_, int(result["completed"]),
                   int(result.get("failed", 0)), int(result["total_output_tokens"]),
                   float(result["duration"]), float(result["output_throughput"]),
                   float(result["median_ttft_ms"]), float(result["p99_ttft_ms"]),
                   float(result["median_itl_ms"]), float(result["median_tpot_ms"]),
                   float(result["median_e2el_ms"]), cpu_s, idle_cpu_per_s)

    def cpu_per_1k(self, marginal: bool) -> float:
        spent = self.cpu_s - (self.idle_cpu_per_s * self.duration_s if marginal else 0.0)
        return max(0.0, spent) / max(1, self.output_tokens) * 1000


@dataclass(frozen=True)
class Summary:
    """The medians of one target at one concurrency over the rounds."""

    target: str
    concurrency: int
    rounds: int
    failed: int
    output_tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    tpot_p50_ms: float
    e2el_p50_ms: float
    cpu_per_1k_total_s: float
    cpu_per_1k_marginal_s: float


def summarize(runs: Iterable[Run]) -> list[Summary]:
    groups: dict[tuple[str, int], list[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.target, run.concurrency)].append(run)
    out = []
    for (target, conc), rs in sorted(groups.items()):
        def med(field: str, rs: list[Run] = rs) -> float:
            return statistics.median(getattr(r, field) for r in rs)

        out.append(Summary(
            target, conc, len(rs), sum(r.failed for r in rs), med("output_tok_s"),
            med("ttft_p50_ms"), med("ttft_p99_ms"), med("itl_p50_ms"), med("tpot_p50_ms"),
            med("e2el_p50_ms"), statistics.median(r.cpu_per_1k(False) for r in rs),
            statistics.median(r.cpu_per_1k(True) for r in rs)))
    return out


def ratio(value: float, base: float) -> float:
    return value / base if base else math.nan


def ratio_rows(summaries: list[Summary], target: str, baseline: str) -> list[dict[str, Any]]:
    """Per concurrency: target / baseline of every column, and the TTFT difference."""
    by = {(s.target, s.concurrency): s for s in summaries}
    rows = []
    for conc in sorted({s.concurrency for s in summaries}):
        mine, base = by.get((target, conc)), by.get((baseline, conc))
        if mine is None or base is None:
            continue
        row: dict[str, Any] = {"concurrency": conc}
        for field, _, _ in RATIO_COLUMNS:
            row[field] = ratio(getattr(mine, field), getattr(base, field))
        row["ttft_p50_delta_ms"] = mine.ttft_p50_ms - base.ttft_p50_ms
        rows.append(row)
    return rows


def as_json(runs: list[Run], summaries: list[Summary], ratios: list[dict[str, Any]],
            idle: dict[str, float], meta: dict[str, Any]) -> dict[str, Any]:
    return {"meta": meta, "idle_cpu_per_s": idle, "runs": [asdict(r) for r in runs],
            "summaries": [asdict(s) for s in summaries], "ratios": ratios}


def write_plot(summaries: list[Summary], path: Path) -> None:
    """tok/s and TTFT p50 against concurrency, one line per target."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers or CI
    import matplotlib.pyplot as plt

    fig, (ax_tput, ax_ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    for target in sorted({s.target for s in summaries}):
        mine = [s for s in summaries if s.target == target]
        xs = [s.concurrency for s in mine]
        ax_tput.plot(xs, [s.output_tok_s for s in mine], marker="o", label=target)
        ax_ttft.plot(xs, [s.ttft_p50_ms for s in mine], marker="o", label=target)
    ticks = sorted({s.concurrency for s in summaries})
    for ax, label, title in ((ax_tput, "output tokens/s", "Throughput"),
                             (ax_ttft, "TTFT p50 (ms)", "Time to first token")):
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        ax.set_title(title)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
