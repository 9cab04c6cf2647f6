"""The run directory: atomic writes, the metrics log, step checkpoints and resume.

Everything a run writes goes through here: written to a temporary name in the same directory,
flushed, then renamed, so that a killed process never leaves a half-written file where a
finished one is expected.
"""

from __future__ import annotations

import json
import os
import tempfile
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
    from kdcli.errors import InputError

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


class RunLock:
    """An exclusive lock on a run directory (``flock`` on ``.lock`` inside it), held for a whole
    run so that a second process can neither run in nor ``--overwrite`` the same directory. The
    file records the holder's PID for the refusal message. The OS drops the lock when the holder
    dies, even by SIGKILL, so a stale ``.lock`` file never blocks a resume."""

    _held: dict[str, "RunLock"] = {}  # per process: flock conflicts between two opens of one file

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fh = None

    @classmethod
    def acquire(cls, run_dir: Path) -> "RunLock":
        """The lock of ``run_dir``, taken now (or already held by this process); a directory
        locked by another process raises :class:`kdcli.errors.InputError` naming its PID."""
        import fcntl

        from kdcli.errors import InputError

        key = str(Path(run_dir).resolve())
        if key in cls._held:
            return cls._held[key]
        lock = cls(Path(run_dir))
        try:
            lock.path.mkdir(parents=True, exist_ok=True)
            fh = open(lock.path / ".lock", "a+")
        except OSError as exc:
            raise InputError(f"{run_dir}: cannot write the run directory ({exc.strerror})") from None
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            pid = fh.read().strip() or "unknown"
            fh.close()
            raise InputError(f"{run_dir}: a kdcli run is in progress there (PID {pid}); wait for it to end, or "
                             "choose another directory with --out") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        lock._fh = fh
        cls._held[key] = lock
        return lock

    def release(self) -> None:
        """Give the lock up (closing the file drops the flock)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._held.pop(str(self.path.resolve()), None)
