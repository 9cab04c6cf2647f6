"""Latency of ONNX models in onnxruntime (and of PyTorch modules in eager mode, for reference).

Models compared with each other are measured in the same process and *alternating* (t, s, t, s …)
within each batch size, so that a noisy, shared machine slows both alike and their speed-up ratio
holds even when the absolute numbers drift. Each model gets warm-up runs first (allocations,
kernel selection), then timed runs until the time budget is spent, with a floor on the run count
so the median is never taken from a handful of samples.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

WARMUP_RUNS = 3
MIN_RUNS = 7
MAX_RUNS = 5000


def default_threads() -> int:
    """CPU cores this process may use (its affinity mask): the intra-op thread count we pin, and what
    ``data.workers: auto`` is capped by."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def available_providers() -> list[str]:
    """The onnxruntime execution providers kdcli measures here: CUDA when present, and always CPU."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


# MLAS's NchwcBlockSize by the CPU capability torch detects (the same CPUID features decide both)
_NCHWC_BLOCKS = {"AVX512": (16, "AVX-512"), "AVX2": (8, "AVX2")}


def cpu_channel_block() -> tuple[int, str] | None:
    """(channels, instruction set) of the block onnxruntime's CPU convolutions work in on this
    host, or None where it is not known (not x86, or neither AVX2 nor AVX-512).

    onnxruntime's NCHWc layout transform (graph optimisation level ``all``, which kdcli uses)
    runs a convolution in blocks of 16 channels with AVX-512 and 8 with AVX2, and takes only those
    whose output channels are a multiple of the block; the others run unblocked, with the tensor
    reordered on each side. On the AVX-512 host of 2026-12-07 a ResNet-20 pruned to half its MACs
    with widths of 8, 24 and 56 ran 1.39x faster than its teacher, one with every width on the
    block 1.59x at 0.58 of the MACs (README, "Speed on an AVX-512 host")."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "x86", "i386", "i686"):
        return None
    import torch

    return _NCHWC_BLOCKS.get(torch.backends.cpu.get_cpu_capability())


def off_block_convs(model, block: int) -> tuple[int, int]:
    """(convolutions whose output channels are not a multiple of ``block``, all convolutions)."""
    import torch.nn as nn

    convs = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    return sum(1 for m in convs if m.out_channels % block), len(convs)


def make_session(path: str | Path | bytes, *, providers: Sequence[str] | None = None, threads: int | None = None,
                 spinning: bool = True):
    """An onnxruntime InferenceSession with full graph optimisation and ``threads`` intra-op threads.

    ``path``: a model file, or the serialised model itself (bytes). ``providers`` defaults to CPU
    only; CPU is always appended as the fallback provider.
    ``spinning=False`` stops idle pool threads from busy-waiting for work (see measure_latency).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = int(threads or default_threads())
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: no "Removing initializer" chatter
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    provs = list(providers or ["CPUExecutionProvider"])
    if "CPUExecutionProvider" not in provs:
        provs.append("CPUExecutionProvider")
    model = bytes(path) if isinstance(path, (bytes, bytearray)) else str(path)
    return ort.InferenceSession(model, sess_options=opts, providers=provs)


def _summary(times_s: list[float], batch_size: int) -> dict:
    ms = np.asarray(times_s) * 1e3
    med = float(np.median(ms))
    p25, p75, p90, p99 = (float(v) for v in np.percentile(ms, [25, 75, 90, 99]))
    # the quartiles give the spread a baseline latency gate allows for (kdcli.reports.gates)
    return {"median_ms": med, "p90_ms": p90, "p99_ms": p99,
            "mean_ms": float(ms.mean()), "min_ms": float(ms.min()), "p25_ms": p25, "p75_ms": p75,
            "throughput": batch_size / (med / 1e3) if med > 0 else float("inf"), "runs": int(len(ms))}


def alternate(runners: dict[str, Callable[[], object]], *, time_budget_s: float, warmup: int = WARMUP_RUNS,
              min_runs: int = MIN_RUNS, max_runs: int = MAX_RUNS) -> dict[str, list[float]]:
    """Time each runner in turn (a, b, a, b …) until ``time_budget_s`` is spent (after ``warmup``
    untimed rounds) and each has ``min_runs``; returns the wall times in seconds per runner."""
    for _ in range(warmup):
        for run in runners.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_runs and (rounds < min_runs or time.perf_counter() - start < time_budget_s):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return times


def measure_latency(models: dict[str, str | Path], input_shape: Sequence[int], batch_sizes: Sequence[int] = (1, 64),
                    *, time_budget_s: float = 2.0, threads: int | None = None,
                    providers: Sequence[str] | None = None, seed: int = 0) -> dict:
    """onnxruntime latency of each ONNX model in ``models`` (name → path) on inputs [bs, *input_shape].

    Models are timed alternating within each batch size, ``time_budget_s`` per batch size shared by
    all models. Returns ``{name: {bs: {"median_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "p25_ms",
    "p75_ms", "throughput" (samples/s), "runs", "provider", "threads"}}}``; ``provider`` is the one
    onnxruntime actually used (``providers[0]`` unless it is unavailable).
    """
    threads = int(threads or default_threads())
    # Each session owns a thread pool whose idle threads spin after a run; alternating sessions
    # would then compete with the other model's spinning pool (on 2 shared cores this swung the
    # teacher/student ratio by ±15 %), so pools sleep when more than one model is measured.
    spinning = len(models) == 1
    sessions = {name: make_session(p, providers=providers, threads=threads, spinning=spinning)
                for name, p in models.items()}
    rng = np.random.default_rng(seed)
    out: dict = {name: {} for name in models}
    for bs in batch_sizes:
        x = rng.standard_normal((int(bs), *input_shape)).astype(np.float32)
        runners = {}
        for name, sess in sessions.items():
            feed = {sess.get_inputs()[0].name: x}
            runners[name] = (lambda s=sess, f=feed: s.run(None, f))
        times = alternate(runners, time_budget_s=time_budget_s)
        for name, sess in sessions.items():
            out[name][int(bs)] = {**_summary(times[name], int(bs)), "provider": sess.get_providers()[0],
                                  "threads": threads}
    return out


def measure_torch_latency(models: dict, input_shape: Sequence[int], batch_sizes: Sequence[int] = (1, 64),
                          time_budget_s: float = 2.0, *, seed: int = 0) -> dict:
    """PyTorch eager (CPU, ``inference_mode``) latency of ``models`` (name → nn.Module), alternating as
    in :func:`measure_latency`; same result layout, with ``provider: "pytorch-eager"``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out: dict = {name: {} for name in models}
    modes = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        with torch.inference_mode():
            for bs in batch_sizes:
                x = torch.randn(int(bs), *input_shape, generator=gen)
                runners = {name: (lambda m=m: m(x)) for name, m in models.items()}
                times = alternate(runners, time_budget_s=time_budget_s)
                for name in models:
                    out[name][int(bs)] = {**_summary(times[name], int(bs)), "provider": "pytorch-eager",
                                          "threads": torch.get_num_threads()}
    finally:
        for name, m in models.items():
            m.train(modes[name])
    return out
