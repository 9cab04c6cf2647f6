"""Do baseline gates hold still on a noisy machine, and still catch a real regression?

Trains a small teacher and two students on scikit-learn's 8×8 digits (the quickstart's data): the
student (``cnn3`` widths 8/16/32) and a deliberately slower one (widths 16/32/64: more latency at
the same accuracy level). One ``kdcli export`` of the student makes the baseline report; then
``--repeats`` (10) fresh ``kdcli export`` processes of (a) the same student and (b) the slower one,
each against that baseline with the gates

    accuracy < baseline.accuracy - 0.3
    latency_ms@1 > baseline.latency_ms@1 * 1.05
    latency_ms@64 > baseline.latency_ms@64 * 1.05

Expected: (a) passes (exit 0) in every run although the latency medians drift between runs; (b)
fails (exit 3) in every run. Prints one JSON object: passes and fails of each, the exit codes, each
run's medians and spreads (half the interquartile range, the ``±`` of the gate messages), the
baseline's, the slower student's latency ratio, the failure lines, and the seeds.

Run: ``.venv/bin/python benchmarks/gate_noise.py [--repeats 10] [--budget 1.0]`` (~15 s per export).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from kdcli.reports.gates import NOISE_K  # noqa: E402

GATES = ["accuracy < baseline.accuracy - 0.3",
         "latency_ms@1 > baseline.latency_ms@1 * 1.05",
         "latency_ms@64 > baseline.latency_ms@64 * 1.05"]
MODELS = {  # role → (cnn3 args, seed)
    "teacher": ({"widths": [32, 64, 128], "hidden": 128}, 0),
    "student": ({"widths": [8, 16, 32], "hidden": 64}, 1),
    "slower": ({"widths": [16, 32, 64], "hidden": 64}, 2),
}
RECIPE = """\
seed: 0
data: {{source: digits, val_fraction: 0.15}}
teacher: {{model: cnn3, model_args: {teacher_args}}}
export: {{batch_sizes: [1, 64], latency_budget_s: {budget}}}
"""


def train_models(folder: Path, epochs: int) -> dict:
    """Train each model of MODELS on the digits training split (Adam, seeded) and save it as a kdcli
    model file in ``folder``; returns role → {file, test accuracy, seed}."""
    from kdcli.config.recipe import load_recipe
    from kdcli.data.loader import load_data
    from kdcli.models import build_model
    from kdcli.models.file import save_model_file

    rec = load_recipe(folder / "recipe.yaml")
    data = load_data(rec.data, base_dir=rec.base_dir, seed=rec.seed)
    x, y = data.eval_tensors("train", torch.device("cpu"))  # normalised as export normalises
    xt, yt = data.eval_tensors("test" if data.test is not None else "val", torch.device("cpu"))
    out = {}
    for role, (args, seed) in MODELS.items():
        torch.manual_seed(seed)
        model = build_model("cnn3", args, input_shape=data.input_shape, num_classes=data.num_classes)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=gen).split(64):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            acc = float((model(xt).argmax(1) == yt).float().mean())
        path = folder / f"{role}.kdc"
        save_model_file(path, model, name="cnn3", args=args, input_shape=data.input_shape,
                        num_classes=data.num_classes)
        out[role] = {"file": path.name, "cnn3": args, "seed": seed, "test_accuracy": round(acc, 4)}
    return out


def export(folder: Path, student: str, out: str, baseline: Path | None) -> tuple[int, dict, float]:
    """One ``kdcli export`` process; returns (exit code, report.json, seconds)."""
    cmd = [sys.executable, "-m", "kdcli", "export", str(folder / f"{student}.kdc"), "--teacher",
           str(folder / "teacher.kdc"), "--recipe", str(folder / "recipe.yaml"), "--out", str(folder / out)]
    if baseline is not None:
        cmd += ["--baseline", str(baseline)] + [a for g in GATES for a in ("--fail-if", g)]
    env = {k: v for k, v in os.environ.items() if k != "GITHUB_STEP_SUMMARY"}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    seconds = time.perf_counter() - t0
    report_path = folder / out / "report.json"
    if res.returncode not in (0, 3) or not report_path.is_file():
        raise SystemExit(f"export failed (exit {res.returncode}): {res.stderr.strip().splitlines()[-1:]}")
    return res.returncode, json.loads(report_path.read_text()), seconds


def figures(report: dict) -> dict:
    """The gated figures of a report: accuracy (%), and per batch size the student's median and
    spread (ms) and the speed-up."""
    cpu = report["latency"]["onnxruntime"]["CPUExecutionProvider"]
    out = {"accuracy": round(100 * report["accuracy"]["student_onnx"], 3)}
    for bs in ("1", "64"):
        s = cpu["student"][bs]
        out[f"latency_ms@{bs}"] = round(s["median_ms"], 5)
        out[f"spread_ms@{bs}"] = round((s["p75_ms"] - s["p25_ms"]) / 2, 5)
        out[f"speedup@{bs}"] = round(report["latency"]["speedup"]["CPUExecutionProvider"][bs], 4)
        out[f"teacher_ms@{bs}"] = round(cpu["teacher"][bs]["median_ms"], 5)
    return out


def summarise(runs: list[dict]) -> dict:
    codes = [r["exit_code"] for r in runs]
    out = {"passes": codes.count(0), "fails": codes.count(3), "exit_codes": codes}
    for key in ("latency_ms@1", "latency_ms@64", "spread_ms@1", "spread_ms@64", "speedup@64"):
        vals = [r["figures"][key] for r in runs]
        out[f"{key} median"] = round(statistics.median(vals), 5)
        out[f"{key} min/max"] = [min(vals), max(vals)]
    out["runs"] = runs
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--budget", type=float, default=1.0, help="latency budget per batch size (export.latency_budget_s)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--keep", type=Path, help="keep the models and every run's reports in this folder")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdcli-gate-noise-") as tmp:
        folder = Path(tmp) if args.keep is None else args.keep
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "recipe.yaml").write_text(RECIPE.format(teacher_args=json.dumps(MODELS["teacher"][0]),
                                                          budget=args.budget))
        models = train_models(folder, args.epochs)
        print(f"trained: {models}", file=sys.stderr)
        code, base, _ = export(folder, "student", "baseline", None)
        baseline = folder / "baseline" / "report.json"
        result = {"gates": GATES, "models": models, "budget_s": args.budget, "repeats": args.repeats,
                  "noise_rule": f"baseline latency rescaled by the teacher's drift; fail only beyond "
                                f"{NOISE_K}·√(s_now² + s_base²), s = (p75 − p25) / 2",
                  "baseline": figures(base)}
        for case, student in (("equal", "student"), ("slower", "slower")):
            runs = []
            for i in range(args.repeats):
                code, rep, secs = export(folder, student, f"{case}-{i}", baseline)
                runs.append({"exit_code": code, "figures": figures(rep), "failures": rep["gates"]["failures"],
                             "seconds": round(secs, 1)})
                print(f"{case} {i + 1}/{args.repeats}: exit {code} {figures(rep)}", file=sys.stderr)
            result[case] = summarise(runs)
    eq, sl = result["equal"], result["slower"]
    result["slower_latency_ratio"] = {bs: round(sl[f"latency_ms@{bs} median"] / eq[f"latency_ms@{bs} median"], 3)
                                      for bs in ("1", "64")}
    result["ok"] = eq["passes"] == args.repeats and sl["fails"] == args.repeats
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
