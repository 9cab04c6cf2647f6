"""What the typed report models share: the strict base model, one-line validation errors, and
reading, checking and writing a report file.

Every report kdcli writes (``report.json``, ``analysis.json``, ``compress_report.json``) is a
pydantic model (:mod:`kdcli.reports.models`, :mod:`kdcli.reports.analysis_model`,
:mod:`kdcli.reports.compress_model`) whose first field is ``"$schema"``: a URN
``urn:kdcli:schema:<name>:<version>`` that is also the ``$id`` of its JSON Schema. Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from kdcli.errors import InputError
from kdcli.files import _json_default  # the conversions of atomic_write_json

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def schema_uri(name: str, version: int) -> str:
    """``urn:kdcli:schema:<name>:<version>``: the ``$schema`` of a report and the ``$id`` of its JSON Schema."""
    return f"urn:kdcli:schema:{name}:{version}"


class Strict(BaseModel):
    # strict: a report is data kdcli wrote, so nothing is coerced; inf/NaN (a throughput of a 0 ms
    # run, a NaN ratio, a diverged step's accuracy) are written as JSON's Infinity/NaN, as json.dumps
    # has always written them
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True, ser_json_inf_nan="constants")


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if part == "[key]":  # the key itself is wrong (e.g. a batch size that is not a number)
            out += " (key)"
        else:
            out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def error_line(exc: ValidationError) -> str:
    """The first error of ``exc`` as ``<field path>: <what was wrong>`` (+ how many more)."""
    errs = exc.errors(include_url=False)
    first = errs[0]
    line = f"{_loc(first['loc'])}: {first['msg']}"
    value = first.get("input")
    if first["type"] != "missing" and isinstance(value, (str, int, float, bool, type(None))):
        line += f" (got {value!r})" if len(repr(value)) <= 60 else ""
    if len(errs) > 1:
        line += f" (and {len(errs) - 1} more error{'s' if len(errs) > 2 else ''})"
    return line


M = TypeVar("M", bound=BaseModel)


def parse_as(model: type[M], obj: Any, source: str, what: str, uri: str, version_key: str, version: int) -> M:
    """Validate a decoded report ``obj`` as ``model``; InputError naming ``source`` and the field
    otherwise. ``what`` names the kind of report in messages; a ``$schema`` other than ``uri`` or
    a ``version_key`` other than ``version`` is refused as another version (files without
    ``$schema``, written before it was added, are read as ``version``)."""
    if not isinstance(obj, dict):
        raise InputError(f"{source}: expected a JSON object (a kdcli {what}), got {type(obj).__name__}")
    got_uri, got_version = obj.get("$schema"), obj.get(version_key)
    if isinstance(got_uri, str) and got_uri.rpartition(":")[0] != uri.rpartition(":")[0]:
        raise InputError(f"{source}: $schema {got_uri!r} is another kind of file, not a kdcli {what} ({uri})")
    if (got_uri is not None and got_uri != uri) or (got_version is not None and got_version != version):
        raise InputError(f"{source}: {'an' if what[0] in 'aeiou' else 'a'} {what} of another version ($schema "
                         f"{got_uri!r}, {version_key} {got_version!r}); this kdcli reads {uri} ({version_key} {version})")
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise InputError(f"{source}: not a valid {what}: {error_line(exc)}") from None


def read_json(path: str | Path) -> Any:
    """The decoded JSON at ``path``; InputError (one line naming the file) when it cannot be read."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
    try:
        return json.loads(text)  # json, not pydantic's parser: NaN / Infinity as json.dumps writes them
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None


class ReportShapeError(RuntimeError):
    """A report kdcli is about to write does not match its own model: a bug in kdcli (a field
    added, renamed or retyped without its model), not in the user's input."""


def check_written(model: type[M], obj: Any, file_name: str) -> M:
    """``obj`` validated as ``model`` as it would read back from the JSON file (tuples become
    lists, paths strings, numpy scalars numbers); ReportShapeError naming the field otherwise."""

    try:
        return model.model_validate(json.loads(json.dumps(obj, default=_json_default)))
    except ValidationError as exc:
        raise ReportShapeError(f"{file_name} does not match its schema ({model.__name__}): {error_line(exc)}") from None
