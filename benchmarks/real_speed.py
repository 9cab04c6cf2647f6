"""Real speed-up on the hardware (issue #13): does ``kdcli compress`` make common networks faster in
onnxruntime, and never slower? Prints one JSON object.

For a ResNet-18-, a MobileNetV2- and a small ViT-style network of the zoo (``resnet18``,
``mobilenet_v2``, ``vit``; 32×32 and 224×224 inputs, 10 classes), random weights with BatchNorm
statistics calibrated on random inputs (speed does not depend on the values), ``kdcli compress``
runs twice: with ``target.macs: 0.5`` and with ``target.speedup: 2``, each on a recipe as a
user would write it (no ``prune.round_to``: the default), with no distillation (0 epochs: there
is nothing to learn from random data) and an accuracy budget that lets every step stand. Data:
random tensors from a Python source (this file's :func:`random_data`). Each run reports:

- ``macs_ratio`` (student / teacher) and ``ideal`` = 1 / macs_ratio;
- ``speedup``: teacher / student median onnxruntime latency at batch 1 and 16, from the exported
  ONNX files, timed alternately (t, s, t, s …) in ``repeats`` independent repeats: the median of
  the repeats' speed-ups, ``spread`` (half their range) and each repeat's own noise (``iqr``: the
  spread of one repeat's speed-up from the interquartile ranges of its timed runs);
- ``efficiency@16`` = speed-up at 16 / ideal; the run's own verdict (``target_met``,
  ``gate_failures``: a student slower than its teacher fails compress with exit 3).

Floors (issue #13): with the default recipe no student is slower than its teacher at any measured
batch size (within the noise: below 1 by no more than twice the spread); at ``target.macs: 0.5``
a speed-up at batch 16 of at least 0.8 × ideal for the ResNet- and ViT-style nets and at least
1.3× for the MobileNetV2-style; ``target.speedup: 2`` reaches a measured 2× (within the spread) on
all three at batch 16. ``floors`` says which hold.

``--scan-round-to`` instead prunes the zoo nets (MobileNetV2 with and without SE) straight to
0.5 of the MACs with the pruner (one step, global magnitude) at ``round_to`` 1, 4, 8 and 16 and
times the speed-ups: the measurement behind the default ``prune.round_to``.

    .venv/bin/python benchmarks/real_speed.py --quick            # 32×32 only, few repeats (~8 min on 2 cores)
    .venv/bin/python benchmarks/real_speed.py                    # 32×32 and 224×224
    .venv/bin/python benchmarks/real_speed.py --scan-round-to --quick
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NETS = {  # zoo name -> model_args
    "resnet18": {},
    "mobilenet_v2": {},
    "vit": {},
}
BATCH_SIZES = (1, 16)
SEED = 0
CLASSES = 10


def random_data(shape, n: int = 64, n_test: int = 32, classes: int = CLASSES, seed: int = SEED):
    """A Python data source of random images (``data.source: {kind: python, factory: ...}``):
    (train, test) TensorDatasets of standard-normal inputs and random labels."""
    import torch
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(seed)
    make = lambda k: TensorDataset(torch.randn(k, *shape, generator=g),  # noqa: E731
                                   torch.randint(0, classes, (k,), generator=g))
    return make(n), make(n_test)


def log(msg: str) -> None:
    print(f"[real_speed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def teacher(name: str, args: dict, shape: tuple, seed: int = SEED):
    """A zoo net with random weights and BatchNorm statistics calibrated on random inputs."""
    import torch
    from kdcli.models import build_model

    torch.manual_seed(seed)
    model = build_model(name, args, input_shape=shape, num_classes=CLASSES)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the calibration batches
    model.train()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, *shape, generator=g))
    return model.eval()


def speedups(paths: dict, shape: tuple, repeats: int, budget: float, threads: int) -> dict:
    """Teacher / student speed-ups per batch size over ``repeats`` alternating measurements."""
    from kdcli.export.latency import measure_latency
    from kdcli.reports.compress import measured_speedups

    per_bs: dict[int, list] = {bs: [] for bs in BATCH_SIZES}
    medians: dict[int, dict] = {bs: {"teacher": [], "student": []} for bs in BATCH_SIZES}
    for _ in range(repeats):
        lat = measure_latency(paths, shape, BATCH_SIZES, time_budget_s=budget, threads=threads)
        tab = {"latency": {"primary_provider": "cpu", "onnxruntime": {"cpu": {
            m: {str(b): v for b, v in by.items()} for m, by in lat.items()}}}}
        for bs, (sp, iqr) in measured_speedups(tab).items():
            per_bs[bs].append((sp, iqr))
            for m in ("teacher", "student"):
                medians[bs][m].append(lat[m][bs]["median_ms"])
    out = {}
    for bs, vals in per_bs.items():
        sps = [v[0] for v in vals]
        out[str(bs)] = {"speedup": round(statistics.median(sps), 4),
                        "spread": round((max(sps) - min(sps)) / 2, 4),
                        "iqr": round(statistics.median(v[1] for v in vals if v[1] is not None), 4)
                        if any(v[1] is not None for v in vals) else None,
                        "repeats": [round(s, 4) for s in sps],
                        "teacher_ms": round(statistics.median(medians[bs]["teacher"]), 3),
                        "student_ms": round(statistics.median(medians[bs]["student"]), 3)}
    return out


def noise(entry: dict) -> float:
    """The noise of a speed-up: the larger of the repeats' half range and one repeat's spread."""
    return max(entry["spread"], entry["iqr"] or 0.0)


def compress_case(name: str, args: dict, size: int, mode: str, work: Path, opts) -> dict:
    """One ``kdcli compress`` run (``mode``: ``macs`` or ``speedup``) and its measured speed-ups."""
    import torch
    from kdcli.console import Reporter
    from kdcli.dkdp.compress import compress, start_run

    shape = (3, size, size)
    case = work / f"{name}-{size}-{mode}"
    case.mkdir(parents=True, exist_ok=True)
    t = teacher(name, args, shape)
    ckpt = case / "teacher.pt"
    torch.save(t.state_dict(), ckpt)
    target = "macs: 0.5" if mode == "macs" else "speedup: 2"
    recipe = f"""# {name} {size}x{size}: a recipe as a user writes it (no prune.round_to)
