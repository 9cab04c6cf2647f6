"""Checkpoints: reading users' files safely, and kdcli's own model file (``.kdc``).

User checkpoints are read with ``torch.load(weights_only=True)``, which unpickles only tensors
and plain containers, so a file cannot run code when loaded; a file that needs more (a whole
pickled ``nn.Module``) is refused unless the user passes ``--trust-checkpoint``. Accepted
layouts: a plain state dict; one nested under ``state_dict`` / ``model`` / ``model_state_dict`` /
``net``; keys prefixed ``module.`` (DataParallel / DDP) or ``_orig_mod.`` (``torch.compile``);
the legacy pre-1.6 (non-zip) format; ``.safetensors``.

The kdcli model file is a ``torch.save``d dict of plain types only::

    {"format": "kdcli-model", "format_version": 1,
     "model": {"name", "args", "input_shape", "num_classes"},   # the spec build_model takes
     "pruning_history": [[module path, is_out_channel, [indices]], ...],
     "state_dict": {...}, "metadata": {...}}                      # metadata: JSON-like

It reloads with ``weights_only=True``: the model is rebuilt from its spec, the pruning history
replayed (:func:`kdcli.prune.pruner.replay_history`) and the weights loaded strictly.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import zipfile
from pathlib import Path
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from kdcli import __version__
from kdcli.errors import CheckpointError, DataError, ModelError
from kdcli.models import absolute_spec, build_model, code_named_by, is_file_spec, map_spec_names
from kdcli.models.utils import eval_mode, is_main_process
from kdcli.prune.pruner import replay_history
from kdcli.files import atomic_torch_save

if TYPE_CHECKING:  # annotations only: the model file does not need the data or the recipe loaded
    from kdcli.config.recipe import Recipe
    from kdcli.data.loader import DataBundle

FORMAT = "kdcli-model"
FORMAT_VERSION = 1
NESTED_KEYS = ("state_dict", "model", "model_state_dict", "net")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length, then a JSON object."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000


def _torch_load(path: Path, trust: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file") from None
    except pickle.UnpicklingError as exc:
        if not trust and "Weights only load failed" in str(exc):
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(f"{path}: holds pickled objects{what} that can run code when loaded (e.g. a whole "
                                  "nn.Module); pass --trust-checkpoint only if you trust its source") from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_reason(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError/EOFError/KeyError/... on bad files
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or another format: "
                              f"{_reason(exc)})") from None


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split(" Check the documentation")[0].strip()
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def _strip_wrapper_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def read_state_dict(path: Path, *, trust: bool = False) -> dict[str, torch.Tensor] | nn.Module:
    """Read a checkpoint's weights: ``{name: tensor}`` on the CPU, or, only with ``trust``, a whole
    pickled ``nn.Module`` as it is. See the module docstring for the layouts understood.
    Unreadable, unsafe (without ``trust``) or weight-less files raise CheckpointError."""
    path = Path(path)
    if path.suffix == ".safetensors" or (path.is_file() and _looks_like_safetensors(path)):
        if not path.is_file():
            raise CheckpointError(f"{path}: file not found")
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - SafetensorError and friends
            raise CheckpointError(f"{path}: not a readable safetensors file ({_reason(exc)})") from None
    else:
        obj = _torch_load(path, trust)
    if isinstance(obj, nn.Module):
        return obj  # only reachable with trust: weights_only refuses modules
    if isinstance(obj, dict) and not _is_state_dict(obj):
        for key in NESTED_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                return inner
            if _is_state_dict(inner):
                obj = inner
                break
    if not _is_state_dict(obj):
        if isinstance(obj, dict):
            keys = ", ".join(map(str, list(obj)[:5]))
            raise CheckpointError(f"{path}: no state dict found (expected tensors at the top level or under "
                                  f"{' / '.join(NESTED_KEYS)}; top-level keys: {keys})")
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a state dict of tensors")
    return _strip_wrapper_prefix(dict(obj))


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape)).replace(" ", "")


def _fit(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """``sd`` completed for ``model`` (pre-0.4 files lack BatchNorm's ``num_batches_tracked``:
    zero), or CheckpointError listing the first missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    sd = dict(sd)
    for k, v in expected.items():
        if k not in sd and k.endswith("num_batches_tracked"):
            sd[k] = torch.zeros_like(v)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [k for k in expected if k in sd and expected[k].shape != sd[k].shape]
    if missing or unexpected or shapes:
        def few(keys):
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

        parts = []
        if missing:
            parts.append(f"missing {few(missing)}")
        if unexpected:
            parts.append(f"unexpected {few(unexpected)}")
        parts += [f"shape of {k} is {_shape(expected[k])} in the model, {_shape(sd[k])} in the file" for k in shapes[:3]]
        if len(shapes) > 3:
            parts.append(f"{len(shapes) - 3} more mis-shaped")
        raise CheckpointError(f"{what}: " + "; ".join(parts))
    return sd


