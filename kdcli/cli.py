"""The ``kdcli`` command line: argument parsing, console output and exit codes. No ML logic.

Each command is a thin shell over a library function (``kdcli.dkdp.compress.compress``,
``kdcli.export.onnx.export_report``, ``kdcli.analyze.analysis.analyze``, ...). Heavy imports (torch, onnx)
happen inside command bodies so that ``kdcli --help`` answers fast.

Exit codes: 0 ok, 1 unexpected failure, 2 bad input or usage, 3 a quality gate was not met,
130 interrupted. Errors print one line (``error: ...``) and no traceback unless ``--debug``.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from kdcli import __version__
from kdcli.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_UNEXPECTED, GateError, InputError, KdcliError

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                  help="Compress trained PyTorch models: knowledge distillation and structured pruning, "
                       "exported to verified ONNX.")
recipe_app = typer.Typer(no_args_is_help=True, help="Work with recipe files.")
app.add_typer(recipe_app, name="recipe")
report_app = typer.Typer(no_args_is_help=True,
                         help="Work with report files (report.json, compress_report.json, analysis.json).")
app.add_typer(report_app, name="report")

# Options shared by the commands. Typer reads defaults from these objects.
DEVICE = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (default: the recipe's, else auto).")
JSON = typer.Option(False, "--json", help="Print the result as JSON on stdout (progress stays on stderr).")
DEBUG = typer.Option(False, "--debug", help="Show tracebacks of errors.")
SET = typer.Option(None, "--set", help="Override a recipe value: KEY.PATH=VALUE (YAML), e.g. prune.steps=2. Repeatable.")
THREADS = typer.Option(None, "--threads", min=1, max=4096,
                       help="CPU threads for torch, and in export for onnxruntime's latency measurements too "
                            "(default: one per core; export: the recipe's export.threads first). On a machine "
                            "shared with other jobs, fewer threads avoid contention.")
TRUST = typer.Option(False, "--trust-checkpoint",
                     help="Allow checkpoints holding pickled objects (a whole nn.Module). Loading such a file "
                          "RUNS CODE from it: use only for files from a source you trust.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kdcli {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                               help="Print the version and exit.")) -> None:
    """kdcli: analyze, compress (distil + prune) and export PyTorch models."""


def _command(fn: Callable) -> Callable:
    """Run a command body, mapping kdcli errors to one line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KdcliError as exc:
            if debug:
                raise
            # a quality gate is judged on figures every rank shares: rank 0 says it once
            _error(str(exc), every_rank=not isinstance(exc, GateError))
            raise typer.Exit(exc.exit_code) from None
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
            # The file-system errors a path the user gave can cause: named, exit 2. (Ours are
            # raised as InputError with more to say; these are the ones a library raised.)
            if debug:
                raise
            where = exc.filename or "a path given"
            _error(f"{where}: {exc.strerror or type(exc).__name__}")
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except KeyboardInterrupt:
            hint = getattr(wrapper, "_resume_hint", None)
            typer.echo("interrupted" + (f"; continue with: {hint}" if hint else ""), err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:  # an unexpected failure: one line, the traceback behind --debug
            if debug:
                raise
            _error(f"unexpected {type(exc).__name__}: {exc} (run again with --debug for the traceback)")
            raise typer.Exit(EXIT_UNEXPECTED) from None

    return wrapper


def _error(message: str, every_rank: bool = True) -> None:
    """The one error line on stderr; under torchrun it names the rank, and goes to torchrun's
    error file too, so that torchrun's summary shows it as the root cause. ``every_rank`` False:
    rank 0 alone prints it (an outcome all ranks share)."""
    if _LAUNCHED:
        from kdcli import distributed

        distributed.record_error(message)
        if not every_rank and _rank() != 0:
            return
        message = f"rank {_rank()}: {message}"
    typer.echo(f"error: {message}", err=True)


def _reporter():
    """Progress on stderr, with or without ``--json`` (whose result alone goes to stdout); under
    torchrun from rank 0 only."""
    from kdcli.console import Reporter

    return Reporter(quiet=_LAUNCHED and _rank() != 0)


def _rank() -> int:
    from kdcli import distributed

    return distributed.rank()


def _one_process(command: str) -> None:
    """``kdcli export`` and the report commands measure or read in one process: refused under torchrun."""
    if _LAUNCHED:
        raise InputError(f"kdcli {command} runs in one process: run it without torchrun "
                         "(torchrun serves compress, train and analyze)")


def _emit_json(obj: Any) -> None:
    """The ``--json`` result on stdout (under torchrun from rank 0 alone)."""
    from kdcli.files import _json_default

    if _LAUNCHED and _rank() != 0:
        return

    typer.echo(json.dumps(obj, indent=2, default=_json_default))


def _recipe_path(recipe: Optional[Path]) -> Path:
    if recipe is not None:
        return recipe
    from kdcli.config.recipe import builtin_recipe_path

    return builtin_recipe_path("quickstart")


# --------------------------------------------------------------------------------------- recipe


@recipe_app.command("validate")
@_command
def recipe_validate(file: Path = typer.Argument(..., help="Recipe YAML file."),
                    set_: Optional[List[str]] = SET, json_out: bool = JSON, debug: bool = DEBUG) -> None:
    """Check a recipe: unknown keys, wrong types and impossible values name the file, line and field."""
    from kdcli.config.recipe import load_recipe

    recipe = load_recipe(file, set_ or ())
    if json_out:
        _emit_json({"file": str(file), "valid": True, "recipe": recipe.model_dump(mode="json", by_alias=True)})
    else:
        typer.echo(f"{file}: valid")


@recipe_app.command("schema")
@_command
def recipe_schema(debug: bool = DEBUG) -> None:
    """Print the recipe's JSON Schema (for editors: YAML autocompletion and checks as you type)."""
    from kdcli.config.recipe import recipe_json_schema

    typer.echo(json.dumps(recipe_json_schema(), indent=2))


@app.command("schema")
@_command
def schema(name: str = typer.Argument(..., metavar="NAME",
                                      help="recipe, export-report (report.json), analysis (analysis.json) or "
                                           "compress-report (compress_report.json)."),
           debug: bool = DEBUG) -> None:
    """Print the JSON Schema of a recipe or of a report file (its $id is the file's $schema)."""
    if name == "recipe":
        from kdcli.config.recipe import recipe_json_schema

        typer.echo(json.dumps(recipe_json_schema(), indent=2))
        return
    from kdcli.reports.models import REPORT_KINDS, report_json_schema

    if name not in REPORT_KINDS:
        raise InputError(f"NAME {name!r}: expected recipe, {', '.join(REPORT_KINDS)}")
    typer.echo(json.dumps(report_json_schema(name), indent=2))


@recipe_app.command("show")
@_command
def recipe_show(name: Optional[str] = typer.Argument(None, help="A built-in recipe name (none: list them)."),
                debug: bool = DEBUG) -> None:
    """List the built-in recipes, one line each, or print one (a starting point to copy and edit)."""
    import re

    from kdcli.config.recipe import builtin_recipe_path, builtin_recipes

    if name is None:
        for recipe_name, summary in builtin_recipes().items():
            typer.echo(f"{recipe_name:<28} {summary}")
        return
    path = builtin_recipe_path(name)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or not path.is_file():  # a name, never a path
        raise InputError(f"no built-in recipe {name!r}; built-in: {', '.join(builtin_recipes())}")
    typer.echo(path.read_text(), nl=False)


# ---------------------------------------------------------------------------------------- train


@app.command()
@_command
def train(recipe: Optional[Path] = typer.Argument(None, help="Recipe YAML (default: the built-in quickstart)."),
          out: Path = typer.Option(None, "--out", help="Where to write teacher.kdc (default: runs/<recipe>/teacher.kdc)."),
          device: Optional[str] = DEVICE, set_: Optional[List[str]] = SET, threads: Optional[int] = THREADS,
          json_out: bool = JSON, debug: bool = DEBUG) -> None:
    """Train the recipe's teacher from scratch (for users and demos that have no trained model)."""
    from kdcli.inputs import device_of
    from kdcli.data.loader import load_data
    from kdcli.config.recipe import load_recipe
    from kdcli.models.file import save_model
    from kdcli.train.teacher import train_teacher

    from kdcli.files import check_writable_dir

    rec = load_recipe(_recipe_path(recipe), set_ or ())
    path = out if out is not None else rec.default_out_dir() / "teacher.kdc"
    if path.suffix != ".kdc":
        path = path / "teacher.kdc"
    if path.is_dir():
        raise InputError(f"--out {path}: is a directory; give a .kdc file or a directory to write teacher.kdc in")
    check_writable_dir(path.parent, "--out")  # before training, not after it
    dev = device_of(device, rec, threads)
    rep = _reporter()
    data = load_data(rec.data, base_dir=rec.base_dir, seed=rec.seed)  # kdcli trains it: auto validates on train
    rep.info(f"data: {data.description}; {data.judged_by()}")
    model, info, metrics = train_teacher(rec, data, dev, rep)
    save_model(path, model, info)
    result = {"teacher": str(path), "model": info.name, **metrics}
    if json_out:
        _emit_json(result)
    else:
        acc = " ".join(f"{k.replace('_accuracy', '')} {100 * v:.2f}%" for k, v in metrics.items() if k.endswith("accuracy"))
        rep.info(f"teacher written to {path} ({acc}, {metrics['train_seconds']:.1f}s)")


# ------------------------------------------------------------------------------------- compress


@app.command()
@_command
def compress(recipe: Optional[Path] = typer.Argument(None, help="Recipe YAML (default: the built-in quickstart)."),
             resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory after its last finished step."),
             out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: the recipe's out_dir, else runs/<recipe name>)."),
             overwrite: bool = typer.Option(False, "--overwrite", help="Start afresh in a run directory that holds an earlier run (its files are replaced)."),
             no_export: bool = typer.Option(False, "--no-export", help="Skip the ONNX export and latency report."),
             force: bool = typer.Option(False, "--force", help="With --resume: continue although the run's recipe.yaml changed since it started."),
             log: Optional[List[str]] = typer.Option(None, "--log", metavar="tensorboard:DIR|mlflow[:URI]",
                                                     help="Track the run: tensorboard:DIR (event files in DIR), mlflow "
                                                          "(MLFLOW_TRACKING_URI, else MLflow's default) or mlflow:URI. "
                                                          "Repeatable. Needs: pip install 'kdcli[tracking]'."),
             device: Optional[str] = DEVICE, set_: Optional[List[str]] = SET, trust: bool = TRUST,
             threads: Optional[int] = THREADS, json_out: bool = JSON, debug: bool = DEBUG) -> None:
    """DKDP: prune structurally and distil the teacher into the student until the recipe's target is met."""
    from kdcli.inputs import device_of
    from kdcli.dkdp.compress import compress as run_compress
    from kdcli.dkdp.compress import start_run
    from kdcli.dkdp.run import resume_run
    from kdcli.tracking import open_tracker

    tracker = open_tracker(log or ())  # a bad --log or a missing package: exit 2 before any run starts

    if resume is not None:
        if recipe is not None or set_:
            raise InputError("--resume continues a run with its own recipe: give no RECIPE or --set with it")
        rec, run_dir = resume_run(resume, force=force), resume
    else:
        rec, run_dir = start_run(_recipe_path(recipe), out_dir=out, overrides=set_ or (), overwrite=overwrite)
    compress._resume_hint = f"kdcli compress --resume {run_dir}"
    dev = device_of(device, rec, threads)
    rep = _reporter()
    rep.info(f"run directory: {run_dir}  device: {dev}")
    result = run_compress(rec, run_dir, device=dev, reporter=rep, trust=trust,
                          do_export=False if no_export else None, tracker=tracker)
    if json_out:
        _emit_json(result.to_json())
    else:
        from kdcli.reports.compress import summary_table

        rep.print_renderable(summary_table(result))
        rep.info(f"student: {Path(run_dir) / 'student.kdc'}   report: {Path(run_dir) / 'compress_report.html'}")
    if result.gate_failures:
        raise GateError("; ".join(result.gate_failures))


# --------------------------------------------------------------------------------------- export


MODEL = typer.Option(None, "--model", help="Model spec for a plain checkpoint: built-in name, pkg.mod:factory or file.py:factory.")
MODEL_ARGS = typer.Option(None, "--model-args", help="JSON keyword arguments of --model.")
INPUT_SHAPE = typer.Option(None, "--input-shape", help="Input shape of a plain checkpoint's model without batch, e.g. 3,32,32 (else from --recipe).")
NUM_CLASSES = typer.Option(None, "--num-classes", min=1, max=1_000_000, help="Number of classes of a plain checkpoint's model (else from --recipe).")


@app.command()
@_command
def export(student: Path = typer.Argument(..., help="A kdcli model file (student.kdc), or a checkpoint with --model/--recipe."),
           teacher: Optional[Path] = typer.Option(None, "--teacher", help="Teacher model file or checkpoint, measured alongside."),
           recipe: Optional[Path] = typer.Option(None, "--recipe", help="Recipe: its data for accuracy and verification, its model spec and export settings."),
           model: Optional[str] = MODEL, model_args: Optional[str] = MODEL_ARGS,
           out: Path = typer.Option(Path("export"), "--out", help="Output directory for the .onnx files and reports."),
           batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", help="Comma-separated batch sizes to time (default 1,64)."),
           opset: Optional[int] = typer.Option(None, "--opset", min=18, max=23, help="ONNX opset, 18 to 23 (default 18)."),
           fail_if: Optional[List[str]] = typer.Option(None, "--fail-if", help="A CI gate, e.g. \"accuracy_drop > 0.5\", \"speedup < 2\" or \"latency_ms@1 > baseline.latency_ms@1 * 1.05\" (with --baseline); exit 3 when true. Repeatable."),
           baseline: Optional[Path] = typer.Option(None, "--baseline", help="The report.json of an earlier export (e.g. the main branch's CI artifact) that gates compare with as baseline.<metric>; latency gates allow for the noise of both runs."),
           junit: Optional[Path] = typer.Option(None, "--junit", help="Also write the gates as JUnit XML to this file (one testcase per gate), whether they pass or fail."),
           quantize: Optional[str] = typer.Option(None, "--quantize", metavar="none|dynamic", help="dynamic: also write student.int8.onnx (int8 weights, onnxruntime quantize_dynamic), judged against the fp32 student and timed with it (default: the recipe's export.quantize, else none)."),
           threads: Optional[int] = THREADS,
           input_shape: Optional[str] = INPUT_SHAPE, num_classes: Optional[int] = NUM_CLASSES, trust: bool = TRUST, json_out: bool = JSON, debug: bool = DEBUG) -> None:
    """Export to ONNX, verify against PyTorch in onnxruntime, and report latency and accuracy.

    With GITHUB_STEP_SUMMARY set (GitHub Actions), the Markdown report and the gate verdicts are
    appended to that file."""
    _one_process("export")
    from kdcli.inputs import load_model_input, split_ints
    import time

    import torch

    from kdcli.export.onnx import export_report
    from kdcli.config.recipe import QUANTIZE_METHODS, ExportSpec, load_recipe
    from kdcli.models.file import export_info

    from kdcli.files import check_writable_dir
    from kdcli.reports.gates import evaluate_gates, load_baseline, parse_gates

    if quantize is not None and quantize not in QUANTIZE_METHODS:
        raise InputError(f"--quantize {quantize!r}: expected {' or '.join(QUANTIZE_METHODS)}")
    rec = load_recipe(recipe) if recipe is not None else None
    check_writable_dir(out, "--out")
    if junit is not None:
        if junit.is_dir():
            raise InputError(f"--junit {junit}: is a directory; give a file name, e.g. {junit / 'gates.xml'}")
        check_writable_dir(junit.parent, "--junit")
    base = load_baseline(baseline) if baseline is not None else None  # before any long work
    base_source = str(baseline) if baseline is not None else "report"
    settings = (rec.export if rec is not None else ExportSpec()).settings(
        batch_sizes=split_ints(batch_sizes, "--batch-sizes") if batch_sizes else None, fail_if=fail_if,
        threads=threads, quantize=quantize, opset=opset)
    gates = settings["gates"]
    parse_gates(gates, base, base_source)  # a gate naming baseline. needs --baseline
    if settings["threads"]:  # loading and evaluation too, as --threads does in the other commands
        torch.set_num_threads(settings["threads"])
    rep = _reporter()
    data = None
    if rec is not None:
        from kdcli.data.loader import load_data

        data = load_data(rec.data, base_dir=rec.base_dir, seed=rec.seed, held_out=rec.teacher_trained_elsewhere)
    s_model, s_info = load_model_input(student, rec, model, model_args, data, trust, input_shape, num_classes)
    t_model = t_info = None
    if teacher is not None:
        t_model, t_info = load_model_input(teacher, rec, None if rec is not None else model,
                                           None if rec is not None else model_args, data, trust,
                                           input_shape, num_classes)
    x_eval = y_eval = None
    if data is not None:
        split = "test" if data.test is not None else "val"
        x_eval, y_eval = data.eval_tensors(split, torch.device("cpu"))
        rep.info(f"accuracy judged on {data.splits.get(split, split)}; normalisation: {data.normalization()}")
    started = time.perf_counter()
    report = export_report(s_model.cpu().eval(), export_info(s_info, data), out,
                           teacher=None if t_model is None else t_model.cpu().eval(),
                           teacher_info=None if t_info is None else export_info(t_info, data),
                           x_eval=x_eval, y_eval=y_eval, reporter=rep, baseline=base, baseline_source=base_source,
                           **settings)
    seconds = time.perf_counter() - started
    failures = report.gates.failures  # the reports are written either way: show them, then exit 3
    results = evaluate_gates(report, gates, base, base_source)  # each gate's verdict, passed ones too
    if json_out:
        _emit_json({**report.to_json(), "gate_failures": failures})
    else:
        from kdcli.reports.export import block_warning, summary_table

        rep.print_renderable(summary_table(report))
        block = block_warning(report.latency.channel_block.model_dump() if report.latency.channel_block else None)
        if block:
            rep.warn(block)
        int8 = f", {out / report.student_int8.file}" if report.student_int8 else ""
        rep.info(f"written: {out / 'student.onnx'}{int8}, {out / 'report.md'}, {out / 'report.html'}")
    for r in results:  # a baseline gate's verdict, passed too: its reasoning (the noise band) belongs in the CI log
        if r.baseline:
            rep.info(r.message)
    _ci_outputs(report, results, junit=junit, seconds=seconds, baseline=baseline, out=out, rep=rep)
    if failures:
        raise GateError("; ".join(failures))


def _ci_outputs(report, results, *, junit: Optional[Path], seconds: float, baseline: Optional[Path], out: Path,
                rep) -> None:
    """The gates as JUnit XML (``--junit``) and, under GitHub Actions, the Markdown report and the
    verdicts appended to ``$GITHUB_STEP_SUMMARY``; a summary that cannot be written is a warning."""
    from kdcli.reports.export import render_markdown
    from kdcli.reports.junit import SUMMARY_ENV, append_step_summary, step_summary, write_junit

    if junit is not None:
        props = {"report": str(out / "report.json"), **({"baseline": str(baseline)} if baseline else {})}
        write_junit(junit, results, timestamp=report.created, time_s=seconds, properties=props)
        rep.info(f"written: {junit} ({len(results)} gates, {sum(not r.passed for r in results)} failed)")
    try:
        append_step_summary(step_summary(render_markdown(report), results, str(baseline) if baseline else None))
    except OSError as exc:
        import os

        rep.warn(f"{SUMMARY_ENV} {os.environ.get(SUMMARY_ENV)}: cannot append the summary "
                 f"({exc.strerror or type(exc).__name__}); the export goes on")


# -------------------------------------------------------------------------------------- analyze


@app.command()
@_command
def analyze(checkpoint: Path = typer.Argument(..., help="A kdcli model file, or a checkpoint with --model/--recipe."),
            recipe: Optional[Path] = typer.Option(None, "--recipe", help="Recipe: model spec, data and analyze settings."),
            data_flag: Optional[str] = typer.Option(None, "--data", help="Data for the data-driven figures: digits, or KIND:PATH (idx:DIR, cifar10-bin:DIR, tensors:FILE, image-folder:DIR)."),
            model: Optional[str] = MODEL, model_args: Optional[str] = MODEL_ARGS,
            out: Optional[Path] = typer.Option(None, "--out", help="Write analysis.json, sensitivity.csv, granularity.json and report.html here."),
            target_macs: Optional[float] = typer.Option(None, "--target-macs", min=0.01, max=1.0, help="MACs fraction (0.01 to 1) for the suggested per-group ratios (default 0.5)."),
            details: bool = typer.Option(False, "--details", help="Print the per-layer and per-group tables, not only the summary."),
            clusters: Optional[int] = typer.Option(None, "--clusters", metavar="K",
                                                   help="Group the classes into K confusable subsets (Hinton et al. 2015 "
                                                        "specialists) from the model's predicted probabilities; needs data."),
            val: Optional[str] = typer.Option(None, "--val", metavar="SPLIT[:FRACTION]",
                                              help="With --data: the data that judges the model: test:0.5 (the default: "
                                                   "half of the held-out split, seeded), test (all of it) or train:0.1 "
                                                   "(part of the training split, which a checkpoint has usually seen)."),
            normalize: Optional[str] = typer.Option(None, "--normalize", metavar="auto|none|MEAN/STD",
                                                    help="With --data: the model's input normalisation, e.g. "
                                                         "0.485,0.456,0.406/0.229,0.224,0.225 (default auto: measured "
                                                         "on the training split)."),
            input_size: Optional[str] = typer.Option(None, "--input-size", metavar="H,W",
                                                     help="With --data: resize or pad the images to H,W (see --fit)."),
            fit: Optional[str] = typer.Option(None, "--fit", metavar="resize|pad", help="With --input-size: how (default resize)."),
            channels: Optional[int] = typer.Option(None, "--channels", min=1, max=4096,
                                                   help="With --data: replicate (1 -> N) or reduce (3 -> 1) the image channels."),
            input_shape: Optional[str] = INPUT_SHAPE, num_classes: Optional[int] = NUM_CLASSES,
            device: Optional[str] = DEVICE, trust: bool = TRUST, threads: Optional[int] = THREADS,
            json_out: bool = JSON, debug: bool = DEBUG) -> None:
    """What matters in the model: MACs and parameters per layer, importance, activation sensitivity, pruning sensitivity."""
    from kdcli.inputs import analysis_data, device_of, load_model_input
    from kdcli.analyze.analysis import analyze as run_analyze
    from kdcli.errors import ModelError
    from kdcli.reports.analysis import render_terminal
    from kdcli.config.recipe import load_recipe

    from kdcli.files import check_writable_dir

    rec = load_recipe(recipe) if recipe is not None else None
    if out is not None:
        check_writable_dir(out, "--out")
    rep = _reporter()
    data = analysis_data(rec, data_flag, {"--val": val, "--normalize": normalize, "--input-size": input_size,
                                           "--fit": fit, "--channels": channels})
    dev = device_of(device, rec, threads)
    mdl, info = load_model_input(checkpoint, rec, model, model_args, data, trust, input_shape, num_classes)
    if data is not None:  # after the model and data are known to fit: a misfit is the only line
        rep.info(f"data: {data.judged_by()}")
        for note in data.notes:
            rep.warn(note)
    settings = rec.analyze if rec is not None else None
    try:
        result = run_analyze(mdl.to(dev), info, data, device=dev, settings=settings, target_macs=target_macs,
                             out_dir=out, reporter=rep, seed=rec.seed if rec is not None else 0, clusters=clusters)
    except ModelError as exc:  # a layer's failure, named with the file it came from
        raise ModelError(f"{checkpoint}: {exc}") from None
    if json_out:
        _emit_json(result)
    else:
        render_terminal(result, rep, details=details)
        if out is not None:
            rep.info(f"written: {out / 'analysis.json'}, {out / 'report.html'}")


# --------------------------------------------------------------------------------------- report


@report_app.command("diff")
@_command
def report_diff(a: Path = typer.Argument(..., metavar="A", help="The earlier report (e.g. the main branch's report.json)."),
                b: Path = typer.Argument(..., metavar="B", help="The later report, of the same kind."),
                fmt: str = typer.Option("table", "--format", metavar="table|markdown|json",
                                        help="A terminal table (default), Markdown (a PR comment, a CI summary) or JSON."),
                json_out: bool = JSON, debug: bool = DEBUG) -> None:
    """Two reports side by side: A, B, the change, and where B is worse (latency beyond the noise band)."""
    _one_process("report diff")
    from kdcli.reports.diff import FORMATS, diff_files, render

    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if json_out and fmt not in ("table", "json"):
        raise InputError(f"--json and --format {fmt}: give one of them")
    fmt = "json" if json_out else fmt
    diff = diff_files(a, b)
    shown = render(diff, fmt)
    if fmt == "json":
        _emit_json(shown)
    elif fmt == "markdown":
        typer.echo(shown, nl=False)
    else:
        from rich.console import Console

        Console(highlight=False).print(shown)


_LAUNCHED = False  # started by torchrun as one of several processes (kdcli.distributed)


def main() -> None:
    """Console-script entry point. Under torchrun (``torchrun --nproc-per-node N -m kdcli ...``)
    the process joins the process group first; see :mod:`kdcli.distributed`."""
    global _LAUNCHED
    import os

    if "RANK" in os.environ:  # set by torchrun; without it torch is not imported here (kdcli --help stays fast)
        from kdcli import distributed

        _LAUNCHED = distributed.setup()
    try:
        app(prog_name="kdcli")
    except SystemExit as exc:
        if _LAUNCHED and exc.code in (0, None):  # done: wait for the others before leaving the group
            distributed.barrier()
        raise
    finally:
        if _LAUNCHED:
            distributed.teardown()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
