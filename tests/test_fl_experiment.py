"""Smoke run of the end-to-end experiment (examples/fl_experiment): 2 clients, 2 rounds, gradzip at
rel 1e-3, through a real Flower SuperLink and two SuperNode processes on 127.0.0.1."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

RUN = Path(__file__).resolve().parent.parent / "examples" / "fl_experiment" / "run.py"


def test_smoke_run_through_superlink_and_supernodes(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(RUN), "--smoke", "--engine", "deployment", "--out", str(out),
                           "--timeout", "400"], capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["settings"]["engine"] == "deployment"
    (summary,) = result["configurations"]
    assert summary["name"] == "gradzip rel 0.001"
    assert len(summary["per_round"]) == 2 and all(e["clients"] == 2 for e in summary["per_round"])
    assert summary["failures"] == 0 and summary["resets"] == 0
    assert summary["ratio"] > 2  # the replies really were compressed
    assert summary["final_accuracy"] > 0.5  # and training worked on what the server decoded
    assert summary["upload_reduction_pct@1"] > 0
    assert (out / "accuracy.png").stat().st_size > 10_000
    assert "gradzip rel 0.001" in (out / "results.md").read_text()