def load_model(spec_name: str, spec_args: dict | None, path: Path, *, input_shape, num_classes: int,
               base_dir: Path | None = None, trust: bool = False) -> nn.Module:
    """Build ``spec_name(**spec_args)`` with :func:`kdcli.models.build_model` and load the weights of
    the user checkpoint ``path`` strictly (only a missing ``num_batches_tracked`` is tolerated).
    With ``trust`` and a whole pickled module in the file, that module is returned instead.
    The model is returned in eval mode, on the CPU."""
    path = Path(path)
    obj = read_state_dict(path, trust=trust)
    if isinstance(obj, nn.Module):
        return obj.cpu().eval()
    model = build_model(spec_name, spec_args or {}, input_shape=input_shape, num_classes=num_classes,
                        base_dir=base_dir)
    sd = _fit(model, obj, f"{path} does not fit model {spec_name}")
    check_finite(sd, str(path))
    model.load_state_dict(sd, strict=True)
    return model.eval()


def _plain(obj: Any, where: str, strict: bool) -> Any:
    """``obj`` as types ``torch.load(weights_only=True)`` accepts (JSON-like: tuples become lists)."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, dict):
        return {str(k): _plain(v, f"{where}.{k}", strict) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{where}[{i}]", strict) for i, v in enumerate(obj)]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor) or type(obj).__module__ == "numpy":
        return _plain(obj.tolist(), where, strict)  # 0-d and numpy scalars become Python numbers
    if strict:
        raise ModelError(f"{where}: {type(obj).__name__} cannot be stored in a kdcli model file (expected JSON-like values)")
    return str(obj)


def save_model_file(path: Path, model: nn.Module, *, name: str, args: dict | None, input_shape,
                    num_classes: int, pruning_history: list | None = None, metadata: dict | None = None) -> None:
    """Write ``model`` as a kdcli model file at ``path`` (atomically): its spec, pruning history,
    CPU state dict and JSON-like ``metadata``; see the module docstring for the layout. An
    absolute ``file.py:factory`` path in the spec is stored relative to ``path``'s folder."""
    path = Path(path)
    name, args = map_spec_names(str(name), dict(args or {}), lambda n: _relative_to_file(n, path.parent))
    history = [[str(n), bool(o), [int(i) for i in idxs]] for n, o, idxs in (pruning_history or [])]
    obj = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {"name": str(name), "args": _plain(dict(args or {}), "model.args", True),
                  "input_shape": [int(d) for d in input_shape], "num_classes": int(num_classes)},
        "pruning_history": history,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "metadata": _plain(dict(metadata or {}), "metadata", False),
    }
    atomic_torch_save(Path(path), obj)


