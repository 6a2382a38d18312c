"""The web-app latency benchmark: a smoke run against ``featinv serve`` on the CPU measures both
models' slider sweeps, and a backend that cannot start is recorded while the run goes on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_webapp.py"


@pytest.mark.heavy
def test_the_smoke_run_times_both_models_and_records_a_failed_backend(tmp_path):
    out = tmp_path / "webapp.json"
    command = [sys.executable, str(SCRIPT), "--backends", "eager", "tensorrt", "--device", "cpu", "--moves", "2"]
    run = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    results = json.loads(out.read_text())
    assert results["strengths"] == [-0.5, 1.5]
    eager, failed = results["rows"]
    assert eager["startup_s"] > 0
    for mode in ("spatial", "pooled"):
        assert eager[mode]["moves"] == 2 and 0 < eager[mode]["median_s"] <= eager[mode]["worst_s"]
    assert failed["backend"] == "tensorrt" and "invalid choice: 'tensorrt'" in failed["error"]
    assert "tensorrt   failed" in run.stdout


@pytest.mark.heavy
def test_the_concurrent_clients_mode_reports_both_modes_side_by_side(tmp_path):
    out = tmp_path / "clients.json"
    command = [sys.executable, str(SCRIPT), "--clients", "3", "--moves", "1", "--device", "cpu", "--out", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    results = json.loads(out.read_text())
    unbatched, batched = results["rows"]
    assert (unbatched["batching"], batched["batching"]) == (False, True)
    for row in results["rows"]:
        assert row["requests"] == 3 and 0 < row["median_s"] <= row["p90_s"] and row["requests_per_s"] > 0
    assert results["throughput_ratio"] == batched["requests_per_s"] / unbatched["requests_per_s"]
    assert "throughput batched / unbatched" in run.stdout


@pytest.mark.heavy
def test_the_previews_mode_times_both_ways_in_one_run(tmp_path):
    out = tmp_path / "previews.json"
    command = [sys.executable, str(SCRIPT), "--previews", "--moves", "2", "--device", "cpu", "--out", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    (row,) = json.loads(out.read_text())["rows"]
    for way in ("on", "off"):
        assert row[f"previews_{way}"]["moves"] == 2 and row[f"previews_{way}"]["median_s"] > 0
    assert 1 <= row["previews_per_move"] <= row["steps"]  # at least one preview before each final picture
    assert row["ratio_on_off"] == row["previews_on"]["median_s"] / row["previews_off"]["median_s"]
    assert "on / off:" in run.stdout
