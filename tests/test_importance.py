"""Channel importance (kdcli.prune.importance, kdcli.config.importance) against values computed by
hand from each criterion's formula, on a two-conv net whose weights are set by hand.

The net: x (N, 2, 2, 2) → conv1 (2→3, 1x1) → bn1 → ReLU → conv2 (3→2, 1x1) → bn2 → ReLU →
flatten → fc (8→3). fc makes the logits, so it is never pruned; the groups are

- ``conv1``: conv1's 3 filters, bn1's γ, and conv2's 3 input slices;
- ``conv2``: conv2's 2 filters, bn2's γ, and fc's input columns, 4 per channel (the flatten spreads
  each channel over the 2x2 positions).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdcli.config.importance import CRITERIA, NAMES, NEEDS_DATA
from kdcli.errors import InputError
from kdcli.prune.importance import IMPORTANCES, group_importance
from kdcli.prune.pruner import StructuredPruner

W1 = torch.tensor([[1.0, 2.0], [0.0, 1.0], [3.0, 0.0]])   # conv1: 3 filters over 2 input channels
B1 = torch.tensor([0.5, -0.5, 1.0])                        # biases: not part of any criterion
G1 = torch.tensor([1.0, 2.0, 0.5])                         # bn1 γ
BETA1 = torch.tensor([0.1, 0.2, 0.3])
W2 = torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]])    # conv2: 2 filters over 3 channels
B2 = torch.tensor([0.1, 0.1])
G2 = torch.tensor([1.5, -1.0])                             # a negative γ: criteria take |γ|
BETA2 = torch.tensor([0.0, 0.5])
FC = torch.arange(24.0).reshape(3, 8) / 8 - 1.0            # fc: 3 classes over 2 channels x 4 positions
EPS = 1e-5


class TwoConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, eps=EPS)
        self.conv2, self.bn2 = nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2, eps=EPS)
        self.fc = nn.Linear(8, 3)
        with torch.no_grad():
            self.conv1.weight.copy_(W1.view(3, 2, 1, 1))
            self.conv1.bias.copy_(B1)
            self.bn1.weight.copy_(G1)
            self.bn1.bias.copy_(BETA1)
            self.conv2.weight.copy_(W2.view(2, 3, 1, 1))
            self.conv2.bias.copy_(B2)
            self.bn2.weight.copy_(G2)
            self.bn2.bias.copy_(BETA2)
            self.fc.weight.copy_(FC)
            self.fc.bias.zero_()

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.fc(h.flatten(1))


EXAMPLE = torch.zeros(1, 2, 2, 2)


def _pruner(importance="magnitude"):
    model = TwoConv().eval()  # fresh BN statistics: mean 0, variance 1
    return StructuredPruner(model, EXAMPLE, importance=importance)


def _batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(5, 2, 2, 2, generator=g), torch.tensor([0, 1, 2, 0, 1])),
            (torch.randn(3, 2, 2, 2, generator=g), torch.tensor([2, 2, 1]))]


def _fc_columns(w):
    """fc's weights per conv2 channel: (classes, channels, positions), as the flatten lays them out."""
    return w.reshape(3, 2, 4)


def _hand_forward(x, w1=W1, g1=G1, beta1=BETA1, w2=W2, g2=G2, beta2=BETA2, fc=FC):
    """The net's forward pass written out (eval-mode BN with mean 0, variance 1): the activations
    entering conv2 and fc, and the logits."""
    s = 1 / math.sqrt(1 + EPS)
    a1 = torch.einsum("ci,nihw->nchw", w1, x) + B1.view(1, 3, 1, 1)
    h1 = torch.relu(g1.view(1, 3, 1, 1) * a1 * s + beta1.view(1, 3, 1, 1))
    a2 = torch.einsum("ci,nihw->nchw", w2, h1) + B2.view(1, 2, 1, 1)
    h2 = torch.relu(g2.view(1, 2, 1, 1) * a2 * s + beta2.view(1, 2, 1, 1))
    return h1, h2, h2.flatten(1) @ fc.T


