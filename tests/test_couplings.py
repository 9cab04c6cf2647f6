"""Zero-padding (option-A) shortcuts made prunable (kdcli.prune.couplings): detection by probing,
the stage residual groups, pruning values, history replay, MACs, ONNX; other couplings kept out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdcli.models import build_model
from kdcli.models.file import load_model_file, save_model_file
from kdcli.prune.couplings import (ChannelPadPruner, ChannelPadShortcut, find_channel_pad_shortcuts,
                                   replace_channel_pad_shortcuts)
from kdcli.prune.pruner import StructuredPruner, count_macs_params, replay_history
from conftest import randomise_bn

PRETRAINED = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrained"
SHAPE = (3, 16, 16)


# --- a minimal copy of the public option-A CIFAR ResNet (akamaster/pytorch_resnet_cifar10) ------

class LambdaLayer(nn.Module):
    def __init__(self, lambd):
        super().__init__()
        self.lambd = lambd

    def forward(self, x):
        return self.lambd(x)


class LambdaBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = LambdaLayer(lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4),
                                                        "constant", 0))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class LambdaResNet(nn.Module):
    """He et al.'s CIFAR ResNet as the public checkpoints' model file writes it, ``blocks`` per stage."""

    def __init__(self, width=8, blocks=1, num_classes=10):
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(width, blocks, 1)
        self.layer2 = self._make_layer(2 * width, blocks, 2)
        self.layer3 = self._make_layer(4 * width, blocks, 2)
        self.linear = nn.Linear(4 * width, num_classes)

    def _make_layer(self, planes, blocks, stride):
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(LambdaBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


def _zoo():
    torch.manual_seed(0)
    return build_model("resnet20", {"width": 8}, input_shape=SHAPE, num_classes=10).eval()


def _lambda():
    torch.manual_seed(0)
    return LambdaResNet(width=8, blocks=2).eval()


MODELS = {"zoo": _zoo, "lambda": _lambda}
EX = torch.zeros(1, *SHAPE)


def _x(n=4, seed=0):
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def _blocks(model, stage):
    return list(getattr(model, f"layer{stage}"))


def _hand_macs(model, x):
    """MACs as torch-pruning's counter counts them, from the layers' actual shapes: conv and
    linear multiply-accumulates (+ bias adds), 2 per BatchNorm element; shortcuts count nothing."""
    total = []

    def hook(m, inputs, out):
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
            total.append(out.numel() * k + (out.numel() if m.bias is not None else 0))
        elif isinstance(m, nn.BatchNorm2d):
            total.append(2 * out.numel())
        elif isinstance(m, nn.Linear):
            total.append(m.in_features * m.out_features + m.out_features)

    layers = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)
    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, layers)]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return sum(total)


# --- detection --------------------------------------------------------------------------------

def _probe_net(fn):
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), LambdaLayer(fn)).eval()


def test_detection_finds_stride_and_uneven_padding_by_probing():
    found = find_channel_pad_shortcuts(_probe_net(lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 3, 5))), EX)
    assert list(found) == ["1"]
    m = found["1"]
    assert (m.steps, m.left, m.in_channels, m.right, m.out_channels) == ((2, 2), 3, 6, 5, 14)
    # the channel padding alone, or a different step per axis
    found = find_channel_pad_shortcuts(_probe_net(lambda x: F.pad(x[:, :, :, ::4], (0, 0, 0, 0, 0, 2))), EX)
    assert (found["1"].steps, found["1"].left, found["1"].right) == ((1, 4), 0, 2)


@pytest.mark.parametrize("fn", [
    lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2), "constant", 1.0),  # pads ones, not zeros
    lambda x: F.pad(x[:, :, 1::2, 1::2], (0, 0, 0, 0, 2, 2)),  # a slice not starting at 0
    lambda x: torch.cat([x, x], 1)[:, :, ::2, ::2],  # channels repeated, no zeros
    lambda x: F.pad(x[:, :, ::2, ::2].abs(), (0, 0, 0, 0, 2, 2)),  # right on positive inputs only
    lambda x: x[:, :, ::2, ::2],  # no channels added: torch-pruning's own slices handle it
], ids=["ones", "offset", "repeat", "abs", "no-pad"])
def test_detection_refuses_lookalikes(fn):
    model = _probe_net(fn)
    assert find_channel_pad_shortcuts(model, EX) == {}
    assert replace_channel_pad_shortcuts(model, EX) == [] and isinstance(model[1], LambdaLayer)


def test_replacement_is_undone_when_the_model_does_not_call_the_attribute():
    class Aliased(nn.Module):  # calls its shortcut through a plain list, not the attribute
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.pad = LambdaLayer(lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2)))
            self.calls = [self.pad]

        def forward(self, x):
            return self.calls[0](self.conv(x))

    model = Aliased().eval()
    assert list(find_channel_pad_shortcuts(model, EX)) == ["pad"]
    assert replace_channel_pad_shortcuts(model, EX) == [] and isinstance(model.pad, LambdaLayer)


def test_channel_pad_pruner_shrinks_each_side_and_keeps_the_layout():
    m = ChannelPadShortcut((2, 2), 2, 3, 4)  # out: [z z | x0 x1 x2 x3 | z z z]
    x = torch.randn(1, 4, 4, 4)
    y = m(x)
    ChannelPadPruner().prune_out_channels(m, [0, 3, 8])  # a left zero, input channel 1, a right zero
    assert (m.left, m.in_channels, m.right) == (1, 3, 2)
    keep = [i for i in range(9) if i not in (0, 3, 8)]
    assert torch.equal(m(x[:, [0, 2, 3]]), y[:, keep])


# --- the stage residual groups --------------------------------------------------------------------

@pytest.mark.parametrize("kind", MODELS)
def test_stage_residual_groups_exist_and_are_prunable(kind):
    model = MODELS[kind]()
    p = StructuredPruner(model, EX)
    assert len(p.notes) == 1
    assert p.notes[0].startswith("2 zero-padding shortcuts (layer2.0.shortcut, layer3.0.shortcut)")
    assert all(isinstance(model.get_submodule(f"layer{s}.0.shortcut"), ChannelPadShortcut) for s in (2, 3))
    channels = p.group_channels()
    # stage 1's 8 channels run through both shortcuts; each shortcut adds 2·(planes/4) zero channels
    assert (channels["conv1"], channels["layer2.0.conv2"], channels["layer3.0.conv2"]) == (8, 8, 16)
    inner = {f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(len(_blocks(model, s)))}
    assert set(p.groups) == inner | {"conv1", "layer2.0.conv2", "layer3.0.conv2"}
    # the groups partition the residual width of every stage: 8, 8 + 8, 8 + 8 + 16
    assert p.channels_at("layer2.0.conv2", "layer2.1.conv1") == [0, 1, 2, 3, 12, 13, 14, 15]
    assert p.channels_at("conv1", "layer3.1.conv1") == list(range(12, 20))
    assert p.channels_at("layer3.0.conv2", "linear") == list(range(8)) + list(range(24, 32))
    assert p.channels_at("layer1.0.conv1", "layer3.0.conv1") is None


def _kill(bn: nn.BatchNorm2d, conv: nn.Conv2d, c: int) -> None:
    with torch.no_grad():
        conv.weight[c] = 0
        bn.weight[c] = 0
        bn.bias[c] = 0


@pytest.mark.parametrize("kind", MODELS)
def test_removing_dead_residual_channels_keeps_the_outputs(kind):
    """Channels zeroed by hand wherever they are produced (each stage's conv2/bn2, the stem):
    removing them through all three residual groups at once changes no output, and each
    shortcut loses exactly the right channels on the right side."""
    model = MODELS[kind]()
    randomise_bn(model, bias_low=-0.2)
    w, p2, p3 = 8, 4, 8
    stage = {1: [(model.bn1, model.conv1)] + [(b.bn2, b.conv2) for b in _blocks(model, 1)],
             2: [(b.bn2, b.conv2) for b in _blocks(model, 2)], 3: [(b.bn2, b.conv2) for b in _blocks(model, 3)]}
    c = 5  # stage 1 channel 5 = stage 2 channel 9 = stage 3 channel 17
    for s, ch in ((1, c), (2, c + p2), (3, c + p2 + p3)):
        for bn, conv in stage[s]:
            _kill(bn, conv, ch)
    for j in (0, 2 * w - 1):  # stage 2's first and last zero-padded channels, and where they go in stage 3
        for s, ch in ((2, j), (3, j + p3)):
            for bn, conv in stage[s]:
                _kill(bn, conv, ch)
    for k in (0, 4 * w - 1):  # stage 3's first and last zero-padded channels
        for bn, conv in stage[3]:
            _kill(bn, conv, k)
    x = _x()
    ref = model(x)
    p = StructuredPruner(model, EX)
    plan = {"conv1": [c], "layer2.0.conv2": [0, 2 * p2 - 1], "layer3.0.conv2": [0, 2 * p3 - 1]}
    p.apply(plan)
    assert (model.conv1.out_channels, model.layer2[0].conv2.out_channels, model.layer3[0].conv2.out_channels) == \
        (w - 1, 2 * w - 3, 4 * w - 5)
    s2, s3 = model.layer2[0].shortcut, model.layer3[0].shortcut
    assert (s2.left, s2.in_channels, s2.right) == (p2 - 1, w - 1, p2 - 1)
    assert (s3.left, s3.in_channels, s3.right) == (p3 - 1, 2 * w - 3, p3 - 1)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def _random_plan(p, seed):
    g = torch.Generator().manual_seed(seed)
    plan = {}
    for name, n in p.group_channels().items():
        k = int(torch.randint(1, n, (1,), generator=g))
        plan[name] = sorted(torch.randperm(n, generator=g)[:k].tolist())
    return plan


def _check_widths(model):
    """Every shortcut maps the width of its stage to the next one's."""
    w1 = model.conv1.out_channels
    w2 = model.layer2[0].conv2.out_channels
    w3 = model.layer3[0].conv2.out_channels
    assert all(b.conv2.out_channels == w1 for b in _blocks(model, 1))
    assert all(b.conv2.out_channels == w2 for b in _blocks(model, 2))
    assert all(b.conv2.out_channels == w3 for b in _blocks(model, 3))
    s2, s3 = model.layer2[0].shortcut, model.layer3[0].shortcut
    assert (s2.in_channels, s2.out_channels, s3.in_channels, s3.out_channels) == (w1, w2, w2, w3)
    assert model.linear.in_features == w3


@pytest.mark.parametrize("kind", MODELS)
def test_random_plans_prune_forward_count_macs_and_replay(kind, tmp_path):
    model = MODELS[kind]()
    randomise_bn(model, bias_low=-0.2)
    history = []
    for step in range(2):  # two pruners one after the other, as compress does
        p = StructuredPruner(model, EX)
        p.apply(_random_plan(p, seed=step))
        history += p.history()
    _check_widths(model)
    assert model.conv1.out_channels < 8 and model.layer3[0].conv2.out_channels < 32
    x = _x()
    assert model(x).shape == (4, 10)
    assert count_macs_params(model, EX)[0] == _hand_macs(model, EX)
    if kind == "zoo":  # a built-in model: the kdcli model file round trip
        path = tmp_path / "student.kdc"
        save_model_file(path, model, name="resnet20", args={"width": 8}, input_shape=SHAPE, num_classes=10,
                        pruning_history=history, metadata={})
        fresh, _ = load_model_file(path)
    else:
        fresh = _lambda()
        replay_history(fresh, EX, history)
        fresh.load_state_dict(model.state_dict(), strict=True)
    assert isinstance(fresh.layer3[0].shortcut, ChannelPadShortcut)
    assert torch.equal(fresh.eval()(x), model(x))


def test_trial_restores_shortcuts_and_outputs():
    model = _zoo()
    randomise_bn(model, bias_low=-0.2)
    x = _x()
    p = StructuredPruner(model, EX)
    ref = model(x)
    with p.trial(_random_plan(p, seed=3)) as pruned:
        assert pruned.layer3[0].shortcut.out_channels < 32
    s = model.layer3[0].shortcut
    assert (s.left, s.in_channels, s.right) == (8, 16, 8) and p.history() == []
    assert torch.equal(model(x), ref)


def test_pruned_lambda_resnet_exports_to_onnx_and_matches_onnxruntime(tmp_path):
    from kdcli.export.onnx import export_onnx, verify_onnx

    model = _lambda()
    randomise_bn(model, bias_low=-0.2)
    p = StructuredPruner(model, EX)
    p.apply(_random_plan(p, seed=7))
    export_onnx(model, EX, tmp_path / "m.onnx")
    res = verify_onnx(tmp_path / "m.onnx", model, _x(8, seed=1), atol=1e-4)
    assert res["samples"] == 8 and res["top1_agreement"] == 1.0 and res["max_abs_diff"] <= 1e-4


# --- couplings kdcli does not know stay out ------------------------------------------------------

class _Shuffled(nn.Module):
    """A channel shuffle (ShuffleNet) between two convs, in a lambda."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.shuffle = LambdaLayer(lambda x: x.view(x.shape[0], 2, 4, *x.shape[2:]).transpose(1, 2).reshape(x.shape))
        self.b, self.bn_b = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.shuffle(F.relu(self.bn_a(self.a(x))))
        return self.fc(F.relu(self.bn_b(self.b(x))).mean((2, 3)))


def test_an_unknown_coupling_is_still_kept_out_with_one_note():
    torch.manual_seed(0)
    model = _Shuffled().eval()
    randomise_bn(model, bias_low=-0.2)
    p = StructuredPruner(model, EX)
    assert isinstance(model.shuffle, LambdaLayer)  # not a zero-padding shortcut: left alone
    assert p.notes == ["1 group kept out of pruning: couplings torch-pruning does not understand (a); "
                       "the others are pruned"]
    assert p.groups == ["b"]
    p.prune_ratios({"b": 0.5}, p.score())
    assert model.b.out_channels == 4 and model.a.out_channels == 8


# --- the public checkpoint ------------------------------------------------------------------------

@pytest.mark.slow
def test_public_resnet20_checkpoint_prunes_its_whole_width(tmp_path):
    ckpt = PRETRAINED / "resnet20-12fca82f.th"
    if not ckpt.is_file():
        pytest.skip(f"{ckpt} not found")
    from kdcli.export.onnx import export_onnx, verify_onnx
    from kdcli.models.file import load_model

    spec = f"{PRETRAINED / 'resnet.py'}:resnet20"
    model = load_model(spec, {}, ckpt, input_shape=(3, 32, 32), num_classes=10)
    ex = torch.zeros(1, 3, 32, 32)
    macs0 = count_macs_params(model, ex)[0]
    p = StructuredPruner(model, ex, round_to=8)
    assert len(p.groups) == 12 and not any("kept out" in n for n in p.notes)
    assert {g: n for g, n in p.group_channels().items() if "conv2" in g or g == "conv1"} == \
        {"conv1": 16, "layer2.0.conv2": 16, "layer3.0.conv2": 32}
    scores = p.score()
    plan = p.fill_to_macs(scores, p.plan_below(scores, p.tau_for_macs(scores, 0.5 * macs0)), 0.5 * macs0)
    p.apply(plan)
    assert 0.4 * macs0 < count_macs_params(model, ex)[0] <= 0.5 * macs0
    assert model.layer3[2].conv2.out_channels < 64 and model.layer3[2].conv2.out_channels % 8 == 0
    path = tmp_path / "student.kdc"
    save_model_file(path, model, name=spec, args={}, input_shape=(3, 32, 32), num_classes=10,
                    pruning_history=p.history(), metadata={})
    loaded, _ = load_model_file(path, trust=True)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(x), model(x))
    export_onnx(loaded, ex, tmp_path / "s.onnx")
    assert verify_onnx(tmp_path / "s.onnx", loaded, x)["top1_agreement"] == 1.0
