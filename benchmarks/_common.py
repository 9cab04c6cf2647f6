"""Helpers shared by the distillation quality benchmarks (``hinton_mnist.py``, ``cross_arch_cifar10.py``).

Each benchmark trains a teacher (or reuses a cached one), then trains students under several
variants, seeds and learning rates, and prints one JSON object to stdout. What they share lives
here: the teacher cache under /tmp, a student run that turns a diverged training into a reported
failure instead of a crash, seed statistics and the choice of the best learning rate on the
validation split (never on the test split).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from kdcli.console import Reporter  # noqa: E402
from kdcli.errors import TrainingDiverged  # noqa: E402
from kdcli.train.loop import evaluate, fit  # noqa: E402

DATA = REPO.parent / "shared" / "data"
CACHE_DIR = Path(os.environ.get("KDCLI_BENCH_CACHE", "/tmp/kdcli-bench"))

log = Reporter(stream=sys.stderr)  # progress to stderr: stdout carries the JSON only


def setup_threads(threads: int) -> int:
    """Use ``threads`` intra-op threads (0: torch's default); returns the count in use.

    One thread is the default of these benchmarks: on a 2-core machine shared with other jobs,
    two OpenMP threads made an MLP epoch 4-8x slower than one (measured here)."""
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def key_of(obj) -> str:
    """A short stable hash of a JSON-able object (what determines a cached teacher)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def teacher_from_cache(path: Path | None, key: str, name: str, device: torch.device,
                       train: Callable[[], tuple[nn.Module, dict, dict]]) -> tuple[nn.Module, dict]:
    """The teacher: the ``.kdc`` file ``path`` if given (``--teacher``), else the cache file
    ``CACHE_DIR/{name}-{key}.kdc`` when it exists, else ``train()`` → ``(model, spec, metrics)``
    whose result is saved there with :func:`kdcli.models.file.save_model_file`.

    ``spec`` holds ``name``, ``args``, ``input_shape``, ``num_classes``. Returns the model (on
    ``device``, eval mode) and ``{"source", "path", "train_seconds", ...metrics}``."""
    from kdcli.models.file import load_model_file, save_model_file

    cached = CACHE_DIR / f"{name}-{key}.kdc"
    for src, p in (("--teacher", path), ("cache", cached)):
        if p is not None and Path(p).is_file():
            model, info = load_model_file(Path(p))
            log.info(f"teacher: {src} {p}")
            meta = dict(info["metadata"])
            return model.to(device).eval(), {"source": src, "path": str(p), **meta.get("metrics", {})}
    model, spec, metrics = train()
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    save_model_file(cached, model, name=spec["name"], args=spec["args"], input_shape=spec["input_shape"],
                    num_classes=spec["num_classes"], metadata={"metrics": metrics, "key": key})
    log.info(f"teacher: trained, saved to {cached} (reuse with --teacher {cached})")
    return model.eval(), {"source": "trained", "path": str(cached), **metrics}


@dataclass
class Run:
    """One student training: its settings, and test/val results or the reason it failed."""

    variant: str
    lr: float
    seed: int
    status: str = "ok"  # ok | diverged
    val_accuracy: float | None = None
    test_accuracy: float | None = None
    seconds: float = 0.0
    message: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self, errors_of: int | None = None) -> dict:
        """JSON-able record; with ``errors_of`` (the test set size) also ``test_errors``."""
        out = {"variant": self.variant, "lr": self.lr, "seed": self.seed, "status": self.status,
               "val_accuracy": _r(self.val_accuracy), "test_accuracy": _r(self.test_accuracy),
               "seconds": round(self.seconds, 1)}
        if errors_of is not None:
            out["test_errors"] = errors(self.test_accuracy, errors_of)
        if self.message:
            out["message"] = self.message
        out.update(self.extra)
        return out


def errors(accuracy: float | None, n: int) -> int | None:
    """Misclassified test samples out of ``n`` from an accuracy (None stays None)."""
    return None if accuracy is None else int(round((1.0 - accuracy) * n))


def _r(v: float | None, nd: int = 4):
    return None if v is None else round(float(v), nd)


def train_student(run: Run, student: nn.Module, loader, cfg, *, objective=None, extra_modules=(),
                  before_epoch=None, val, test, device: torch.device, more: dict | None = None) -> Run:
    """Train ``student`` with :func:`kdcli.train.loop.fit` and fill ``run`` with its validation and test
    accuracy and wall time (and ``run.extra[NAME + "_accuracy"]`` for each of the ``more``
    batches). A :class:`kdcli.errors.TrainingDiverged` (non-finite loss) marks the run
    ``diverged`` with the library's message instead of ending the benchmark: a diverged learning
    rate is a result of the sweep, not a crash."""
    t0 = time.perf_counter()
    tag = f"{run.variant} lr={run.lr:g} seed={run.seed}"
    try:
        fit(student, loader, cfg, objective=objective, extra_modules=extra_modules, device=device,
            before_epoch=before_epoch, progress=lambda m: log.metrics(tag, m))
    except TrainingDiverged as exc:
        run.status, run.message = "diverged", str(exc)
        log.info(f"{tag}: diverged ({exc})")
    else:
        run.val_accuracy = evaluate(student, val, device)["accuracy"]
        run.test_accuracy = evaluate(student, test, device)["accuracy"]
        for name, batches in (more or {}).items():
            run.extra[f"{name}_accuracy"] = round(evaluate(student, batches, device)["accuracy"], 4)
        log.info(f"{tag}: val {100 * run.val_accuracy:.2f}%  test {100 * run.test_accuracy:.2f}%")
    run.seconds = time.perf_counter() - t0
    return run


def best_lr(runs: list[Run]) -> float | None:
    """The learning rate whose finished runs have the best mean validation accuracy (ties: the
    smaller lr); None when every run diverged. Chosen on validation so that the test split stays
    unseen."""
    by_lr: dict[float, list[float]] = {}
    for r in runs:
        if r.status == "ok":
            by_lr.setdefault(r.lr, []).append(r.val_accuracy)
    if not by_lr:
        return None
    return max(sorted(by_lr), key=lambda lr: (sum(by_lr[lr]) / len(by_lr[lr]), -lr))


def seed_stats(values: list[float]) -> dict:
    """``mean``, ``std`` (sample, n-1), ``min``, ``max`` and ``spread`` (max - min) of ``values``;
    empty values give Nones."""
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "spread": None, "n": 0}
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "spread": max(values) - min(values),
            "n": n}


def emit(obj: dict) -> None:
    """Write the benchmark's one JSON object to stdout (nothing else goes there)."""
    sys.stdout.write(json.dumps(obj, indent=1) + "\n")
    sys.stdout.flush()


def load_average() -> float | None:
    """The 1-minute load average, to read wall times on a shared machine; None where unknown."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