seed: {SEED}
device: cpu
data:
  source: {{kind: python, factory: "{Path(__file__).resolve()}:random_data", args: {{shape: {list(shape)}}}}}
  val_fraction: 0.25
  normalize: none
  batch_size: 16
teacher: {{model: {name}, model_args: {json.dumps(args)}, checkpoint: {ckpt}}}
distill:
  train: {{epochs: 0}}
prune:
  steps: {opts.steps}
target:
  {target}
  max_accuracy_drop: 1.0
export:
  batch_sizes: {list(BATCH_SIZES)}
  latency_budget_s: {opts.budget}
"""
    (case / "recipe.yaml").write_text(recipe)
    t0 = time.perf_counter()
    rec, run_dir = start_run(case / "recipe.yaml", out_dir=case / "run", overwrite=True)
    res = compress(rec, run_dir, device=torch.device("cpu"), reporter=Reporter(stream=sys.stderr))
    seconds = time.perf_counter() - t0
    paths = {"teacher": run_dir / "export" / "teacher.onnx", "student": run_dir / "export" / "student.onnx"}
    sp = speedups(paths, shape, opts.repeats, opts.budget, opts.threads)
    ratio = res.student["macs_ratio"]
    return {"net": name, "input": f"{size}x{size}", "mode": mode, "target": target,
            "macs_ratio": round(ratio, 4), "ideal": round(1 / ratio, 4), "speedup": sp,
            "efficiency@16": round(sp["16"]["speedup"] * ratio, 4),
            "steps": sum(1 for r in res.steps if r["accepted"]), "attempts": len(res.steps),
            "target_met": res.target_met, "gate_failures": res.gate_failures,
            "export_speedup": {bs: round(v, 4) for bs, v in
                               ((res.export or {}).get("latency", {}).get("speedup", {})
                                .get("CPUExecutionProvider", {}) or {}).items()},
            "seconds": round(seconds, 1), "structure": structure(run_dir / "student.kdc")}


def structure(path: Path) -> dict:
    """What the student kept: a ViT's heads and MLP widths per block, else its distinct layer widths."""
    from torch import nn
    from kdcli.models.file import load_model_file

    model, _ = load_model_file(path)
    blocks = getattr(model, "blocks", None)
    if blocks is not None and hasattr(blocks[0], "attn"):
        return {"heads": [b.attn.num_heads for b in blocks], "mlp": [b.mlp.fc1.out_features for b in blocks]}
    return {"widths": sorted({m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)})}


def floors(runs: list[dict]) -> dict:
    """Which of the issue's floors hold, with the runs each one judged."""
    def not_slower(r):
        return all(e["speedup"] >= 1.0 or 1.0 - e["speedup"] <= 2 * noise(e) for e in r["speedup"].values())

    default = [r for r in runs if r["mode"] == "macs"]
    eff = []
    for r in default:
        e = r["speedup"]["16"]
        need = 1.3 if r["net"] == "mobilenet_v2" else 0.8 * r["ideal"]
        eff.append({"run": f"{r['net']} {r['input']}", "speedup@16": e["speedup"], "floor": round(need, 3),
                    "holds": e["speedup"] >= need})
    two = [{"run": f"{r['net']} {r['input']}", "speedup@16": r["speedup"]["16"]["speedup"],
            "noise": round(noise(r["speedup"]["16"]), 4),
            "holds": r["speedup"]["16"]["speedup"] >= 2.0 - noise(r["speedup"]["16"])}
           for r in runs if r["mode"] == "speedup"]
    out = {
        "default_recipe_never_slower": {"holds": all(not_slower(r) for r in default),
                                        "slower": [f"{r['net']} {r['input']}" for r in default if not not_slower(r)]},
        "macs_0.5_efficiency": {"holds": all(e["holds"] for e in eff), "runs": eff},
        "speedup_2_reached": {"holds": all(e["holds"] for e in two), "runs": two},
    }
    out["all_hold"] = all(v["holds"] for v in out.values())
    return out


