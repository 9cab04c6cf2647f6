"""Run tracking: a ``kdcli compress`` run logged to TensorBoard and/or MLflow (``--log``).

Optional: ``pip install 'kdcli[tracking]'`` installs ``tensorboard`` and ``mlflow-skinny``. Neither
is imported unless a ``--log`` asks for it (inside the sink's constructor), so ``kdcli`` without
``--log`` neither needs nor loads them. The forms of ``--log`` (repeatable):

- ``tensorboard:DIR``: event files in ``DIR`` (:class:`torch.utils.tensorboard.SummaryWriter`);
  give each run its own ``DIR`` (``tensorboard --logdir`` on their parent compares runs);
- ``mlflow``: MLflow's own tracking URI (``MLFLOW_TRACKING_URI``, else MLflow's default), or
  ``mlflow:URI`` (``file:///abs/path``, ``http://host:5000``, ...). The experiment is
  ``MLFLOW_EXPERIMENT_NAME``, else ``kdcli``; the run is named after the run directory.
  MLflow 3 refuses a file store unless ``MLFLOW_ALLOW_FILE_STORE`` is true: for a file store,
  kdcli sets it when it is unset (the file store was asked for, or is MLflow's own default).
  MLflow 3's default without ``./mlruns`` is ``sqlite:///mlflow.db``, a database store that
  mlflow-skinny lacks: with it, bare ``mlflow`` is a one-line error asking for the full
  ``mlflow`` package or a ``file:``/``http:`` URI.

What is logged, against which x-axis:

- per DKDP step attempt (x = the attempt number, which a resumed run keeps): ``step/k``,
  ``step/tau``, ``step/macs_ratio``, ``step/params_ratio``, ``step/val_accuracy``,
  ``step/accuracy_drop``, ``step/accepted`` (1 kept, 0 undone), ``step/aggressiveness``, ... and,
  with a VID term, its λ per (teacher, student) layer pair as ``lambda/TEACHER/STUDENT``;
- per epoch (x = a running epoch count per phase): every number of :func:`kdcli.train.loop.fit`'s
  history (``train_loss``, ``train_accuracy``, ``lr``, ``val_accuracy``, ``val_loss``, ...) under
  ``epoch/`` for the student's distillations, ``teacher_train/`` for training the teacher and
  ``teacher_finetune/`` for ``distill.train_teacher``;
- at the end (x = the number of attempts): ``final/...`` (the chosen student against the target),
  and the run's reports: MLflow artifacts (``compress_report.json/.md/.html``, ``result.json``,
  ``metrics.jsonl``, ``recipe.yaml``, ``run.json``, ``export/report.*``), TensorBoard text.

The recipe is an MLflow param per key (``prune.steps``, ``distill.losses.0.kind``, ...) and the
``recipe.yaml`` artifact; TensorBoard shows it as text. A resumed run (``--resume``) continues
the MLflow run of the same run directory (tag ``kdcli.run_dir``) and appends to TensorBoard's;
epochs repeated after an interruption are logged again. Tracking is done by rank 0 only
(:func:`kdcli.dkdp.compress.compress` passes no tracker elsewhere).

Failing to start (a store that cannot be opened, a server that does not answer) is an
:class:`~kdcli.errors.InputError` before any training; a sink that fails later is dropped with
a warning and the run goes on: hours of training are not lost to a logging outage.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from kdcli import __version__
from kdcli.console import Reporter
from kdcli.errors import InputError, first_line

if TYPE_CHECKING:  # no torch or pydantic at import time
    from kdcli.config.recipe import Recipe

LOG_FORMS = "tensorboard:DIR, mlflow or mlflow:URI"
INSTALL_HINT = "pip install 'kdcli[tracking]'"
# the run directory's files sent as MLflow artifacts (the reports, not the model files)
REPORT_SUFFIXES = (".json", ".jsonl", ".md", ".html", ".yaml", ".csv")
_PARAM_LIMIT = 500  # MLflow's param values: 6000 characters on recent servers, 500 on older ones


@dataclass(frozen=True)
class LogTarget:
    """One ``--log`` value: ``kind`` tensorboard or mlflow, and ``where`` (TensorBoard's log
    directory; MLflow's tracking URI, None for MLflow's own default)."""

    kind: str
    where: str | None = None

    def __str__(self) -> str:
        return self.kind if self.where is None else f"{self.kind}:{self.where}"


def parse_log(value: str) -> LogTarget:
    """A ``--log`` value as a :class:`LogTarget`; InputError naming the flag and the forms otherwise."""
    kind, sep, where = str(value).partition(":")
    if kind == "tensorboard" and where.strip():
        return LogTarget("tensorboard", where)
    if kind == "mlflow" and (not sep or where.strip()):
        return LogTarget("mlflow", where or None)
    raise InputError(f"--log {value!r}: expected {LOG_FORMS}")


def open_tracker(values: Iterable[str | LogTarget]) -> "Tracker | None":
    """The tracker of ``--log`` values (None for none). Each sink imports its package here: a
    missing package or an unusable store is an InputError now, before the run starts."""
    targets = [v if isinstance(v, LogTarget) else parse_log(v) for v in values]
    if not targets:
        return None
    return Tracker([TensorBoardSink(t.where) if t.kind == "tensorboard" else MlflowSink(t.where) for t in targets])


@dataclass
class RunInfo:
    """What a sink needs to open its run."""

    name: str                 # the run directory's name (the MLflow run name)
    run_dir: Path             # absolute
    resumed: bool             # the run directory holds finished steps: continue its tracking run
    recipe_text: str
    params: dict[str, str]    # the recipe, flattened: dotted key -> value
    tags: dict[str, str] = field(default_factory=dict)


class Tracker:
    """What the DKDP loop calls (:func:`kdcli.dkdp.compress.compress`): it turns steps, epochs and
    the result into named numbers for each sink (:class:`TensorBoardSink`, :class:`MlflowSink`)."""

    def __init__(self, sinks: Sequence["Sink"]):
        self.sinks = list(sinks)
        self._started: list[Sink] = []
        self._epochs: dict[str, int] = {}  # phase -> epochs logged so far (the x-axis of its curves)
        self._attempts = 0
        self._reporter: Reporter = Reporter(quiet=True)

    # --- the run ---------------------------------------------------------------------------------
    def start(self, recipe: "Recipe", run_dir: Path, *, records: Sequence[dict] = (),
              reporter: Reporter | None = None) -> None:
        """Open each sink's run. ``records``: the steps a resumed run already holds, so that its
        curves continue where they stopped. InputError when a sink cannot start."""
        self._reporter = reporter or self._reporter
        run_dir = Path(run_dir).resolve()
        self._attempts = max((int(r.get("attempt", 0)) for r in records), default=0)
        self._epochs = {"epoch": sum(len(r.get("train_history") or []) for r in records)}
        tt = recipe.distill.train_teacher
        if tt is not None:
            self._epochs["teacher_finetune"] = tt.epochs * sum(r.get("teacher_val_accuracy") is not None
                                                               for r in records)
        recipe_file = run_dir / "recipe.yaml"
        info = RunInfo(name=run_dir.name, run_dir=run_dir, resumed=bool(records),
                       recipe_text=recipe_file.read_text() if recipe_file.is_file() else "",
                       params=flatten(recipe.model_dump(mode="json", by_alias=True)),
                       tags={"kdcli.run_dir": str(run_dir), "kdcli.recipe_sha256": recipe.sha256,
                             "kdcli.version": __version__})
        for sink in self.sinks:
            try:
                sink.start(info)
            except InputError:
                raise
            except Exception as exc:  # a store or server that does not answer: before any training
                raise InputError(f"--log {sink.target}: cannot start tracking ({first_line(exc, 300)})") from None
            self._started.append(sink)

    def wrap(self, reporter: Reporter) -> Reporter:
        """``reporter`` whose per-epoch ``metrics`` lines are also tracked: every ``fit()`` that
        reports (teacher training, each distillation, teacher fine-tuning) is logged, with no
        parameter threaded through the training code."""
        self._reporter = reporter
        return _TrackingReporter(reporter, self)

    def step(self, record: dict, lam: dict | None = None) -> None:
        """One DKDP step attempt (a :class:`kdcli.dkdp.run.StepRecord` as a dict) and the VID λ
        of its distillation (:meth:`kdcli.distill.distiller.Distiller.lambda_report`), if any."""
        x = int(record.get("attempt", self._attempts + 1))
        self._attempts = max(self._attempts, x)
        values = step_scalars(record)
        values.update(lambda_scalars(lam, "lambda"))
        self._each("scalars", values, x)
        verdict = "kept" if record.get("accepted") else "undone"
        self._each("text", "step/reason", f"step {record.get('step')} (attempt {x}, {verdict}): "
                                          f"{record.get('reason', '')}", x)

    def epoch(self, label: str, metrics: dict) -> None:
        """One epoch of a ``fit()`` reported as ``label`` (``step 2``, ``distil``, ``teacher``,
        ``teacher 1``, ...): its numbers under the label's phase."""
        phase = epoch_phase(label)
        self._epochs[phase] = x = self._epochs.get(phase, 0) + 1
        values = {f"{phase}/{_key(k)}": v for k, v in metrics.items()
                  if k not in ("epoch", "epochs") and _finite(v)}
        for name, v in (metrics.get("loss_terms") or {}).items():  # each distillation term, unweighted
            if _finite(v):
                values[f"{phase}/loss/{_key(name)}"] = v
        self._each("scalars", values, x)

    def finish(self, result) -> None:
        """The chosen student (a :class:`kdcli.dkdp.compress.CompressResult`) and the run's reports."""
        run_dir = Path(result.run_dir)
        self._each("scalars", final_scalars(result), self._attempts)
        files = [p for p in sorted(run_dir.iterdir()) if _is_report(p)]
        if (run_dir / "export").is_dir():
            files += [p for p in sorted((run_dir / "export").iterdir()) if _is_report(p)]
        self._each("artifacts", files, run_dir)

    def close(self, status: str = "FINISHED") -> None:
        """End each started sink's run: ``FINISHED``, ``FAILED`` or ``KILLED`` (interrupted)."""
        sinks, self._started = self._started, []
        for sink in sinks:
            try:
                sink.close(status)
            except Exception as exc:  # closing must not hide the run's own outcome
                self._reporter.warn(f"--log {sink.target}: closing the tracking run failed ({first_line(exc, 300)})")

    # --- a failing sink is dropped, the run goes on -------------------------------------------------
    def _each(self, method: str, *args) -> None:
        for sink in list(self._started):
            try:
                getattr(sink, method)(*args)
            except Exception as exc:
                self._started.remove(sink)
                self._reporter.warn(f"--log {sink.target}: tracking stopped ({first_line(exc, 300)}); the run goes on")


