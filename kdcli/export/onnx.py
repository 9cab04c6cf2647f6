"""ONNX export and verification against PyTorch, and the ``kdcli export`` pipeline (``export_report``).

Export uses the torch.export-based exporter (``dynamo=True``) and falls back to the TorchScript
exporter when it fails, saying so in the returned notes. The ONNX graph has one input ``input``
[batch, *input_shape] and one output ``logits`` [batch, classes] with a dynamic axis named ``batch``;
the normalisation the model expects travels in ``metadata_props`` as JSON strings, so a deployment
can rebuild its preprocessing from the file alone.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn

import kdcli
from kdcli.console import Reporter
from kdcli.errors import ExportError, InputError, first_line
from kdcli.export.latency import (available_providers, cpu_channel_block, default_threads, make_session,
                                  measure_latency, measure_torch_latency, off_block_convs)
from kdcli.config.recipe import QUANTIZE_METHODS
from kdcli.export.graph import simplify
from kdcli.export.quiet import quiet, quiet_stderr_fd
from kdcli.files import atomic_write_bytes
from kdcli.prune.pruner import count_macs_params
from kdcli.reports.export import block_warning, write_reports
from kdcli.reports.gates import check_gates, parse_gates
from kdcli.reports.models import PRIMARY_PROVIDER, REPORT_NAME, REPORT_VERSION, ExportReport

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_AXIS = "batch"
MIN_DYNAMO_OPSET = 18
# protobuf cannot serialise a message over 2 GiB; above this the weights go to <file>.onnx.data
LARGE_MODEL_BYTES = 2 * 1024 ** 3 - 64 * 1024 ** 2
VERIFY_SAMPLES = 512


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, *, opset: int = 18,
                metadata: dict | None = None) -> dict:
    """Export ``model`` (logits [B, classes] from inputs shaped like ``example`` [B, ...]) to ONNX.

    Tries the torch.export-based exporter, then the TorchScript one; the batch axis is dynamic.
    ``metadata`` values are stored JSON-encoded in ``metadata_props`` next to ``input_name``,
    ``output_name`` and ``input_shape``. The file is written atomically and passes
    ``onnx.checker``. Returns ``{"path", "exporter", "opset", "size_bytes", "external_data", "notes"}``.
    Raises ExportError when neither exporter can handle the model.
    """

    path = Path(path)
    if not isinstance(opset, int) or not 7 <= opset <= onnx.defs.onnx_opset_version():
        raise InputError(f"export.opset: expected an integer in 7..{onnx.defs.onnx_opset_version()}, got {opset!r}")
    model, example = _prepare(model, example)
    large = sum(t.numel() * t.element_size() for t in model.state_dict().values()) > LARGE_MODEL_BYTES
    notes: list[str] = []
    errors: list[str] = []
    proto, exporter = None, None
    was_training = model.training
    model.eval()
    try:
        if opset >= MIN_DYNAMO_OPSET:
            try:
                proto, exporter = _export_dynamo(model, example, opset), "torch.export"
            except Exception as exc:  # any exporter failure: try the other one
                errors.append(f"torch.export-based exporter: {first_line(exc)}")
        else:
            notes.append(f"opset {opset} < {MIN_DYNAMO_OPSET}: used the TorchScript exporter")
        if proto is None:
            try:
                proto, exporter = _export_torchscript(model, example, opset, path.parent), "torchscript"
            except Exception as exc:
                errors.append(f"TorchScript exporter: {first_line(exc)}")
                raise ExportError(f"{path}: cannot export {type(model).__name__} to ONNX: "
                                  + "; ".join(errors)) from None
            if errors:
                notes.append(f"{errors[0]}; used the TorchScript exporter instead")
    finally:
        model.train(was_training)

    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        notes.append(f"requested opset {opset}, the exporter wrote opset {got}")
    proto, graph = _simplify(proto, large)
    notes += graph.pop("notes", [])
    meta = {"input_name": INPUT_NAME, "output_name": OUTPUT_NAME, "input_shape": list(example.shape[1:]),
            **(metadata or {})}
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=str(key), value=json.dumps(value))
    _save(proto, path, large)
    if large:
        notes.append(f"model over 2 GB: weights written to {path.name}.data next to {path.name}")
    return {"path": str(path), "exporter": exporter, "opset": got, "size_bytes": onnx_size(path),
            "external_data": large, "graph": graph or None, "notes": notes}


def _simplify(proto, large: bool):
    """:func:`kdcli.export.graph.simplify` on a copy; a failure keeps the exporter's graph, with a
    note (a model over 2 GB is not copied: it keeps the steps done, each of which leaves a valid
    graph, and onnx.checker and verify_onnx judge it as any). Returns ``(proto, stats)``, stats
    holding only ``notes`` on failure."""
    work = proto
    if not large:
        work = onnx.ModelProto()
        work.CopyFrom(proto)
    try:
        return simplify(work)
    except Exception as exc:  # noqa: BLE001 - the exporter's graph is valid as it is
        return proto, {"notes": [f"graph simplification skipped: {first_line(exc)}"]}


def _prepare(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    if not isinstance(example, torch.Tensor) or example.dim() < 2:
        raise InputError(f"export: expected an example input tensor [batch, ...], got {getattr(example, 'shape', example)}")
    if any(p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).cpu()
    example = example.detach().cpu().float()
    if example.shape[0] < 2:  # batch 1 invites torch.export to specialise the batch axis to a constant
        example = example[:1].expand(2, *example.shape[1:]).clone()
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as exc:
        raise ExportError(f"export: the model's forward pass fails on an input of shape "
                          f"{list(example.shape)}: {first_line(exc)}") from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != example.shape[0]:
        raise ExportError(f"export: expected the model to return one logits tensor [batch, classes], got "
                          f"{type(out).__name__} {list(getattr(out, 'shape', []))}")
    return model, example


def _export_dynamo(model: nn.Module, example: torch.Tensor, opset: int):
    with quiet(), quiet_stderr_fd(), contextlib.redirect_stdout(None):
        program = torch.onnx.export(
            model, (example,), None, dynamo=True, opset_version=opset, verbose=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], optimize=True,
            dynamic_shapes=({0: torch.export.Dim(BATCH_AXIS)},))
        return program.model_proto


def _export_torchscript(model: nn.Module, example: torch.Tensor, opset: int, where: Path):

    where.mkdir(parents=True, exist_ok=True)
    with quiet(), quiet_stderr_fd(), tempfile.TemporaryDirectory(dir=where, prefix=".export-") as tmp:
        # a file path (not BytesIO) so that a model over 2 GB can use external data
        f = Path(tmp) / "model.onnx"
        torch.onnx.export(model, (example,), str(f), dynamo=False, opset_version=opset, verbose=False,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True,
                          dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}})
        return onnx.load(str(f), load_external_data=True)


def _save(proto, path: Path, large: bool) -> None:
    """Check and write ``proto`` to ``path`` atomically (weights to ``path.data`` when ``large``)."""

    try:
        if not large:
            onnx.checker.check_model(proto)
            atomic_write_bytes(path, proto.SerializeToString())
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            onnx.save_model(proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=f"{path.name}.data", size_threshold=1024)
            onnx.checker.check_model(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path}: the exported model fails onnx.checker: {first_line(exc)}") from None


def onnx_size(path: str | Path) -> int:
    """Bytes on disk of an ONNX model, counting its external ``.data`` file when there is one."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def onnx_metadata(path: str | Path) -> dict:
    """The model's ``metadata_props`` decoded from JSON (values that are not JSON stay strings)."""

    proto = onnx.load(str(path), load_external_data=False)
    out = {}
    for p in proto.metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except json.JSONDecodeError:
            out[p.key] = p.value
    return out


