"""The memory estimate every command checks before its work (headlab.core.resources) against the
peak actually measured: one forward (and backward) of a bundled model at several lengths, each in a
fresh process (its peak resident memory), beside the estimate of the same run. Prints one line per
run and writes benchmarks/results/memory_estimate.json.

    python benchmarks/memory_estimate.py [--models smollm2-135m,gemma3-270m] [--lengths 512,2048,4096]

A run whose estimate exceeds the memory available is skipped and recorded as such (that is the
estimate doing its job). Cost: about five minutes on two CPU cores at the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

# the peak of the run's own process (VmHWM: ru_maxrss would carry this parent's over the fork)
RUN = """
import json, sys, torch
from headlab.surgeon import load_model
spec, tokens, grad = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
model, _ = load_model(spec)
ids = torch.randint(10, 1000, (1, tokens), generator=torch.Generator().manual_seed(0))
with torch.set_grad_enabled(grad):
    out = model(input_ids=ids, labels=ids)
    if grad:
        out.loss.backward()
print(json.dumps({"peak": next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                               if line.startswith("VmHWM:"))}))
"""


def main() -> None:
    from headlab.core.resources import Forward, available_memory, estimate, format_bytes
    from headlab.surgeon.models import load_config, model_size

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--lengths", default="512,2048,4096")
    args = parser.parse_args()
    rows = []
    for spec in args.models.split(","):
        size = model_size(load_config(spec)[1])
        for tokens in map(int, args.lengths.split(",")):
            for grad in (False, True):
                estimated = estimate(size, [Forward(tokens, grad=grad)]).memory
                row = {"model": spec, "tokens": tokens, "backward": grad, "estimated": estimated}
                if estimated > available_memory()[0]:
                    row["measured"] = None
                    print(f"{spec} {tokens} {'fwd+bwd' if grad else 'fwd'}: estimate {format_bytes(estimated)} exceeds "
                          "the memory available; not run")
                else:
                    done = subprocess.run([sys.executable, "-c", RUN, spec, str(tokens), "1" if grad else "0"],
                                          capture_output=True, text=True, check=True,
                                          env={**os.environ, "OMP_NUM_THREADS": "1"})
                    row["measured"] = json.loads(done.stdout.strip().splitlines()[-1])["peak"]
                    row["estimate_over_measured"] = round(estimated / row["measured"], 3)
                    print(f"{spec} {tokens} {'fwd+bwd' if grad else 'fwd'}: measured {format_bytes(row['measured'])}, "
                          f"estimated {format_bytes(estimated)} ({row['estimate_over_measured']}x)")
                rows.append(row)
    out = Path(__file__).with_name("results") / "memory_estimate.json"
    out.write_text(json.dumps({"format": "headlab-benchmark/1", "benchmark": "memory_estimate",
                               "machine": platform.processor() or platform.machine(), "runs": rows}, indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
