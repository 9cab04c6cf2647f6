"""Export that serves speed: the simplified ONNX graph (BatchNorm folded into Conv, Identity
removed), ``threads`` reaching every measurement, and the optional dynamic int8 student."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import kdcli.export.onnx as export_mod
from conftest import randomise_bn
from kdcli.config.recipe import parse_recipe
from kdcli.errors import InputError, RecipeError
from kdcli.export.graph import simplify
from kdcli.export.latency import make_session
from kdcli.export.quiet import quiet
from kdcli.export.onnx import export_onnx, export_report, verify_onnx
from kdcli.models import build_model
from kdcli.reports.export import summary_table
from kdcli.reports.models import load_report

RNG = np.random.default_rng(0)


def _conv_bn_graph(bias: bool, identity: bool = True) -> onnx.ModelProto:
    """input -> Conv(4→3, 3x3[, bias]) -> BatchNormalization -> Relu -> [Identity ->] output,
    with a second Identity between the input and the Conv."""
    w = RNG.standard_normal((3, 4, 3, 3)).astype(np.float32)
    gamma, beta = RNG.uniform(0.5, 1.5, 3).astype(np.float32), RNG.standard_normal(3).astype(np.float32)
    mean, var = RNG.standard_normal(3).astype(np.float32), RNG.uniform(0.5, 1.5, 3).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w, "W"), (gamma, "gamma"), (beta, "beta"), (mean, "mean"),
                                                         (var, "var"))]
    conv_in = ["x_id", "W"]
    if bias:
        inits.append(numpy_helper.from_array(RNG.standard_normal(3).astype(np.float32), "B"))
        conv_in.append("B")
    nodes = [helper.make_node("Identity", ["input"], ["x_id"]),
             helper.make_node("Conv", conv_in, ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"], epsilon=1e-3),
             helper.make_node("Relu", ["bn"], ["r" if identity else "logits"])]
    if identity:
        nodes.append(helper.make_node("Identity", ["r"], ["logits"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4, 5, 5])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, 5, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return make_session(proto.SerializeToString(), threads=1).run(None, {"input": x})[0]


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_conv_batchnorm_folds_by_the_formula_and_identity_goes(bias):
    proto = _conv_bn_graph(bias)
    a = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in proto.graph.initializer}
    x = RNG.standard_normal((2, 4, 5, 5)).astype(np.float32)
    before = _run(proto, x)

    proto, stats = simplify(proto)
    onnx.checker.check_model(proto, full_check=True)
    assert [n.op_type for n in proto.graph.node] == ["Conv", "Relu"]
    assert stats == {"nodes_before": 5, "nodes": 2, "batchnorm_folded": 1, "identity_removed": 2, "gelu_reordered": 0,
                     "initializers_removed": 4, "notes": []}
    conv = proto.graph.node[0]
    assert conv.input[0] == "input" and proto.graph.node[1].output[0] == "logits"  # rewired both ways
    got = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert len(got) == 2 and len(conv.input) == 3
    f = a["gamma"] / np.sqrt(a["var"] + 1e-3)
    b = a["B"] if bias else np.zeros(3)
    np.testing.assert_allclose(got[conv.input[1]], a["W"] * f[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(got[conv.input[2]], (b - a["mean"]) * f + a["beta"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(_run(proto, x), before, atol=1e-5)


def test_nothing_to_fold_and_unfoldable_batchnorm_is_left():
    # a folded graph (no BatchNorm) is left as it is
    proto, stats = simplify(_conv_bn_graph(bias=True))
    again, stats2 = simplify(proto)
    assert stats2 == {"nodes_before": 2, "nodes": 2, "batchnorm_folded": 0, "identity_removed": 0, "gelu_reordered": 0,
                      "initializers_removed": 0, "notes": []}
    # the Conv output read by another node too: folding would change that node's input
    proto = _conv_bn_graph(bias=False, identity=False)
    proto.graph.node.append(helper.make_node("Relu", ["c"], ["c2"]))
    proto.graph.output.append(helper.make_tensor_value_info("c2", TensorProto.FLOAT, None))
    x = RNG.standard_normal((1, 4, 5, 5)).astype(np.float32)
    before = make_session(proto.SerializeToString(), threads=1).run(None, {"input": x})
    proto, stats = simplify(proto)
    assert stats["batchnorm_folded"] == 0 and "BatchNormalization" in {n.op_type for n in proto.graph.node}
    after = make_session(proto.SerializeToString(), threads=1).run(None, {"input": x})
    assert all(np.allclose(p, q) for p, q in zip(before, after))


def test_weights_in_external_data_are_not_folded():
    proto = _conv_bn_graph(bias=False)
    w = next(t for t in proto.graph.initializer if t.name == "W")
    w.ClearField("raw_data")
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value="m.onnx.data")
    proto, stats = simplify(proto)
    assert stats["batchnorm_folded"] == 0 and stats["identity_removed"] == 2
    assert "external data" in stats["notes"][0]
    assert "BatchNormalization" in {n.op_type for n in proto.graph.node}


def _resnet():
    torch.manual_seed(0)
    m = build_model("resnet20", {"width": 4}, input_shape=(3, 32, 32), num_classes=10).eval()
    randomise_bn(m)
    return m


def _unfolded_export(model, example, opset):
    """A TorchScript export that keeps BatchNormalization (no eval-mode Conv+BN fusion)."""
    f = io.BytesIO()
    with quiet():
        torch.onnx.export(model, (example,), f, dynamo=False, opset_version=opset, training=torch.onnx.TrainingMode.PRESERVE,
                          do_constant_folding=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load_from_string(f.getvalue())


def test_resnet_from_an_exporter_that_keeps_batchnorm_is_folded_and_verifies(tmp_path, monkeypatch):
    model = _resnet()
    monkeypatch.setattr(export_mod, "_export_dynamo", _unfolded_export)
    path = tmp_path / "r.onnx"
    res = export_onnx(model, torch.randn(2, 3, 32, 32), path)
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert res["graph"]["batchnorm_folded"] == 19 and res["graph"]["nodes"] == res["graph"]["nodes_before"] - 19
    assert "BatchNormalization" not in ops and "Identity" not in ops and ops["Conv"] == 19
    ver = verify_onnx(path, model, torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    assert ver["max_abs_diff"] <= 1e-4 and ver["top1_agreement"] == 1.0


def test_resnet_through_the_default_exporter_has_no_batchnorm_or_identity(tmp_path):
    model = _resnet()
    path = tmp_path / "r.onnx"
    res = export_onnx(model, torch.randn(2, 3, 32, 32), path)
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert "BatchNormalization" not in ops and "Identity" not in ops and ops["Conv"] == 19
    assert res["graph"]["nodes"] == sum(ops.values())
    verify_onnx(path, model, torch.randn(6, 3, 32, 32))


SHAPE = (1, 8, 8)
INFO = {"name": "cnn", "input_shape": list(SHAPE), "num_classes": 4, "mean": [0.0], "std": [1.0],
        "class_names": ["a", "b", "c", "d"]}


def _cnn(seed):
    torch.manual_seed(seed)
    return build_model("cnn3", {"widths": [8, 8, 8], "hidden": 16}, input_shape=SHAPE, num_classes=4).eval()


def test_threads_reach_every_measurement(tmp_path):
    student = build_model("mlp", {"hidden": [8]}, input_shape=SHAPE, num_classes=4).eval()
    before = torch.get_num_threads()
    report = export_report(student, INFO, tmp_path, batch_sizes=(1,), time_budget_s=0.01, threads=1)
    lat = report.latency
    stats = [s for table in [*lat.onnxruntime.values(), lat.pytorch] for model in table.values() for s in model.values()]
    assert stats and all(s.threads == 1 for s in stats)
    assert torch.get_num_threads() == before  # torch's setting is restored
    assert "(1 thread)" in (tmp_path / "report.md").read_text() and "(1 thread)" in (tmp_path / "report.html").read_text()
    assert "CPU: 1 thread" in summary_table(report).caption
    with pytest.raises(InputError, match=r"^export\.threads: expected an integer >= 1"):
        export_report(student, INFO, tmp_path / "never", threads=0)
    with pytest.raises(InputError, match=r"^export\.quantize: expected one of none, dynamic, got 'int4'"):
        export_report(student, INFO, tmp_path / "never", quantize="int4")
    assert not (tmp_path / "never").exists()


def test_dynamic_quantisation_writes_a_judged_and_timed_int8_student(tmp_path):
    teacher, student = _cnn(0), _cnn(1)
    x = torch.randn(32, *SHAPE, generator=torch.Generator().manual_seed(2))
    y = teacher(x).argmax(1)
    report = export_report(student, INFO, tmp_path, teacher=teacher, teacher_info=INFO, x_eval=x, y_eval=y,
                           batch_sizes=(1,), time_budget_s=0.02, threads=1, quantize="dynamic")
    q = report.student_int8
    assert (tmp_path / "student.int8.onnx").is_file() and q.file == "student.int8.onnx"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert q.method == "dynamic" and q.quantized_nodes >= 3 and q.size_bytes < report.student.size_bytes
    assert q.samples == 32 and q.inputs == "data" and 0.0 <= q.top1_agreement <= 1.0
    logits = make_session(tmp_path / "student.int8.onnx", threads=1).run(None, {"input": x.numpy()})[0]
    assert q.accuracy == pytest.approx(float((logits.argmax(1) == y.numpy()).mean()))
    cpu = report.latency.onnxruntime["CPUExecutionProvider"]
    assert set(cpu) == {"teacher", "student", "student_int8"} and cpu["student_int8"]["1"].threads == 1
    assert q.speedup["CPUExecutionProvider"]["1"] == pytest.approx(
        cpu["teacher"]["1"].median_ms / cpu["student_int8"]["1"].median_ms)
    assert q.speedup_vs_student["CPUExecutionProvider"]["1"] == pytest.approx(
        cpu["student"]["1"].median_ms / cpu["student_int8"]["1"].median_ms)
    assert load_report(tmp_path / "report.json") == report
    md = (tmp_path / "report.md").read_text()
    assert "| | teacher | student | student int8 | ratio |" in md.replace("|  |", "| |")
    assert "## int8 student (dynamic quantisation, onnxruntime)" in md and "| student.int8.onnx |" in md
    assert "int8 median ms" in md and "int8 speed-up" in (tmp_path / "report.html").read_text()


def test_a_failed_quantisation_is_a_note_not_a_crash(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("no kernel\nmore")

    monkeypatch.setattr("onnxruntime.quantization.quantize_dynamic", boom)
    student = build_model("mlp", {"hidden": [8]}, input_shape=SHAPE, num_classes=4).eval()
    report = export_report(student, INFO, tmp_path, batch_sizes=(1,), time_budget_s=0.01, threads=1,
                           quantize="dynamic")
    assert report.student_int8 is None and not (tmp_path / "student.int8.onnx").exists()
    note = next(n for n in report.notes if n.startswith("student_int8:"))
    assert note == ("student_int8: dynamic quantisation failed, nothing written: student.int8.onnx: "
                    "quantize_dynamic failed: RuntimeError: no kernel")
    assert set(report.latency.onnxruntime["CPUExecutionProvider"]) == {"student"}


@pytest.mark.parametrize("text, message", [
    ("export:\n  quantize: foo\n", r"^r\.yaml:4: export\.quantize: Input should be 'none' or 'dynamic' \(got 'foo'\)$"),
    ("export:\n  threads: 0\n", r"^r\.yaml:4: export\.threads: Input should be greater than or equal to 1 \(got 0\)$"),
])
def test_recipe_refuses_bad_export_threads_and_quantize(text, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe("teacher:\n  model: mlp\n" + text, "r.yaml")
    ok = parse_recipe("teacher:\n  model: mlp\nexport:\n  threads: 2\n  quantize: dynamic\n", "r.yaml").export
    assert ok.threads == 2 and ok.quantize == "dynamic"
    default = parse_recipe("teacher:\n  model: mlp\n", "r.yaml").export
    assert default.threads is None and default.quantize == "none"


def test_cli_threads_flag_wins_over_the_recipe_whose_quantize_applies(tmp_path):
    from typer.testing import CliRunner

    from kdcli.cli import app
    from kdcli.models.file import ModelInfo, save_model

    torch.manual_seed(0)
    info = ModelInfo("mlp", {"hidden": [8]}, (1, 8, 8), 10)
    save_model(tmp_path / "s.kdc", build_model("mlp", info.args, input_shape=info.input_shape, num_classes=10), info)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("teacher:\n  model: mlp\nexport:\n  batch_sizes: [1]\n  latency_budget_s: 0.01\n"
                      "  threads: 2\n  quantize: dynamic\n")
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(tmp_path / "s.kdc"), "--recipe", str(recipe), "--threads", "1",
                              "--out", str(tmp_path / "e"), "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = load_report(tmp_path / "e" / "report.json")
    lat = report.latency
    assert {s.threads for table in [*lat.onnxruntime.values(), lat.pytorch] for m in table.values()
            for s in m.values()} == {1}
    assert report.student_int8 is not None and (tmp_path / "e" / "student.int8.onnx").is_file()
    assert report.student_int8.accuracy is not None and report.accuracy.samples == report.student_int8.samples
    res = runner.invoke(app, ["export", str(tmp_path / "s.kdc"), "--quantize", "int8", "--out", str(tmp_path / "f")])
    assert res.exit_code == 2 and "--quantize 'int8': expected none or dynamic" in res.output


def test_api_takes_threads_and_quantize(tmp_path):
    import kdcli

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    report = kdcli.export(net, input_shape=(1, 8, 8), num_classes=10, out=tmp_path, batch_sizes=[1],
                          latency_budget_s=0.01, threads=1, quantize="dynamic")
    assert report.student_int8.inputs == "random" and report.student_int8.accuracy is None
    assert report.latency.onnxruntime["CPUExecutionProvider"]["student_int8"]["1"].threads == 1
    with pytest.raises(InputError, match=r"^quantize: expected 'none' or 'dynamic', got 'yes'"):
        kdcli.export(net, input_shape=(1, 8, 8), num_classes=10, out=tmp_path, quantize="yes")


# ----------------------------------------------------------------------------- GELU order

def _gelu_graph(half: float = 0.5, const_node: bool = False) -> onnx.ModelProto:
    """input -> MatMul(W) + b -> x · (half · (1 + erf(x / √2))) -> output, torch.export's order."""
    w = RNG.standard_normal((6, 8)).astype(np.float32)
    b = RNG.standard_normal(8).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b"),
             numpy_helper.from_array(np.array(2 ** 0.5, np.float32), "sqrt2"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    nodes = [helper.make_node("MatMul", ["input", "W"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["x"]),
             helper.make_node("Div", ["x", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["a"])]
    if const_node:  # the TorchScript exporter's constants are Constant nodes
        nodes.append(helper.make_node("Constant", [], ["half"], value=numpy_helper.from_array(np.array(half, np.float32))))
    else:
        inits.append(numpy_helper.from_array(np.array(half, np.float32), "half"))
    nodes += [helper.make_node("Mul", ["half", "a"], ["h"]), helper.make_node("Mul", ["x", "h"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _fused_ops(proto: onnx.ModelProto, tmp_path) -> Counter:
    """The op types of the graph onnxruntime runs after its own optimisations."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(tmp_path / "optimised.onnx")).graph.node)


@pytest.mark.parametrize("const_node", [False, True], ids=["initializer", "constant-node"])
def test_gelu_is_put_in_the_order_onnxruntime_fuses(const_node, tmp_path):
    proto = _gelu_graph(const_node=const_node)
    x = RNG.standard_normal((5, 6)).astype(np.float32)
    before = _run(proto, x)
    assert not {"Gelu", "BiasGelu"} & set(_fused_ops(proto, tmp_path))  # torch.export's order: not fused
    out, stats = simplify(proto)
    assert stats["gelu_reordered"] == 1
    onnx.checker.check_model(out)
    mm = np.asarray(x) @ numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "W"))
    xb = mm + numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "b"))
    import math
    ref = xb * 0.5 * (1 + np.vectorize(math.erf)(xb / math.sqrt(2)))  # GELU by its formula
    np.testing.assert_allclose(_run(out, x), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_run(out, x), before, rtol=1e-6, atol=1e-7)
    assert {"Gelu", "BiasGelu"} & set(_fused_ops(out, tmp_path))


def test_a_gelu_lookalike_is_left_alone():
    proto = _gelu_graph(half=0.25)  # x · 0.25 · (1 + erf(x / √2)) is not GELU
    _, stats = simplify(proto)
    assert stats["gelu_reordered"] == 0
    assert [n.input[:] for n in proto.graph.node if n.op_type == "Mul"] == [["half", "a"], ["x", "h"]]


def test_vit_through_the_default_exporter_runs_fused_gelu(tmp_path):
    torch.manual_seed(0)
    model = build_model("vit", {"dim": 32, "depth": 2, "heads": 2}, input_shape=(3, 32, 32), num_classes=10).eval()
    res = export_onnx(model, torch.randn(2, 3, 32, 32), tmp_path / "vit.onnx")
    assert res["exporter"] == "torch.export" and res["graph"]["gelu_reordered"] == 2  # one per block
    proto = onnx.load(str(tmp_path / "vit.onnx"))
    fused = _fused_ops(proto, tmp_path)
    assert fused["Gelu"] + fused["BiasGelu"] == 2 and fused["Erf"] == 0, fused
    ver = verify_onnx(tmp_path / "vit.onnx", model, torch.randn(4, 3, 32, 32))
    assert ver["max_abs_diff"] <= 1e-4 and ver["top1_agreement"] == 1.0
