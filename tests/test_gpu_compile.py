"""Every launched Triton kernel compiles for a real GPU (sm_90: H100/H200) on this GPU-less machine.

The interpreter tests check the kernels' numbers but not that Triton can lower them for a GPU:
tl ops the interpreter accepts may not lower, and tiles may not fit a block's shared memory.
``gpu_compile_worker.py`` drives the launchers with launches intercepted and compiles each one
ahead of time down to a cubin with ``ptxas`` (see its docstring); here it compiles the widest
configurations (``--sweep`` compiles all of them, run by hand after changing a kernel).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

KERNELS = Path(__file__).parents[1] / "kernels"
WORKER = Path(__file__).parent / "gpu_compile_worker.py"


def launched_kernels() -> set[str]:
    """Names of the ``@triton.jit`` functions launched with ``name[grid](...)`` in kernels/."""
    names = set()
    for path in KERNELS.glob("*_triton.py"):
        source = path.read_text()
        names |= {name for name in re.findall(r"@triton\.jit\ndef (\w+)\(", source) if f"{name}[" in source}
    return names


TRITON36 = Path(__file__).parents[1] / ".venv-triton36" / "bin" / "python"


def pythons():
    """This environment's Python, and the Triton 3.6 environment's (the GPU machine's release) where
    setup.sh --tests built it; CI (HEADLAB_REQUIRE_TRITON36=1) fails when it is missing."""
    found = [pytest.param(sys.executable, id="this-environment")]
    if TRITON36.exists() or os.environ.get("HEADLAB_REQUIRE_TRITON36") == "1":
        found.append(pytest.param(str(TRITON36), id="triton-3.6"))
    return found


@pytest.mark.parametrize("python", pythons())
def test_every_kernel_compiles_for_sm90_and_fits_shared_memory(python):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    assert Path(python).exists(), f"{python} is missing: run bash scripts/setup.sh --tests"
    result = subprocess.run([python, str(WORKER)], env=env, capture_output=True, text=True, timeout=900)
    assert result.stdout.strip(), result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert not report["failed"], json.dumps(report["failed"], indent=1)[:4000]
    assert set(report["compiled"]) == launched_kernels()
    assert result.returncode == 0