class _TrackingReporter(Reporter):
    """A :class:`Reporter` that prints through ``inner`` and also sends each epoch to the tracker."""

    def __init__(self, inner: Reporter, tracker: Tracker):  # inner prints: no console of its own
        self.inner, self.tracker = inner, tracker

    def __getattr__(self, name: str) -> Any:  # quiet, stream, ...: the inner reporter's
        if name == "inner":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def info(self, message: str) -> None:
        self.inner.info(message)

    def warn(self, message: str) -> None:
        self.inner.warn(message)

    def metrics(self, prefix: str, m: dict) -> None:
        self.inner.metrics(prefix, m)
        self.tracker.epoch(prefix, m)

    @contextmanager
    def progress(self, description: str, total: int) -> Iterator:
        with self.inner.progress(description, total) as advance:
            yield advance

    def print_renderable(self, renderable) -> None:
        self.inner.print_renderable(renderable)


# ----------------------------------------------------------------------------- what is logged


def epoch_phase(label: str) -> str:
    """The tag prefix of a ``fit()`` progress label: ``epoch`` for the student's distillations
    (``step N``, ``distil``), ``teacher_train`` (``teacher``), ``teacher_finetune`` (``teacher N``),
    else the label's first word + ``_train`` (ensemble members: ``member 2`` → ``member_train``)."""
    word = label.split(" ", 1)[0] if label else "fit"
    if word in ("step", "distil"):
        return "epoch"
    if word == "teacher":
        return "teacher_train" if label.strip() == "teacher" else "teacher_finetune"
    return f"{_key(word)}_train"


