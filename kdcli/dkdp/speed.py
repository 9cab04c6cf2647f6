"""Latency and speed-up targets in the DKDP loop: what is measured, and where a step aims.

- :func:`reference_latency_ms`: the teacher's onnxruntime latency at the target's batch size,
  measured once when a run with a speed-up target opens;
- :func:`student_latency_ms`: the student's latency in the target's terms (see
  :mod:`kdcli.dkdp.target`): timed alone for a latency target, alternately with the teacher for a
  speed-up target (then ``teacher reference × student / teacher``), at the slow end of the
  measurement's noise;
- :class:`SpeedStep`: one step's latency aim, on the geometric path of
  :meth:`~kdcli.dkdp.target.Target.next_latency` from the measured student to the target, and its
  plan: the latency lookup table of the run directory (``latency_lut.json``, reused on resume)
  calibrated on the measured student, then :func:`kdcli.export.latency_model.plan_for_latency`.

Timing is onnxruntime's on this machine with the recipe's ``export.threads`` intra-op threads
(null: as many as the process may use), as the export report that judges the run times it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from torch import nn

from kdcli.dkdp.target import Target
from kdcli.export import latency_model  # module attributes, read at call time (tests replace the timing)
from kdcli.export.latency_model import LUT_FILE, LatencyModel, LatencyPlan, LatencyTable, plan_for_latency

MARGIN = 0.03  # a step that aims at the target aims this much under it: the final measurement is noisy
TIME_BUDGET_S = 1.0  # seconds of timed runs per measurement in the loop (the export report takes its own)
NOISE_CAP = 0.10  # the most the loop's latency is raised for its measurement noise
CONTEXT_BUDGET_S = 0.3  # seconds of timed runs per whole-model timing of a candidate plan
BISECTIONS = 7  # whole-model timings at most while bisecting a MACs aim for a latency aim
CORRECTIONS = 3  # times a table's plan that timed over its aim is planned again for a corrected aim


def reference_latency_ms(teacher: nn.Module, input_shape: Sequence[int], batch_size: int,
                         threads: int | None = None) -> float:
    """The teacher's median onnxruntime latency (ms) at ``batch_size``."""
    return float(latency_model.measure_models({"teacher": teacher}, input_shape, batch_size, threads=threads,
                                              time_budget_s=TIME_BUDGET_S)["teacher"]["median_ms"])


def student_latency_ms(student: nn.Module, teacher: nn.Module, target: Target, input_shape: Sequence[int],
                       threads: int | None = None) -> float:
    """The student's latency (ms at ``target.batch_size``) in the target's terms, at the slow end
    of its noise: its median alone, or with a speed-up target ``target.teacher_latency_ms ×
    student / teacher`` from alternating runs of both, times ``1 + `` the measurement's relative
    spread (half the interquartile range of the timed runs; of both models for a ratio), at most
    ``NOISE_CAP``. The loop stops once the target holds by more than the noise, so that the
    export report's own measurement, which judges the run, finds it held too."""
    bs = target.batch_size
    if target.speedup is None:
        s = latency_model.measure_models({"student": student}, input_shape, bs, threads=threads,
                                         time_budget_s=TIME_BUDGET_S)["student"]
        return float(s["median_ms"]) * (1 + min(_rel_spread(s), NOISE_CAP))
    lat = latency_model.measure_models({"teacher": teacher, "student": student}, input_shape, bs, threads=threads,
                                       time_budget_s=TIME_BUDGET_S)
    t, s = lat["teacher"], lat["student"]
    rel = math.hypot(_rel_spread(t), _rel_spread(s))
    return float(target.teacher_latency_ms * s["median_ms"] / t["median_ms"]) * (1 + min(rel, NOISE_CAP))


def timed_fraction(pruner, plan: dict, batch_size: int, threads: int | None = None, base: nn.Module | None = None,
                   time_budget_s: float = CONTEXT_BUDGET_S) -> float:
    """The latency of ``pruner``'s model with ``plan`` applied over its latency as it is now
    (``base``: a copy of it, when the caller holds one): both exported and timed whole in
    onnxruntime, alternately, at ``batch_size``; 1.0 for an empty plan. What a layer table
    cannot see (the runtime's layout conversions between layers) is in it."""
    if not any(plan.values()):
        return 1.0
    base = base if base is not None else copy.deepcopy(pruner.model).eval()
    with pruner.trial(plan, check=False):
        trial = copy.deepcopy(pruner.model).eval()
    lat = latency_model.measure_models({"now": base, "plan": trial}, tuple(pruner.example.shape[1:]), batch_size,
                                       threads=threads, time_budget_s=time_budget_s)
    return float(lat["plan"]["median_ms"]) / float(lat["now"]["median_ms"])


def _rel_spread(stats: dict) -> float:
    """Half the interquartile range over the median (0 without quartiles)."""
    try:
        return max(0.0, (float(stats["p75_ms"]) - float(stats["p25_ms"])) / 2 / float(stats["median_ms"]))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return 0.0


