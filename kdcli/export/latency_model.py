"""A latency model of a network's structure: a lookup table of onnxruntime layer latencies.

MACs are a proxy; the user pays in milliseconds, and onnxruntime's CPU kernels do not charge
per MAC (a convolution whose channel counts are not multiples of the kernels' block runs on a
slower path). Latency-aware pruning therefore asks, for each candidate width, what the runtime
does with it. As NetAdapt (Yang et al. 2018) and HALP (Shen et al. 2022) do, the latency of a
network is modelled as the sum of its layers' latencies, each looked up in a table measured on
the runtime itself:

- a layer's :class:`LayerSig` is what its latency depends on: op (conv / linear), kernel,
  stride, padding, dilation, groups, input H×W (tokens for a linear layer), input and output
  channels, bias and batch size; channel pruning changes only the channel counts (and groups);
- :class:`LatencyTable` times a one-layer ONNX model of the signature (conv + ReLU, the block
  onnxruntime runs after folding BatchNorm into the conv; MatMul + bias for a linear layer) in
  onnxruntime, lazily, the first time a signature is asked for, and keeps the time (the fastest
  of its runs: see :func:`time_layer`) in a JSON
  file (``latency_lut.json`` in the run directory, reused on resume), under a key naming the
  onnxruntime version, the execution provider and the thread count (a table measured with other
  settings is another table);
- :class:`LatencyModel` predicts a model's latency as the sum over its conv/linear layer calls,
  times a calibration scale: once per step the real model is timed and the scale set to
  measured / predicted, which carries what the sum leaves out (pooling, additions, layer
  norms, the memory traffic between layers) as a proportion;
- :func:`plan_for_latency` chooses what to prune for a latency aim: HALP's greedy, block by
  block (``round_to`` channels, or a few at a time in wide groups), the block of least channel
  importance per millisecond of predicted latency it saves, until the prediction is at or under
  the aim. Importance per unit of latency, not per MAC: a block that saves MACs but no time (an
  unaligned width) is removed last.
"""

from __future__ import annotations

import copy
import heapq
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from kdcli import distributed
from kdcli.export.latency import alternate, default_threads, make_session, measure_latency
from kdcli.files import atomic_write_json
from kdcli.models.utils import is_main_process

LUT_FILE = "latency_lut.json"
LUT_VERSION = 1
PROVIDER = "CPUExecutionProvider"
LAYER_TYPES = (nn.Conv2d, nn.Linear)
NO_SAVING = 1e12  # priority of a block (or candidate) that saves no time: taken last


# ----------------------------------------------------------------------------- signatures


