"""The one CPU line every benchmark prints (`napari_sgdc.device.cpu_description`)."""

import os
import subprocess
import sys

from napari_sgdc.device import cpu_description
from napari_sgdc.engines import cpu_key


def test_cpu_description_names_the_isa_torch_runs_with():
    line = cpu_description()
    assert "; flags: " in line and "; runs: torch " in line
    assert ("bf16 native" in line) or ("bf16 not native" in line)
    assert cpu_key() == line  # the `auto` table is keyed by what actually runs


def test_a_capped_isa_is_reported_and_turns_bf16_off():
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    out = subprocess.run([sys.executable, "-c", "from napari_sgdc.device import cpu_description as d; print(d())"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert "oneDNN capped at AVX2" in out
    assert "bf16 not native" in out
    assert "runs: torch AVX2" in out or "runs: torch DEFAULT" in out  # a CPU without AVX2 reports DEFAULT