def is_model_file(path: Path) -> bool:
    """Whether ``path`` is a kdcli model file: the ``.kdc`` suffix, or a torch zip archive whose
    pickle names the format (read without unpickling). A missing file is not."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix == ".kdc":
        return True
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = next((n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            return pkl is not None and FORMAT.encode() in zf.read(pkl)
    except (zipfile.BadZipFile, OSError):
        return False


# Bounds on what a model file may declare: generous for real models, small enough that a crafted
# file cannot make kdcli allocate an absurd example input before anything else is checked.
MAX_INPUT_DIMS = 4
MAX_INPUT_ELEMENTS = 1 << 26
MAX_CLASSES = 1_000_000


def _check_spec(path: Path, spec: Any) -> tuple[str, dict, tuple[int, ...], int]:
    """The model spec of a model file as ``(name, args, input_shape, num_classes)``, or
    CheckpointError naming the field that is not what a kdcli model file holds."""
    if not isinstance(spec, dict):
        raise CheckpointError(f"{path}: malformed kdcli model file (field 'model': expected a mapping)")
    name, args = spec.get("name"), spec.get("args") or {}
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{path}: malformed kdcli model file (field 'model.name': expected a model spec string)")
    if not isinstance(args, dict):
        raise CheckpointError(f"{path}: malformed kdcli model file (field 'model.args': expected a mapping)")
    shape = spec.get("input_shape")
    if (not isinstance(shape, list) or not 1 <= len(shape) <= MAX_INPUT_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
            or math.prod(shape) > MAX_INPUT_ELEMENTS):
        raise CheckpointError(f"{path}: malformed kdcli model file (field 'model.input_shape': expected 1 to "
                              f"{MAX_INPUT_DIMS} positive sizes of at most {MAX_INPUT_ELEMENTS} elements in all, "
                              f"got {shape!r:.80})")
    classes = spec.get("num_classes")
    if not isinstance(classes, int) or isinstance(classes, bool) or not 1 <= classes <= MAX_CLASSES:
        raise CheckpointError(f"{path}: malformed kdcli model file (field 'model.num_classes': expected an integer "
                              f"from 1 to {MAX_CLASSES}, got {classes!r:.40})")
    return name, dict(args), tuple(shape), classes


def check_finite(sd: dict[str, torch.Tensor], what: str) -> None:
    """CheckpointError naming the first floating-point tensor of ``sd`` holding NaN or infinity."""
    for k, v in sd.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{what}: weight {k} holds NaN or infinite values")


def _code_refusal(path: Path, code: list[str]) -> CheckpointError:
    shown = ", ".join(repr(c) for c in code[:3])
    return CheckpointError(
        f"{path}: its model spec would import and run code from {shown}; a model file is data, so only "
        "built-in models load by default. If you trust that code, name it yourself (--model, or the "
        "recipe's model) or pass --trust-checkpoint")


def _relative_to_file(name: str, folder: Path) -> str:
    """A ``file.py:factory`` spec's absolute path written relative to the model file's folder, so
    that the model file and its model code can move together."""
    if not is_file_spec(name):
        return name
    target, _, attr = name.rpartition(":")
    if not Path(target).is_absolute():
        return name
    return f"{Path(os.path.relpath(target, folder.resolve())).as_posix()}:{attr}"


def _absolute_from_file(name: str, folder: Path, base_dir: Path | None) -> str:
    """A model file's ``file.py:factory`` spec resolved: relative to the model file's folder, or,
    for files written before kdcli stored it that way, to ``base_dir`` where only that exists."""
    if not is_file_spec(name):
        return name
    here = absolute_spec(name, folder)
    if base_dir is not None and not Path(here.rpartition(":")[0]).is_file():
        legacy = absolute_spec(name, base_dir)
        if Path(legacy.rpartition(":")[0]).is_file():
            return legacy
    return here


def load_model_file(path: Path, *, base_dir: Path | None = None, allow: Iterable[str] = (), trust: bool = False,
                    model: str | None = None, model_args: dict | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model of a kdcli model file: check its contents, build it from its spec, replay
    its pruning history, load its (finite) weights strictly. Returns ``(model in eval mode on the
    CPU, info)`` where ``info`` holds ``format``, ``format_version``, ``model``, ``pruning_history``
    and ``metadata``.

    A model file is data: a spec naming user code (``module:factory``, ``file.py:factory``, also as
    an ensemble member) is built only when ``trust`` is set or the same code is in ``allow`` (the
    specs the user named, in :func:`kdcli.models.absolute_spec` form); otherwise CheckpointError
    says which code the file wants to run. ``file.py`` paths resolve against the model file's
    folder. ``model`` (and ``model_args``, by default the file's when ``model`` is the file's own
    model), named by the user, replace the file's spec."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    obj = _torch_load(path, trust=False)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a kdcli model file (expected format {FORMAT!r})")
    version = obj.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: kdcli model format version {version!r:.40}; this kdcli reads version {FORMAT_VERSION}")
    name, args, input_shape, num_classes = _check_spec(path, obj.get("model"))
    history, sd = obj.get("pruning_history") or [], obj.get("state_dict")
    if not isinstance(history, list):
        raise CheckpointError(f"{path}: malformed kdcli model file (field 'pruning_history': expected a list)")
    if not _is_state_dict(sd):
        raise CheckpointError(f"{path}: malformed kdcli model file (field 'state_dict': expected tensors by name)")
    metadata = obj.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: malformed kdcli model file (field 'metadata': expected a mapping)")
    check_finite(sd, str(path))
    try:
        name, args = map_spec_names(name, args, lambda n: _absolute_from_file(n, path.parent, base_dir))
        if model is not None:  # the file's args only when the user named the file's own model
            args = dict(model_args) if model_args is not None else args if model == name else {}
            name = model
        code = code_named_by(name, args)
    except ModelError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    allowed = set(allow) | ({model} if model is not None else set())
    refused = [c for c in code if c not in allowed]
    if refused and not trust:
        raise _code_refusal(path, refused)
    try:
        built = build_model(name, args, input_shape=input_shape, num_classes=num_classes)
    except ModelError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    built.eval()
    try:
        replay_history(built, torch.zeros(1, *input_shape), history)
    except ModelError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    built.load_state_dict(_fit(built, sd, f"{path} does not fit model {name} after its pruning history"), strict=True)
    info = {"format": FORMAT, "format_version": version,
            "model": {"name": name, "args": args, "input_shape": list(input_shape), "num_classes": num_classes},
            "pruning_history": history, "metadata": dict(metadata)}
    return built, info


# ----------------------------------------------------------------------------- models with their info


@dataclass
class ModelInfo:
    """What is needed to rebuild, describe and export a model besides its weights."""

    name: str
    args: dict
    input_shape: tuple
    num_classes: int
    pruning_history: list = field(default_factory=list)
    metadata: dict = field(default_factory=dict)


def data_metadata(data: DataBundle) -> dict:
    return {"mean": list(data.mean), "std": list(data.std), "scale": data.scale, "class_names": list(data.class_names),
            "data": data.description}


def export_info(info: ModelInfo, data: DataBundle | None = None) -> dict:
    """What :func:`kdcli.export.onnx.export_report` records about a model: its spec and the input
    normalisation, from ``data`` when given, else from the model file's metadata."""
    meta = info.metadata or {}
    norm = data_metadata(data) if data is not None else meta
    return {"name": info.name, "input_shape": list(info.input_shape), "num_classes": info.num_classes,
            "mean": norm.get("mean"), "std": norm.get("std"), "scale": norm.get("scale", 1.0),
            "class_names": norm.get("class_names")}


