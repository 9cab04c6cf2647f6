"""The target of a compress run, against the teacher's own figures: one object that answers
"met?", "what is unmet?" and "where should the next step aim?".

Latency targets (``latency_ms``, ``speedup``) are judged on one number, the student's latency in
ms at the target's batch size. With a speed-up target it is measured against the teacher, timed
alternately with it, and expressed at the teacher's reference latency (``teacher_latency_ms``,
measured once when the run opens): ``teacher_latency_ms × student / teacher``, so that a machine
slowing down between measurements slows both alike and the verdict ``teacher_latency_ms /
latency ≥ speedup`` is the measured speed-up's."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from kdcli.config.recipe import TargetSpec
from kdcli.reports.compress import measured_speedups, primary_latency

# Resource comparisons allow this relative slack: MACs counted after pruning land on the aim up to
# rounding, and a target of "0.3 of the teacher" must not fail on the 7th digit.
SLACK = 1.0001


def absolute(value: float | None, reference: int) -> float | None:
    """A recipe figure as an absolute count: a fraction of ``reference`` when <= 1."""
    if value is None:
        return None
    return value * reference if value <= 1 else float(value)


@dataclass(frozen=True)
class Target:
    """``target:`` of a recipe resolved against the teacher: absolute MACs and parameters (None
    when not asked for), a latency in ms and a speed-up (at ``batch_size``), and the accuracy
    budget measured from the teacher's validation accuracy (a fraction: 0.01 = one point).
    ``teacher_latency_ms``: the teacher's onnxruntime latency at ``batch_size`` (with a speed-up
    target). ``allow_slower``: a student slower than its teacher is a warning, not a failure."""

    macs: float | None
    params: float | None
    latency_ms: float | None
    max_accuracy_drop: float
    teacher_macs: int
    teacher_params: int
    teacher_accuracy: float
    speedup: float | None = None
    batch_size: int = 1
    teacher_latency_ms: float | None = None
    allow_slower: bool = False

    @classmethod
    def of(cls, spec: TargetSpec, teacher_macs: int, teacher_params: int, teacher_accuracy: float, *,
           export_batch_sizes: Sequence[int] = (1, 64), teacher_latency_ms: float | None = None) -> "Target":
        """The target of ``spec``; ``teacher_latency_ms``: the teacher's reference latency at the
        target's batch size (:func:`kdcli.dkdp.speed.reference_latency_ms`), for a speed-up target."""
        bs = spec.resolved_batch_size(export_batch_sizes)
        return cls(absolute(spec.macs, teacher_macs), absolute(spec.params, teacher_params), spec.latency_ms,
                   spec.max_accuracy_drop, teacher_macs, teacher_params, teacher_accuracy, spec.speedup, bs,
                   teacher_latency_ms, spec.allow_slower)

    @property
    def asks_resources(self) -> bool:
        """Whether any resource (MACs, parameters, latency, speed-up) is targeted: else there is nothing to prune for."""
        return self.macs is not None or self.params is not None or self.asks_speed

    @property
    def asks_speed(self) -> bool:
        """Whether a latency or speed-up target is set: then the loop aims at latencies."""
        return self.latency_ms is not None or self.speedup is not None

    @property
    def latency_aim(self) -> float | None:
        """The latest latency (ms at ``batch_size``) that meets every latency target; None without one."""
        aims = [self.latency_ms] if self.latency_ms is not None else []
        if self.speedup is not None:
            if self.teacher_latency_ms is None:
                raise ValueError("a speed-up target needs the teacher's latency (teacher_latency_ms)")
            aims.append(self.teacher_latency_ms / self.speedup)
        return min(aims) if aims else None

    def measured_speedup(self, latency: float | None) -> float | None:
        """teacher / student for a student of ``latency`` (ms, in the target's terms)."""
        if latency is None or not self.teacher_latency_ms or latency <= 0:
            return None
        return self.teacher_latency_ms / latency

    def met(self, macs: int, params: int, latency: float | None = None) -> bool:
        """Whether a student of these figures meets every resource target (``latency``: ms at
        ``batch_size``, in the terms of the module docstring)."""
        return ((self.macs is None or macs <= self.macs * SLACK)
                and (self.params is None or params <= self.params * SLACK)
                and (not self.asks_speed or (latency is not None and latency <= self.latency_aim)))

    def unmet(self, macs: int, params: int, latency: float | None = None) -> str:
        """One line naming each resource target a student of these figures misses."""
        parts = []
        if self.macs is not None and macs > self.macs * SLACK:
            parts.append(f"MACs {macs / self.teacher_macs:.3f} of teacher > target {self.macs / self.teacher_macs:.3f}")
        if self.params is not None and params > self.params * SLACK:
            parts.append(f"params {params:,} > target {int(self.params):,}")
        at = f"at batch {self.batch_size}"
        if self.asks_speed and latency is None:
            parts.append(f"latency not measured {at}")
        else:
            if self.latency_ms is not None and latency > self.latency_ms:
                parts.append(f"latency {latency:.3f} ms {at} > target {self.latency_ms:g} ms")
            if self.speedup is not None and latency > self.teacher_latency_ms / self.speedup:
                parts.append(f"speed-up {self.measured_speedup(latency):.2f}x {at} < target {self.speedup:g}x "
                             f"(teacher {self.teacher_latency_ms:.3f} ms)")
        return "target not met: " + "; ".join(parts)

    def next_latency(self, current_ms: float, steps_left: int, aggressiveness: float) -> float:
        """The latency a step aims at: the geometric path of :meth:`next_macs` from ``current_ms`` to
        :attr:`latency_aim`; ``current_ms`` when already there."""
        aim = self.latency_aim
        if aim is None or current_ms <= aim:
            return current_ms
        exponent = min(1.0, aggressiveness / max(steps_left, 1))
        return max(aim, current_ms * (aim / current_ms) ** exponent)

    # --- judged on the export report -----------------------------------------------------------
    def export_latency_ms(self, export: dict | None) -> float | None:
        """The student's latency in the target's terms from the export report (the judge of a
        latency target): with a speed-up target ``teacher_latency_ms / measured speed-up`` at
        ``batch_size``, else the student's median there; None when it was not measured."""
        if self.speedup is not None and self.teacher_latency_ms:
            sp = measured_speedups(export).get(self.batch_size)
            return None if sp is None or sp[0] <= 0 else self.teacher_latency_ms / sp[0]
        stats = primary_latency(export).get("student", {}).get(str(self.batch_size))
        return float(stats["median_ms"]) if isinstance(stats, dict) and "median_ms" in stats else None

    def speed_failures(self, export: dict | None) -> list[str]:
        """A failure line when the export report measured the student slower than its teacher
        at some batch size beyond the measurement noise (:func:`slower_than_teacher`), unless
        ``allow_slower``; empty otherwise."""
        slow = slower_than_teacher(export)
        if not slow or self.allow_slower:
            return []
        return [slower_message(slow)]

    def drop(self, accuracy: float) -> float:
        """Accuracy lost against the teacher (a fraction)."""
        return self.teacher_accuracy - accuracy

    def failures(self, macs: int, params: int, latency: float | None, accuracy: float) -> list[str]:
        """The gate's verdict on a final student: one line per unmet target, empty when all hold."""
        out = [] if self.met(macs, params, latency) else [self.unmet(macs, params, latency)]
        if self.drop(accuracy) > self.max_accuracy_drop + 1e-12:
            out.append(f"accuracy drop {100 * self.drop(accuracy):.2f} pt > max_accuracy_drop "
                       f"{100 * self.max_accuracy_drop:.2f} pt")
        return out

    def next_macs(self, current: float, steps_left: int, aggressiveness: float) -> float:
        """The MACs a step aims at: a geometric path from ``current`` to the target,
        ``max(M*, M · (M*/M)^min(1, a/r))`` with r the steps left and a the aggressiveness; with
        no MACs target (parameters or latency only), a fixed cut of 0.7^a per step."""
        if self.macs is None:
            return current * (0.7 ** aggressiveness)
        if current <= self.macs:
            return current
        exponent = min(1.0, aggressiveness / max(steps_left, 1))
        return max(self.macs, current * (self.macs / current) ** exponent)


