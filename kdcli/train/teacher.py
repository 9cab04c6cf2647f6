"""The teacher: load it from a checkpoint, or train it from the recipe (``kdcli train``).

A teacher is either a kdcli model file (``.kdc``, which carries its own spec), or a user
checkpoint read safely together with the recipe's model spec. Without a checkpoint, the
recipe's ``teacher.train`` settings train one with the shared loop, and the result is written to
the run directory as ``teacher.kdc`` so that a resumed run does not train it again.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kdcli.config.recipe import Recipe
from kdcli.console import Reporter
from kdcli.data.loader import DataBundle
from kdcli.ensembles import build_ensemble_teacher
from kdcli.models import absolute_spec, build_model
from kdcli.models.file import ModelInfo, check_model_fits, data_metadata, load_model_any, recipe_models, save_model
from kdcli.train.loop import evaluate, fit, tensor_batches


def teacher_key(recipe: Recipe) -> str:
    """A hash of what determines a trained teacher (seed, data, teacher spec): a run directory's
    ``teacher.kdc`` is reused only when it matches."""
    import hashlib
    import json

    blob = json.dumps([recipe.seed, recipe.data.model_dump(mode="json"), recipe.teacher.model_dump(mode="json")],
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def train_teacher(recipe: Recipe, data: DataBundle, device: torch.device,
                  reporter: Reporter, run_dir: Path | None = None) -> tuple[nn.Module, ModelInfo, dict]:
    """Train the recipe's teacher from scratch with cross-entropy (an ensemble teacher with
    :func:`kdcli.ensembles.build_ensemble_teacher`, which writes ``ensemble.json`` to
    ``run_dir``); returns model, info, metrics."""

    torch.manual_seed(recipe.seed)
    spec = recipe.teacher
    if getattr(spec, "ensemble", None):
        return _ensemble_teacher(recipe, data, device, reporter, run_dir)
    model = build_model(spec.model, spec.model_args, input_shape=data.input_shape,
                        num_classes=data.num_classes, base_dir=recipe.base_dir).to(device)
    loader = data.loader("train", train=True, device=device, seed=recipe.seed)
    val = tensor_batches(*data.eval_tensors("val", device))
    reporter.info(f"training teacher {spec.model} for {spec.train.epochs} epochs on {data.description}")
    res = fit(model, loader, spec.train, val_batches=val, device=device,
              progress=lambda m: reporter.metrics("teacher", m))
    metrics = {"val_accuracy": evaluate(model, val, device)["accuracy"], "train_seconds": res.seconds}
    if data.test is not None:
        metrics["test_accuracy"] = evaluate(model, tensor_batches(*data.eval_tensors("test", device)), device)["accuracy"]
    info = ModelInfo(absolute_spec(spec.model, recipe.base_dir), dict(spec.model_args), tuple(data.input_shape),
                     data.num_classes, metadata={**data_metadata(data), "recipe_sha256": recipe.sha256,
                               "teacher_key": teacher_key(recipe), "metrics": metrics,
                               "role": "teacher"})
    return model, info, metrics


def _ensemble_teacher(recipe: Recipe, data: DataBundle, device: torch.device, reporter: Reporter,
                      run_dir: Path | None) -> tuple[nn.Module, ModelInfo, dict]:

    model, info = build_ensemble_teacher(recipe.teacher, data, device, reporter, recipe.base_dir, run_dir,
                                         seed=recipe.seed)
    meta = info["metadata"]
    metrics = {**meta["metrics"], "train_seconds": meta["ensemble"]["seconds"]}
    minfo = ModelInfo(info["name"], info["args"], tuple(data.input_shape), data.num_classes,
                      metadata={**data_metadata(data), **meta, "metrics": metrics, "recipe_sha256": recipe.sha256,
                                "teacher_key": teacher_key(recipe)})
    return model, minfo, metrics


def obtain_teacher(recipe: Recipe, data: DataBundle, device: torch.device, run_dir: Path,
                   reporter: Reporter, trust: bool = False) -> tuple[nn.Module, ModelInfo]:
    """The recipe's teacher: its checkpoint, the run directory's ``teacher.kdc``, or trained now."""
    spec = recipe.teacher
    if getattr(spec, "checkpoint", None):  # ensemble specs have none
        model, info = load_model_any(recipe.resolve(spec.checkpoint), spec_name=spec.model,
                                     spec_args=spec.model_args, input_shape=data.input_shape,
                                     num_classes=data.num_classes, base_dir=recipe.base_dir, trust=trust,
                                     allow=recipe_models(recipe))
        info.metadata = {**data_metadata(data), **info.metadata}
        check_model_fits(model, info, data, torch.zeros(1, *info.input_shape))
        reporter.info(f"teacher: {spec.checkpoint} ({info.name})")
        return model.to(device), info
    cached = run_dir / "teacher.kdc"
    if cached.exists():
        model, info = load_model_any(cached, spec_name=None, spec_args=None, input_shape=data.input_shape,
                                     num_classes=data.num_classes, base_dir=recipe.base_dir,
                                     allow=recipe_models(recipe))
        if info.metadata.get("teacher_key") == teacher_key(recipe):
            reporter.info(f"teacher: reusing {cached}")
            return model.to(device), info
        reporter.info(f"teacher: {cached} was trained from another recipe; training again")
    model, info, _ = train_teacher(recipe, data, device, reporter, run_dir)
    save_model(cached, model, info)
    return model, info
