"""Sharded scoring: a report run by torchrun with 2 gloo ranks equals the one-process report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

WORKER = Path(__file__).parent / "report_worker.py"


def test_two_gloo_ranks_give_the_scores_of_one_process(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs. " * 20)
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    subprocess.run([sys.executable, str(WORKER), str(text), str(single)], check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(WORKER), str(text), str(sharded)], check=True, timeout=120)
    one = json.loads((single / "scores.json").read_text())
    two = json.loads((sharded / "scores.json").read_text())
    assert two["complete"] and set(one["scores"]) == set(two["scores"])
    for name, score in one["scores"].items():
        assert two["scores"][name]["counts"] == score["counts"] == [[5] * 9] * 3
        for row_one, row_two in zip(score["values"], two["scores"][name]["values"]):
            assert row_two == pytest.approx(row_one, abs=1e-6), name
    assert (sharded / "report.html").exists() and (sharded / "views.html").exists()
