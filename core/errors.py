"""The errors headlab raises for input it cannot use: each carries one line for the user.

The command line prints such an error as one line and exits with status 2; the Python API
raises it. Importing this module costs nothing (no torch), so argument handling can use it.
"""

from __future__ import annotations


class HeadlabError(ValueError):
    """Input headlab cannot use (a bad argument, file, model or plan); the message says why."""


class ModelSpecError(HeadlabError):
    """The model spec names nothing headlab can load."""


class UnsupportedModelError(HeadlabError):
    """The model loads, but its attention does not go through transformers' attention interface."""


class PlanError(HeadlabError):
    """A plan that cannot be applied: bad indices, unknown edit kind, wrong model shape, bad file."""


class InputFileError(HeadlabError):
    """An input file (task, probe labels, scores, SAE folder) that does not have the expected form."""


class OutputError(HeadlabError):
    """An output path headlab will not write: it exists and headlab did not write it, or it is unwritable."""


__all__ = ["HeadlabError", "InputFileError", "ModelSpecError", "OutputError", "PlanError", "UnsupportedModelError"]
