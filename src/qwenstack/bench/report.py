"""From request records to figures: throughput, latency percentiles, goodput; table, JSON, PNG."""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenstack.bench.loadgen import RunRecord
from qwenstack.errors import SetupError


@dataclass(frozen=True)
class Slo:
    """Latency objectives a request must meet to count towards goodput (ms; None: no limit)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2e_ms))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    position = (len(sorted_values) - 1) * q
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def distribution_ms(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    ordered = sorted(values)
    return {
        "mean": statistics.fmean(ordered) * 1000,
        "median": percentile(ordered, 0.5) * 1000,
        "p90": percentile(ordered, 0.9) * 1000,
        "p99": percentile(ordered, 0.99) * 1000,
    }


def summarize(run: RunRecord, slo: Slo | None = None) -> dict[str, Any]:
    slo = slo or Slo()
    ok = [r for r in run.records if r.error is None]
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    tpots = [t for r in ok if (t := r.tpot) is not None]
    good = [r for r in ok if _meets(r, slo)]
    duration = run.duration or float("nan")
    return {
        "target": run.target,
        "load": run.load.label,
        # None for an unbounded rate (all at once): JSON has no infinity, a plot no place for it.
        "load_value": run.load.value if math.isfinite(run.load.value) else None,
        "requests": len(run.records),
        "completed": len(ok),
        "errors": len(run.records) - len(ok),
        "error_kinds": dict(Counter(r.error for r in run.records if r.error).most_common(5)),
        "usage_reported": all(r.usage_reported for r in ok),
        "duration_s": run.duration,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration,
        "goodput": len(good) / duration if slo.any else None,
        "ttft_ms": distribution_ms([r.ttft for r in ok]),
        "tpot_ms": distribution_ms(tpots),
        "itl_ms": distribution_ms([itl for r in ok for itl in r.itls()]),
        "e2e_ms": distribution_ms([r.latency for r in ok]),
    }


def _meets(record: Any, slo: Slo) -> bool:
    tpot = record.tpot
    return (
        (slo.ttft_ms is None or record.ttft * 1000 <= slo.ttft_ms)
        and (slo.tpot_ms is None or tpot is None or tpot * 1000 <= slo.tpot_ms)
        and (slo.e2e_ms is None or record.latency * 1000 <= slo.e2e_ms)
    )


def ratios(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """first / second, per load: how the first target compares (e.g. gateway / direct)."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    return {
        "load": first["load"],
        "of": f"{first['target']}/{second['target']}",
        "output_throughput": ratio(first["output_throughput"], second["output_throughput"]),
        "request_throughput": ratio(first["request_throughput"], second["request_throughput"]),
        "ttft_median": ratio(first["ttft_ms"]["median"], second["ttft_ms"]["median"]),
        "tpot_median": ratio(first["tpot_ms"]["median"], second["tpot_ms"]["median"]),
        "e2e_median": ratio(first["e2e_ms"]["median"], second["e2e_ms"]["median"]),
    }


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(summaries: Sequence[dict[str, Any]]) -> str:
    header = ("load", "target", "ok", "err", "req/s", "out tok/s", "goodput", "TTFT med",
              "TTFT p99", "TPOT med", "ITL med", "ITL p99", "E2E med")
    rows = [header] + [
        (s["load"], s["target"], str(s["completed"]), str(s["errors"]),
         _num(s["request_throughput"], 2), _num(s["output_throughput"]), _num(s["goodput"], 2),
         _num(s["ttft_ms"]["median"]), _num(s["ttft_ms"]["p99"]), _num(s["tpot_ms"]["median"], 2),
         _num(s["itl_ms"]["median"], 2), _num(s["itl_ms"]["p99"], 2), _num(s["e2e_ms"]["median"]))
        for s in summaries
    ]
    errors = [
        f"  {s['load']} {s['target']}: {count} x {kind}"
        for s in summaries for kind, count in s["error_kinds"].items()
    ]
    return "\n".join(
        [_columns(rows), "(latencies in ms)", *(["errors:"] + errors if errors else [])]
    )


def ratio_table(all_ratios: Sequence[dict[str, Any]]) -> str:
    rows = [("load", "ratio", "out tok/s", "req/s", "TTFT med", "TPOT med", "E2E med")] + [
        (r["load"], r["of"], _num(r["output_throughput"], 3), _num(r["request_throughput"], 3),
         _num(r["ttft_median"], 3), _num(r["tpot_median"], 3), _num(r["e2e_median"], 3))
        for r in all_ratios
    ]
    return _columns(rows)


def _columns(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    # Every row has the header's columns; the first two are labels (left), the rest numbers.
    return "\n".join(
        "  ".join(
            cell.rjust(w) if i > 1 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    )


def write_json(
    path: Path, meta: dict[str, Any], summaries: list[dict], all_ratios: list[dict]
) -> None:
    document = {"meta": meta, "results": summaries, "ratios": all_ratios}
    path.write_text(json.dumps(document, indent=2))


def plot(path: Path, summaries: Sequence[dict[str, Any]], x_label: str) -> None:
    """Latency and throughput against load, one line per target."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SetupError("PNG plots need matplotlib: pip install 'qwenstack[bench]'") from None
    panels = [
        ("output tokens/s", lambda s: s["output_throughput"]),
        ("TTFT median (ms)", lambda s: s["ttft_ms"]["median"]),
        ("TTFT p99 (ms)", lambda s: s["ttft_ms"]["p99"]),
        ("TPOT median (ms)", lambda s: s["tpot_ms"]["median"]),
        ("ITL p99 (ms)", lambda s: s["itl_ms"]["p99"]),
        ("E2E median (ms)", lambda s: s["e2e_ms"]["median"]),
    ]
    figure, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    targets = list(dict.fromkeys(s["target"] for s in summaries))
    xs = [s["load_value"] for s in summaries if s["load_value"]]
    # Sweeps like 1, 8, 32 read best on a log axis.
    log_x = bool(xs) and max(xs) / min(xs) >= 4
    for ax, (title, value) in zip(axes.flat, panels, strict=True):
        for target in targets:
            points = [(s["load_value"], value(s)) for s in summaries if s["target"] == target]
            points = [(x, y) for x, y in points if x is not None and y is not None]
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=target)
        if log_x:
            ax.set_xscale("log", base=2)
        ax.set_title(title)
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
