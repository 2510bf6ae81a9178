"""Activations for training: per-head outputs of one layer (the input of ``o_proj``), from a model or from an
on-disk cache of safetensors shards, served in shuffled batches.

A source is a sequence of chunks (one per text window or shard), each ``[n, d_in]`` fp32, with
``d_in = n_heads · d_head`` (heads flattened head-major). :class:`ShuffleBuffer` turns chunks
into batches deterministically from its seed, and its state (cursor, buffer, generator) goes into
training checkpoints so that a resumed run sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol, Sequence

import torch
from safetensors.torch import load, save_file
from tqdm.auto import tqdm

from ..core.errors import InputFileError
from ..core.files import atomic_path, read_json_file, record_owned, write_json
from ..surgeon import Taps, attach, model_shape
from ..surgeon.stopping import run_until


class ActivationSource(Protocol):
    n_heads: int
    d_head: int

    def __len__(self) -> int: ...
    def chunk(self, index: int) -> torch.Tensor: ...


@torch.no_grad()
def head_outputs(model, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
    """``[seq, n_heads · d_head]`` input of ``o_proj`` at ``layer`` for one input ``[1, seq]``;
    the forward stops after that layer."""
    with attach(model, taps=Taps(head_outputs=[layer])) as session:
        run_until(model, layer, input_ids=input_ids)
    out = session.recording.head_output(layer)[0]  # [seq, H, D]
    return out.flatten(1).float()


class ModelActivations:
    """Chunks computed by the model: the head outputs of ``layer`` over each of ``windows``
    (each ``[1, seq]``), without the first position when ``exclude_first`` (the sink token's
    outsized norm)."""

    def __init__(self, model, windows: Sequence[torch.Tensor], layer: int, exclude_first: bool = True):
        shape = model_shape(model)
        if not 0 <= layer < shape.n_layers:
            raise ValueError(f"layer {layer} outside 0..{shape.n_layers - 1}")
        if not windows:
            raise ValueError("no text windows to take activations from")
        self.model, self.windows, self.layer, self.exclude_first = model, list(windows), layer, exclude_first
        self.n_heads, self.d_head = shape.n_heads, shape.head_dim

    def __len__(self) -> int:
        return len(self.windows)

    def chunk(self, index: int) -> torch.Tensor:
        acts = head_outputs(self.model, self.windows[index], self.layer)
        return acts[1:] if self.exclude_first else acts


CACHE_FORMAT = "headlab-activations/2"
MANIFEST = "manifest.json"


class CachedActivations:
    """Chunks read back from a folder written by :func:`cache_activations`. Given ``identity`` (what
    the run needs: the model, layer, windows, seed, ...), a cache of anything else is refused before
    any work, naming both sides; each shard's size is checked when the cache opens and its SHA-256
    when it is read (:class:`InputFileError`, one line)."""

    def __init__(self, folder: str | Path, identity: dict | None = None):
        self.folder = Path(folder)
        if not (self.folder / MANIFEST).is_file():
            raise InputFileError(f"{folder} is not an activation cache (no {MANIFEST})")
        self.manifest = read_json_file(self.folder / MANIFEST, "activation cache manifest", CACHE_FORMAT)
        try:
            self.n_heads, self.d_head = int(self.manifest["n_heads"]), int(self.manifest["d_head"])
            self.shards = [(str(s["file"]), int(s["bytes"]), str(s["sha256"])) for s in self.manifest["shards"]]
            recorded = dict(self.manifest["identity"])
        except (KeyError, TypeError, ValueError) as err:
            raise InputFileError(f"{self.folder / MANIFEST} is damaged ({type(err).__name__}: {err})") from None
        if identity is not None and recorded != identity:
            differ = sorted(key for key in {*recorded, *identity} if recorded.get(key) != identity.get(key))
            shown = "; ".join(f"{key} {recorded.get(key)!r} there, {identity.get(key)!r} here" for key in differ)
            raise InputFileError(f"--cache {self.folder} holds other activations ({shown}); give another --cache "
                                 "folder or the settings it was written with")
        for name, size, _ in self.shards:
            path = self.folder / name
            if Path(name).name != name or not path.is_file() or path.stat().st_size != size:
                raise InputFileError(f"{path} is missing or not the {size} bytes the cache's manifest records")

    def __len__(self) -> int:
        return len(self.shards)

    def chunk(self, index: int) -> torch.Tensor:
        name, _, digest = self.shards[index]
        data = (self.folder / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise InputFileError(f"{self.folder / name} was changed after headlab wrote it (its SHA-256 is not the "
                                 "manifest's); move the cache away to write it again")
        return load(data)["activations"]


def cache_activations(source: ModelActivations, folder: str | Path, shard_tokens: int = 65536,
                      identity: dict | None = None, progress: bool = True) -> CachedActivations:
    """Run ``source`` once and store its activations as safetensors shards of about
    ``shard_tokens`` rows in ``folder`` (with a manifest recording ``identity``, what they are
    activations of, and each shard's size and SHA-256), so several autoencoders train from one pass;
    chunk order is kept, so batches match training from the model directly."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards, pending, rows, total = [], [], 0, 0

    def flush():
        nonlocal pending, rows
        name = f"shard-{len(shards):05d}.safetensors"
        record_owned(folder, (name,))
        with atomic_path(folder / name) as tmp:
            save_file({"activations": torch.cat(pending).contiguous()}, str(tmp))
            data = tmp.read_bytes()
        shards.append({"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        pending, rows = [], 0

    for index in tqdm(range(len(source)), desc="caching activations", disable=not progress):
        chunk = source.chunk(index)
        pending.append(chunk)
        rows += chunk.shape[0]
        total += chunk.shape[0]
        if rows >= shard_tokens:
            flush()
    if pending:
        flush()
    identity = {"layer": source.layer, "exclude_first": source.exclude_first, **(identity or {})}
    record_owned(folder, (MANIFEST,))
    write_json(folder / MANIFEST, {"format": CACHE_FORMAT, "n_heads": source.n_heads, "d_head": source.d_head,
                                   "tokens": total, "identity": identity, "shards": shards})
    return CachedActivations(folder)


class ShuffleBuffer:
    """Batches of ``batch_size`` rows from ``source``: the buffer is filled to ``capacity`` rows,
    shuffled, and refilled once half of it has been served (keeps half, serves half).
    The source restarts from its first chunk when it runs out (``epoch`` counts the passes).
    ``progress``: a bar over the rows of each fill (the first before training starts, each refill
    between two steps)."""

    def __init__(self, source: ActivationSource, batch_size: int, capacity: int, seed: int = 0,
                 progress: bool = False):
        if capacity < 2 * batch_size:
            raise ValueError(f"buffer capacity {capacity} must hold at least two batches of {batch_size}")
        self.source, self.batch_size, self.capacity, self.progress = source, batch_size, capacity, progress
        self.generator = torch.Generator().manual_seed(seed)
        self.cursor, self.epoch = 0, 0
        self.buffer = torch.empty(0, source.n_heads * source.d_head)

    def next_batch(self) -> torch.Tensor:
        """The next ``[batch_size, d_in]`` batch."""
        if self.buffer.shape[0] < max(self.capacity // 2, self.batch_size):
            self._refill()
        batch, self.buffer = self.buffer[: self.batch_size], self.buffer[self.batch_size:]
        return batch

    def _refill(self) -> None:
        parts, rows = [self.buffer], self.buffer.shape[0]
        with tqdm(total=self.capacity, initial=rows, desc="refilling activations" if rows else "gathering activations",
                  unit="row", leave=False, disable=not self.progress) as bar:
            while rows < self.capacity:
                chunk = self.source.chunk(self.cursor)
                parts.append(chunk)
                rows += chunk.shape[0]
                bar.update(chunk.shape[0])
                self.cursor += 1
                if self.cursor == len(self.source):
                    self.cursor, self.epoch = 0, self.epoch + 1
        merged = torch.cat(parts)
        self.buffer = merged[torch.randperm(merged.shape[0], generator=self.generator)]

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "epoch": self.epoch, "buffer": self.buffer.clone(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.cursor, self.epoch = int(state["cursor"]), int(state["epoch"])
        self.buffer = state["buffer"].clone()
        self.generator.set_state(state["generator"])
