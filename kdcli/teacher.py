"""The teacher: load it from a checkpoint, or train it from the recipe (``kdcli train``).

A teacher is either a kdcli model file (``.kdc``, which carries its own spec), or a user
checkpoint read safely together with the recipe's model spec. Without a checkpoint, the
recipe's ``teacher.train`` settings train one with the shared loop, and the result is written to
the run directory as ``teacher.kdc`` so that a resumed run does not train it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from kdcli import __version__
from kdcli.console import Reporter
from kdcli.models import absolute_spec
from kdcli.data import DataBundle
from kdcli.errors import DataError, ModelError
from kdcli.config.recipe import Recipe
from kdcli.train import eval_mode, evaluate, fit, is_main_process, tensor_batches


@dataclass
class ModelInfo:
    """What is needed to rebuild, describe and export a model besides its weights."""

    name: str
    args: dict
    input_shape: tuple
    num_classes: int
    pruning_history: list = field(default_factory=list)
    metadata: dict = field(default_factory=dict)


def data_metadata(data: DataBundle) -> dict:
    return {"mean": list(data.mean), "std": list(data.std), "scale": data.scale, "class_names": list(data.class_names),
            "data": data.description}


def export_info(info: ModelInfo, data: DataBundle | None = None) -> dict:
    """What :func:`kdcli.export.run_export` records about a model: its spec and the input
    normalisation, from ``data`` when given, else from the model file's metadata."""
    meta = info.metadata or {}
    norm = data_metadata(data) if data is not None else meta
    return {"name": info.name, "input_shape": list(info.input_shape), "num_classes": info.num_classes,
            "mean": norm.get("mean"), "std": norm.get("std"), "scale": norm.get("scale", 1.0),
            "class_names": norm.get("class_names")}


def save_model(path: Path, model: nn.Module, info: ModelInfo) -> None:
    """Write a kdcli model file (rank 0 only); the same model and info give the same bytes."""
    from kdcli.checkpoint import save_model_file

    if not is_main_process():
        return
    # No wall-clock time: a model file is a function of its inputs, so a resumed run writes the
    # same bytes as an uninterrupted one (run.json records when a run started).
    meta = {"kdcli_version": __version__, **info.metadata}
    save_model_file(path, model, name=info.name, args=info.args, input_shape=list(info.input_shape),
                    num_classes=info.num_classes, pruning_history=info.pruning_history, metadata=meta)


def load_model_any(path: Path, *, spec_name: str | None, spec_args: dict | None, input_shape, num_classes,
                   base_dir: Path, trust: bool = False, allow: Iterable[str] = (),
                   override: bool = False) -> tuple[nn.Module, ModelInfo]:
    """A kdcli model file, or a user checkpoint with the model spec that fits it.

    ``spec_name`` is relative to ``base_dir``. A model file is built from its own spec when that
    names only built-in models or code in ``allow`` (absolute specs the user named; see
    :func:`kdcli.checkpoint.load_model_file`), or with ``trust``; with ``override`` (the user
    named the model on the command line) from ``spec_name`` / ``spec_args`` instead."""
    from kdcli.checkpoint import is_model_file, load_model, load_model_file
    from kdcli.errors import CheckpointError

    path = Path(path)
    if is_model_file(path):
        use = override and spec_name is not None
        model, info = load_model_file(path, base_dir=base_dir, allow=allow, trust=trust,
                                      model=absolute_spec(spec_name, base_dir) if use else None,
                                      model_args=spec_args if use else None)
        spec = info["model"]
        return model, ModelInfo(spec["name"], spec.get("args", {}), tuple(spec["input_shape"]),
                                spec["num_classes"], list(info.get("pruning_history", [])),
                                dict(info.get("metadata", {})))
    if spec_name is None:
        raise CheckpointError(f"{path}: not a kdcli model file, so a model spec is needed (recipe teacher.model or --model)")
    model = load_model(spec_name, spec_args or {}, path, input_shape=input_shape, num_classes=num_classes,
                       base_dir=base_dir, trust=trust)
    return model, ModelInfo(absolute_spec(spec_name, base_dir), dict(spec_args or {}), tuple(input_shape), num_classes)


def recipe_models(recipe: Recipe) -> list[str]:
    """The model specs a recipe names (teacher, student, ensemble generalist or members), in
    :func:`kdcli.models.absolute_spec` form: the code its model files may run without a flag."""
    specs = [getattr(recipe.teacher, "model", None), recipe.student.model,
             getattr(getattr(recipe.teacher, "generalist", None), "model", None)]
    return [absolute_spec(s, recipe.base_dir) for s in specs if isinstance(s, str)]


def check_model_fits(model: nn.Module, info, data, example: torch.Tensor) -> None:
    """The model, its declared input shape and the data agree (shape, classes, a forward pass that
    gives ``[N, num_classes]`` logits); one-line DataError / ModelError otherwise, before training."""
    if data is not None and tuple(data.input_shape) != tuple(info.input_shape):
        raise DataError(f"data ({data.description}): inputs of shape {list(data.input_shape)}, but model "
                        f"{info.name} expects {list(info.input_shape)}")
    if data is not None and data.num_classes != info.num_classes:
        raise DataError(f"data ({data.description}): {data.num_classes} classes, but model {info.name} "
                        f"has {info.num_classes} outputs")
    try:
        with eval_mode(model), torch.no_grad():
            out = model(example)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's model is reported in one line
        text = " ".join(str(exc).split())[:200]
        raise ModelError(f"model {info.name}: forward pass on input shape {list(info.input_shape)} failed "
                         f"({type(exc).__name__}: {text})") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != info.num_classes:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"model {info.name}: output {shape}, expected logits [N, {info.num_classes}]")


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
    from kdcli.models import build_model

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
    from kdcli.ensembles import build_ensemble_teacher

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
