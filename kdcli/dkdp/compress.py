"""DKDP: dynamic knowledge distillation and pruning, to a resource target within an accuracy budget.

Orchestration only; the pieces live elsewhere (importance and pruning in :mod:`kdcli.prune.pruner`,
losses in :mod:`kdcli.distill.distiller`, the loop in :mod:`kdcli.train.loop`). For step k = 1..K:

1. score channel importance on the current student (the recipe's criterion);
2. choose the threshold τ_k and prune structurally every channel whose group-normalised
   importance falls below it (torch-pruning groups, ``round_to``);
3. distil the original, frozen teacher into the pruned student with the recipe's losses;
4. evaluate on the validation split and adapt.

The adaptive threshold. Each step aims at a resource level on a geometric path from the current
MACs M to the target M*: ``M_next = max(M*, M · (M*/M)^(a/r))`` with r the steps left and a
the *aggressiveness*, and τ_k is the threshold whose pruning plan reaches M_next (found by
bisection on the plan's MACs). When a step's accuracy drop after distillation exceeds the budget,
the step is undone and a is halved, so τ backs off to a smaller step; when the drop stays under
half the budget, a grows by 1.5 (up to 2), so τ rises while accuracy holds and the target is far.
Every τ_k and the reason it moved go to ``metrics.jsonl`` and the report.

Run directory: ``recipe.yaml`` (the recipe as given), ``run.json`` (where it came from),
``teacher.kdc``, ``steps/step_NNN.kdc``, ``state.json`` (written after each finished step),
``metrics.jsonl``, ``student.kdc`` (the best student that meets the target), the compress report
and ``export/``. ``resume_run`` continues after the last finished step and ends as an
uninterrupted run with the same seed would.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kdcli.config.importance import NEEDS_DATA
from kdcli.console import Reporter
from kdcli.errors import GateError, InputError, TrainingDiverged
from kdcli.models import absolute_spec
from kdcli.prune.pruner import count_macs_params
from kdcli.config.recipe import Recipe, load_recipe, parse_recipe
from kdcli.dkdp.run import RunLock
from kdcli.files import atomic_write_json, atomic_write_text
from kdcli.models.file import ModelInfo, data_metadata, export_info, load_model_any, recipe_models, save_model
from kdcli.train.teacher import obtain_teacher
from kdcli.models.utils import is_main_process
from kdcli.train.loop import evaluate, fit, tensor_batches

STATE_VERSION = 1


@dataclass
class StepRecord:
    """One DKDP step attempt, as logged."""

    step: int
    attempt: int
    tau: float | None
    aggressiveness: float
    target_macs: float | None
    macs: int
    params: int
    macs_ratio: float
    params_ratio: float
    val_accuracy: float
    accuracy_drop: float
    accepted: bool
    reason: str
    seconds: float
    latency_ms: float | None = None
    train_history: list = field(default_factory=list)
    teacher_val_accuracy: float | None = None  # the teaching teacher after distill.train_teacher


@dataclass
class State:
    """What ``state.json`` holds: enough to continue after the last finished step."""

    version: int = STATE_VERSION
    accepted_steps: int = 0
    attempts: int = 0
    aggressiveness: float = 1.0
    records: list = field(default_factory=list)
    student_file: str | None = None
    best_file: str | None = None
    best_val: float = -1.0
    pruning_done: bool = False
    finished: bool = False
    failed_macs: int | None = None  # MACs the last undone attempt cut to: its retry must cut less
    vid_lambda: dict = field(default_factory=dict)  # student file -> λ of the distillation that made it
    teacher_file: str | None = None  # the teaching teacher, when distill.train_teacher fine-tunes it


@dataclass
class CompressResult:
    run_dir: Path
    teacher: dict
    student: dict
    steps: list
    target_met: bool
    gate_failures: list
    export: dict | None = None
    vid_lambda: dict | None = None  # the chosen student's λ (Distiller.lambda_report), with a VID term

    def to_json(self) -> dict:
        return {"run_dir": str(self.run_dir), "teacher": self.teacher, "student": self.student,
                "steps": self.steps, "target_met": self.target_met, "gate_failures": self.gate_failures,
                "export": self.export, "vid_lambda": self.vid_lambda}


def _absolute(target: float | None, reference: int) -> float | None:
    if target is None:
        return None
    return target * reference if target <= 1 else float(target)


def _next_macs(current: float, target: float | None, steps_left: int, aggressiveness: float) -> float:
    """The MACs this step aims at: a geometric path to the target, scaled by aggressiveness."""
    if target is None:  # only params / latency targets: cut a fixed fraction per step
        return current * (0.7 ** aggressiveness)
    if current <= target:
        return current
    exponent = min(1.0, aggressiveness / max(steps_left, 1))
    return max(target, current * (target / current) ** exponent)


class RunDir:
    """The run directory's files, written atomically and by rank 0 only."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write_json(self, name: str, obj) -> None:
        if is_main_process():
            atomic_write_json(self.path / name, obj)

    def write_text(self, name: str, text: str) -> None:
        if is_main_process():
            atomic_write_text(self.path / name, text)

    def write_metrics(self, records: list[dict]) -> None:
        self.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))

    def load_state(self) -> State:
        try:
            obj = json.loads((self.path / "state.json").read_text())
            return State(**obj)
        except FileNotFoundError:
            return State()
        except (json.JSONDecodeError, TypeError) as exc:
            raise InputError(f"{self.path / 'state.json'}: unreadable run state ({exc})") from None


