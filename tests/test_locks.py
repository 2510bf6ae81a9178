"""One writer per output: a second run into the same --out is refused in one line while the first
holds it, the lock goes with the run however it ends, and a lock file left by a killed run is taken
over with a note."""

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from headlab.cli import main
from headlab.commands.base import all_commands
from headlab.core.errors import OutputError
from headlab.core.locks import lock_path, output_lock


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    out = tmp_path / "report"
    with output_lock(out):
        with pytest.raises(OutputError, match=rf"another headlab run \(process {os.getpid()}, started .*\) is writing"):
            with output_lock(out):
                pass
        with pytest.raises(OutputError, match="another headlab run"):  # another spelling of the same output
            with output_lock(tmp_path / "." / "x" / ".." / "report"):
                pass
    assert not lock_path(out).exists()
    with output_lock(out):  # released: taken again
        pass


def test_the_lock_is_released_when_the_block_raises(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(RuntimeError):
        with output_lock(out):
            raise RuntimeError("work failed")
    with output_lock(out):
        pass


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_note(tmp_path):
    out = tmp_path / "o"
    holder = textwrap.dedent(f"""
        import os, signal
        from headlab.core.locks import output_lock
        with output_lock({str(out)!r}):
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", holder])
    assert done.returncode == -9 and lock_path(out).exists()
    left = json.loads(lock_path(out).read_text())
    with pytest.warns(UserWarning, match=rf"took over the lock of .* left by a run \(process {left['pid']}"):
        with output_lock(out):
            pass
    assert not lock_path(out).exists()


def test_a_symlink_in_place_of_the_lock_file_is_refused(tmp_path):
    out = tmp_path / "o"
    target = tmp_path / "elsewhere.txt"
    target.write_text("the user's file\n")
    lock_path(out).symlink_to(target)
    with pytest.raises(OutputError, match="cannot lock"):
        with output_lock(out):
            pass
    assert target.read_text() == "the user's file\n"


def test_the_command_line_refuses_a_second_run_into_the_same_out_in_one_line(tmp_path, capsys):
    out = tmp_path / "view.html"
    with output_lock(out):
        status = main(["view", "smollm2-135m", "--text", "abc", "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert f"another headlab run (process {os.getpid()}" in err and not out.exists()


def test_the_ranks_of_one_torchrun_group_share_the_first_ranks_lock(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(all_commands()["view"], "run", lambda self, args, checked: 0)
    out = tmp_path / "view.html"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with output_lock(out):  # held by rank 0 of the group
        monkeypatch.setenv("RANK", "1")
        assert main(["view", "smollm2-135m", "--text", "abc", "--out", str(out)]) == 0
        monkeypatch.setenv("RANK", "0")
        assert main(["view", "smollm2-135m", "--text", "abc", "--out", str(out)]) == 2  # another run's rank 0
        monkeypatch.setenv("RANK", "not a number")  # read as rank 0, never a traceback
        assert main(["view", "smollm2-135m", "--text", "abc", "--out", str(out)]) == 2


def test_a_refused_second_run_never_removes_the_first_runs_new_folder(tmp_path, capsys):
    out = tmp_path / "report"
    with output_lock(out):  # the first run holds the lock and has just created its folder
        from headlab.core.files import claim_folder

        claim_folder(out, ("report.html",))
        assert main(["view", "smollm2-135m", "--text", "abc", "--out", str(out)]) == 2
    assert out.is_dir()


def test_a_write_that_fails_in_a_library_on_a_full_disk_ends_in_one_line(tmp_path, capsys, monkeypatch):
    import headlab.core.resources as resources

    def run_into_a_full_disk(self, args, checked):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(all_commands()["view"], "run", run_into_a_full_disk)
    monkeypatch.setattr(resources, "free_disk", lambda folder: 1 << 20)
    status = main(["view", "smollm2-135m", "--text", "abc", "--out", str(tmp_path / "v.html")])
    err = capsys.readouterr().err
    assert status == 1 and "a write failed (RuntimeError with 1 MiB left on the disk of" in err
    monkeypatch.setattr(resources, "free_disk", lambda folder: 1 << 40)  # a disk with room: a real error
    with pytest.raises(RuntimeError, match="PytorchStreamWriter"):
        main(["view", "smollm2-135m", "--text", "abc", "--out", str(tmp_path / "v.html")])


def test_a_full_disk_ends_in_one_line_and_leaves_no_empty_folder(tmp_path, capsys, monkeypatch):
    from headlab.core.files import claim_folder

    def run_into_a_full_disk(self, args, checked):
        claim_folder(args.out, ("view.html",))
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(args.out) / "view.html"))

    monkeypatch.setattr(all_commands()["view"], "run", run_into_a_full_disk)
    out = tmp_path / "views"
    status = main(["view", "smollm2-135m", "--text", "abc", "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 1 and len(err.strip().splitlines()) == 1
    assert "a write failed (No space left on device:" in err
    assert not out.exists() and not lock_path(out).exists()


def test_a_full_disk_keeps_the_journal_of_finished_pieces(tmp_path, capsys, monkeypatch):
    from headlab.core.journal import Journal

    def run_after_one_piece(self, args, checked):
        Journal(Path(args.out) / "work.progress.json", {"model": "m"}, "work").put("first", 1.0)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(all_commands()["view"], "run", run_after_one_piece)
    out = tmp_path / "views"
    assert main(["view", "smollm2-135m", "--text", "abc", "--out", str(out)]) == 1
    assert Journal(out / "work.progress.json", {"model": "m"}, "work").get("first") == 1.0
