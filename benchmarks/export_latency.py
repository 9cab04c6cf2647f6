"""Does pruning half of a CIFAR ResNet-56's MACs buy a real onnxruntime speed-up?

Prunes the inner convolution of every residual block (``layerX.Y.conv1``; the residual channels stay,
see DESIGN.md on zero-padding shortcuts) with torch-pruning to about half the MACs, keeping channel
counts multiples of ``--round-to`` (8: odd counts cost latency on CPU), exports teacher and student
with kdcli.export.onnx, and times both in onnxruntime at one batch size, alternating, in two independent
repeats. Prints one JSON object:

- ``macs_ratio`` student/teacher, ``speedup`` teacher/student median latency (mean of the repeats),
- ``efficiency`` = speedup / (1 / macs_ratio): the share of the ideal speed-up obtained (floor 0.7),
- ``repeat_spread`` = |speedup₁ − speedup₂| / mean: how well the repeats agree (ceiling 0.10).

Random weights unless ``--checkpoint`` gives a state dict: latency does not depend on the values.
Run: ``.venv/bin/python benchmarks/export_latency.py [--checkpoint resnet56.pt] [--threads 2]`` (~1 min).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch_pruning as tp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kdcli.export.onnx import export_onnx, verify_onnx  # noqa: E402
from kdcli.prune.pruner import count_macs_params  # noqa: E402
from kdcli.export.latency import default_threads, measure_latency  # noqa: E402
from kdcli.models import build_model  # noqa: E402

EFFICIENCY_FLOOR = 0.7
REPEAT_SPREAD_CEILING = 0.10


def prune_inner_convs(model: torch.nn.Module, example: torch.Tensor, keep_fraction: float, round_to: int) -> list:
    """Keep the ``keep_fraction`` largest-L1 output channels (rounded up to ``round_to``) of every
    ``layerX.Y.conv1``; returns [(name, before, after)]."""
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    done = []
    for name, conv in list(model.named_modules()):
        if not (name.startswith("layer") and name.endswith(".conv1")):
            continue
        n = conv.out_channels
        keep = min(n, max(round_to, -(-int(round(n * keep_fraction)) // round_to) * round_to))
        order = conv.weight.detach().abs().sum(dim=(1, 2, 3)).argsort(descending=True)
        drop = sorted(order[keep:].tolist())
        if drop:
            dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=drop).prune()
        done.append((name, n, conv.out_channels))
    return done


def calibrate_bn(model: torch.nn.Module, batches: int = 4) -> None:
    """BatchNorm statistics from random inputs: without them a randomly initialised ResNet-56's
    activations grow block after block and its logits reach magnitudes no trained model has."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(32, 3, 32, 32))
    model.eval()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="ResNet-56 state dict (else random init)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (default 0: all cores)")
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--keep", type=float, default=0.5, help="fraction of each inner conv's channels kept")
    ap.add_argument("--budget", type=float, default=10.0, help="seconds of timed runs per repeat")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    teacher = build_model("resnet56", {}, input_shape=(3, 32, 32), num_classes=10)
    weights = "random init (latency does not depend on weight values)"
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
        teacher.load_state_dict(state)
        weights = str(args.checkpoint)
    else:
        calibrate_bn(teacher)
    teacher.eval()
    example = torch.randn(2, 3, 32, 32)
    student = build_model("resnet56", {}, input_shape=(3, 32, 32), num_classes=10)
    student.load_state_dict(teacher.state_dict())
    student.eval()
    pruned = prune_inner_convs(student, example[:1], args.keep, args.round_to)
    assert student(example).shape == (2, 10)  # pruned model still runs (DESIGN.md: check every pruned model)

    t_macs, t_params = count_macs_params(teacher, example[:1])
    s_macs, s_params = count_macs_params(student, example[:1])
    threads = args.threads or default_threads()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, model in (("teacher", teacher), ("student", student)):
            paths[name] = Path(tmp) / f"{name}.onnx"
            export_onnx(model, example, paths[name])
            verify_onnx(paths[name], model, torch.randn(8, 3, 32, 32))
        repeats = []
        for _ in range(2):
            t0 = time.perf_counter()
            lat = measure_latency(paths, (3, 32, 32), (args.batch,), time_budget_s=args.budget, threads=threads)
            t, s = lat["teacher"][args.batch], lat["student"][args.batch]
            repeats.append({"teacher_median_ms": round(t["median_ms"], 3), "student_median_ms": round(s["median_ms"], 3),
                            "speedup": round(t["median_ms"] / s["median_ms"], 4), "runs": s["runs"],
                            "seconds": round(time.perf_counter() - t0, 1)})
    ups = [r["speedup"] for r in repeats]
    speedup = sum(ups) / len(ups)
    macs_ratio = s_macs / t_macs
    efficiency = speedup * macs_ratio  # speedup / (1 / macs_ratio)
    spread = abs(ups[0] - ups[1]) / speedup
    result = {
        "benchmark": "export_latency", "model": "resnet56", "weights": weights,
        "pruned": "inner convs layerX.Y.conv1 by L1 magnitude", "round_to": args.round_to,
        "channels": {n: [a, b] for n, a, b in pruned[:: max(len(pruned) // 3, 1)]},
        "macs": {"teacher": t_macs, "student": s_macs}, "params": {"teacher": t_params, "student": s_params},
        "macs_ratio": round(macs_ratio, 4), "batch_size": args.batch, "threads": threads,
        "provider": "CPUExecutionProvider", "repeats": repeats, "speedup": round(speedup, 4),
        "ideal_speedup": round(1 / macs_ratio, 4), "efficiency": round(efficiency, 4),
        "efficiency_ok": efficiency >= EFFICIENCY_FLOOR, "repeat_spread": round(spread, 4),
        "repeats_agree": spread <= REPEAT_SPREAD_CEILING,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
