"""Structured pruning (kdcli.prune.pruner): MAC counts, groups, importance, plans, τ search, history."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdcli.models.file import load_model_file, save_model_file
from kdcli.errors import InputError, ModelError
from kdcli.models import build_model
from kdcli.prune.pruner import StructuredPruner, count_macs_params, replay_history
from conftest import randomise_bn


def _build(name, shape, **args):
    torch.manual_seed(0)
    model = build_model(name, args, input_shape=shape, num_classes=10)
    return model.eval(), torch.zeros(1, *shape)


# --- MACs and parameters ------------------------------------------------------------------------

def test_mlp_macs_and_params_by_hand():
    model, ex = _build("mlp", (1, 8, 8), hidden=[32])
    model.train()
    macs, params = count_macs_params(model, ex)
    assert params == 64 * 32 + 32 + 32 * 10 + 10
    # multiply-accumulates 64*32 + 32*10, plus torch-pruning's counter's bias adds (32 + 10)
    # and one op per element of the ReLU module (32)
    assert macs == 64 * 32 + 32 * 10 + (32 + 10) + 32
    assert model.training  # mode left as it was


def test_small_conv_net_macs_and_params_by_hand():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    macs, params = count_macs_params(model, torch.zeros(1, 1, 8, 8))
    assert params == (1 * 4 * 9 + 4) + (256 * 10 + 10)
    conv = 9 * 1 * 4 * 64 + 4 * 64  # 3x3 kernel over 1 channel for 4 filters at 64 positions, + bias
    assert macs == conv + 4 * 64 + (256 * 10 + 10)


def test_resnet20_matches_he_et_al_formula():
    model, ex = _build("resnet20", (3, 32, 32))
    macs, params = count_macs_params(model, ex)

    def conv(cin, cout):
        return 9 * cin * cout

    stages = [(16, 16, 32), (16, 32, 16), (32, 64, 8)]  # (in, out, output size) of each stage
    p = conv(3, 16) + 2 * 16 + 64 * 10 + 10
    m = conv(3, 16) * 32 * 32
    bn = 2 * 16 * 32 * 32  # torch-pruning counts BatchNorm as 2 ops per element
    for cin, cout, size in stages:
        p += conv(cin, cout) + 5 * conv(cout, cout) + 6 * 2 * cout
        m += (conv(cin, cout) + 5 * conv(cout, cout)) * size * size
        bn += 6 * 2 * cout * size * size
    assert params == p == 269_722  # option-A shortcuts have no parameters
    assert m == 40_550_400  # the usual "40.55 M" conv MACs of ResNet-20
    assert macs == m + bn + 64 * 10 + 10


# --- groups, notes, ignored layers ---------------------------------------------------------------

def test_groups_exclude_output_layer_and_ignored_layers():
    model, ex = _build("cnn3", (1, 28, 28), widths=[8, 16, 16], hidden=32)
    p = StructuredPruner(model, ex, ignored_layers=["conv2"])
    assert p.groups == ["fc1.1", "conv3.0", "conv1.0"]  # fc2 gives the logits; conv2 covers conv2.0
    assert p.group_channels() == {"fc1.1": 32, "conv3.0": 16, "conv1.0": 8}
    assert p.notes == []


def test_unknown_ignored_layer_and_importance_are_input_errors():
    model, ex = _build("mlp", (1, 8, 8), hidden=[16])
    with pytest.raises(InputError, match=r"prune.ignored_layers: no module 'nope' in the model"):
        StructuredPruner(model, ex, ignored_layers=["nope"])
    with pytest.raises(InputError, match="prune.importance"):
        StructuredPruner(model, ex, importance="l1")


def test_option_a_resnet_prunes_the_whole_residual_width():
    """The zero-padding shortcuts are coupled (kdcli.prune.couplings): besides the inner convs,
    three residual groups, one per stage: stage 1's channels (which run on through both
    shortcuts), then the channels each shortcut pads in (which exist from that stage on)."""
    model, ex = _build("resnet20", (3, 32, 32))
    p = StructuredPruner(model, ex)
    assert len(p.notes) == 1 and "2 zero-padding shortcuts" in p.notes[0] and "kept out" not in p.notes[0]
    inner = [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    assert sorted(p.groups) == sorted(inner + ["conv1", "layer2.0.conv2", "layer3.0.conv2"])
    channels = p.group_channels()
    assert (channels["conv1"], channels["layer2.0.conv2"], channels["layer3.0.conv2"]) == (16, 16, 32)
    macs0 = count_macs_params(model, ex)[0]
    scores = p.score()
    p.apply(p.plan_below(scores, p.tau_for_macs(scores, 0.6 * macs0)))
    assert count_macs_params(model, ex)[0] <= 0.6 * macs0
    width = [model.conv1.out_channels, model.layer2[0].conv2.out_channels, model.layer3[2].conv2.out_channels]
    assert width[0] < 16 and width[1] < 32 and width[2] < 64
    assert model.layer2[1].conv1.out_channels == model.layer2[1].bn1.num_features == model.layer2[1].conv2.in_channels
    pad = model.layer3[0].shortcut
    assert pad.in_channels == width[1] and pad.out_channels == width[2] == model.linear.in_features
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


class _OptionB(nn.Module):
    """A small ResNet with identity / 1x1-conv shortcuts, which torch-pruning does understand."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.a1, self.b1 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.down, self.bd = nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32)
        self.a2, self.b2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(x + self.b1(self.a1(x)))
        x = F.relu(self.bd(self.down(x)) + self.b2(self.a2(x)))
        return self.fc(x.mean((2, 3)))


