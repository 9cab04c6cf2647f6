"""ONNX export and verification: every built-in architecture and pruned models round-trip through
onnxruntime within 1e-4; exporter failures and output mismatches raise ExportError."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

import kdcli.export.onnx as export_mod
from kdcli.errors import ExportError, InputError
from kdcli.export.onnx import export_onnx, onnx_metadata, onnx_size, verify_onnx
from kdcli.export.latency import make_session, measure_latency, measure_torch_latency
from kdcli.models import build_model

ARCHS = [("mlp", {"hidden": [32]}, (1, 28, 28)), ("lenet5", {}, (1, 28, 28)), ("vgg", {"width": 0.125}, (3, 32, 32))]
# cnn3 and resnet20 round-trip once each, pruned, in test_pruned_cnn3_and_resnet20_round_trip
# (every dynamo export costs a second or more of CPU)


def _model(name, args, shape, seed=0):
    torch.manual_seed(seed)
    m = build_model(name, args, input_shape=shape, num_classes=10)
    _calibrate_bn(m, shape)
    return m.eval()


def _calibrate_bn(model, shape):
    """Non-trivial BatchNorm statistics, so that export must fold them correctly."""
    model.train()
    with torch.no_grad():
        model(torch.randn(16, *shape) * 2 + 0.5)
    model.eval()


def _round_trip(model, shape, tmp_path, name="m"):
    path = tmp_path / f"{name}.onnx"
    res = export_onnx(model, torch.randn(2, *shape), path, metadata={"mean": [0.5], "class_names": ["a", "b"]})
    # a batch size the exporter never saw: the batch axis must be dynamic
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(1))
    ver = verify_onnx(path, model, x)
    return path, res, ver


@pytest.mark.parametrize("name,args,shape", ARCHS, ids=[a[0] for a in ARCHS])
def test_builtin_architectures_round_trip(name, args, shape, tmp_path):
    model = _model(name, args, shape)
    path, res, ver = _round_trip(model, shape, tmp_path)
    assert res["exporter"] == "torch.export" and res["opset"] == 18 and res["notes"] == []
    assert ver["max_abs_diff"] <= 1e-4 and ver["top1_agreement"] == 1.0
    assert ver["samples"] == 5 and ver["inputs"] == "data"
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert not (tmp_path / f"{path.name}.data").exists()  # one file: weights inside
    assert res["size_bytes"] == path.stat().st_size


def _prune_inner_convs(model, shape, names, keep):
    """Remove all but ``keep`` output channels of each named conv (torch-pruning groups)."""
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, *shape))
    for n in names:
        conv = model.get_submodule(n)
        group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(keep, conv.out_channels)))
        group.prune()


def test_pruned_cnn3_and_resnet20_round_trip(tmp_path):
    cnn = _model("cnn3", {"widths": [16, 16, 16], "hidden": 32}, (3, 32, 32))
    _prune_inner_convs(cnn, (3, 32, 32), ["conv1.0", "conv2.0"], keep=5)
    assert cnn.conv2[0].in_channels == 5 and cnn.conv3[0].in_channels == 5
    _, _, ver = _round_trip(cnn, (3, 32, 32), tmp_path, "cnn3")
    assert ver["max_abs_diff"] <= 1e-4

    res = _model("resnet20", {}, (3, 32, 32))
    assert res.layer1[0].conv1.out_channels == 16
    inner = [f"layer{i}.{j}.conv1" for i in (1, 2, 3) for j in range(3)]
    _prune_inner_convs(res, (3, 32, 32), inner, keep=7)  # odd counts left by pruning
    assert res.layer3[2].conv2.in_channels == 7 and res.layer3[2].conv2.out_channels == 64
    path, _, ver = _round_trip(res, (3, 32, 32), tmp_path, "resnet20")
    assert ver["max_abs_diff"] <= 1e-4 and ver["top1_agreement"] == 1.0


def test_metadata_holds_json_strings_with_io_names_and_normalisation(tmp_path):
    model = _model("mlp", {"hidden": [8]}, (1, 4, 4))
    path = tmp_path / "m.onnx"
    export_onnx(model, torch.zeros(1, 1, 4, 4), path,  # batch 1 example: still a dynamic axis
                metadata={"mean": [0.1307], "std": [0.3081], "scale": 1 / 255, "class_names": ["zero", "one"]})
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["input_name"]) == "input" and json.loads(props["output_name"]) == "logits"
    assert json.loads(props["input_shape"]) == [1, 4, 4]
    assert json.loads(props["std"]) == [0.3081] and json.loads(props["class_names"]) == ["zero", "one"]
    assert onnx_metadata(path)["scale"] == pytest.approx(1 / 255)
    out = make_session(path).run(None, {"input": np.zeros((3, 1, 4, 4), np.float32)})[0]
    assert out.shape == (3, 10)


class _Kth(nn.Module):
    """An op with no ONNX translation in either exporter (aten::kthvalue)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = self.fc(x)
        return y + torch.kthvalue(y, 2, dim=1).values[:, None]


def test_unexportable_model_raises_export_error_naming_both_exporters(tmp_path):
    with pytest.raises(ExportError) as info:
        export_onnx(_Kth(), torch.randn(2, 6), tmp_path / "k.onnx")
    msg = str(info.value)
    assert "\n" not in msg and "k.onnx" in msg
    assert "torch.export-based exporter:" in msg and "TorchScript exporter:" in msg and "kthvalue" in msg
    assert not list(tmp_path.iterdir())  # nothing half-written


