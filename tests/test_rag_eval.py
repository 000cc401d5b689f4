"""`qwenstack kb eval` on the first 20 paragraphs of CMRC 2018 (82 questions).

Floors are below the figures measured on this subset (dense 0.902, BM25 1.000, hybrid 0.988
recall@5, README) by a margin for numeric differences between machines.
"""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from qwenstack.cli import app

CMRC = Path(__file__).parent / "data" / "cmrc2018_trial_first20.json"
RECALL_AT_5_FLOORS = {"dense": 0.8, "bm25": 0.93, "hybrid": 0.93}


def test_eval_subset_meets_recall_floors() -> None:
    # In this process rather than a new one: torch and sentence-transformers are imported already
    # (by the other RAG tests), which saves half a minute on a busy machine.
    result = CliRunner().invoke(app, ["kb", "eval", str(CMRC), "--paragraphs", "20", "--json"])
    assert result.exit_code == 0, result.output[-3000:]
    assert "━" not in result.output  # no progress bar without a terminal (test_console.py)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["paragraphs"] == 20 and report["questions"] == 82
    assert report["chunks"] >= 20 and report["chunks_per_s"] > 0
    for mode, floor in RECALL_AT_5_FLOORS.items():
        scores = report["modes"][mode]
        assert scores["recall_at_5"] >= floor, (mode, scores)
        assert scores["recall_at_1"] <= scores["recall_at_5"] and 0 < scores["mrr_at_10"] <= 1
