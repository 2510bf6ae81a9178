"""One rank of a sharded report on a tiny model (run by test_distributed.py under torchrun)."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_llama  # noqa: E402
from test_report import CharTokenizer  # noqa: E402

from headlab.core.text import TextWindows
from headlab.probes.report.scoring import write_report
from headlab.probes.report.settings import ReportSettings


def main(text_path: str, out_dir: str) -> None:
    if "RANK" in os.environ:
        torch.distributed.init_process_group("gloo")
    settings = ReportSettings(text=TextWindows(windows=5, tokens=24, text_path=text_path), seed=2, n_views=1,
                              families=())
    write_report(tiny_llama("gqa"), CharTokenizer(), "tiny-gqa", out_dir, settings, progress=False)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
