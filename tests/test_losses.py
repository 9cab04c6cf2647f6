"""Each loss against arithmetic written out by hand (numpy / plain python), plus adapter shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from kdcli.distill.losses.base import nearest_teacher, per_channel_loss
from kdcli.distill.losses.hints import ab_loss, hint_loss, make_regressor
from kdcli.distill.losses.logits import dkd_loss, kd_loss
from kdcli.distill.losses.maps import at_loss, attention_map, fsp_loss, fsp_matrix
from kdcli.config.losses import DEFAULT_LOSSES, KD, VID, LossSpec
from kdcli.distill.losses.vid import VIDRegressor, fixed_lambda, vid_nll


def softmax(v):
    e = np.exp(v - np.max(v))
    return e / e.sum()


# --- logits -----------------------------------------------------------------------------------

def test_kd_matches_hand_kl_times_t_squared():
    s, t = np.array([1.0, 2.0, 3.0]), np.array([3.0, 1.0, 0.0])
    for T in (1.0, 2.0, 4.0):
        p, q = softmax(t / T), softmax(s / T)
        kl = sum(p[k] * math.log(p[k] / q[k]) for k in range(3))
        got = kd_loss(torch.tensor(s)[None], torch.tensor(t)[None], T).item()
        assert got == pytest.approx(T * T * kl, rel=1e-5)
    # batch mean: a second, identical-logit row contributes 0 and halves the value
    half = kd_loss(torch.tensor(np.stack([s, t])), torch.tensor(np.stack([t, t])), 2.0).item()
    assert half == pytest.approx(kd_loss(torch.tensor(s)[None], torch.tensor(t)[None], 2.0).item() / 2, rel=1e-5)


def test_kd_zero_when_logits_equal():
    z = torch.randn(5, 10)
    assert kd_loss(z, z.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_dkd_matches_hand_computation():
    s = np.array([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 3.0, -2.0]])
    t = np.array([[3.0, 1.0, -2.0, 0.5], [0.0, -1.0, 4.0, 1.0]])
    y = [0, 2]
    T, alpha, beta = 2.0, 1.0, 8.0
    total = 0.0
    for n in range(2):
        ps, pt = softmax(s[n] / T), softmax(t[n] / T)
        bs, bt = [ps[y[n]], 1 - ps[y[n]]], [pt[y[n]], 1 - pt[y[n]]]
        tckd = sum(bt[k] * math.log(bt[k] / bs[k]) for k in range(2))
        rest = [k for k in range(4) if k != y[n]]
        qs, qt = softmax(s[n][rest] / T), softmax(t[n][rest] / T)
        nckd = sum(qt[k] * math.log(qt[k] / qs[k]) for k in range(3))
        total += (alpha * tckd + beta * nckd) * T * T
    got = dkd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), alpha, beta, T).item()
    assert got == pytest.approx(total / 2, rel=1e-5)


# --- hints (FitNets) and activation boundaries --------------------------------------------------

@pytest.mark.parametrize("s_shape,t_shape,kind", [
    ((8, 6, 6), (16, 6, 6), torch.nn.Conv2d),            # 1x1
    ((8, 16, 16), (16, 8, 8), torch.nn.Conv2d),          # strided, kernel = stride = 2
    ((8, 10, 10), (16, 8, 8), torch.nn.Conv2d),          # valid conv, kernel 3 (FitNets)
    ((8, 8, 8), (16, 16, 16), torch.nn.ConvTranspose2d),  # transposed, stride 2
    ((8, 7, 7), (16, 9, 9), torch.nn.ConvTranspose2d),   # transposed, kernel 3
    ((8, 8, 4), (16, 4, 8), torch.nn.Sequential),        # mixed: pool then 1x1
    ((8,), (16,), torch.nn.Linear),
    ((8, 4, 4), (16,), torch.nn.Sequential),             # pool then Linear
])
def test_regressor_maps_student_shape_to_teacher_shape(s_shape, t_shape, kind):
    reg = make_regressor(torch.Size(s_shape), torch.Size(t_shape))
    assert isinstance(reg, kind)
    assert reg(torch.randn(2, *s_shape)).shape == (2, *t_shape)
    if s_shape == (8, 16, 16):
        assert reg.kernel_size == (2, 2) and reg.stride == (2, 2)
    if s_shape == (8, 10, 10):
        assert reg.kernel_size == (3, 3) and reg.stride == (1, 1)


def test_same_width_regressor_starts_as_identity():
    # a student layer of the teacher's width: the hint starts at the student's own error (0 for
    # equal features), not at a random projection's
    f = torch.randn(3, 4, 5, 5)
    reg = make_regressor(torch.Size((4, 5, 5)), torch.Size((4, 5, 5)))
    assert hint_loss(reg(f), f).item() == pytest.approx(0.0, abs=1e-10)
    v = torch.randn(3, 6)
    lin = make_regressor(torch.Size((6,)), torch.Size((6,)))
    assert torch.equal(lin(v), v)
    # other widths keep a random start
    wide = make_regressor(torch.Size((4, 5, 5)), torch.Size((8, 5, 5)))
    assert hint_loss(wide(f), f.repeat(1, 2, 1, 1)).item() > 0.01


def test_hint_loss_weighted_and_critical_by_hand():
    # 1 sample, 2 channels, 1x2 positions
    pred = torch.tensor([[[[1.0, 3.0]], [[0.0, 2.0]]]])
    target = torch.tensor([[[[2.0, 2.0]], [[0.0, 0.0]]]])
    # precise per-channel MSE: c0 ((1-2)^2 + (3-2)^2)/2 = 1; c1 (0 + 4)/2 = 2
    assert hint_loss(pred, target).item() == pytest.approx((1 + 2) / 2)
    w = torch.tensor([3.0, 0.5])
    assert hint_loss(pred, target, w).item() == pytest.approx((3 * 1 + 0.5 * 2) / 2)
    # c0 critical: means 2 vs 2 -> 0; c1 stays precise (2)
    crit = torch.tensor([True, False])
    assert hint_loss(pred, target, w, crit).item() == pytest.approx((3 * 0 + 0.5 * 2) / 2)


def test_granularity_zero_weight_and_critical_pooling():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    w = torch.tensor([1.0, 0.0, 2.0])
    crit = torch.tensor([False, False, True])
    base = hint_loss(pred, target, w, crit)
    changed = pred.clone()
    changed[:, 1] += torch.randn(2, 4, 4)  # channel 1 has weight 0
    assert hint_loss(changed, target, w, crit).item() == pytest.approx(base.item(), rel=1e-6)
    perm = pred.clone()  # a spatial permutation within critical channel 2
    perm[:, 2] = perm[:, 2].flatten(1)[:, torch.randperm(16)].view(2, 4, 4)
    assert hint_loss(perm, target, w, crit).item() == pytest.approx(base.item(), rel=1e-6)
    perm0 = pred.clone()  # ... but not within a precise channel
    perm0[:, 0] = perm0[:, 0].flatten(1)[:, torch.randperm(16)].view(2, 4, 4)
    assert hint_loss(perm0, target, w, crit).item() != pytest.approx(base.item(), rel=1e-6)


def test_per_channel_loss_shape():
    out = per_channel_loss(lambda a, b: (a - b).abs(), torch.ones(2, 5, 3, 3), torch.zeros(2, 5, 3, 3))
    assert out.shape == (5,) and torch.allclose(out, torch.ones(5))


def test_ab_loss_by_hand():
    # Heo et al. 2019, eq. 5: rho(T)*relu(m - r)^2 + (1 - rho(T))*relu(m + r)^2, summed per sample
    r = torch.tensor([[-2.0, 0.5, 2.0, -0.5]])
    t = torch.tensor([[1.0, -1.0, 3.0, 0.0]])  # rho = 1, 0, 1, 0
    # rho=1: relu(1+2)^2 = 9; rho=0: relu(1+0.5)^2 = 2.25; rho=1: relu(1-2)^2 = 0; rho=0: relu(1-0.5)^2 = 0.25
    assert ab_loss(r, t, margin=1.0).item() == pytest.approx(9 + 2.25 + 0 + 0.25)
    # a second sample: the per-sample sums are averaged over the batch (the authors' sum / batch_size)
    r2 = torch.tensor([[-2.0, 0.5, 2.0, -0.5], [0.0, 0.0, 0.0, 0.0]])
    t2 = torch.tensor([[1.0, -1.0, 3.0, 0.0], [1.0, 1.0, -1.0, -1.0]])  # second row: 1 + 1 + 1 + 1
    assert ab_loss(r2, t2, margin=1.0).item() == pytest.approx((11.5 + 4.0) / 2)
    # maps: summed over channels and positions; margin 2: relu(2 - 0.5)^2 = 2.25, relu(2 + 0.5)^2 = 6.25
    r4 = torch.full((1, 2, 1, 2), 0.5)
    t4 = torch.tensor([[[[1.0, 1.0]], [[0.0, -2.0]]]])
    assert ab_loss(r4, t4, margin=2.0).item() == pytest.approx(2 * 2.25 + 2 * 6.25)
    # beyond the margin on the right side of every boundary: zero
    assert ab_loss(torch.tensor([[2.0, -2.0]]), torch.tensor([[0.3, -0.3]]), 1.0).item() == 0.0


def _term(cls, spec, t_shapes: dict, s_shapes: dict):
    """A feature term built directly from per-sample shapes (no Distiller)."""
    from kdcli.distill.losses.base import Layers

    layers = Layers(list(t_shapes), list(s_shapes), {k: torch.Size(v) for k, v in t_shapes.items()},
                    {k: torch.Size(v) for k, v in s_shapes.items()}, "distill.losses[0]")
    return cls(spec, spec.kind, layers)


def test_ab_term_with_paper_weight_equals_the_authors_code():
    """weight 0.003 and layer_decay 0.5 give the authors' CIFAR objective,
    ``(L(C3(s3), t3) + L(C2(s2), t2)/2 + L(C1(s1), t1)/4) / batch / 1000 * 3`` with
    ``criterion_alternative_L2`` written out as in bhheo/AB_distillation."""
    from kdcli.config.losses import AB
    from kdcli.distill.losses.hints import ABTerm

    def criterion_alternative_l2(source, target, margin):
        loss = ((source + margin) ** 2 * ((source > -margin) & (target <= 0)).float() +
                (source - margin) ** 2 * ((source <= margin) & (target > 0)).float())
        return torch.abs(loss).sum()

    torch.manual_seed(0)
    t_shapes = {"t1": (4, 8, 8), "t2": (8, 4, 4), "t3": (16, 2, 2)}
    s_shapes = {"s1": (2, 8, 8), "s2": (4, 4, 4), "s3": (8, 2, 2)}
    spec = AB()
    assert spec.weight == 0.003 and spec.layer_decay == 0.5 and spec.margin == 1.0
    term = _term(ABTerm, spec, t_shapes, s_shapes).eval()
    n = 5
    tf = {k: torch.randn(n, *v) for k, v in t_shapes.items()}
    sf = {k: torch.randn(n, *v) for k, v in s_shapes.items()}
    ours = spec.weight * term(None, sf, term.targets(None, tf), None)
    with torch.no_grad():
        c = [conn(sf[s]) for conn, s in zip(term.connectors, ["s1", "s2", "s3"])]
    ref = criterion_alternative_l2(c[2], tf["t3"], 1.0) / n
    ref = ref + criterion_alternative_l2(c[1], tf["t2"], 1.0) / n / 2
    ref = ref + criterion_alternative_l2(c[0], tf["t1"], 1.0) / n / 4
    ref = ref / 1000 * 3
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


# --- attention transfer and FSP ----------------------------------------------------------------

def test_attention_map_and_at_loss_by_hand():
    f = torch.tensor([[[[1.0, 2.0], [0.0, 1.0]], [[3.0, 0.0], [0.0, 1.0]]]])  # (1, 2, 2, 2)
    q = np.array([(1 + 9) / 2, (4 + 0) / 2, 0.0, (1 + 1) / 2])  # mean over channels of f^2
    q = q / np.linalg.norm(q)
    assert np.allclose(attention_map(f).numpy()[0], q, atol=1e-6)
    g = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # attention all on the first position
    e1 = np.array([1.0, 0, 0, 0])
    # the authors' at_loss: the mean over batch and positions of the squared difference
    expect = sum((q[i] - e1[i]) ** 2 for i in range(4)) / 4
    assert at_loss(attention_map(f), attention_map(g)).item() == pytest.approx(expect, rel=1e-5)
    assert at_loss(attention_map(f), attention_map(f.clone() * 3)).item() == pytest.approx(0.0, abs=1e-6)
    # two samples: averaged over both (the second pair identical, so half the first's value)
    two = at_loss(attention_map(torch.cat([f, f])), attention_map(torch.cat([g.expand(1, 2, 2, 2), f])))
    assert two.item() == pytest.approx(expect / 2, rel=1e-5)
    # p = 4 (|f|^p, so the sign of a feature does not matter)
    q4 = np.array([(1 + 81) / 2, (16 + 0) / 2, 0.0, (1 + 1) / 2])
    assert np.allclose(attention_map(-f, p=4).numpy()[0], q4 / np.linalg.norm(q4), atol=1e-6)


def test_attention_map_pools_features_before_the_power():
    # one channel, 2x2 -> 1x2: pooling the features first averages +1 and -1 to 0 (the pooled
    # *map* would average 1 and 1 to 1)
    f = torch.tensor([[[[1.0, 2.0], [-1.0, 2.0]]]])
    a = attention_map(f, size=(1, 2))
    col0, col1 = ((1 + -1) / 2) ** 2, ((2 + 2) / 2) ** 2   # 0 and 4
    norm = math.sqrt(col0 ** 2 + col1 ** 2)
    assert a.shape == (1, 2) and np.allclose(a.numpy()[0], [col0 / norm, col1 / norm], atol=1e-6)
    f = torch.randn(2, 3, 8, 8)
    a = attention_map(f, size=(4, 4))
    assert a.shape == (2, 16)
    assert torch.allclose(a.norm(dim=1), torch.ones(2))


def test_at_term_with_paper_weight_equals_the_authors_code():
    """weight 1000 (the paper's and the authors' β = 10³) times the term equals
    ``β · Σ_j at_loss(s_j, t_j)`` of szagoruyko/attention-transfer, the larger side's features
    pooled to the smaller size first as in RepDistiller's ``Attention``, on random features of
    different spatial sizes on either side."""
    import torch.nn.functional as F

    from kdcli.config.losses import AT
    from kdcli.distill.losses.maps import ATTerm

    def at(x):
        return F.normalize(x.pow(2).mean(1).view(x.size(0), -1))

    def reference_at_loss(x, y):
        if x.shape[2:] != y.shape[2:]:
            size = tuple(min(a, b) for a, b in zip(x.shape[2:], y.shape[2:]))
            x, y = F.adaptive_avg_pool2d(x, size), F.adaptive_avg_pool2d(y, size)
        return (at(x) - at(y)).pow(2).mean()

    torch.manual_seed(0)
    t_shapes = {"t1": (16, 16, 16), "t2": (32, 8, 8), "t3": (64, 4, 4)}
    s_shapes = {"s1": (8, 8, 8), "s2": (8, 8, 8), "s3": (16, 8, 8)}   # smaller, equal, larger than the teacher
    spec = AT()
    assert spec.weight == 1000.0 and spec.p == 2.0
    term = _term(ATTerm, spec, t_shapes, s_shapes)
    tf = {k: torch.randn(6, *v) for k, v in t_shapes.items()}
    sf = {k: torch.randn(6, *v) for k, v in s_shapes.items()}
    ours = spec.weight * term(None, sf, term.targets(None, tf), None)
    beta = 1e3
    ref = beta * sum(reference_at_loss(sf[s], tf[t]) for s, t in zip(s_shapes, t_shapes))
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert ours.item() > 0


def test_fsp_matrix_by_hand_and_zero_for_identical():
    f1 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, 1.0]]]])  # (1, 2, 2, 2)
    f2 = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[2.0, 2.0], [2.0, 2.0]], [[1.0, 1.0], [0.0, 0.0]]]])
    a = f1.view(2, 4).numpy()
    b = f2.view(3, 4).numpy()
    hand = np.array([[sum(a[i, k] * b[j, k] for k in range(4)) / 4 for j in range(3)] for i in range(2)])
    g = fsp_matrix(f1, f2)
    assert g.shape == (1, 2, 3) and np.allclose(g[0].numpy(), hand)
    assert fsp_loss(g, fsp_matrix(f1.clone(), f2.clone())).item() == 0.0
    assert fsp_loss(g, torch.zeros_like(g)).item() == pytest.approx((hand ** 2).mean(), rel=1e-6)


# --- VID and pairing ---------------------------------------------------------------------------

def test_vid_nll_known_mu_sigma():
    # Ahn et al. 2019: (t - mu)^2 / (2 var) + 1/2 log var per element, averaged over all of them
    mu = torch.zeros(1, 2)
    t = torch.tensor([[1.0, 2.0]])
    var = torch.tensor([1.0, 4.0])
    hand = ((1 / 2 + 0.5 * math.log(1)) + (4 / 8 + 0.5 * math.log(4))) / 2
    assert vid_nll(mu, var, t).item() == pytest.approx(hand, rel=1e-6)
    # maps: one channel, mean over batch and positions
    mu = torch.zeros(2, 1, 1, 2)
    t = torch.tensor([[[[1.0, 3.0]]], [[[0.0, 2.0]]]])
    hand = (1 + 9 + 0 + 4) / 4 / (2 * 2.0) + 0.5 * math.log(2.0)
    assert vid_nll(mu, torch.tensor([2.0]), t).item() == pytest.approx(hand, rel=1e-6)
    # channel weights: Σ_c w_c·m_c / C
    w = torch.tensor([0.0, 1.0])
    assert vid_nll(torch.zeros(1, 2), torch.tensor([1.0, 4.0]), torch.tensor([[1.0, 2.0]]), w).item() == \
        pytest.approx((4 / 8 + 0.5 * math.log(4)) / 2, rel=1e-6)


def test_vid_nll_equals_the_reference_implementation():
    """``torch.mean(0.5 * ((pred_mean - target)**2 / pred_var + log(pred_var)))`` of RepDistiller's
    VIDLoss (and torchdistill's), with ``pred_var = log(1 + exp(log_scale)) + eps``."""
    torch.manual_seed(0)
    mu, t = torch.randn(4, 6, 3, 3), torch.randn(4, 6, 3, 3)
    log_scale = torch.randn(6)
    pred_var = torch.log(1.0 + torch.exp(log_scale)) + 1e-5
    ref = torch.mean(0.5 * ((mu - t) ** 2 / pred_var.view(1, -1, 1, 1) + torch.log(pred_var.view(1, -1, 1, 1))))
    assert vid_nll(mu, pred_var, t).item() == pytest.approx(ref.item(), rel=1e-5)
    reg = VIDRegressor(3, 6, vector=False, init_var=5.0, eps=1e-5)
    with torch.no_grad():
        reg.alpha.copy_(log_scale)
    assert torch.allclose(reg.variance(), pred_var)


def test_vid_regressor_starts_at_init_var_and_is_minimal_at_target():
    reg = VIDRegressor(3, 5, vector=False, init_var=5.0, eps=1e-5)
    assert torch.allclose(reg.variance(), torch.full((5,), 5.0), atol=1e-5)
    mu, var = reg(torch.randn(2, 3, 4, 4))
    assert mu.shape == (2, 5, 4, 4)
    # with μ = t the loss is its minimum for that σ²: the mean over channels of ½·log σ²_c
    assert vid_nll(mu, var, mu.detach()).item() == pytest.approx(0.5 * math.log(5.0), rel=1e-4)


def test_pairing():
    assert nearest_teacher(3, 3) == [0, 1, 2]
    assert nearest_teacher(4, 2) == [0, 3]
    assert nearest_teacher(2, 3) == [0, 1, 1]
    assert nearest_teacher(5, 1) == [4]
    assert torch.equal(fixed_lambda(3, 3, "pairwise"), torch.eye(3))
    lam = fixed_lambda(4, 3, "uniform")
    assert torch.allclose(lam.sum(0), torch.ones(3)) and torch.allclose(lam, torch.full((4, 3), 0.25))


# --- recipe specs ------------------------------------------------------------------------------

def test_spec_parsing_and_defaults():
    ta = TypeAdapter(LossSpec)
    vid = ta.validate_python({"kind": "vid", "pairing": "all-to-all", "lambda": "learned", "weight": 0.5})
    assert isinstance(vid, VID) and vid.lambda_ == "learned"
    assert [s.kind for s in DEFAULT_LOSSES] == ["kd", "ce"] and DEFAULT_LOSSES[0].temperature == 4.0
    assert isinstance(ta.validate_python({"kind": "kd"}), KD)
    hint = ta.validate_python({"kind": "hint", "teacher_layers": "layer2"})
    assert hint.teacher_layers == ["layer2"] and hint.student_layers == "auto"
    # the weights the papers' code used with these reductions (see each term's docstring)
    assert ta.validate_python({"kind": "at"}).weight == 1000.0
    ab = ta.validate_python({"kind": "ab"})
    assert ab.weight == 0.003 and ab.layer_decay == 0.5
    assert ta.validate_python({"kind": "vid"}).weight == 1.0
    assert ta.validate_python({"kind": "kd"}).weight == 1.0 and ta.validate_python({"kind": "hint"}).weight == 1.0
    assert ta.validate_python({"kind": "ab", "layer_decay": 1}).layer_decay == 1.0
    for bad in ({"kind": "kd", "temperature": 0}, {"kind": "kd", "weight": -1}, {"kind": "kd", "alpha": 1},
                {"kind": "nope"}, {"kind": "vid", "lambda": "learned"}, {"kind": "hint", "student_layers": []},
                {"kind": "at", "granularity": True}, {"kind": "ab", "layer_decay": 0}, {"kind": "ab", "layer_decay": 2}):
        with pytest.raises(ValidationError):
            ta.validate_python(bad)


def test_gaussian_entropy_by_hand():
    from kdcli.distill.losses.vid import gaussian_entropy

    # channel 0: values 1, 3 -> variance 1; channel 1: values 0, 4 -> variance 4 (over samples)
    t = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    eps = 1e-5
    h0 = 0.5 * math.log(1 + eps) + 0.5
    h1 = 0.5 * math.log(4 + eps) + 0.5
    assert gaussian_entropy(t).item() == pytest.approx((h0 + h1) / 2, abs=1e-6)   # per channel
    assert gaussian_entropy(t, torch.tensor([0.0, 2.0])).item() == pytest.approx(2 * h1 / 2, abs=1e-6)
