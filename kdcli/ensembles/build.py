"""Build an ensemble teacher from its recipe spec, and rebuild one from a kdcli model file.

:func:`build_ensemble_teacher` is what ``kdcli.train.teacher.obtain_teacher`` calls for
``teacher: {ensemble: ...}``. The returned info names a model factory of this module
(``kdcli.ensembles.build:specialist_ensemble`` / ``:averaged_ensemble``) with JSON-like args, so
that ``kdcli.train.teacher.save_model`` writes the ensemble as an ordinary ``.kdc`` file which
``kdcli.models.file.load_model_file`` rebuilds (structure from the args, weights from the state
dict: the dustbin corrections live in the specialists' head biases).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from kdcli.analyze.granularity import GranularityMap
from kdcli.console import Reporter
from kdcli.distill.taps import auto_layers
from kdcli.ensembles.clusters import generalist_clusters
from kdcli.ensembles.diversified import AveragedEnsemble, train_diversified
from kdcli.ensembles.diversity import ensemble_diversity
from kdcli.ensembles.specialists import SpecialistEnsemble, specialist_from, train_specialist
from kdcli.files import atomic_write_json
from kdcli.models import absolute_spec, build_model
from kdcli.models.file import load_model_any
from kdcli.prune.pruner import replay_history
from kdcli.train.loop import evaluate, fit, tensor_batches

SPECIALISTS_FACTORY = "kdcli.ensembles.build:specialist_ensemble"
AVERAGED_FACTORY = "kdcli.ensembles.build:averaged_ensemble"
DIVERSITY_SAMPLES = 2000


def _build_member(spec: dict, input_shape, num_classes: int) -> nn.Module:

    model = build_model(spec["name"], spec.get("args") or {}, input_shape=input_shape, num_classes=num_classes)
    model.eval()
    replay_history(model, torch.zeros(1, *input_shape), spec.get("pruning_history") or [])
    return model


def specialist_ensemble(input_shape, num_classes: int, *, generalist: dict, subsets: list, top_n: int = 1,
                        steps: int = 50, lr: float = 1.0) -> SpecialistEnsemble:
    """Model factory: the untrained structure of a :class:`SpecialistEnsemble` whose generalist is
    ``{"name", "args", "pruning_history"}`` and whose specialists cover ``subsets``."""
    g = _build_member(generalist, input_shape, num_classes)
    return SpecialistEnsemble(g, [specialist_from(g, s, num_classes) for s in subsets], subsets, num_classes,
                              top_n=top_n, steps=steps, lr=lr)


def averaged_ensemble(input_shape, num_classes: int, *, member: dict, members: int) -> AveragedEnsemble:
    """Model factory: the untrained structure of an :class:`AveragedEnsemble` of ``members``
    models built from ``member`` = ``{"name", "args"}``."""
    return AveragedEnsemble([_build_member(member, input_shape, num_classes) for _ in range(members)])


def _accuracies(model: nn.Module, data, device) -> dict:

    out = {"val_accuracy": evaluate(model, tensor_batches(*data.eval_tensors("val", device)), device)["accuracy"]}
    if data.test is not None:
        out["test_accuracy"] = evaluate(model, tensor_batches(*data.eval_tensors("test", device)), device)["accuracy"]
    return out


def _generalist(spec, data, device, reporter: Reporter, base_dir: Path, seed: int) -> tuple[nn.Module, dict]:

    g = spec.generalist
    if g.checkpoint:
        path = Path(g.checkpoint).expanduser()
        path = path if path.is_absolute() else Path(base_dir) / path
        model, info = load_model_any(path, spec_name=g.model, spec_args=g.model_args, input_shape=data.input_shape,
                                     num_classes=data.num_classes, base_dir=base_dir,
                                     allow=[absolute_spec(g.model, base_dir)] if g.model else [])
        reporter.info(f"generalist: {g.checkpoint} ({info.name})")
        return model.to(device), {"name": absolute_spec(info.name, base_dir), "args": info.args,
                                  "pruning_history": info.pruning_history}
    torch.manual_seed(seed)
    model = build_model(g.model, g.model_args, input_shape=data.input_shape, num_classes=data.num_classes,
                        base_dir=base_dir).to(device)
    reporter.info(f"training generalist {g.model} for {g.train.epochs} epochs")
    fit(model, data.loader("train", train=True, device=device, seed=seed), g.train, device=device,
        progress=lambda m: reporter.metrics("generalist", m))
    model.eval()
    return model, {"name": absolute_spec(g.model, base_dir), "args": dict(g.model_args), "pruning_history": []}


def _specialists(spec, data, device, reporter, base_dir, seed):
    generalist, gspec = _generalist(spec, data, device, reporter, base_dir, seed)
    clusters = generalist_clusters(generalist, data, num_specialists=spec.num_specialists,
                                   subset_size=spec.subset_size, samples=spec.cluster_samples, device=device,
                                   seed=seed, cluster_on=spec.cluster_on)
    names = data.class_names or [str(k) for k in range(data.num_classes)]
    reporter.info("specialist subsets: " + "; ".join(", ".join(names[k] for k in s) for s in clusters.subsets))
    models, per = [], []
    for m, subset in enumerate(clusters.subsets):
        model, info = train_specialist(generalist, subset, data, spec.train, device=device, seed=seed + 1 + m,
                                       soft_target_weight=spec.soft_target_weight,
                                       soft_target_temperature=spec.soft_target_temperature,
                                       progress=lambda r, m=m: reporter.metrics(f"specialist {m}", r))
        reporter.info(f"specialist {m}: dustbin logit + {info['correction']:.3f}")
        models.append(model)
        per.append(info)
    ensemble = SpecialistEnsemble(generalist, models, clusters.subsets, data.num_classes, top_n=spec.top_n,
                                  steps=spec.inference_steps, lr=spec.inference_lr).to(device).eval()
    args = {"generalist": gspec, "subsets": clusters.subsets, "top_n": spec.top_n,
            "steps": spec.inference_steps, "lr": spec.inference_lr}
    report = {"kind": "specialists", "clusters": clusters.to_json(data.class_names), "specialists": per,
              "generalist": _accuracies(generalist, data, device)}
    label = f"specialists ({gspec['name']} + {len(models)})"
    return ensemble, SPECIALISTS_FACTORY, args, label, report


def _diversified(spec, data, device, reporter, base_dir, seed):

    name = absolute_spec(spec.model, base_dir)
    build = lambda i: build_model(name, spec.model_args, input_shape=data.input_shape,  # noqa: E731
                                  num_classes=data.num_classes)
    layers = spec.layers
    if layers == "auto":
        layers = auto_layers(build(0).to(device), torch.zeros(2, *data.input_shape, device=device))
    gmap = None
    if spec.granularity:
        path = Path(spec.granularity).expanduser()
        gmap = GranularityMap.load(path if path.is_absolute() else Path(base_dir) / path)
    reporter.info(f"training {spec.members} diversified {spec.model} members (layers {', '.join(layers)})")
    members, per = train_diversified(build, data, spec.train, members=spec.members, weight=spec.diversity_weight,
                                     layers=layers, granularity=gmap, critical_fraction=spec.critical_fraction,
                                     sensitivity_samples=spec.sensitivity_samples, device=device, seed=seed,
                                     progress=lambda i, r: reporter.metrics(f"member {i}", r))
    x, y = data.eval_tensors("val", device, limit=DIVERSITY_SAMPLES)
    diversity = ensemble_diversity(members, x, y, layers)
    reporter.info(f"diversity: disagreement {diversity['disagreement']:.3f}, CKA "
                  + ", ".join(f"{p} {v:.3f}" for p, v in diversity["cka"].items()))
    args = {"member": {"name": name, "args": dict(spec.model_args)}, "members": spec.members}
    report = {"kind": "diversified", "members": per, "layers": list(layers), "diversity": diversity}
    return AveragedEnsemble(members).to(device).eval(), AVERAGED_FACTORY, args, f"diversified ({spec.model} x {spec.members})", report


def build_ensemble_teacher(spec, data, device: torch.device, reporter: Reporter | None, base_dir: Path,
                           run_dir: Path | None, *, seed: int = 0) -> tuple[nn.Module, dict]:
    """Train the ensemble teacher of ``spec`` (a SpecialistsSpec or DiversifiedSpec) on ``data``
    (a DataBundle). Returns the model in eval mode on ``device`` (forward → logits [N, K], up to
    a constant) and ``{"name", "args", "label", "metadata"}``: ``name``/``args`` rebuild it with
    :func:`kdcli.models.build_model`; ``metadata`` holds ``role``, ``ensemble_label``, accuracies
    and ``ensemble`` (clusters and specialists' corrections, or diversity). When ``run_dir`` is
    given, the ``ensemble`` report is also written there as ``ensemble.json``."""

    reporter = reporter or Reporter(quiet=True)
    device = torch.device(device)
    t0 = time.perf_counter()
    make = _specialists if spec.ensemble == "specialists" else _diversified
    model, name, args, label, report = make(spec, data, device, reporter, Path(base_dir), seed)
    acc = _accuracies(model, data, device)
    report.update(acc, seconds=time.perf_counter() - t0)
    reporter.info(f"{label}: val {100 * acc['val_accuracy']:.2f}%")
    if run_dir is not None:
        atomic_write_json(Path(run_dir) / "ensemble.json", report)
    return model, {"name": name, "args": args, "label": label,
                   "metadata": {"role": "teacher", "ensemble_label": label, "metrics": acc, "ensemble": report}}
