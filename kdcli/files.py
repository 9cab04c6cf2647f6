"""Writing files atomically: to a temporary name in the same directory, flushed, then renamed, so
that a killed process never leaves a half-written file where a finished one is expected. Every
file kdcli writes (run directory, model files, reports, ONNX) goes through here; and the check
that an output directory can be written, made before any long work.
"""

from __future__ import annotations

import json
import os
import tempfile

from kdcli.errors import InputError
from pathlib import Path
from typing import Any


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a finished file gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def check_writable_dir(path: Path, flag: str) -> None:
    """Create the directory ``path`` if needed and check that files can be written in it, before
    any long work starts; :class:`kdcli.errors.InputError` naming ``flag`` otherwise."""

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path}: is a file; a directory is needed")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".kdcli-write-check.", dir=path)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise InputError(f"{flag} {path}: cannot write there ({exc.strerror or type(exc).__name__})") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    _atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    """``torch.save`` to ``path`` atomically."""
    import torch

    _atomic_write(path, lambda fh: torch.save(obj, fh))


def _json_default(o: Any):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
