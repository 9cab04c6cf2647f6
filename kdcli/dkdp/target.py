"""The target of a compress run, against the teacher's own figures: one object that answers
"met?", "what is unmet?" and "where should the next step aim?"."""

from __future__ import annotations

from dataclasses import dataclass

from kdcli.config.recipe import TargetSpec

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
    when not asked for), a latency in ms, and the accuracy budget measured from the teacher's
    validation accuracy (a fraction: 0.01 = one point)."""

    macs: float | None
    params: float | None
    latency_ms: float | None
    max_accuracy_drop: float
    teacher_macs: int
    teacher_params: int
    teacher_accuracy: float

    @classmethod
    def of(cls, spec: TargetSpec, teacher_macs: int, teacher_params: int, teacher_accuracy: float) -> "Target":
        return cls(absolute(spec.macs, teacher_macs), absolute(spec.params, teacher_params), spec.latency_ms,
                   spec.max_accuracy_drop, teacher_macs, teacher_params, teacher_accuracy)

    @property
    def asks_resources(self) -> bool:
        """Whether any resource (MACs, parameters, latency) is targeted: else there is nothing to prune for."""
        return self.macs is not None or self.params is not None or self.latency_ms is not None

    def met(self, macs: int, params: int, latency: float | None = None) -> bool:
        """Whether a student of these figures meets every resource target."""
        return ((self.macs is None or macs <= self.macs * SLACK)
                and (self.params is None or params <= self.params * SLACK)
                and (self.latency_ms is None or (latency is not None and latency <= self.latency_ms)))

    def unmet(self, macs: int, params: int, latency: float | None = None) -> str:
        """One line naming each resource target a student of these figures misses."""
        parts = []
        if self.macs is not None and macs > self.macs * SLACK:
            parts.append(f"MACs {macs / self.teacher_macs:.3f} of teacher > target {self.macs / self.teacher_macs:.3f}")
        if self.params is not None and params > self.params * SLACK:
            parts.append(f"params {params:,} > target {int(self.params):,}")
        if self.latency_ms is not None and (latency is None or latency > self.latency_ms):
            parts.append(f"latency {latency:.3f} ms > target {self.latency_ms} ms")
        return "target not met: " + "; ".join(parts)

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
