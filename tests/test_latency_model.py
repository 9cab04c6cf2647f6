"""Latency-aware compression (issue #13): the latency lookup table (measured on demand, cached,
reused), predictions that follow the structure, plans that land under a latency aim ranked by
importance per millisecond saved, speed-up targets, and the rule that a student slower than its
teacher fails ``compress`` (exit 3) unless the recipe allows it. Timings are counted, never
compared with absolute values; the loop tests replace onnxruntime's clock by a deterministic one."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import kdcli.export.latency_model as LM
from kdcli.config.recipe import TargetSpec, builtin_recipe_path, parse_recipe
from kdcli.dkdp.target import Target, slower_than_teacher
from kdcli.errors import EXIT_BAD_INPUT, RecipeError
from kdcli.export.latency_model import LatencyModel, LatencyTable, LayerSig, layer_calls, plan_for_latency
from kdcli.prune.pruner import StructuredPruner

REPO = Path(__file__).resolve().parents[1]


class Tiny(nn.Module):
    """Conv-BN-ReLU, a strided conv, a depthwise conv, pooling and a linear head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(32, 48, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(48), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(48, 48, 3, padding=1, groups=48, bias=False), nn.BatchNorm2d(48), nn.ReLU())
        self.c3 = nn.Sequential(nn.Conv2d(48, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.c3(self.dw(self.c2(self.c1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def _tiny():
    torch.manual_seed(0)
    return Tiny().eval(), torch.zeros(1, 3, 8, 8)


def mac_clock(sig: LayerSig) -> float:
    """A deterministic stand-in for onnxruntime: time proportional to MACs, plus a constant."""
    return 1e-4 + sig.macs * 1e-6


# ----------------------------------------------------------------------------- the table


def test_signatures_follow_the_layers_and_the_batch():
    model, ex = _tiny()
    calls = layer_calls(model, ex)
    assert [c.name for c in calls] == ["c1.0", "c2.0", "dw.0", "c3.0", "fc"]
    assert [c.hw for c in calls] == [(8, 8), (8, 8), (4, 4), (4, 4), (1, 1)]
    mods = dict(model.named_modules())
    dw = calls[2].sig(mods["dw.0"], batch=16)
    assert (dw.op, dw.cin, dw.cout, dw.groups, dw.kernel, dw.stride, dw.batch) == ("conv", 48, 48, 48, (3, 3), (1, 1), 16)
    assert dw.key() == "conv k3x3 s1x1 p1x1 d1x1 g48 in4x4 c48>48 b16"
    assert calls[4].sig(mods["fc"], batch=2).key() == "linear t1 c64>10 bias1 b2"


def test_the_table_measures_each_signature_once_and_reuses_the_file(tmp_path):
    """Real onnxruntime timings: the first prediction times every distinct layer, the second
    none; a new table on the same file times none; other threads are another table."""
    model, ex = _tiny()
    path = tmp_path / "latency_lut.json"
    table = LatencyTable(path, threads=1, time_budget_s=0.0)
    lm = LatencyModel(model, ex, table, batch_size=4)
    first = lm.predict()
    assert first > 0 and table.measured == 5 == len(table)
    assert lm.predict() == first and table.measured == 5  # counted, not timed: nothing new
    table.save()
    obj = json.loads(path.read_text())
    key = LM.runtime_key(1)
    assert key.startswith("onnxruntime ") and "1 threads" in key and len(obj["tables"][key]) == 5
    again = LatencyTable(path, threads=1)
    assert LatencyModel(model, ex, again, batch_size=4).predict() == first and again.measured == 0  # resume
    other = LatencyTable(path, threads=2, timer=mac_clock)
    LatencyModel(model, ex, other, batch_size=4).predict()
    assert other.measured == 5  # another thread count: another table, measured anew
    other.save()
    assert set(json.loads(path.read_text())["tables"]) == {key, LM.runtime_key(2)}  # both kept


def test_a_narrower_plan_predicts_lower_latency_and_calibration_scales():
    model, ex = _tiny()
    p = StructuredPruner(model, ex, round_to=8)
    scores = p.score()
    lm = LatencyModel(model, ex, LatencyTable(None, timer=mac_clock), batch_size=16)
    full = lm.predict()
    preds = []
    for ratio in (0.25, 0.5, 0.75):
        with p.trial(p.plan_ratios({g: ratio for g in p.groups}, scores)):
            preds.append(lm.predict())
    assert full > preds[0] > preds[1] > preds[2]
    assert lm.calibrate(2 * lm.raw()) == pytest.approx(2.0) and lm.predict() == pytest.approx(2 * full)


# ----------------------------------------------------------------------------- plans


def test_plan_for_latency_lands_just_under_the_aim_in_round_to_blocks():
    model, ex = _tiny()
    p = StructuredPruner(model, ex, round_to=4)
    scores = p.score()
    lm = LatencyModel(model, ex, LatencyTable(None, timer=mac_clock), batch_size=16)
    lm.calibrate(3.0)
    res = plan_for_latency(p, scores, 1.5, lm)
    assert res.before_ms == pytest.approx(3.0) and res.plan and res.tau > 0
    assert res.predicted_ms <= 1.5 and res.predicted_ms >= 0.85 * 1.5  # under the aim, not far under it
    widths = p.group_channels()
    p.apply(res.plan)
    assert lm.predict() == pytest.approx(res.predicted_ms)  # the applied plan predicts what was said
    for g, idxs in res.plan.items():
        assert (widths[g] - len(idxs)) % 4 == 0 and widths[g] - len(idxs) >= 4


def test_importance_per_millisecond_decides_not_macs():
    """HALP's ranking: with a clock that charges the first conv a constant and the second conv by
    its output channels only, narrowing c1's group (c1's filters, c2's inputs) saves no time, so
    the plan leaves it whole, where the same aim on a clock that charges MACs cuts it too."""
    model, ex = _tiny()

    def clock(sig: LayerSig) -> float:
        if sig.cin == 3:
            return 1.0  # c1: the same time at any width
        if sig.stride == (2, 2):
            return mac_clock(replace(sig, cin=32))  # c2: by its output channels only
        return mac_clock(sig)

    plans = {}
    for name, timer in (("latency", clock), ("macs", mac_clock)):
        p = StructuredPruner(model, ex, round_to=8)
        lm = LatencyModel(model, ex, LatencyTable(None, timer=timer), batch_size=16)
        lm.calibrate(1.0)
        res = plan_for_latency(p, p.score(), 0.6, lm)
        assert res.predicted_ms <= 0.6
        plans[name] = res.plan
    assert "c1.0" not in plans["latency"] and plans["latency"]
    assert "c1.0" in plans["macs"]


class _Branches(nn.Module):
    """Two branches into one head: ``a`` a 3×3 conv the classifier reads, ``b`` a 1×1 conv it
    hardly reads (its weights in the head scaled by 1e-3)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(3, 16, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        return self.fc(y.mean(dim=(2, 3)))


def _whole_model_clock(monkeypatch, timer) -> Callable:
    """Whole-model timings (``measure_models``) replaced by a deterministic clock: the sum of
    ``timer`` over the model's conv/linear layers plus a constant."""

    def measure_models(models, input_shape, batch_size, threads=None, **_):
        measure_models.threads.append(threads)
        out = {}
        for name, m in models.items():
            lm = LatencyModel(m, torch.zeros(1, *input_shape), LatencyTable(None, timer=timer), batch_size)
            out[name] = {"median_ms": 0.01 + lm.raw(), "p25_ms": 0.0, "p75_ms": 0.0}
        return out

    measure_models.threads = []  # the thread count each measurement asked for

    monkeypatch.setattr(LM, "measure_models", measure_models)
    return measure_models


def _equal_branches(monkeypatch):
    """_Branches with two 3×3 branches of equal time, the head hardly reading b; whole-model
    timings by MACs. Returns (model, example input, score batches)."""
    torch.manual_seed(0)
    model = _Branches().eval()
    model.b = nn.Conv2d(3, 16, 3, padding=1)
    with torch.no_grad():
        model.fc.weight[:, 16:] *= 1e-3
    _whole_model_clock(monkeypatch, mac_clock)
    batches = [(torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.zeros(32, dtype=torch.long))]
    return model, torch.zeros(1, 3, 8, 8), batches


def test_the_measured_allocation_ranks_by_damage_per_millisecond_measured_in_context(monkeypatch):
    """allocation: sensitivity with a speed target. The whole model, timed, costs the 1×1
    branch b the same at any width (a layer table charging by MACs would say cutting it saves
    time): the plan follows the whole-model timings and cuts the 3×3 branch a (the one the output reads), leaving b
    whole; the same allocation for a MACs aim cuts b first (the least damage per MAC). The plan
    lands under the latency aim, and under a MACs aim given beside it."""
    from kdcli.dkdp.compress import _Sensitivity
    from kdcli.prune.pruner import count_macs_params

    torch.manual_seed(0)
    model = _Branches().eval()
    with torch.no_grad():
        model.fc.weight[:, 16:] *= 1e-3
    ex = torch.zeros(1, 3, 8, 8)
    whole = _whole_model_clock(monkeypatch, lambda sig: 1.0 if sig.op == "conv" and sig.kernel == (1, 1)
                               else mac_clock(sig))
    batches = [(torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.zeros(32, dtype=torch.long))]
    ratios = [0.125 * i for i in range(1, 8)]
    total = count_macs_params(model, ex)[0]

    p = StructuredPruner(model, ex)
    _, by_macs = _Sensitivity(p, p.score(), model, batches, ratios).for_macs(0.95 * total)
    assert len(by_macs.get("b", [])) >= 4 and not by_macs.get("a"), by_macs

    p = StructuredPruner(model, ex)
    now = whole({"m": model}, (3, 8, 8), 16)["m"]["median_ms"]
    a_ms = LatencyModel(model, ex, LatencyTable(None, timer=mac_clock), 16).layer_ms(layer_calls(model, ex)[0])
    aim = 10.0 * (1 - 0.3 * a_ms / now)  # 30 % of the 3×3 branch's share of the time
    res = _Sensitivity(p, p.score(), model, batches, ratios).by_damage_per_ms(10.0, aim, None, 16)
    assert res.predicted_ms <= aim and res.aim_ms == aim and res.before_ms == pytest.approx(10.0)
    assert res.plan.get("a") and not res.plan.get("b"), res.plan
    assert res.measured > 0 and "whole-model timings" in res.how

    p = StructuredPruner(model, ex)  # a MACs aim beside the latency aim: both hold
    res = _Sensitivity(p, p.score(), model, batches, ratios).by_damage_per_ms(10.0, 9.99, 0.6 * total, 16)
    assert res.predicted_ms <= 9.99 and p.plan_macs(res.plan) <= 0.6 * total
    assert count_macs_params(model, ex)[0] == total  # the model is left as it was


def test_the_measured_allocation_bisects_its_macs_aim_on_whole_model_timings(monkeypatch):
    """by_damage_per_mac: the damage-per-MAC plan for the largest MACs aim whose plan, timed
    whole, runs under the latency aim: it lands under the aim and near it (a bisection of the
    MACs, not the first guess), within BISECTIONS timings, and under a MACs aim given beside it."""
    from kdcli.dkdp.compress import _Sensitivity
    from kdcli.dkdp.speed import BISECTIONS
    from kdcli.prune.pruner import count_macs_params

    model, ex, batches = _equal_branches(monkeypatch)
    measure = LM.measure_models  # the whole-model clock _equal_branches put in place
    ratios = [0.125 * i for i in range(1, 8)]
    total = count_macs_params(model, ex)[0]
    now = measure({"m": model}, (3, 8, 8), 16)["m"]["median_ms"]
    for aim in (0.8 * now, 0.55 * now):
        p = StructuredPruner(model, ex)
        res = _Sensitivity(p, p.score(), model, batches, ratios).by_damage_per_mac(now, aim, None, 16)
        assert res.predicted_ms <= aim, (res.predicted_ms, aim)
        # the least cut under the aim: one channel (of either branch) back would time over it
        assert res.predicted_ms >= aim - 0.1 * now, (res.predicted_ms, aim)
        assert 1 <= res.measured <= BISECTIONS and res.how.startswith("damage per MAC")
    p = StructuredPruner(model, ex)
    res = _Sensitivity(p, p.score(), model, batches, ratios).by_damage_per_mac(now, 0.9 * now, 0.5 * total, 16)
    assert p.plan_macs(res.plan) <= 0.5 * total and res.predicted_ms <= 0.9 * now
    assert count_macs_params(model, ex)[0] == total  # the model is left as it was


def test_under_a_speed_aim_the_candidate_that_shifts_the_outputs_less_is_kept(monkeypatch):
    """for_latency times two plans whole, damage per millisecond and damage per MAC, and keeps
    the one whose combined plan shifts the outputs less among those under the aim: here each
    candidate in turn is made the one that cuts the branch the head reads, and the other wins;
    a candidate over the aim loses to one under it however little it shifts the outputs."""
    import kdcli.dkdp.compress as C
    from kdcli.export.latency_model import LatencyPlan

    model, ex, batches = _equal_branches(monkeypatch)
    cut = {"a": list(range(12)), "b": list(range(12))}

    def fixed(group: str, ms: float, how: str):
        return lambda self, now, aim, *a, **k: LatencyPlan({group: cut[group]}, 0.0, now, ms, aim, 3, f"{how}: fixed")

    for bad, good in (("by_damage_per_ms", "by_damage_per_mac"), ("by_damage_per_mac", "by_damage_per_ms")):
        monkeypatch.setattr(C._Sensitivity, bad, fixed("a", 0.5, bad))
        monkeypatch.setattr(C._Sensitivity, good, fixed("b", 0.5, good))
        p = StructuredPruner(model, ex)
        res = C._Sensitivity(p, p.score(), model, batches, [0.5]).for_latency(1.0, 0.6, None, 16)
        assert res.plan == {"b": cut["b"]} and res.how.startswith(good) and res.measured == 6, res.how
        assert f"by {bad}" in res.how and "output KL" in res.how
        # the less damaging candidate times over the aim: the other is kept
        monkeypatch.setattr(C._Sensitivity, good, fixed("b", 0.7, good))
        res = C._Sensitivity(p, p.score(), model, batches, [0.5]).for_latency(1.0, 0.6, None, 16)
        assert res.plan == {"a": cut["a"]}, res.how


def test_under_a_latency_aim_measured_damage_decides_not_magnitude(monkeypatch):
    """Two 3×3 branches of equal time; the head hardly reads b. HALP's plan (magnitude per
    millisecond, no group cut far below the aim's ratio first) cuts both; the measured
    allocation (damage per millisecond) cuts only b. Both land under the aim."""
    from kdcli.dkdp.compress import _Sensitivity

    model, ex, batches = _equal_branches(monkeypatch)
    plans = {}
    for how in ("halp", "measured"):
        p = StructuredPruner(model, ex)
        lm = LatencyModel(model, ex, LatencyTable(None, timer=mac_clock), batch_size=16)
        lm.calibrate(1.0)
        res = (plan_for_latency(p, p.score(), 0.8, lm) if how == "halp"
               else _Sensitivity(p, p.score(), model, batches, [0.125 * i for i in range(1, 8)]).by_damage_per_ms(1.0, 0.8, None, 16))
        assert res.predicted_ms <= 0.8
        plans[how] = res.plan
    assert plans["halp"].get("a") and plans["halp"].get("b"), plans
    assert plans["measured"].get("b") and not plans["measured"].get("a"), plans


def test_a_table_plan_that_times_over_its_aim_is_planned_again(tmp_path, monkeypatch):
    """HALP's plan on the layer table, timed whole: where the whole model runs widths off a
    block of 16 at 1.5 times what the table says (a runtime's layout conversions), the plan
    misses the aim; the step plans again for an aim corrected by the table's error, and the
    plan it returns times under the aim. Without the corrections it does not."""
    import kdcli.dkdp.speed as S

    def whole(sig: LayerSig) -> float:
        return mac_clock(sig) * (1.5 if sig.op == "conv" and sig.cout % 16 else 1.0)

    measure = _whole_model_clock(monkeypatch, whole)
    monkeypatch.setattr(LM, "time_layer", lambda sig, **_: mac_clock(sig))
    timed = {}
    for corrections in (0, S.CORRECTIONS):
        monkeypatch.setattr(S, "CORRECTIONS", corrections)
        teacher, ex = _tiny()
        student = _tiny()[0]
        t_ms = measure({"t": teacher}, (3, 8, 8), 16)["t"]["median_ms"]
        target = Target.of(TargetSpec(speedup=1.6, batch_size=16), teacher_macs=1, teacher_params=1,
                           teacher_accuracy=0.9, teacher_latency_ms=t_ms)
        step = S.SpeedStep(target, tmp_path / str(corrections), teacher, (3, 8, 8), 1, 1.0, last=True)
        (tmp_path / str(corrections)).mkdir()
        p = StructuredPruner(student, ex, round_to=8)
        _, plan = step.plan(p, p.score(), aim_macs=float("inf"))
        p.apply(plan)
        timed[corrections] = measure({"s": student}, (3, 8, 8), 16)["s"]["median_ms"]
        assert step.predicted == pytest.approx(timed[corrections])  # what the step records is the timing
    assert timed[0] > step.aim  # the table alone promised too much
    assert timed[S.CORRECTIONS] <= step.aim


# ----------------------------------------------------------------------------- the target


def test_speedup_target_met_and_unmet_lines():
    t = Target.of(TargetSpec(speedup=2), teacher_macs=1000, teacher_params=10, teacher_accuracy=0.9,
                  export_batch_sizes=(1, 16), teacher_latency_ms=10.0)
    assert t.batch_size == 16 and t.asks_speed and t.asks_resources and t.latency_aim == pytest.approx(5.0)
    assert t.met(1000, 10, 4.9) and t.met(1000, 10, 5.0)
    assert not t.met(1000, 10, 6.25) and not t.met(1000, 10, None)
    assert t.unmet(1000, 10, 6.25) == ("target not met: speed-up 1.60x at batch 16 < target 2x "
                                       "(teacher 10.000 ms)")
    assert t.unmet(1000, 10, None) == "target not met: latency not measured at batch 16"
    assert t.failures(1000, 10, 4.0, 0.9) == []
    # each step aims at a latency on the geometric path: two steps left, halfway on the log scale
    assert t.next_latency(10.0, steps_left=2, aggressiveness=1.0) == pytest.approx(10 / 2 ** 0.5)
    assert t.next_latency(4.0, steps_left=2, aggressiveness=1.0) == 4.0
    lat = Target.of(TargetSpec(latency_ms=3), 1000, 10, 0.9, export_batch_sizes=(1, 64))
    assert lat.batch_size == 1 and lat.latency_aim == 3  # a bare latency_ms: batch 1, as the gate
    assert lat.unmet(1000, 10, 3.5) == "target not met: latency 3.500 ms at batch 1 > target 3 ms"
    both = Target.of(TargetSpec(latency_ms=3, speedup=2, batch_size=8), 1000, 10, 0.9, teacher_latency_ms=8.0)
    assert both.batch_size == 8 and both.latency_aim == 3  # the stricter of 3 ms and 8 / 2
    assert not Target.of(TargetSpec(), 10, 10, 0.5).asks_resources


def _export(t_ms: dict, s_ms: dict, spread: float | None = 0.01) -> dict:
    """A minimal export report (the part the speed rules read): medians per batch size, quartiles
    at ± ``spread`` of the median (none when None)."""
    def stats(ms):
        d = {"median_ms": ms}
        if spread is not None:
            d.update(p25_ms=ms * (1 - spread), p75_ms=ms * (1 + spread))
        return d
    tab = {"teacher": {str(b): stats(v) for b, v in t_ms.items()}, "student": {str(b): stats(v) for b, v in s_ms.items()}}
    return {"latency": {"primary_provider": "CPUExecutionProvider", "onnxruntime": {"CPUExecutionProvider": tab}}}


def test_a_slower_student_fails_beyond_the_noise_unless_allowed():
    slow = _export({1: 1.0, 16: 10.0}, {1: 0.6, 16: 16.5})
    assert [(bs, round(sp, 3)) for bs, sp, _ in slower_than_teacher(slow)] == [(16, 0.606)]
    t = Target.of(TargetSpec(macs=0.5), 1000, 10, 0.9)
    (line,) = t.speed_failures(slow)
    assert "SLOWER" in line and "batch 16 (speed-up 0.61x" in line and "2 spreads" in line
    assert "target.allow_slower" in line
    allowed = Target.of(TargetSpec(macs=0.5, allow_slower=True), 1000, 10, 0.9)
    assert allowed.speed_failures(slow) == []
    # within the noise: 0.97x with quartiles 5 % wide on each side is not a slower student
    assert t.speed_failures(_export({16: 10.0}, {16: 10.3}, spread=0.05)) == []
    assert t.speed_failures(_export({16: 10.0}, {16: 10.3}, spread=None)) != []  # no spread recorded: plainly
    assert t.speed_failures(None) == [] and t.speed_failures(_export({1: 1.0}, {1: 0.5})) == []


def test_the_export_report_judges_a_speed_target():
    t = Target.of(TargetSpec(speedup=2), 1000, 10, 0.9, export_batch_sizes=(1, 16), teacher_latency_ms=10.0)
    assert t.export_latency_ms(_export({16: 8.0}, {16: 4.0})) == pytest.approx(5.0)  # 2x: 10 / 2
    assert t.failures(1000, 10, t.export_latency_ms(_export({16: 8.0}, {16: 5.0})), 0.9) != []
    lat = Target.of(TargetSpec(latency_ms=3), 1000, 10, 0.9)
    assert lat.export_latency_ms(_export({1: 8.0}, {1: 2.5})) == 2.5
    assert lat.export_latency_ms(None) is None


def test_the_loop_reads_latency_at_the_slow_end_of_its_noise(monkeypatch):
    """The loop stops only once a speed target holds by more than the measurement's noise (the
    export report, measured afresh, judges the run): median × (1 + relative spread), at most +10 %."""
    from kdcli.dkdp.speed import student_latency_ms

    stats = {"teacher": {"median_ms": 10.0, "p25_ms": 9.9, "p75_ms": 10.1},
             "student": {"median_ms": 5.0, "p25_ms": 4.9, "p75_ms": 5.1}}
    monkeypatch.setattr(LM, "measure_models", lambda models, *a, **k: {m: stats[m] for m in models})
    t = Target.of(TargetSpec(speedup=2), 1000, 10, 0.9, teacher_latency_ms=20.0)
    lat = student_latency_ms(None, None, t, (3, 8, 8))  # 2x by the medians, 20 ms × 0.5 × (1 + √(0.01² + 0.02²))
    assert lat == pytest.approx(10.0 * (1 + (0.01 ** 2 + 0.02 ** 2) ** 0.5)) and not t.met(1000, 10, lat)
    alone = Target.of(TargetSpec(latency_ms=6), 1000, 10, 0.9)
    assert student_latency_ms(None, None, alone, (3, 8, 8)) == pytest.approx(5.0 * 1.02)
    stats["student"] = {"median_ms": 5.0, "p25_ms": 3.0, "p75_ms": 7.0}  # ± 40 %: capped at + 10 %
    assert student_latency_ms(None, None, alone, (3, 8, 8)) == pytest.approx(5.5)


# ----------------------------------------------------------------------------- the recipe


@pytest.mark.parametrize("target, message", [
    ("{batch_size: 16}", r"^r\.yaml:3: target\.batch_size: the batch size of a speedup or latency_ms target"),
    ("{speedup: 2, allow_slower: true}", r"^r\.yaml:3: target\.allow_slower: contradicts speedup 2"),
    ("{speedup: 0.5}", r"^r\.yaml:3: target\.speedup: Input should be greater than or equal to 1"),
    ("{speedup: 2, latency_ms: 5}", r"^r\.yaml:3: target\.batch_size: required with both speedup and latency_ms"),
    ("{batch_size: 0, speedup: 2}", r"^r\.yaml:3: target\.batch_size: Input should be greater than or equal to 1"),
    ("{allow_slower: maybe}", r"^r\.yaml:3: target\.allow_slower: Input should be a valid boolean"),
])
def test_speed_target_errors_are_one_line_naming_the_field(target, message):
    with pytest.raises(RecipeError, match=message) as info:
        parse_recipe(f"teacher:\n  model: mlp\ntarget: {target}\n", "r.yaml")
    assert info.value.exit_code == EXIT_BAD_INPUT and "\n" not in str(info.value)


def test_speed_target_defaults():
    r = parse_recipe("teacher:\n  model: mlp\ntarget: {speedup: 2}\nexport: {batch_sizes: [1, 16]}\n", "r.yaml")
    assert r.target.resolved_batch_size(r.export.batch_sizes) == 16 and r.target.allow_slower is False
    assert r.prune.round_to == 8  # hardware-friendly widths by default
    assert parse_recipe("teacher:\n  model: mlp\nprune: {round_to: 1}\n", "r.yaml").prune.round_to == 1


# ----------------------------------------------------------------------------- the loop


def _fake_clocks(monkeypatch, slow_export: bool = False):
    """onnxruntime replaced by deterministic clocks: a layer costs its MACs (mac_clock), a whole
    model the sum over its conv/linear layers plus a constant; with ``slow_export`` the export
    report times the student at twice the teacher."""
    import kdcli.export.onnx as E

    measure = _whole_model_clock(monkeypatch, mac_clock)
    monkeypatch.setattr(LM, "time_layer", lambda sig, **_: mac_clock(sig))
    if slow_export:
        real = E.measure_latency

        def measure_latency(models, *args, **kwargs):
            lat = real(models, *args, **kwargs)
            for bs, s in lat["student"].items():
                f = 2 * lat["teacher"][bs]["median_ms"] / s["median_ms"]
                t = lat["teacher"][bs]
                lat["student"][bs] = {**s, **{k: t[k] * 2 for k in t if k.endswith("_ms")},
                                      "throughput": s["throughput"] / f}
            return lat

        monkeypatch.setattr(E, "measure_latency", measure_latency)
    return measure


FAST = ["teacher.train.epochs=6", "distill.train.epochs=1", "prune.final_epochs=0", "device=cpu",
        "target.max_accuracy_drop=0.5"]


def test_a_speedup_target_drives_the_loop_on_the_lookup_table(tmp_path, monkeypatch):
    import kdcli.dkdp.compress as C

    measure = _fake_clocks(monkeypatch)
    recipe, run_dir = C.start_run(builtin_recipe_path("quickstart"), out_dir=tmp_path / "run",
                                  overrides=[*FAST, "export.enabled=false", "target.macs=null", "target.speedup=2",
                                             "export.batch_sizes=[1, 16]", "prune.steps=2", "export.threads=1"])
    infos = []

    class Rec:
        def __getattr__(self, name):
            return lambda *a, **k: infos.append(" ".join(map(str, a))) if name in ("info", "warn") else None

    res = C.compress(recipe, run_dir, device=torch.device("cpu"), reporter=Rec())
    assert res.target_met and not res.gate_failures, res.gate_failures
    kept = [r for r in res.steps if r["accepted"]]
    assert kept and all(r["latency_ms"] is not None for r in kept)
    assert any("aim" in line and "at batch 16" in line and "lookup table" in line for line in infos)
    # each step records what it aimed at and what the table predicted, below the latency it started from
    aimed = [r for r in res.steps if r["latency_aim_ms"] is not None]
    assert aimed and all(0 < r["predicted_latency_ms"] and r["latency_aim_ms"] > 0 for r in aimed)
    first = aimed[0]
    assert all(r["predicted_latency_ms"] <= 1.05 * r["latency_aim_ms"] for r in aimed)  # plans land under their aim
    md = (run_dir / "compress_report.md").read_text()
    assert "latency ms" in md and f"aim {first['latency_aim_ms']:.3g}" in md
    table = json.loads((run_dir / "latency_lut.json").read_text())["tables"]
    (entries,) = table.values()
    assert entries and all(k.endswith(" b16") for k in entries)  # measured at the target's batch size
    assert res.student["macs"] < res.teacher["macs"]
    # every measurement of the loop at export.threads, as the export report that judges the run
    assert measure.threads and set(measure.threads) == {1}
    assert all(key.endswith("; 1 threads") for key in table), list(table)


def test_a_speed_target_with_the_measured_allocation_plans_on_measured_damage(tmp_path, monkeypatch):
    """allocation: sensitivity beside a speed-up and a MACs target: every step's plan is the
    measured allocation's latency plan (for_latency, not HALP's), and the run meets both targets."""
    import kdcli.dkdp.compress as C

    _fake_clocks(monkeypatch)
    calls = []
    real = C._Sensitivity.for_latency

    def spy(self, now_ms, aim_ms, aim_macs, *args):
        res = real(self, now_ms, aim_ms, aim_macs, *args)
        calls.append((aim_ms, aim_macs, res.predicted_ms))
        return res

    monkeypatch.setattr(C._Sensitivity, "for_latency", spy)
    import kdcli.dkdp.speed as S
    monkeypatch.setattr(S, "plan_for_latency", lambda *a, **k: pytest.fail("HALP's plan was used"))
    recipe, run_dir = C.start_run(builtin_recipe_path("quickstart"), out_dir=tmp_path / "run",
                                  overrides=[*FAST, "export.enabled=false", "target.macs=0.6", "target.speedup=2",
                                             "export.batch_sizes=[1, 16]", "prune.steps=2", "prune.allocation=sensitivity"])
    res = C.compress(recipe, run_dir, device=torch.device("cpu"), reporter=None)
    assert calls and all(pred <= aim for aim, _, pred in calls), calls
    assert all(macs is not None for _, macs, _ in calls)  # the MACs aim rides along
    assert res.target_met, res.gate_failures
    assert res.student["macs"] <= 0.6 * res.teacher["macs"] * 1.0001


def test_compress_exits_3_on_a_slower_student_and_writes_the_reports_first(tmp_path, monkeypatch):
    from kdcli.cli import app

    _fake_clocks(monkeypatch, slow_export=True)
    runner = CliRunner()
    base = [str(builtin_recipe_path("quickstart")), "--threads", "1", "--json"]
    sets = [x for s in [*FAST, "prune.steps=1", "export.latency_budget_s=0.05", "export.batch_sizes=[1, 4]"]
            for x in ("--set", s)]
    res = runner.invoke(app, ["compress", *base, "--out", str(tmp_path / "slow"), *sets], catch_exceptions=False)
    assert res.exit_code == 3, res.output
    assert "SLOWER" in res.output and "target.allow_slower" in res.output
    report = json.loads((tmp_path / "slow" / "compress_report.json").read_text())
    assert any("SLOWER" in f for f in report["gate_failures"])
    teacher = tmp_path / "slow" / "teacher.kdc"
    res = runner.invoke(app, ["compress", *base, "--out", str(tmp_path / "allowed"), *sets,
                              "--set", f"teacher.checkpoint={teacher}", "--set", "target.allow_slower=true"],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "allowed" / "compress_report.json").read_text())["gate_failures"] == []
