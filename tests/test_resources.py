"""Resources estimated before work: every long command refuses, in one line naming the setting to
lower and before any weight is read, a setting whose estimated peak memory exceeds what headlab may
use (``HEADLAB_MEMORY_BUDGET`` stands in for a smaller machine), and outputs that exceed the free
disk; the estimate itself is checked against a measured peak."""

import json
import subprocess
import sys
import time

import pytest

from headlab.cli import main
from headlab.core import resources
from headlab.core.resources import Forward, ModelSize, estimate, forward_bytes

SMOL = "smollm2-135m"
BUDGET = "3GiB"

# (command line with {d} for a scratch folder and {big} for a long text, the setting the line names)
TOO_BIG = [
    (f"report {SMOL} --tokens 4096 --windows 1 --out {{d}}/r", "--tokens or --needle-lengths"),
    (f"view {SMOL} --text-file {{big}} --out {{d}}/v.html", "the text's length or --max-tokens"),
    (f"atlas {SMOL} --tokens 8192 --windows 1 --out {{d}}/a", "--tokens"),
    (f"validate {SMOL} --scores {{d}}/scores.json --score retrieval --needle-lengths 8192 --out {{d}}/val",
     "--needle-lengths or --tokens"),
    (f"calibrate {SMOL} --task kv-recall --batch-size 4096 --out {{d}}/p.json", "--batch-size"),
    (f"eval {SMOL} --task kv-recall --batch-size 4096 --out {{d}}/e.json", "--batch-size"),
    (f"stream-eval {SMOL} --rules random --lengths 8192 --out {{d}}/se", "--lengths"),
    (f"train-gates {SMOL} --out {{d}}/g", "--max-length"),
    (f"convert {SMOL} --tokens 4096 --out {{d}}/c", "--tokens, --window or --gate-lengths"),
    (f"sae train {SMOL} --layers 3 --train-tokens 10000000 --buffer-tokens 10000000 --out {{d}}/s",
     "--buffer-tokens, --expansion or --tokens"),
    ("sae eval {d}/sae --tokens 8192 --windows 1 --out {d}/m.json", "--tokens"),
    ("sae dashboard {d}/sae --tokens 8192 --windows 1 --out {d}/f.html", "--tokens"),
]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    import torch

    from headlab.core.head_scores import HeadScores
    from headlab.sae import SparseAutoencoder, save_sae

    d = tmp_path_factory.mktemp("resources")
    (d / "big.txt").write_text("Some long text to look at. " * 2000)
    score = HeadScores("retrieval", torch.rand(30, 9), torch.ones(30, 9), SMOL).to_dict()
    (d / "scores.json").write_text(json.dumps({"format": "headlab-scores/1", "scores": {"retrieval": score}}))
    save_sae(SparseAutoencoder(576, 1152, "topk", 8, 9, 64), d / "sae", SMOL, 3, "o_proj input", 64, model_spec=SMOL)
    return d


@pytest.mark.parametrize("line, lower", TOO_BIG, ids=[line.split(" {")[0].split(" --")[0] for line, _ in TOO_BIG])
def test_a_setting_that_does_not_fit_is_refused_in_one_line_before_work(scratch, capsys, monkeypatch, line, lower):
    monkeypatch.setenv("HEADLAB_MEMORY_BUDGET", BUDGET)
    start = time.perf_counter()
    status = main(line.format(d=scratch, big=scratch / "big.txt").split())
    err = capsys.readouterr().err
    lines = [text for text in err.splitlines() if "error:" in text]
    assert status == 2 and len(lines) == 1, err
    assert "of memory at its peak" in lines[0] and f"3.0 GiB is HEADLAB_MEMORY_BUDGET; lower {lower}" in lines[0]
    assert time.perf_counter() - start < 30  # no weights were read
    assert not any(path.name in ("r", "a", "val", "se", "g", "c", "s") for path in scratch.iterdir())


def test_outputs_larger_than_the_free_disk_are_refused(scratch, capsys, monkeypatch):
    monkeypatch.setattr(resources, "free_disk", lambda folder: 1 << 20)
    status = main(["convert", SMOL, "--out", str(scratch / "c")])
    err = capsys.readouterr().err
    assert status == 2 and f"into {scratch / 'c'} but its disk has 1.0 MiB free" in err


def test_the_defaults_fit_the_budget_the_tests_assume(scratch, capsys, monkeypatch):
    """The refusals above come from the settings, not from a budget nothing fits: the same commands at
    small settings pass the check (and are stopped here before their work)."""
    from headlab.commands.base import all_commands

    monkeypatch.setenv("HEADLAB_MEMORY_BUDGET", BUDGET)
    for name in ("report", "convert", "stream-eval"):
        monkeypatch.setattr(all_commands()[name], "run", lambda self, args, checked: 0)
    assert main(["report", SMOL, "--tokens", "256", "--windows", "1", "--out", str(scratch / "r")]) == 0
    assert main(["convert", SMOL, "--tokens", "256", "--out", str(scratch / "c")]) == 0
    assert main(["stream-eval", SMOL, "--rules", "random", "--lengths", "1024", "--out", str(scratch / "se")]) == 0


def test_forward_bytes_grow_as_the_forward_does():
    size = ModelSize(parameters=10**8, n_layers=30, hidden=576, intermediate=1536, attention=960, vocab=49152)
    base = forward_bytes(size, Forward(1024))
    assert forward_bytes(size, Forward(2048)) == pytest.approx(2 * base, rel=1e-6)  # linear without maps
    assert forward_bytes(size, Forward(1024, grad=True)) > 4 * base
    assert forward_bytes(size, Forward(1024, logits="last")) < base / 4
    maps = forward_bytes(size, Forward(1024, maps=9)) - base
    assert maps == pytest.approx(resources.MARGIN * 9 * 1024 * 1024 * 4, rel=1e-6)
    assert estimate(size, [Forward(1024), Forward(64)]).memory == estimate(size, [Forward(1024)]).memory


# the peak of this process's own memory (VmHWM: ru_maxrss would carry the parent's over the fork)
MEASURE = """
import sys, torch
from headlab.surgeon import load_model
model, _ = load_model(sys.argv[1])
ids = torch.randint(10, 1000, (1, int(sys.argv[2])), generator=torch.Generator().manual_seed(0))
model(input_ids=ids, labels=ids).loss.backward()
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


@pytest.mark.slow
@pytest.mark.real_model
def test_the_estimate_bounds_a_measured_peak_from_above_without_waste():
    from headlab.surgeon.models import load_config, model_size

    done = subprocess.run([sys.executable, "-c", MEASURE, SMOL, "1024"], capture_output=True, text=True, check=True)
    measured = int(done.stdout.strip().splitlines()[-1])
    estimated = estimate(model_size(load_config(SMOL)[1]), [Forward(1024, grad=True)]).memory
    assert measured <= estimated <= 2 * measured, (measured, estimated)
