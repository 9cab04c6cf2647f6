"""``kdcli analyze``: what matters in a model and how far each part can be cut.

Static figures need only the model: MACs and parameters per layer, the prunable torch-pruning
groups, and their data-free importances (magnitude, BatchNorm scale). With data, the figures
measured on a validation subset are added: Taylor and activation importances, mean activation
and APoZ per channel, activation sensitivity and the granularity map, PCA redundancy, and the
layer pruning-sensitivity scan with suggested per-group ratios (see :mod:`kdcli.analyze.sensitivity`).

``analysis.json`` is :class:`kdcli.reports.analysis_model.AnalysisReport` (its JSON Schema:
``kdcli.reports.models.report_json_schema("analysis")``). It holds:

- ``$schema``: ``"urn:kdcli:schema:analysis:1"``, and ``schema_version``: 1;
- ``model``: ``name``, ``input_shape``, ``num_classes``, ``macs`` and ``params`` (torch-pruning's
  counter, per sample), ``pruned`` (whether the model carries a pruning history);
- ``data``: ``description``, ``split`` and ``samples`` of the evaluation subset, or null;
- ``settings``: ``ratios``, ``target_macs``, ``eval_samples``, ``critical_fraction``, ``seed``, ``clusters``;
- ``layers``: per leaf layer ``name`` (module path), ``type``, ``output_shape`` (one sample),
  ``params``, ``macs``, ``macs_share``, ``params_share`` (of the model's totals);
- ``groups``: per prunable group ``name`` (root module path), ``channels`` (its units), ``unit``
  (``channel``, or ``head`` for an attention group pruned a head at a time), ``layers`` (``out``,
  ``in``, ``in_other``, ``norm`` module paths) and ``importance``: per criterion (``magnitude``,
  ``magnitude-l1``, ``bn-scale``, ``taylor``, ``activation``) the per-channel score divided by the group's mean,
  plus ``mean_activation`` and ``apoz`` per channel (measured at the consumer's input);
- ``notes``: one-line remarks (groups kept out of pruning, criteria that fell back);
- ``activation_sensitivity``: per tapped layer ``shape``, ``grad_std``, ``grad_mean_abs``, ``active_fraction``,
  ``sensitivity`` (in [0, 1]), ``critical`` (bools), ``critical_count``;
- ``redundancy``: per tapped layer the PCA ``features``, ``samples``, ``components`` needed for
  ``"0.9"``, ``"0.95"``, ``"0.99"`` of the variance and the ``cumulative`` curve;
- ``pruning_sensitivity``: ``criterion``, ``baseline_accuracy``, ``samples``, ``seconds`` and
  ``curves``: per group a list of ``{"ratio", "channels_removed", "accuracy", "macs"}``;
- ``suggested_ratios``: ``target_macs``, ``ratios`` (group → ratio, read by ``compress`` through
  ``prune.ratios_from``), ``predicted_macs``, ``predicted_macs_fraction``,
  ``predicted_accuracy``, ``reached``, ``method``;
- ``clusters`` (with ``clusters=K`` and data, else null): the K confusable class subsets of
  :func:`kdcli.ensembles.clusters.confusable_subsets` on the evaluation subset (Hinton et al.
  2015, §5.3): ``subsets``, ``subset_names``, ``cluster_of_class``, ``covariance``, plus
  ``class_names``, ``correlation`` (what K-means clustered), ``cluster_on``, ``split``, ``samples``;
- ``timings``: seconds per phase (``static``, ``importance``, ``activation``, ``scan``, ``clusters``);
- ``files``: the names written to ``out_dir`` (only when written).

The result is validated through the model before it is written (a wrong shape is a
:class:`kdcli.reports.base.ReportShapeError` naming the field).

Data-driven sections are null without data. ``sensitivity.csv`` (group, ratio, accuracy, macs),
``granularity.json`` (:class:`kdcli.analyze.granularity.GranularityMap`) and ``report.html`` go beside it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn

from kdcli import distributed
from kdcli.analyze.sensitivity import (activation_statistics, consumer_statistics, granularity_map, group_layers,
                                       pca_redundancy, pruning_sensitivity, suggest_ratios)
from kdcli.config.importance import CRITERIA, NEEDS_DATA
from kdcli.config.recipe import AnalyzeSpec
from kdcli.data.loader import memorised_warning
from kdcli.console import Reporter
from kdcli.distill.taps import auto_layers
from kdcli.ensembles.clusters import class_correlation, confusable_subsets, predicted_probabilities
from kdcli.errors import DataError, InputError, ModelError
from kdcli.models.file import check_model_fits
from kdcli.models.utils import eval_mode, first_tensor
from kdcli.prune.pruner import StructuredPruner, count_macs_params
from kdcli.reports.analysis import write_outputs
from kdcli.reports.analysis_model import SCHEMA_URI, SCHEMA_VERSION
from kdcli.train.loop import evaluate, tensor_batches

_ACTIVATIONS = (nn.ReLU, nn.PReLU, nn.ELU, nn.LeakyReLU, nn.ReLU6, nn.GELU)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
          nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.AdaptiveAvgPool1d,
          nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
          nn.InstanceNorm3d, nn.GroupNorm)


# ----------------------------------------------------------------------------- per layer


def _layer_macs(m: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    """MACs of one call of a leaf module on a batch of one, by the rules of torch-pruning's
    counter (so the per-layer figures add up to :func:`kdcli.prune.pruner.count_macs_params`)."""
    if isinstance(m, nn.modules.conv._ConvNd):
        positions = math.prod(out.shape[2:])
        macs = math.prod(m.kernel_size) * m.in_channels * (m.out_channels // m.groups) * positions
        return macs + (m.out_channels * positions if m.bias is not None else 0)
    if isinstance(m, nn.Linear):
        return inp.numel() * m.out_features + (m.out_features if m.bias is not None else 0)
    if isinstance(m, _NORMS):
        return inp.numel() * (2 if getattr(m, "affine", False) else 1)
    if isinstance(m, nn.LayerNorm):
        return inp.numel() * (2 if m.elementwise_affine else 1)
    if isinstance(m, _ACTIVATIONS) or isinstance(m, nn.Upsample):
        return out.numel()
    if isinstance(m, _POOLS):
        return inp.numel()
    return 0


def layer_table(model: nn.Module, example: torch.Tensor) -> tuple[list[dict], int, int]:
    """Per leaf layer: ``name``, ``type``, ``output_shape`` (one sample), ``params``, ``macs`` and
    their shares; plus the model's total MACs and parameters (torch-pruning's counter).

    ``example`` is a batch of one, ``(1, *input_shape)``. Layers with neither MACs nor parameters
    (Flatten, Dropout, Identity) are left out. When the model holds ops the per-layer rules do
    not cover (attention, RNNs), a row ``(other)`` carries the difference, so the MACs column
    always adds up to the total."""

    rows: dict[str, dict] = {}
    handles = []
    for name, m in model.named_modules():
        own = sum(p.numel() for p in m.parameters(recurse=False))
        if any(True for _ in m.children()) and not own:
            continue

        def hook(mod, inputs, output, name=name, own=own):
            out = first_tensor(output)
            inp = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else out
            row = rows.setdefault(name, {"name": name, "type": type(mod).__name__,
                                         "output_shape": list(out.shape[1:]) if out is not None else [],
                                         "params": own, "macs": 0})
            row["macs"] += _layer_macs(mod, inp, out) if out is not None else 0

        handles.append(m.register_forward_hook(hook))
    try:
        with eval_mode(model), torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    for name, m in model.named_modules():  # layers the forward pass never called still hold parameters
        own = sum(p.numel() for p in m.parameters(recurse=False))
        if own and name not in rows:
            rows[name] = {"name": name, "type": type(m).__name__, "output_shape": [], "params": own, "macs": 0}
    total_macs, total_params = count_macs_params(model, example)
    table = [r for r in rows.values() if r["macs"] or r["params"]]
    rest = total_macs - sum(r["macs"] for r in table)
    if rest:
        table.append({"name": "(other)", "type": "not attributed", "output_shape": [], "params": 0, "macs": rest})
    for r in table:
        r["macs_share"] = r["macs"] / total_macs if total_macs else 0.0
        r["params_share"] = r["params"] / total_params if total_params else 0.0
    return table, total_macs, total_params


# ----------------------------------------------------------------------------- the analysis


def _eval_split(data) -> str:
    for name in ("val", "test", "train"):
        part = getattr(data, name)
        if part is not None and len(part):
            return name
    raise DataError(f"data ({data.description}): no samples to analyse")


def _judged(model, data, split: str, accuracy: float, limit: int | None, device, notes: list, reporter) -> dict:
    """Which data judged the model, its normalisation and, when the model is judged on validation
    data and a test part exists, its test accuracy with a warning when validation looks memorised."""
    out = {"which": data.splits.get(split, split), "normalization": data.normalization()}
    for note in data.notes:
        notes.append(note)
    if split == "val" and data.test is not None and len(data.test):
        test_acc = evaluate(model, tensor_batches(*data.eval_tensors("test", device, limit=limit),
                                                  data.eval_batch_size), device)["accuracy"]
        out["test_accuracy"] = test_acc
        warning = memorised_warning(accuracy, test_acc, data, who="the model")
        if warning:
            reporter.warn(warning)
            notes.append(warning)
    return out


def _rounded(t, nd: int = 6) -> list:
    return [round(float(v), nd) for v in (t.tolist() if hasattr(t, "tolist") else t)]


def _importances(pruner, members: dict, batches) -> dict[str, dict[str, list]]:
    """Per group and criterion, each channel's importance divided by its group's mean (the
    pruner's normalisation). ``bn-scale`` only where the group holds a BatchNorm layer;
    ``taylor`` and ``activation`` only with ``batches``."""
    criteria = [c for c in CRITERIA if batches or c not in NEEDS_DATA]
    out: dict[str, dict[str, list]] = {g: {} for g in pruner.groups}
    for crit in criteria:
        scores = pruner.score(batches=batches if crit in NEEDS_DATA else None, importance=crit)
        for g, s in scores.items():
            if crit == "bn-scale" and not members[g]["norm"]:
                continue
            out[g][crit] = _rounded(s)
    return out


def _activation_figures(model, example, batches, settings, seed: int, notes: list, reporter):
    """Activation sensitivity, the granularity map and PCA redundancy of the "auto" layers
    (:func:`kdcli.distill.taps.auto_layers`); (None, None, None) with a note when none can be chosen."""

    try:
        taps = auto_layers(model, example)
    except ModelError as exc:
        notes.append(f"activation sensitivity skipped: {exc}")
        return None, None, None
    reporter.info(f"activation sensitivity of {', '.join(taps)}")
    stats = activation_statistics(model, batches, taps, seed=seed)
    gmap = granularity_map(stats, critical_fraction=settings.critical_fraction)
    activity = {p: {"shape": st["shape"], "grad_std": _rounded(st["grad_std"], 8),
                    "grad_mean_abs": _rounded(st["grad_mean_abs"], 8),
                    "active_fraction": _rounded(st["active_fraction"]),
                    "sensitivity": gmap.layers[p].sensitivity, "critical": gmap.layers[p].critical,
                    "critical_count": sum(gmap.layers[p].critical)} for p, st in stats.items()}
    return activity, {p: pca_redundancy(st["rows"]) for p, st in stats.items()}, gmap


def _class_clusters(model, x: torch.Tensor, data, split: str, k: int, batch_size: int, seed: int) -> dict:
    """The ``k`` confusable class subsets of ``model`` from its predicted probabilities on ``x``
    [N, *input_shape] (Hinton et al. 2015, §5.3; K-means on the columns of the class correlation
    matrix, :func:`kdcli.ensembles.clusters.confusable_subsets`), as JSON with class names."""

    if len(x) < 2:  # a covariance needs two samples
        raise DataError(f"data ({data.description}): --clusters needs at least 2 {split} samples, got {len(x)}")
    probs = predicted_probabilities(model, [(x[i:i + batch_size],) for i in range(0, len(x), batch_size)], x.device)
    found = confusable_subsets(probs, k, seed=seed, cluster_on="correlation")
    names = list(data.class_names)
    if len(names) != data.num_classes:  # a source without names: the class indices stand in
        names = [str(c) for c in range(data.num_classes)]
    corr = class_correlation(found.covariance)
    return {**found.to_json(names), "class_names": names, "cluster_on": "correlation",
            "correlation": [[round(float(v), 6) for v in row] for row in corr], "split": split, "samples": len(x)}


def analyze(model: nn.Module, info, data=None, *, device: torch.device | None = None, settings=None,
            target_macs: float | None = None, out_dir: Path | None = None, reporter: Reporter | None = None,
            seed: int = 0, clusters: int | None = None) -> dict:
    """Analyse ``model`` (described by a :class:`kdcli.train.teacher.ModelInfo`) and return the result
    documented in the module docstring; with ``out_dir``, also write analysis.json,
    sensitivity.csv, granularity.json (with data) and report.html there.

    ``data``: a :class:`kdcli.data.loader.DataBundle` for the data-driven figures, or None for static
    figures only. ``settings``: a :class:`kdcli.config.recipe.AnalyzeSpec` (defaults otherwise);
    ``target_macs`` overrides its ``target_macs``. The model is left exactly as it was (weights,
    buffers, train/eval mode). Deterministic for a given ``seed``.

    ``clusters``: group the classes into this many confusable subsets (2 .. num_classes − 1) from
    the model's predicted probabilities on the evaluation subset (Hinton et al. 2015, §5.3); needs
    ``data`` (without it, a note says so).
    """
    with eval_mode(model):  # every figure is of the model in eval mode; each module's flag comes back
        return _analyze(model, info, data, device=device, settings=settings, target_macs=target_macs,
                        out_dir=out_dir, reporter=reporter, seed=seed, clusters=clusters)


def _analyze(model, info, data, *, device, settings, target_macs, out_dir, reporter, seed, clusters) -> dict:

    settings = settings or AnalyzeSpec()
    target = float(target_macs if target_macs is not None else settings.target_macs)
    if not target > 0:
        raise DataError(f"--target-macs: expected a fraction in (0, 1] or a MACs count, got {target}")
    if clusters is not None and not 2 <= clusters < info.num_classes:  # each subset must leave a class out
        raise InputError(f"--clusters: expected 2..{info.num_classes - 1} (fewer subsets than the model's "
                         f"{info.num_classes} classes), got {clusters}")
    reporter = reporter or Reporter(quiet=True)
    device = device or next(model.parameters()).device
    torch.manual_seed(seed)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    example = torch.zeros(1, *info.input_shape, device=device)
    check_model_fits(model, info, data, example)

    layers, total_macs, total_params = layer_table(model, example)
    pruner = StructuredPruner(model, example, importance="magnitude")
    members = group_layers(pruner, model)
    position = {n: i for i, (n, _) in enumerate(model.named_modules())}
    names = sorted(pruner.groups, key=lambda g: position.get(g, len(position)))  # model order, not graph order
    timings["static"] = time.perf_counter() - t0

    batches, split, acc0, data_info = None, None, None, {}
    if data is not None:
        split = _eval_split(data)
        x, y = data.eval_tensors(split, device, limit=settings.eval_samples)
        batches = tensor_batches(x, y, data.eval_batch_size)  # prepared once, kept on the device
    t1 = time.perf_counter()
    importance = _importances(pruner, members, batches)
    channels = pruner.group_channels()
    groups = [{"name": g, "channels": channels[g], "unit": pruner.unit(g), "layers": members[g],
               "importance": importance[g]} for g in names]
    notes = [n for n in pruner.notes if not n.startswith("bn-scale:")]  # shown only where a BatchNorm is
    without_bn = sum(1 for g in names if not members[g]["norm"])
    if without_bn:
        notes.append(f"bn-scale: not shown for {without_bn} group(s) without a normalisation layer")
    timings["importance"] = time.perf_counter() - t1

    activity = redundancy = scan = suggested = gmap = None
    if batches is not None:
        t1 = time.perf_counter()
        consumers = {g: members[g]["in"][0] for g in pruner.groups if members[g]["in"]}
        per_channel = consumer_statistics(model, batches, consumers)
        for grp in groups:
            # a group may cover part of its consumer's inputs (a stage's zero-padded channels):
            # read the group's own channels through channels_at
            idx = pruner.channels_at(grp["name"], consumers[grp["name"]]) if grp["name"] in consumers else None
            grp["importance"].update({k: _rounded(v if idx is None else [v[i] for i in idx])
                                      for k, v in per_channel.get(grp["name"], {}).items()})
        activity, redundancy, gmap = _activation_figures(model, example, batches, settings, seed, notes, reporter)
        timings["activation"] = time.perf_counter() - t1

        t1 = time.perf_counter()
        acc0 = evaluate(model, batches, device)["accuracy"]
        data_info = _judged(model, data, split, acc0, settings.eval_samples, device, notes, reporter)
        scores = pruner.score()  # magnitude, the data-free criterion of Distiller's scans
        ratios = list(settings.ratios)
        with reporter.progress("pruning-sensitivity scan", len(names) * len(ratios)) as advance:
            curves = pruning_sensitivity(pruner, names, scores, ratios,
                                         evaluate_fn=lambda: evaluate(model, batches, device)["accuracy"],
                                         macs_fn=lambda: count_macs_params(model, example)[0], advance=advance)
        timings["scan"] = time.perf_counter() - t1
        scan = {"criterion": "magnitude", "baseline_accuracy": acc0, "samples": len(x),
                "seconds": round(timings["scan"], 3), "curves": curves}
        suggested = suggest_ratios(curves, baseline_accuracy=acc0, total_macs=total_macs, target_macs=target,
                                   macs_of=lambda ratios: pruner.plan_macs(pruner.plan_ratios(ratios, scores)))

    class_clusters = None
    if clusters is not None and batches is None:
        notes.append(f"clusters: --clusters {clusters} needs data (--data or --recipe); not computed")
    elif clusters is not None:
        t1 = time.perf_counter()
        reporter.info(f"clustering the {info.num_classes} classes into {clusters} confusable subsets")
        class_clusters = _class_clusters(model, x, data, split, clusters, data.eval_batch_size, seed)
        timings["clusters"] = time.perf_counter() - t1

    result = {  # the shape of kdcli.reports.analysis_model.AnalysisReport, checked before it is written
        "$schema": SCHEMA_URI, "schema_version": SCHEMA_VERSION,
        "model": {"name": info.name, "input_shape": list(info.input_shape), "num_classes": info.num_classes,
                  "macs": total_macs, "params": total_params, "pruned": bool(info.pruning_history)},
        "data": None if data is None else {"description": data.description, "split": split, "samples": len(x),
                                           **data_info},
        "settings": {"ratios": list(settings.ratios), "target_macs": target, "eval_samples": settings.eval_samples,
                     "critical_fraction": settings.critical_fraction, "seed": seed, "clusters": clusters},
        "layers": layers, "groups": groups, "notes": notes,
        "activation_sensitivity": activity, "redundancy": redundancy,
        "pruning_sensitivity": scan, "suggested_ratios": suggested, "clusters": class_clusters,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    if out_dir is not None:  # under torchrun rank 0 writes
        distributed.on_main(write_outputs, result, Path(out_dir), gmap)
    return result
