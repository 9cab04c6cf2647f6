"""Benchmark: the pruning-sensitivity scan of ``kdcli analyze`` against plain evaluations.

Runs :func:`kdcli.analyze.analysis.analyze` on a CIFAR ResNet-20 (random initialisation, or
``--checkpoint`` a kdcli model file) with the first 1,000 CIFAR-10 test images
(``test_batch_first1000.bin`` of ``../shared/data/cifar10``) and 9 ratios, and times the same
number of plain evaluations of the unpruned model on the same prepared batches in the same run,
interleaved group by group (so that drifting machine load hits both alike). The scan prunes
each group in place and restores it without tracing again, so each of its points should cost
about one evaluation: the target is ``scan / plain ≤ 1.3`` in wall time (CPU time of this
process is reported too: on a machine shared with other jobs it is the steadier figure). With ``--out``, the whole analysis
is run afterwards and its files written there (report.html, ...).

Prints JSON only::

    .venv/bin/python benchmarks/analyze_scan.py [--checkpoint FILE] [--out DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "data" / "cifar10"
# CIFAR-10 training-set channel statistics (the usual published values).
MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def cifar_first1000(folder: Path, samples: int):
    """The first ``samples`` test images as a DataBundle whose val split holds them. The file is
    read directly: records of one label byte and 3,072 pixel bytes (R, G, B planes of 32x32)."""
    from kdcli.data.loader import DataBundle, TensorData

    raw = torch.frombuffer(bytearray((folder / "test_batch_first1000.bin").read_bytes()), dtype=torch.uint8)
    rec = raw.view(-1, 1 + 3 * 32 * 32)[:samples]
    part = TensorData(rec[:, 1:].reshape(-1, 3, 32, 32).clone(), rec[:, 0].long())
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    return DataBundle(part, part, None, 10, (3, 32, 32), MEAN, STD, classes,
                      f"CIFAR-10 first {len(part)} test images", scale=1 / 255, eval_batch_size=500)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="a kdcli model file of a CIFAR ResNet (default: random resnet20)")
    ap.add_argument("--data", type=Path, default=CIFAR, help="folder holding test_batch_first1000.bin")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--ratios", type=int, default=9, help="ratios 0.1 ... 0.9 (n of them, evenly spaced)")
    ap.add_argument("--out", type=Path, help="also write the analysis files (report.html, ...) here")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from kdcli.analyze.analysis import analyze
    from kdcli.models import build_model
    from kdcli.config.recipe import AnalyzeSpec
    from kdcli.models.file import ModelInfo, load_model_any
    from kdcli.train.loop import evaluate, tensor_batches

    data = cifar_first1000(args.data, args.samples)
    torch.manual_seed(args.seed)
    if args.checkpoint:
        model, info = load_model_any(args.checkpoint, spec_name=None, spec_args=None, input_shape=data.input_shape,
                                     num_classes=10, base_dir=Path.cwd())
    else:
        model, info = build_model("resnet20", {}, input_shape=(3, 32, 32), num_classes=10), ModelInfo(
            "resnet20", {}, (3, 32, 32), 10)
    model.eval()
    ratios = [round((i + 1) / (args.ratios + 1), 4) for i in range(args.ratios)]
    settings = AnalyzeSpec(ratios=ratios, eval_samples=args.samples)

    from kdcli.prune.pruner import StructuredPruner, count_macs_params
    from kdcli.analyze.sensitivity import pruning_sensitivity

    device = torch.device("cpu")
    x, y = data.eval_tensors("val", device, limit=args.samples)
    batches = tensor_batches(x, y, data.eval_batch_size)  # prepared once, as analyze does
    example = torch.zeros(1, 3, 32, 32)
    t0 = time.perf_counter()
    pruner = StructuredPruner(model, example)  # the one trace of the scan
    scores = pruner.score()
    setup = time.perf_counter() - t0
    evaluate(model, batches)  # warm-up: first-call allocations are nobody's fault

    def plain(n: int) -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        for _ in range(n):
            evaluate(model, batches)
        return time.perf_counter() - t, time.process_time() - c

    # The scan one group at a time, each followed by as many plain evaluations: on a shared
    # machine the load drifts, and interleaving exposes both measurements to the same drift.
    scan_s = plain_s = scan_cpu = plain_cpu = 0.0
    curves = {}
    for g in pruner.groups:
        t, c = time.perf_counter(), time.process_time()
        curves.update(pruning_sensitivity(pruner, [g], scores, ratios,
                                          evaluate_fn=lambda: evaluate(model, batches, device)["accuracy"],
                                          macs_fn=lambda: count_macs_params(model, example)[0]))
        scan_s, scan_cpu = scan_s + time.perf_counter() - t, scan_cpu + time.process_time() - c
        w, c = plain(len(ratios))
        plain_s, plain_cpu = plain_s + w, plain_cpu + c
    points = sum(len(c) for c in curves.values())
    out = {"model": info.name, "checkpoint": str(args.checkpoint) if args.checkpoint else None,
           "samples": len(x), "groups": len(curves), "ratios": ratios, "points": points,
           "scan_seconds": round(scan_s, 3), "plain_eval_seconds": round(plain_s, 3),
           "ratio": round(scan_s / plain_s, 3), "within_1_3x": scan_s <= 1.3 * plain_s,
           "scan_cpu_seconds": round(scan_cpu, 3), "plain_eval_cpu_seconds": round(plain_cpu, 3),
           "cpu_ratio": round(scan_cpu / plain_cpu, 3),
           "trace_and_score_seconds": round(setup, 3),
           "baseline_accuracy": evaluate(model, batches)["accuracy"],
           "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.out is not None:  # the whole analysis, for its report (not part of the timing above)
        result = analyze(model, info, data, settings=settings, out_dir=args.out, seed=args.seed)
        out["analysis_timings"] = result["timings"]
        out["analysis_files"] = [str(args.out / f) for f in result["files"]]
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
