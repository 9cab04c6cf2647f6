"""What the command line (and the Python API, :mod:`kdcli.api`) names, turned into objects: the
device of ``--device``/``--threads``, the model of a model file or a plain checkpoint with
``--model``/``--recipe``, the data of ``analyze --data`` and its flags. Errors name the flag."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import torch
from pydantic import ValidationError

from kdcli.config.data import DataSpec
from kdcli.config.recipe import check_device_string
from kdcli.data.loader import load_data
from kdcli.errors import InputError
from kdcli.models import absolute_spec
from kdcli.models.file import (MAX_INPUT_DIMS, MAX_INPUT_ELEMENTS, check_model_fits, is_model_file, load_model_any,
                               recipe_models)
from kdcli.reports.base import error_line
from kdcli import distributed
from kdcli.train.loop import resolve_device

__all__ = ["analysis_data", "data_flags", "device_of", "load_model_input", "split_ints"]


def device_of(name: Optional[str], recipe=None, threads: Optional[int] = None):
    """The torch device of ``--device`` (else the recipe's), after applying ``--threads``."""
    if threads:
        torch.set_num_threads(threads)

    name = name or (recipe.device if recipe is not None else "auto")
    try:
        check_device_string(name)
    except ValueError as exc:
        raise InputError(f"--device: {exc}") from None
    return distributed.device_for(resolve_device(name))  # under torchrun: this rank's GPU


def split_ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or any(v < 1 for v in vals):
        raise InputError(f"{what}: expected positive integers separated by commas, e.g. 1,64; got {text!r}")
    return vals


def load_model_input(path: Path, rec, model: Optional[str], model_args: Optional[str], data, trust: bool,
                     input_shape_flag: Optional[str] = None, num_classes_flag: Optional[int] = None):
    if not Path(path).exists():
        raise InputError(f"{path}: file not found")

    args = {}
    if model_args:
        try:
            args = json.loads(model_args)
        except json.JSONDecodeError as exc:
            raise InputError(f"--model-args: not valid JSON ({exc.msg})") from None
        if not isinstance(args, dict):
            raise InputError("--model-args: expected a JSON object, e.g. '{\"hidden\": [128]}'")
    name = model or (getattr(rec.teacher, "model", None) if rec is not None else None)
    if model is None and rec is not None:  # an ensemble teacher has no single model spec
        args = dict(getattr(rec.teacher, "model_args", {}))
    input_shape = data.input_shape if data is not None else None
    num_classes = data.num_classes if data is not None else None
    if input_shape_flag:
        input_shape = tuple(split_ints(input_shape_flag, "--input-shape"))
        if len(input_shape) > MAX_INPUT_DIMS or math.prod(input_shape) > MAX_INPUT_ELEMENTS:
            raise InputError(f"--input-shape: at most {MAX_INPUT_DIMS} sizes and {MAX_INPUT_ELEMENTS} elements in all, "
                             f"got {input_shape_flag!r}")
    if num_classes_flag is not None:
        num_classes = num_classes_flag
    if not is_model_file(path):
        if name is None:
            raise InputError(f"{path}: not a kdcli model file (.kdc), so it needs a model spec: --model NAME or --recipe")
        if input_shape is None or num_classes is None:
            raise InputError(f"{path}: a plain checkpoint needs the model's input: --input-shape C,H,W and "
                             "--num-classes N, or --recipe (whose data gives both)")
    # --model names a model on the command line: relative to here; the recipe's, to its folder.
    base = Path.cwd() if model is not None or rec is None else rec.base_dir
    allow = (recipe_models(rec) if rec is not None else []) + ([absolute_spec(model, base)] if model else [])
    loaded, info = load_model_any(path, spec_name=name, spec_args=args if (model_args or model is None) else None,
                                  input_shape=input_shape, num_classes=num_classes, base_dir=base, trust=trust,
                                  allow=allow, override=model is not None)
    if data is not None:  # before any long work: the data must fit the model
        check_model_fits(loaded, info, data, torch.zeros(1, *info.input_shape))
    return loaded, info


def analysis_data(rec, data_flag: Optional[str], flags: dict):
    given = [k for k, v in flags.items() if v is not None]
    if given and data_flag is None:
        raise InputError(f"{given[0]}: needs --data (with --recipe, the recipe's data section decides)")
    if rec is None and data_flag is None:
        return None
    if data_flag is None:
        return load_data(rec.data, base_dir=rec.base_dir, seed=rec.seed, held_out=rec.teacher_trained_elsewhere)
    kind, _, path = data_flag.partition(":")
    source: Any = "digits" if kind == "digits" else {"kind": kind, "path": path}
    try:
        DataSpec.model_validate({"source": source})
    except Exception:
        raise InputError(f"--data {data_flag!r}: expected digits or KIND:PATH with KIND one of "
                         "idx, cifar10-bin, tensors, tensor-shards, image-folder") from None
    spec = {"source": source, **data_flags(flags)}
    try:
        parsed = DataSpec.model_validate(spec)
    except ValidationError as exc:
        raise InputError(f"--data options: {error_line(exc)}") from None
    # --data names a checkpoint's data: it has usually trained on the training split, so by
    # default half of the held-out split judges it (held_out=True), as in a recipe with a checkpoint
    return load_data(parsed, base_dir=Path.cwd(), seed=rec.seed if rec is not None else 0, held_out=True)


def data_flags(flags: dict) -> dict:
    """The ``data:`` keys that analyze's --val/--normalize/--input-size/--fit/--channels stand for."""
    out: dict = {}
    val = flags["--val"]
    if val is not None:
        split, _, frac = val.partition(":")
        if split not in ("train", "test") or (split == "train" and not frac):
            raise InputError(f"--val {val!r}: expected test, test:FRACTION or train:FRACTION (e.g. test:0.5)")
        try:
            out["val"] = "test" if not frac else {"split": split, "fraction": float(frac)}
        except ValueError:
            raise InputError(f"--val {val!r}: FRACTION must be a number in (0, 1)") from None
        if frac and not 0 < out["val"]["fraction"] < 1:
            raise InputError(f"--val {val!r}: FRACTION must be a number in (0, 1)")
    norm = flags["--normalize"]
    if norm is not None:
        if norm in ("auto", "none"):
            out["normalize"] = norm
        else:
            mean, sep, std = norm.partition("/")
            try:
                out["normalize"] = {"mean": [float(v) for v in mean.split(",")], "std": [float(v) for v in std.split(",")]}
            except ValueError:
                sep = ""
            if not sep:
                raise InputError(f"--normalize {norm!r}: expected auto, none or MEAN/STD with comma-separated values, "
                                 "e.g. 0.485,0.456,0.406/0.229,0.224,0.225")
    adapt: dict = {}
    if flags["--input-size"] is not None:
        size = split_ints(flags["--input-size"], "--input-size")
        if len(size) != 2:
            raise InputError(f"--input-size {flags['--input-size']!r}: expected H,W (two integers)")
        adapt["size"] = size
    if flags["--fit"] is not None:
        if flags["--fit"] not in ("resize", "pad"):
            raise InputError(f"--fit {flags['--fit']!r}: expected resize or pad")
        adapt["fit"] = flags["--fit"]
    if flags["--channels"] is not None:
        adapt["channels"] = flags["--channels"]
    if adapt:
        out["input"] = adapt
    return out