def save_model(path: Path, model: nn.Module, info: ModelInfo) -> None:
    """Write a kdcli model file (rank 0 only); the same model and info give the same bytes."""
    if not is_main_process():
        return
    # No wall-clock time: a model file is a function of its inputs, so a resumed run writes the
    # same bytes as an uninterrupted one (run.json records when a run started).
    meta = {"kdcli_version": __version__, **info.metadata}
    save_model_file(path, model, name=info.name, args=info.args, input_shape=list(info.input_shape),
                    num_classes=info.num_classes, pruning_history=info.pruning_history, metadata=meta)


def load_model_any(path: Path, *, spec_name: str | None, spec_args: dict | None, input_shape, num_classes,
                   base_dir: Path, trust: bool = False, allow: Iterable[str] = (),
                   override: bool = False) -> tuple[nn.Module, ModelInfo]:
    """A kdcli model file, or a user checkpoint with the model spec that fits it.

    ``spec_name`` is relative to ``base_dir``. A model file is built from its own spec when that
    names only built-in models or code in ``allow`` (absolute specs the user named; see
    :func:`kdcli.models.file.load_model_file`), or with ``trust``; with ``override`` (the user
    named the model on the command line) from ``spec_name`` / ``spec_args`` instead."""
    path = Path(path)
    if is_model_file(path):
        use = override and spec_name is not None
        model, info = load_model_file(path, base_dir=base_dir, allow=allow, trust=trust,
                                      model=absolute_spec(spec_name, base_dir) if use else None,
                                      model_args=spec_args if use else None)
        spec = info["model"]
        return model, ModelInfo(spec["name"], spec.get("args", {}), tuple(spec["input_shape"]),
                                spec["num_classes"], list(info.get("pruning_history", [])),
                                dict(info.get("metadata", {})))
    if spec_name is None:
        raise CheckpointError(f"{path}: not a kdcli model file, so a model spec is needed (recipe teacher.model or --model)")
    model = load_model(spec_name, spec_args or {}, path, input_shape=input_shape, num_classes=num_classes,
                       base_dir=base_dir, trust=trust)
    return model, ModelInfo(absolute_spec(spec_name, base_dir), dict(spec_args or {}), tuple(input_shape), num_classes)


