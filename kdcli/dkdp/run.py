"""The run directory of ``kdcli compress``: the lock that keeps it to one run at a time. Its
files are written atomically through :mod:`kdcli.files`."""

from __future__ import annotations

import os
from pathlib import Path


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