@dataclass(frozen=True)
class LayerSig:
    """What one conv/linear layer's latency depends on. ``hw``: the input's H, W (conv) or
    ``(tokens, 1)`` (linear: rows per sample, 1 for a plain [B, C] input)."""

    op: str
    cin: int
    cout: int
    groups: int = 1
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    hw: tuple[int, int] = (1, 1)
    bias: bool = True
    batch: int = 1

    def key(self) -> str:
        """The table key, e.g. ``conv k3x3 s1x1 p1x1 d1x1 g1 in32x32 c64>64 b16``."""
        x = lambda t: f"{t[0]}x{t[1]}"  # noqa: E731
        if self.op == "linear":
            return f"linear t{self.hw[0]} c{self.cin}>{self.cout} bias{int(self.bias)} b{self.batch}"
        return (f"conv k{x(self.kernel)} s{x(self.stride)} p{x(self.padding)} d{x(self.dilation)} g{self.groups} "
                f"in{x(self.hw)} c{self.cin}>{self.cout} b{self.batch}")

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the layer (for tests and sanity checks)."""
        if self.op == "linear":
            return self.batch * self.hw[0] * self.cin * self.cout
        h = (self.hw[0] + 2 * self.padding[0] - self.dilation[0] * (self.kernel[0] - 1) - 1) // self.stride[0] + 1
        w = (self.hw[1] + 2 * self.padding[1] - self.dilation[1] * (self.kernel[1] - 1) - 1) // self.stride[1] + 1
        return self.batch * h * w * self.cout * (self.cin // max(self.groups, 1)) * self.kernel[0] * self.kernel[1]


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _conv_padding(m: nn.Conv2d) -> tuple[int, int]:
    if isinstance(m.padding, str):  # 'valid' or 'same' (stride 1): symmetric for odd kernels
        if m.padding == "valid":
            return (0, 0)
        return tuple(d * (k - 1) // 2 for k, d in zip(_pair(m.kernel_size), _pair(m.dilation)))
    return _pair(m.padding)


@dataclass(frozen=True)
class LayerCall:
    """One call of a conv/linear module in the forward pass: its path and input geometry."""

    name: str
    hw: tuple[int, int]

    def sig(self, module: nn.Module, batch: int, widths: tuple[int, int, int] | None = None) -> LayerSig:
        """The signature of this call with the module as it is now, or with ``widths`` (cin, cout, groups)."""
        if isinstance(module, nn.Linear):
            cin, cout, groups = widths or (module.in_features, module.out_features, 1)
            return LayerSig("linear", int(cin), int(cout), 1, hw=self.hw, bias=module.bias is not None, batch=batch)
        cin, cout, groups = widths or (module.in_channels, module.out_channels, module.groups)
        groups = math.gcd(math.gcd(int(cin), int(cout)), int(groups))  # widths from deltas stay divisible
        return LayerSig("conv", int(cin), int(cout), groups, _pair(module.kernel_size), _pair(module.stride),
                        _conv_padding(module), _pair(module.dilation), self.hw, module.bias is not None, batch)


def layer_calls(model: nn.Module, example: torch.Tensor) -> list[LayerCall]:
    """The conv (2-D) and linear layer calls of one forward pass on ``example``, in order, with
    their input geometry (H×W, or tokens per sample). Channel pruning leaves these unchanged."""
    names = {m: n for n, m in model.named_modules()}
    calls: list[LayerCall] = []

    def hook(m, inputs, _out):
        x = inputs[0]
        if isinstance(m, nn.Conv2d):
            hw = (int(x.shape[-2]), int(x.shape[-1]))
        else:
            hw = (int(math.prod(x.shape[1:-1])) if x.dim() > 2 else 1, 1)
        calls.append(LayerCall(names[m], hw))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, LAYER_TYPES)]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return calls


# ----------------------------------------------------------------------------- one-layer timing


def layer_onnx(sig: LayerSig, opset: int = 18) -> bytes:
    """A one-layer ONNX model of ``sig``: Conv (+ bias, as BatchNorm folds into it) + Relu, or
    MatMul + Add for a linear layer, on a fixed batch; random weights."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    f32 = TensorProto.FLOAT
    if sig.op == "linear":
        shape = [sig.batch, sig.cin] if sig.hw[0] == 1 else [sig.batch, sig.hw[0], sig.cin]
        out = shape[:-1] + [sig.cout]
        w = numpy_helper.from_array((rng.standard_normal((sig.cin, sig.cout)) * 0.05).astype(np.float32), "W")
        inits = [w]
        nodes = [helper.make_node("MatMul", ["x", "W"], ["y" if not sig.bias else "m"])]
        if sig.bias:
            inits.append(numpy_helper.from_array(np.zeros(sig.cout, np.float32), "B"))
            nodes.append(helper.make_node("Add", ["m", "B"], ["y"]))
    else:
        shape = [sig.batch, sig.cin, *sig.hw]
        kh, kw = sig.kernel
        w = (rng.standard_normal((sig.cout, sig.cin // sig.groups, kh, kw)) * 0.05).astype(np.float32)
        inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros(sig.cout, np.float32), "B")]
        nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], kernel_shape=[kh, kw], strides=list(sig.stride),
                                  pads=[sig.padding[0], sig.padding[1], sig.padding[0], sig.padding[1]],
                                  dilations=list(sig.dilation), group=sig.groups),
                 helper.make_node("Relu", ["c"], ["y"])]
        out = None  # inferred
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", f32, shape)],
                              [helper.make_tensor_value_info("y", f32, out)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="kdcli-lut")
    model.ir_version = min(model.ir_version, 9)
    return model.SerializeToString()