def recipe_models(recipe: Recipe) -> list[str]:
    """The model specs a recipe names (teacher, student, ensemble generalist or members), in
    :func:`kdcli.models.absolute_spec` form: the code its model files may run without a flag."""
    specs = [getattr(recipe.teacher, "model", None), recipe.student.model,
             getattr(getattr(recipe.teacher, "generalist", None), "model", None)]
    return [absolute_spec(s, recipe.base_dir) for s in specs if isinstance(s, str)]


def _input_hint(have, want) -> str:
    """Which ``data.input`` key makes image inputs ``have`` (C, H, W) fit ``want``."""
    if len(have) != 3 or len(want) != 3:
        return ""
    keys = []
    have, want = tuple(have), tuple(want)
    if have[1:] != want[1:]:
        keys.append(f"size: [{want[1]}, {want[2]}]" + (", fit: pad" if all(h <= w for h, w in zip(have[1:], want[1:])) else ""))
    if have[0] != want[0]:
        keys.append(f"channels: {want[0]}")
    return f"; set data.input: {{{', '.join(keys)}}}"


def check_model_fits(model: nn.Module, info, data, example: torch.Tensor) -> None:
    """The model, its declared input shape and the data agree (shape, classes, a forward pass that
    gives ``[N, num_classes]`` logits); one-line DataError / ModelError otherwise, before training."""
    if data is not None and tuple(data.input_shape) != tuple(info.input_shape):
        raise DataError(f"data ({data.description}): inputs of shape {list(data.input_shape)}, but model "
                        f"{info.name} expects {list(info.input_shape)}{_input_hint(data.input_shape, info.input_shape)}")
    if data is not None and data.num_classes != info.num_classes:
        raise DataError(f"data ({data.description}): {data.num_classes} classes, but model {info.name} "
                        f"has {info.num_classes} outputs")
    try:
        with eval_mode(model), torch.no_grad():
            out = model(example)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's model is reported in one line
        text = " ".join(str(exc).split())[:200]
        raise ModelError(f"model {info.name}: forward pass on input shape {list(info.input_shape)} failed "
                         f"({type(exc).__name__}: {text})") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != info.num_classes:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"model {info.name}: output {shape}, expected logits [N, {info.num_classes}]")
