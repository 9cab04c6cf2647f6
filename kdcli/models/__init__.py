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
}


def builtin_names() -> list[str]:
    """The names of the built-in architectures, sorted."""
    return sorted(BUILTIN)


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
    if not isinstance(model, nn.Module):
        raise ModelError(f"model {name!r}: factory returned {type(model).__name__}, expected torch.nn.Module")
    return model
