"""DKDP: dynamic knowledge distillation and pruning, to a resource target within an accuracy budget.

The loop, as small named steps over the run's :class:`~kdcli.dkdp.run.State`, which only the
loop's steps change (the attempt counter when an attempt starts, the rest when it is judged) and
:meth:`Loop._record` writes after each. For attempt after attempt until the target is met:

1. **aim** (:meth:`Loop.aim`): the MACs this step should reach, on a geometric path from the
   current MACs M to the target M*: ``M_next = max(M*, M · (M*/M)^(a/r))``, r the steps left and
   a the *aggressiveness* (:meth:`kdcli.dkdp.target.Target.next_macs`); the last allowed attempt
   aims at the target itself. With a latency or speed-up target the step aims at a latency on
   the same path (:class:`kdcli.dkdp.speed.SpeedStep`), and its plan ranks channels by
   importance per millisecond saved on a latency lookup table of the student's layers
   (:mod:`kdcli.export.latency_model`);
2. **attempt** (:meth:`Loop.attempt`): score channel importance on the current student, choose the
   threshold τ whose pruning plan reaches the aim (bisection on the plan's MACs), prune
   structurally (torch-pruning groups, ``round_to``), distil the teacher into the pruned student
   (:func:`kdcli.distill.distil.distil`) and evaluate on the validation split;
3. **accept or undo** (:meth:`Loop.judge`): a step whose accuracy drop exceeds what a step may
   leave (``prune.step_tolerance`` × the budget) is undone and a is halved, so τ backs off to a
   smaller step; when the drop stays under half the budget, a grows by 1.5 (up to 2). A kept step
   is saved (``steps/step_NNN.kdc``), and with ``distill.train_teacher`` the teaching teacher is
   fine-tuned toward the student;
4. **finish** (:meth:`Loop.finish`): the final distillation (``prune.final_epochs``, or the whole
   distillation of a declared student), then the best student that meets the target is chosen,
   written as ``student.kdc``, judged against the target, exported and reported.

Every τ_k and the reason it moved go to ``metrics.jsonl`` and the report. The run directory and
resuming are :mod:`kdcli.dkdp.run`; a resumed run ends byte for byte as an uninterrupted one.
"""

from __future__ import annotations

import copy
import math
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from kdcli import distributed
from kdcli.config.importance import NEEDS_DATA
from kdcli.config.losses import CE, KD
from kdcli.config.recipe import Recipe
from kdcli.console import Reporter
from kdcli.analyze.granularity import GranularityMap
from kdcli.analyze.sensitivity import pruning_sensitivity, suggest_ratios
from kdcli.data.loader import memorised_warning, DataBundle, load_data
from kdcli.distill.distil import distil
from kdcli.dkdp.run import RunDir, RunLock, StepRecord, resume_recipe, start_run
from kdcli.dkdp.speed import BISECTIONS, CONTEXT_BUDGET_S, SpeedStep, reference_latency_ms, student_latency_ms, timed_fraction
from kdcli.dkdp.target import Target
from kdcli.errors import InputError, TrainingDiverged
from kdcli.export.latency_model import NO_SAVING, LatencyPlan
from kdcli.models import absolute_spec, build_model
from kdcli.models.file import ModelInfo, data_metadata, export_info, load_model_any, recipe_models, save_model
from kdcli.models.utils import first_tensor, is_main_process
from kdcli.prune.pruner import StructuredPruner, count_macs_params
from kdcli.reports.compress import write_compress_report
from kdcli.tracking import Tracker
from kdcli.train.loop import evaluate, tensor_batches
from kdcli.train.teacher import obtain_teacher

__all__ = ["CompressResult", "compress", "resume_recipe", "start_run"]  # a run: start (or resume), then compress


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
    data: dict | None = None  # which data judged what: splits, normalization, warnings

    def to_json(self) -> dict:
        return {"run_dir": str(self.run_dir), "teacher": self.teacher, "student": self.student,
                "steps": self.steps, "target_met": self.target_met, "gate_failures": self.gate_failures,
                "export": self.export, "vid_lambda": self.vid_lambda, "data": self.data}


def compress(recipe: Recipe, run_dir: Path, *, device: torch.device, reporter: Reporter | None = None,
             trust: bool = False, do_export: bool | None = None, tracker: Tracker | None = None) -> CompressResult:
    """Run (or continue) DKDP for ``recipe`` in ``run_dir``, holding its lock; see the module docstring.

    ``tracker`` (:func:`kdcli.tracking.open_tracker`, ``--log``) is started before any training and
    closed at the end, whatever the outcome; it gets every epoch through the reporter, every step
    record and the result. Only rank 0 tracks, as only rank 0 writes."""
    lock = RunLock.acquire(run_dir) if is_main_process() else None  # under torchrun rank 0 holds it
    reporter = reporter or Reporter(quiet=True)
    tracker = tracker if is_main_process() else None
    status = "FAILED"
    try:
        if tracker is not None:
            tracker.start(recipe, run_dir, records=RunDir(run_dir).load_state().records, reporter=reporter)
            reporter = tracker.wrap(reporter)
        ctx = Context.open(recipe, run_dir, device, reporter, trust)
        ctx.tracker = tracker
        loop = Loop(ctx)
        loop.run()
        result = loop.finish(do_export if do_export is not None else recipe.export.enabled)
        if tracker is not None:
            tracker.finish(result)
        status = "FINISHED"
        return result
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if tracker is not None:
            tracker.close(status)
        if lock is not None:
            lock.release()