_RUN_FILES = ("state.json", "run.json", "metrics.jsonl", "result.json", "student.kdc")


def start_run(recipe_path: Path | None, *, out_dir: Path | None = None, overrides=(), recipe_text: str | None = None,
              overwrite: bool = False) -> tuple[Recipe, Path]:
    """Validate the recipe, lock the run directory (:class:`kdcli.dkdp.run.RunLock`, held until
    :func:`compress` ends) and prepare it for a fresh run.

    A directory that holds an earlier run (one that finished a step: ``state.json``) is refused
    unless ``overwrite``; then that run's state, steps and student are removed (a ``teacher.kdc``
    stays: it is reused only if it was trained from the same seed, data and teacher spec). A
    directory whose run never finished a step (it failed on its data or model, say) is simply
    started again. A directory locked by a live run is refused, ``overwrite`` or not."""
    if recipe_text is None:
        recipe = load_recipe(recipe_path, overrides)
        recipe_text = Path(recipe_path).read_text()
    else:
        recipe = parse_recipe(recipe_text, str(recipe_path), recipe_path, overrides)
    run_dir = Path(out_dir) if out_dir else recipe.default_out_dir()
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"--out {run_dir}: is a file; a run directory is needed")
    lock = RunLock.acquire(run_dir)
    try:
        if (run_dir / "state.json").exists():
            if not overwrite:
                raise InputError(f"{run_dir}: already holds a run; continue it with --resume {run_dir}, "
                                 "start afresh with --overwrite, or choose another directory with --out")
        for name in _RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "steps", ignore_errors=True)
        rd = RunDir(run_dir)
        rd.write_text("recipe.yaml", recipe_text)
        rd.write_json("run.json", {"recipe_path": str(Path(recipe_path).resolve()) if recipe_path else None,
                                   "overrides": list(overrides), "recipe_sha256": recipe.sha256,
                                   "recipe": recipe.model_dump(mode="json", by_alias=True),
                                   "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    except BaseException:
        lock.release()
        raise
    return recipe, run_dir


def resume_recipe(run_dir: Path, *, force: bool = False) -> Recipe:
    """The recipe of an existing run, with paths resolving against the original recipe's folder.

    A recipe copy changed since the run started (its hash differs from ``run.json``'s) is refused,
    naming the changed keys, unless ``force``; then ``run.json`` records the new hash."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"--resume {run_dir}: no such run directory")
    try:
        meta = json.loads((run_dir / "run.json").read_text())
        text = (run_dir / "recipe.yaml").read_text()
    except FileNotFoundError:
        raise InputError(f"--resume {run_dir}: not a kdcli run directory (no run.json / recipe.yaml)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{run_dir / 'run.json'}: unreadable run metadata ({type(exc).__name__})") from None
    if not isinstance(meta, dict):
        raise InputError(f"{run_dir / 'run.json'}: unreadable run metadata (expected a mapping)")
    orig = Path(meta["recipe_path"]) if meta.get("recipe_path") else run_dir / "recipe.yaml"
    recipe = parse_recipe(text, str(run_dir / "recipe.yaml"), orig, meta.get("overrides", []))
    if meta.get("recipe_sha256") and recipe.sha256 != meta["recipe_sha256"]:
        # Runs started before run.json kept the recipe cannot name keys: any change counts.
        changed = (_changed_keys(meta["recipe"], recipe.model_dump(mode="json", by_alias=True))
                   if "recipe" in meta else ["(unknown keys)"])
        if changed and not force:
            raise InputError(f"{run_dir / 'recipe.yaml'}: changed since the run started"
                             f"{' (' + ', '.join(changed[:6]) + ')' if changed else ''}; resuming would mix two "
                             "recipes: restore it, start afresh with --overwrite, or pass --force to continue")
        RunDir(run_dir).write_json("run.json", {**meta, "recipe_sha256": recipe.sha256,
                                                "recipe": recipe.model_dump(mode="json", by_alias=True)})
    return recipe


def _changed_keys(old, new, prefix: str = "") -> list[str]:
    """The dotted key paths whose values differ between two recipe dumps (old may be None)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _changed_keys(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [k for i, (a, b) in enumerate(zip(old, new)) for k in _changed_keys(a, b, f"{prefix}[{i}]")]
    return [] if old == new else [prefix or "(recipe)"]


def compress(recipe: Recipe, run_dir: Path, *, device: torch.device, reporter: Reporter | None = None,
             trust: bool = False, do_export: bool | None = None) -> CompressResult:
    """Run (or continue) DKDP for ``recipe`` in ``run_dir``; see the module docstring."""
    lock = RunLock.acquire(run_dir)
    try:
        return _compress(recipe, run_dir, device=device, reporter=reporter or Reporter(quiet=True), trust=trust,
                         do_export=do_export)
    finally:
        lock.release()


def _compress(recipe: Recipe, run_dir: Path, *, device: torch.device, reporter: Reporter, trust: bool,
              do_export: bool | None) -> CompressResult:
    from kdcli.data.loader import load_data

    rd = RunDir(run_dir)
    state = rd.load_state()
    data = load_data(recipe.data, base_dir=recipe.base_dir, seed=recipe.seed)
    example = torch.zeros(1, *data.input_shape, device=device)
    val = tensor_batches(*data.eval_tensors("val", device))
    test = tensor_batches(*data.eval_tensors("test", device)) if data.test is not None else None

    teacher, tinfo = obtain_teacher(recipe, data, device, rd.path, reporter, trust)
    teacher.eval()
    t_macs, t_params = count_macs_params(teacher, example)
    t_val = evaluate(teacher, val, device)["accuracy"]
    teacher_summary = {"model": tinfo.metadata.get("ensemble_label", tinfo.name), "macs": t_macs, "params": t_params, "val_accuracy": t_val}
    if test is not None:
        teacher_summary["test_accuracy"] = evaluate(teacher, test, device)["accuracy"]
    reporter.info(f"teacher {tinfo.name}: {t_params:,} params, {t_macs:,} MACs, val {100 * t_val:.2f}%")

    target = recipe.target
    target_macs = _absolute(target.macs, t_macs)
    target_params = _absolute(target.params, t_params)
    budget = target.max_accuracy_drop

    student, sinfo = _initial_student(recipe, data, teacher, tinfo, state, rd, device)
    # The teacher that teaches: the original, or its fine-tuned copy (distill.train_teacher). The
    # original stays the reference of the accuracy budget and of the reports.
    teaching = _load_model(rd.path / state.teacher_file, recipe, data, device)[0] if state.teacher_file else teacher
    granularity = _granularity(recipe)
    shared: dict = {}  # reused across the run's distillations (the teacher cache)
    prune = recipe.student.prune and (target_macs is not None or target_params is not None
                                      or target.latency_ms is not None)

    def meets(macs, params, latency) -> bool:
        return ((target_macs is None or macs <= target_macs * 1.0001)
                and (target_params is None or params <= target_params * 1.0001)
                and (target.latency_ms is None or (latency is not None and latency <= target.latency_ms)))

    # --- the DKDP loop -------------------------------------------------------------------------
    max_attempts = recipe.prune.steps + recipe.prune.max_retries
    while not state.pruning_done:
        macs, params = count_macs_params(student, example)
        latency = _latency_ms(student, data) if target.latency_ms is not None and prune else None
        if not prune or meets(macs, params, latency) or state.attempts >= max_attempts:
            state.pruning_done = True
            break
        state.attempts += 1
        k = state.accepted_steps + 1
        t0 = time.perf_counter()
        steps_left = max(recipe.prune.steps - state.accepted_steps, 1)
        last = state.attempts == max_attempts
        # The last attempt goes to the target whatever the aggressiveness: a student short of the
        # resource target fails the gate at any accuracy, one at the target may still win its
        # accuracy back in the final distillation.
        aim = target_macs if last and target_macs is not None else \
            _next_macs(macs, target_macs, steps_left, state.aggressiveness)
        before = copy.deepcopy(student)
        torch.manual_seed(recipe.seed + 1000 * state.attempts)
        tau, new_history = _prune_step(recipe, student, example, data, device, aim, k, reporter,
                                       None if last else state.failed_macs)
        new_macs, new_params = count_macs_params(student, example)
        reporter.info(f"step {k}: τ={tau if tau is None else round(tau, 4)}  MACs {macs:,} → {new_macs:,} "
                      f"({new_macs / t_macs:.3f} of teacher), params {new_params:,}")
        try:
            hist, lam = _distil(recipe, teaching, student, data, device, granularity, val, reporter,
                                f"step {k}", recipe.distill.train, seed=recipe.seed + 1000 * state.attempts,
                                shared=shared)
        except TrainingDiverged as exc:
            reporter.info(f"step {k}: {exc}; keeping the last good student")
            student = before
            state.aggressiveness /= 2
            state.records.append(asdict(StepRecord(k, state.attempts, tau, state.aggressiveness, aim, macs, params,
                                                   macs / t_macs, params / t_params, float("nan"), float("nan"),
                                                   False, f"diverged: {exc}", time.perf_counter() - t0)))
            rd.write_metrics(state.records)
            rd.write_json("state.json", asdict(state))
            continue
        acc = _last_val(hist, student, val, device)
        drop = t_val - acc
        latency = _latency_ms(student, data) if target.latency_ms is not None else None
        retries_left = state.attempts < max_attempts
        # Right after its short distillation a step may cost up to step_tolerance x the budget:
        # later steps and the final distillation win part of it back; the result must meet it.
        allowed = recipe.prune.step_tolerance * budget
        t_acc = None  # the teaching teacher's accuracy, when it is fine-tuned after this step
        if drop > allowed and retries_left and state.aggressiveness > 1 / 16:
            state.aggressiveness /= 2
            state.failed_macs = new_macs
            accepted, reason = False, (f"accuracy drop {100 * drop:.2f} pt > {100 * allowed:.2f} pt a step may leave: "
                                       f"undone, aggressiveness halved to {state.aggressiveness:.3g}")
            student = before
        else:
            accepted = True
            state.failed_macs = None
            if drop <= budget / 2:
                state.aggressiveness = min(2.0, state.aggressiveness * 1.5)
                reason = f"accuracy held (drop {100 * drop:.2f} pt): aggressiveness raised to {state.aggressiveness:.3g}"
            elif drop > allowed:
                reason = f"drop {100 * drop:.2f} pt over what a step may cost, no retries left: kept"
            else:
                reason = (f"drop {100 * drop:.2f} pt within the {100 * allowed:.2f} pt a step may leave: aggressiveness "
                          f"kept at {state.aggressiveness:.3g}")
            state.accepted_steps = k
            sinfo.pruning_history = sinfo.pruning_history + new_history
            path = f"steps/step_{k:03d}.kdc"
            _save_model(rd.path / path, student, sinfo, recipe, data,
                        {"val_accuracy": acc, "macs": new_macs, "params": new_params, "step": k})
            state.student_file = path
            if lam is not None:
                state.vid_lambda[path] = lam
            if meets(new_macs, new_params, latency) and drop <= budget and acc > state.best_val:
                state.best_file, state.best_val = path, acc
            if recipe.distill.train_teacher is not None:
                teaching = copy.deepcopy(teacher) if teaching is teacher else teaching
                t_acc = _train_teacher(recipe, teaching, student, data, device, val, reporter, f"teacher {k}",
                                       seed=recipe.seed + 1000 * state.attempts + 500)
                state.teacher_file = f"steps/teacher_{k:03d}.kdc"
                _save_model(rd.path / state.teacher_file, teaching, tinfo, recipe, data,
                            {"val_accuracy": t_acc, "after_step": k}, role="teacher")
                shared.pop("teacher_cache", None)  # its outputs changed
                reporter.info(f"step {k}: teacher fine-tuned, val {100 * t_acc:.2f}%")
        reporter.info(f"step {k}: val {100 * acc:.2f}% (drop {100 * drop:.2f} pt) — {reason}")
        state.records.append(asdict(StepRecord(k, state.attempts, tau, state.aggressiveness, aim, new_macs,
                                               new_params, new_macs / t_macs, new_params / t_params, acc, drop,
                                               accepted, reason, time.perf_counter() - t0, latency, hist,
                                               t_acc)))
        rd.write_metrics(state.records)
        rd.write_json("state.json", asdict(state))

    # --- pure distillation into a declared student, or final fine-tuning ------------------------
    if not state.finished:
        epochs = recipe.prune.final_epochs if prune else recipe.distill.train.epochs
        if epochs > 0:
            if state.best_file:
                student, sinfo = _load_model(rd.path / state.best_file, recipe, data, device)
            cfg = recipe.distill.train.model_copy(update={"epochs": epochs})
            hist, lam = _distil(recipe, teaching, student, data, device, granularity, val, reporter, "distil", cfg,
                                seed=recipe.seed + 999_999, shared=shared)
            acc = _last_val(hist, student, val, device)
            macs, params = count_macs_params(student, example)
            path = "steps/final.kdc"
            _save_model(rd.path / path, student, sinfo, recipe, data, {"val_accuracy": acc, "macs": macs, "params": params})
            state.student_file = path
            if lam is not None:
                state.vid_lambda[path] = lam
            latency = _latency_ms(student, data) if target.latency_ms is not None else None
            if meets(macs, params, latency) and t_val - acc <= budget and acc >= state.best_val:
                state.best_file, state.best_val = path, acc
        state.finished = True
        rd.write_json("state.json", asdict(state))

    # --- the result ----------------------------------------------------------------------------
    chosen = state.best_file or state.student_file
    if chosen is not None:
        student, sinfo = _load_model(rd.path / chosen, recipe, data, device)
    s_macs, s_params = count_macs_params(student, example)
    s_val = evaluate(student, val, device)["accuracy"]
    student_summary = {"model": sinfo.name, "file": "student.kdc", "from": chosen, "macs": s_macs, "params": s_params,
                       "val_accuracy": s_val, "macs_ratio": s_macs / t_macs, "params_ratio": s_params / t_params}
    if test is not None:
        student_summary["test_accuracy"] = evaluate(student, test, device)["accuracy"]
    _save_model(rd.path / "student.kdc", student, sinfo, recipe, data, student_summary)

    failures = []
    latency = _latency_ms(student, data) if target.latency_ms is not None else None
    if not meets(s_macs, s_params, latency):
        failures.append(_unmet(s_macs, s_params, latency, target_macs, target_params, target.latency_ms, t_macs, t_params))
    if t_val - s_val > budget + 1e-12:
        failures.append(f"accuracy drop {100 * (t_val - s_val):.2f} pt > max_accuracy_drop {100 * budget:.2f} pt")
    result = CompressResult(rd.path, teacher_summary, student_summary, state.records, not failures, failures,
                            vid_lambda=state.vid_lambda.get(chosen))

    if do_export if do_export is not None else recipe.export.enabled:
        from kdcli.export.onnx import run_export

        x_eval, y_eval = data.eval_tensors("test" if data.test is not None else "val", torch.device("cpu"))
        try:
            result.export = run_export(
                student.cpu(), export_info(sinfo, data), rd.path / "export", teacher=teacher.cpu(),
                teacher_info=export_info(tinfo, data), x_eval=x_eval, y_eval=y_eval,
                batch_sizes=tuple(recipe.export.batch_sizes), opset=recipe.export.opset,
                gates=recipe.export.fail_if, time_budget_s=recipe.export.latency_budget_s, reporter=reporter)
        except GateError as exc:  # the export report is written; the verdict joins the others
            result.export = exc.report
            failures += exc.report["gates"]["failures"]
        result.gate_failures = failures
    rd.write_json("result.json", result.to_json())
    if is_main_process():
        from kdcli.reports.compress import write_compress_report

        write_compress_report(result, rd.path)
    return result


def _unmet(macs, params, latency, t_macs, t_params, t_lat, ref_macs, ref_params) -> str:
    parts = []
    if t_macs is not None and macs > t_macs * 1.0001:
        parts.append(f"MACs {macs / ref_macs:.3f} of teacher > target {t_macs / ref_macs:.3f}")
    if t_params is not None and params > t_params * 1.0001:
        parts.append(f"params {params:,} > target {int(t_params):,}")
    if t_lat is not None and (latency is None or latency > t_lat):
        parts.append(f"latency {latency:.3f} ms > target {t_lat} ms")
    return "target not met: " + "; ".join(parts)


def _initial_student(recipe, data, teacher, tinfo, state, rd, device):
    if state.student_file:
        return _load_model(rd.path / state.student_file, recipe, data, device)
    if recipe.student.model is None:
        student = copy.deepcopy(teacher)
        info = ModelInfo(tinfo.name, dict(tinfo.args), tuple(data.input_shape), data.num_classes,
                         list(tinfo.pruning_history), {})
    else:
        from kdcli.models import build_model

        torch.manual_seed(recipe.seed + 7)
        student = build_model(recipe.student.model, recipe.student.model_args, input_shape=data.input_shape,
                              num_classes=data.num_classes, base_dir=recipe.base_dir).to(device)
        info = ModelInfo(absolute_spec(recipe.student.model, recipe.base_dir), dict(recipe.student.model_args), tuple(data.input_shape),
                         data.num_classes)
    for p in student.parameters():
        p.requires_grad_(True)
    return student, info


def _load_model(path: Path, recipe, data, device):
    if not Path(path).is_file():
        raise InputError(f"{path}: missing from the run directory (the run's state names it); restore it, or "
                         "start afresh with --overwrite")
    model, info = load_model_any(path, spec_name=None, spec_args=None, input_shape=data.input_shape,
                                 num_classes=data.num_classes, base_dir=recipe.base_dir, allow=recipe_models(recipe))
    return model.to(device), info


def _save_model(path: Path, model, info: ModelInfo, recipe, data, metrics: dict, role: str = "student") -> None:
    info = copy.copy(info)
    info.metadata = {**data_metadata(data), "recipe_sha256": recipe.sha256, "metrics": metrics, "role": role}
    save_model(path, model, info)


def _granularity(recipe):
    if not recipe.distill.granularity:
        return None
    from kdcli.analyze.granularity import GranularityMap

    return GranularityMap.load(recipe.resolve(recipe.distill.granularity))


def _score_batches(recipe, data, device):
    loader = data.loader("train", train=False, device=device, seed=recipe.seed)
    out = []
    for i, batch in enumerate(loader):
        if i >= recipe.prune.score_batches:
            break
        out.append(batch)
    return out


def _prune_step(recipe, student, example, data, device, aim_macs, k, reporter, failed_macs=None):
    """Score, choose τ for ``aim_macs`` and prune ``student`` in place; returns (τ, history).
    ``failed_macs``: an undone attempt of this step cut to these MACs, so τ is lowered until the
    plan cuts less (coarse plans, e.g. with ``round_to``, would otherwise repeat it)."""
    from kdcli.prune.pruner import StructuredPruner

    pruner = StructuredPruner(student, example, importance=recipe.prune.importance,
                              ignored_layers=recipe.prune.ignored_layers, round_to=recipe.prune.round_to)
    if k == 1:
        for note in pruner.notes:
            reporter.info(f"prune: {note}")
    batches = _score_batches(recipe, data, device) if recipe.prune.importance in NEEDS_DATA else None
    scores = pruner.score(batches=batches)
    if k == 1 and recipe.prune.ratios_from:
        ratios = _suggested_ratios(recipe.resolve(recipe.prune.ratios_from))
        pruner.prune_ratios(ratios, scores)
        return None, pruner.history()
    tau = pruner.tau_for_macs(scores, aim_macs)
    plan = pruner.plan_below(scores, tau)
    if failed_macs is not None:
        for _ in range(30):
            if pruner.plan_macs(plan) > failed_macs:
                break
            tau *= 0.9
            plan = pruner.plan_below(scores, tau)
    else:  # land on the aim, not below it: one τ moves in coarse steps
        plan = pruner.fill_to_macs(scores, plan, aim_macs)
    pruner.apply(plan)
    return float(tau), pruner.history()


def _suggested_ratios(path: Path) -> dict[str, float]:
    try:
        obj = json.loads(Path(path).read_text())
        ratios = obj["suggested_ratios"]["ratios"] if "ratios" in obj.get("suggested_ratios", {}) else obj["suggested_ratios"]
        return {str(k): float(v) for k, v in ratios.items()}
    except FileNotFoundError:
        raise InputError(f"prune.ratios_from: {path} not found (write it with `kdcli analyze --out`)") from None
    except (KeyError, TypeError, ValueError, json.JSONDecodeError):
        raise InputError(f"prune.ratios_from: {path} holds no suggested_ratios (expected analysis.json from `kdcli analyze`)") from None


def _distil(recipe, teacher, student, data, device, granularity, val, reporter, label, cfg, seed, shared,
            losses=None):
    """Distil ``teacher`` into ``student`` for ``cfg.epochs`` epochs with ``losses`` (the recipe's
    by default); returns (the fit's history, λ of the VID term or None). ``shared`` carries what
    successive calls with the same teacher reuse (the teacher cache)."""
    from kdcli.distill.distiller import Distiller

    torch.manual_seed(seed)
    example = torch.zeros(2, *data.input_shape, device=device)
    distiller = Distiller(teacher, student, recipe.distill.losses if losses is None else losses, example,
                          granularity=granularity).to(device)
    loader = data.loader("train", train=True, device=device, seed=seed)
    if recipe.distill.cache_teacher and not loader.augmented:
        # one cache for the whole run: same frozen teacher, same losses, same split every step
        shared["teacher_cache"] = distiller.enable_teacher_cache(len(data.train.y), cache=shared.get("teacher_cache"))
        # Filled in index order, not in the first shuffled epoch's: a batch's outputs differ in
        # the last bits with its composition, and a resumed run must see the same cache.
        distiller.fill_teacher_cache(data.loader("train", train=False, device=device, rank=0, world_size=1))
    res = fit(student, loader, cfg, objective=distiller, extra_modules=[distiller], val_batches=val, device=device,
              progress=lambda m: reporter.metrics(label, m), before_epoch=distiller.set_epoch)
    return res.history, distiller.lambda_report()


def _train_teacher(recipe, teaching, student, data, device, val, reporter, label, seed) -> float:
    """Fine-tune ``teaching`` in place (``distill.train_teacher``, see
    :class:`kdcli.config.recipe.TeacherTrainingSpec`): cross-entropy plus ``kd_weight`` × KD toward a
    frozen copy of ``student``. Returns its validation accuracy afterwards; it is left frozen."""
    from kdcli.config.losses import CE, KD

    spec = recipe.distill.train_teacher
    cfg = recipe.distill.train.model_copy(update={"epochs": spec.epochs, "lr": spec.lr})
    for p in teaching.parameters():
        p.requires_grad_(True)
    # the roles swap: a frozen copy of the student teaches (a KD term of weight 0 is left out)
    losses = [CE(weight=1.0), KD(temperature=spec.temperature, weight=spec.kd_weight)]
    hist, _ = _distil(recipe, copy.deepcopy(student), teaching, data, device, None, val, reporter, label, cfg, seed,
                      shared={}, losses=losses)
    teaching.eval()
    for p in teaching.parameters():
        p.requires_grad_(False)
    return _last_val(hist, teaching, val, device)


def _last_val(history: list, student, val, device) -> float:
    """Validation accuracy of ``student`` now: fit() measured it after the last epoch."""
    if history and "val_accuracy" in history[-1]:
        return history[-1]["val_accuracy"]
    return evaluate(student, val, device)["accuracy"]


def _latency_ms(student, data) -> float:
    """Median onnxruntime latency at batch 1 (for latency targets)."""
    import tempfile

    from kdcli.export.onnx import export_onnx
    from kdcli.export.latency import measure_latency

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        export_onnx(copy.deepcopy(student).cpu().eval(), torch.zeros(1, *data.input_shape), path)
        lat = measure_latency({"student": str(path)}, data.input_shape, batch_sizes=(1,))
    return float(lat["student"][1]["median_ms"])