def onnx_logits(session, x: torch.Tensor | np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits [N, classes] of an onnxruntime ``session`` on inputs ``x`` [N, ...], in batches."""
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    x = x.astype(np.float32, copy=False)
    name = session.get_inputs()[0].name
    parts = [session.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def torch_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Logits [N, classes] of ``model`` in eval mode on CPU inputs ``x`` [N, ...], in batches."""
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            parts = [model(x[i:i + batch_size].float()).float().numpy() for i in range(0, len(x), batch_size)]
    finally:
        model.train(was)
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def verification_inputs(x: torch.Tensor | None, input_shape, *, max_samples: int = VERIFY_SAMPLES,
                        seed: int = 0) -> tuple[torch.Tensor, str]:
    """The inputs a model is verified on: the first ``max_samples`` of ``x`` (``"data"``), or without
    it ``max_samples``≤64 seeded standard-normal inputs of ``input_shape`` (``"random"``)."""
    if x is None or len(x) == 0:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(min(max_samples, 64), *input_shape, generator=gen), "random"
    return x[:max_samples].detach().cpu().float(), "data"


def verify_onnx(path: str | Path, model: nn.Module, x: torch.Tensor | None = None, *, atol: float = 1e-4,
                max_samples: int = VERIFY_SAMPLES, seed: int = 0, threads: int | None = None) -> dict:
    """Compare the ONNX model at ``path`` with ``model`` on ``x`` [N, ...] (its first ``max_samples``).

    Without ``x``, uses ``max_samples``≤64 standard-normal inputs of the stored ``input_shape``
    (``inputs: "random"``). Passes when the largest absolute logit difference is ≤ ``atol`` and the
    top-1 class agrees on every sample (a sample whose two leading PyTorch logits are within
    ``2·atol`` is a tie and counted in ``top1_ties`` instead). Raises ExportError otherwise.
    ``threads``: onnxruntime's intra-op threads (default one per core).
    Returns ``{"max_abs_diff", "top1_agreement", "top1_ties", "samples", "inputs", "atol"}``.
    """

    shape = None
    if x is None or len(x) == 0:
        shape = onnx_metadata(path).get("input_shape")
        if not shape:
            raise ExportError(f"{path}: no input_shape in metadata_props; pass inputs to verify the model with")
    x, inputs = verification_inputs(x, shape, max_samples=max_samples, seed=seed)
    ref = torch_logits(model, x)
    got = onnx_logits(make_session(path, threads=threads), x)
    if ref.shape != got.shape:
        raise ExportError(f"{path}: ONNX output shape {list(got.shape)} != PyTorch {list(ref.shape)}")
    diff = float(np.max(np.abs(ref - got))) if ref.size else 0.0
    agree = ref.argmax(1) == got.argmax(1)
    top2 = np.sort(ref, axis=1)[:, -2:] if ref.shape[1] > 1 else np.zeros((len(ref), 2))
    tie = (top2[:, 1] - top2[:, 0]) <= 2 * atol
    result = {"max_abs_diff": diff, "top1_agreement": float(agree.mean()) if len(agree) else 1.0,
              "top1_ties": int((~agree & tie).sum()), "samples": int(len(x)), "inputs": inputs, "atol": atol}
    bad = int((~agree & ~tie).sum())
    if not diff <= atol or bad:  # `not <=` also catches NaN
        raise ExportError(f"{path}: ONNX output differs from PyTorch on {inputs} inputs: max |Δ| = {diff:.3g} "
                          f"(allowed {atol:g}; logits up to {float(np.abs(ref).max()) if ref.size else 0:.3g}), "
                          f"top-1 disagrees on {bad} of {len(x)} samples")
    return result



# ------------------------------------------------------------------------------ the export pipeline

def _model_metadata(info: dict, role: str) -> dict:

    keys = ("name", "num_classes", "mean", "std", "scale", "class_names")
    meta = {k: info.get(k) for k in keys if info.get(k) is not None}
    meta.setdefault("scale", 1.0)
    return {**meta, "role": role, "producer": f"kdcli {kdcli.__version__}"}


def _environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version


    env = {"kdcli": kdcli.__version__, "python": platform.python_version()}
    for pkg in ("torch", "torch-pruning", "onnx", "onnxruntime"):
        try:
            env[pkg] = version(pkg)  # tp.__version__ is wrong for 1.6.1 (DESIGN.md)
        except PackageNotFoundError:
            pass
    env["cpu_threads"] = default_threads()
    return env


INT8_ROLE = "student_int8"


def export_report(student: nn.Module, info: dict, out_dir: str | Path, *, teacher: nn.Module | None = None,
                  teacher_info: dict | None = None, x_eval: torch.Tensor | None = None,
                  y_eval: torch.Tensor | None = None, batch_sizes=(1, 64), opset: int = 18, gates=(),
                  time_budget_s: float = 2.0, reporter=None, baseline: ExportReport | None = None,
                  baseline_source: str = "report", threads: int | None = None,
                  quantize: str | None = "none") -> ExportReport:
    """Export ``student`` (and ``teacher``) to ``out_dir``, verify, evaluate, time, write the reports,
    and return the report (:class:`kdcli.reports.models.ExportReport`).

    ``info`` = {"name", "input_shape", "num_classes", "mean", "std", "class_names"[, "scale"]};
    ``x_eval`` [N, ...] normalised inputs and ``y_eval`` [N] labels give the accuracies and the
    verification inputs (random inputs otherwise, noted). Writes ``student.onnx``, ``teacher.onnx``
    and ``report.json/.md/.html``. ``gates`` (``kdcli.reports.gates``) are parsed before any work
    (InputError for a malformed one) and evaluated at the end: failed gates are listed in
    ``report.gates.failures``, never raised; the caller decides (the CLI exits 3). ``baseline``
    (an earlier run's report, ``baseline_source`` naming its file) is what ``baseline.<metric>``
    in a gate reads; a gate naming it without one is an InputError before any work.
    ``threads``: onnxruntime intra-op threads of every measurement and torch's threads meanwhile
    (default: the process's CPU cores for onnxruntime, torch's setting as it is).
    ``quantize="dynamic"``: also write ``student.int8.onnx`` (int8 weights, :mod:`kdcli.export.quantize`),
    judged against the fp32 student and timed with it; a failure is a note, not an error.
    """
    gates = list(gates or [])
    parse_gates(gates, baseline, baseline_source)  # a typo in a gate should fail before minutes of measuring
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InputError(f"export.threads: expected an integer >= 1 (or null: one per CPU core), got {threads!r}")
    quantize = "none" if quantize is None else quantize
    if quantize not in QUANTIZE_METHODS:
        raise InputError(f"export.quantize: expected one of {', '.join(QUANTIZE_METHODS)}, got {quantize!r}")
    batch_sizes = [int(b) for b in batch_sizes]
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise InputError(f"export.batch_sizes: expected positive integers, got {batch_sizes}")
    with _torch_threads(threads):
        return _export_report(student, info, Path(out_dir), teacher=teacher, teacher_info=teacher_info,
                              x_eval=x_eval, y_eval=y_eval, batch_sizes=batch_sizes, opset=opset, gates=gates,
                              time_budget_s=time_budget_s, reporter=reporter or Reporter(quiet=True),
                              baseline=baseline, baseline_source=baseline_source,
                              threads=int(threads or default_threads()), quantize=quantize)


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    """torch's intra-op threads set to ``threads`` for the duration (unchanged when None)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _export_report(student, info, out_dir: Path, *, teacher, teacher_info, x_eval, y_eval, batch_sizes, opset,
                   gates, time_budget_s, reporter, baseline, baseline_source, threads: int,
                   quantize: str) -> ExportReport:
    from datetime import datetime, timezone

    input_shape = tuple(int(d) for d in info["input_shape"])
    have_data = x_eval is not None and len(x_eval) > 0
    example = (x_eval[:2] if have_data else torch.zeros(2, *input_shape)).detach().cpu().float()
    notes: list[str] = []
    if not have_data:
        notes.append("no evaluation data: verified on random inputs, accuracy not measured")

    roles = {"student": (student, info)}
    if teacher is not None:
        roles = {"teacher": (teacher, teacher_info or info), **roles}
    entries, paths = {}, {}
    for role, (model, minfo) in roles.items():
        reporter.info(f"export: {role} → {out_dir / f'{role}.onnx'}")
        path = out_dir / f"{role}.onnx"
        res = export_onnx(model, example, path, opset=opset, metadata=_model_metadata(minfo, role))
        notes += [f"{role}: {n}" for n in res["notes"]]
        ver = verify_onnx(path, model, x_eval if have_data else None, threads=threads)
        macs, params = count_macs_params(model, example[:1])
        entries[role] = {"name": str(minfo.get("name") or type(model).__name__), "file": path.name,
                         "size_bytes": res["size_bytes"], "exporter": res["exporter"], "opset": int(res["opset"]),
                         "external_data": res["external_data"], "export_notes": res["notes"],
                         "params": params, "macs": macs, "verification": ver, "graph": res["graph"]}
        paths[role] = path
    s, t = entries["student"], entries.get("teacher")
    ratios = None if t is None else {"size": s["size_bytes"] / t["size_bytes"], "macs": s["macs"] / max(t["macs"], 1),
                                     "params": s["params"] / max(t["params"], 1)}
    int8 = None
    if quantize == "dynamic":
        int8 = _quantize_student(paths["student"], info, x_eval if have_data else None, input_shape, threads,
                                 reporter, notes)
    int8_path = out_dir / int8["file"] if int8 else None

    accuracy = None
    if have_data and y_eval is not None:

        reporter.info(f"export: accuracy on {len(x_eval):,} samples")
        y = y_eval.detach().cpu().numpy()
        acc = {role: _onnx_accuracy(p, x_eval, y, threads) for role, p in paths.items()}
        accuracy = {"samples": int(len(y)), "student_onnx": acc["student"], "teacher_onnx": acc.get("teacher"),
                    "student_pytorch": float((torch_logits(student, x_eval).argmax(1) == y).mean()),
                    "teacher_pytorch": None if teacher is None else float((torch_logits(teacher, x_eval).argmax(1) == y).mean()),
                    "drop_pt": None if t is None else 100 * (acc["teacher"] - acc["student"])}
        if int8:
            int8["accuracy"] = _onnx_accuracy(int8_path, x_eval, y, threads)

    providers = available_providers()
    ort_lat = {}
    for provider in providers:
        timed = {r: str(p) for r, p in paths.items()}
        if int8 and provider == PRIMARY_PROVIDER:  # dynamic int8 kernels are CPU ones
            timed[INT8_ROLE] = str(int8_path)
        reporter.info(f"export: onnxruntime latency ({provider}, {_n_threads(threads)}) at batch sizes {batch_sizes}")
        ort_lat[provider] = _str_keys(measure_latency(timed, input_shape, batch_sizes, time_budget_s=time_budget_s,
                                                      threads=threads, providers=[provider]))
    reporter.info(f"export: PyTorch eager latency (reference, {_n_threads(torch.get_num_threads())})")
    eager = _str_keys(measure_torch_latency({r: m for r, (m, _) in roles.items()}, input_shape, batch_sizes,
                                            time_budget_s=time_budget_s))
    speedup = {}
    if t is not None:
        speedup = _speedups(ort_lat, "teacher", "student", batch_sizes)
    block = _channel_block(student, teacher)
    warning = block_warning(block)
    if warning:
        notes.append(warning)
    if int8:
        int8["speedup"] = _speedups(ort_lat, "teacher", INT8_ROLE, batch_sizes) if t is not None else {}
        int8["speedup_vs_student"] = _speedups(ort_lat, "student", INT8_ROLE, batch_sizes)
        slower = {b: v for b, v in int8["speedup_vs_student"].get(PRIMARY_PROVIDER, {}).items() if v < 1}
        if slower:
            notes.append(f"{INT8_ROLE}: slower than the fp32 student at batch size {', '.join(slower)} "
                         f"({', '.join(f'{v:.2f}×' for v in slower.values())}); dynamic int8 pays off for "
                         "MatMul-heavy models (MLPs, transformers), rarely for convolutions")
    report = ExportReport.model_validate({
        "schema": REPORT_NAME, "version": REPORT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "environment": _environment(),
        "student": s, "teacher": t, "student_int8": int8, "ratios": ratios, "accuracy": accuracy,
        "latency": {"batch_sizes": batch_sizes, "time_budget_s": float(time_budget_s),
                    # CPU is the deployment target gates compare on, also where CUDA is present
                    "primary_provider": PRIMARY_PROVIDER, "onnxruntime": ort_lat, "pytorch": eager,
                    "speedup": speedup, "channel_block": block},
        "gates": {"expressions": gates, "failures": []}, "notes": notes})
    report.gates.failures = check_gates(report, gates, baseline, baseline_source)
    write_reports(report, out_dir)
    return report


def _channel_block(student: nn.Module, teacher: nn.Module | None) -> dict | None:
    """The report's ``latency.channel_block``: this host's onnxruntime channel block
    (:func:`kdcli.export.latency.cpu_channel_block`) and the convolutions of each model off it;
    None where the block is not known."""
    found = cpu_channel_block()
    if found is None:
        return None
    block, isa = found
    off, total = off_block_convs(student, block)
    return {"channels": block, "isa": isa, "convolutions": total, "student_off": off,
            "teacher_off": off_block_convs(teacher, block)[0] if teacher is not None else None}


def _n_threads(n: int) -> str:
    return f"{n} thread{'' if n == 1 else 's'}"


def _onnx_accuracy(path: Path, x: torch.Tensor, y: np.ndarray, threads: int) -> float:
    return float((onnx_logits(make_session(path, threads=threads), x).argmax(1) == y).mean())


def _speedups(ort_lat: dict, slow: str, fast: str, batch_sizes) -> dict:
    """provider → batch size → median of ``slow`` / median of ``fast``, where both were timed."""
    out = {}
    for prov, tab in ort_lat.items():
        if slow in tab and fast in tab:
            out[prov] = {str(b): tab[slow][str(b)]["median_ms"] / tab[fast][str(b)]["median_ms"] for b in batch_sizes}
    return out


def _quantize_student(path: Path, info: dict, x: torch.Tensor | None, input_shape, threads: int, reporter,
                      notes: list[str]) -> dict | None:
    """``student.int8.onnx`` next to ``path``, and how it compares with the fp32 student on the
    verification inputs; None (and a note) when quantisation fails."""
    from kdcli.export.quantize import quantize_dynamic_int8

    dst = path.with_name(f"{path.stem}.int8.onnx")
    reporter.info(f"export: dynamic int8 quantisation → {dst}")
    try:
        res = quantize_dynamic_int8(path, dst, metadata={"role": INT8_ROLE, "quantization": "dynamic int8 (QInt8)"})
    except Exception as exc:  # noqa: BLE001 - the fp32 export stands; quantisation is extra
        why = str(exc) if isinstance(exc, ExportError) else first_line(exc)
        notes.append(f"{INT8_ROLE}: dynamic quantisation failed, nothing written: {why}")
        return None
    notes += [f"{INT8_ROLE}: {n}" for n in res["notes"]]
    xv, inputs = verification_inputs(x, input_shape)
    ref = onnx_logits(make_session(path, threads=threads), xv)
    got = onnx_logits(make_session(dst, threads=threads), xv)
    return {"file": dst.name, "method": "dynamic", "size_bytes": res["size_bytes"],
            "quantized_nodes": res["quantized_nodes"], "preprocessed": res["preprocessed"], "accuracy": None,
            "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()) if len(ref) else 1.0,
            "max_abs_diff": float(np.max(np.abs(ref - got))) if ref.size else 0.0,
            "samples": int(len(xv)), "inputs": inputs, "speedup": {}, "speedup_vs_student": {}}


def _str_keys(lat: dict) -> dict:
    """JSON object keys are strings: {model: {bs: stats}} with bs as str."""
    return {m: {str(b): v for b, v in by_bs.items()} for m, by_bs in lat.items()}
