"""The model zoo and the resolver of built-in names, ``package.module:factory`` and
``path/to/file.py:factory`` specs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdcli.errors import DataError, ModelError
from kdcli.models import build_model, builtin_names, import_callable


@pytest.mark.parametrize("name, args, shape", [
    ("mlp", {"hidden": [16, 8]}, (1, 8, 8)),
    ("mlp", {}, (20,)),
    ("lenet5", {}, (1, 28, 28)),
    ("lenet5", {}, (3, 32, 32)),
    ("cnn3", {"widths": [4, 8, 8], "hidden": 16}, (1, 28, 28)),
    ("cnn3", {"widths": [4, 8, 8], "hidden": 16, "batchnorm": False}, (3, 32, 32)),
    ("vgg", {"width": 0.125}, (3, 32, 32)),
    ("vgg", {"config": "vgg16", "width": 0.0625}, (1, 8, 8)),  # pools stop at 1x1
    ("resnet20", {}, (3, 32, 32)),
    ("resnet20", {"width": 8}, (1, 28, 28)),
])
def test_builtin_builds_and_outputs_logits(name, args, shape):
    model = build_model(name, args, input_shape=shape, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7) and torch.isfinite(out).all()


def test_builtin_names():
    assert builtin_names() == ["cnn3", "lenet5", "mlp", "mobilenet_v2", "resnet18", "resnet20", "resnet32", "resnet44",
                               "resnet56", "vgg", "vit"]


def test_mlp_layer_widths_follow_args():
    model = build_model("mlp", {"hidden": [12, 5]}, input_shape=(1, 8, 8), num_classes=3)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 12), (12, 5), (5, 3)]


def cifar_resnet_params(depth: int, classes: int = 10, width: int = 16) -> int:
    """He et al. 2016, sec. 4.2: conv3x3(3->16)+BN, three stages of n = (depth-2)/6 basic blocks
    (two conv3x3+BN each) at 16/32/64 channels, option-A (parameter-free) shortcuts, Linear(64->classes)."""
    n = (depth - 2) // 6
    conv = lambda cin, cout: 9 * cin * cout  # noqa: E731 (3x3, no bias)
    bn = lambda c: 2 * c  # noqa: E731 (weight and bias)
    total = conv(3, width) + bn(width)
    cin = width
    for planes in (width, 2 * width, 4 * width):
        for _ in range(n):
            total += conv(cin, planes) + bn(planes) + conv(planes, planes) + bn(planes)
            cin = planes
    return total + 4 * width * classes + classes


@pytest.mark.parametrize("name, millions", [("resnet20", 0.27), ("resnet32", 0.46), ("resnet44", 0.66),
                                            ("resnet56", 0.85)])
def test_cifar_resnet_parameter_counts(name, millions):
    model = build_model(name, {}, input_shape=(3, 32, 32), num_classes=10)
    count = sum(p.numel() for p in model.parameters())
    depth = int(name[len("resnet"):])
    assert count == cifar_resnet_params(depth)
    assert round(count / 1e6, 2) == millions  # the table of He et al. 2016
    if depth == 20:
        assert count == 269_722


def test_cifar_resnet_state_dict_names():
    keys = build_model("resnet20", {}, input_shape=(3, 32, 32), num_classes=10).state_dict().keys()
    for k in ("conv1.weight", "bn1.weight", "bn1.running_mean", "layer1.0.conv1.weight",
              "layer3.2.bn2.bias", "linear.weight", "linear.bias"):
        assert k in keys
    assert not any("shortcut" in k for k in keys)  # option A: shortcuts hold no parameters
    assert "layer4.0.conv1.weight" not in keys


USER_MODELS = '''
from torch import nn


def tiny(input_shape, num_classes, hidden=4):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def fixed(out=2):
    return nn.Linear(5, out)


def not_a_model():
    return "a string"


VALUE = 3
'''


def test_user_model_from_module(tmp_path, monkeypatch):
    (tmp_path / "kdcli_test_usermodels.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("kdcli_test_usermodels:tiny", {"hidden": 6}, input_shape=(5,), num_classes=3)
    assert model[1].weight.shape == (6, 5) and model(torch.zeros(2, 5)).shape == (2, 3)


def test_user_model_from_file_relative_to_base_dir(tmp_path):
    (tmp_path / "nets").mkdir()
    (tmp_path / "nets" / "m.py").write_text(USER_MODELS)
    model = build_model("nets/m.py:tiny", {"hidden": 2}, input_shape=(5,), num_classes=4, base_dir=tmp_path)
    assert model[1].out_features == 2 and model[3].out_features == 4
    # a factory without input_shape/num_classes parameters gets only the recipe's args
    model = build_model("nets/m.py:fixed", {"out": 9}, input_shape=(5,), num_classes=4, base_dir=tmp_path)
    assert model.out_features == 9


@pytest.mark.parametrize("name, args, message", [
    ("resnet99", {}, r"model 'resnet99': expected a built-in \(cnn3, lenet5, mlp, mobilenet_v2, resnet18, resnet20"),
    ("nets/missing.py:tiny", {}, r"model 'nets/missing.py:tiny': file .*missing.py not found"),
    ("nets/m.py:nope", {}, r"model 'nets/m.py:nope': nets/m.py has no callable 'nope'"),
    ("nets/m.py:VALUE", {}, r"has no callable 'VALUE'"),
    ("nets/m.py:not_a_model", {}, r"factory returned str, expected torch.nn.Module"),
    ("nets/m.py:tiny", {"depth": 3}, r"model 'nets/m.py:tiny': bad model_args \{'depth': 3\}"),
    ("resnet20", {"depth": 3}, r"model 'resnet20': bad model_args"),
    ("vgg", {"config": "vgg99"}, r"model 'vgg': vgg config must be one of"),
    ("nets/broken.py:f", {}, r"importing .*broken.py failed: SyntaxError"),
    ("kdcli_no_such_pkg.mod:f", {}, r"cannot import module 'kdcli_no_such_pkg.mod'"),
])
def test_model_spec_errors(tmp_path, name, args, message):
    (tmp_path / "nets").mkdir()
    (tmp_path / "nets" / "m.py").write_text(USER_MODELS)
    (tmp_path / "nets" / "broken.py").write_text("def f(:\n")
    with pytest.raises(ModelError, match=message):
        build_model(name, args, input_shape=(5,), num_classes=2, base_dir=tmp_path)


def test_import_callable_raises_the_callers_error_type(tmp_path):
    with pytest.raises(DataError, match=r"^data.source.factory 'x.py:f': file .* not found"):
        import_callable("x.py:f", tmp_path, label="data.source.factory", error=DataError)
    with pytest.raises(ModelError, match="expected 'package.module:function'"):
        import_callable("no_colon", tmp_path)