_STEP_KEYS = ("tau", "macs_ratio", "params_ratio", "val_accuracy", "accuracy_drop", "aggressiveness",
              "target_macs", "macs", "params", "seconds", "latency_ms", "latency_aim_ms", "predicted_latency_ms",
              "teacher_val_accuracy")


def step_scalars(record: dict) -> dict[str, float]:
    """The numbers of one step record, under ``step/`` (none that is None or NaN)."""
    out = {"step/k": float(record["step"]), "step/accepted": float(bool(record.get("accepted")))}
    out.update({f"step/{k}": float(record[k]) for k in _STEP_KEYS if _finite(record.get(k))})
    return out


def lambda_scalars(lam: dict | None, prefix: str) -> dict[str, float]:
    """VID's λ matrix (teacher × student layers) as ``PREFIX/TEACHER/STUDENT`` values."""
    if not lam:
        return {}
    return {f"{prefix}/{_key(t)}/{_key(s)}": float(v)
            for t, row in zip(lam["teacher_layers"], lam["matrix"]) for s, v in zip(lam["student_layers"], row)}


def final_scalars(result) -> dict[str, float]:
    """The chosen student and the verdict, under ``final/``; the teacher under ``teacher/``."""
    s, t = result.student, result.teacher
    out = {f"final/{k}": float(s[k]) for k in ("val_accuracy", "test_accuracy", "macs_ratio", "params_ratio",
                                                 "macs", "params") if _finite(s.get(k))}
    out.update({f"teacher/{k}": float(t[k]) for k in ("val_accuracy", "test_accuracy", "macs", "params")
                if _finite(t.get(k))})
    out["final/target_met"] = float(bool(result.target_met))
    out["final/gate_failures"] = float(len(result.gate_failures))
    lat = (result.export or {}).get("latency") or {}
    for bs, v in ((lat.get("speedup") or {}).get(lat.get("primary_provider")) or {}).items():
        if _finite(v):
            out[f"final/speedup_batch_{bs}"] = float(v)
    out.update(lambda_scalars(result.vid_lambda, "final/lambda"))
    return out


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """A recipe dump as dotted keys → text (lists of plain values as JSON, None left out)."""
    if isinstance(obj, dict):
        out: dict[str, str] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        out = {}
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}.{i}"))
        return out
    if obj is None:
        return {}
    text = json.dumps(obj) if isinstance(obj, list) else str(obj)
    return {_key(prefix): text[:_PARAM_LIMIT]}


