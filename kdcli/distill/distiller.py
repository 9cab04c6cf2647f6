"""The Distiller: a frozen teacher, a student, and a weighted sum of distillation loss terms.

    distiller = Distiller(teacher, student, recipe.distill.losses, example=torch.zeros(2, 3, 32, 32))
    loss, logits, parts = distiller(x, y, idx)      # the step objective of kdcli.train.loop.fit

On construction the teacher is frozen (no gradients, eval mode for good), the layers of every
feature term are resolved (paths, ``auto`` or ``auto-blocks``, see :func:`kdcli.distill.taps.auto_layers`), one forward
pass of each network on ``example`` records the feature shapes, and the adapters (regressors,
connectors, VID's μ/σ², learned λ) are built from them. Adapters live in the Distiller, not in
the student, whose ``state_dict`` stays exactly the model's.

With :meth:`Distiller.enable_teacher_cache`, what the terms need from the teacher (its logits,
features, attention maps, ...) is computed once per training sample and reused, so that an
epoch costs about one student epoch. Valid only when a sample index always means the same
input: no augmentation, and the same training split (``kdcli.dkdp.compress`` checks the first).
"""

from __future__ import annotations

import torch
from torch import nn

from kdcli.config.losses import FEATURE_KINDS, LossSpec
from kdcli.distill.losses import Layers, build_term
from kdcli.distill.taps import FeatureTaps, block_layers, pick_layers, resolve_modules, trace_modules
from kdcli.errors import InputError, ModelError

DEFAULT_CACHE_BYTES = 2 * 2**30


