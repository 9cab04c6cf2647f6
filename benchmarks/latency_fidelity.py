"""How well the latency lookup table predicts a pruned student's onnxruntime latency, and what
the plans chosen for a speed-up aim actually run at (#12).

On the public CIFAR ResNet-20 checkpoint (``../shared/data/pretrained``), this machine's
onnxruntime (CPU, ``--threads``, batch ``--batch``), several plans are made on the same scores:

- ``uniform-R``: every group cut by R (channel magnitude, ``round_to`` 8);
- ``macs-sensitivity``: ``prune.allocation: sensitivity`` for 0.5 of the MACs (damage per MAC);
- ``macs-sensitivity-round16``: the same with ``round_to`` 16 (every width on onnxruntime's
  AVX-512 channel block; on ResNet-20 it stops at 0.58 of the MACs, every group at its smallest);
- ``table``: HALP's greedy on the layer table for the speed-up aim (``--speedup``), no correction;
- ``table-corrected``: the same, timed whole and planned again where it missed (what a step of
  ``compress`` with a speed target and the global or uniform allocation does now);
- ``measured``: the measured allocation for the same aim (what ``allocation: sensitivity``
  with a speed target does now): of the two plans below, both timed whole, the one with the
  smaller output KL among those under the aim;
- ``measured-per-ms``: damage per millisecond, each candidate step timed whole (the greedy);
- ``measured-per-mac``: damage per MAC, its MACs aim bisected on whole-model timings.

For each: the MACs ratio, the speed-up the table predicts (calibrated on the unpruned model, as a
step calibrates on the student it starts from) and the speed-up timed (the model exported whole,
alternating with the teacher, median of ``--repeats`` measurements of ``--budget`` seconds, with
the spread of the repeats). The table's error is timed / predicted − 1. The damage columns are the
output KL on 256 training images (what the measured allocation minimises), not accuracy.

    python benchmarks/latency_fidelity.py            # about 4 minutes on one thread

Prints one JSON object; progress on stderr. Nothing is cached.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._common import DATA, emit, load_average, log, setup_threads  # noqa: E402
from benchmarks.pretrained_cifar import MEAN, STD, load_pretrained  # noqa: E402


def _images(n: int) -> torch.Tensor:
    from kdcli.data.sources import read_cifar10_bin

    x = read_cifar10_bin([DATA / "cifar10" / "data_batch_1.bin"]).x[:n].float() / 255.0
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet20", choices=["resnet20", "resnet56"])
    ap.add_argument("--speedup", type=float, default=1.6, help="the speed-up aim of the table and measured plans")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=float, default=1.0, help="seconds per timing")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    threads = setup_threads(args.threads)

    import kdcli.dkdp.speed as S
    from kdcli.dkdp.compress import _Sensitivity
    from kdcli.export import latency_model as LM
    from kdcli.export.latency_model import LatencyModel, LatencyTable, plan_for_latency
    from kdcli.prune.pruner import StructuredPruner, count_macs_params

    t_start = time.perf_counter()
    teacher = load_pretrained(args.model)
    ex = torch.zeros(1, 3, 32, 32)
    x = _images(256)
    batches = [(x[:128], None), (x[128:], None)]
    with torch.no_grad():
        ref = torch.log_softmax(teacher(x), dim=1)
    total = count_macs_params(teacher, ex)[0]

    def timed_speedup(model) -> tuple[float, float]:
        runs = []
        for _ in range(args.repeats):
            LM._MEASURED.clear()
            lat = LM.measure_models({"t": teacher, "s": model}, (3, 32, 32), args.batch, threads=threads,
                                    time_budget_s=args.budget)
            runs.append(lat["t"]["median_ms"] / lat["s"]["median_ms"])
        return statistics.median(runs), (max(runs) - min(runs)) / 2

    t_ms = LM.measure_models({"t": teacher}, (3, 32, 32), args.batch, threads=threads, time_budget_s=2.0)["t"]["median_ms"]
    aim = t_ms / args.speedup * (1 - S.MARGIN)

    def fresh(round_to: int = 8):
        student = copy.deepcopy(teacher)
        p = StructuredPruner(student, ex, importance="magnitude", round_to=round_to)
        lm = LatencyModel(student, ex, LatencyTable(None, threads=threads), args.batch)
        lm.calibrate(t_ms)
        return student, p, p.score(), lm

    plans = {}
    for r in (0.25, 0.5):
        student, p, scores, lm = fresh()
        plans[f"uniform-{r}"] = (student, p, lm, p.plan_ratios({g: r for g in p.groups}, scores))
    student, p, scores, lm = fresh()
    plans["macs-sensitivity"] = (student, p, lm, _Sensitivity(p, scores, student, batches, [0.25, 0.5, 0.75]).for_macs(0.5 * total)[1])
    student, p, scores, lm = fresh(round_to=16)
    plans["macs-sensitivity-round16"] = (student, p, lm, _Sensitivity(p, scores, student, batches,
                                                                      [0.25, 0.5, 0.75]).for_macs(0.5 * total)[1])
    student, p, scores, lm = fresh()
    plans["table"] = (student, p, lm, plan_for_latency(p, scores, aim, lm).plan)
    student, p, scores, lm = fresh()
    with tempfile.TemporaryDirectory() as run_dir:  # the step's lookup-table file lives in a run directory
        step = S.SpeedStep(_target(args, t_ms), Path(run_dir), teacher, (3, 32, 32), 1, 1.0, last=True,
                           threads=threads)
        plans["table-corrected"] = (student, p, lm, step.plan(p, scores, aim_macs=float("inf"))[1])
    for name, how in (("measured", "for_latency"), ("measured-per-ms", "by_damage_per_ms"),
                      ("measured-per-mac", "by_damage_per_mac")):
        student, p, scores, lm = fresh()
        measured = _Sensitivity(p, scores, student, batches, [0.25, 0.5, 0.75])
        plans[name] = (student, p, lm, getattr(measured, how)(t_ms, aim, None, args.batch, threads).plan)

    rows = {}
    for name, (student, p, lm, plan) in plans.items():
        with p.trial(plan, check=False):
            predicted = t_ms / lm.predict()
        p.apply(plan)
        with torch.no_grad():
            out = torch.log_softmax(student(x), dim=1)
        damage = float(torch.nn.functional.kl_div(out, ref, log_target=True, reduction="batchmean"))
        timed, spread = timed_speedup(student)
        rows[name] = {"macs_ratio": round(count_macs_params(student, ex)[0] / total, 4),
                      "predicted_speedup": round(predicted, 3), "timed_speedup": round(timed, 3),
                      "timed_spread": round(spread, 3), "table_error": round(predicted / timed - 1, 3),
                      "output_kl": round(damage, 4),
                      "widths": {n: m.out_channels for n, m in student.named_modules()
                                 if isinstance(m, torch.nn.Conv2d)}}
        log.info(f"{name}: MACs {rows[name]['macs_ratio']}, table {predicted:.2f}x, timed {timed:.2f}x "
                 f"(±{spread:.2f}), KL {damage:.3f}")
    emit({"benchmark": "latency_fidelity", "issue": 12, "model": args.model, "batch": args.batch,
          "threads": threads, "speedup_aim": args.speedup, "teacher_ms": round(t_ms, 3),
          "time_budget_s": args.budget, "repeats": args.repeats, "rows": rows,
          "wall_seconds": round(time.perf_counter() - t_start, 1), "load_average": load_average()})


def _target(args, t_ms: float):
    from kdcli.config.recipe import TargetSpec
    from kdcli.dkdp.target import Target

    return Target.of(TargetSpec(speedup=args.speedup, batch_size=args.batch), teacher_macs=1, teacher_params=1,
                     teacher_accuracy=1.0, teacher_latency_ms=t_ms)


if __name__ == "__main__":
    main()