@dataclass
class Context:
    """What stays fixed during a run: the recipe, data, the original teacher and its figures, the
    target, and where things are written."""

    recipe: Recipe
    rd: RunDir
    data: DataBundle
    device: torch.device
    reporter: Reporter
    example: torch.Tensor
    val: list
    test: list | None
    teacher: nn.Module
    tinfo: ModelInfo
    teacher_summary: dict
    target: Target
    granularity: object | None
    prune: bool  # whether steps prune at all (a declared student may be distilled only)
    warnings: list = field(default_factory=list)  # about the choice of data (the loop's own: State.warnings)
    tracker: Tracker | None = None  # run tracking (--log): steps as recorded; epochs come through the reporter

    @classmethod
    def open(cls, recipe: Recipe, run_dir: Path, device: torch.device, reporter: Reporter, trust: bool) -> "Context":
        rd = RunDir(run_dir)
        data = load_data(recipe.data, base_dir=recipe.base_dir, seed=recipe.seed,
                         held_out=recipe.teacher_trained_elsewhere)
        if len(data.val) == 0:
            raise InputError("data.val: no validation data (data.val_fraction 0 and no test split); compression "
                             "judges every step on it: give data.val (a fraction of a split, or another source)")
        reporter.info(f"data: {data.judged_by()}")
        warnings = list(data.notes)
        for note in data.notes:
            reporter.warn(note)
        example = torch.zeros(1, *data.input_shape, device=device)
        val = tensor_batches(*data.eval_tensors("val", device))
        test = tensor_batches(*data.eval_tensors("test", device)) if data.test is not None else None
        teacher, tinfo = obtain_teacher(recipe, data, device, rd.path, reporter, trust)
        teacher.eval()
        t_macs, t_params = count_macs_params(teacher, example)
        t_val = evaluate(teacher, val, device)["accuracy"]
        summary = {"model": tinfo.metadata.get("ensemble_label", tinfo.name), "macs": t_macs, "params": t_params,
                   "val_accuracy": t_val}
        if test is not None:
            summary["test_accuracy"] = evaluate(teacher, test, device)["accuracy"]
        # only a teacher trained elsewhere can have trained on the validation data
        warning = memorised_warning(t_val, summary.get("test_accuracy"), data) \
            if recipe.teacher_trained_elsewhere else None
        if warning:
            reporter.warn(warning)
            warnings.append(warning)
        reporter.info(f"teacher {tinfo.name}: {t_params:,} params, {t_macs:,} MACs, val {100 * t_val:.2f}%")
        bs = recipe.target.resolved_batch_size(recipe.export.batch_sizes)
        t_latency = (reference_latency_ms(teacher, data.input_shape, bs, recipe.export.threads)  # times the teacher
                     if recipe.target.speedup is not None else None)
        target = Target.of(recipe.target, t_macs, t_params, t_val, export_batch_sizes=recipe.export.batch_sizes,
                           teacher_latency_ms=t_latency)
        return cls(recipe, rd, data, device, reporter, example, val, test, teacher, tinfo, summary, target,
                   _granularity(recipe), bool(recipe.student.prune and target.asks_resources), warnings)

    def load(self, name: str) -> tuple[nn.Module, ModelInfo]:
        """A model file of the run directory (a step's student or teacher), on the device."""
        path = self.rd.path / name
        if not path.is_file():
            raise InputError(f"{path}: missing from the run directory (the run's state names it); restore it, or "
                             "start afresh with --overwrite")
        model, info = load_model_any(path, spec_name=None, spec_args=None, input_shape=self.data.input_shape,
                                     num_classes=self.data.num_classes, base_dir=self.recipe.base_dir,
                                     allow=recipe_models(self.recipe))
        return model.to(self.device), info

    def save(self, name: str, model: nn.Module, info: ModelInfo, metrics: dict, role: str = "student") -> None:
        info = copy.copy(info)
        info.metadata = {**data_metadata(self.data), "recipe_sha256": self.recipe.sha256, "metrics": metrics,
                         "role": role}
        save_model(self.rd.path / name, model, info)
        distributed.barrier()  # written by rank 0: every rank may read it from here on

    def latency_ms(self, student: nn.Module) -> float | None:
        """The student's onnxruntime latency (ms at ``target.batch_size``, in the target's terms:
        :func:`kdcli.dkdp.speed.student_latency_ms`), when the target asks for latency or speed-up."""
        return (student_latency_ms(student, self.teacher, self.target, self.data.input_shape,
                                   self.recipe.export.threads) if self.target.asks_speed else None)


@dataclass
class Attempt:
    """One pruning step tried on the student, before it is kept or undone."""

    k: int                  # the step number it would become
    aim: float              # the MACs it aimed at
    before: nn.Module       # the student before it, to undo it
    macs: int               # MACs and parameters before it
    params: int
    tau: float | None = None
    history: list = field(default_factory=list)    # the pruning history it added
    new_macs: int = 0
    new_params: int = 0
    train_history: list = field(default_factory=list)
    lam: dict | None = None
    accuracy: float = float("nan")
    latency: float | None = None
    latency_aim: float | None = None        # a speed target: the latency the step aimed at (ms)
    latency_predicted: float | None = None  # and what the lookup table predicted for its plan
    diverged: str | None = None
    started: float = field(default_factory=time.perf_counter)


