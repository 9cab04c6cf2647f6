"""Streaming an image folder larger than the memory cap: kdcli's loader against a plain
DataLoader + Pillow loop, one distillation epoch each, under a memory cap.

1. Makes (once; reused from ``--cache-dir``) an image folder of JPEGs: ``--images`` (20,000) at
   ``--size`` x ``--size`` (224) in 10 class folders; smooth random colour fields with noise, so
   they compress and decode like photographs rather than like white noise. ``--quick``: 2,000 at 128.
2. Runs, each in a fresh subprocess under the cap, alternately for ``--rounds`` rounds:
   - ``kdcli``: ``load_data`` with ``data.loading: stream`` and ``data.workers: W``, then one
     epoch of :func:`kdcli.train.loop.fit` with a :class:`kdcli.distill.distiller.Distiller`
     (KD T=4 0.9 + CE 0.1, SGD) from a tiny CNN teacher to a tiny CNN student (random init);
   - ``plain``: a hand-written ``torch.utils.data.Dataset`` (Pillow open, convert RGB, resize,
     to tensor, normalise) in a ``DataLoader`` with the same workers, batch size, prefetch and
     shuffling, and a hand-written KD + CE loop with the same models and optimiser.
   Both normalise with fixed statistics and do not augment, so they do the same work per image.

The memory cap: ``resource.setrlimit(RLIMIT_AS, cap)`` in each subprocess, inherited by its
DataLoader workers, so every process of the run is refused memory beyond ``--cap-gb`` (1.5 GB;
importing torch on CPU reserves about 0.65 GB of address space, so the cap leaves about 0.85 GB
per process for data). RLIMIT_AS is per process, so the run as a whole is also measured: every
0.1 s the driver sums the proportional set size (PSS: shared pages split between the processes
that share them, so forked workers are not counted twice) of the subprocess and its workers, from
/proc/PID/smaps_rollup; ``peak_pss_mb`` is the largest sum seen, and ``under_cap`` requires it to
stay under the cap as well as the run to finish. (A cgroup would cap the sum directly; this
script does not create one, leaving the host's cgroups alone.)

Prints one JSON object to stdout (progress goes to stderr): images/s of each (the best round;
every round is listed), their ratio, peak memory, the decoded size of the set, and whether the
floors hold (kdcli >= 0.9x plain images/s; the epochs finish under the cap). Also images per CPU
second of the epoch (the training process's CPU time plus its workers', from RUSAGE_CHILDREN once
they have exited) and their ratio: on a machine shared with other jobs (``load_average_1min``
over the core count), wall-clock rates move with the neighbours and the CPU figures do not.

    python benchmarks/data_stream.py [--quick] [--images N --size S] [--workers W] [--batch-size 64]
                                     [--cap-gb 1.5] [--rounds R] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CLASSES = 10
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
T, W_KD, W_CE, LR = 4.0, 0.9, 0.1, 0.02


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the image folder


def _make_images(args) -> None:
    import numpy as np
    from PIL import Image

    root, size, start, stop = args
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        low = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        im = Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC)
        a = np.asarray(im, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3), dtype=np.int16)
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(root / f"c{i % CLASSES}" / f"{i:06d}.jpg", quality=90)


def image_folder(cache: Path, n: int, size: int) -> Path:
    """The folder of ``n`` JPEGs at ``size``, made once."""
    from multiprocessing import Pool

    root = cache / f"jpeg-{n}-{size}"
    if (root / ".complete").is_file():
        return root
    for c in range(CLASSES):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    step = 250
    with Pool(max(1, min(4, os.cpu_count() or 1))) as pool:
        pool.map(_make_images, [(root, size, a, min(a + step, n)) for a in range(0, n, step)])
    (root / ".complete").write_text(str(n))
    log(f"made {n:,} JPEGs at {size}x{size} in {root} ({time.perf_counter() - t0:.0f}s)")
    return root


def folder_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*.jpg"))


def warm_page_cache(root: Path) -> float:
    """Read every file once, so that no timed run pays for the disk (whichever loader runs first
    would otherwise read the set cold). Returns the seconds it took."""
    t0 = time.perf_counter()
    for d, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(d, n), "rb") as fh:
                while fh.read(1 << 20):
                    pass
    log(f"read every file once ({time.perf_counter() - t0:.1f}s): the timed runs read from the page cache")
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- one epoch (a subprocess)


def tiny_cnn(width: int):
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
                         nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, CLASSES))


class PlainFolder:
    """The plain Dataset: (normalised float image, label) per file, torchvision-free."""

    def __init__(self, root: Path, size: int):
        self.files, self.labels = [], []
        for c, d in enumerate(sorted(p for p in root.iterdir() if p.is_dir())):
            names = sorted(os.listdir(d))
            self.files += [str(d / n) for n in names]
            self.labels += [c] * len(names)
        self.size = size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        import numpy as np
        import torch
        from PIL import Image

        with Image.open(self.files[i]) as im:
            im = im.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
            a = np.array(im, dtype=np.uint8)
        x = torch.from_numpy(a).permute(2, 0, 1).float().div_(255)
        mean = torch.tensor(MEAN).view(3, 1, 1)
        std = torch.tensor(STD).view(3, 1, 1)
        return (x - mean) / std, self.labels[i]


def child(args) -> None:
    cap = int(args.cap_gb * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))  # before torch: its own reservations count too
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    # The first optimizer a process builds imports torch._dynamo (about 1 s of CPU). kdcli's fit
    # builds its optimizer inside the timed epoch, the plain loop before it: pay the import first.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    torch.manual_seed(0)
    teacher, student = tiny_cnn(16).eval(), tiny_cnn(8)
    root = Path(args.root)
    t0 = time.perf_counter()
    if args.child == "kdcli":
        from kdcli.config.data import DataSpec
        from kdcli.config.train import TrainSpec
        from kdcli.data.loader import load_data
        from kdcli.distill.distiller import Distiller
        from kdcli.config.losses import CE, KD
        from kdcli.train.loop import fit

        spec = DataSpec.model_validate({
            "source": {"kind": "image-folder", "path": str(root), "size": [args.size, args.size]},
            "loading": "stream", "workers": args.workers, "batch_size": args.batch_size, "val_fraction": 0,
            "normalize": {"mean": MEAN, "std": STD}})
        data = load_data(spec, base_dir=root, seed=0)
        loader = data.loader("train", train=True, seed=0)
        distiller = Distiller(teacher, student, [KD(temperature=T, weight=W_KD), CE(weight=W_CE)],
                              torch.zeros(2, *data.input_shape))
        t_open = time.perf_counter() - t0
        t1, c1 = time.perf_counter(), time.process_time()
        fit(student, loader, TrainSpec(epochs=1, lr=LR, schedule="constant", momentum=0.9, nesterov=False,
                      weight_decay=0.0, grad_clip=None),
            objective=distiller, extra_modules=[distiller])
        seconds, cpu = time.perf_counter() - t1, time.process_time() - c1
        loader.close()  # the workers exit, and their CPU time joins RUSAGE_CHILDREN
        images, note = len(data.train), data.loading
    else:
        ds = PlainFolder(root, args.size)
        w = args.workers
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=w,
                                             persistent_workers=w > 0, prefetch_factor=2 if w else None,
                                             generator=torch.Generator().manual_seed(0))
        opt = torch.optim.SGD(student.parameters(), lr=LR, momentum=0.9)
        t_open = time.perf_counter() - t0
        t1, c1 = time.perf_counter(), time.process_time()
        student.train()
        for x, y in loader:
            with torch.no_grad():
                t_logits = teacher(x)
            s_logits = student(x)
            kd = F.kl_div(F.log_softmax(s_logits / T, 1), F.softmax(t_logits / T, 1), reduction="batchmean") * T * T
            loss = W_KD * kd + W_CE * F.cross_entropy(s_logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        seconds, cpu = time.perf_counter() - t1, time.process_time() - c1
        if getattr(loader, "_iterator", None) is not None:
            loader._iterator._shutdown_workers()
        images, note = len(ds), f"DataLoader, {w} workers"
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers: they ran during the epoch only
    cpu += ru.ru_utime + ru.ru_stime
    status = Path("/proc/self/status").read_text()
    hwm = int(status.split("VmHWM:")[1].split()[0]) * 1024
    print(json.dumps({"loader": args.child, "images": images, "seconds": round(seconds, 3),
                      "images_per_s": round(images / seconds, 1), "open_seconds": round(t_open, 3),
                      "cpu_seconds": round(cpu, 3), "images_per_cpu_s": round(images / cpu, 1),
                      "main_peak_rss_mb": round(hwm / 2**20, 1), "loading": note}))


# ----------------------------------------------------------------------------- the driver


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (scanning /proc/*/stat for parent ids)."""
    parents: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += parents.get(p, [])
    return out


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def run_child(kind: str, args, root: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--root", str(root), "--size", str(args.size),
           "--workers", str(args.workers), "--batch-size", str(args.batch_size), "--cap-gb", str(args.cap_gb),
           "--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    peak = {"pss": 0, "processes": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            pids = _tree(proc.pid)
            peak["pss"] = max(peak["pss"], sum(_pss(p) for p in pids))
            peak["processes"] = max(peak["processes"], len(pids))
            done.wait(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    done.set()
    th.join()
    if proc.returncode != 0:
        tail = " | ".join(err.strip().splitlines()[-3:])
        log(f"{kind}: exit {proc.returncode}: {tail}")
        return {"loader": kind, "failed": True, "returncode": proc.returncode, "error": tail[-400:],
                "peak_pss_mb": round(peak["pss"] / 2**20, 1)}
    res = json.loads(out.strip().splitlines()[-1])
    res.update(peak_pss_mb=round(peak["pss"] / 2**20, 1), processes=peak["processes"])
    log(f"{kind}: {res['images_per_s']:.0f} images/s ({res['images_per_cpu_s']:.0f} per CPU second), "
        f"epoch {res['seconds']:.1f}s, peak PSS {res['peak_pss_mb']:.0f} MB")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2,000 images at 128x128")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: kdcli's auto, min(4, cores))")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--cap-gb", type=float, default=1.5)
    ap.add_argument("--rounds", type=int, default=None, help="alternating runs of each (default 3 quick, 2 full)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of the training process")
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("KDCLI_BENCH_CACHE", "/tmp/kdcli-bench")))
    ap.add_argument("--child", choices=["kdcli", "plain"], help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.images = args.images or (2000 if args.quick else 20000)
    args.size = args.size or (128 if args.quick else 224)
    if args.workers is None:
        from kdcli.data.stream import default_workers

        args.workers = default_workers()
    if args.child:
        child(args)
        return
    rounds = args.rounds or (3 if args.quick else 2)
    root = image_folder(args.cache_dir, args.images, args.size)
    warm = warm_page_cache(root)
    runs = []
    for r in range(rounds):
        for kind in (("kdcli", "plain") if r % 2 == 0 else ("plain", "kdcli")):
            runs.append(run_child(kind, args, root))
    best = {k: max((x for x in runs if x["loader"] == k and not x.get("failed")), key=lambda x: x["images_per_s"],
                   default=None) for k in ("kdcli", "plain")}
    cap_mb = args.cap_gb * 1024
    decoded = args.images * 3 * args.size * args.size
    ratio = (best["kdcli"]["images_per_s"] / best["plain"]["images_per_s"]) if best["kdcli"] and best["plain"] else None
    cpu_best = {k: max((x["images_per_cpu_s"] for x in runs if x["loader"] == k and not x.get("failed")), default=None)
                for k in ("kdcli", "plain")}
    cpu_ratio = cpu_best["kdcli"] / cpu_best["plain"] if cpu_best["kdcli"] and cpu_best["plain"] else None
    kd_runs = [x for x in runs if x["loader"] == "kdcli"]
    under = bool(kd_runs) and all(not x.get("failed") and x["peak_pss_mb"] <= cap_mb for x in kd_runs)
    print(json.dumps({
        "images": args.images, "size": args.size, "batch_size": args.batch_size, "workers": args.workers,
        "rounds": rounds, "page_cache_warmed_s": round(warm, 1), "threads": args.threads, "cpu_cores": len(os.sched_getaffinity(0)),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "decoded_set_mb": round(decoded / 2**20, 1), "jpeg_files_mb": round(folder_bytes(root) / 2**20, 1),
        "cap_mb": cap_mb, "cap_below_decoded_set": cap_mb * 2**20 < decoded,
        "cap_method": "RLIMIT_AS per process (workers inherit it) + sampled PSS of the process tree",
        "kdcli_images_per_s": best["kdcli"] and best["kdcli"]["images_per_s"],
        "plain_images_per_s": best["plain"] and best["plain"]["images_per_s"],
        "ratio": ratio and round(ratio, 3),
        "kdcli_images_per_cpu_s": cpu_best["kdcli"], "plain_images_per_cpu_s": cpu_best["plain"],
        "cpu_ratio": cpu_ratio and round(cpu_ratio, 3),
        "kdcli_peak_pss_mb": max((x["peak_pss_mb"] for x in kd_runs), default=None),
        "plain_peak_pss_mb": max((x["peak_pss_mb"] for x in runs if x["loader"] == "plain"), default=None),
        "kdcli_main_peak_rss_mb": best["kdcli"] and best["kdcli"]["main_peak_rss_mb"],
        "kdcli_loading": best["kdcli"] and best["kdcli"]["loading"],
        "floors": {"ratio_ge_0.9": ratio is not None and ratio >= 0.9, "finished_under_cap": under},
        "runs": runs,
    }, indent=1))


if __name__ == "__main__":
    main()