def test_understood_residual_couplings_stay_prunable():
    torch.manual_seed(0)
    model = _OptionB().eval()
    randomise_bn(model)
    p = StructuredPruner(model, torch.zeros(1, 3, 16, 16))
    # two groups, both residual: stem+a1 (named after a1, the first traced) and down+a2
    assert p.notes == [] and set(p.groups) == {"a1", "a2"}
    p.prune_ratios({"a1": 0.5, "a2": 0.25}, p.score())
    assert (model.stem.out_channels, model.a1.out_channels, model.a2.in_channels) == (8, 8, 8)
    assert (model.down.out_channels, model.a2.out_channels, model.fc.in_features) == (24, 24, 24)


def test_probe_is_cached_per_model_structure(monkeypatch):
    model, ex = _build("resnet20", (3, 32, 32))
    first = StructuredPruner(model, ex)
    monkeypatch.setattr(StructuredPruner, "_probe", lambda self: pytest.fail("probed again"))
    again = StructuredPruner(_build("resnet20", (3, 32, 32))[0], ex)
    assert again.groups == first.groups and "conv1" in again.groups and again.notes == first.notes


def test_pruner_leaves_mode_and_batchnorm_statistics_alone():
    model, ex = _build("cnn3", (1, 28, 28), widths=[8, 16, 16], hidden=32)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = StructuredPruner(model, ex, importance="taylor")
    p.score(batches=[(torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3]), None)])
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(q.grad is None for q in model.parameters())


# --- importance ------------------------------------------------------------------------------

def _cnn3_with_dead_channel():
    model, ex = _build("cnn3", (1, 28, 28), widths=[8, 16, 16], hidden=32)
    randomise_bn(model)
    with torch.no_grad():
        model.conv2[1].bias += 1.5  # keep conv2's other channels alive through the ReLU
        # channel 5 of conv2: filter, BN scale and shift, conv3's input slice
        model.conv2[0].weight[5] = 0
        model.conv2[1].weight[5] = 0
        model.conv2[1].bias[5] = 0
        model.conv3[0].weight[:, 5] = 0
    return model, ex