def _magnitude_by_hand(p):
    """Li et al. 2017 filter norms taken over the whole group (Fang et al. 2023): per channel,
    Σ|w|^p over each of the group's layers (conv filter, BN γ, consumer's input slice), averaged
    over the 3 layers; biases are not weights of the filter."""
    conv1 = (W1.abs() ** p).sum(1) + G1.abs() ** p + (W2.abs() ** p).sum(0)
    conv2 = (W2.abs() ** p).sum(1) + G2.abs() ** p + (_fc_columns(FC).abs() ** p).sum((0, 2))
    return {"conv1": conv1 / 3, "conv2": conv2 / 3}


def _normalised(raw):
    return {k: v / v.mean() for k, v in raw.items()}


def test_criteria_table_is_the_pruners_list():
    """The names a recipe may give are exactly those the pruner scores, and the data flag is right."""
    assert IMPORTANCES == NAMES == ("magnitude", "magnitude-l1", "taylor", "activation", "bn-scale")
    assert NEEDS_DATA == {"taylor", "activation"} == {k for k, v in CRITERIA.items() if v}
    p = _pruner()
    for name in NAMES:
        if name in NEEDS_DATA:  # scoring from data with no data is refused, not silently magnitude
            with pytest.raises(InputError, match=f"{name} scores channels from data"):
                p.score(importance=name)
        else:
            assert set(p.score(importance=name)) == {"conv1", "conv2"}
    with pytest.raises(InputError, match="prune.importance: expected one of magnitude, magnitude-l1"):
        p.score(importance="l1")


def test_magnitude_raw_scores_are_group_norms_by_hand():
    """group_importance's raw L2 and L1 scores: the mean over the group's layers of Σ w² / Σ |w|.
    "L2" is the squared norm (torch-pruning's, as in Fang et al. 2023), not √Σw²: the two rank a
    group's channels alike but, divided by the group's mean, give other scores to compare with τ."""
    p = _pruner()
    # By hand for conv1's channel 0: filter 1²+2², γ 1², conv2's slice 1²+0²: (5 + 1 + 1) / 3.
    for crit, power in (("magnitude", 2), ("magnitude-l1", 1)):
        raw = group_importance(p.model, p.dg, p._groups, crit)
        hand = _magnitude_by_hand(power)
        for g in ("conv1", "conv2"):
            assert raw[g].tolist() == pytest.approx(hand[g].tolist(), rel=1e-6), (crit, g)
    assert group_importance(p.model, p.dg, p._groups, "magnitude")["conv1"].tolist() == \
        pytest.approx([7 / 3, 6 / 3, 14.25 / 3])


@pytest.mark.parametrize("crit, power", [("magnitude", 2), ("magnitude-l1", 1)])
def test_score_divides_each_group_by_its_mean(crit, power):
    """StructuredPruner.score(): the raw scores over the group's mean, so one τ fits all groups."""
    scores = _pruner(crit).score()
    hand = _normalised(_magnitude_by_hand(power))
    assert set(scores) == {"conv1", "conv2"}
    for g in scores:
        assert scores[g].dtype == torch.float32
        assert scores[g].tolist() == pytest.approx(hand[g].tolist(), rel=1e-6), g
    # conv1's channels by hand: L2 (5 + 1 + 1, 1 + 4 + 1, 9 + .25 + 5) / 3, L1 (3 + 1 + 1, 1 + 2 + 1, 3 + .5 + 3) / 3
    raw = [7.0, 6.0, 14.25] if crit == "magnitude" else [5.0, 4.0, 6.5]
    assert scores["conv1"].tolist() == pytest.approx([v / (sum(raw) / 3) for v in raw], rel=1e-6)


def test_bn_scale_is_abs_gamma():
    """Liu et al. 2017: each channel's |γ| (the sign of γ does not matter), over the group's mean."""
    scores = _pruner("bn-scale").score()
    assert scores["conv1"].tolist() == pytest.approx((G1.abs() / G1.abs().mean()).tolist(), rel=1e-6)
    assert scores["conv2"].tolist() == pytest.approx([1.5 / 1.25, 1.0 / 1.25], rel=1e-6)


def _taylor_grads(batches):
    """∂L/∂w of the cross-entropy summed over the batches, from the written-out forward pass."""
    params = {k: v.clone().requires_grad_(True) for k, v in
              dict(w1=W1, g1=G1, beta1=BETA1, w2=W2, g2=G2, beta2=BETA2, fc=FC).items()}
    loss = sum(F.cross_entropy(_hand_forward(x, **params)[2], y) for x, y in batches)
    loss.backward()
    return {k: v.grad for k, v in params.items()}


