"""The one file helper: reads refuse what is not a regular file, writes replace atomically."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sandbox.files import PRIVATE, create_new, read_regular, write_atomic


class Refused(Exception):
    pass


def test_reads_refuse_symlinks_fifos_and_oversized_files(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.write_bytes(b"12345")
    assert read_regular(real, 5, Refused) == b"12345"
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(Refused, match="cannot open"):
        read_regular(tmp_path / "link", 5, Refused)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(Refused, match="not a regular file"):
        read_regular(tmp_path / "fifo", 5, Refused)
    with pytest.raises(Refused, match="5 bytes, more than the 4 expected"):
        read_regular(real, 4, Refused)


def test_a_refused_write_leaves_the_old_file_and_no_staging(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_bytes(b"old")

    def refuse(staged: Path) -> None:
        assert staged.read_bytes() == b"new"
        raise Refused("bad content")

    with pytest.raises(Refused):
        write_atomic(path, b"new", check=refuse)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.toml"]


def test_writes_replace_a_symlink_instead_of_following_it(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep")
    link = tmp_path / "key.pem"
    link.symlink_to(target)
    write_atomic(link, b"secret", PRIVATE)
    assert target.read_bytes() == b"keep"
    assert not link.is_symlink()
    assert stat.S_IMODE(link.stat().st_mode) == PRIVATE
    with pytest.raises(FileExistsError):
        create_new(link, b"again", PRIVATE)
    assert link.read_bytes() == b"secret"
