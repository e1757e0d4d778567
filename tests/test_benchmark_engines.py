"""benchmarks/engines.py runs end to end with --quick (tiny model, 128², torch and onnxruntime)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_engines_benchmark_runs_quick_and_prints_its_table(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), NAPARI_SGDC_ENGINE_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "engines.py"), "--quick", "--save-auto"],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "# CPU:" in out and "fp32 peak = " in out and "GFLOP (convolutions + matrix products)" in out
    rows = [line for line in out.splitlines() if line.startswith("| torch | fp32 |")]
    assert len(rows) == 1
    assert float(rows[0].split("|")[6]) <= 1e-3  # torch against itself
    assert "roofline torch fp32:" in out and "# auto (fp32) on this CPU:" in out
    assert (tmp_path / "cache" / "auto.json").exists()