@pytest.mark.parametrize("importance", ["magnitude", "taylor", "activation", "bn-scale"])
def test_dead_channel_scores_lowest_and_is_removed_first(importance):
    model, ex = _cnn3_with_dead_channel()
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    batches = [(x, torch.arange(8) % 10, torch.arange(8))]
    p = StructuredPruner(model, ex, importance=importance)
    scores = p.score(batches=batches)
    assert set(scores) == set(p.groups)
    s = scores["conv2.0"]
    assert s.shape == (16,) and s.dtype == torch.float32 and s.device.type == "cpu"
    assert float(s[5]) == 0.0 and int(torch.argmin(s)) == 5
    assert abs(float(s.mean()) - 1.0) < 1e-5  # normalised by the group's mean
    assert p.plan_below({"conv2.0": s}, 1e-6) == {"conv2.0": [5]}
    ref = model(x)
    p.apply({"conv2.0": [5]})
    assert model.conv2[0].out_channels == 15
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)  # a dead channel changes nothing


@pytest.mark.parametrize("importance", ["taylor", "activation"])
def test_data_driven_importance_needs_batches(importance):
    model, ex = _build("mlp", (1, 8, 8), hidden=[16])
    with pytest.raises(InputError, match=f"{importance} scores channels from data"):
        StructuredPruner(model, ex, importance=importance).score()


def test_bn_scale_without_batchnorm_falls_back_to_magnitude_with_a_note():
    model, ex = _build("mlp", (1, 8, 8), hidden=[16, 8])
    p = StructuredPruner(model, ex, importance="bn-scale")
    scores = p.score()
    magnitude = StructuredPruner(model, ex).score()
    assert all(torch.allclose(scores[n], magnitude[n]) for n in scores)
    assert any("scored by magnitude" in n for n in p.notes)


# --- plans, τ and pruning ----------------------------------------------------------------------

CASES = [
    ("mlp", (1, 8, 8), {"hidden": [64, 32]}),
    ("cnn3", (1, 28, 28), {"widths": [16, 32, 32], "hidden": 64}),
    ("vgg", (3, 32, 32), {"width": 0.25}),
    ("resnet20", (3, 32, 32), {}),
]


@pytest.mark.parametrize("name,shape,args", CASES, ids=[c[0] for c in CASES])
def test_half_the_macs(name, shape, args):
    model, ex = _build(name, shape, **args)
    macs0 = count_macs_params(model, ex)[0]
    p = StructuredPruner(model, ex)
    scores = p.score()
    aim = macs0 / 2
    tau = p.tau_for_macs(scores, aim)
    plan = p.plan_below(scores, tau)
    predicted = p.plan_macs(plan)
    assert count_macs_params(model, ex)[0] == macs0  # plan_macs leaves the model alone
    # the smallest such τ: the next lower threshold misses the aim
    assert p.plan_macs(p.plan_below(scores, math.nextafter(tau, -math.inf))) > aim
    p.apply(plan)
    macs = count_macs_params(model, ex)[0]
    assert macs == predicted and 0.8 * aim < macs <= aim
    assert model(torch.randn(3, *shape)).shape == (3, 10)
    channels = p.group_channels()
    assert all(channels[g] == len(scores[g]) - len(plan.get(g, [])) for g in scores)


def test_pruned_layer_shapes_follow_the_plan():
    model, ex = _build("cnn3", (1, 28, 28), widths=[16, 32, 32], hidden=64)
    p = StructuredPruner(model, ex)
    p.apply({"conv3.0": list(range(0, 32, 4)), "fc1.1": [0, 1, 2]})  # 8 and 3 channels
    assert (model.conv3[0].out_channels, model.conv3[1].num_features) == (24, 24)
    assert model.fc1[1].in_features == 24 * 3 * 3  # flatten of the 3x3 map after three poolings
    assert (model.fc1[1].out_features, model.fc2.in_features, model.fc2.out_features) == (61, 61, 10)