def scan_round_to(sizes, opts) -> list[dict]:
    """Prune straight to 0.5 of the MACs at round_to 1, 4, 8, 16 and time the speed-ups."""
    import torch
    from kdcli.export.onnx import export_onnx
    from kdcli.prune.pruner import StructuredPruner, count_macs_params

    out = []
    nets = [("resnet18", {}), ("mobilenet_v2", {}), ("mobilenet_v2", {"se": True}), ("vit", {})]
    for size in sizes:
        shape = (3, size, size)
        for name, args in nets:
            t = teacher(name, args, shape)
            ex = torch.zeros(1, *shape)
            t_macs = count_macs_params(t, ex)[0]
            with tempfile.TemporaryDirectory() as tmp:
                export_onnx(t, torch.zeros(2, *shape), Path(tmp) / "teacher.onnx")
                for r in (1, 4, 8, 16):
                    s = copy.deepcopy(t)
                    p = StructuredPruner(s, ex, round_to=r)
                    _, plan = p.plan_for_macs(p.score(), 0.5 * t_macs)
                    p.apply(plan)
                    export_onnx(s, torch.zeros(2, *shape), Path(tmp) / "student.onnx")
                    sp = speedups({"teacher": Path(tmp) / "teacher.onnx", "student": Path(tmp) / "student.onnx"},
                                  shape, opts.repeats, opts.budget, opts.threads)
                    label = name + ("-se" if args.get("se") else "")
                    widths = sorted({w for w in p.group_channels().values()})
                    out.append({"net": label, "input": f"{size}x{size}", "round_to": r,
                                "macs_ratio": round(count_macs_params(s, ex)[0] / t_macs, 4),
                                "speedup@1": sp["1"]["speedup"], "speedup@16": sp["16"]["speedup"],
                                "noise@16": round(noise(sp["16"]), 4), "widths": widths[:12]})
                    log(json.dumps(out[-1]))
    return out


def cpu_flags() -> list[str]:
    """The SIMD flags that decide onnxruntime's CPU kernels (MLAS): AVX2/FMA, AVX-512."""
    try:
        flags = next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512vl"))


def environment(threads: int) -> dict:
    from importlib.metadata import version

    import kdcli

    env = {"python": platform.python_version(), "machine": platform.machine(), "kdcli": kdcli.__version__,
           "threads": threads, "cpu_flags": cpu_flags()}
    for pkg in ("torch", "onnxruntime", "onnx", "torch-pruning", "numpy"):
        env[pkg] = version(pkg)
    try:
        env["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        env["cpu"] = platform.processor()
    return env


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32x32 only, 2 repeats, short timings")
    ap.add_argument("--scan-round-to", action="store_true", help="the round_to scan behind the default")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (default: all cores)")
    ap.add_argument("--nets", default=",".join(NETS), help="comma-separated subset of " + ", ".join(NETS))
    ap.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    opts = ap.parse_args(argv)
    import torch
    from kdcli.export.latency import default_threads

    torch.set_num_threads(1)  # pruning and scoring on one thread; onnxruntime gets opts.threads
    opts.threads = opts.threads or default_threads()
    opts.repeats = 2 if opts.quick else 5
    opts.budget = 0.5 if opts.quick else 2.0
    opts.steps = 3 if opts.quick else 4
    sizes = (32,) if opts.quick else (32, 224)
    started = time.perf_counter()
    result = {"benchmark": "real_speed", "mode": "quick" if opts.quick else "full", "seed": SEED,
              "batch_sizes": list(BATCH_SIZES), "repeats": opts.repeats, "time_budget_s": opts.budget,
              "environment": environment(opts.threads)}
    if opts.scan_round_to:
        result["round_to_scan"] = scan_round_to(sizes, opts)
    else:
        runs = []
        with tempfile.TemporaryDirectory() as tmp:
            work = opts.work or Path(tmp)
            for size in sizes:
                for name in opts.nets.split(","):
                    for mode in ("macs", "speedup"):
                        log(f"{name} {size}x{size} {mode}")
                        runs.append(compress_case(name, NETS[name], size, mode, work, opts))
                        log(json.dumps({k: runs[-1][k] for k in ("net", "input", "mode", "macs_ratio", "speedup")}))
        result["runs"] = runs
        result["floors"] = floors(runs)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
