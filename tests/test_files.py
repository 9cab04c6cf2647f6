"""kdcli.files: atomic writes (no temporary left behind, the old file kept on failure, the usual
file mode), the writable-directory check, and the JSON encoder's extra types."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcli.errors import InputError
from kdcli.files import (_atomic_write, _json_default, atomic_torch_save, atomic_write_bytes, atomic_write_json,
                         atomic_write_text, check_writable_dir)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_writes_the_content_and_leaves_only_the_file(tmp_path):
    """Each writer puts exactly its content at the path (creating missing folders) and nothing else."""
    atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01kd")
    atomic_write_text(tmp_path / "a" / "t.txt", "τ = 0.5\n")
    atomic_torch_save(tmp_path / "a" / "w.pt", {"w": torch.arange(3)})
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01kd"
    assert (tmp_path / "a" / "t.txt").read_bytes() == "τ = 0.5\n".encode("utf-8")
    assert torch.equal(torch.load(tmp_path / "a" / "w.pt", weights_only=True)["w"], torch.arange(3))
    # the temporary files (".NAME.xxxx.tmp") were renamed, not left next to them
    assert _names(tmp_path / "a") == ["b.bin", "t.txt", "w.pt"]


def test_replacing_a_file_overwrites_it_whole(tmp_path):
    """A shorter second write leaves no tail of the first."""
    p = tmp_path / "r.txt"
    atomic_write_text(p, "a much longer first version\n")
    atomic_write_text(p, "short\n")
    assert p.read_text() == "short\n" and _names(tmp_path) == ["r.txt"]


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_a_write_that_fails_midway_keeps_the_old_file(tmp_path, error):
    """The callback writes half, then raises (also Ctrl-C): the old content stays, the error
    propagates, and the half-written temporary is removed."""
    p = tmp_path / "model.kdc"
    p.write_bytes(b"the finished old model")

    def half(fh):
        fh.write(b"half of a new mo")
        fh.flush()
        # the partial bytes are on disk in the temporary file, next to the target
        assert [n for n in _names(tmp_path) if n.startswith(".model.kdc.") and n.endswith(".tmp")]
        raise error

    with pytest.raises(type(error)):
        _atomic_write(p, half)
    assert p.read_bytes() == b"the finished old model"
    assert _names(tmp_path) == ["model.kdc"]


def test_a_failed_first_write_leaves_no_file(tmp_path):
    """With no old file, a save that fails inside the writer (torch.save of something it cannot
    pickle, after it has started the archive) leaves nothing: no empty or partial file."""
    with pytest.raises(Exception, match="pickle|lambda"):
        atomic_torch_save(tmp_path / "w.pt", {"w": torch.zeros(1000), "f": lambda: 0})
    assert _names(tmp_path) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)],
                         ids=["022", "027", "077"])
def test_a_finished_file_has_the_usual_mode(tmp_path, umask, mode):
    """0666 less the umask, as open() would give, not mkstemp's private 0600."""
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == mode
    assert os.umask(old) == old  # the process's umask was put back as it was


def test_check_writable_dir_creates_and_leaves_nothing(tmp_path):
    """A missing directory (nested) is made; the probe file it writes is gone afterwards."""
    target = tmp_path / "runs" / "new"
    check_writable_dir(target, "--out")
    assert target.is_dir() and _names(target) == []
    check_writable_dir(target, "--out")  # an existing empty directory is fine too


def test_check_writable_dir_refuses_a_file(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("keep me")
    with pytest.raises(InputError, match=rf"^--out {f}: is a file; a directory is needed$"):
        check_writable_dir(f, "--out")
    assert f.read_text() == "keep me"


def test_check_writable_dir_refuses_a_place_it_cannot_write(tmp_path):
    """A directory under a regular file cannot be made, even by root: one line naming the flag."""
    f = tmp_path / "file.txt"
    f.write_text("")
    with pytest.raises(InputError, match=rf"^--export-dir {f / 'sub'}: cannot write there \(Not a directory\)$"):
        check_writable_dir(f / "sub", "--export-dir")


def test_json_default_handles_numpy_paths_and_tensors(tmp_path):
    """numpy scalars and arrays become plain numbers and lists, a Path its string, a tensor a list."""
    assert _json_default(np.float32(0.5)) == 0.5 and type(_json_default(np.float32(0.5))) is float
    assert _json_default(np.int64(7)) == 7 and type(_json_default(np.int64(7))) is int
    assert _json_default(np.bool_(True)) is True
    assert _json_default(np.array([[1, 2], [3, 4]])) == [[1, 2], [3, 4]]
    assert _json_default(Path("runs") / "a.kdc") == os.path.join("runs", "a.kdc")
    assert _json_default(torch.tensor([1.5, 2.0])) == [1.5, 2.0]
    obj = {"macs": np.int64(25552), "ratio": np.float64(0.3), "curve": np.arange(3), "file": Path("/x/s.kdc")}
    atomic_write_json(tmp_path / "r.json", obj)
    text = (tmp_path / "r.json").read_text()
    assert text.endswith("}\n") and json.loads(text) == {"macs": 25552, "ratio": 0.3, "curve": [0, 1, 2],
                                                         "file": "/x/s.kdc"}


@pytest.mark.parametrize("value", [object(), {1, 2}, b"bytes", 1 + 2j])
def test_json_default_refuses_other_objects(value):
    """Anything else is a TypeError naming its type (json.dumps would otherwise write a repr)."""
    with pytest.raises(TypeError, match=rf"^not JSON serialisable: {type(value).__name__}$"):
        _json_default(value)