def time_layer(sig: LayerSig, *, threads: int, provider: str = PROVIDER, time_budget_s: float = 0.05,
               min_runs: int = 10, max_runs: int = 200) -> float:
    """onnxruntime latency (ms) of the one-layer model of ``sig``: the fastest of its timed runs
    (two warm-up runs, then runs until ``min_runs`` and ``time_budget_s`` are both reached). The
    fastest, not the median: on a shared machine other work slows runs at random, by several
    times (medians of one layer's widths measured minutes apart were not even monotone in the
    width); the least disturbed run is what the layer costs, and the calibration of
    :class:`LatencyModel` carries the typical slowdown."""
    sess = make_session(layer_onnx(sig), providers=[provider], threads=threads)
    shape = [sig.batch, sig.cin, *sig.hw] if sig.op == "conv" else \
        ([sig.batch, sig.cin] if sig.hw[0] == 1 else [sig.batch, sig.hw[0], sig.cin])
    feed = {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
    times = alternate({"layer": lambda: sess.run(None, feed)}, time_budget_s=time_budget_s, warmup=2,
                      min_runs=min_runs, max_runs=max_runs)["layer"]
    return float(min(times) * 1e3)


def runtime_key(threads: int, provider: str = PROVIDER) -> str:
    """What a table's timings hold for: the onnxruntime version, provider and intra-op threads."""
    import onnxruntime as ort

    return f"onnxruntime {ort.__version__}; {provider}; {int(threads)} threads"


class LatencyTable:
    """Layer latencies (ms) by :meth:`LayerSig.key`, measured on demand and kept in ``path``
    (JSON; none: in memory only). ``measured`` counts the timings this object took: a signature
    already in the table (from this object or the file) is never timed again. ``timer``
    (``sig → ms``) replaces the onnxruntime timing (tests)."""

    def __init__(self, path: str | Path | None = None, *, threads: int | None = None, provider: str = PROVIDER,
                 time_budget_s: float = 0.05, timer: Callable[[LayerSig], float] | None = None):
        self.path = Path(path) if path is not None else None
        self.threads = int(threads or default_threads())
        self.provider = provider
        self.time_budget_s = float(time_budget_s)
        self.timer = timer
        self.key = runtime_key(self.threads, provider)
        self.measured = 0
        self._all: dict = {}
        if self.path is not None and self.path.is_file():
            try:
                obj = json.loads(self.path.read_text())
                if isinstance(obj, dict) and obj.get("version") == LUT_VERSION and isinstance(obj.get("tables"), dict):
                    self._all = obj["tables"]
            except (OSError, ValueError):  # an unreadable cache is measured again, not an error
                self._all = {}
        self.entries: dict[str, float] = {k: float(v) for k, v in (self._all.get(self.key) or {}).items()
                                          if isinstance(v, (int, float))}
        # under torchrun every rank starts from rank 0's table (the file may be mid-write by rank 0),
        # so all ranks miss the same signatures and only misses need a collective
        self._all, self.entries = distributed.broadcast((self._all, self.entries))
        self._unsaved = 0

    def __len__(self) -> int:
        return len(self.entries)

    def ms(self, sig: LayerSig) -> float:
        """The latency of ``sig``: from the table, else timed now (and added). Under torchrun
        rank 0 times a missing one and every rank adds its figure (a timing is the clock's, not
        the data's)."""
        k = sig.key()
        v = self.entries.get(k)
        if v is None:
            v = distributed.on_main(self._time, sig)
            self.entries[k] = v
            self.measured += 1
            self._unsaved += 1
            if self._unsaved >= 32:
                self.save()
        return v

    def _time(self, sig: LayerSig) -> float:
        if self.timer is not None:
            return float(self.timer(sig))
        return time_layer(sig, threads=self.threads, provider=self.provider, time_budget_s=self.time_budget_s)

    def save(self) -> None:
        """Write the table (all runtimes' tables in the file are kept) atomically; rank 0 only."""
        if self.path is None or not self._unsaved or not is_main_process():
            self._unsaved = 0
            return
        self._all[self.key] = dict(sorted(self.entries.items()))
        atomic_write_json(self.path, {"version": LUT_VERSION, "tables": self._all})
        self._unsaved = 0


# ----------------------------------------------------------------------------- the model


class LatencyModel:
    """Predicted onnxruntime latency of ``model``'s structure at ``batch_size``: the sum of its
    conv/linear layer calls' table latencies, times ``scale`` (:meth:`calibrate`)."""

    def __init__(self, model: nn.Module, example: torch.Tensor, table: LatencyTable, batch_size: int = 1):
        self.model, self.table, self.batch = model, table, int(batch_size)
        self.calls = layer_calls(model, example)
        self.scale = 1.0
        # looked up for every layer call of every candidate plan: built once (pruning, trial or
        # applied, changes the modules in place, never which modules there are)
        self._modules = dict(model.named_modules())

    def modules(self) -> dict[str, nn.Module]:
        return self._modules

    def widths(self) -> dict[str, tuple[int, int, int]]:
        """(cin, cout, groups) of every conv/linear layer as the model is now."""
        out = {}
        for name, m in self.modules().items():
            if isinstance(m, nn.Linear):
                out[name] = (m.in_features, m.out_features, 1)
            elif isinstance(m, nn.Conv2d):
                out[name] = (m.in_channels, m.out_channels, m.groups)
        return out

    def layer_ms(self, call: LayerCall, widths: tuple[int, int, int] | None = None) -> float:
        return self.table.ms(call.sig(self.modules()[call.name], self.batch, widths))

    def raw(self, widths: dict[str, tuple[int, int, int]] | None = None) -> float:
        """Sum of the layer latencies (ms), uncalibrated; ``widths`` overrides layers' channels."""
        mods = self.modules()
        return sum(self.table.ms(c.sig(mods[c.name], self.batch, (widths or {}).get(c.name))) for c in self.calls)

    def predict(self, widths: dict[str, tuple[int, int, int]] | None = None) -> float:
        """Predicted latency (ms) of the model as it is now (or with ``widths``)."""
        return self.raw(widths) * self.scale

    def calibrate(self, measured_ms: float) -> float:
        """Scale predictions so that the model as it is now predicts ``measured_ms``; returns the scale."""
        raw = self.raw()
        self.scale = float(measured_ms) / raw if raw > 0 and measured_ms > 0 else 1.0
        return self.scale


# ----------------------------------------------------------------------------- planning


def _levels(n: int, r: int) -> list[int]:
    """The channel counts a group of ``n`` may keep under ``round_to`` ``r`` (the pruner's
    rule): n itself, then multiples of r below it, down to r (at least 1)."""
    if n <= 1 or (r > 1 and n <= r):
        return [n]
    return [n] + [m * r for m in range((n - 1) // r, 0, -1)]


def _deltas(pruner, lm: LatencyModel, group: str, scores, keep: int) -> dict[str, tuple[float, float, float]]:
    """Per removed channel of ``group``: how each conv/linear layer's (cin, cout, groups) change,
    read from a trial pruning down to ``keep`` channels (a flatten makes one channel several inputs)."""
    before = lm.widths()
    n = len(scores[group])
    order = torch.sort(torch.as_tensor(scores[group], dtype=torch.float64).reshape(-1), stable=True).indices
    with pruner.trial({group: sorted(int(i) for i in order[:n - keep])}, check=False):
        after = lm.widths()
    gone = n - keep
    return {name: tuple((b - a) / gone for b, a in zip(before[name], after[name]))
            for name in before if name in after and before[name] != after[name]}


@dataclass
class LatencyPlan:
    """What :func:`plan_for_latency` chose: the plan, τ (importance per ms saved of the last
    block removed), the predicted latency before and after (calibrated ms), the aim, and how many
    layer timings the table took for it."""

    plan: dict[str, list[int]]
    tau: float
    before_ms: float
    predicted_ms: float
    aim_ms: float
    measured: int
    how: str = ""  # what predicted it, for the step's log line (empty: the lookup table)


def plan_for_latency(pruner, scores: dict[str, torch.Tensor], aim_ms: float, model: LatencyModel | None = None,
                     *, steps_per_group: int = 16) -> LatencyPlan:
    """The plan (group → channels to remove) whose predicted latency lands at or just under
    ``aim_ms`` (calibrated ms of ``model``; without one, an in-memory table at batch 1).

    HALP's greedy on the latency lookup table: every group's channels are removed lowest score
    first, in blocks (``round_to`` channels, several in wide groups: about ``steps_per_group``
    blocks span a group), and each round removes the block whose summed importance per
    millisecond of predicted latency saved is least (evaluated lazily: a block's saving changes
    when a neighbouring group narrows a layer they share). Blocks whose removal saves no time
    are taken only when nothing else is left. No group goes below ``aim / now`` of its width
    while the aim can be reached otherwise, then ``(aim / now)²``, then any width: with flat
    scores the ratio alone would empty the group whose channels cost the most time first. Then
    ``round_to`` blocks are given back, highest importance first, while the prediction stays
    under the aim. Groups keep at least ``round_to`` channels (one without it; an attention
    group's units are heads, one at a time, at least one kept). Widths between
    the measured ones follow each group's per-channel change of every layer (a trial pruning per
    group); the returned prediction is the plan's exact widths'. The aim may be out of reach: the
    plan then goes as far as the groups allow."""
    lm = model or LatencyModel(pruner.model, pruner.example, LatencyTable(None), 1)
    start_measured = lm.table.measured
    scale = lm.scale
    aim_raw = float(aim_ms) / scale
    base = lm.widths()
    calls_by_layer: dict[str, list[LayerCall]] = {}
    for c in lm.calls:
        calls_by_layer.setdefault(c.name, []).append(c)
    total = lm.raw()
    before_ms = total * scale
    sorted_scores = {g: torch.sort(torch.as_tensor(s, dtype=torch.float64).reshape(-1), stable=True)
                     for g, s in scores.items() if g in pruner.groups}
    levels = {g: _levels(len(s.values), pruner.round_of(g)) for g, s in sorted_scores.items()}
    levels = {g: lv for g, lv in levels.items() if len(lv) > 1}
    deltas = {g: _deltas(pruner, lm, g, scores, lv[1]) for g, lv in levels.items()}
    deltas = {g: d for g, d in deltas.items() if d}
    step = {g: max(1, (len(levels[g]) - 1) // steps_per_group) for g in deltas}
    pos = {g: 0 for g in deltas}  # index into levels[g]
    removed = {g: 0 for g in deltas}  # channels removed per group

    def layer_widths(name: str, extra: dict[str, int] | None = None) -> tuple[int, int, int]:
        w = list(base[name])
        for g, k in removed.items():
            k = k + (extra or {}).get(g, 0)
            d = deltas[g].get(name)
            if d and k:
                w = [wi - di * k for wi, di in zip(w, d)]
        return tuple(max(1, int(round(v))) for v in w)

    def layers_ms(names, extra=None) -> float:
        return sum(lm.layer_ms(c, layer_widths(name, extra)) for name in names for c in calls_by_layer.get(name, []))

    floor = {g: 0 for g in deltas}  # the fewest channels a group may keep at the current cap

    def candidate(g: str) -> tuple[float, float, int] | None:
        """(priority, raw ms saved, new level index) of group g's next block; None at its floor."""
        i = pos[g]
        j = min(i + step[g], len(levels[g]) - 1)
        while j > i and levels[g][j] < floor[g]:
            j -= 1
        if j <= i:
            return None
        n_new = levels[g][j]
        names = list(deltas[g])
        saved = layers_ms(names) - layers_ms(names, {g: levels[g][i] - n_new})
        vals = sorted_scores[g].values
        n = len(vals)
        importance = float(vals[n - levels[g][i]:n - n_new].sum())
        # a block that saves no time (or only noise) comes last, the least important first
        pri = importance / saved if saved > 1e-9 else NO_SAVING * (1.0 + importance)
        return pri, saved, j

    tau = 0.0
    ratio = min(1.0, aim_raw / total) if total > 0 else 1.0
    # A cap per step: no group below ratio (then ratio², then none) of its width, relaxed only
    # when the aim is out of reach under it. Importance per millisecond alone would take a whole
    # group first where scores are flat (a random or freshly trained net): uniform importance
    # makes the knapsack empty the group whose channels cost the most time.
    for cap in (ratio, ratio * ratio, 0.0):
        if total <= aim_raw:
            break
        for g in deltas:
            floor[g] = int(math.ceil(cap * levels[g][0]))
        heap = [(c[0], g) for g in deltas if (c := candidate(g)) is not None]
        heapq.heapify(heap)
        guard = 20 * sum(len(lv) for lv in levels.values()) + 100
        while heap and total > aim_raw and guard > 0:
            guard -= 1
            _, g = heapq.heappop(heap)
            c = candidate(g)
            if c is None:
                continue
            pri, saved, j = c
            if heap and pri > heap[0][0] * (1 + 1e-9):  # stale: a neighbour changed its saving; re-queue
                heapq.heappush(heap, (pri, g))
                continue
            removed[g] += levels[g][pos[g]] - levels[g][j]
            pos[g] = j
            total -= saved
            if pri < NO_SAVING:
                tau = pri
            nxt = candidate(g)
            if nxt is not None:
                heapq.heappush(heap, (nxt[0], g))

    # give back one level (round_to channels) at a time, best first, while the prediction stays under the aim
    if total < aim_raw:
        blocked: set[str] = set()
        for _ in range(4 * max(len(deltas), 1) + 16):
            cands = []
            for g in deltas:
                if g in blocked or pos[g] == 0:
                    continue
                n, kept, up = len(sorted_scores[g].values), levels[g][pos[g]], levels[g][pos[g] - 1]
                cands.append((float(sorted_scores[g].values[n - up:n - kept].mean()), g, up - kept))
            if not cands:
                break
            _, g, back = max(cands)
            names = list(deltas[g])
            cost = layers_ms(names, {g: -back}) - layers_ms(names)
            if total + cost <= aim_raw:
                removed[g] -= back
                pos[g] -= 1
                total += cost
            else:
                blocked.add(g)

    plan = {}
    for g, k in removed.items():
        if k > 0:
            idx = sorted_scores[g].indices[:k]
            plan[g] = sorted(int(i) for i in idx)
    predicted = before_ms
    if plan:  # the exact widths of the plan (the linear deltas are a guide), predicted once more
        with pruner.trial(plan, check=False):
            predicted = lm.raw() * scale
    lm.table.save()
    return LatencyPlan(plan, float(tau), before_ms, predicted, float(aim_ms), lm.table.measured - start_measured)


# ----------------------------------------------------------------------------- whole models


def structure_key(model: nn.Module) -> tuple:
    """What a model's latency depends on: its class, every parameter's and buffer's shape and
    every conv's groups (not the values)."""
    shapes = tuple((n, tuple(t.shape)) for n, t in model.state_dict().items())
    groups = tuple((n, m.groups) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    return (type(model).__module__, type(model).__qualname__, shapes, groups)


_MEASURED: dict[tuple, dict] = {}


def _timing_onnx(model: nn.Module, input_shape: Sequence[int], path: Path) -> None:
    """Export for timing: the TorchScript exporter (seconds, where torch.export takes ten on a
    ResNet-18; onnxruntime optimises both graphs alike), torch.export as the fallback."""
    from kdcli.export.onnx import _export_torchscript, _save, export_onnx

    m = copy.deepcopy(model).cpu().eval()
    example = torch.zeros(2, *input_shape)
    try:
        _save(_export_torchscript(m, example, 18, path.parent), path, False)
    except Exception:  # noqa: BLE001 - any exporter failure: the pipeline's own exporter
        export_onnx(m, example, path)


def measure_models(models: dict[str, nn.Module], input_shape: Sequence[int], batch_size: int, *,
                   threads: int | None = None, time_budget_s: float = 1.0) -> dict[str, dict]:
    """onnxruntime latency statistics (:func:`kdcli.export.latency.measure_latency`) of each model at
    ``batch_size``, alternating; a set of structures already measured in this process at these
    settings is not measured again (latency depends on the structure, not on the weights). Under
    torchrun rank 0 measures and every rank gets its figures."""
    if distributed.active():
        return distributed.on_main(measure_models, models, input_shape, batch_size, threads=threads,
                                   time_budget_s=time_budget_s)
    threads = int(threads or default_threads())
    key = (tuple(structure_key(m) for m in models.values()), tuple(input_shape), int(batch_size), threads,
           float(time_budget_s))
    if key not in _MEASURED:
        with tempfile.TemporaryDirectory() as tmp:
            paths = {}
            for name, m in models.items():
                paths[name] = Path(tmp) / f"{name}.onnx"
                _timing_onnx(m, input_shape, paths[name])
            lat = measure_latency(paths, tuple(input_shape), (int(batch_size),), time_budget_s=time_budget_s,
                                  threads=threads)
        if len(_MEASURED) > 64:
            _MEASURED.clear()
        _MEASURED[key] = {name: lat[name][int(batch_size)] for name in models}
    return _MEASURED[key]
