"""The journal of long evaluations: pieces kept as they finish, another evaluation's file refused, a
file that is not a journal never overwritten, nothing written before the first piece."""

import json

import pytest

from headlab.core.errors import InputFileError
from headlab.core.files import check_folder
from headlab.core.journal import Journal


def test_pieces_are_kept_and_read_back_under_the_same_identity(tmp_path):
    path = tmp_path / "out" / "work.progress.json"
    journal = Journal(path, {"model": "m", "lengths": (1, 2)}, "work")
    assert not path.parent.exists()  # nothing before the first piece
    journal.put("a", {"value": 1.5})
    assert json.loads(path.read_text())["identity"] == {"model": "m", "lengths": [1, 2]}
    check_folder(path.parent)  # the file is recorded as headlab's
    again = Journal(path, {"model": "m", "lengths": [1, 2]}, "work")
    assert again.get("a") == {"value": 1.5} and again.get("b") is None
    with pytest.raises(InputFileError, match="holds a work of other settings"):
        Journal(path, {"model": "other", "lengths": [1, 2]}, "work")


def test_a_file_of_that_name_that_is_not_a_journal_is_refused_and_kept(tmp_path):
    path = tmp_path / "work.progress.json"
    path.write_text('{"mine": true}')
    with pytest.raises(InputFileError, match="is not a work progress file"):
        Journal(path, {}, "work")
    assert path.read_text() == '{"mine": true}'
