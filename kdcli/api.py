"""The Python API: ``kdcli.analyze``, ``kdcli.compress`` and ``kdcli.export``, what the commands
of the same names do, returning their typed reports instead of printing them.

Each wraps the library calls its command makes (loading the recipe, data and models as the CLI
does, then :func:`kdcli.analyze.analysis.analyze`, :func:`kdcli.dkdp.compress.compress` or
:func:`kdcli.export.onnx.export_report`), so a notebook or script gets the same results and files
as the command line. Errors are the CLI's: a :class:`kdcli.errors.KdcliError` with a one-line
message (:class:`~kdcli.errors.InputError` for bad input). A failed quality gate is not raised:
it is in the report (``CompressReport.gate_failures``, ``ExportReport.gates.failures``), for the
caller to decide. Nothing is printed unless ``verbose=True`` (progress then goes to stderr).

The three calls on the built-in quickstart (scikit-learn's 8×8 digits, no download), cut down
to seconds:

>>> import tempfile
>>> import kdcli
>>> tmp = tempfile.mkdtemp()
>>> report = kdcli.compress("quickstart", out_dir=f"{tmp}/run", device="cpu",
...                         overrides=["teacher.train.epochs=3", "distill.train.epochs=1", "prune.steps=1",
...                                    "prune.final_epochs=1", "export.enabled=false"])
>>> report.student.macs_ratio <= 0.3                      # the recipe's target: 30 % of the MACs
True
>>> analysis = kdcli.analyze(f"{tmp}/run/student.kdc", data="digits", device="cpu")
>>> analysis.model.macs == report.student.macs and analysis.suggested_ratios is not None
True
>>> exported = kdcli.export(f"{tmp}/run/student.kdc", teacher=f"{tmp}/run/teacher.kdc", out=f"{tmp}/export",
...                         recipe="quickstart", batch_sizes=[1], latency_budget_s=0.05,
...                         fail_if=["accuracy_drop > 50"])
>>> exported.student.verification.top1_agreement, exported.ratios.macs == report.student.macs_ratio
(1.0, True)
>>> exported.gates.failures
[]

This module imports torch; ``kdcli/__init__`` loads it on the first call of one of the three,
so ``import kdcli`` stays fast.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Sequence, Union

import torch
import yaml
from torch import nn

from kdcli.analyze.analysis import analyze as run_analyze
from kdcli.config.recipe import QUANTIZE_METHODS, ExportSpec, Recipe, builtin_recipe_path, load_recipe, parse_recipe
from kdcli.console import Reporter
from kdcli.data.loader import DataBundle
from kdcli.dkdp.compress import compress as run_compress
from kdcli.dkdp.compress import start_run
from kdcli.dkdp.run import resume_run
from kdcli.errors import InputError, ModelError
from kdcli.export.onnx import export_report
from kdcli.files import check_writable_dir
from kdcli.inputs import analysis_data, device_of, load_model_input
from kdcli.models.file import ModelInfo, export_info
from kdcli.reports.analysis_model import AnalysisReport, check_analysis
from kdcli.reports.gates import load_baseline, parse_gates
from kdcli.reports.compress_model import SCHEMA_URI, SCHEMA_VERSION, CompressReport, check_compress_report
from kdcli.reports.models import ExportReport
from kdcli.tracking import open_tracker

PathLike = Union[str, Path]

__all__ = ["analyze", "compress", "export"]


def compress(recipe: "PathLike | Recipe | None" = None, *, out_dir: PathLike | None = None,
             overrides: Sequence[str] = (), device: "str | torch.device | None" = None,
             resume: PathLike | None = None, overwrite: bool = False, export: bool | None = None,
             log: Sequence[str] = (), trust: bool = False, force: bool = False,
             verbose: bool = False) -> "CompressReport":
    """Compress as ``kdcli compress`` does (DKDP: prune steps, distillation, the final distillation,
    export) and return the run's report, :class:`kdcli.reports.compress_model.CompressReport`
    (what ``compress_report.json`` holds). The run directory gets the same files as from the CLI.

    ``recipe``: a recipe file, a built-in recipe's name (``quickstart``, ``mnist``, ...), recipe
    YAML text, or a :class:`kdcli.config.recipe.Recipe`; None for the quickstart.
    ``out_dir``: the run directory (default: the recipe's ``out_dir``, else ``runs/<recipe name>``);
    ``overwrite`` starts afresh in one that holds an earlier run. ``overrides``: ``KEY.PATH=VALUE``
    items as ``--set`` takes them. ``device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` (default: the
    recipe's). ``resume``: a run directory to continue after its last finished step, with its own
    recipe (give no ``recipe`` or ``overrides`` then; ``force`` accepts a changed ``recipe.yaml``).
    ``export``: export to ONNX (default: the recipe's ``export.enabled``). ``log``: ``--log``
    values (``tensorboard:DIR``, ``mlflow``, ``mlflow:URI``; :mod:`kdcli.tracking`).
    ``trust``: allow checkpoints that hold pickled objects (their code runs).

    >>> import tempfile
    >>> import kdcli
    >>> run = tempfile.mkdtemp()
    >>> report = kdcli.compress("quickstart", out_dir=run, device="cpu",
    ...                         overrides=["teacher.train.epochs=3", "distill.train.epochs=1",
    ...                                    "prune.steps=1", "prune.final_epochs=1", "export.enabled=false"])
    >>> type(report).__name__, report.teacher.model, report.export is None
    ('CompressReport', 'mlp', True)
    >>> report.student.macs < report.teacher.macs and report.steps[0].accepted
    True
    """
    tracker = open_tracker(log)  # a bad log value or a missing package: before a run directory is made
    if resume is not None:
        if recipe is not None or overrides:
            raise InputError("resume continues a run with its own recipe: give no recipe or overrides with it")

        run_dir = Path(resume)
        rec = resume_run(run_dir, force=force, flag="resume")
    else:
        path, text = _recipe_source(recipe if recipe is not None else "quickstart")
        if text is not None:

            parse_recipe(text, "recipe" if path is None else str(path), path, list(overrides))  # errors name it
        rec, run_dir = start_run(path, out_dir=None if out_dir is None else Path(out_dir),
                                 overrides=list(overrides), recipe_text=text, overwrite=overwrite)
    dev = _device(device, rec)
    result = run_compress(rec, run_dir, device=dev, reporter=Reporter(quiet=not verbose), trust=trust,
                          do_export=export, tracker=tracker)
    return check_compress_report({"$schema": SCHEMA_URI, "schema_version": SCHEMA_VERSION, **result.to_json()})


def analyze(model: "PathLike | nn.Module", *, recipe: "PathLike | Recipe | None" = None,
            data: "str | DataBundle | None" = None, model_spec: str | None = None,
            model_args: dict | None = None, input_shape: Sequence[int] | None = None,
            num_classes: int | None = None, target_macs: float | None = None, clusters: int | None = None,
            out_dir: PathLike | None = None, device: "str | torch.device | None" = None, trust: bool = False,
            verbose: bool = False) -> "AnalysisReport":
    """Analyse a model as ``kdcli analyze`` does and return
    :class:`kdcli.reports.analysis_model.AnalysisReport` (what ``analysis.json`` holds): MACs and
    parameters per layer, the prunable groups and their importances; with data, activation
    sensitivity, PCA redundancy, the pruning-sensitivity scan and suggested per-group ratios.

    ``model``: a kdcli model file (``.kdc``), a checkpoint (with ``model_spec`` or ``recipe``), or an
    ``nn.Module`` (with ``input_shape`` and ``num_classes``, or ``data`` that gives them).
    ``data``: ``digits`` or ``KIND:PATH`` as ``--data`` takes it, or a
    :class:`kdcli.data.loader.DataBundle`; with ``recipe``, its data section (else static figures
    only). ``target_macs``: the MACs fraction of the suggested ratios; ``clusters``: K confusable
    class subsets; ``out_dir``: also write ``analysis.json``, ``report.html``, ... there.
    ``model_spec``/``model_args``/``input_shape``/``num_classes``: as ``--model``, ``--model-args``,
    ``--input-shape``, ``--num-classes``. The model is left as it was (weights and train/eval mode;
    an ``nn.Module`` is copied when ``device`` is not the one it is on).

    >>> import torch
    >>> import kdcli
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
    ...                           torch.nn.Linear(32, 10))
    >>> report = kdcli.analyze(net, input_shape=(1, 8, 8), num_classes=10)
    >>> report.model.macs, report.model.params, [g.channels for g in report.groups]
    (2442, 2410, [32])
    >>> report.data is None  # no data: static figures only
    True
    """

    rec = _load_recipe(recipe) if recipe is not None else None
    if out_dir is not None:
        check_writable_dir(Path(out_dir), "out_dir")
    bundle = _data(rec, data)
    if isinstance(model, torch.nn.Module):
        info = _module_info(model, bundle, input_shape, num_classes)
        here = _module_device(model)
        dev = _device(device, rec, default=here)
        mdl = model if dev == here else copy.deepcopy(model).to(dev)
    else:
        dev = _device(device, rec)
        mdl, info = _load(model, rec, model_spec, model_args, bundle, trust, input_shape, num_classes)
        mdl = mdl.to(dev)
    settings = rec.analyze if rec is not None else None
    try:
        result = run_analyze(mdl, info, bundle, device=dev, settings=settings, target_macs=target_macs,
                             out_dir=None if out_dir is None else Path(out_dir), reporter=Reporter(quiet=not verbose),
                             seed=rec.seed if rec is not None else 0, clusters=clusters)
    except ModelError as exc:  # a layer's failure, named with the file it came from
        if isinstance(model, torch.nn.Module):
            raise
        raise ModelError(f"{model}: {exc}") from None
    return check_analysis(result)


def export(student: "PathLike | nn.Module", *, teacher: "PathLike | nn.Module | None" = None,
           out: PathLike = "export", recipe: "PathLike | Recipe | None" = None, model_spec: str | None = None,
           model_args: dict | None = None, input_shape: Sequence[int] | None = None,
           num_classes: int | None = None, batch_sizes: Sequence[int] | None = None, opset: int | None = None,
           fail_if: Sequence[str] = (), baseline: PathLike | None = None, latency_budget_s: float | None = None,
           threads: int | None = None, quantize: str | None = None, trust: bool = False,
           verbose: bool = False) -> "ExportReport":
    """Export to ONNX, verify against PyTorch in onnxruntime and time, as ``kdcli export`` does;
    returns :class:`kdcli.reports.models.ExportReport` (what ``report.json`` holds) and writes
    ``student.onnx`` (``teacher.onnx``) and ``report.json/.md/.html`` into ``out``.

    ``student``/``teacher``: kdcli model files, checkpoints (with ``model_spec`` or ``recipe``), or
    ``nn.Module`` objects (with ``input_shape`` and ``num_classes``, or a ``recipe``; they are
    copied, not moved). ``recipe``: its data judge accuracy and verify the export, its model spec
    and export settings are the defaults. ``batch_sizes`` (default 1, 64), ``opset`` (default 18),
    ``latency_budget_s`` (seconds of timing per model and batch size, default 2): as the recipe's
    ``export`` section. ``fail_if``: gates such as ``"accuracy_drop > 0.5"`` or ``"speedup < 2"``;
    the failed ones are listed in ``report.gates.failures`` (the CLI exits 3 on them).
    ``baseline``: the ``report.json`` of an earlier export, for gates such as
    ``"accuracy < baseline.accuracy - 0.3"`` (as ``--baseline``). ``threads``: onnxruntime's (and
    meanwhile torch's) threads for the measurements (default: the recipe's ``export.threads``, else
    one per core). ``quantize``: ``"dynamic"`` also writes ``student.int8.onnx`` and reports it as
    ``student_int8`` (default: the recipe's ``export.quantize``, else ``"none"``).

    >>> import tempfile
    >>> import torch
    >>> import kdcli
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    >>> report = kdcli.export(net, input_shape=(1, 8, 8), num_classes=10, out=tempfile.mkdtemp(),
    ...                       batch_sizes=[1], latency_budget_s=0.05)
    >>> report.student.file, report.student.verification.inputs  # no data: verified on random inputs
    ('student.onnx', 'random')
    >>> report.teacher is None and report.accuracy is None
    True
    """

    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InputError(f"threads: expected an integer >= 1, got {threads!r}")
    if quantize is not None and quantize not in QUANTIZE_METHODS:
        raise InputError(f"quantize: expected {' or '.join(map(repr, QUANTIZE_METHODS))}, got {quantize!r}")
    rec = _load_recipe(recipe) if recipe is not None else None
    out = Path(out)
    check_writable_dir(out, "out")
    base = load_baseline(baseline) if baseline is not None else None  # before any long work
    base_source = str(baseline) if baseline is not None else "report"
    data = _data(rec, None)
    models = []
    for m in (student, teacher):
        if m is None:
            models.append((None, None))
        elif isinstance(m, torch.nn.Module):
            models.append((copy.deepcopy(m), _module_info(m, data, input_shape, num_classes)))
        else:  # a teacher named with a recipe takes the recipe's spec, as in the CLI
            spec, args = (None, None) if (m is teacher and rec is not None) else (model_spec, model_args)
            models.append(_load(m, rec, spec, args, data, trust, input_shape, num_classes))
    (s_model, s_info), (t_model, t_info) = models
    x_eval = y_eval = None
    if data is not None:
        x_eval, y_eval = data.eval_tensors("test" if data.test is not None else "val", torch.device("cpu"))
    settings = (rec.export if rec is not None else ExportSpec()).settings(
        batch_sizes=batch_sizes, fail_if=fail_if, latency_budget_s=latency_budget_s, threads=threads,
        quantize=quantize, opset=opset)
    parse_gates(settings["gates"], base, base_source)  # a gate naming baseline. needs a baseline
    return export_report(s_model.cpu().eval(), export_info(s_info, data), out,
                         teacher=None if t_model is None else t_model.cpu().eval(),
                         teacher_info=None if t_info is None else export_info(t_info, data),
                         x_eval=x_eval, y_eval=y_eval, reporter=Reporter(quiet=not verbose), baseline=base,
                         baseline_source=base_source, **settings)


# ----------------------------------------------------------------------------- shared with the CLI


def _recipe_source(recipe: PathLike | Recipe) -> tuple[Path | None, str | None]:
    """``(path, text)`` for :func:`kdcli.dkdp.run.start_run`: a file (text None: it reads it), a
    built-in name, YAML text (path None), or a Recipe object (its YAML, its path for relative paths)."""
    if isinstance(recipe, Recipe):

        text = yaml.safe_dump(recipe.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False)
        return recipe.path, text
    if isinstance(recipe, str):
        if "\n" in recipe or recipe.lstrip().startswith("{") or (": " in recipe and not _is_file(recipe)):
            return None, recipe  # YAML: a file name has no line break, and rarely ": "
        if re.fullmatch(r"[A-Za-z0-9_-]+", recipe) and not _is_file(recipe) and builtin_recipe_path(recipe).is_file():
            return builtin_recipe_path(recipe), None
    return Path(recipe), None


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # too long a name, a NUL: not a file
        return False


def _load_recipe(recipe: PathLike | Recipe) -> "Recipe":

    if isinstance(recipe, Recipe):
        return recipe
    path, text = _recipe_source(recipe)
    return load_recipe(path) if text is None else parse_recipe(text, "recipe", None)


def _device(name: "str | torch.device | None", recipe=None, default: "torch.device | None" = None) -> torch.device:
    """The device as ``--device`` gives it (else ``default``, else the recipe's, else auto)."""

    if isinstance(name, torch.device):
        return name
    if name is None and default is not None:
        return default
    return device_of(name, recipe)


def _data(rec, data):
    """The DataBundle of ``data`` (as ``--data``), else of the recipe, else None."""
    if data is not None and not isinstance(data, str):
        return data

    flags = dict.fromkeys(("--val", "--normalize", "--input-size", "--fit", "--channels"))
    return analysis_data(rec, data, flags)


def _load(path: PathLike, rec, spec, args, data, trust, input_shape, num_classes):
    """A model file or checkpoint, loaded as the CLI's ``export`` and ``analyze`` load it."""
    return load_model_input(Path(path), rec, spec, None if args is None else json.dumps(args), data, trust,
                            None if input_shape is None else ",".join(str(int(d)) for d in input_shape),
                            num_classes)


def _module_info(model: "nn.Module", data, input_shape, num_classes):
    """The :class:`kdcli.models.file.ModelInfo` of an in-memory model: its input and classes given,
    else those of the data."""
    shape = tuple(int(d) for d in input_shape) if input_shape is not None else \
        (tuple(data.input_shape) if data is not None else None)
    classes = num_classes if num_classes is not None else (data.num_classes if data is not None else None)
    if shape is None or classes is None:
        raise InputError(f"{type(model).__name__}: an nn.Module needs input_shape and num_classes "
                         "(or data, or a recipe, that gives them)")
    return ModelInfo(type(model).__name__, {}, shape, int(classes))


def _module_device(model: "nn.Module") -> torch.device:

    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")