def test_taylor_is_abs_weight_times_summed_gradient():
    """Molchanov et al. 2019, first order: per channel Σ|w·∂L/∂w| over the filter and the
    consumer's input slice, with ∂L/∂w the gradient of the loss summed over all batches."""
    batches = _batches()
    g = _taylor_grads(batches)
    # with each group's BatchNorm γ (Taylor-FO-BN): see test_taylor_counts_the_batchnorm_of_the_group
    conv1 = (W1 * g["w1"]).abs().sum(1) + (G1 * g["g1"]).abs() + (W2 * g["w2"]).abs().sum(0)
    conv2 = ((W2 * g["w2"]).abs().sum(1) + (G2 * g["g2"]).abs()
             + (_fc_columns(FC * g["fc"])).abs().sum((0, 2)))
    p = _pruner("taylor")
    before = [q.grad for q in p.model.parameters()]
    scores = p.score(batches=batches)
    assert scores["conv1"].tolist() == pytest.approx((conv1 / conv1.mean()).tolist(), rel=1e-4)
    assert scores["conv2"].tolist() == pytest.approx((conv2 / conv2.mean()).tolist(), rel=1e-4)
    assert [q.grad for q in p.model.parameters()] == before  # the scoring's gradients are put away
    # Scoring the last batch alone gives other numbers: every batch counts.
    only_last = p.score(batches=batches[1:])
    assert not torch.allclose(only_last["conv1"], scores["conv1"], rtol=1e-3)


def test_taylor_counts_the_batchnorm_of_the_group():
    """The module docstring sums |w·∂L/∂w| over the group, and Molchanov et al. 2019's Taylor-FO-BN
    scores a channel by its BN parameters: a channel whose filter and consumer slice carry the same
    |w·g| but whose γ·∂L/∂γ differs must score differently."""
    batches = _batches()
    g = _taylor_grads(batches)
    conv1 = ((W1 * g["w1"]).abs().sum(1) + (G1 * g["g1"]).abs() + (W2 * g["w2"]).abs().sum(0))
    scores = _pruner("taylor").score(batches=batches)
    assert scores["conv1"].tolist() == pytest.approx((conv1 / conv1.mean()).tolist(), rel=1e-4)


def test_activation_is_mean_abs_input_of_the_consumers():
    """Mean |activation| a channel feeds its consumers over all samples and positions of every
    batch; through the flatten, the means at a channel's 4 positions add up."""
    batches = _batches()
    x = torch.cat([b[0] for b in batches])
    h1, h2, _ = _hand_forward(x)
    conv1 = h1.abs().mean((0, 2, 3))                  # conv2 sees 8 samples x 4 positions per channel
    conv2 = h2.abs().flatten(2).mean(0).sum(1)        # fc sees 4 inputs per channel, a mean for each
    assert (conv1 > 0).all() and (conv2 > 0).all()    # no channel is dead: the numbers all matter
    scores = _pruner("activation").score(batches=batches)
    assert scores["conv1"].tolist() == pytest.approx((conv1 / conv1.mean()).tolist(), rel=1e-5)
    assert scores["conv2"].tolist() == pytest.approx((conv2 / conv2.mean()).tolist(), rel=1e-5)
    # every batch counts, weighted by its samples (torch-pruning's own keeps only the last one)
    last = _pruner("activation").score(batches=batches[1:])
    assert not torch.allclose(last["conv1"], scores["conv1"], rtol=1e-3)


def test_a_group_with_zero_importance_scores_zero_not_nan():
    """A group whose raw scores are all 0 has mean 0: it scores 0 everywhere rather than 0/0."""
    p = _pruner("bn-scale")
    with torch.no_grad():
        p.model.bn2.weight.zero_()
    s = p.score()
    assert s["conv2"].tolist() == [0.0, 0.0]
    assert s["conv1"].tolist() == pytest.approx((G1 / G1.mean()).tolist(), rel=1e-6)


def test_no_fallback_note_when_every_group_was_scored():
    """Both groups have a BatchNorm: bn-scale scores them all, so nothing fell back to magnitude."""
    p = _pruner("bn-scale")
    p.score()
    p.score(importance="magnitude")
    assert p.notes == []
