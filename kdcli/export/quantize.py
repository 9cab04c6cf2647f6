"""Dynamic int8 quantisation of an exported model (``export.quantize: dynamic``).

onnxruntime's ``quantize_dynamic`` stores the weights of the operators it supports (Conv,
MatMul, ... — its choice) as int8 and quantises activations on the fly, so no calibration data is
needed; CPU inference gets faster and the file about four times smaller, at a small accuracy cost
that the export report measures. ``quant_pre_process`` (shape inference and graph optimisation,
which also turns a Gemm into the MatMul that gets quantised) runs first when it works.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

import onnx

from kdcli.errors import ExportError, first_line
from kdcli.export.quiet import quiet, quiet_stderr_fd
from kdcli.files import atomic_write_bytes

__all__ = ["INT8_OPS", "quantize_dynamic_int8"]

# the operators quantize_dynamic writes in place of float ones
INT8_OPS = ("ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QAttention",
            "QEmbedLayerNormalization", "QGather")


def quantize_dynamic_int8(src: str | Path, dst: str | Path, *, metadata: dict | None = None) -> dict:
    """Write ``dst``: the ONNX model ``src`` with int8 weights (``quantize_dynamic``, QInt8).

    The file is written atomically and only once onnxruntime can load it; ``metadata`` entries are
    added (JSON-encoded) to the ``metadata_props`` carried over from ``src``. Returns ``{"path",
    "size_bytes", "quantized_nodes", "preprocessed", "notes"}``. Raises ExportError (one line) when
    quantisation fails or quantises nothing.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from kdcli.export.latency import make_session

    src, dst = Path(src), Path(dst)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quantize-") as tmp, \
            quiet("torch.onnx", ""), quiet_stderr_fd(), contextlib.redirect_stdout(None):
        source, pre = src, Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(src), str(pre))
            source = pre
        except Exception as exc:  # noqa: BLE001 - optional step: quantise without it
            notes.append(f"quant_pre_process failed ({first_line(exc)}); quantised without it")
        out = Path(tmp) / "int8.onnx"
        try:
            quantize_dynamic(str(source), str(out), weight_type=QuantType.QInt8)
            proto = onnx.load(str(out))
        except Exception as exc:  # noqa: BLE001 - any failure is reported, not raised further
            raise ExportError(f"{dst.name}: quantize_dynamic failed: {first_line(exc)}") from None
    quantized = sum(n.op_type in INT8_OPS for n in proto.graph.node)
    if not quantized:
        raise ExportError(f"{dst.name}: quantize_dynamic found no operator it quantises (Conv, MatMul, ...)")
    present = {p.key: p for p in proto.metadata_props}
    for key, value in (metadata or {}).items():
        entry = present.get(key) or proto.metadata_props.add(key=str(key))
        entry.value = json.dumps(value)
    data = proto.SerializeToString()
    try:
        make_session(data, threads=1)
    except Exception as exc:  # noqa: BLE001 - e.g. an int8 kernel this onnxruntime build lacks
        raise ExportError(f"{dst.name}: onnxruntime cannot load the quantised model: {first_line(exc)}") from None
    atomic_write_bytes(dst, data)
    return {"path": str(dst), "size_bytes": dst.stat().st_size, "quantized_nodes": int(quantized),
            "preprocessed": source != src, "notes": notes}
