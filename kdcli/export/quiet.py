"""Keeping exporters and quantisers quiet, and naming their failures in one line: shared by
:mod:`kdcli.export.onnx` and :mod:`kdcli.export.quantize`."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings


@contextlib.contextmanager
def quiet():
    """Silence exporter warnings and log lines (they are not the user's concern when export works)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def quiet_stderr_fd():
    """Redirect file descriptor 2 for the duration: on failure, both exporters dump graphs there
    (torch.export through loggers that ignore their parents' level, TorchScript from C++)."""

    try:
        fd = os.dup(2)
    except OSError:  # no stderr to redirect
        yield
        return
    with tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(fd, 2)
            os.close(fd)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(exc: BaseException) -> str:
    """The most specific line of an exception chain: the root cause's first non-empty line."""
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__)
    for e in reversed(chain):
        lines = [ln.strip() for ln in _ANSI.sub("", str(e)).splitlines() if ln.strip()]
        if lines:
            line = f"{type(e).__name__}: {lines[0]}"
            return line if len(line) <= 240 else line[:237] + "..."
    return type(exc).__name__