@dataclass
class SpeedStep:
    """What a pruning step needs to aim at a latency: the target, the run directory (for the
    lookup table), the teacher (a speed-up is measured against it) and the input shape, and the
    loop's schedule: steps left, aggressiveness, whether this is the last step the schedule may
    take (it aims at the target), and the smallest after/before ratio a step may reach once a
    step was undone (the MACs ratio of :meth:`kdcli.dkdp.compress.Loop.min_ratio`, applied to
    latency)."""

    target: Target
    run_dir: Path
    teacher: nn.Module
    input_shape: tuple
    steps_left: int
    aggressiveness: float
    last: bool = False
    floor: float | None = None
    threads: int | None = None      # onnxruntime intra-op threads (export.threads; None: the process's cores)
    aim: float | None = None        # after plan(): the latency this step aimed at (ms; None: it served another target)
    predicted: float | None = None  # after plan(): the plan's latency, timed whole (ms)

    def aim_ms(self, current_ms: float) -> float:
        """This step's latency aim from the measured ``current_ms``."""
        goal = self.target.latency_aim
        if current_ms <= goal:
            return current_ms  # fast enough: another target (MACs, parameters) asks for this step
        aim = goal if self.last else self.target.next_latency(current_ms, self.steps_left, self.aggressiveness)
        if self.floor is not None and not self.last:
            aim = max(aim, current_ms * self.floor)
        if aim <= goal * (1 + 1e-9):
            aim = goal * (1 - MARGIN)
        return min(aim, current_ms)

    def plan(self, pruner, scores: dict, aim_macs: float, failed_macs: int | None = None,
             reporter=None, k: int = 0, planner: Callable[[float, float], LatencyPlan] | None = None,
             for_macs: Callable[[], tuple[float, dict[str, list[int]]]] | None = None
             ) -> tuple[float, dict[str, list[int]]]:
        """(τ, plan) for this step: the plan whose predicted latency lands just under the aim,
        then, with a MACs target too, blocks taken away until the MACs aim holds; a retry after
        an undone attempt (``failed_macs``) aims higher until its plan cuts less. ``planner(now_ms,
        aim_ms)`` chooses the plan from the student's measured latency (compress passes the
        measured allocation's :meth:`~kdcli.dkdp.compress._Sensitivity.for_latency`, candidate
        plans timed whole, for ``allocation: sensitivity``); without one, :func:`~kdcli.export.latency_model.plan_for_latency` on the
        lookup table (importance per millisecond), its plan timed whole and planned again where
        it misses the aim (up to ``CORRECTIONS`` times).
        ``for_macs()``: the plan of a step that serves a MACs target only, the latency target
        holding already (default :meth:`~kdcli.prune.pruner.StructuredPruner.plan_for_macs`)."""
        current = student_latency_ms(pruner.model, self.teacher, self.target, self.input_shape, self.threads)
        aim = self.aim_ms(current)
        if aim >= current:  # the latency target holds: the step serves the MACs (or parameters) target
            self.aim = self.predicted = None
            return for_macs() if for_macs is not None else pruner.plan_for_macs(scores, aim_macs)
        table = model = None
        if planner is None:  # HALP on the lookup table, calibrated on the measured student
            table = LatencyTable(Path(self.run_dir) / LUT_FILE, threads=self.threads)
            model = LatencyModel(pruner.model, pruner.example, table, self.target.batch_size)
            model.calibrate(current)

            def plan_for(aim_ms: float) -> LatencyPlan:
                return plan_for_latency(pruner, scores, aim_ms, model)
        else:
            def plan_for(aim_ms: float) -> LatencyPlan:
                return planner(current, aim_ms)
        result = plan_for(aim)
        for _ in range(10):
            if failed_macs is None or not result.plan or pruner.plan_macs(result.plan) > failed_macs:
                break
            aim += (current - aim) * 0.3  # the undone attempt's cut held no more: cut less
            result = plan_for(aim)
        timed_note = ""
        if table is not None and result.plan:  # the table's plan, timed whole: aim again where the table was wrong
            base = copy.deepcopy(pruner.model).eval()

            def timed(p: dict) -> float:  # ms of the student with plan p, timed whole against it as it is
                return current * timed_fraction(pruner, p, self.target.batch_size, self.threads, base)

            spent = timed(result.plan)
            tried, fed, over, under = [(spent, result)], aim, aim, None  # aims given: timed over / under
            for _ in range(CORRECTIONS):
                if under is None:
                    if spent <= aim:
                        break
                    fed = fed * aim / spent * (1 - MARGIN)  # the table's error, as a proportion, on its aim
                else:  # one aim timed over, one under: halve the interval (the under plan is kept)
                    fed = (over + under) / 2
                result = plan_for(fed)
                spent = timed(result.plan)
                tried.append((spent, result))
                if spent <= aim:
                    under = fed if under is None else max(under, fed)
                else:
                    over = min(over, fed)
            # the least cut that times under the aim, else the fastest (the table's choices do not
            # move monotonically with its aim where its error depends on the widths it picks)
            fits = [t for t in tried if t[0] <= aim]
            spent, result = max(fits, key=lambda t: t[0]) if fits else min(tried, key=lambda t: t[0])
            result.predicted_ms = spent
            timed_note = f"; its plan timed whole, {len(tried)} plan{'s' if len(tried) > 1 else ''} tried"
        plan = result.plan
        self.aim, self.predicted = float(aim), float(result.predicted_ms)
        if self.target.macs is not None and pruner.plan_macs(plan) > aim_macs:
            plan = pruner.take_to_macs(scores, plan, aim_macs)
        if reporter is not None:
            reporter.info(f"step {k}: latency {current:.3f} ms at batch {self.target.batch_size} → aim {aim:.3f} ms, "
                          f"predicted {result.predicted_ms:.3f} ms ("
                          + (result.how or f"lookup table: {len(table)} layer timings, {table.measured} new; "
                                           f"calibration ×{model.scale:.3g}{timed_note}") + ")")
        return result.tau, plan
