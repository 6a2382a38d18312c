"""The GPU benchmark script: its CPU smoke run writes every row, and its profiler summary counts
kernels on a GPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_gpu  # noqa: E402


@pytest.mark.heavy
def test_the_smoke_run_measures_every_cpu_backend(tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    argv = ["bench_gpu.py", "--preset", "micro", "--device", "cpu", "--no-compile", "--fast-pieces", "eager"]
    monkeypatch.setattr(
        sys, "argv", [*argv, "--batches", "2", "--ablation-batches", "2", "--twin-batches", "2", "--steps", "3"]
    )
    sys.argv += ["--out", str(out)]
    bench_gpu.main()
    results = json.loads(out.read_text())
    rows = {row["backend"]: row for row in results["rows"]}
    fast_rows = {"featinv fast", "featinv fast, one stream", "featinv fast, eager pieces", bench_gpu.AS_STORED}
    fast_rows.add(bench_gpu.TWIN)
    assert set(rows) == {"diffusers eager", "featinv eager", *fast_rows} and results["device"] == "cpu"
    assert results["rows"][-1]["backend"] == bench_gpu.AS_STORED  # the costly ablation after the target rows
    assert rows[bench_gpu.AS_STORED]["speedup_vs_diffusers_eager"] > 0  # ratios reach rows of a later pass
    # the same computation: the diffusers loop, featinv's and every fast row agree on the final latents
    for name in ["diffusers eager", *fast_rows]:
        assert rows[name]["max_abs_diff_vs_featinv_eager"] < 1e-4 * max(1.0, rows["featinv eager"]["max_abs_latent"])
    assert all(row["step_ms"] > 0 and row["reconstruction_ms"] > 0 for row in rows.values())
    assert results["flops_per_step"]["2"] > 0


def test_a_failing_row_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    argv = ["bench_gpu.py", "--preset", "micro", "--device", "cpu", "--no-compile", "--no-fast", "--batches", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--steps", "2", "--out", str(out)])

    def broken(*_):
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(bench_gpu, "diffusers_eager", broken)
    bench_gpu.main()
    rows = {row["backend"]: row for row in json.loads(out.read_text())["rows"]}
    assert "no such kernel" in rows["diffusers eager"]["error"]
    assert rows["featinv eager"]["step_ms"] > 0 and "speedup_vs_diffusers_eager" not in rows["featinv eager"]


@pytest.mark.gpu
def test_the_profile_counts_the_kernels_of_a_step():
    a = torch.randn(256, 256, device="cuda")
    found = bench_gpu.profile_step(lambda: (a @ a).relu_(), replays=4)
    assert found["kernels_per_step"] >= 2 and found["kernel_us_per_step"] > 0
    assert found["top"] and found["top"][0]["calls_per_step"] >= 1


@pytest.mark.heavy
def test_the_kernel_counter_counts_generated_kernel_calls():
    import count_step_kernels

    def fn(a):  # sin, then a matmul (extern), then cos: two generated kernels around one extern call
        return (a.sin() @ a).cos()

    torch._dynamo.reset()
    with count_step_kernels.GeneratedCalls() as found:
        torch.compile(fn)(torch.randn(8, 8))
    assert found.calls == 2
    torch._dynamo.reset()
