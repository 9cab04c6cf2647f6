"""DKDP against the plain baseline, in the same run, with the same epoch budget. Prints JSON.

Baseline (what a user would write with torch-pruning alone): magnitude pruning to the same MACs
in one shot, then fine-tuning with cross-entropy for as many epochs as kdcli's DKDP spent
(every distillation epoch of every attempt plus the final ones). Both start from the same
teacher, see the same data and learning-rate schedule; accuracy is on the test split.

    python benchmarks/dkdp.py --case fashion-mnist            # CNN teacher, 0.3 of its MACs
    python benchmarks/dkdp.py --case cifar10-resnet20         # ResNet-20, 0.5 of its MACs (CPU budget)
    python benchmarks/dkdp.py --case fashion-mnist --quick    # minutes, for a smoke test

Floors (issue 5): Fashion-MNIST at 0.3 of the MACs, drop <= 0.5 point and better than the
baseline; CIFAR-10 at 0.5, drop <= 1 point.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE_DIR = Path(tempfile.gettempdir()) / "kdcli-bench"
sys.path.insert(0, str(REPO))

CASES = {
    "fashion-mnist": {
        "recipe": "fashion-mnist.yaml",
        # A CPU budget (about 20 minutes on 2 cores): the recipe's CNN (widths 32/64/128), 20,000
        # training images, 10 teacher epochs, 3 distillation epochs per step and 8 at the end.
        # --full uses all 55,000 images and longer training.
        "set": ["teacher.model_args={widths: [32, 64, 128], hidden: 256}", "teacher.train.epochs=10",
                "data.limit_train=20000", "distill.train.epochs=3", "prune.steps=4", "prune.final_epochs=8",
                "target.macs=0.3", "target.max_accuracy_drop=0.005", "data.augment.crop_padding=0",
                "data.augment.hflip=false", "export.enabled=false"],
        "full": ["teacher.train.epochs=30",
                 "data.limit_train=null", "distill.train.epochs=4", "prune.final_epochs=10"],
        "quick": ["data.limit_train=8000", "teacher.train.epochs=4", "distill.train.epochs=1", "prune.steps=2",
                  "prune.final_epochs=1"],
    },
    "cifar10-resnet20": {
        "recipe": "cifar10-resnet.yaml",
        # A CPU budget (one ResNet-20 epoch on 10,000 images takes 30-55 s on one shared core,
        # about 45 minutes in all): a teacher of 20 epochs on 10,000 images (77 % on validation,
        # not converged), 3 distillation epochs per step and 8 at the end; --full is the recipe's
        # ResNet-56 budget.
        "set": ["teacher.model=resnet20", "teacher.train.epochs=20", "distill.train.epochs=3", "prune.steps=3",
                "prune.final_epochs=8", "target.macs=0.5", "export.enabled=false", "data.limit_train=10000"],
        "full": ["teacher.model=resnet56", "teacher.train.epochs=160", "data.limit_train=null",
                 "distill.train.epochs=10", "prune.steps=4", "prune.final_epochs=30"],
        "quick": ["data.limit_train=4000", "teacher.train.epochs=2", "distill.train.epochs=1", "prune.steps=1",
                  "prune.final_epochs=1"],
    },
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=sorted(CASES), default="fashion-mnist")
    ap.add_argument("--quick", action="store_true", help="a small budget for a smoke test")
    ap.add_argument("--full", action="store_true", help="the recipe's full budget (wants a GPU: --device cuda)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--teacher", type=Path, help="a trained teacher (.kdc) to start from instead of training one")
    ap.add_argument("--no-cache", action="store_true", help="train the teacher even when a cached one matches")
    ap.add_argument("--set", action="append", default=[], help="extra recipe overrides")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (1 on a CPU shared with other jobs: spinning threads contend)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from kdcli.dkdp import compress as C
    from kdcli.console import Reporter
    from kdcli.data.loader import load_data
    from kdcli.prune.pruner import StructuredPruner, count_macs_params
    from kdcli.config.recipe import load_recipe
    from kdcli.models.file import load_model_any, save_model
    from kdcli.train.teacher import train_teacher
    from kdcli.train.loop import evaluate, fit, resolve_device, tensor_batches

    case = CASES[args.case]
    overrides = (case["set"] + (case["quick"] if args.quick else []) + (case["full"] if args.full else [])
                 + args.set + [f"device={args.device}"])
    recipe_path = REPO / "recipes" / case["recipe"]
    recipe = load_recipe(recipe_path, overrides)
    device = resolve_device(args.device)
    log = Reporter(stream=sys.stderr)
    data = load_data(recipe.data, base_dir=recipe.base_dir, seed=recipe.seed)
    test = tensor_batches(*data.eval_tensors("test", device))
    val = tensor_batches(*data.eval_tensors("val", device))
    example = torch.zeros(1, *data.input_shape, device=device)
    out: dict = {"case": args.case, "quick": args.quick, "full": args.full, "overrides": overrides,
                 "threads": torch.get_num_threads(), "device": str(device), "data": data.description,
                 "test_split": "test" if args.case != "cifar10-resnet20" else "first 1,000 CIFAR-10 test images"}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        # The teacher depends on the seed, data and teacher sections only: cache it by their hash.
        key = hashlib.sha256(json.dumps([recipe.seed, recipe.data.model_dump(mode="json"),
                                         recipe.teacher.model_dump(mode="json")], sort_keys=True,
                                        default=str).encode()).hexdigest()[:12]
        cached = CACHE_DIR / f"dkdp-{args.case}-teacher-{key}.kdc"
        source = args.teacher or (cached if cached.is_file() and not args.no_cache else None)
        if source:
            teacher, tinfo = load_model_any(source, spec_name=None, spec_args=None, input_shape=data.input_shape,
                                            num_classes=data.num_classes, base_dir=REPO)
            teacher = teacher.to(device)
            out["teacher_source"] = str(source)
        else:
            teacher, tinfo, _ = train_teacher(recipe, data, device, log)
            cached.parent.mkdir(parents=True, exist_ok=True)
            save_model(cached, teacher, tinfo)
            out["teacher_source"] = f"trained, cached at {cached}"
        teacher_file = tmp / "teacher.kdc"
        save_model(teacher_file, teacher, tinfo)
        out["teacher_seconds"] = round(time.perf_counter() - t0, 1)
        t_macs, t_params = count_macs_params(teacher, example)
        t_acc = evaluate(teacher, test, device)["accuracy"]
        t_val = evaluate(teacher, val, device)["accuracy"]

        # --- kdcli DKDP
        t0 = time.perf_counter()
        rec, run_dir = C.start_run(recipe_path, out_dir=tmp / "run",
                                   overrides=overrides + [f"teacher.checkpoint={teacher_file}"])
        res = C.compress(rec, run_dir, device=device, reporter=log)
        kd_seconds = time.perf_counter() - t0
        student, _ = load_model_any(run_dir / "student.kdc", spec_name=None, spec_args=None,
                                    input_shape=data.input_shape, num_classes=data.num_classes, base_dir=REPO)
        student = student.to(device)
        kd_acc = evaluate(student, test, device)["accuracy"]
        kd_val = evaluate(student, val, device)["accuracy"]
        epochs = sum(len(r["train_history"]) for r in res.steps) + (recipe.prune.final_epochs if res.steps else 0)

        # --- baseline: one-shot magnitude pruning to the same MACs, then CE fine-tuning, same epochs
        t0 = time.perf_counter()
        torch.manual_seed(recipe.seed)
        base = copy.deepcopy(teacher).to(device)
        pruner = StructuredPruner(base, example, importance="magnitude", ignored_layers=recipe.prune.ignored_layers,
                                  round_to=recipe.prune.round_to)
        scores = pruner.score()
        aim = res.student["macs"]
        pruner.apply(pruner.fill_to_macs(scores, pruner.plan_below(scores, pruner.tau_for_macs(scores, aim)), aim))
        b_macs, b_params = count_macs_params(base, example)
        cfg = recipe.distill.train.model_copy(update={"epochs": epochs})
        fit(base, data.loader("train", train=True, device=device, seed=recipe.seed), cfg, device=device,
            progress=lambda m: log.metrics("baseline", m))
        base_seconds = time.perf_counter() - t0
        b_acc = evaluate(base, test, device)["accuracy"]
        b_val = evaluate(base, val, device)["accuracy"]

    out.update({
        "teacher": {"macs": t_macs, "params": t_params, "test_accuracy": t_acc, "val_accuracy": t_val},
        "kdcli": {"macs": res.student["macs"], "params": res.student["params"],
                  "macs_ratio": res.student["macs"] / t_macs, "test_accuracy": kd_acc,
                  "drop_points": 100 * (t_acc - kd_acc), "val_accuracy": kd_val,
                  "val_drop_points": 100 * (t_val - kd_val), "seconds": round(kd_seconds, 1), "epochs": epochs,
                  "tau": [r["tau"] for r in res.steps], "accepted": [r["accepted"] for r in res.steps],
                  "target_met": res.target_met,
                  # distill.train_teacher: epochs spent fine-tuning the teacher (not the student's)
                  "teacher_epochs": (recipe.distill.train_teacher.epochs * sum(r["accepted"] for r in res.steps)
                                     if recipe.distill.train_teacher else 0),
                  "teacher_val_accuracy": [r.get("teacher_val_accuracy") for r in res.steps]},
        "baseline": {"macs": b_macs, "params": b_params, "macs_ratio": b_macs / t_macs, "test_accuracy": b_acc,
                     "drop_points": 100 * (t_acc - b_acc), "val_accuracy": b_val, "seconds": round(base_seconds, 1), "epochs": epochs},
    })
    out["kdcli_minus_baseline_points"] = 100 * (kd_acc - b_acc)
    out["seconds_ratio_kdcli_over_baseline"] = kd_seconds / max(base_seconds, 1e-9)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