@pytest.mark.parametrize("name,shape,args", [CASES[1], CASES[3]], ids=["cnn3", "resnet20"])
def test_round_to_8_leaves_multiples_of_8(name, shape, args):
    model, ex = _build(name, shape, **args)
    p = StructuredPruner(model, ex, round_to=8)
    before = p.group_channels()
    scores = p.score()
    p.apply(p.plan_below(scores, p.tau_for_macs(scores, 0.5 * count_macs_params(model, ex)[0])))
    after = p.group_channels()
    assert any(after[g] < before[g] for g in after)
    assert all(c % 8 == 0 for c in after.values()), after
    assert model(torch.randn(2, *shape)).shape == (2, 10)


@pytest.mark.parametrize("round_to,least", [(None, 1), (8, 8)])
def test_tau_above_all_scores_never_empties_a_group(round_to, least):
    model, ex = _build("cnn3", (1, 28, 28), widths=[16, 32, 32], hidden=64)
    p = StructuredPruner(model, ex, round_to=round_to)
    scores = p.score()
    plan = p.plan_below(scores, 1e9)
    assert {g: len(scores[g]) - len(i) for g, i in plan.items()} == {g: least for g in scores}
    assert p.tau_for_macs(scores, 0) == math.nextafter(max(float(s.max()) for s in scores.values()), math.inf)
    p.apply(plan)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_round_to_plan_by_hand():
    model, ex = _build("mlp", (1, 8, 8), hidden=[20, 6])
    p = StructuredPruner(model, ex, round_to=8)
    scores = {"features.1": torch.arange(20.0), "features.3": torch.arange(6.0)}
    # 20 channels, 3 below τ: 17 left, rounded up to 24 > 20, so none removed; 13 below: 7 -> 8
    assert p.plan_below(scores, 2.5) == {}
    assert p.plan_below(scores, 12.5) == {"features.1": list(range(12))}
    # 6 channels <= round_to: the group stays whole
    assert "features.3" not in p.plan_below(scores, 100)


def test_prune_ratios_and_unknown_groups():
    model, ex = _build("cnn3", (1, 28, 28), widths=[16, 32, 32], hidden=64)
    p = StructuredPruner(model, ex)
    scores = p.score()
    with pytest.raises(InputError, match="no prunable group 'fc2'"):
        p.prune_ratios({"fc2": 0.5}, scores)
    with pytest.raises(InputError, match="no prunable group 'conv9'"):
        p.plan_below({"conv9": torch.ones(3)}, 0.5)
    p.prune_ratios({"conv2.0": 0.5, "conv1.0": 0.25}, scores)
    assert (model.conv2[0].out_channels, model.conv1[0].out_channels, model.conv3[0].out_channels) == (16, 12, 32)
    assert [h[0] for h in p.history()] == ["conv2.0", "conv1.0"]


def test_trial_restores_the_model_exactly():
    model, ex = _build("resnet20", (3, 32, 32))
    randomise_bn(model)
    x = torch.randn(2, 3, 32, 32)
    ref, sd = model(x), {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    handle = model.layer1[0].conv1.register_forward_hook(lambda *a: calls.append(1))
    p = StructuredPruner(model, ex)
    plan = p.plan_ratios({"layer1.0.conv1": 0.5, "layer3.2.conv1": 0.25}, p.score())
    with p.trial(plan) as pruned:
        assert pruned.layer1[0].conv1.out_channels == 8 and pruned.layer3[2].conv2.in_channels == 48
        assert pruned(x).shape == (2, 10)
    assert model.layer1[0].conv1.out_channels == 16 and p.history() == []
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model(x), ref)
    handle.remove()  # hook handles taken before the trial still work
    calls.clear()
    model(x)
    assert calls == []


def test_failed_forward_check_restores_and_raises_model_error(monkeypatch):
    model, ex = _build("cnn3", (1, 28, 28), widths=[16, 32, 32], hidden=64)
    p = StructuredPruner(model, ex)
    monkeypatch.setattr(p, "_check_forward", lambda: (_ for _ in ()).throw(RuntimeError("shapes\ncannot be multiplied")))
    with pytest.raises(ModelError, match="broke the model's forward pass") as err:
        p.apply({"conv2.0": [0, 1]})
    assert "\n" not in str(err.value)
    assert model.conv2[0].out_channels == 32 and p.history() == []