def _key(name: str) -> str:
    """A metric or param name MLflow accepts (letters, digits, ``_-. :/``); TensorBoard takes it too."""
    return re.sub(r"[^\w\-. :/]", "_", str(name))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_report(p: Path) -> bool:
    return p.is_file() and p.suffix in REPORT_SUFFIXES and not p.name.startswith(".")


# ----------------------------------------------------------------------------- the sinks


class Sink:
    """A tracking backend. ``start`` opens its run; the rest are called between start and close."""

    target: LogTarget

    def start(self, info: RunInfo) -> None: ...
    def scalars(self, values: dict[str, float], step: int) -> None: ...
    def text(self, tag: str, text: str, step: int) -> None: ...
    def artifacts(self, files: list[Path], run_dir: Path) -> None: ...
    def close(self, status: str) -> None: ...


class TensorBoardSink(Sink):
    """Event files in a directory, through :class:`torch.utils.tensorboard.SummaryWriter`."""

    def __init__(self, logdir: str):
        self.target = LogTarget("tensorboard", logdir)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise InputError(f"--log {self.target}: TensorBoard is not installed: {INSTALL_HINT}") from None
        self._writer_class = SummaryWriter
        self.logdir = Path(logdir).expanduser()
        if self.logdir.exists() and not self.logdir.is_dir():
            raise InputError(f"--log {self.target}: {self.logdir} is a file; give a directory")
        self.writer = None  # opened by start: nothing is written on ranks that do not track

    def start(self, info: RunInfo) -> None:
        self.writer = self._writer_class(log_dir=str(self.logdir))
        if info.recipe_text:  # four-space indentation: a code block in TensorBoard's Markdown
            self.writer.add_text("recipe", "    " + info.recipe_text.replace("\n", "\n    "), 0)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()  # a live `tensorboard --logdir` shows each step as it ends

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def artifacts(self, files: list[Path], run_dir: Path) -> None:
        report = run_dir / "compress_report.md"
        if report in files:
            self.writer.add_text("report", report.read_text(encoding="utf-8"), 0)

    def close(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MlflowSink(Sink):
    """An MLflow run, through :class:`mlflow.tracking.MlflowClient` (no global active run)."""

    def __init__(self, uri: str | None):
        self.target = LogTarget("mlflow", uri)
        try:
            import mlflow
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise InputError(f"--log {self.target}: MLflow is not installed: {INSTALL_HINT}") from None
        self.uri = uri or mlflow.get_tracking_uri()  # MLFLOW_TRACKING_URI, else MLflow's default
        if _is_file_store(self.uri):
            # MLflow 3 keeps its file store behind an opt-out; a file store was asked for by name
            # (or is MLflow's own default, ./mlruns holding runs), so opt out unless told not to
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        if _is_database(self.uri) and importlib.util.find_spec("sqlalchemy") is None:
            # MLflow 3's default (sqlite:///mlflow.db) among them: mlflow-skinny has no database store
            raise InputError(f"--log {self.target}: the tracking URI {self.uri} is a database, which needs the full "
                             "MLflow package (pip install mlflow); or give mlflow:file:///PATH or "
                             "mlflow:http://HOST:PORT") from None
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
        except Exception as exc:
            raise InputError(f"--log {self.target}: cannot open the tracking store {self.uri} "
                             f"({first_line(exc, 300)})") from None
        self.run_id: str | None = None

    def start(self, info: RunInfo) -> None:
        from mlflow.entities import Param

        client = self.client
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "kdcli"
        exp = client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
        run = self._earlier_run(exp_id, info.run_dir) if info.resumed else None
        if run is not None:
            client.update_run(run.info.run_id, status="RUNNING")
        else:
            run = client.create_run(exp_id, run_name=info.name, tags=info.tags)
        self.run_id = run.info.run_id
        known = run.data.params  # params cannot change: a resumed run keeps the first values
        params = [Param(k, v) for k, v in info.params.items() if k not in known]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a call
            client.log_batch(self.run_id, params=params[i:i + 100])
        if (info.run_dir / "recipe.yaml").is_file():
            client.log_artifact(self.run_id, str(info.run_dir / "recipe.yaml"))

    def _earlier_run(self, exp_id: str, run_dir: Path):
        """The latest MLflow run of the same run directory, to continue after ``--resume``."""
        if "'" in str(run_dir):  # MLflow's filter strings have no escape for a quote
            return None
        runs = self.client.search_runs([exp_id], filter_string=f"tags.`kdcli.run_dir` = '{run_dir}'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0] if runs else None

    def scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, int(step)) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a call
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def artifacts(self, files: list[Path], run_dir: Path) -> None:
        for p in files:
            parent = p.parent.relative_to(run_dir).as_posix()
            self.client.log_artifact(self.run_id, str(p), artifact_path=None if parent == "." else parent)

    def close(self, status: str) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)
            self.run_id = None


def _is_database(uri: str) -> bool:
    """An SQLAlchemy store: ``sqlite:///...``, ``postgresql+psycopg2://...``, ..."""
    scheme = re.match(r"^([a-zA-Z][\w+.-]*):", uri)
    return scheme is not None and scheme.group(1).split("+")[0].lower() in ("sqlite", "postgresql", "mysql", "mssql")


def _is_file_store(uri: str) -> bool:
    """A local file store: ``file:`` URIs and plain paths (``./mlruns``), not a server or database."""
    scheme = re.match(r"^([a-zA-Z][\w+.-]*):", uri)
    return scheme is None or scheme.group(1).lower() == "file" or len(scheme.group(1)) == 1  # C:\ on Windows


__all__ = ["INSTALL_HINT", "LOG_FORMS", "LogTarget", "MlflowSink", "RunInfo", "Sink", "TensorBoardSink", "Tracker",
           "open_tracker", "parse_log"]
