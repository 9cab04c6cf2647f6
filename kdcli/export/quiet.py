"""Keeping exporters and quantisers quiet: shared by :mod:`kdcli.export.onnx` and
:mod:`kdcli.export.quantize` (their failures are named in one line by :func:`kdcli.errors.first_line`)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings


@contextlib.contextmanager
def quiet(*loggers: str):
    """Silence warnings and the log lines of ``loggers`` below ERROR (default ``torch.onnx``; ``""``
    is the root logger): exporters' and quantisers' advice is not the user's concern when they work."""
    saved = [(lg, lg.level) for lg in map(logging.getLogger, loggers or ("torch.onnx",))]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


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