class Loop:
    """The DKDP loop over one run (see the module docstring)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.state = ctx.rd.load_state()
        self.student, self.sinfo = self._initial_student()
        # The teacher that teaches: the original, or its fine-tuned copy (distill.train_teacher).
        # The original stays the reference of the accuracy budget and of the reports.
        self.teaching = ctx.load(self.state.teacher_file)[0] if self.state.teacher_file else ctx.teacher
        self.cache = None  # the teacher cache, shared by the run's distillations from one teacher

    @property
    def max_attempts(self) -> int:
        return self.ctx.recipe.prune.step_limit + self.ctx.recipe.prune.max_retries

    @property
    def last_step(self) -> bool:
        """The next kept step is the last the schedule may take (``prune.max_steps``)."""
        return self.state.accepted_steps + 1 >= self.ctx.recipe.prune.step_limit or \
            self.state.attempts >= self.max_attempts

    # --- the steps ------------------------------------------------------------------------------
    def run(self) -> None:
        """Attempt, then accept or undo, until the target is met or the attempts are spent."""
        while not self.state.pruning_done:
            macs, params = count_macs_params(self.student, self.ctx.example)
            latency = self.ctx.latency_ms(self.student) if self.ctx.prune else None
            if (not self.ctx.prune or self.ctx.target.met(macs, params, latency)
                    or self.state.attempts >= self.max_attempts):
                self.state.pruning_done = True
                break
            a = self.attempt(macs, params)
            if not a.history:  # the plan removed nothing: attempt() did not distil
                self.stop_stalled(a)
                break
            self.judge(a)

    def min_ratio(self) -> float | None:
        """The smallest MACs after/before a step may reach, once a step was undone: no step is then
        larger than the largest that held (half the undone cut, on a log scale, while none held), so
        retries and the last step do not collapse into one large cut. None: no limit."""
        state = self.state
        if not state.undone:
            return None
        if state.held_ratio is not None:
            return state.held_ratio
        return math.sqrt(state.failed_ratio) if state.failed_ratio is not None else None

    def aim(self, macs: int) -> float:
        """The MACs the next attempt aims at: the geometric path to the target at the current
        aggressiveness (:meth:`Target.next_macs`), no larger a cut than :meth:`min_ratio` allows,
        except for the last step the schedule may take, which goes to the target (a student short
        of the resource target fails the gate at any accuracy)."""
        target, state = self.ctx.target, self.state
        if self.last_step and target.macs is not None:
            return target.macs
        floor = self.min_ratio()
        if floor is not None and state.undone >= self.ctx.recipe.prune.max_retries:
            # retries spent: the rest of the way in equal steps, none larger than the floor (a
            # halved aggressiveness would only creep on in ever smaller steps)
            if target.macs is None:
                return macs * max(floor, 0.7)
            if macs <= target.macs:
                return macs
            # (a held step that barely cut would make the steps endless: at least 10 % a step)
            n = math.ceil(math.log(target.macs / macs) / math.log(min(floor, 0.9)) - 1e-9)
            return max(target.macs, macs * (target.macs / macs) ** (1 / max(n, 1)))
        steps_left = max(self.ctx.recipe.prune.steps - state.accepted_steps, 1)
        aim = target.next_macs(macs, steps_left, state.aggressiveness)
        return aim if floor is None else max(aim, macs * floor)

    def attempt(self, macs: int, params: int) -> Attempt:
        """Prune toward the aim, distil, evaluate; the student is left pruned (``judge`` decides)."""
        ctx, state = self.ctx, self.state
        state.attempts += 1  # counted before aiming: the attempt number seeds it and marks the last
        a = Attempt(k=state.accepted_steps + 1, aim=self.aim(macs), before=copy.deepcopy(self.student),
                    macs=macs, params=params)
        last = self.last_step
        torch.manual_seed(ctx.recipe.seed + 1000 * state.attempts)
        speed = (SpeedStep(ctx.target, ctx.rd.path, ctx.teacher, tuple(ctx.data.input_shape),
                           max(ctx.recipe.prune.steps - state.accepted_steps, 1), state.aggressiveness, last,
                           self.min_ratio(), ctx.recipe.export.threads) if ctx.target.asks_speed else None)
        a.tau, a.history = _prune_step(ctx.recipe, self.student, ctx.example, ctx.data, ctx.device, a.aim, a.k,
                                       ctx.reporter, None if last else state.failed_macs, speed=speed)
        distributed.check_same(a.history, f"the pruning plan of step {a.k}")
        if speed is not None:
            a.latency_aim, a.latency_predicted = speed.aim, speed.predicted
        a.new_macs, a.new_params = count_macs_params(self.student, ctx.example)
        if not a.history:  # nothing pruned: another distillation would change nothing that matters here
            return a
        t_macs = ctx.target.teacher_macs
        ctx.reporter.info(f"step {a.k}: τ={a.tau if a.tau is None else round(a.tau, 4)}  MACs {macs:,} → "
                          f"{a.new_macs:,} ({a.new_macs / t_macs:.3f} of teacher), params {a.new_params:,}")
        try:
            a.train_history, a.lam = self._distil(self.teaching, self.student, f"step {a.k}", ctx.recipe.distill.train,
                                                  seed=ctx.recipe.seed + 1000 * state.attempts)
        except TrainingDiverged as exc:
            a.diverged = str(exc)
            return a
        a.accuracy = _last_val(a.train_history, self.student, ctx.val, ctx.device)
        a.latency = ctx.latency_ms(self.student)
        return a

    def stop_stalled(self, a: Attempt) -> None:
        """End the pruning where a step's plan removes nothing (every group at its smallest width
        under ``prune.round_to``, the rest ignored or kept out): later steps would only distil
        again; the run goes on to the final distillation and its gate says whether the target
        was met."""
        ctx, state = self.ctx, self.state
        r = ctx.recipe.prune.round_to
        block = f"a block of prune.round_to {r} channels" if r and r > 1 else "a channel"
        msg = (f"step {a.k}: the plan removes nothing (at {a.macs / ctx.target.teacher_macs:.3f} of the teacher's "
               f"MACs no group can lose {block}, or the allocation takes none); pruning stops here: "
               f"{'lower prune.round_to or ' if r and r > 1 else ''}prune fewer ignored_layers to go further")
        ctx.reporter.warn(msg)
        state.warnings.append(msg)
        state.pruning_done = True
        ctx.rd.write_json("state.json", asdict(state))

    def judge(self, a: Attempt) -> None:
        """Accept the attempt or undo it, adapting the aggressiveness; the state changes here only."""
        ctx, state = self.ctx, self.state
        budget = ctx.target.max_accuracy_drop
        if a.diverged is not None:
            ctx.reporter.info(f"step {a.k}: {a.diverged}; keeping the last good student")
            self.student = a.before
            state.aggressiveness /= 2
            self._record(StepRecord(a.k, state.attempts, a.tau, state.aggressiveness, a.aim, a.macs, a.params,
                                    a.macs / ctx.target.teacher_macs, a.params / ctx.target.teacher_params,
                                    float("nan"), float("nan"), False, f"diverged: {a.diverged}",
                                    time.perf_counter() - a.started))
            return
        drop = ctx.target.drop(a.accuracy)
        # Right after its short distillation a step may cost up to step_tolerance x the budget:
        # later steps and the final distillation win part of it back; the result must meet it.
        allowed = ctx.recipe.prune.step_tolerance * budget
        t_acc = forced = None  # the teaching teacher's accuracy, when it is fine-tuned after this step
        ratio = a.new_macs / max(a.macs, 1)
        floor = self.min_ratio()
        if floor is not None and a.aim < a.macs * floor * (1 - 1e-9):  # only the last step aims past the floor
            forced = (f"the target forced a cut to {ratio:.3f} of the MACs, over the largest step that held "
                      f"({floor:.3f}): the last step the schedule may take (prune.max_steps "
                      f"{ctx.recipe.prune.step_limit}) aims at the target")
        if (drop > allowed and state.undone < ctx.recipe.prune.max_retries and not self.last_step
                and state.aggressiveness > 1 / 16):
            state.aggressiveness /= 2
            state.undone += 1
            state.failed_macs, state.failed_ratio = a.new_macs, ratio
            accepted, reason = False, (f"accuracy drop {100 * drop:.2f} pt > {100 * allowed:.2f} pt a step may leave: "
                                       f"undone, aggressiveness halved to {state.aggressiveness:.3g}; later steps cut "
                                       f"no more than the largest that held")
            self.student, forced = a.before, None
        else:
            accepted = True
            state.failed_macs = None
            if drop <= allowed and forced is None:
                state.held_ratio = ratio if state.held_ratio is None else min(state.held_ratio, ratio)
            if drop <= budget / 2:
                state.aggressiveness = min(2.0, state.aggressiveness * 1.5)
                reason = f"accuracy held (drop {100 * drop:.2f} pt): aggressiveness raised to {state.aggressiveness:.3g}"
            elif drop > allowed:
                reason = f"drop {100 * drop:.2f} pt over what a step may cost, no retries left: kept"
                forced = forced or (f"the target forced a step over the accuracy budget: drop {100 * drop:.2f} pt > "
                                    f"{100 * allowed:.2f} pt a step may leave, with no retries left "
                                    f"(prune.max_retries {ctx.recipe.prune.max_retries})")
            else:
                reason = (f"drop {100 * drop:.2f} pt within the {100 * allowed:.2f} pt a step may leave: aggressiveness "
                          f"kept at {state.aggressiveness:.3g}")
            t_acc = self._keep(a, drop)
        ctx.reporter.info(f"step {a.k}: val {100 * a.accuracy:.2f}% (drop {100 * drop:.2f} pt) — {reason}")
        self._record(StepRecord(a.k, state.attempts, a.tau, state.aggressiveness, a.aim, a.new_macs, a.new_params,
                                a.new_macs / ctx.target.teacher_macs, a.new_params / ctx.target.teacher_params,
                                a.accuracy, drop, accepted, reason, time.perf_counter() - a.started, a.latency,
                                a.train_history, t_acc, forced, a.latency_aim, a.latency_predicted), a.lam)
        if forced:
            ctx.reporter.warn(f"step {a.k}: {forced}")

    def _keep(self, a: Attempt, drop: float) -> float | None:
        """A kept step: saved as ``steps/step_NNN.kdc``, the best so far if it meets the target
        within the budget, and the teaching teacher fine-tuned toward it when the recipe asks."""
        ctx, state = self.ctx, self.state
        state.accepted_steps = a.k
        self.sinfo.pruning_history = self.sinfo.pruning_history + a.history
        name = f"steps/step_{a.k:03d}.kdc"
        ctx.save(name, self.student, self.sinfo,
                 {"val_accuracy": a.accuracy, "macs": a.new_macs, "params": a.new_params, "step": a.k})
        state.student_file = name
        if a.lam is not None:
            state.vid_lambda[name] = a.lam
        if (ctx.target.met(a.new_macs, a.new_params, a.latency) and drop <= ctx.target.max_accuracy_drop
                and a.accuracy > state.best_val):
            state.best_file, state.best_val = name, a.accuracy
        if ctx.recipe.distill.train_teacher is None:
            return None
        self.teaching = copy.deepcopy(ctx.teacher) if self.teaching is ctx.teacher else self.teaching
        t_acc = self._train_teacher(f"teacher {a.k}", seed=ctx.recipe.seed + 1000 * state.attempts + 500)
        state.teacher_file = f"steps/teacher_{a.k:03d}.kdc"
        ctx.save(state.teacher_file, self.teaching, ctx.tinfo, {"val_accuracy": t_acc, "after_step": a.k},
                 role="teacher")
        self.cache = None  # its outputs changed
        ctx.reporter.info(f"step {a.k}: teacher fine-tuned, val {100 * t_acc:.2f}%")
        return t_acc

    def _record(self, record: StepRecord, lam: dict | None = None) -> None:
        """Log a step attempt (``lam``: its distillation's VID λ, for tracking) and save the state."""
        self.state.records.append(asdict(record))
        self.ctx.rd.write_metrics(self.state.records)
        self.ctx.rd.write_json("state.json", asdict(self.state))
        if self.ctx.tracker is not None:
            self.ctx.tracker.step(self.state.records[-1], lam)

    def finish(self, do_export: bool) -> CompressResult:
        """The final distillation, then the chosen student: written, judged, exported, reported."""
        ctx, state = self.ctx, self.state
        if not state.finished:
            self._final_distillation()
            state.finished = True
            ctx.rd.write_json("state.json", asdict(state))
        chosen = state.best_file or state.student_file
        student, sinfo = ctx.load(chosen) if chosen is not None else (self.student, self.sinfo)
        s_macs, s_params = count_macs_params(student, ctx.example)
        s_val = evaluate(student, ctx.val, ctx.device)["accuracy"]
        t = ctx.target
        summary = {"model": sinfo.name, "file": "student.kdc", "from": chosen, "macs": s_macs, "params": s_params,
                   "val_accuracy": s_val, "macs_ratio": s_macs / t.teacher_macs,
                   "params_ratio": s_params / t.teacher_params}
        if ctx.test is not None:
            summary["test_accuracy"] = evaluate(student, ctx.test, ctx.device)["accuracy"]
        ctx.save("student.kdc", student, sinfo, summary)
        failures = t.failures(s_macs, s_params, ctx.latency_ms(student), s_val)
        result = CompressResult(ctx.rd.path, ctx.teacher_summary, summary, state.records, not failures, failures,
                                vid_lambda=state.vid_lambda.get(chosen),
                                data={"splits": ctx.data.splits, "normalization": ctx.data.normalization(),
                                      "warnings": ctx.warnings + state.warnings})
        if do_export:
            result.export, gate_failures = distributed.on_main(_export, ctx, student, sinfo)  # rank 0 exports
            if t.asks_speed:  # the export report's measurement judges a latency or speed-up target
                failures = t.failures(s_macs, s_params, t.export_latency_ms(result.export), s_val)
                result.target_met = not failures
            # a student slower than its teacher fails the run (exit 3) unless target.allow_slower
            result.gate_failures = failures + gate_failures + t.speed_failures(result.export)
        ctx.rd.write_json("result.json", result.to_json())
        if is_main_process():
            write_compress_report(result, ctx.rd.path)
        return result

    def _final_distillation(self) -> None:
        ctx, state = self.ctx, self.state
        epochs = ctx.recipe.prune.final_epochs if ctx.prune else ctx.recipe.distill.train.epochs
        if epochs <= 0:
            return
        if state.best_file:
            self.student, self.sinfo = ctx.load(state.best_file)
        cfg = ctx.recipe.distill.train.model_copy(update={"epochs": epochs})
        hist, lam = self._distil(self.teaching, self.student, "distil", cfg, seed=ctx.recipe.seed + 999_999)
        acc = _last_val(hist, self.student, ctx.val, ctx.device)
        macs, params = count_macs_params(self.student, ctx.example)
        name = "steps/final.kdc"
        ctx.save(name, self.student, self.sinfo, {"val_accuracy": acc, "macs": macs, "params": params})
        state.student_file = name
        if lam is not None:
            state.vid_lambda[name] = lam
        if (ctx.target.met(macs, params, ctx.latency_ms(self.student))
                and ctx.target.drop(acc) <= ctx.target.max_accuracy_drop and acc >= state.best_val):
            state.best_file, state.best_val = name, acc

    # --- distillations --------------------------------------------------------------------------
    def _distil(self, teacher, student, label: str, cfg, seed: int) -> tuple[list, dict | None]:
        """The recipe's distillation of ``teacher`` into ``student``; the teacher cache carries over."""
        hist, lam, self.cache = _distil(self.ctx, teacher, student, label, cfg, seed, self.cache)
        return hist, lam

    def _train_teacher(self, label: str, seed: int) -> float:
        """Fine-tune the teaching teacher in place (``distill.train_teacher``, see
        :class:`kdcli.config.recipe.TeacherTrainingSpec`): cross-entropy plus ``kd_weight`` × KD
        toward a frozen copy of the student. Returns its validation accuracy; it is left frozen."""
        ctx, teaching = self.ctx, self.teaching
        spec = ctx.recipe.distill.train_teacher
        cfg = ctx.recipe.distill.train.model_copy(update={"epochs": spec.epochs, "lr": spec.lr})
        for p in teaching.parameters():
            p.requires_grad_(True)
        # the roles swap: a frozen copy of the student teaches (a KD term of weight 0 is left out)
        losses = [CE(weight=1.0), KD(temperature=spec.temperature, weight=spec.kd_weight)]
        hist, _, _ = _distil(ctx, copy.deepcopy(self.student), teaching, label, cfg, seed, None, losses=losses,
                             granularity=False)
        teaching.eval()
        for p in teaching.parameters():
            p.requires_grad_(False)
        return _last_val(hist, teaching, ctx.val, ctx.device)

    def _initial_student(self) -> tuple[nn.Module, ModelInfo]:
        ctx = self.ctx
        if self.state.student_file:
            return ctx.load(self.state.student_file)
        recipe, data = ctx.recipe, ctx.data
        if recipe.student.model is None:
            student = copy.deepcopy(ctx.teacher)
            info = ModelInfo(ctx.tinfo.name, dict(ctx.tinfo.args), tuple(data.input_shape), data.num_classes,
                             list(ctx.tinfo.pruning_history), {})
        else:
            torch.manual_seed(recipe.seed + 7)
            student = build_model(recipe.student.model, recipe.student.model_args, input_shape=data.input_shape,
                                  num_classes=data.num_classes, base_dir=recipe.base_dir).to(ctx.device)
            info = ModelInfo(absolute_spec(recipe.student.model, recipe.base_dir), dict(recipe.student.model_args),
                             tuple(data.input_shape), data.num_classes)
        for p in student.parameters():
            p.requires_grad_(True)
        return student, info


# ----------------------------------------------------------------------------- the pieces


def _distil(ctx: Context, teacher, student, label: str, cfg, seed: int, cache, losses=None, granularity=None):
    """One distillation with the recipe's losses (or ``losses``): ``(history, λ or None, cache)``.
    A module-level function so that tests can interrupt a run at a chosen distillation."""
    res = distil(teacher, student, ctx.recipe.distill.losses if losses is None else losses, ctx.data, cfg,
                 device=ctx.device, val=ctx.val, seed=seed, cache_teacher=ctx.recipe.distill.cache_teacher,
                 cache=cache, granularity=ctx.granularity if granularity is None else (granularity or None),
                 progress=lambda m: ctx.reporter.metrics(label, m))
    return res.history, res.lambda_report, res.cache


def _export(ctx: Context, student: nn.Module, sinfo: ModelInfo) -> tuple[dict, list[str]]:
    """The chosen student exported next to the teacher; returns the export report and its gate failures."""
    from kdcli.export.onnx import export_report  # onnx and onnxruntime load only when exporting

    data, recipe = ctx.data, ctx.recipe
    x_eval, y_eval = data.eval_tensors("test" if data.test is not None else "val", torch.device("cpu"))
    report = export_report(
        student.cpu(), export_info(sinfo, data), ctx.rd.path / "export", teacher=ctx.teacher.cpu(),
        teacher_info=export_info(ctx.tinfo, data), x_eval=x_eval, y_eval=y_eval,
        reporter=ctx.reporter, **recipe.export.settings(batch_sizes=tuple(dict.fromkeys(
            [*recipe.export.batch_sizes] + ([ctx.target.batch_size] if ctx.target.asks_speed else [])))))
    # the export report is written either way; its failed gates join the verdict
    return report.to_json(), list(report.gates.failures)


def _granularity(recipe: Recipe):
    if not recipe.distill.granularity:
        return None
    return GranularityMap.load(recipe.resolve(recipe.distill.granularity))


def _score_batches(recipe: Recipe, data: DataBundle, device) -> list:
    """The batches data-driven importance is scored on: the first ``prune.score_batches`` of a
    seeded, augmented (as the recipe trains) pass over the training split. A checkpoint trained
    elsewhere has memorised its training images (cross-entropy ~0.007 on the public CIFAR
    ResNets), so un-augmented Taylor gradients are noise: pruned once to 0.79 of ResNet-20's MACs,
    validation accuracy was 28 % with them and 65 % with augmented batches (activation: 72 %)."""
    loader = data.loader("train", train=data.augment.active, device=device, seed=recipe.seed)
    out = []
    for i, batch in enumerate(loader):
        if i >= recipe.prune.score_batches:
            break
        out.append(batch)
    return out


def _prune_step(recipe, student, example, data, device, aim_macs, k, reporter, failed_macs=None,
                speed: SpeedStep | None = None):
    """Score, choose τ for ``aim_macs`` and prune ``student`` in place; returns (τ, history).
    ``failed_macs``: an undone attempt of this step cut to these MACs, so τ is lowered until the
    plan cuts less (coarse plans, e.g. with ``round_to``, would otherwise repeat it)."""
    pruner = StructuredPruner(student, example, importance=recipe.prune.importance,
                              ignored_layers=recipe.prune.ignored_layers, round_to=recipe.prune.round_to)
    if k == 1:
        for note in pruner.notes:
            reporter.info(f"prune: {note}")
    sensitive = recipe.prune.allocation == "sensitivity"
    batches = _score_batches(recipe, data, device) if recipe.prune.importance in NEEDS_DATA or sensitive else None
    scores = pruner.score(batches=batches if recipe.prune.importance in NEEDS_DATA else None)
    if k == 1 and recipe.prune.ratios_from:
        ratios = _suggested_ratios(recipe.resolve(recipe.prune.ratios_from))
        pruner.prune_ratios(ratios, scores)
        return None, pruner.history()
    measured = _Sensitivity(pruner, scores, student, batches, recipe.prune.sensitivity_ratios) if sensitive else None
    if speed is not None:  # a latency target: importance per ms on the lookup table, or measured damage, timed whole
        macs_aim = aim_macs if recipe.target.macs is not None else None
        tau, plan = speed.plan(pruner, scores, aim_macs, failed_macs, reporter, k,
                               planner=(lambda now_ms, aim_ms: measured.for_latency(
                                   now_ms, aim_ms, macs_aim, speed.target.batch_size, speed.threads))
                               if sensitive else None,
                               for_macs=(lambda: measured.for_macs(aim_macs)) if sensitive else None)
    elif recipe.prune.allocation == "uniform":
        tau, plan = pruner.plan_uniform(scores, aim_macs)
    elif sensitive:
        tau, plan = measured.for_macs(aim_macs)
    elif failed_macs is None:  # land on the aim, not below it: one τ moves in coarse steps
        tau, plan = pruner.plan_for_macs(scores, aim_macs)
    else:
        tau = pruner.tau_for_macs(scores, aim_macs)
        plan = pruner.plan_below(scores, tau)
        for _ in range(30):
            if pruner.plan_macs(plan) > failed_macs:
                break
            tau *= 0.9
            plan = pruner.plan_below(scores, tau)
    pruner.apply(plan)
    return float(tau), pruner.history()


class _Sensitivity:
    """``prune.allocation: sensitivity`` for one step: every group pruned alone at each of
    ``ratios`` (lowest scores first), the damage measured as the KL divergence of the pruned
    student's outputs from the unpruned student's on ``batches`` (the score batches: no labels,
    no validation data), then the greedy of :func:`suggest_ratios`: raise, one ratio step at a
    time, the group whose step costs the least damage per unit of cost saved, with the cost of
    the combined plan counted exactly, until the aim is reached; channels are then given back or
    taken away to land just under the aim. Where the residual stream of a ResNet is prunable this
    learns what a uniform cut cannot: on the CIFAR ResNet-20, half a stage's stream costs 66
    points of accuracy alone and half an inner convolution 0.4 (``kdcli analyze``). The cost is
    one forward pass over the score batches per group and distinct ratio.

    The cost is MACs (:meth:`for_macs`) or, for a latency or speed-up target, the latency of
    candidate plans timed whole (:meth:`for_latency`: of a plan by damage per millisecond saved
    and one by damage per MAC, the one that shifts the outputs less, with the MACs aim as a
    second condition when the target has one). Layers do not cost per MAC (onnxruntime's
    convolutions at full resolution and few channels run slower per MAC than narrow late ones,
    and widths below the kernels' channel block run on another path), so the two can choose
    different structures for the same MACs."""

    def __init__(self, pruner: StructuredPruner, scores: dict, student: nn.Module, batches: list, ratios):
        self.pruner, self.scores, self.student, self.ratios = pruner, scores, student, ratios
        self.inputs = [b[0] for b in batches]
        with torch.no_grad():
            student.eval()
            self.reference = [torch.log_softmax(first_tensor(student(x)).float(), dim=1) for x in self.inputs]
        self._measured: dict | None = None
        self.total_macs = count_macs_params(student, pruner.example)[0]  # the student as it is (plans are trials)

    def _negative_damage(self) -> float:
        total = 0.0
        with torch.no_grad():
            self.student.eval()
            for x, ref in zip(self.inputs, self.reference):
                out = torch.log_softmax(first_tensor(self.student(x)).float(), dim=1)
                total += float(torch.nn.functional.kl_div(out, ref, log_target=True, reduction="sum"))
        # under torchrun each rank holds its share of the score batches: the damage is summed over all
        total, n = distributed.sum_over_ranks(torch.tensor([total, float(sum(len(x) for x in self.inputs))])).tolist()
        return -total / max(n, 1)

    def _curves(self) -> dict:
        """Each group's damage and MACs at each ratio, measured once per step."""
        if self._measured is None:
            groups = [g for g in self.pruner.groups if g in self.scores]
            self._measured = pruning_sensitivity(
                self.pruner, groups, self.scores, self.ratios, evaluate_fn=self._negative_damage,
                macs_fn=lambda: count_macs_params(self.student, self.pruner.example)[0])
        return self._measured

    def for_macs(self, aim_macs: float) -> tuple[float, dict[str, list[int]]]:
        """(predicted damage, plan) at or just under ``aim_macs``."""
        pruner, scores = self.pruner, self.scores
        curves = self._curves()
        suggestion = suggest_ratios(curves, baseline_accuracy=0.0, total_macs=self.total_macs, target_macs=float(aim_macs),
                                    macs_of=lambda r: pruner.plan_macs(pruner.plan_ratios(r, scores)))
        plan = pruner.plan_ratios(suggestion["ratios"], scores)
        plan = (pruner.fill_to_macs(scores, plan, aim_macs) if pruner.plan_macs(plan) <= aim_macs
                else pruner.take_to_macs(scores, plan, aim_macs))
        return -float(suggestion["predicted_accuracy"]), plan

    def for_latency(self, now_ms: float, aim_ms: float, aim_macs: float | None, batch_size: int,
                    threads: int | None = None, time_budget_s: float = CONTEXT_BUDGET_S) -> LatencyPlan:
        """The plan whose latency is at or just under ``aim_ms`` (``now_ms``: the student's as
        the step measured it), and whose MACs are at or under ``aim_macs`` when given: of two
        candidates, :meth:`by_damage_per_ms` and :meth:`by_damage_per_mac`, both timed whole,
        the one that shifts the student's outputs less (KL on the score batches, the combined plan
        measured, not the sum of its groups' shifts) among those that time under the aim (else
        the faster). Neither wins everywhere: where a layer costs MACs but no time the first
        leaves it whole; on the CIFAR ResNet-20 checkpoint (AVX-512 host, aim 1.6x) the combined
        plans' output KL in pretrained_cifar.py's steps was 4.9-10.2 by damage per ms and 3.0-9.1
        by damage per MAC, the second lower in 4 of 6 steps: single-group damages add up badly
        over many small steps (README, "Speed targets")."""
        base = copy.deepcopy(self.student).eval()
        found = [self.by_damage_per_ms(now_ms, aim_ms, aim_macs, batch_size, threads, time_budget_s, base),
                 self.by_damage_per_mac(now_ms, aim_ms, aim_macs, batch_size, threads, time_budget_s, base)]
        shift = []
        for res in found:
            with self.pruner.trial(res.plan, check=False):
                shift.append(-self._negative_damage())
        fits = [i for i, res in enumerate(found) if res.predicted_ms <= aim_ms]
        best = (min(fits, key=lambda i: (shift[i], i)) if fits
                else min(range(len(found)), key=lambda i: found[i].predicted_ms))
        res, other = found[best], found[1 - best]
        res.measured += other.measured
        res.how = (f"{res.how}; output KL {shift[best]:.3g} against {shift[1 - best]:.3g} by "
                   f"{other.how.split(':')[0]} ({other.predicted_ms:.3f} ms)")
        return res

    def by_damage_per_mac(self, now_ms: float, aim_ms: float, aim_macs: float | None, batch_size: int,
                          threads: int | None = None, time_budget_s: float = CONTEXT_BUDGET_S,
                          base: nn.Module | None = None) -> LatencyPlan:
        """The plan of :meth:`for_macs` (damage per MAC) for the largest MACs aim whose plan,
        timed whole, runs at or under ``aim_ms``: the MACs aim is bisected on whole-model
        timings (``BISECTIONS`` at most, from MACs in proportion to the latency aim), at or under
        ``aim_macs`` when given. Timings are not monotone in the MACs (widths off the runtime's
        channel block), so the least cut that timed under the aim is kept, else the fastest."""
        pruner = self.pruner
        base = base if base is not None else copy.deepcopy(self.student).eval()
        total = float(self.total_macs)
        goal = float(aim_ms) / now_ms if now_ms > 0 else 1.0
        lo, hi = 0.0, total if aim_macs is None else min(float(aim_macs), total)
        macs = min(hi, total * goal)
        tried = []
        for _ in range(BISECTIONS):
            damage, plan = self.for_macs(macs)
            fraction = timed_fraction(pruner, plan, batch_size, threads, base, time_budget_s)
            tried.append((macs, fraction, damage, plan))
            if fraction <= goal:
                lo = macs
            else:
                hi = macs
            if hi - lo <= 0.01 * total:
                break
            macs = (lo + hi) / 2
        fits = [t for t in tried if t[1] <= goal]
        macs, fraction, damage, plan = max(fits, key=lambda t: t[0]) if fits else min(tried, key=lambda t: t[1])
        return LatencyPlan(plan, float(damage), now_ms, fraction * now_ms, float(aim_ms), len(tried),
                           f"damage per MAC: {len(tried)} whole-model timings bisecting the MACs aim "
                           f"(the plan at {macs / total:.3f} of the MACs now)")

    def by_damage_per_ms(self, now_ms: float, aim_ms: float, aim_macs: float | None, batch_size: int,
                         threads: int | None = None, time_budget_s: float = CONTEXT_BUDGET_S,
                         base: nn.Module | None = None) -> LatencyPlan:
        """The measured allocation's greedy with **damage per millisecond saved, measured in
        context**.
        Each candidate (a group raised to its next ratio on top of the plan so far) is exported
        and timed whole in onnxruntime (``threads``), alternately with the student as it is now,
        at ``batch_size``; a lookup table of single layers
        cannot see what the runtime does between layers (onnxruntime's blocked NCHWc layout: a
        width under its block of channels runs on another path, with reorders on both sides; on
        an AVX-512 host the table was 3-18 % (median 10 %) optimistic for ResNet-20 plans with
        8-channel first-stage convolutions, ``benchmarks/latency_fidelity.py``). Lazy, as in
        HALP's greedy: a candidate's saving is timed again only when it comes first with a
        saving measured before the last raise. Once the latency holds, a MACs aim still unmet
        is served by damage per MAC (exact counts, no timing). The plan goes as far as the
        ratios allow when the aims are out of reach."""
        pruner, scores, student = self.pruner, self.scores, self.student
        curves = self._curves()
        base = base if base is not None else copy.deepcopy(student).eval()
        goal = float(aim_ms) / now_ms if now_ms > 0 else 1.0
        timings = 0

        def fraction(plan: dict) -> float:
            nonlocal timings
            timings += 1 if any(plan.values()) else 0
            return timed_fraction(pruner, plan, batch_size, threads, base, time_budget_s)

        at: dict[str, int] = {g: -1 for g in curves}  # index of each group's ratio in its curve
        plan: dict[str, list[int]] = {}
        cur, version = 1.0, 0
        seen: dict[str, tuple[float, int]] = {}  # group -> (fraction after its next step, version timed)

        def step_of(g: str):
            """(next curve index, its plan, the damage it adds) of group g, or None at its last."""
            ratios = {h: curves[h][i]["ratio"] for h, i in at.items() if i >= 0}
            for i in range(at[g] + 1, len(curves[g])):
                nxt = pruner.plan_ratios({**ratios, g: curves[g][i]["ratio"]}, scores)
                if nxt != plan:
                    before = -curves[g][at[g]]["accuracy"] if at[g] >= 0 else 0.0
                    return i, nxt, max(-curves[g][i]["accuracy"] - before, 0.0)
            return None

        def macs_ok(p: dict) -> bool:
            return aim_macs is None or pruner.plan_macs(p) <= aim_macs

        def priority(damage: float, after: float) -> float:
            """Damage per fraction of the latency saved; a step that saves none (or noise) comes last."""
            saved = cur - after
            return damage / saved if saved > 1e-3 else NO_SAVING * (1 + damage)

        while not (cur <= goal and macs_ok(plan)):
            steps = {g: st for g in curves if (st := step_of(g)) is not None}
            if not steps:
                break
            if cur <= goal:  # the latency holds: the MACs aim, by damage per MAC saved
                m0 = pruner.plan_macs(plan)
                keyed = [(d / max(m0 - pruner.plan_macs(nxt), 1e-9), g) for g, (_, nxt, d) in steps.items()]
                _, g = min(keyed)
                i, plan, _ = steps[g]
                at[g] = i  # (a further cut only lowers the latency: no timing needed until the end)
                version += 1
                seen.pop(g, None)
                continue
            while True:
                keyed = []
                for g, (_, nxt, d) in steps.items():
                    if g not in seen:
                        seen[g] = (fraction(nxt), version)
                    keyed.append((priority(d, seen[g][0]), g))
                keyed.sort()
                g = keyed[0][1]
                if seen[g][1] == version or len(keyed) == 1:
                    break
                # timed before the last raise: time it again in the plan as it is now
                seen[g] = (fraction(steps[g][1]), version)
                if priority(steps[g][2], seen[g][0]) <= keyed[1][0]:
                    break
            i, plan, _ = steps[g]
            at[g] = i
            cur = seen.pop(g)[0]
            version += 1
        if not macs_ok(plan):
            plan = pruner.take_to_macs(scores, plan, aim_macs)
        final = fraction(plan)
        damage = sum(-curves[g][i]["accuracy"] for g, i in at.items() if i >= 0)
        return LatencyPlan(plan, float(damage), now_ms, final * now_ms, float(aim_ms), timings,
                           f"damage per ms: {timings} whole-model timings")


def _suggested_ratios(path: Path) -> dict[str, float]:
    try:
        obj = json.loads(Path(path).read_text())
        ratios = obj["suggested_ratios"]["ratios"] if "ratios" in obj.get("suggested_ratios", {}) else obj["suggested_ratios"]
        return {str(k): float(v) for k, v in ratios.items()}
    except FileNotFoundError:
        raise InputError(f"prune.ratios_from: {path} not found (write it with `kdcli analyze --out`)") from None
    except (KeyError, TypeError, ValueError, json.JSONDecodeError):
        raise InputError(f"prune.ratios_from: {path} holds no suggested_ratios (expected analysis.json from `kdcli analyze`)") from None


def _last_val(history: list, student, val, device) -> float:
    """Validation accuracy of ``student`` now: fit() measured it after the last epoch."""
    if history and "val_accuracy" in history[-1]:
        return history[-1]["val_accuracy"]
    return evaluate(student, val, device)["accuracy"]