class _Branchy(nn.Module):
    """Python control flow on a tensor value: torch.export refuses it, TorchScript traces one branch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = self.fc(x)
        if y.sum() > 0:
            return y * 2
        return y


def test_fallback_to_torchscript_is_noted_and_verification_catches_a_wrong_trace(tmp_path):
    model = _Branchy().eval()
    with torch.no_grad():
        model.fc.weight.fill_(1.0)
        model.fc.bias.zero_()
    path = tmp_path / "b.onnx"
    res = export_onnx(model, torch.ones(2, 6), path)  # positive inputs: the `y * 2` branch is traced
    assert res["exporter"] == "torchscript"
    assert len(res["notes"]) == 1 and res["notes"][0].startswith("torch.export-based exporter:")
    assert res["notes"][0].endswith("used the TorchScript exporter instead")
    assert verify_onnx(path, model, torch.rand(3, 6))["max_abs_diff"] <= 1e-4
    # negative inputs take the other branch in PyTorch: outputs differ by a factor 2
    with pytest.raises(ExportError, match="differs from PyTorch"):
        verify_onnx(path, model, -torch.ones(3, 6))


def test_verification_on_random_inputs_and_failure_raises_export_error(tmp_path, monkeypatch):
    model = _model("lenet5", {}, (1, 28, 28))
    path = tmp_path / "l.onnx"
    export_onnx(model, torch.randn(2, 1, 28, 28), path)
    x = torch.randn(4, 1, 28, 28)
    assert verify_onnx(path, model, x)["max_abs_diff"] <= 1e-4
    # without data: standard-normal inputs of the input_shape stored in the metadata
    ver = verify_onnx(path, model, None)
    assert ver["inputs"] == "random" and ver["samples"] == 64 and ver["max_abs_diff"] <= 1e-4
    real = export_mod.onnx_logits
    monkeypatch.setattr(export_mod, "onnx_logits", lambda s, x, batch_size=256: real(s, x) + 1e-3)
    with pytest.raises(ExportError, match=r"max \|Δ\| = 0\.001"):
        verify_onnx(path, model, x)


def test_large_model_path_writes_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "LARGE_MODEL_BYTES", 0)
    model = _model("mlp", {"hidden": [64]}, (1, 8, 8))
    path = tmp_path / "big.onnx"
    res = export_onnx(model, torch.randn(2, 1, 8, 8), path)
    data = tmp_path / "big.onnx.data"
    assert res["external_data"] and data.exists() and data.stat().st_size > 64 * 64 * 4
    assert res["size_bytes"] == onnx_size(path) == path.stat().st_size + data.stat().st_size
    assert any("2 GB" in n for n in res["notes"])
    assert verify_onnx(path, model, torch.randn(3, 1, 8, 8))["max_abs_diff"] <= 1e-4


def test_old_opset_uses_torchscript_and_bad_opset_is_input_error(tmp_path):
    model = _model("mlp", {"hidden": [8]}, (1, 4, 4))
    res = export_onnx(model, torch.randn(2, 1, 4, 4), tmp_path / "o.onnx", opset=13)
    assert res["exporter"] == "torchscript" and res["opset"] == 13
    assert verify_onnx(tmp_path / "o.onnx", model, torch.randn(3, 1, 4, 4))["top1_agreement"] == 1.0
    with pytest.raises(InputError, match="export.opset"):
        export_onnx(model, torch.randn(2, 1, 4, 4), tmp_path / "p.onnx", opset=99)


def test_non_logits_output_is_rejected(tmp_path):
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(ExportError, match=r"one logits tensor \[batch, classes\]"):
        export_onnx(Pair(), torch.randn(2, 3), tmp_path / "p.onnx")


def test_latency_alternates_models_and_reports_every_batch_size(tmp_path):
    small = _model("mlp", {"hidden": [8]}, (1, 4, 4))
    big = _model("mlp", {"hidden": [64, 64]}, (1, 4, 4))
    for n, m in (("s", small), ("t", big)):  # opset 17: the TorchScript exporter, 100× faster here
        export_onnx(m, torch.randn(2, 1, 4, 4), tmp_path / f"{n}.onnx", opset=17)
    lat = measure_latency({"teacher": tmp_path / "t.onnx", "student": tmp_path / "s.onnx"}, (1, 4, 4),
                          batch_sizes=(1, 3), time_budget_s=0.05, threads=1)
    assert set(lat) == {"teacher", "student"} and set(lat["student"]) == {1, 3}
    for bs in (1, 3):
        s, t = lat["student"][bs], lat["teacher"][bs]
        assert s["runs"] == t["runs"] >= 7  # alternating: one run each per round
        assert s["provider"] == "CPUExecutionProvider" and s["threads"] == 1
        assert 0 < s["min_ms"] <= s["median_ms"] <= s["p90_ms"] <= s["p99_ms"]
        assert s["throughput"] == pytest.approx(bs / (s["median_ms"] / 1e3))
    eager = measure_torch_latency({"student": small}, (1, 4, 4), (2,), 0.02)
    assert eager["student"][2]["provider"] == "pytorch-eager" and eager["student"][2]["runs"] >= 7