class Distiller(nn.Module):
    """Distil ``teacher`` into ``student`` with the recipe's ``losses`` (a list of LossSpec).

    ``losses`` may also hold plain mappings as in a recipe (``{"kind": "kd", "temperature": 4}``).
    ``example`` is an input batch (N ≥ 2, on the training device) used once to resolve layers and
    shapes; ``granularity`` a :class:`kdcli.analyze.granularity.GranularityMap` for terms with
    ``granularity: true``. Terms with weight 0 are left out.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, losses: list, example: torch.Tensor,
                 granularity=None):
        super().__init__()
        self.teacher, self.student = teacher, student
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher.eval()
        t_rec, t_out = trace_modules(teacher, example)
        s_rec, s_out = trace_modules(student, example)
        if t_out is None or s_out is None or t_out.shape != s_out.shape:
            raise ModelError(f"teacher and student outputs differ: teacher {_shape(t_out)}, student {_shape(s_out)}; "
                             "both must give (N, num_classes) logits")
        auto = {}
        terms, names, t_paths, s_paths = [], {}, [], []
        for k, spec in enumerate(losses):
            if isinstance(spec, dict):  # library use: plain mappings as in a recipe
                spec = _validate_spec(spec, k)
            if spec.weight == 0:
                continue
            n = names[spec.kind] = names.get(spec.kind, 0) + 1
            name = spec.kind if n == 1 else f"{spec.kind}_{n}"
            layers = None
            if spec.kind in FEATURE_KINDS:
                where = f"distill.losses[{k}]"
                tl = self._layers(spec.teacher_layers, teacher, t_rec, t_out, "teacher", where, auto)
                sl = self._layers(spec.student_layers, student, s_rec, s_out, "student", where, auto)
                layers = Layers(tl, sl, {p: t_rec[p]["out"].shape[1:] for p in tl},
                                {p: s_rec[p]["out"].shape[1:] for p in sl}, where)
                t_paths += tl
                s_paths += sl
            terms.append(build_term(spec, name, layers, granularity))
        if not terms:
            raise InputError("distill.losses: every term has weight 0; give at least one a positive weight")
        self.terms = nn.ModuleList(terms).to(example.device)
        self._t_taps = FeatureTaps(teacher, t_paths, role="teacher")
        self._s_taps = FeatureTaps(student, s_paths, role="student")
        self._cache: TeacherCache | None = None
        self.epoch = 0

    @staticmethod
    def _layers(sel, model, records, final, role, where, auto) -> list[str]:
        if sel in ("auto", "auto-blocks"):
            key = (role, sel)
            if key not in auto:
                auto[key] = (pick_layers if sel == "auto" else block_layers)(model, records, final)
                if not auto[key]:
                    raise ModelError(f"{where}.{role}_layers: could not choose layers automatically for the {role}; "
                                     "name them ([module.path, ...])")
            return list(auto[key])
        resolve_modules(model, sel, f"{where}.{role}_layers", role)
        for p in sel:
            if p not in records or records[p]["out"] is None:
                raise ModelError(f"{where}.{role}_layers: module {p!r} of the {role} is not called in its "
                                 "forward pass or returns no tensor")
        return list(sel)

    def train(self, mode: bool = True) -> "Distiller":
        """Train mode for the student and adapters; the teacher stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    # --- the teacher side ---------------------------------------------------------------------
    @torch.no_grad()
    def teacher_targets(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything the terms need from the teacher for batch ``x``: ``{"logits": (N, K), ...}``."""
        t_logits, feats = _tapped_forward(self.teacher, self._t_taps, x)
        out = {"logits": t_logits}
        for term in self.terms:
            out.update(term.targets(t_logits, feats))
        return out

    def enable_teacher_cache(self, n_samples: int, max_bytes: int = DEFAULT_CACHE_BYTES,
                             cache: "TeacherCache | None" = None) -> "TeacherCache":
        """Cache the teacher's targets per training-sample index (``idx`` of the batches, indices
        into a split of ``n_samples``), computed on first sight and reused afterwards.

        Stored on the teacher's device; logits in float32, features in float32 when the whole
        cache fits ``max_bytes``, else in float16 (both at first use and afterwards, so every pass
        sees the same values). When even float16 does not fit, caching is switched off and the
        teacher runs every step (:attr:`cache_note` says why).

        ``cache``, the return value of an earlier call, is reused as it is: valid for a Distiller
        with the same teacher, the same loss terms and the same training split, as in the
        successive DKDP steps of ``kdcli compress``, so the teacher runs once per sample per run."""
        if cache is not None and cache.n != int(n_samples):
            raise ValueError(f"teacher cache holds {cache.n} samples, not {n_samples}")
        self._cache = cache if cache is not None else TeacherCache(int(n_samples), int(max_bytes))
        return self._cache

    @torch.no_grad()
    def fill_teacher_cache(self, batches) -> None:
        """Compute the targets of every sample not cached yet from ``batches`` (``(x, y, idx)``, the
        training split unaugmented, in a fixed order), so the cache does not depend on the order in
        which training first meets the samples."""
        if self._cache is None or bool(self._cache.filled.all()) or self._cache.disabled_reason:
            return
        for x, _, idx in batches:
            self._cache.lookup(idx, x, self.teacher_targets)
            if self._cache.disabled_reason or self._cache.store is None:
                return

    @property
    def cache_note(self) -> str:
        """One line on the teacher cache: off, or its size, dtype and hit rate this epoch."""
        return self._cache.note() if self._cache is not None else "teacher cache off"

    def set_epoch(self, epoch: int) -> None:
        """Called before each epoch (``fit(before_epoch=...)``): resets the cache's hit counters."""
        self.epoch = int(epoch)
        if self._cache is not None:
            self._cache.hits = self._cache.misses = 0

    # --- the step objective ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor | None = None):
        """One step: ``(loss, student_logits, parts)`` with ``parts`` the unweighted value of each
        term by name (``kd``, ``ce``, ``hint``, ``vid_2``, ...), detached. ``loss = Σ weight·part``."""
        if self._cache is not None and idx is not None:
            targets = self._cache.lookup(idx, x, self.teacher_targets)
        else:
            targets = self.teacher_targets(x)
        s_logits, s_feats = _tapped_forward(self.student, self._s_taps, x)
        loss, parts = 0.0, {}
        for term in self.terms:
            value = term(s_logits, s_feats, targets, y)
            loss = loss + term.weight * value
            parts[term.name] = value.detach()
        return loss, s_logits, parts

    # --- for the optimiser and the report -------------------------------------------------------
    def adapter_parameters(self) -> list[nn.Parameter]:
        """The parameters that train with the student but are not the student's: regressors,
        connectors, VID's μ and σ², learned λ."""
        return list(self.terms.parameters())

    def _vid_term(self):
        return next((term for term in self.terms if hasattr(term, "lambda_matrix")), None)

    def lambda_matrix(self) -> torch.Tensor | None:
        """λ of the first VID term, (teacher layers × student layers), columns summing to 1; None
        without a VID term."""
        term = self._vid_term()
        return None if term is None else term.lambda_matrix().detach().cpu()

    def lambda_report(self) -> dict | None:
        """λ of the first VID term for a report: ``{"matrix": rows of floats (teacher × student),
        "teacher_layers", "student_layers", "learned"}``; None without a VID term."""
        term = self._vid_term()
        if term is None:
            return None
        return {"matrix": [[round(float(v), 4) for v in row] for row in self.lambda_matrix()],
                "teacher_layers": list(term.teacher_layers), "student_layers": list(term.student_layers),
                "learned": bool(term.learned)}


