import pytest
"""The prepared GPU run is wired: its dry run (Triton's interpreter on the CPU, fp32, tiny shapes) loads
the kernels from this checkout without an installed headlab and passes every check."""

import json
import os
import subprocess
import sys

pytestmark = pytest.mark.slow
from pathlib import Path

SUITE = Path(__file__).parents[1] / "benchmarks" / "gpu_suite.py"


def test_the_gpu_suite_dry_run_passes_every_check(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONNOUSERSITE": "1"}
    out = tmp_path / "suite.json"
    # -S: no site-packages .pth files, so headlab's editable install is invisible; torch and triton come in
    # through PYTHONPATH (as on the device machine, where only they are installed)
    import torch
    import triton

    env["PYTHONPATH"] = os.pathsep.join({str(Path(torch.__file__).parents[1]), str(Path(triton.__file__).parents[1])})
    run = subprocess.run([sys.executable, "-S", str(SUITE), "--dry-run", "--out", str(out)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert result["dry_run"] and result["all_passed"] and result["timings"] == {}
    ops = {row["op"] for row in result["checks"]}
    assert ops == {"attention_with_stats", "column_stats", "linear_attention", "hybrid_attention", "topk_encode",
                   "sparse_decode"}
    assert {row["field"] for row in result["checks"] if row["op"] == "hybrid_attention"} >= {"out", "grad_q", "grad_fk"}
    assert len(result["checks"]) >= 40
