"""Ensembles as teachers: specialists (Hinton et al. 2015, §5) and diversified ensembles."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from kdcli.data.loader import DataBundle, TensorData
from kdcli.ensembles.clusters import class_covariance, confusable_subsets
from kdcli.ensembles.combine import combine_distributions, combine_gradient, combine_objective, expand_specialist
from kdcli.ensembles.diversified import AveragedEnsemble, diversification_term, layer_term
from kdcli.ensembles.diversity import disagreement_rate, linear_cka
from kdcli.ensembles.specialists import (SpecialistEnsemble, SpecialistTransferLoader, apply_dustbin_correction,
                                         dustbin_correction, specialist_from, specialist_soft_loss,
                                         specialist_soft_targets, train_specialist)
from kdcli.errors import InputError
from kdcli.analyze.granularity import GranularityMap, LayerGranularity

REPO = Path(__file__).resolve().parents[1]


def blobs(n_per_class=(100,) * 10, dim=8, seed=0) -> DataBundle:
    """Gaussian blobs, one per class, as a DataBundle (float inputs, no normalisation)."""
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(len(n_per_class), dim, generator=g)
    y = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(n_per_class)])
    x = centres[y] + torch.randn(len(y), dim, generator=g)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    k = len(n_per_class)
    cut = int(0.8 * len(y))
    return DataBundle(TensorData(x[:cut], y[:cut]), TensorData(x[cut:], y[cut:]), None, k, (dim,),
                      [0.0] * dim, [1.0] * dim, [f"c{i}" for i in range(k)], "blobs", batch_size=64)


def restricted(q: torch.Tensor, subset: list[int]) -> torch.Tensor:
    """q over ``subset`` plus the dustbin (the mass of the other classes): [N, |S|+1]."""
    sub = q[:, subset]
    return torch.cat([sub, 1 - sub.sum(1, keepdim=True)], 1)


def columns(subset: list[int], k: int) -> torch.Tensor:
    c = torch.full((k,), len(subset), dtype=torch.int64)
    c[subset] = torch.arange(len(subset))
    return c


# ----------------------------------------------------------------------------- dustbin correction


def test_dustbin_correction_is_log_of_oversampling():
    # 10 classes x 100 samples, subset {3, 7}: naturally 200 vs 800, in the transfer set 200 vs 200,
    # so the subset is oversampled 4 times relative to the dustbin classes.
    assert dustbin_correction(200, 200, 200, 800) == pytest.approx(math.log(4.0))
    assert dustbin_correction(50, 50, 50, 50) == pytest.approx(0.0)
    with pytest.raises(InputError):
        dustbin_correction(0, 10, 10, 10)


def test_corrected_specialist_reproduces_natural_prior():
    # A specialist that learnt only the transfer set's prior (each subset class 1/4, dustbin 1/2)
    # must, after the correction, predict the natural prior: 0.1, 0.1 and 0.8 for the dustbin.
    spec = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        spec[0].weight.zero_()
        spec[0].bias.copy_(torch.tensor([0.25, 0.25, 0.5]).log())
    apply_dustbin_correction(spec, dustbin_correction(200, 200, 200, 800), outputs=3)
    p = torch.softmax(spec(torch.randn(5, 4)), 1)
    assert torch.allclose(p, torch.tensor([0.1, 0.1, 0.8]).expand(5, 3), atol=1e-6)


def test_transfer_set_is_half_subset_with_dustbin_labels():
    data = blobs()
    subset = [3, 7]
    loader = SpecialistTransferLoader(data, subset, seed=1)
    counts = loader.proportions()
    n_sub = int(((data.train.y == 3) | (data.train.y == 7)).sum())
    assert counts == {"subset_transfer": n_sub, "others_transfer": n_sub, "subset_natural": n_sub,
                      "others_natural": len(data.train) - n_sub}
    labels = torch.cat([y for _, y, _ in loader])
    assert len(labels) == 2 * n_sub
    assert int((labels == 0).sum()) + int((labels == 1).sum()) == n_sub   # 3 -> 0, 7 -> 1
    assert int((labels == 2).sum()) == n_sub                              # the others -> dustbin
    first = torch.cat([x for x, _, _ in loader])
    loader.set_epoch(1)                                                   # the other half is redrawn
    assert not torch.equal(torch.sort(first.sum(1)).values, torch.sort(torch.cat([x for x, _, _ in loader]).sum(1)).values)


def test_specialist_head_starts_from_generalist():
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 5))
    s = specialist_from(g, [4, 1], 5)
    x = torch.randn(7, 6)
    zg, zs = g(x), s(x)
    assert zs.shape == (7, 3)
    assert torch.allclose(zs[:, :2], zg[:, [4, 1]], atol=1e-6)
    # dustbin = mean of the other logits + log 3 (the log-sum-exp when they are equal)
    assert torch.allclose(zs[:, 2], zg[:, [0, 2, 3]].mean(1) + math.log(3), atol=1e-5)
    assert g[2].out_features == 5   # the generalist is untouched


# ----------------------------------------------------------------------------- soft targets (§6.1)


def test_specialist_soft_targets_by_hand():
    # K = 4, subset [2, 0]: the generalist's softmax restricted to classes 2 and 0, the dustbin
    # holding p_1 + p_3, then softened at T: q_T ∝ q^(1/T).
    z = [1.0, 0.0, 2.0, -1.0]
    e = [math.exp(v) for v in z]
    p = [v / sum(e) for v in e]
    q = [p[2], p[0], p[1] + p[3]]
    for T in (1.0, 2.0):
        qt = [v ** (1 / T) for v in q]
        qt = [v / sum(qt) for v in qt]
        got = specialist_soft_targets(torch.tensor([z]), [2, 0], T).exp()[0]
        assert got.tolist() == pytest.approx(qt, rel=1e-5)
    # a dustbin shift of log 1/4 at T = 2: the dustbin's probability times 1/4 before softening
    shifted = [q[0], q[1], q[2] / 4]
    shifted = [v / sum(shifted) for v in shifted]
    qt = [v ** 0.5 for v in shifted]
    qt = [v / sum(qt) for v in qt]
    got = specialist_soft_targets(torch.tensor([z]), [2, 0], 2.0, dustbin_shift=math.log(0.25)).exp()[0]
    assert got.tolist() == pytest.approx(qt, rel=1e-5)


def test_specialist_soft_loss_by_hand():
    # T²·KL(q_g ‖ softmax(z_s/T)), batch mean; the second sample matches its target exactly (KL 0)
    T = 2.0
    zg = torch.tensor([[1.0, 0.0, 2.0, -1.0], [0.5, 0.5, 0.5, 0.5]])
    target = specialist_soft_targets(zg, [2, 0], T)
    qg = target.exp().tolist()
    zs = [0.3, -0.2, 0.1]
    es = [math.exp(v / T) for v in zs]
    qs = [v / sum(es) for v in es]
    kl = sum(qg[0][k] * math.log(qg[0][k] / qs[k]) for k in range(3))
    exact = target[1] * T           # logits whose softmax at T is the second target
    got = specialist_soft_loss(torch.stack([torch.tensor(zs), exact]), target, T).item()
    assert got == pytest.approx(T * T * kl / 2, rel=1e-5)


def test_soft_targets_change_the_specialist_and_weight_zero_is_plain_cross_entropy():
    from kdcli.models import build_model

    data = blobs(n_per_class=(40,) * 5, dim=6)
    torch.manual_seed(0)
    g = build_model("mlp", {"hidden": [16]}, input_shape=data.input_shape, num_classes=5)
    from kdcli.train.loop import fit
    fit(g, data.loader("train", train=True), _fast(epochs=2))
    g.eval()
    before = {k: v.clone() for k, v in g.state_dict().items()}
    cpu = torch.device("cpu")

    def run(weight, temperature=2.0):
        model, info = train_specialist(g, [1, 3], data, _fast(epochs=2), device=cpu, seed=3,
                                       soft_target_weight=weight, soft_target_temperature=temperature)
        return torch.cat([p.detach().flatten() for p in model.parameters()]), info

    plain, info0 = run(0.0)
    again, _ = run(0.0)
    soft, info1 = run(1.0)
    assert torch.equal(plain, again)                    # deterministic for a seed
    assert not torch.allclose(plain, soft, atol=1e-4)   # the soft-target term changes the specialist
    assert info0["soft_target_weight"] == 0.0 and info1["soft_target_weight"] == 1.0
    assert info1["correction"] == info0["correction"]   # the same transfer set and dustbin correction
    assert not g.training and all(torch.equal(before[k], v) for k, v in g.state_dict().items())
    # the default is on (Hinton et al. 2015, §6.1)
    from kdcli.config.ensembles import SpecialistsSpec

    spec = SpecialistsSpec.model_validate({"ensemble": "specialists", "generalist": "g.kdc"})
    assert spec.soft_target_weight > 0 and spec.soft_target_temperature > 0


# ----------------------------------------------------------------------------- KL combination


def _agreeing(seed=0, n=6, k=6, scale=1.0):
    torch.manual_seed(seed)
    q = torch.softmax(scale * torch.randn(n, k, dtype=torch.float64), 1)
    subsets = [[0, 1, 2], [2, 3]]
    member = torch.zeros(2, k, dtype=torch.float64)
    for m, s in enumerate(subsets):
        member[m, s] = 1
    p_m = torch.stack([expand_specialist(restricted(q, s).log(), columns(s, k)) for s in subsets], 1)
    return q, p_m, member


def test_combination_recovers_q_when_all_agree():
    q, p_m, member = _agreeing()
    active = torch.tensor([[1, 1], [1, 0], [0, 1], [1, 1], [0, 0], [1, 1]], dtype=torch.float64)
    out = combine_distributions(q, p_m, member, active, steps=50, lr=2.0)
    assert torch.allclose(out.exp(), q, atol=1e-3)
    # from a uniform start too: the minimiser, not just a fixed point of the start
    out = combine_distributions(q, p_m, member, torch.ones(6, 2, dtype=torch.float64), steps=400, lr=3.0,
                                init=torch.zeros_like(q))
    assert torch.allclose(out.exp(), q, atol=1e-3)


def test_combination_gradient_matches_autograd():
    q, p_m, member = _agreeing(seed=3, scale=2.0)
    p_g = torch.softmax(torch.randn_like(q), 1)     # a generalist that disagrees
    active = torch.tensor([[1, 0], [1, 1], [0, 0], [0, 1], [1, 1], [1, 0]], dtype=torch.float64)
    z = torch.randn_like(q, requires_grad=True)
    combine_objective(z, p_g, p_m, member, active).sum().backward()
    assert torch.allclose(combine_gradient(z.detach(), p_g, p_m, member, active), z.grad, atol=1e-10)
    # and the descent lowers the objective from log p^g
    z0 = p_g.log()
    z1 = combine_distributions(p_g, p_m, member, active, steps=100, lr=2.0)
    assert (combine_objective(z1, p_g, p_m, member, active) <= combine_objective(z0, p_g, p_m, member, active) + 1e-12).all()


def test_specialist_pulls_q_toward_its_opinion():
    # The generalist is unsure between classes 0 and 1; the specialist for {0, 1} is sure of 1.
    p_g = torch.tensor([[0.45, 0.45, 0.1]])
    p_m = expand_specialist(torch.tensor([[0.05, 0.85, 0.1]]).log(), columns([0, 1], 3))[:, None, :]
    member = torch.tensor([[1.0, 1.0, 0.0]])
    q = combine_distributions(p_g, p_m, member, torch.ones(1, 1), steps=200, lr=2.0).exp()[0]
    assert q[1] > 0.6 and q[0] < 0.3 and q[2] == pytest.approx(0.1, abs=0.01)
    q_off = combine_distributions(p_g, p_m, member, torch.zeros(1, 1), steps=200, lr=2.0).exp()[0]
    assert torch.allclose(q_off, p_g[0], atol=1e-6)     # inactive specialist: q = p^g


def test_specialist_ensemble_activates_by_top_class():
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        g[0].weight.zero_()
        g[0].bias.copy_(torch.tensor([2.0, 1.0, 0.0]))       # top-1 class 0, top-2 {0, 1}
    spec = specialist_from(g, [1, 2], 3)
    with torch.no_grad():
        spec[0].bias.copy_(torch.tensor([3.0, 0.0, 0.0]))    # confident in class 1
    x = torch.randn(3, 4)
    top1 = SpecialistEnsemble(g, [spec], [[1, 2]], 3, top_n=1, steps=100, lr=2.0)
    assert torch.allclose(top1(x).exp(), torch.softmax(g(x), 1), atol=1e-6)  # class 0 is not its subset
    top2 = SpecialistEnsemble(g, [spec], [[1, 2]], 3, top_n=2, steps=100, lr=2.0)
    q = top2(x).exp()
    assert torch.allclose(q.sum(1), torch.ones(3), atol=1e-5)
    assert (q[:, 1] > torch.softmax(g(x), 1)[:, 1] + 0.1).all()


# ----------------------------------------------------------------------------- clustering


def test_clustering_groups_confused_classes():
    # 6 classes; the generalist splits its probability between classes 1 and 4 on their inputs,
    # and is confident (0.9) on the others.
    g = torch.Generator().manual_seed(0)
    rows = []
    for c in range(6):
        for _ in range(100):
            p = torch.full((6,), 0.02)
            if c in (1, 4):
                u = 0.3 + 0.4 * torch.rand((), generator=g)
                p[1], p[4] = 0.92 * u, 0.92 * (1 - u)
            else:
                p[c] = 0.9
            rows.append(p / p.sum())
    probs = torch.stack(rows)
    assert class_covariance(probs)[1, 4] > 0     # predicted together across the data set
    # five clusters for six classes: the confused pair shares one, every other class has its own
    clusters = confusable_subsets(probs, num_specialists=5, seed=0)
    assert [1, 4] in clusters.subsets and len(clusters.subsets) == 5
    assert clusters.labels[1] == clusters.labels[4]
    assert len(set(clusters.labels)) == 5
    # with a subset size, the classes nearest each centroid: the pair again
    sized = confusable_subsets(probs, num_specialists=5, subset_size=2, seed=0)
    assert [1, 4] in sized.subsets and all(len(s) == 2 for s in sized.subsets)
    with pytest.raises(InputError, match="subset_size"):
        confusable_subsets(probs, 2, subset_size=6)


def test_correlation_columns_group_confused_classes_that_covariance_misses():
    # Class 0 is frequent and always predicted with confidence: its variance dominates the raw
    # covariance columns, so K-means isolates it; correlation columns group the confused pair 1, 2.
    g = torch.Generator().manual_seed(0)
    rows = []
    for c, n in ((0, 500), (1, 100), (2, 100), (3, 300)):
        for _ in range(n):
            p = torch.full((4,), 0.01)
            if c in (1, 2):
                u = 0.3 + 0.4 * torch.rand((), generator=g)
                p[1], p[2] = 0.97 * u, 0.97 * (1 - u)
            else:
                p[c] = 0.97
            rows.append(p / p.sum())
    probs = torch.stack(rows)
    assert confusable_subsets(probs, 2, seed=0, cluster_on="covariance").subsets == [[1, 2, 3], [0]]
    assert sorted(confusable_subsets(probs, 2, seed=0).subsets) == [[0, 3], [1, 2]]


# ----------------------------------------------------------------------------- diversification


def _gmap(critical, weight=None) -> GranularityMap:
    weight = weight or [1.0] * len(critical)
    return GranularityMap({"l": LayerGranularity([0.5] * len(critical), list(critical), list(weight))})


def test_diversification_term_value():
    # one sample, 2x2 maps; channel 0 critical (pooled), channel 1 precise; weights 0.5 and 1.5
    new = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]], [[2.0, 2.0], [2.0, 2.0]]]])
    prev = torch.zeros_like(new)
    d = diversification_term({"l": new}, {"l": prev}, _gmap([True, False], [0.5, 1.5]))
    # (0.5 * mean(1,3,5,7)^2 + 1.5 * mean(2^2)) / 2 = (0.5 * 16 + 1.5 * 4) / 2
    assert d.item() == pytest.approx(7.0)
    # without a map: uniform weights, every channel precise: (mean(1,9,25,49) + 4) / 2
    assert diversification_term({"l": new}, {"l": prev}).item() == pytest.approx((21.0 + 4.0) / 2)


def test_diversification_term_pools_critical_and_matches_non_critical_precisely():
    torch.manual_seed(0)
    prev = torch.randn(4, 2, 5, 5)
    gmap = _gmap([True, False])
    assert diversification_term({"l": prev.clone()}, {"l": prev}, gmap).item() == 0.0
    perm = torch.randperm(25)
    crit_moved = prev.clone()
    crit_moved[:, 0] = prev[:, 0].flatten(1)[:, perm].view(4, 5, 5)       # same values, other places
    assert diversification_term({"l": crit_moved}, {"l": prev}, gmap).item() == pytest.approx(0.0, abs=1e-10)
    other_moved = prev.clone()
    other_moved[:, 1] = prev[:, 1].flatten(1)[:, perm].view(4, 5, 5)
    assert diversification_term({"l": other_moved}, {"l": prev}, gmap).item() > 0.1
    # the same spatial permutation of channel 0 counts when channel 0 is not critical
    assert diversification_term({"l": crit_moved}, {"l": prev}, _gmap([False, False])).item() > 0.1


def test_diversification_term_vectors_pool_over_batch():
    prev = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    new = torch.tensor([[3.0, 1.0], [1.0, 1.0]])     # neuron 0: same batch mean, other samples
    assert layer_term(new, prev, critical=torch.tensor([True, False])).item() == pytest.approx((0.0 + 1.0) / 2)
    assert layer_term(new, prev).item() == pytest.approx((4.0 + 1.0) / 2)


def test_averaged_ensemble_is_log_mean_probability():
    a, b = nn.Linear(3, 4), nn.Linear(3, 4)
    x = torch.randn(5, 3)
    expected = (torch.softmax(a(x), 1) + torch.softmax(b(x), 1)) / 2
    assert torch.allclose(AveragedEnsemble([a, b])(x).exp(), expected, atol=1e-6)


# ----------------------------------------------------------------------------- diversity


def test_linear_cka():
    torch.manual_seed(0)
    x = torch.randn(500, 20)
    q, _ = torch.linalg.qr(torch.randn(20, 20))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0, abs=1e-9)     # rotation and scale
    assert linear_cka(x, torch.randn(500, 20)) < 0.1                       # independent noise
    # wide features take the Gram form: the same value as the feature form
    w = torch.randn(40, 30, 3, 3)
    assert linear_cka(w, w.flip(1)) == pytest.approx(1.0, abs=1e-9)        # a permutation of features
    assert linear_cka(x[:, :5], x[:, 5:10]) < 0.2


def test_disagreement_rate():
    a = torch.tensor([[2.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    b = torch.tensor([[2.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert disagreement_rate(a, b) == pytest.approx(0.5)
    assert disagreement_rate(a, a) == 0.0


# ----------------------------------------------------------------------------- recipe and build


def test_spec_validation():
    from kdcli.config.ensembles import DiversifiedSpec, SpecialistsSpec

    s = SpecialistsSpec.model_validate({"ensemble": "specialists", "generalist": "runs/teacher.kdc",
                                        "num_specialists": 3, "subset_size": 2, "train": {"epochs": 2}})
    assert s.generalist.checkpoint == "runs/teacher.kdc" and s.train.epochs == 2 and s.top_n == 1
    assert s.soft_target_weight == 1.0 and s.soft_target_temperature == 2.0
    for bad in ({"soft_target_weight": -1}, {"soft_target_temperature": 0}):
        with pytest.raises(ValueError):
            SpecialistsSpec.model_validate({"ensemble": "specialists", "generalist": "g.kdc", **bad})
    with pytest.raises(ValueError, match="extra"):
        SpecialistsSpec.model_validate({"ensemble": "specialists", "generalist": "g.kdc", "specialists": 3})
    with pytest.raises(ValueError, match="model .to train"):
        SpecialistsSpec.model_validate({"ensemble": "specialists", "generalist": {"model_args": {}}})
    d = DiversifiedSpec.model_validate({"ensemble": "diversified", "model": "mlp"})
    assert d.members == 3 and d.granularity is None and d.layers == "auto"
    with pytest.raises(ValueError):
        DiversifiedSpec.model_validate({"ensemble": "diversified", "model": "mlp", "members": 1})


def test_spec_imports_in_either_order():
    # kdcli.config.recipe imports the ensemble specs for its teacher field; either may be imported first.
    procs = []
    for first, second in (("kdcli.config.ensembles", "kdcli.config.recipe"), ("kdcli.config.recipe", "kdcli.config.ensembles")):
        code = (f"import {first}, {second}; from kdcli.config.ensembles import DiversifiedSpec; "
                "print(DiversifiedSpec.model_validate({'ensemble': 'diversified', 'model': 'mlp'}).train.epochs)")
        procs.append(subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, cwd=REPO))
    for p in procs:   # both at once: each spends its time importing torch
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err[-500:]
        assert out.strip() == "10"


def _fast(**kw):
    from kdcli.config.recipe import TrainSpec

    return TrainSpec(**{"epochs": 2, "lr": 0.05, "amp": "off", **kw})


def test_build_specialists_teacher_and_model_file_roundtrip(tmp_path):
    from kdcli.models.file import load_model_file, save_model_file
    from kdcli.ensembles import build_ensemble_teacher
    from kdcli.config.ensembles import SpecialistsSpec

    data = blobs(n_per_class=(60,) * 6)
    spec = SpecialistsSpec(ensemble="specialists", num_specialists=2, subset_size=2, top_n=2, inference_steps=10,
                           generalist={"model": "mlp", "model_args": {"hidden": [16]}, "train": _fast()},
                           train=_fast(epochs=1))
    model, info = build_ensemble_teacher(spec, data, torch.device("cpu"), None, tmp_path, tmp_path, seed=0)
    x = data.val.x[:9]
    log_q = model(x)
    assert log_q.shape == (9, 6) and torch.allclose(log_q.exp().sum(1), torch.ones(9), atol=1e-5)
    report = info["metadata"]["ensemble"]
    assert len(report["specialists"]) == len(report["clusters"]["subsets"]) >= 1
    assert (tmp_path / "ensemble.json").is_file()
    for s in report["specialists"]:    # a 50/50 transfer set: correction = log(n_others / n_subset)
        c = s["counts"]
        assert s["correction"] == pytest.approx(math.log(c["others_natural"] / c["subset_natural"]))
    save_model_file(tmp_path / "t.kdc", model, name=info["name"], args=info["args"], input_shape=data.input_shape,
                    num_classes=6, metadata=info["metadata"])
    again, _ = load_model_file(tmp_path / "t.kdc")
    assert torch.allclose(again(x), log_q, atol=1e-6)


def test_build_diversified_teacher(tmp_path):
    from kdcli.models.file import load_model_file, save_model_file
    from kdcli.ensembles import build_ensemble_teacher
    from kdcli.config.ensembles import DiversifiedSpec

    data = blobs(n_per_class=(60,) * 4)
    spec = DiversifiedSpec(ensemble="diversified", members=2, model="mlp", model_args={"hidden": [16, 16]},
                           train=_fast(), critical_fraction=0.25, sensitivity_samples=32)
    model, info = build_ensemble_teacher(spec, data, torch.device("cpu"), None, tmp_path, None, seed=0)
    report = info["metadata"]["ensemble"]
    assert report["layers"] == ["features.2", "features.4"]
    assert report["members"][1]["critical_features"] == 8        # 25 % of 16 features in 2 layers
    # The diversity figures, recomputed by hand from the two members on the validation split
    # (all 48 samples: fewer than the 2000 it caps at).
    div = report["diversity"]
    x_val, y_val = data.val.x, data.val.y
    feats, logits = [{}, {}], []
    with torch.no_grad():
        for m, member in enumerate(model.members):
            hooks = [member.get_submodule(p).register_forward_hook(
                lambda mod, i, o, m=m, p=p: feats[m].__setitem__(p, o.flatten(1).double())) for p in report["layers"]]
            logits.append(member(x_val))
            for h in hooks:
                h.remove()
    pred = [lg.argmax(1) for lg in logits]
    assert div["samples"] == len(y_val) == 48 and div["members"] == 2
    differ = int((pred[0] != pred[1]).sum())
    assert 0 < differ < 48  # the members do differ on some inputs, not all: the rate is informative
    assert div["disagreement"] == pytest.approx(differ / 48, abs=1e-7)
    assert div["pairwise_disagreement"] == {"0-1": div["disagreement"]}
    for p in report["layers"]:  # Kornblith et al. 2019, eq. 5: ‖YᵀX‖²_F / (‖XᵀX‖_F·‖YᵀY‖_F), centred columns
        a, b = (f[p] - f[p].mean(0) for f in feats)
        cka = (b.T @ a).pow(2).sum() / ((a.T @ a).norm() * (b.T @ b).norm())
        assert div["cka"][p] == pytest.approx(float(cka), abs=1e-9), p
    assert div["member_accuracy"] == [pytest.approx(float((q == y_val).double().mean())) for q in pred]
    mean_p = (torch.softmax(logits[0], 1) + torch.softmax(logits[1], 1)) / 2
    assert div["ensemble_accuracy"] == pytest.approx(float((mean_p.argmax(1) == y_val).double().mean()))
    save_model_file(tmp_path / "d.kdc", model, name=info["name"], args=info["args"], input_shape=data.input_shape,
                    num_classes=4)
    again, _ = load_model_file(tmp_path / "d.kdc")
    x = data.val.x[:5]
    assert torch.allclose(again(x), model(x), atol=1e-6)


@pytest.mark.slow
def test_specialist_ensemble_exports_to_onnx(tmp_path):
    # The KL combination is plain tensor ops in a fixed loop: torch.export unrolls it.
    from kdcli.export.onnx import export_onnx, verify_onnx

    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    subsets = [[0, 1], [2, 3, 4]]
    ens = SpecialistEnsemble(g, [specialist_from(g, s, 5) for s in subsets], subsets, 5, top_n=2, steps=3).eval()
    x = torch.randn(16, 8)
    res = export_onnx(ens, x[:2], tmp_path / "e.onnx")
    ver = verify_onnx(tmp_path / "e.onnx", ens, x)
    assert ver["max_abs_diff"] < 1e-4 and ver["top1_agreement"] == 1.0, (res, ver)


@pytest.mark.slow
def test_fashion_mnist_generalist_confuses_upper_body_garments(shared_data):
    # A briefly trained generalist's covariance puts Shirt with T-shirt, Pullover or Coat.
    from kdcli.data.loader import DataSpec, load_data
    from kdcli.ensembles.clusters import generalist_clusters
    from kdcli.models import build_model
    from kdcli.config.recipe import TrainSpec
    from kdcli.train.loop import fit

    torch.set_num_threads(1)
    spec = DataSpec.model_validate({"source": {"kind": "idx", "path": str(shared_data / "fashion_mnist")},
                                    "limit_train": 6000, "limit_eval": 500})
    data = load_data(spec, base_dir=REPO, seed=0)
    torch.manual_seed(0)
    g = build_model("mlp", {"hidden": [64]}, input_shape=data.input_shape, num_classes=10)
    fit(g, data.loader("train", train=True), TrainSpec(epochs=2, lr=0.05, amp="off"))
    clusters = generalist_clusters(g, data, num_specialists=3, samples=3000)
    shirt = clusters.labels[6]            # 0 T-shirt/top, 2 Pullover, 4 Coat, 6 Shirt
    assert any(clusters.labels[c] == shirt for c in (0, 2, 4))
    assert clusters.labels[1] != shirt    # Trouser is not confused with Shirt