# --- history -----------------------------------------------------------------------------------

def test_two_step_history_replays_on_a_fresh_model(tmp_path):
    shape = (3, 32, 32)
    model, ex = _build("resnet20", shape)
    randomise_bn(model)
    history = []
    for importance, fraction in (("magnitude", 0.7), ("bn-scale", 0.5)):  # one pruner per step, as in compress
        p = StructuredPruner(model, ex, importance=importance)
        scores = p.score()
        p.apply(p.plan_below(scores, p.tau_for_macs(scores, fraction * count_macs_params(model, ex)[0])))
        history = history + p.history()
    assert len({h[0] for h in history}) > 1 and all(isinstance(i, int) for h in history for i in h[2])
    path = tmp_path / "student.kdc"
    save_model_file(path, model, name="resnet20", args={}, input_shape=shape, num_classes=10,
                    pruning_history=history, metadata={})
    loaded, info = load_model_file(path)
    assert info["pruning_history"] == history
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    x = torch.randn(4, *shape)
    assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_replay_history_rejects_unknown_modules():
    model, ex = _build("mlp", (1, 8, 8), hidden=[16])
    with pytest.raises(ModelError, match="no module 'features.9'"):
        replay_history(model, ex, [["features.9", True, [0]]])
    with pytest.raises(ModelError, match="entry 0"):
        replay_history(model, ex, [["features.1", True]])
    replay_history(model, ex, [["features.1", True, [0, 3]]])
    assert model.features[1].out_features == 14 and model.classifier.in_features == 14


def test_fill_to_macs_lands_near_the_aim_in_round_to_blocks():
    """One τ on a cnn3 moves in coarse steps (a conv1 block at full resolution is expensive):
    filling gives back whole blocks, best-scoring first, without passing the aim."""
    model, ex = _build("cnn3", (1, 28, 28), widths=[16, 32, 64], hidden=64)
    randomise_bn(model)
    macs0 = count_macs_params(model, ex)[0]
    p = StructuredPruner(model, ex, round_to=4)
    scores = p.score()
    aim = 0.3 * macs0
    plan = p.plan_below(scores, p.tau_for_macs(scores, aim))
    filled = p.fill_to_macs(scores, plan, aim)
    before, after = p.plan_macs(plan), p.plan_macs(filled)
    assert before <= after <= aim
    assert after > before  # this case lands below the aim with τ alone
    n = p.group_channels()
    for g, idxs in filled.items():
        assert set(idxs) <= set(plan[g])  # only gives back, never removes more
        assert (n[g] - len(idxs)) % 4 == 0  # widths stay multiples of round_to
        back = set(plan[g]) - set(idxs)
        if back:  # what came back scores at least as high as what stayed removed
            assert min(float(scores[g][i]) for i in back) >= max(float(scores[g][i]) for i in idxs)
    # every group still removing channels cannot give back its next block within the aim
    for g, idxs in filled.items():
        nxt = sorted(idxs, key=lambda i: float(scores[g][i]), reverse=True)[:4]
        assert p.plan_macs({**filled, g: [i for i in idxs if i not in nxt]}) > aim
    p.apply(filled)
    assert count_macs_params(model, ex)[0] == after


def test_a_probe_overflowed_by_its_weights_does_not_exclude_the_groups_of_later_models():
    """The coupling probe's verdict is cached per structure; one that these weights made
    non-finite (an MLP scaled by 1e25) must not keep every later MLP of that shape unpruned."""
    from kdcli.prune.pruner import StructuredPruner

    def mlp(scale):
        torch.manual_seed(0)
        m = build_model("mlp", {"hidden": [16, 16]}, input_shape=(1, 8, 8), num_classes=10)
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(scale)
        return m

    x = torch.zeros(1, 1, 8, 8)
    StructuredPruner(mlp(1e25), x)
    assert sorted(StructuredPruner(mlp(1.0), x).groups) == ["features.1", "features.3"]


