"""Data-parallel autoencoder training on synthetic chunks (run by test_sae.py, one process or under
torchrun with 2 gloo ranks): rank r trains on its own buffer; one process concatenates both
ranks' batches. Writes the final weights to OUT/weights.safetensors (rank 0)."""

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from headlab.sae import ShuffleBuffer, SparseAutoencoder, TrainSettings, Trainer

D_IN, HEADS = 12, 3


class Chunks:
    """Deterministic synthetic activations: chunk i of source s."""

    n_heads, d_head = HEADS, D_IN // HEADS

    def __init__(self, source: int):
        self.source = source

    def __len__(self):
        return 6

    def chunk(self, index):
        gen = torch.Generator().manual_seed(1000 * self.source + index)
        return torch.randn(40, D_IN, generator=gen) * torch.linspace(0.5, 2.0, D_IN)


class Concatenated:
    """The global batch of a one-process run: both ranks' batches, rank order."""

    def __init__(self, parts):
        self.parts = parts

    def next_batch(self):
        return torch.cat([p.next_batch() for p in self.parts])

    def state_dict(self):
        return {str(i): p.state_dict() for i, p in enumerate(self.parts)}

    def load_state_dict(self, state):
        for i, p in enumerate(self.parts):
            p.load_state_dict(state[str(i)])


SETTINGS = TrainSettings(arch="topk", k=4, expansion=4, train_tokens=16 * 8, batch_tokens=16, buffer_tokens=64, lr=1e-2,
                         warmup_steps=2, init_rows=32, checkpoint_every=1000)


def buffer(rank):
    return ShuffleBuffer(Chunks(rank), SETTINGS.batch_tokens // 2, SETTINGS.buffer_tokens // 2, seed=rank)


def main(out: str) -> None:
    if "RANK" in os.environ:
        torch.distributed.init_process_group("gloo")
        batches = buffer(torch.distributed.get_rank())
    else:
        batches = Concatenated([buffer(0), buffer(1)])
    sae = SparseAutoencoder(D_IN, 4 * D_IN, "topk", 4, HEADS, seed=0)
    Trainer(sae, batches, SETTINGS).run(progress=False)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, f"{out}/weights.rank{rank}.safetensors")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
