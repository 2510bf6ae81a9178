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


@pytest.mark.parametrize("damage", ["numbers", "piece_string", "pieces_list", "digest_gone", "pieces_gone_too"])
def test_a_journal_changed_after_it_was_written_is_refused(tmp_path, damage):
    path = tmp_path / "work.progress.json"
    journal = Journal(path, {"model": "m"}, "work")
    journal.put("a", {"recall": 0.5, "keep": [1, 2]})
    data = json.loads(path.read_text())
    if damage == "numbers":  # every number set by hand
        data["pieces"]["a"] = {"recall": 0.987654, "keep": [0.987654, 0.987654]}
    elif damage == "piece_string":
        data["pieces"]["a"] = "a string"
    elif damage == "pieces_list":
        data["pieces"] = [1]
    elif damage == "digest_gone":
        del data["digest"]
    else:
        del data["digest"], data["pieces"]
    path.write_text(json.dumps(data))
    with pytest.raises(InputFileError, match="was changed after headlab wrote it"):
        Journal(path, {"model": "m"}, "work")


def test_the_digest_does_not_depend_on_key_order(tmp_path):
    path = tmp_path / "work.progress.json"
    Journal(path, {"model": "m", "b": 1}, "work").put("a", {"y": 1, "x": 2.5})
    data = json.loads(path.read_text())
    data["pieces"]["a"] = dict(reversed(list(data["pieces"]["a"].items())))
    path.write_text(json.dumps(data))
    assert Journal(path, {"b": 1, "model": "m"}, "work").get("a") == {"x": 2.5, "y": 1}
