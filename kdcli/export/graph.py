"""Graph clean-up applied to every exported ONNX model before it is saved (:func:`simplify`).

onnxruntime folds BatchNormalization into Conv and drops Identity at session start, but other
runtimes (TensorRT, OpenVINO, TFLite converters, microcontroller tool chains) may not, and a
smaller graph loads faster everywhere. So the file itself carries the folded graph:

* ``Conv -> BatchNormalization`` (inference form) where the Conv's output feeds nothing else:
  per output channel ``f = γ / √(var + ε)``, ``W' = W·f``, ``b' = (b − mean)·f + β`` (a bias is
  created when the Conv has none);
* ``Identity`` nodes removed, their consumers (and graph outputs) rewired;
* GELU in the order onnxruntime fuses: torch.export writes the exact GELU as
  ``x · (0.5 · (1 + erf(x / √2)))``, which onnxruntime's Gelu fusion does not recognise (its
  ``BiasGelu``/``Gelu`` kernels then stay unused and a ViT runs the five elementwise ops instead);
  the two products are swapped to ``(x · (1 + erf(x / √2))) · 0.5``, the TorchScript exporter's
  order, which it fuses. Exact: a product with 0.5 only changes the exponent;
* initializers no longer used dropped.

Weights held as external data that is not loaded in memory are left alone (nothing is folded
for them). The exporters kdcli uses usually fold BatchNorm themselves; then there is nothing to do.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["simplify"]

_DEFAULT_DOMAINS = ("", "ai.onnx")


def simplify(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """Fold Conv+BatchNormalization, remove Identity nodes, put GELU in the order onnxruntime
    fuses and drop unused initializers, in place.

    Returns ``(proto, stats)``; ``stats`` = ``{"nodes_before", "nodes", "batchnorm_folded",
    "identity_removed", "gelu_reordered", "initializers_removed", "notes"}`` (``notes``: why a BatchNormalization
    was left, e.g. weights in external data)."""
    graph = proto.graph
    before = len(graph.node)
    notes: list[str] = []
    folded = _fold_batchnorm(graph, notes)
    removed = _remove_identity(graph)
    gelu = _reorder_gelu(graph)
    dropped = _drop_unused_initializers(graph)
    _drop_stale_value_info(graph)
    return proto, {"nodes_before": before, "nodes": len(graph.node), "batchnorm_folded": folded,
                   "identity_removed": removed, "gelu_reordered": gelu, "initializers_removed": dropped,
                   "notes": notes}


# ------------------------------------------------------------------------------------ helpers

def _subgraphs(node: onnx.NodeProto):
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _uses(graph: onnx.GraphProto) -> Counter:
    """How often each name is read: node inputs (subgraphs' too, which may read outer names) and
    graph outputs."""
    uses: Counter = Counter()
    for node in graph.node:
        uses.update(n for n in node.input if n)
        for sub in _subgraphs(node):
            uses.update(_uses(sub))
    uses.update(o.name for o in graph.output)
    return uses


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every read of ``old`` (node inputs, here and in subgraphs) reads ``new`` instead."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for sub in _subgraphs(node):
            _rename_uses(sub, old, new)


def _in_memory(t: onnx.TensorProto) -> bool:
    return t.data_location != onnx.TensorProto.EXTERNAL


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _unique(base: str, taken: set[str]) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


# ---------------------------------------------------------------------------- BatchNorm folding

def _fold_batchnorm(graph: onnx.GraphProto, notes: list[str]) -> int:
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output if o}
    graph_outputs = {o.name for o in graph.output}
    graph_inputs = {i.name for i in graph.input}
    uses = _uses(graph)
    taken = _all_names(graph)
    folded, external, dead = 0, 0, []
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or bn.domain not in _DEFAULT_DOMAINS or len(bn.input) != 5:
            continue
        if _attr(bn, "training_mode", 0) or not _attr(bn, "spatial", 1) or any(o for o in bn.output[1:]):
            continue
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or conv.domain not in _DEFAULT_DOMAINS or len(conv.input) < 2:
            continue
        if uses[bn.input[0]] != 1 or bn.input[0] in graph_outputs:
            continue
        names = [conv.input[1], *(conv.input[2:3] if len(conv.input) > 2 and conv.input[2] else []), *bn.input[1:]]
        if any(n not in inits or n in graph_inputs for n in names):  # computed or overridable: not foldable
            continue
        if not all(_in_memory(inits[n]) for n in names):
            external += 1
            continue
        w_t = inits[conv.input[1]]
        w = numpy_helper.to_array(w_t)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64).reshape(-1) for n in bn.input[1:])
        m = w.shape[0]
        if w.ndim < 3 or not np.issubdtype(w.dtype, np.floating) or any(len(a) != m for a in (gamma, beta, mean, var)):
            continue
        has_bias = len(conv.input) > 2 and bool(conv.input[2])
        b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64).reshape(-1) if has_bias else np.zeros(m)
        if len(b) != m:
            continue
        f = gamma / np.sqrt(var + float(_attr(bn, "epsilon", 1e-5)))
        w_new = (w.astype(np.float64) * f.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype)
        b_new = ((b - mean) * f + beta).astype(w.dtype)
        # a weight read elsewhere too (shared, or a Shape of it) keeps its value: the Conv gets a new one
        w_name = conv.input[1] if uses[conv.input[1]] == 1 else _unique(f"{conv.input[1]}_bn", taken)
        _set_init(graph, inits, w_name, w_new)
        if has_bias and uses[conv.input[2]] == 1:
            b_name = conv.input[2]
        else:
            b_name = _unique(f"{bn.output[0]}_bias" if not has_bias else f"{conv.input[2]}_bn", taken)
        _set_init(graph, inits, b_name, b_new)
        conv.input[1] = w_name
        if has_bias:
            conv.input[2] = b_name
        else:
            del conv.input[2:]
            conv.input.append(b_name)
        conv.output[0] = bn.output[0]
        producer[bn.output[0]] = conv
        dead.append(bn)
        folded += 1
    for bn in dead:
        graph.node.remove(bn)
    if external:
        notes.append(f"{external} BatchNormalization node(s) not folded: their weights are external data "
                     "not loaded in memory")
    return folded


def _set_init(graph: onnx.GraphProto, inits: dict, name: str, value: np.ndarray) -> None:
    tensor = numpy_helper.from_array(value, name)
    if name in inits:
        inits[name].CopyFrom(tensor)
    else:
        graph.initializer.append(tensor)
        inits[name] = graph.initializer[-1]


# ---------------------------------------------------------------------------------- Identity

def _remove_identity(graph: onnx.GraphProto) -> int:
    """Drop Identity nodes: consumers read the Identity's input instead. When its output is a
    graph output, the node producing its input writes that output directly; an Identity between
    a graph input or initializer (or another graph output) and a graph output stays."""
    removed = 0
    for node in list(graph.node):
        if node.op_type != "Identity" or node.domain not in _DEFAULT_DOMAINS or len(node.input) != 1:
            continue
        src, dst = node.input[0], node.output[0]
        outputs = {o.name for o in graph.output}
        if dst not in outputs:
            graph.node.remove(node)
            _rename_uses(graph, dst, src)
            removed += 1
            continue
        producer = next((n for n in graph.node if src in n.output), None)
        if producer is None or src in outputs:  # a graph input, an initializer, or itself an output
            continue
        graph.node.remove(node)
        producer.output[list(producer.output).index(src)] = dst
        _rename_uses(graph, src, dst)
        removed += 1
    return removed


# ------------------------------------------------------------------------------------- GELU

def _scalar(inits: dict, producer: dict, name: str) -> float | None:
    """The value of ``name`` when it is a one-element constant (initializer or Constant node)."""
    t = inits.get(name)
    if t is None:
        node = producer.get(name)
        if node is None or node.op_type != "Constant" or node.domain not in _DEFAULT_DOMAINS:
            return None
        t = _attr(node, "value", None)
        if t is None:
            return None
    if not _in_memory(t):
        return None
    v = numpy_helper.to_array(t)
    return float(v.reshape(-1)[0]) if v.size == 1 else None


def _reorder_gelu(graph: onnx.GraphProto) -> int:
    """``x · (0.5 · (1 + erf(x / √2)))`` → ``(x · (1 + erf(x / √2))) · 0.5`` (see the module doc);
    returns how many were rewritten. Only a chain whose intermediate results have no other reader."""
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output if o}
    reader = {i: n for n in graph.node for i in n.input if i}
    uses = _uses(graph)  # subgraph reads and graph outputs count too

    def only_reader(name: str, op: str):
        r = reader.get(name)
        ok = uses[name] == 1 and r is not None and r.op_type == op and r.domain in _DEFAULT_DOMAINS
        return r if ok else None

    def other(node, name: str) -> str:
        return node.input[1] if node.input[0] == name else node.input[0]

    done = 0
    for erf in [n for n in graph.node if n.op_type == "Erf" and n.domain in _DEFAULT_DOMAINS]:
        div = producer.get(erf.input[0])
        if div is None or div.op_type != "Div" or div.domain not in _DEFAULT_DOMAINS or len(div.input) != 2:
            continue
        root2 = _scalar(inits, producer, div.input[1])
        if root2 is None or abs(root2 - 2 ** 0.5) > 1e-5:
            continue
        x = div.input[0]
        add = only_reader(erf.output[0], "Add")
        half = add and only_reader(add.output[0], "Mul")
        if half is None or _scalar(inits, producer, other(add, erf.output[0])) != 1.0:
            continue
        c = other(half, add.output[0])
        last = only_reader(half.output[0], "Mul")
        if last is None or _scalar(inits, producer, c) != 0.5 or other(last, half.output[0]) != x:
            continue
        half.input[:] = [x, add.output[0]]   # x · (1 + erf)
        last.input[:] = [half.output[0], c]  # · 0.5
        done += 1
    return done


# ------------------------------------------------------------------------------------- clean-up

def _drop_unused_initializers(graph: onnx.GraphProto) -> int:
    uses = _uses(graph)
    dead = [t for t in graph.initializer if t.name not in uses]
    names = {t.name for t in dead}
    for t in dead:
        graph.initializer.remove(t)
    for i in [i for i in graph.input if i.name in names]:  # IR < 4 lists initializers as inputs
        graph.input.remove(i)
    return len(dead)


def _drop_stale_value_info(graph: onnx.GraphProto) -> None:
    """Shape annotations of names that no longer exist (a folded Conv's old output, a removed
    Identity's output)."""
    live = {o for n in graph.node for o in n.output} | {i.name for i in graph.input} | \
        {t.name for t in graph.initializer}
    for vi in [vi for vi in graph.value_info if vi.name not in live]:
        graph.value_info.remove(vi)
