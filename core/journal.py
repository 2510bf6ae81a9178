"""A journal of finished work: long evaluations keep each finished piece in a JSON file as it ends,
so that the same evaluation started again measures only what it lacks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import InputFileError
from .files import claim_folder, read_json_file, write_json


class Journal:
    """Finished pieces of one piece of work, by key, written to ``path`` (atomically) after each.
    ``identity`` (JSON-ready: the model, settings and conditions) says what the work is; a file that
    holds other work is refused (:class:`InputFileError`) when the journal is opened, before any
    work. ``kind`` names the file's contents in messages and its format. Without a path nothing is
    kept; nothing is written before the first finished piece (a file of that name that is not a
    journal of ``kind`` is refused, never overwritten). The file carries a digest of its identity and
    pieces: a file changed after headlab wrote it (edited by hand, damaged) is refused, never resumed
    as if it were measured."""

    def __init__(self, path: str | Path | None, identity: dict, kind: str):
        self.path = None if path is None else Path(path)
        self.format = f"headlab-{kind}-progress/2"
        self.identity = json.loads(json.dumps(identity))  # as the file holds it: lists, not tuples
        self.pieces: dict[str, object] = {}
        if self.path is not None and self.path.exists():
            data = read_json_file(self.path, f"{kind} progress file", self.format)
            digest = _digest(data.get("identity"), data.get("pieces"))
            if digest is None or data.get("digest") != digest:
                raise InputFileError(f"{self.path} was changed after headlab wrote it (its digest does not match "
                                     "its contents); move it away to measure again")
            if data.get("identity") != self.identity:
                raise InputFileError(f"{self.path} holds a {kind} of other settings, inputs or models; move it away, "
                                     "or give the same ones to resume it")
            self.pieces = dict(data["pieces"])

    def get(self, key: str):
        """The finished piece ``key``, or None."""
        return self.pieces.get(key)

    def put(self, key: str, piece):
        """Keep ``piece`` (JSON-ready) under ``key``, written at once (the first write creates the
        folder and records the file as headlab's); returns it."""
        self.pieces[key] = piece
        if self.path is not None:
            if not self.path.exists():
                claim_folder(self.path.parent, (self.path.name,), overwrite=True, what="progress folder")
            write_json(self.path, {"format": self.format, "identity": self.identity, "pieces": self.pieces,
                                   "digest": _digest(self.identity, self.pieces)})
        return piece


def _digest(identity, pieces) -> str | None:
    """SHA-256 of the identity and the pieces (a dict) as canonical JSON; None for anything else."""
    if not isinstance(pieces, dict):
        return None
    try:
        text = json.dumps({"identity": identity, "pieces": pieces}, sort_keys=True, allow_nan=False,
                          ensure_ascii=True)
    except ValueError:  # NaN or infinity: never written by headlab
        return None
    return hashlib.sha256(text.encode()).hexdigest()


__all__ = ["Journal"]
