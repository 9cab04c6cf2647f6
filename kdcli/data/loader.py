"""Data: reading the recipe's ``data:`` section (its schema is :mod:`kdcli.config.data`), and a fast in-memory batch loader.

By default a source is read once into tensors (``uint8`` for image files, so that CIFAR-10's
50,000 training images take 150 MB), split into train/val with the recipe's seed, and served by
:class:`BatchLoader`, which slices batches from a seeded permutation and converts, augments and
normalises whole batches with tensor ops on the target device (no worker processes). An image
folder or a folder of ``.npy`` shards too large for memory streams instead (``data.loading``,
:mod:`kdcli.data.stream`): same splits, same order, read sample by sample by DataLoader workers.

Sources: scikit-learn's bundled 8x8 ``digits`` (the default, no download), MNIST-style IDX
files, the CIFAR-10 binary version, a folder of images with one sub-folder per class, a tensor
file (``.pt`` read with ``weights_only=True``, or ``.npz``), a folder of ``.npy``/``.npz`` tensor
shards and a user ``module:function``.
The readers live in :mod:`kdcli.data.sources`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kdcli.config.data import (HELD_OUT_FRACTION, STREAMING_KINDS, AugmentSpec, DataSpec, NormalizeStats, OtherData,
                               SplitFraction)
from kdcli import distributed
from kdcli.data.adapt import adapt_inputs
from kdcli.data.sources import read_source
from kdcli.data.stream import (NORM_SAMPLES, RAM_SHARE, StreamData, StreamLoader, available_memory, batch_count,
                               choose_loading, epoch_order, human_bytes, open_stream, resolve_workers)
from kdcli.data.tensors import TensorData
from kdcli.errors import DataError, InputError

# ----------------------------------------------------------------------------- tensors in memory


_DEVICE_COPY_LIMIT = 2 << 30  # splits up to 2 GiB are copied to the accelerator whole, once


def translate(x: torch.Tensor, shift_y: torch.Tensor, shift_x: torch.Tensor) -> torch.Tensor:
    """Shift each image of ``x`` [B, C, H, W] by its own (dy, dx) pixels, filling with zeros.

    ``shift_y``/``shift_x`` are int64 [B] on ``x``'s device. A random crop of size (H, W) from
    the image zero-padded by p is ``translate`` by offsets uniform in [-p, p]. Loop-free: one
    gather from the padded batch.
    """
    b, c, h, w = x.shape
    p = int(max(shift_y.abs().max().item(), shift_x.abs().max().item(), 0)) if b else 0
    if p == 0:
        return x
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    rows = (p - shift_y)[:, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = (p - shift_x)[:, None] + torch.arange(w, device=x.device)  # [B, W]
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


class BatchLoader:
    """Iterates ``(x, y, idx)`` batches of one split: float inputs normalised on ``device``, int64
    labels on ``device``, and int64 indices into the split (on the CPU) for caching per sample.

    With ``train=True`` the order is a permutation drawn from ``seed + epoch`` (:meth:`set_epoch`)
    and augmentation applies; shards for ``rank``/``world_size`` take every ``world_size``-th
    index of the same permutation, padded by wrapping around to equal length (like
    ``DistributedSampler``). With ``train=False`` the order is the split's, unpadded (so that
    sums over ranks count each sample once), and nothing is augmented.
    """

    def __init__(self, data: TensorData, *, batch_size: int, train: bool, mean, std, scale: float,
                 augment: AugmentSpec | None = None, device="cpu", seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.data, self.batch_size, self.train = data, int(batch_size), train
        self.device = torch.device(device)
        self.seed, self.rank, self.world_size, self.drop_last = seed, rank, world_size, drop_last
        self.scale = scale
        self.augment = augment if (train and augment is not None) else AugmentSpec()
        shape = (1, -1) + (1,) * (data.x.dim() - 2)
        self._mean = torch.as_tensor(mean, dtype=torch.float32).view(shape).to(self.device)
        self._std = torch.as_tensor(std, dtype=torch.float32).view(shape).to(self.device)
        self.epoch = 0

    @property
    def augmented(self) -> bool:
        """True when batches are augmented (train=True and any augmentation switched on)."""
        return self.train and self.augment.active

    def set_epoch(self, epoch: int) -> None:
        """Choose the permutation (and augmentation draws) of this epoch."""
        self.epoch = int(epoch)

    def _indices(self) -> torch.Tensor:
        return epoch_order(len(self.data), train=self.train, seed=self.seed, epoch=self.epoch, rank=self.rank,
                           world_size=self.world_size)

    def __len__(self) -> int:
        return batch_count(len(self.data), self.batch_size, train=self.train, rank=self.rank,
                           world_size=self.world_size, drop_last=self.drop_last)

    def __iter__(self):
        idx_all = self._indices()
        x_all, y_all = self.data.x, self.data.y
        whole_on_device = (self.device.type != "cpu"
                           and x_all.numel() * x_all.element_size() <= _DEVICE_COPY_LIMIT)
        if whole_on_device:
            x_all, y_all = self.data.on(self.device)
        g = torch.Generator().manual_seed((self.seed + self.epoch) * 7919 + self.rank + 1)
        for s in range(0, len(self), 1):
            idx = idx_all[s * self.batch_size:(s + 1) * self.batch_size]
            if whole_on_device:
                dev_idx = idx.to(self.device, non_blocking=True)
                x, y = x_all[dev_idx], y_all[dev_idx]
            else:
                x, y = x_all[idx], y_all[idx]
                if self.device.type == "cuda":
                    x, y = x.pin_memory(), y.pin_memory()
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            yield self._prepare(x, g), y, idx

    def _prepare(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        x = x.float()
        if self.scale != 1.0:
            x = x * self.scale
        if self.augmented:
            x = augment_batch(x, self.augment, g)
        return (x - self._mean) / self._std


def augment_batch(x: torch.Tensor, spec: AugmentSpec, g: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding), jitter and horizontal flip of ``x`` [B, C, H, W] in [0, 1] scale.

    Random numbers come from the CPU generator ``g``, so a seed gives the same batches on any device.
    """
    b = x.shape[0]
    for p in (spec.crop_padding, spec.jitter):
        if p:
            dy = torch.randint(-p, p + 1, (b,), generator=g).to(x.device)
            dx = torch.randint(-p, p + 1, (b,), generator=g).to(x.device)
            x = translate(x, dy, dx)
    if spec.hflip:
        flip = (torch.rand(b, generator=g) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


# ----------------------------------------------------------------------------- the bundle


@dataclass
class DataBundle:
    """The splits of a data set and what a model and its export need to know about them.

    ``mean``/``std`` are per channel (per feature for ``[N, D]`` data) in the [0, 1] scale:
    a model sees ``(x * scale - mean) / std`` where ``scale`` is 1/255 for uint8 inputs.
    A split is a :class:`TensorData` in memory or a :class:`StreamData` read from disk
    (``data.loading``; ``loading`` says which, in words); :meth:`loader` serves either.
    """

    train: TensorData | StreamData
    val: TensorData | StreamData
    test: TensorData | StreamData | None
    num_classes: int
    input_shape: tuple[int, ...]
    mean: list[float]
    std: list[float]
    class_names: list[str]
    description: str
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    scale: float = 1.0
    batch_size: int = 128
    eval_batch_size: int = 512
    splits: dict[str, str] = field(default_factory=dict)  # split -> which data it is, in words
    notes: list[str] = field(default_factory=list)        # warnings about the choice of splits
    normalize_auto: bool = False                          # mean/std measured on the training split
    loading: str = "in memory"                            # data.loading's choice, in words
    workers: int = 0                                      # DataLoader workers of streamed splits
    normalize_samples: int | None = None                  # auto normalisation measured on this many samples only

    @property
    def streamed(self) -> bool:
        """True when the training split is read from disk as it is used."""
        return self.train.streamed

    def judged_by(self) -> str:
        """One line: which data validates, which data is the test part, the normalisation and how
        the data is loaded."""
        parts = [f"validation: {self.splits.get('val', 'the val split')}"]
        if self.test is not None:
            parts.append(f"test: {self.splits.get('test', 'the test split')}")
        return "; ".join(parts) + f"; normalisation: {self.normalization()}; loading: {self.loading}"

    def normalization(self) -> str:
        """mean/std in words, and where they came from."""
        fmt = lambda v: "(" + ", ".join(f"{x:.4g}" for x in v) + ")"  # noqa: E731
        if all(m == 0 for m in self.mean) and all(s == 1 for s in self.std):
            return "none"
        how = "measured on the training split" if self.normalize_auto else "data.normalize"
        if self.normalize_auto and self.normalize_samples is not None:
            how = f"measured on {self.normalize_samples:,} seeded samples of the training split"
        return f"mean {fmt(self.mean)}, std {fmt(self.std)} ({how})"

    def split(self, name: str) -> TensorData | StreamData:
        """The split called ``train``, ``val`` or ``test``."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}: expected train, val or test")
        data = getattr(self, name)
        if data is None:
            raise DataError(f"data: this source has no {name} split ({self.description})")
        return data

    def loader(self, split: str, *, train: bool, batch_size: int | None = None, device="cpu",
               seed: int = 0, rank: int | None = None, world_size: int | None = None,
               drop_last: bool = False) -> BatchLoader | StreamLoader:
        """A :class:`BatchLoader` (a split in memory) or a :class:`StreamLoader` (a streamed split:
        the same batches, prepared by ``self.workers`` processes) over ``split``; ``batch_size``
        defaults to the recipe's ``batch_size`` (train=True) or ``eval_batch_size``.
        ``rank``/``world_size`` default to the process group's under ``torchrun``, so each rank
        trains on its own shard of the same seeded permutation; the batch size is then the global
        one, each of the N ranks taking batch_size / N (a multiple of N is required), so that the
        recipe's learning rate means the same at any N."""
        bs = batch_size or (self.batch_size if train else self.eval_batch_size)
        if rank is None or world_size is None:
            rank, world_size = _rank_and_world()
            if world_size > 1:  # under torchrun the batch size is the global one: each rank takes its share
                if bs % world_size:
                    what = "data.batch_size" if train else "data.eval_batch_size"
                    raise InputError(f"{what}: {bs} is the global batch, split over the {world_size} processes; "
                                     f"give a multiple of {world_size}")
                bs //= world_size
        data = self.split(split)
        kind = StreamLoader if data.streamed else BatchLoader
        extra = {"workers": self.workers} if data.streamed else {}
        return kind(data, batch_size=bs, train=train, mean=self.mean, std=self.std, scale=self.scale,
                    augment=self.augment, device=device, seed=seed, rank=rank, world_size=world_size,
                    drop_last=drop_last, **extra)

    def eval_batches(self, split: str, device="cpu", limit: int | None = None) -> BatchLoader | StreamLoader:
        """Unaugmented batches ``(x, y, idx)`` of ``split`` (its first ``limit`` samples) in order,
        on ``device``, for :func:`kdcli.train.loop.evaluate`: nothing is held beyond a batch, so
        this suits a streamed split of any size (unlike :meth:`eval_tensors`)."""
        data = self.split(split)
        if limit is not None and limit < len(data):
            data = data.subset(torch.arange(limit))
        kind = StreamLoader if data.streamed else BatchLoader
        extra = {"workers": self.workers} if data.streamed else {}
        return kind(data, batch_size=self.eval_batch_size, train=False, mean=self.mean, std=self.std,
                    scale=self.scale, device=device, **extra)

    def eval_tensors(self, split: str, device="cpu", limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All of ``split`` (its first ``limit`` samples) as normalised float inputs and int64 labels on ``device``.

        A streamed split is decoded by the workers; one whose float tensors would take more than
        ``RAM_SHARE`` of the available memory is a DataError that names ``data.limit_eval``."""
        data = self.split(split)
        n = len(data) if limit is None else min(limit, len(data))
        dev = torch.device(device)
        if data.streamed and n:
            need = n * math.prod(data.sample_shape) * 4
            avail = available_memory()
            if avail is not None and need > RAM_SHARE * avail:
                fits = max(1, int(RAM_SHARE * avail // (4 * math.prod(data.sample_shape))))
                raise DataError(f"data.limit_eval: the {split} split is {len(data):,} streamed samples; evaluating "
                                f"{n:,} at once takes {human_bytes(need)} as float tensors, over {RAM_SHARE:.0%} of the "
                                f"{human_bytes(avail)} available; set data.limit_eval to at most {fits:,}")
            xs, ys = [], []
            for x, y, _ in self.eval_batches(split, device, limit=n):
                xs.append(x)
                ys.append(y)
            return torch.cat(xs), torch.cat(ys)
        if n:
            sub = BatchLoader(TensorData(data.x[:n], data.y[:n]), batch_size=n, train=False,
                              mean=self.mean, std=self.std, scale=self.scale, device=device)
            for x, y, _ in sub:
                return x, y
        return torch.zeros((0, *self.input_shape), device=dev), torch.zeros(0, dtype=torch.int64, device=dev)


def _rank_and_world() -> tuple[int, int]:
    if distributed.active():
        return distributed.rank(), distributed.world_size()
    return 0, 1


def resolve_val(spec: DataSpec, held_out: bool, has_test: bool = True):
    """What ``data.val`` means for this run: ``"test"``, a :class:`SplitFraction` or an
    :class:`OtherData`. ``auto`` takes half of the held-out split when ``held_out`` (the teacher
    comes from a checkpoint, so it has usually trained on the whole training split) and the source
    ``has_test``, else ``val_fraction`` of the training split; an explicit ``val_fraction`` is
    honoured (0: the test split)."""
    if spec.val != "auto":
        return spec.val
    if "val_fraction" in spec.model_fields_set or not held_out or not has_test:
        if spec.val_fraction == 0:
            return "test"
        return SplitFraction(split="train", fraction=spec.val_fraction)
    return SplitFraction(split="test", fraction=HELD_OUT_FRACTION)


def load_data(spec: DataSpec, *, base_dir: Path, seed: int, held_out: bool = False) -> DataBundle:
    """Read the source of ``spec``, adapt its inputs (``data.input``), choose the validation and
    test data (``data.val``/``data.test``, see :func:`resolve_val`; ``held_out``: the model to be
    judged was trained elsewhere), apply the limits and compute the normalisation. Relative paths
    resolve against ``base_dir`` (the recipe's folder). ``DataBundle.splits`` says which data each
    split is, in words."""
    base_dir = Path(base_dir)
    train, test, names, what, loading = _read(spec.source_spec, base_dir, spec)
    if test is not None and len(test) == 0:
        test = None
    num_classes = _check_labels(train, test, names, what)
    if not names:
        names = [str(i) for i in range(num_classes)]
    if spec.augment.active and len(train.sample_shape) != 3:
        raise DataError(f"data.augment: needs image data [N, C, H, W], but {what} has shape "
                        f"{[len(train), *train.sample_shape]}")
    notes: list[str] = []
    val_spec = resolve_val(spec, held_out, has_test=test is not None)
    if resolve_val(spec, held_out) != val_spec:  # a held-out split was wanted, and there is none
        notes.append(f"data.val: {what} has no held-out split, so validation is {val_spec.fraction:g} of the training "
                     "split, which a teacher trained elsewhere may have memorised; name other data in data.val")
    g = torch.Generator().manual_seed(seed)
    n_test = len(test) if test is not None else 0
    splits = {"train": f"the training split of {what}"}
    held = test  # the held-out split, before validation takes its part
    if val_spec == "test" and test is None and spec.val == "auto":
        val = train.subset(torch.arange(0))  # val_fraction 0 and no test split: no validation data
        splits["val"] = "none (data.val_fraction is 0 and the source has no test split)"
    elif val_spec == "test":
        val = _need(test, "data.val", what)
        splits["val"] = f"the test split of {what} (the same data as the test part)"
    elif isinstance(val_spec, SplitFraction):
        part = train if val_spec.split == "train" else _need(test, "data.val", what)
        n = len(part)
        n_val = max(1, round(n * val_spec.fraction))
        if n - n_val < 1:
            key = "data.val_fraction" if spec.val == "auto" else "data.val.fraction"
            raise DataError(f"{key}: {what} has {n} {val_spec.split} samples; fraction {val_spec.fraction:g} "
                            f"leaves none for {'training' if val_spec.split == 'train' else 'the test part'}")
        perm = torch.randperm(n, generator=g)
        val_idx, rest_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
        val = part.subset(val_idx)
        splits["val"] = f"{n_val:,} of the {n:,} {val_spec.split} samples of {what} (seed {seed})"
        if val_spec.split == "train":
            train = part.subset(rest_idx)
            splits["train"] = f"the other {len(rest_idx):,} training samples of {what}"
        else:
            held = part.subset(rest_idx)
    else:
        val, vwhat = _other(val_spec, base_dir, spec, "data.val", num_classes)
        splits["val"] = vwhat
    if spec.test == "none":
        test = None
    elif spec.test == "test":
        test = held
        if test is not None:
            splits["test"] = (f"the other {len(test):,} test samples of {what} (disjoint from validation)"
                              if held is not None and len(held) < n_test else f"the test split of {what}")
    else:
        test, splits["test"] = _other(spec.test, base_dir, spec, "data.test", num_classes)
    if test is not None and len(test) == 0:
        test = None
    if spec.limit_train is not None:
        train = train.subset(torch.arange(min(spec.limit_train, len(train))))
    if spec.limit_eval is not None:
        val = val.subset(torch.arange(min(spec.limit_eval, len(val))))
        if test is not None:
            test = test.subset(torch.arange(min(spec.limit_eval, len(test))))
    scale = 1 / 255 if train.dtype == torch.uint8 else 1.0
    workers = resolve_workers(spec.workers)
    mean, std, counted = _normalization(spec.normalize, train, scale, what, workers=workers, seed=seed)
    input_shape = train.sample_shape
    for split, part in (("val", val), ("test", test)):
        if part is not None and part.sample_shape != input_shape:
            raise DataError(f"data.{split}: its inputs are {list(part.sample_shape)} but the training inputs are "
                            f"{list(input_shape)}; give data.input (size, channels) to make them match")
    desc = (f"{what}: {len(train)} train, {len(val)} val, "
            f"{'no' if test is None else len(test)} test, {'x'.join(map(str, input_shape))}, {num_classes} classes")
    splits = {k: v for k, v in splits.items() if k != "test" or test is not None}
    return DataBundle(train, val, test, num_classes, input_shape, mean, std, list(names), desc,
                      spec.augment, scale, spec.batch_size, spec.eval_batch_size, splits=splits, notes=notes,
                      normalize_auto=spec.normalize == "auto", loading=loading, workers=workers,
                      normalize_samples=counted if counted is not None and counted < len(train) else None)


def _read(source, base_dir: Path, spec: DataSpec):
    """A source read (:func:`read_source`), checked for finite inputs and adapted (``data.input``),
    or opened for streaming (``data.loading``, see :func:`kdcli.data.stream.choose_loading`); and
    the choice in words."""
    if source.kind in STREAMING_KINDS and spec.loading != "memory":
        opened = open_stream(source, base_dir)
        if opened is None:  # .npz shards: no random access without reading them whole
            if spec.loading == "stream":
                raise DataError(f"data.loading: stream memory-maps x_*.npy/y_*.npy shards, and {source.path} holds "
                                ".npz shards; convert them (np.save each array) or set data.loading: memory")
            loading = "in memory (data.loading: auto; .npz shards cannot stream)"
        else:
            train, test, names, what = opened
            train = train.adapted(spec.input)
            test = test.adapted(spec.input) if test is not None else None
            decoded = train.decoded_bytes + (test.decoded_bytes if test is not None else 0)
            stream, loading = choose_loading(spec.loading, decoded, resolve_workers(spec.workers))
            if stream:
                return train, test, names, what, loading
    else:
        loading = "in memory" if spec.loading != "memory" else "in memory (data.loading: memory)"
    train, test, names, what = read_source(source, base_dir)
    for split, part in (("training", train), ("test", test)):
        _check_finite_inputs(part, split, what)
    train = adapt_inputs(train, spec.input, what)
    test = adapt_inputs(test, spec.input, what)
    return train, test, names, what, loading


def _need(test: TensorData | None, key: str, what: str) -> TensorData:
    if test is None:
        raise DataError(f"{key}: {what} has no test split to validate on; give a fraction of the training split "
                        "({split: train, fraction: 0.1}) or another source ({source: ...})")
    return test


def _other(other: OtherData, base_dir: Path, spec: DataSpec, key: str, num_classes: int) -> tuple[TensorData | StreamData, str]:
    """The split of another source that ``data.val``/``data.test`` names, with its description."""
    train, test, _, what, _ = _read(other.source, base_dir, spec)
    split = other.split if other.split != "auto" else ("test" if test is not None and len(test) else "train")
    part = train if split == "train" else test
    if part is None or len(part) == 0:
        raise DataError(f"{key}.split: {what} has no {split} split")
    lo, hi = int(part.y.min()), int(part.y.max())
    if lo < 0 or hi >= num_classes:
        raise DataError(f"{key}: {what} has label {lo if lo < 0 else hi}, but the training data has "
                        f"{num_classes} classes [0, {num_classes - 1}]")
    return part, f"the {split} split of {what} ({len(part):,} samples)"


def _check_finite_inputs(data: TensorData | None, split: str, what: str) -> None:
    """DataError naming the first sample whose inputs hold NaN or infinity (chunked: no whole-set
    copy). Integer inputs (uint8 images) are finite by construction."""
    if data is None or data.streamed or not data.x.is_floating_point():
        return  # a streamed split is checked sample by sample as it is read
    for i in range(0, len(data), 4096):
        bad = ~torch.isfinite(data.x[i:i + 4096].reshape(min(4096, len(data) - i), -1)).all(dim=1)
        if bool(bad.any()):
            raise DataError(f"{what}: {split} sample {i + int(bad.nonzero()[0])} has NaN or infinite inputs; "
                            "clean the data (this is not a training problem)")


def _check_labels(train: TensorData, test: TensorData | None, names, what: str) -> int:
    top = -1
    for split, data in (("train", train), ("test", test)):
        if data is None or len(data) == 0:
            continue
        lo, hi = int(data.y.min()), int(data.y.max())
        if lo < 0 or (names and hi >= len(names)):
            bound = f"[0, {len(names) - 1}]" if names else ">= 0"
            raise DataError(f"{what}: {split} label {lo if lo < 0 else hi} out of range, expected {bound}")
        top = max(top, hi)
    if top < 0:
        raise DataError(f"{what}: no training samples")
    return len(names) if names else top + 1


def _normalization(norm, train: TensorData | StreamData, scale: float, what: str, *, workers: int = 0,
                   seed: int = 0) -> tuple[list[float], list[float], int | None]:
    """``(mean, std, samples measured)``; the last is None unless measured (``auto``). A streamed
    split is measured on :data:`kdcli.data.stream.NORM_SAMPLES` seeded samples at most."""
    channels = train.sample_shape[0]
    if norm == "none":
        return [0.0] * channels, [1.0] * channels, None
    if isinstance(norm, NormalizeStats):
        if len(norm.mean) not in (1, channels):
            raise DataError(f"data.normalize: {len(norm.mean)} mean/std values, but {what} has {channels} channels")
        k = channels // len(norm.mean)
        return list(norm.mean) * k, list(norm.std) * k, None
    # auto: per-channel statistics of the training split, accumulated in float64 chunks
    dims = [0] + list(range(2, len(train.sample_shape) + 1))
    s = torch.zeros(channels, dtype=torch.float64)
    s2 = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for chunk in _raw_chunks(train, workers, seed):
        chunk = chunk.to(torch.float64) * scale
        s += chunk.sum(dims)
        s2 += (chunk * chunk).sum(dims)
        count += chunk.numel() // channels
    mean = s / max(count, 1)
    std = (s2 / max(count, 1) - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std < 1e-6, torch.ones_like(std), std)  # constant channels: leave unscaled
    measured = min(len(train), NORM_SAMPLES) if train.streamed else len(train)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std], measured


def _raw_chunks(train: TensorData | StreamData, workers: int, seed: int):
    """The training inputs as stored (uint8 or float32), in chunks: slices of a split in memory;
    for a streamed split, batches of up to ``NORM_SAMPLES`` seeded samples read by the workers."""
    if not train.streamed:
        for i in range(0, len(train), 4096):
            yield train.x[i:i + 4096]
        return
    part = train
    if len(train) > NORM_SAMPLES:
        g = torch.Generator().manual_seed(seed)
        part = train.subset(torch.randperm(len(train), generator=g)[:NORM_SAMPLES].sort().values)
    ones = [1.0] * train.sample_shape[0]
    raw = StreamLoader(part, batch_size=256, train=False, mean=[0.0] * len(ones), std=ones, scale=1.0,
                       workers=workers)
    for x, _, _ in raw:
        yield x


MEMORISED_GAP = 0.03  # validation more than 3 points above the held-out test part looks memorised


def memorised_warning(val_accuracy: float, test_accuracy: float | None, data: DataBundle, who: str = "the teacher") -> str | None:
    """A one-line warning when ``who`` scores more than :data:`MEMORISED_GAP` higher on the
    validation data than on the held-out test part: the validation split is probably data it
    trained on, so steps judged on it (and the accuracy budget) would be judged too kindly."""
    if test_accuracy is None or not (val_accuracy - test_accuracy > MEMORISED_GAP):
        return None
    return (f"data.val: {who} scores {100 * val_accuracy:.1f}% on validation ({data.splits.get('val', 'val')}) but "
            f"{100 * test_accuracy:.1f}% on the test part: the validation data looks memorised; validate on "
            "held-out data with data.val: {split: test, fraction: 0.5}")
