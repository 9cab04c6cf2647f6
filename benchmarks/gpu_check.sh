#!/usr/bin/env bash
# The GPU check of issue #15, in under 8 minutes on one GPU; prints one JSON line of figures.
#
#   bash benchmarks/gpu_check.sh                 # on a machine with CUDA
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh   # the same steps, cut down, to test the script
#
# 1. quickstart: `kdcli compress` of the built-in recipe on the device (DKDP end to end, export
#    included), its seconds, accuracies, MACs ratio and measured speed-up;
# 2. distillation throughput: benchmarks/distill_overhead.py --amp on CIFAR-10 images, kdcli's
#    Distiller inside fit() (amp auto, channels_last auto) against a plain PyTorch AMP loop at the
#    same batch; `ratio` = kdcli / plain (floor 0.8), and the teacher-cached epoch's figures;
# 3. with two GPUs or more: `torchrun --nproc-per-node 2 -m kdcli compress` of the quickstart (NCCL),
#    its seconds and accuracy against step 1's.
# Environment: PYTHON (default python), DEVICE (default cuda), OUT_DIR (default a new temporary
# folder, kept: each step's own output is there), QUICK=1 (small sizes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
OUT=${OUT_DIR:-$(mktemp -d -t kdcli-gpu-check-XXXX)}
mkdir -p "$OUT"
if [ "${QUICK:-0}" = 1 ]; then
  QS_SET=(--set teacher.train.epochs=3 --set distill.train.epochs=1 --set prune.final_epochs=1 --set prune.steps=1)
  TP=(--samples 256 --batch-size 64 --rounds 1)
else
  QS_SET=()
  TP=(--samples 10000 --batch-size 256 --rounds 3)
fi

now() { "$PY" -c 'import time; print(time.time())'; }

t0=$(now)
"$PY" -m kdcli compress --device "$DEVICE" --out "$OUT/quickstart" --overwrite --json "${QS_SET[@]}" \
  > "$OUT/quickstart.json" 2> "$OUT/quickstart.log"
t1=$(now)
"$PY" benchmarks/distill_overhead.py --device "$DEVICE" --amp --cifar --threads 0 "${TP[@]}" \
  > "$OUT/throughput.json" 2> "$OUT/throughput.log"
t2=$(now)
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
DDP=skipped
if [ "$DEVICE" != cpu ] && [ "$NGPU" -ge 2 ]; then
  "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 -m kdcli compress --device cuda \
    --out "$OUT/ddp" --overwrite --json "${QS_SET[@]}" > "$OUT/ddp.json" 2> "$OUT/ddp.log" && DDP=ran || DDP=failed
fi
t3=$(now)

"$PY" - "$OUT" "$DEVICE" "$NGPU" "$DDP" "$t0" "$t1" "$t2" "$t3" <<'EOF'
import json, sys
from pathlib import Path

out, device, ngpu, ddp = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
t0, t1, t2, t3 = map(float, sys.argv[5:9])


def run_figures(path: Path) -> dict:
    r = json.loads(path.read_text())
    s, t = r["student"], r["teacher"]
    fig = {"teacher_val": t["val_accuracy"], "student_val": s["val_accuracy"], "student_test": s.get("test_accuracy"),
           "macs_ratio": round(s["macs_ratio"], 4), "target_met": r["target_met"]}
    if r.get("export"):
        lat = r["export"]["latency"]  # onnxruntime on the CPU: the teacher / student latency at each batch size
        fig["onnx_speedup"] = {k: round(v, 3) for k, v in lat["speedup"].get(lat["primary_provider"], {}).items()}
    return fig


import torch

gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
tp = json.loads((out / "throughput.json").read_text())
line = {"benchmark": "gpu_check", "device": device, "gpu": gpu, "gpus": ngpu, "torch": torch.__version__,
        "quickstart": {**run_figures(out / "quickstart.json"), "seconds": round(t1 - t0, 1)},
        "distill_throughput": {k: tp[k] for k in ("batch_size", "samples", "amp", "baseline_steps_per_s",
                                                  "kdcli_steps_per_s", "kdcli_cached_steps_per_s",
                                                  "student_only_steps_per_s", "ratio", "cached_speedup")},
        "distill_ratio_floor": 0.8, "distill_ratio_met": tp["ratio"] >= 0.8,
        "throughput_seconds": round(t2 - t1, 1),
        "torchrun_2": ddp, "seconds": round(t3 - t0, 1), "out_dir": str(out)}
if ddp == "ran":
    line["torchrun_2_figures"] = {**run_figures(out / "ddp.json"), "seconds": round(t3 - t2, 1)}
print(json.dumps(line))
EOF