def test_plan_for_macs_lands_near_the_aim_when_one_block_is_expensive():
    """A wide early layer whose round_to block costs most of the gap: the threshold plan that
    first gets under the aim removes it and lands far below; taking cheap blocks away from the
    plan of the next lower threshold lands just under the aim instead."""
    from torch import nn

    from kdcli.prune.pruner import StructuredPruner, count_macs_params

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 64, 1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    ex = torch.zeros(1, 3, 32, 32)
    p = StructuredPruner(model, ex, round_to=8)
    total = count_macs_params(model, ex)[0]
    # the first conv's channels score lowest, so any threshold takes its costly block first
    scores = {"0": torch.tensor([0.1] * 8 + [5.0] * 8), "2": torch.linspace(0.2, 4.0, 64)}
    aim = 0.93 * total
    tau = p.tau_for_macs(scores, aim)
    filled = p.fill_to_macs(scores, p.plan_below(scores, tau), aim)
    _, plan = p.plan_for_macs(scores, aim)
    assert p.plan_macs(plan) <= aim
    assert p.plan_macs(plan) >= p.plan_macs(filled)
    assert p.plan_macs(plan) > 0.9 * total  # just under the aim, not a 0.5x cut of the first conv


def test_plan_uniform_removes_the_same_fraction_of_every_group_lowest_scores_first():
    from torch import nn

    from kdcli.prune.pruner import StructuredPruner, count_macs_params

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    ex = torch.zeros(1, 3, 16, 16)
    p = StructuredPruner(model, ex)
    total = count_macs_params(model, ex)[0]
    # group "0" scores far below group "2": a global threshold would empty "0" first
    scores = {"0": torch.arange(32, dtype=torch.float64) * 0.01, "2": 10 + torch.arange(32, dtype=torch.float64)}
    ratio, plan = p.plan_uniform(scores, 0.5 * total)
    assert p.plan_macs(plan) <= 0.5 * total
    assert abs(len(plan["0"]) - len(plan["2"])) <= 2  # the same fraction, give or take the landing
    assert plan["2"] == list(range(len(plan["2"])))  # lowest scores first within the group
    assert 0.2 < ratio < 0.5
    _, glob = p.plan_for_macs(scores, 0.5 * total)
    assert len(glob.get("0", [])) > len(glob.get("2", []))  # the global plan does favour one group


def test_sensitivity_allocation_cuts_where_the_output_barely_moves():
    """prune.allocation: sensitivity measures each group's damage (KL of the outputs) per MAC
    saved: of two branches of equal cost, the one the classifier barely reads is cut first."""
    from kdcli.dkdp.compress import _Sensitivity

    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 16, 3, padding=1)
            self.b = nn.Conv2d(3, 16, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
            return self.fc(self.pool(y).flatten(1))

    torch.manual_seed(0)
    model = TwoBranches().eval()
    with torch.no_grad():
        model.fc.weight[:, 16:] *= 1e-3  # branch b hardly reaches the logits
    ex = torch.zeros(1, 3, 8, 8)
    p = StructuredPruner(model, ex)
    total = count_macs_params(model, ex)[0]
    scores = p.score()
    batches = [(torch.randn(32, 3, 8, 8), torch.zeros(32, dtype=torch.long))]
    damage, plan = _Sensitivity(p, scores, model, batches, [0.125 * i for i in range(1, 8)]).for_macs(0.7 * total)
    assert p.plan_macs(plan) <= 0.7 * total
    assert len(plan.get("b", [])) >= 10 and len(plan.get("a", [])) <= 2, plan
    assert damage >= 0
    _, uniform = p.plan_uniform(scores, 0.7 * total)  # the control: a uniform cut takes from both
    assert len(uniform.get("a", [])) >= 4
    assert count_macs_params(model, ex)[0] == total  # the scan left the model as it was
