"""User mistakes end in exit 2 and one line naming the file, field or flag: never "unexpected"
(exit 1). The wider matrix is ``benchmarks/bad_inputs.py``; these are the cases fixed for #14."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kdcli.models.file import save_model_file
from kdcli.cli import app
from kdcli.models import build_model

runner = CliRunner()
SHAPE = [1, 8, 8]  # the built-in digits


def invoke(*args):
    res = runner.invoke(app, [str(a) for a in args])
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    return res, errors


def _teacher(tmp_path, scale: float = 1.0, hidden=(16,)):
    torch.manual_seed(0)
    model = build_model("mlp", {"hidden": list(hidden)}, input_shape=SHAPE, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    path = tmp_path / "teacher.kdc"
    save_model_file(path, model, name="mlp", args={"hidden": list(hidden)}, input_shape=SHAPE, num_classes=10)
    return path


def _tensors(tmp_path, name, x, y):
    path = tmp_path / name
    torch.save({"x": x, "y": y}, path)
    return path


def _recipe(tmp_path, data_path, teacher):
    path = tmp_path / "r.yaml"
    path.write_text(f"data: {{source: {{kind: tensors, path: {data_path}}}, val_fraction: 0.2}}\n"
                    f"teacher: {{model: mlp, model_args: {{hidden: [16]}}, checkpoint: {teacher}}}\n"
                    "distill: {train: {epochs: 1}}\nprune: {steps: 1}\ntarget: {macs: 0.5}\n")
    return path


@pytest.mark.parametrize("label, x, y, expected", [
    ("labels beyond the teacher's classes", torch.rand(40, *SHAPE), torch.arange(40) % 12, "12 classes"),
    ("inputs of another shape", torch.rand(40, 1, 6, 6), torch.arange(40) % 10, "inputs of shape [1, 6, 6]"),
    ("NaN inputs", torch.full((40, *SHAPE), math.nan), torch.arange(40) % 10, "NaN or infinite inputs"),
])
def test_compress_refuses_data_that_does_not_fit_the_teacher(tmp_path, label, x, y, expected):
    data = _tensors(tmp_path, "d.pt", x, y)
    res, errors = invoke("compress", _recipe(tmp_path, data, _teacher(tmp_path)), "--out", tmp_path / "run",
                         "--no-export", "--threads", "1")
    assert res.exit_code == 2 and len(errors) == 1, (label, res.output)
    assert expected in errors[0] and "unexpected" not in errors[0], (label, errors[0])


@pytest.mark.parametrize("blob", [
    {"x": np.array([["a"] * 64] * 10), "y": np.arange(10)},
    {"x": np.zeros((10, 64), dtype=bool), "y": np.arange(10)},
])
def test_non_numeric_data_is_a_data_error(tmp_path, blob):
    path = tmp_path / "d.npz"
    np.savez(path, **blob)
    res, errors = invoke("analyze", _teacher(tmp_path), "--data", f"tensors:{path}")
    assert res.exit_code == 2 and len(errors) == 1 and str(path) in errors[0], res.output


def test_activations_that_overflow_name_the_file_and_layer(tmp_path):
    teacher = _teacher(tmp_path, scale=1e25, hidden=(16, 16))  # finite weights; 1e50 overflows float32
    res, errors = invoke("analyze", teacher, "--data", "digits")
    assert res.exit_code == 2 and len(errors) == 1, res.output
    assert str(teacher) in errors[0] and "layer features" in errors[0] and "NaN or infinite" in errors[0]


@pytest.mark.parametrize("args, flag", [
    (["--threads", "99999999999"], "--threads"),
    (["--opset", "7"], "--opset"),
    (["--num-classes", "0", "--model", "mlp", "--input-shape", "1,8,8"], "--num-classes"),
    (["--input-shape", "3,100000,100000", "--model", "mlp", "--num-classes", "10"], "--input-shape"),
])
def test_out_of_range_flags_name_the_flag(tmp_path, args, flag):
    command = "analyze" if flag in ("--threads",) else "export"
    extra = ["--out", tmp_path / "o"] if command == "export" else []
    plain = tmp_path / "plain.pt"
    torch.save(build_model("mlp", {}, input_shape=SHAPE, num_classes=10).state_dict(), plain)
    target = _teacher(tmp_path) if flag in ("--threads", "--opset") else plain
    res = runner.invoke(app, [str(a) for a in [command, target, *extra, *args]])
    assert res.exit_code == 2 and flag in res.output, res.output


def test_recipe_show_takes_a_name_not_a_path(tmp_path):
    res, errors = invoke("recipe", "show", "../../../../etc/passwd")
    assert res.exit_code == 2 and "no built-in recipe" in errors[0]
    assert "root:" not in res.output


def test_file_system_errors_of_a_library_name_the_path(tmp_path, monkeypatch):
    """The one place that maps the OS errors only a user's path can cause to exit 2."""
    import kdcli.config.recipe

    def broken(*_a, **_k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "locked.yaml"))

    monkeypatch.setattr(kdcli.config.recipe, "load_recipe", broken)
    res, errors = invoke("recipe", "validate", tmp_path / "locked.yaml")
    assert res.exit_code == 2 and errors == [f"error: {tmp_path / 'locked.yaml'}: Permission denied"]
