"""The one training and evaluation loop, used for teacher training, distillation and fine-tuning.

One readable loop, no callback maze. What varies between uses is the *step objective*: a
callable ``objective(x, y, idx) -> (loss, logits, parts)``. Plain training uses cross-entropy;
distillation passes a :class:`kdcli.distill.distiller.Distiller`, whose adapters train with the student.

Distributed-ready: under ``torchrun`` the caller wraps the model in DistributedDataParallel and
builds loaders with ``rank``/``world_size`` (kdcli's BatchLoader shards its permutation like a
DistributedSampler); :func:`is_main_process` tells who writes. Nothing else changes.

Mixed precision: on CUDA, bf16 autocast where the GPU supports it, else fp16 with a GradScaler.
On the CPU, float32 (autocast on CPU is slower for these model sizes).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from kdcli.errors import InputError, TrainingDiverged

Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict]]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available else CPU; ``cuda`` asked for but absent is an InputError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: CUDA is not available on this machine (use cpu or auto)")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    if name == "cpu":
        return torch.device("cpu")
    raise InputError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")


def autocast_for(device: torch.device, amp: str = "auto"):
    """The autocast context and whether a GradScaler is needed, for ``amp`` in auto|off|bf16|fp16."""
    if device.type != "cuda" or amp == "off":
        return nullcontext(), False
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.autocast("cuda", dtype=torch.bfloat16), False
    return torch.autocast("cuda", dtype=torch.float16), True


def cross_entropy_objective(model: nn.Module, label_smoothing: float = 0.0) -> Objective:
    """Plain supervised training: cross-entropy of the model's logits."""

    def objective(x, y, idx):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        return loss, logits, {"ce": loss.detach()}

    return objective


def make_optimizer(params, cfg) -> torch.optim.Optimizer:
    """The optimizer of a :class:`TrainSpec`. Biases and norm weights get no decay."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_at(cfg, epoch_progress: float) -> float:
    """Learning rate at a fractional epoch: linear warm-up, then the schedule."""
    e, total = epoch_progress, max(cfg.epochs, 1)
    if cfg.warmup_epochs and e < cfg.warmup_epochs:
        return cfg.lr * (e + 1e-3) / cfg.warmup_epochs
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":  # divide by 10 at 50 % and 75 % (He et al. 2016)
        return cfg.lr * (0.1 ** ((e >= 0.5 * total) + (e >= 0.75 * total)))
    t = min(1.0, (e - cfg.warmup_epochs) / max(total - cfg.warmup_epochs, 1e-9))
    if cfg.schedule == "onecycle":
        return cfg.lr * (t / 0.3 if t < 0.3 else (1 - t) / 0.7)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * t))


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, device: torch.device | None = None,
             amp: str = "off") -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` over batches of ``(x, y, ...)``."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    ctx, _ = autocast_for(device, amp)
    correct, total, loss_sum = 0, 0, 0.0
    for batch in batches:
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with ctx:
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        total += y.numel()
    model.train(was_training)
    if total == 0:
        raise InputError("evaluation data is empty")
    return {"accuracy": correct / total, "loss": loss_sum / total, "samples": total}


def tensor_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int = 512):
    """Evaluation batches ``(x, y)`` sliced from tensors already on the device."""
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def last(self) -> dict:
        return self.history[-1] if self.history else {}


def fit(model: nn.Module, loader, cfg, *, objective: Objective | None = None,
        extra_modules: Iterable[nn.Module] = (), val_batches=None, device: torch.device | None = None,
        progress: Callable[[dict], None] | None = None, on_epoch_end: Callable[[int, dict], None] | None = None,
        start_epoch: int = 0, before_epoch: Callable[[int], None] | None = None) -> FitResult:
    """Train ``model`` for ``cfg.epochs`` epochs over ``loader`` (batches of ``(x, y, idx)``).

    ``objective`` defaults to cross-entropy; ``extra_modules`` (distillation adapters, learned λ)
    are optimised with the model. ``val_batches`` are evaluated after each epoch. A NaN or
    infinite loss raises :class:`TrainingDiverged` naming the epoch and step, before the
    optimizer touches the weights, so the caller's last good model is intact.
    """
    device = device or next(model.parameters()).device
    objective = objective or cross_entropy_objective(model, cfg.label_smoothing)
    extra_modules = list(extra_modules)
    params, seen_ids = [], set()
    for m in [model, *extra_modules]:  # a Distiller holds the student too: count each tensor once
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen_ids:
                seen_ids.add(id(p))
                params.append(p)
    optimizer = make_optimizer(params, cfg)
    ctx, needs_scaler = autocast_for(device, cfg.amp)
    scaler = torch.amp.GradScaler("cuda") if needs_scaler else None
    steps = max(len(loader), 1)
    result = FitResult()
    t0 = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        for m in extra_modules:
            m.train()
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        if before_epoch is not None:
            before_epoch(epoch)
        loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
        part_sums: dict[str, torch.Tensor] = {}  # each loss term, unweighted, summed over samples
        te = time.perf_counter()
        for step, (x, y, idx) in enumerate(loader):
            for g in optimizer.param_groups:
                g["lr"] = lr_at(cfg, epoch + step / steps)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with ctx:
                loss, logits, parts = objective(x, y, idx)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} "
                    f"(lr {optimizer.param_groups[0]['lr']:.3g}): lower the learning rate or the temperature"
                )
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            n = y.numel()
            loss_sum += loss.detach().float() * n
            for name, value in (parts or {}).items():
                part_sums[name] = part_sums.get(name, 0.0) + value.detach().float() * n
            correct += (logits.detach().argmax(1) == y).sum()
            seen += n
        metrics = {"epoch": epoch + 1, "epochs": cfg.epochs, "train_loss": (loss_sum / max(seen, 1)).item(),
                   "train_accuracy": (correct / max(seen, 1)).item(),
                   "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": time.perf_counter() - te}
        if part_sums:
            metrics["loss_terms"] = {k: (v / max(seen, 1)).item() for k, v in part_sums.items()}
        if val_batches is not None:
            ev = evaluate(model, val_batches, device)
            metrics.update(val_accuracy=ev["accuracy"], val_loss=ev["loss"])
        result.history.append(metrics)
        if progress is not None:
            progress(metrics)
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)
    result.seconds = time.perf_counter() - t0
    return result