# A student counts as slower than its teacher at a batch size when its measured speed-up is below
# 1 by more than NOISE_K spreads: the spread of a speed-up T/S is (T/S)·√((s_T/T)² + (s_S/S)²),
# s the half interquartile range of each model's timed runs (both models' noise: more cautious
# than the baseline gates of kdcli.reports.gates, which count the student's alone, because a run
# fails on this without the user asking); without recorded quartiles, below 1 at all.
NOISE_K = 2.0


def slower_than_teacher(export: dict | None) -> list[tuple[int, float, float | None]]:
    """``[(batch size, speed-up, spread)]`` where the export report measured the student slower
    than the teacher beyond the noise (see ``NOISE_K``), on the primary provider."""
    out = []
    for bs, (sp, spread) in measured_speedups(export).items():
        if sp < 1.0 and (spread is None or not math.isfinite(spread) or 1.0 - sp > NOISE_K * spread):
            out.append((bs, sp, spread))
    return out


def slower_message(slow: list[tuple[int, float, float | None]]) -> str:
    """The one-line failure for :func:`slower_than_teacher`'s batch sizes."""
    what = ", ".join(f"{bs} (speed-up {sp:.2f}x" + (f" ± {s:.2f})" if s is not None else ")") for bs, sp, s in slow)
    return (f"the student is SLOWER than the teacher in onnxruntime at batch {what}: below 1 by more than "
            f"{NOISE_K:g} spreads (half the interquartile range of the timed runs, teacher and student "
            "combined); prune to hardware-friendly widths (prune.round_to 8 or 16), aim at speed "
            "(target.speedup), or set target.allow_slower: true if speed does not matter")