def _validate_spec(obj: dict, k: int):
    from pydantic import TypeAdapter, ValidationError


    try:
        return TypeAdapter(LossSpec).validate_python(obj)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InputError(f"distill.losses[{k}]: {err['msg']} at {'.'.join(map(str, err['loc'][1:] or err['loc']))}") from None


def _tapped_forward(model: nn.Module, taps: FeatureTaps, x: torch.Tensor):
    """``(logits, {path: feature})`` of one forward pass; the hooks exist only during it."""
    if not taps.paths:
        return model(x), {}
    with taps:
        out = model(x)
    return out, taps.collect()


def _shape(t) -> str:
    return "no tensor" if t is None else f"({', '.join(map(str, t.shape))})"


class TeacherCache:
    """Teacher targets per sample index, filled on first sight (see
    :meth:`Distiller.enable_teacher_cache`)."""

    def __init__(self, n: int, max_bytes: int):
        self.n, self.max_bytes = n, max_bytes
        self.store: dict[str, torch.Tensor] | None = None
        self.filled = torch.zeros(n, dtype=torch.bool)
        self.disabled_reason = ""
        self.hits = self.misses = 0

    def _allocate(self, targets: dict[str, torch.Tensor]) -> None:
        def size(dtype_of) -> int:
            return sum(self.n * v[0].numel() * dtype_of(k, v).itemsize for k, v in targets.items())

        full = lambda k, v: torch.float32 if v.is_floating_point() else v.dtype  # noqa: E731
        half = lambda k, v: (torch.float32 if k == "logits" else torch.float16) if v.is_floating_point() else v.dtype  # noqa: E731
        for dtype_of in (full, half):
            if size(dtype_of) <= self.max_bytes:
                self.store = {k: torch.zeros((self.n, *v.shape[1:]), dtype=dtype_of(k, v), device=v.device)
                              for k, v in targets.items()}
                return
        self.disabled_reason = (f"teacher cache off: {size(half) / 2**30:.1f} GiB needed for {self.n} samples "
                                f"(float16), over the {self.max_bytes / 2**30:.1f} GiB budget")

    def lookup(self, idx: torch.Tensor, x: torch.Tensor, compute) -> dict[str, torch.Tensor]:
        """The targets of the samples ``idx`` (int64, CPU); ``compute(x)`` runs the teacher for a
        batch that holds any sample not seen before (and refreshes the whole batch)."""
        if self.disabled_reason:
            return compute(x)
        idx = idx.cpu()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n):
            raise InputError(f"teacher cache: sample index {int(idx.max())} outside the {self.n} training samples")
        if self.store is not None and bool(self.filled[idx].all()):
            self.hits += 1
            return self._read(idx)
        self.misses += 1
        targets = compute(x)
        if self.store is None:
            self._allocate(targets)
            if self.store is None:
                return targets
        dev_idx = idx.to(next(iter(self.store.values())).device)
        for k, v in targets.items():
            self.store[k][dev_idx] = v.to(self.store[k].dtype)
        self.filled[idx] = True
        return self._read(idx)

    def _read(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        dev_idx = idx.to(next(iter(self.store.values())).device, non_blocking=True)
        return {k: (v[dev_idx].float() if v.dtype == torch.float16 else v[dev_idx]) for k, v in self.store.items()}

    def note(self) -> str:
        if self.disabled_reason:
            return self.disabled_reason
        if self.store is None:
            return "teacher cache on (empty)"
        nbytes = sum(v.numel() * v.element_size() for v in self.store.values())
        return (f"teacher cache: {int(self.filled.sum())}/{self.n} samples, {nbytes / 2**20:.1f} MiB, "
                f"{self.hits} hits / {self.misses} misses this epoch")
