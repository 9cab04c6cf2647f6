"""The one training and evaluation loop, used for teacher training, distillation and fine-tuning.

One readable loop, no callback maze. What varies between uses is the *step objective*: a
callable ``objective(x, y, idx) -> (loss, logits, parts)``. Plain training uses cross-entropy;
distillation passes a :class:`kdcli.distill.distiller.Distiller`, whose adapters train with the student.

Under ``torchrun`` (:mod:`kdcli.distributed`): :func:`fit` runs its step objective inside
DistributedDataParallel, so the gradients of the model and of every extra module (adapters) are
averaged over ranks; the loaders shard each epoch's permutation like a DistributedSampler;
:func:`evaluate` takes every N-th batch and sums over ranks; a non-finite loss on any rank stops
every rank at the same step; epoch metrics are summed over ranks, so every rank records the same.

Mixed precision: on CUDA, bf16 autocast where the GPU supports it, else fp16 with a GradScaler.
On the CPU, float32 (autocast on CPU is slower for these model sizes). Channels-last memory for
convolution nets on CUDA (``train.channels_last``), put back to the default layout at the end.
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

from kdcli import distributed
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


def use_channels_last(modules: Iterable[nn.Module], device: torch.device, setting: str = "auto") -> bool:
    """Whether to train in channels-last memory (``train.channels_last``): ``auto`` on CUDA for
    networks with 2-D convolutions, where cuDNN's NHWC kernels feed the tensor cores; ``on``
    wherever there are convolutions; never for networks without them."""
    if setting == "off":
        return False
    has_conv = any(isinstance(m, nn.Conv2d) for mod in modules for m in mod.modules())
    return has_conv and (setting == "on" or device.type == "cuda")


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
    """Top-1 accuracy and mean cross-entropy of ``model`` over batches of ``(x, y, ...)``.

    Under torchrun every rank must call it: a list of batches (the same on every rank) is dealt
    every N-th batch to each rank, any other iterable is taken as this rank's share already; the
    sums are reduced over ranks, so every rank gets the same figures."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    ctx, _ = autocast_for(device, amp)
    if distributed.active() and isinstance(batches, (list, tuple)):  # the same list on every rank: shard it
        batches = batches[distributed.rank()::distributed.world_size()]
    correct, total, loss_sum = 0, 0, 0.0
    for batch in batches:
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with ctx:
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        total += y.numel()
    model.train(was_training)
    if distributed.active():
        correct, total, loss_sum = distributed.sum_over_ranks(torch.tensor([correct, total, loss_sum])).tolist()
        correct, total = int(correct), int(total)
    if total == 0:
        raise InputError("evaluation data is empty")
    return {"accuracy": correct / total, "loss": loss_sum / total, "samples": total}


def tensor_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int = 512):
    """Evaluation batches ``(x, y)`` sliced from tensors already on the device."""
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


def _on_rank() -> str:
    return f" on rank {distributed.rank()}" if distributed.active() else ""


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
    layout = torch.channels_last if use_channels_last([model, *extra_modules], device,
                                                      getattr(cfg, "channels_last", "auto")) else None
    if layout is not None:  # before the optimizer: the parameters keep their identity, only their strides change
        for m in [model, *extra_modules]:
            m.to(memory_format=layout)
    optimizer = make_optimizer(params, cfg)
    # several ranks: the step runs in DistributedDataParallel, which averages every gradient
    step_fn = distributed.wrap_step(objective, [model, *extra_modules], device)
    ctx, needs_scaler = autocast_for(device, cfg.amp)
    scaler = torch.amp.GradScaler("cuda") if needs_scaler else None
    steps = max(len(loader), 1)
    result = FitResult()
    t0 = time.perf_counter()
    try:
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
                if layout is not None and x.dim() == 4:
                    x = x.contiguous(memory_format=layout)
                with ctx:
                    loss, logits, parts = step_fn(x, y, idx)
                finite = bool(torch.isfinite(loss))
                if not distributed.all_true(finite):  # one rank's NaN stops every rank at this step
                    what = f"loss became {loss.item()}{_on_rank()}" if not finite else "loss became non-finite on another rank"
                    raise TrainingDiverged(
                        f"{what} at epoch {epoch + 1}, step {step + 1} "
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
            names = list(part_sums)  # the objective's order, the same on every rank
            sums = distributed.sum_over_ranks(torch.stack([loss_sum, correct.float(), torch.tensor(float(seen), device=device),
                                                           *[torch.as_tensor(part_sums[k], device=device) for k in names]]))
            loss_sum, correct, seen = sums[0], sums[1], int(sums[2])
            metrics = {"epoch": epoch + 1, "epochs": cfg.epochs, "train_loss": (loss_sum / max(seen, 1)).item(),
                       "train_accuracy": (correct / max(seen, 1)).item(),
                       "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": time.perf_counter() - te}
            if part_sums:
                metrics["loss_terms"] = {k: (sums[3 + i] / max(seen, 1)).item() for i, k in enumerate(names)}
            if val_batches is not None:
                ev = evaluate(model, val_batches, device)
                metrics.update(val_accuracy=ev["accuracy"], val_loss=ev["loss"])
            result.history.append(metrics)
            if progress is not None:
                progress(metrics)
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics)
    finally:
        if layout is not None:  # back to the default layout: pruning and saving expect contiguous weights
            for m in [model, *extra_modules]:
                m.to(memory_format=torch.contiguous_format)
    result.seconds = time.perf_counter() - t0
    return result
