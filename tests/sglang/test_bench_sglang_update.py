"""benchmarks/bench_sglang_update.py end to end on SGLang's real engine (CPU), tiny: buckets of three sizes go
through our adapter, the figures come back in its JSON, and the engine holds the pushed weights afterwards
(the benchmark exits 1 otherwise). The figures themselves are docs/performance.md's, not asserted here."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.sglang
REPO = Path(__file__).resolve().parents[2]


def test_benchmark_pushes_through_the_real_engine(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_sglang_update.py"), "--layers", "2",
                           "--hidden", "128", "--ffn", "256", "--sizes-mb", "0.0005", "0.07", "0.3", "--repeats", "2",
                           "--json", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "engine weights equal the pushed ones after the sync: True" in proc.stdout
    data = json.loads(out.read_text())
    sizes = [r["mb"] for r in data["rows"]]
    assert len(sizes) == 3 and sizes == sorted(sizes) and sizes[0] < 0.01 < sizes[-1]
    for row in data["rows"]:
        assert row["total_s"] > 0 and row["ours_s"] > 0 and row["sglang_s"] == pytest.approx(
            row["total_s"] - row["ours_s"])
    assert {"fixed_ms", "ms_per_mb"} <= set(data["total"]) and data["fp8_copies"] > 0
