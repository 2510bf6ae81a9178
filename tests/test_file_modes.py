"""Every file kind headlab writes gets the permissions the user's umask gives (safetensors and the
temporary-file helpers create 0600 whatever the umask): SAE weights and configs, converted and edited
checkpoints, pages and JSON."""

import os
import stat
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import save_file

from headlab.core.files import atomic_directory, write_json
from headlab.sae import SparseAutoencoder, save_sae
from headlab.surgeon import HeadScale, Plan
from headlab.surgeon.conversion import LinearSettings, convert
from headlab.surgeon.conversion.converted import save_converted
from headlab.surgeon.saving import save_edited

UMASK = 0o027  # neither the default 022 nor 077: modes that only the umask explains


@pytest.fixture
def umask():
    previous = os.umask(UMASK)
    yield UMASK
    os.umask(previous)


def modes(folder: Path) -> dict[str, int]:
    """``{relative path: permission bits}`` of every file and folder under ``folder`` (not itself)."""
    return {str(path.relative_to(folder)): stat.S_IMODE(path.lstat().st_mode) for path in sorted(folder.rglob("*"))
            if not path.name.startswith(".headlab-owned")}


def assert_usual(folder: Path) -> None:
    found = modes(folder)
    assert found and any(name.endswith(".safetensors") for name in found)
    for name, mode in found.items():
        expected = (0o777 if (folder / name).is_dir() else 0o666) & ~UMASK
        assert mode == expected, f"{name}: {oct(mode)}, not {oct(expected)}"


def test_sae_files_follow_the_umask(tmp_path, umask):
    save_sae(SparseAutoencoder(30, 60, "topk", 4, 5, 6), tmp_path / "sae", "tiny", 1, "o_proj input", 16)
    assert_usual(tmp_path / "sae")


def test_converted_checkpoints_follow_the_umask(tmp_path, umask):
    model = tiny_llama("gqa")
    convert(model, LinearSettings(layers=(0,)))
    save_converted(model, None, tmp_path / "converted")
    assert_usual(tmp_path / "converted")


def test_edited_checkpoints_follow_the_umask(tmp_path, umask):
    save_edited(tiny_llama("gqa"), None, Plan([HeadScale(1, (0,), 0.5)]), tmp_path / "edited")
    assert_usual(tmp_path / "edited")


def test_atomic_folders_and_json_follow_the_umask(tmp_path, umask):
    with atomic_directory(tmp_path / "folder") as tmp:
        save_file({"x": torch.zeros(2)}, str(tmp / "x.safetensors"))
        write_json(tmp / "a.json", {"a": 1})
    assert_usual(tmp_path / "folder")
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o777 & ~UMASK
