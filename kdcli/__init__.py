"""kdcli: compress trained PyTorch models by knowledge distillation and structured pruning.

The Python API (:mod:`kdcli.api`), loaded on first use so that ``import kdcli`` stays fast and
free of torch::

    import kdcli

    report = kdcli.compress("quickstart", out_dir="runs/quick")   # CompressReport
    analysis = kdcli.analyze("runs/quick/student.kdc", data="digits")  # AnalysisReport
    exported = kdcli.export("runs/quick/student.kdc", teacher="runs/quick/teacher.kdc",
                            recipe="quickstart", out="export")     # ExportReport

``kdcli.analyze`` and ``kdcli.export`` are also the names of subpackages (``kdcli.analyze.analysis``,
``kdcli.export.onnx``). Python sets a subpackage as an attribute of its parent when it is first
imported, which would hide a function of the same name, so these two stay the subpackages and
are made callable: ``kdcli.export(...)`` calls :func:`kdcli.api.export`, and
``import kdcli.export.onnx`` and ``kdcli.export.onnx.export_report`` work as before.
"""

import importlib as _importlib
import types as _types

__version__ = "0.1.0"

__all__ = ["__version__", "analyze", "compress", "export"]


def _api(name: str):
    from kdcli import api

    return getattr(api, name)


class _CallablePackage(_types.ModuleType):
    """A subpackage that, called, is the API function of its name (see the module docstring)."""

    def __call__(self, *args, **kwargs):
        return _api(self.__name__.rpartition(".")[2])(*args, **kwargs)

    @property
    def __signature__(self):  # inspect.signature(kdcli.export): the function's, for help and IDEs
        import inspect

        return inspect.signature(_api(self.__name__.rpartition(".")[2]))


# Both subpackages' __init__ hold only a docstring: importing them here costs nothing.
for _name in ("analyze", "export"):
    _importlib.import_module(f"{__name__}.{_name}").__class__ = _CallablePackage
del _name


class _LazyFunction:
    """``kdcli.compress``: :func:`kdcli.api.compress`, imported on the first call (``help`` and
    ``inspect.signature`` show the function's)."""

    def __init__(self, name: str):
        self.__name__ = self.__qualname__ = name

    def __call__(self, *args, **kwargs):
        return _api(self.__name__)(*args, **kwargs)

    @property
    def __doc__(self):
        return _api(self.__name__).__doc__

    @property
    def __signature__(self):
        import inspect

        return inspect.signature(_api(self.__name__))


compress = _LazyFunction("compress")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
