"""Time the README's tour: every command's one-minute variant on SmolLM2-135M, in order, in a fresh folder.

    .venv/bin/python scripts/tour.py [--out examples/results/tour_smollm2.json] [--workdir DIR]

Each step runs the ``headlab`` of this environment as a new process, as a user would type it, in one
working folder (a temporary one unless ``--workdir`` names a new folder), and is timed by the wall
clock; a step that fails stops the tour. The JSON records every step's command, the command at its
defaults with the cost its ``--help`` states, the seconds it took, the machine (CPU, cores, load
before and after) and the total, and the script prints the block of commands the README shows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEADLAB = str(Path(sys.executable).with_name("headlab"))
TEXT = ("Attention heads route information between positions. Some copy the previous token, some attend to "
        "the first token as a sink, some retrieve a fact from far back in the context. ") * 4

# (what it does, the command at its defaults, the one-minute variant); both run in one working folder
TOUR = [
    ("the bundled models", "headlab models", "headlab models"),
    ("score every head", "headlab report smollm2-135m --out report",
     "headlab report smollm2-135m --windows 4 --tokens 128 --families induction,retrieval --needle-lengths 512 "
     "--needles 2 --needle-depths 0.3,0.7 --out report"),
    ("validate the retrieval heads by masking",
     "headlab validate smollm2-135m --scores report/scores.json --score retrieval --out report",
     "headlab validate smollm2-135m --scores report/scores.json --score retrieval --ks 3 --random-sets 2 "
     "--needles 2 --needle-lengths 512 --needle-depths 0.5 --out report"),
    ("the report's page again, with the validation", "headlab report smollm2-135m --out report --page-only",
     "headlab report smollm2-135m --out report --page-only"),
    ("every head's map of a text", f"headlab view smollm2-135m --text {shlex.quote(TEXT[:120])} --out view.html",
     f"headlab view smollm2-135m --text {shlex.quote(TEXT)} --out view.html"),
    ("ACT's head search", "headlab calibrate smollm2-135m --task kv-recall --out plan.json",
     "headlab calibrate smollm2-135m --task kv-recall --layers 11 --size 8 --out plan.json"),
    ("evaluate the plan", "headlab eval smollm2-135m --task kv-recall --plan plan.json --out eval.json",
     "headlab eval smollm2-135m --task kv-recall --size 8 --plan plan.json --out eval.json"),
    ("a streaming-heads plan",
     "headlab stream-plan smollm2-135m --scores report/scores.json --keep 0.25 --out stream.json",
     "headlab stream-plan smollm2-135m --scores report/scores.json --keep 0.25 --out stream.json"),
    ("save the model with the plan, reloadable", "headlab apply smollm2-135m --plan stream.json --out edited",
     "headlab apply smollm2-135m --plan stream.json --out edited"),
    ("the KV-cache trade-off", "headlab stream-eval smollm2-135m --scores report/scores.json --rules "
     "retrieval,random --out kv",
     "headlab stream-eval smollm2-135m --scores report/scores.json --rules retrieval,random --keeps 0.25 "
     "--random-sets 1 --lengths 512 --needles 1 --needle-depths 0.5 --windows 1 --out kv"),
    ("DuoAttention's gates", "headlab train-gates smollm2-135m --steps 60 --max-length 2048 --out gates",
     "headlab train-gates smollm2-135m --steps 4 --min-length 512 --max-length 512 --intervals 1 --passkeys 2 "
     "--passkey-words 8 --out gates"),
    ("an SAE on one layer's head outputs", "headlab sae train smollm2-135m --layers 12 --out sae-l12",
     "headlab sae train smollm2-135m --layers 12 --train-tokens 8192 --windows 2 --tokens 128 --out sae-l12"),
    ("the SAE's metrics", "headlab sae eval sae-l12 --out sae-l12/metrics.json",
     "headlab sae eval sae-l12 --windows 2 --tokens 128 --out sae-l12/metrics.json"),
    ("the SAE's latents", "headlab sae dashboard sae-l12 --out sae-l12/features.html",
     "headlab sae dashboard sae-l12 --top 4 --windows 2 --tokens 128 --out sae-l12/features.html"),
    ("the head atlas", "headlab atlas smollm2-135m --scores report/scores.json --out report",
     "headlab atlas smollm2-135m --scores report/scores.json --windows 2 --tokens 128 --out report"),
    ("LoLCATs conversion", "headlab convert smollm2-135m --to hybrid --data chat --out hybrid",
     "headlab convert smollm2-135m --to hybrid --layers 10-11 --steps 4,2 --accumulation 1 --windows 1 "
     "--tokens 128 --softmax-heads retrieval --scores report/scores.json --softmax-keep 0.5 --gate-needles 1 "
     "--gate-lengths 512 --out hybrid"),
    ("the converted model against its base", "headlab stream-eval hybrid --out hybrid-eval",
     "headlab stream-eval hybrid --lengths 512 --needles 1 --needle-depths 0.5 --windows 1 --out hybrid-eval"),
]


def machine() -> dict:
    """The CPU, its cores and the load averages now."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "load": list(os.getloadavg())}


def default_cost(command: str) -> str:
    """The sentence of the command's ``--help`` that states its cost."""
    words = shlex.split(command)[1:]
    name = words[:2] if words[0] == "sae" else words[:1]
    text = subprocess.run([HEADLAB, *name, "--help"], capture_output=True, text=True, check=True).stdout
    flat = " ".join(text.split())
    start = flat.find("Cost")
    return flat[start:flat.find(".", flat.find(":", start)) + 1] if start >= 0 else ""


def run_tour(workdir: Path, start: int = 0) -> list[dict]:
    """Run every step's one-minute variant from step ``start`` on in ``workdir``; the steps with their seconds."""
    steps = []
    for what, default, quick in TOUR[start:]:
        print(f"$ {quick}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        done = subprocess.run([HEADLAB, *shlex.split(quick)[1:]], cwd=workdir)
        seconds = time.perf_counter() - start
        if done.returncode:
            raise SystemExit(f"tour step failed (exit {done.returncode}): {quick}")
        steps.append({"what": what, "command": quick, "seconds": round(seconds, 1), "default": default,
                      "default_cost": default_cost(default)})
    return steps


def table(steps: list[dict]) -> str:
    """The README's block: each step's one-minute variant, its measured seconds in a comment."""
    lines = [f"{s['command']}  # {s['seconds']:.0f} s" for s in steps]
    return "```bash\n" + "\n".join(lines) + "\n```"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="examples/results/tour_smollm2.json", help="JSON to write")
    parser.add_argument("--workdir", help="a new folder to run the tour in (default: a temporary one)")
    parser.add_argument("--start", type=int, default=0,
                        help="go on with an earlier tour in --workdir from this step (0 = the first)")
    args = parser.parse_args()
    if args.workdir and Path(args.workdir).exists() and not args.start:
        raise SystemExit(f"--workdir {args.workdir} exists; name a new folder")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="headlab-tour-"))
    workdir.mkdir(parents=True, exist_ok=True)
    before = machine()
    steps = run_tour(workdir, args.start)
    total = sum(s["seconds"] for s in steps)
    result = {"format": "headlab-tour/1", "model": "smollm2-135m", "machine": before,
              "load_after": list(os.getloadavg()), "steps": steps, "total_seconds": round(total, 1),
              "workdir": str(workdir), "started_at_step": args.start, "reproduce": "python scripts/tour.py"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    print(table(steps))
    print(f"total {total:.0f} s on {before['cores']} cores ({before['cpu']}); written {out}")


if __name__ == "__main__":
    main()
