"""Error types the CLI maps to exit codes.

Every error a user can cause is raised as a :class:`KdcliError` subclass with a one-line
message that names the file or field and what was expected. The CLI prints that line (no
traceback unless ``--debug``) and exits with the class's ``exit_code``.

Exit codes: 0 ok, 1 unexpected failure, 2 bad input or usage, 3 a quality gate was not met,
130 interrupted.
"""

from __future__ import annotations

import re

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_BAD_INPUT = 2
EXIT_GATE = 3
EXIT_INTERRUPTED = 130


class KdcliError(Exception):
    """Base class: a failure kdcli can explain in one line."""

    exit_code = EXIT_UNEXPECTED


class InputError(KdcliError):
    """Bad input: a recipe, checkpoint, data set, model spec or flag is not what was expected."""

    exit_code = EXIT_BAD_INPUT


class RecipeError(InputError):
    """A recipe is invalid; the message names the file, the line and the field path."""


class CheckpointError(InputError):
    """A checkpoint cannot be read safely or does not fit the model."""


class DataError(InputError):
    """A data source is missing, malformed or does not fit the model."""


class ModelError(InputError):
    """A model spec cannot be resolved or built."""


class GateError(KdcliError):
    """A quality gate (accuracy drop, speed-up, resource target) was not met."""

    exit_code = EXIT_GATE


class TrainingDiverged(KdcliError):
    """A loss became NaN or infinite; the last good model is kept."""


class ExportError(KdcliError):
    """The model could not be exported to ONNX, or the ONNX model disagrees with PyTorch."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(exc: BaseException, limit: int = 240) -> str:
    """One line naming a failure: ``Type: message`` of the most specific exception of the chain
    (the root cause's first non-empty line), cut to ``limit`` characters."""
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__)
    for e in reversed(chain):
        lines = [ln.strip() for ln in _ANSI.sub("", str(e)).splitlines() if ln.strip()]
        if lines:
            line = f"{type(e).__name__}: {lines[0]}"
            return line if len(line) <= limit else line[:limit - 3] + "..."
    return type(exc).__name__
