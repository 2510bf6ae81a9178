"""One rank of a sharded report on a tiny model (run by test_distributed.py under torchrun)."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_llama  # noqa: E402
from test_report import CharTokenizer  # noqa: E402

from headlab.probes.report.scoring import write_report
from headlab.probes.report.settings import ReportSettings


def main(text_path: str, out_dir: str) -> None:
    if "RANK" in os.environ:
        torch.distributed.init_process_group("gloo")
    settings = ReportSettings(n_samples=5, n_tokens=24, seed=2, text_path=text_path, n_views=1, scores=())
    write_report(tiny_llama("gqa"), CharTokenizer(), "tiny-gqa", out_dir, settings, progress=False)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
