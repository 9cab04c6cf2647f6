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
replayed (:func:`kdcli.prune.replay_history`) and the weights loaded strictly.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcli.errors import CheckpointError, ModelError
from kdcli.run import atomic_torch_save

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
        if not trust and "Unsupported global" in str(exc):
            raise CheckpointError(f"{path}: holds pickled objects (e.g. a whole nn.Module) that can run code when "
                                  "loaded; pass --trust-checkpoint if you trust its source") from None
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
    from kdcli.models import build_model

    path = Path(path)
    obj = read_state_dict(path, trust=trust)
    if isinstance(obj, nn.Module):
        return obj.cpu().eval()
    model = build_model(spec_name, spec_args or {}, input_shape=input_shape, num_classes=num_classes,
                        base_dir=base_dir)
    model.load_state_dict(_fit(model, obj, f"{path} does not fit model {spec_name}"), strict=True)
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
    CPU state dict and JSON-like ``metadata``; see the module docstring for the layout."""
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


def load_model_file(path: Path, *, base_dir: Path | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model of a kdcli model file: build it from its spec, replay its pruning
    history, load its weights strictly. Returns ``(model in eval mode on the CPU, info)`` where
    ``info`` holds ``format``, ``format_version``, ``model``, ``pruning_history`` and ``metadata``."""
    from kdcli.models import build_model
    from kdcli.prune import replay_history

    path = Path(path)
    obj = _torch_load(path, trust=False)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a kdcli model file (expected format {FORMAT!r})")
    version = obj.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: kdcli model format version {version}; this kdcli reads version {FORMAT_VERSION}")
    try:
        spec = obj["model"]
        name, args = spec["name"], spec.get("args") or {}
        input_shape, num_classes = tuple(int(d) for d in spec["input_shape"]), int(spec["num_classes"])
        history, sd = list(obj.get("pruning_history") or []), obj["state_dict"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: malformed kdcli model file (field {exc})") from None
    model = build_model(name, args, input_shape=input_shape, num_classes=num_classes, base_dir=base_dir)
    model.eval()
    try:
        replay_history(model, torch.zeros(1, *input_shape), history)
    except ModelError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    model.load_state_dict(_fit(model, sd, f"{path} does not fit model {name} after its pruning history"), strict=True)
    info = {"format": FORMAT, "format_version": version, "model": dict(spec), "pruning_history": history,
            "metadata": dict(obj.get("metadata") or {})}
    return model, info

