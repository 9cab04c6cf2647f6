"""Model resolution: built-in names, ``package.module:factory`` and ``path/to/file.py:factory``.

A model spec is a name plus keyword arguments. Built-in factories take ``input_shape`` and
``num_classes`` from the data; a user factory gets its own keyword arguments, plus
``input_shape`` / ``num_classes`` when its signature asks for them and the recipe did not set
them. User code is imported only from the module or file the user names.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from kdcli.errors import InputError, ModelError

BUILTIN = {
    "mlp": ("kdcli.models.zoo", "mlp"),
    "lenet5": ("kdcli.models.zoo", "lenet5"),
    "cnn3": ("kdcli.models.zoo", "cnn3"),
    "vgg": ("kdcli.models.zoo", "vgg"),
    "resnet20": ("kdcli.models.resnet_cifar", "resnet20"),
    "resnet32": ("kdcli.models.resnet_cifar", "resnet32"),
    "resnet44": ("kdcli.models.resnet_cifar", "resnet44"),
    "resnet56": ("kdcli.models.resnet_cifar", "resnet56"),
    "resnet18": ("kdcli.models.resnet", "resnet18"),
    "mobilenet_v2": ("kdcli.models.mobilenet", "mobilenet_v2"),
    "vit": ("kdcli.models.vit", "vit"),
}


# kdcli's own factories that a model file may name: they build ensembles whose members are model
# specs of their own (under these argument keys), so loading one runs the members' code too.
KDCLI_FACTORIES = {
    "kdcli.ensembles.build:specialist_ensemble": "generalist",
    "kdcli.ensembles.build:averaged_ensemble": "member",
}


def builtin_names() -> list[str]:
    """The names of the built-in architectures, sorted."""
    return sorted(BUILTIN)


def is_file_spec(name: str) -> bool:
    """Whether ``name`` is a ``path/to/file.py:factory`` spec."""
    target, sep, _ = str(name).rpartition(":")
    return bool(sep) and target.endswith(".py")


def absolute_spec(name: str, base_dir: Path | None) -> str:
    """``name`` with a relative ``file.py:factory`` path made absolute against ``base_dir`` (other
    specs unchanged): the form model files and code checks compare."""
    if not is_file_spec(name):
        return name
    target, _, attr = name.rpartition(":")
    path = Path(target).expanduser()
    if not path.is_absolute():
        path = Path(base_dir or Path.cwd()) / path
    return f"{path.resolve()}:{attr}"


def map_spec_names(name: str, args: dict, fn: Callable[[str], str]) -> tuple[str, dict]:
    """``(fn(name), args)`` with ``fn`` applied as well to the member specs that kdcli's ensemble
    factories carry in their args (see ``KDCLI_FACTORIES``); ``args`` is copied, not changed."""
    args = dict(args or {})
    key = KDCLI_FACTORIES.get(name)
    if key is not None and isinstance(args.get(key), dict) and isinstance(args[key].get("name"), str):
        inner = dict(args[key])
        inner["name"], inner["args"] = map_spec_names(inner["name"], inner.get("args") or {}, fn)
        args[key] = inner
    return fn(name), args


def code_named_by(name: str, args: dict | None) -> list[str]:
    """The user code (``module:factory`` / ``file.py:factory`` specs) that building the model spec
    ``(name, args)`` would import and run: none for a built-in; for kdcli's own ensemble factories,
    that of their members. A member spec that is not ``{"name": str, ...}`` raises ModelError."""
    if not isinstance(name, str):
        raise ModelError(f"model name: expected a string, got {type(name).__name__}")
    if name in BUILTIN:
        return []
    key = KDCLI_FACTORIES.get(name)
    if key is None:
        return [name]
    inner = (args or {}).get(key)
    if not isinstance(inner, dict) or not isinstance(inner.get("name"), str) or \
            not isinstance(inner.get("args") or {}, dict):
        raise ModelError(f"model {name!r}: argument {key!r} must be a model spec {{name, args}}")
    return code_named_by(inner["name"], inner.get("args") or {})


def import_callable(spec: str, base_dir: Path | None = None, *, label: str = "model",
                    error: type[InputError] = ModelError) -> Callable[..., Any]:
    """Import the callable named by ``package.module:attr`` or ``path/to/file.py:attr``.

    Relative file paths resolve against ``base_dir`` (the recipe's folder). Failures raise
    ``error`` with a one-line message starting ``{label} {spec!r}:``. Shared by model factories
    and ``python`` data sources.
    """
    if ":" not in spec:
        raise error(f"{label} {spec!r}: expected 'package.module:function' or 'path/to/file.py:function'")
    target, attr = spec.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if not path.is_file():
            raise error(f"{label} {spec!r}: file {path} not found")
        mod_name = f"kdcli_user_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[mod_name]
            raise error(f"{label} {spec!r}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise error(f"{label} {spec!r}: cannot import module {target!r} ({exc})") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise error(f"{label} {spec!r}: {target} has no callable {attr!r}")
    return fn


def resolve_factory(name: str, base_dir: Path | None = None) -> tuple[Callable[..., Any], bool]:
    """Return ``(factory, is_builtin)`` for a model name.

    ``name`` is a built-in (``resnet20``), ``package.module:factory`` or
    ``path/to/file.py:factory`` (relative paths resolve against ``base_dir``, the recipe's folder).
    """
    if name in BUILTIN:
        mod, attr = BUILTIN[name]
        return getattr(importlib.import_module(mod), attr), True
    if ":" not in name:
        raise ModelError(
            f"model {name!r}: expected a built-in ({', '.join(builtin_names())}), "
            "'package.module:factory' or 'path/to/file.py:factory'"
        )
    return import_callable(name, base_dir), False


def build_model(name: str, args: dict | None = None, *, input_shape: Sequence[int],
                num_classes: int, base_dir: Path | None = None):
    """Build a model from its spec; errors name the model and what was wrong."""
    import torch.nn as nn

    args = dict(args or {})
    factory, builtin = resolve_factory(name, base_dir)
    kwargs = dict(args)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    if builtin or "input_shape" in params:
        kwargs.setdefault("input_shape", tuple(input_shape))
    if builtin or "num_classes" in params:
        kwargs.setdefault("num_classes", int(num_classes))
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise ModelError(f"model {name!r}: bad model_args {args}: {exc}") from exc
    except ValueError as exc:
        raise ModelError(f"model {name!r}: {exc}") from exc
    except (RuntimeError, OverflowError, IndexError, KeyError) as exc:  # e.g. a negative width in model_args
        text = " ".join(str(exc).split())[:160]
        raise ModelError(f"model {name!r}: building it with model_args {args} failed ({type(exc).__name__}: "
                         f"{text})") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"model {name!r}: factory returned {type(model).__name__}, expected torch.nn.Module")
    return model
