"""Smoke tests of the benchmarks: they run at tiny sizes and agree with their baselines.

Nothing here asserts a timing (STYLE.md: tests check behaviour, benchmarks measure speed).
The C++ harness is only run when it was already built (scripts/build_bench.sh, which
scripts/bench_smoke.sh runs in CI); building it here would take a minute.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "build" / "bench" / "lora_ext_bench"


@pytest.mark.skipif(not HARNESS.is_file(), reason="harness not built (scripts/build_bench.sh)")
def test_cpp_harness_tiny(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [str(HARNESS), "--tiny", "--device", "cpu", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    names = {r["workload"] for r in data["results"]}
    assert {"W1", "W2", "W3", "W4", "W5-fwd", "W5-fwd+bwd", "W6-fp32", "W6-bf16"} <= names
    assert all(r["check_ok"] for r in data["results"])
    assert data["ceilings"]["cpu"]["copy_gbps"] > 0


@pytest.mark.skipif(not HARNESS.is_file(), reason="harness not built (scripts/build_bench.sh)")
def test_cpp_harness_rejects_bad_arguments():
    proc = subprocess.run([str(HARNESS), "--workloads", "W9"], capture_output=True, text=True)
    assert proc.returncode == 2 and "W9" in proc.stderr


def test_python_runner_tiny(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--tiny", "--device", "cpu",
         "--workloads", "W1,W2,W3,W4,W5,W6", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "latest.json").read_text())
    results = data["results"]
    assert {r["workload"] for r in results} >= {"W1", "W3", "W5-fwd+bwd", "W6-fp32"}
    assert all(r["check_ok"] for r in results)
    assert (tmp_path / "latest.md").read_text().startswith("#")
    assert (tmp_path / "latest.png").stat().st_size > 0
