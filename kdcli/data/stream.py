"""Streaming: splits read sample by sample from disk by ``torch.utils.data.DataLoader`` worker
processes, for data sets larger than memory (the recipe's ``data.loading`` and ``data.workers``).

A streamed split (:class:`StreamData`) keeps only what names its samples (the image files, or the
offsets of memory-mapped ``.npy`` shards) and the labels. :class:`StreamLoader` serves it with the
interface of :class:`kdcli.data.loader.BatchLoader`: ``(x, y, idx)`` batches on the device,
``__len__``, ``set_epoch`` and ``augmented``, so the training loop does not know which it has.
Its workers decode (Pillow), resize or pad (``data.source.size``, ``data.input``: the functions the
in-memory readers use, so both paths see the same pixels), augment, convert to float and
normalise each sample; the main process pins the batch (CUDA) and moves it to the device.

Order: the seeded permutation of the in-memory loader (:func:`epoch_order`: ``seed + epoch``),
sharded by rank like ``DistributedSampler``, so without augmentation both paths give the same
batches. Augmentation is per sample, drawn from a generator seeded by (seed, epoch, sample index):
reproducible for a seed and independent of the number of workers (the draws are not those of the
in-memory loader, which augments whole batches).

``data.loading: auto`` (:func:`choose_loading`) streams when the decoded set (N x C x H x W bytes
for uint8 images, 4 bytes a value for float shards) is more than :data:`RAM_SHARE` of the memory
available when the data is opened (``MemAvailable`` in /proc/meminfo, else
``sysconf(SC_AVPHYS_PAGES)``); else it reads the set into memory, which is faster for small sets.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from kdcli.config.data import AugmentSpec, ImageFolderSource, InputAdapt, TensorShardsSource
from kdcli.data.adapt import adapt_sample, adapted_shape
from kdcli.data.sources import (check_image_shape, decode_image, image_files, image_folder_layout, shard_labels,
                                shard_layout)
from kdcli.errors import DataError
from kdcli.export.latency import default_threads

RAM_SHARE = 0.25      # auto streams a set whose decoded size is over this share of the available memory
PREFETCH = 2          # batches each worker prepares ahead (DataLoader's prefetch_factor)
NORM_SAMPLES = 10_000  # normalize: auto on a streamed split measures this many seeded samples at most


# ----------------------------------------------------------------------------- choosing


def available_memory() -> int | None:
    """Bytes of memory available now (MemAvailable: free plus reclaimable cache), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def default_workers() -> int:
    """``data.workers: auto``: min(4, the CPU cores this process may run on)."""
    return max(1, min(4, default_threads()))


def resolve_workers(workers) -> int:
    """``data.workers`` as a number."""
    return default_workers() if workers == "auto" else int(workers)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def choose_loading(mode: str, decoded: int, workers: int) -> tuple[bool, str]:
    """``(stream?, the choice in words)`` for ``data.loading`` ``mode`` and a set of ``decoded`` bytes."""
    streamed = (f"streamed from disk by {workers} worker process{'es' if workers != 1 else ''}" if workers
                else "streamed from disk in the training process")
    why = [f"data.loading: {mode}"]
    stream = mode == "stream"
    if mode == "auto":
        avail = available_memory()
        if avail is None:
            why.append(f"{human_bytes(decoded)} decoded, available memory unknown")
        else:
            stream = decoded > RAM_SHARE * avail
            why.append(f"{human_bytes(decoded)} decoded is {'over' if stream else 'within'} {RAM_SHARE:.0%} "
                       f"of the {human_bytes(avail)} available")
    if stream and not workers:
        why.insert(1, "data.workers: 0")
    return stream, f"{streamed if stream else 'in memory'} ({', '.join(why)})"


# ----------------------------------------------------------------------------- order, shared with BatchLoader


def epoch_order(n: int, *, train: bool, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """The positions one rank visits in one epoch. ``train``: a permutation drawn from
    ``seed + epoch``, padded by wrapping around to a multiple of ``world_size`` and dealt every
    ``world_size``-th to each rank (like ``DistributedSampler``); else the split's order, dealt the
    same way but unpadded (sums over ranks count each sample once)."""
    if not train:
        return torch.arange(n)[rank::world_size]
    g = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g)
    per_rank = math.ceil(n / world_size) if n else 0
    if per_rank * world_size > n:
        perm = torch.cat([perm, perm.repeat(math.ceil(per_rank * world_size / n))])[: per_rank * world_size]
    return perm[rank::world_size]


def batch_count(n: int, batch_size: int, *, train: bool, rank: int = 0, world_size: int = 1,
                drop_last: bool = False) -> int:
    """Batches per epoch on one rank (see :func:`epoch_order`)."""
    n = math.ceil(n / world_size) if train else max(0, math.ceil((n - rank) / world_size))
    return n // batch_size if drop_last else math.ceil(n / batch_size)


# ----------------------------------------------------------------------------- sample readers


class ImageFiles:
    """The image files of one split, decoded one at a time (``read``): ``[C, H, W]`` uint8.

    Paths are kept as one numpy bytes array (not a list of Python strings, whose reference
    counts would make every forked worker copy the pages it reads)."""

    dtype = torch.uint8

    def __init__(self, root: Path, files: list[str], spec: ImageFolderSource, first=None):

        self.root = str(root)
        self.rel = np.array([os.fsencode(f) for f in files])
        self.grayscale, self.size = spec.grayscale, spec.size
        if first is None:  # the first image's shape: every image must match it, as in memory
            f0 = root / files[0]
            first = (decode_image(f0, self.grayscale, self.size).shape, f0)
        self.first = first
        shape = first[0]
        self.sample_shape = (1, *shape) if len(shape) == 2 else (shape[2], shape[0], shape[1])

    def __len__(self) -> int:
        return len(self.rel)

    def path(self, j: int) -> Path:
        return Path(self.root) / os.fsdecode(self.rel[j])

    def read(self, j: int) -> torch.Tensor:
        f = self.path(j)
        a = decode_image(f, self.grayscale, self.size)
        check_image_shape(a, f, *self.first)
        # [H, W(, C)] -> [C, H, W], a C-ordered writable copy (PIL's buffer is read-only)
        return torch.from_numpy(np.array(a[None] if a.ndim == 2 else a.transpose(2, 0, 1), order="C"))


class NpyShards:
    """Rows of ``x_<name>.npy`` shards, memory-mapped (``mmap_mode='r'``) on first use in each
    process: ``[C, H, W]`` (a channel axis added to ``[H, W]`` rows) or ``[D]``, uint8 kept, any
    other dtype as float32, as the in-memory tensor readers convert."""

    def __init__(self, paths: list[Path], lengths: list[int], row_shape: tuple[int, ...], dtype: np.dtype):
        self.paths = [str(p) for p in paths]
        self.offsets = np.cumsum([0, *lengths]).astype(np.int64)
        self.row_shape = tuple(int(s) for s in row_shape)
        self.dtype = torch.uint8 if dtype == np.uint8 else torch.float32
        self.sample_shape = (1, *self.row_shape) if len(self.row_shape) == 2 else self.row_shape
        self._maps: dict[int, np.ndarray] = {}

    def __getstate__(self):  # a spawned worker opens its own maps
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, j: int) -> torch.Tensor:
        k = int(np.searchsorted(self.offsets, j, side="right")) - 1
        m = self._maps.get(k)
        if m is None:
            m = self._maps[k] = np.load(self.paths[k], mmap_mode="r", allow_pickle=False)
        t = torch.from_numpy(np.array(m[j - int(self.offsets[k])]))  # a copy out of the map
        t = t if t.dtype == torch.uint8 else t.to(torch.float32)
        return t[None] if len(self.row_shape) == 2 else t


# ----------------------------------------------------------------------------- a streamed split


class StreamData:
    """One split read sample by sample: a reader (:class:`ImageFiles`, :class:`NpyShards`), the
    reader's indices of this split's samples (``index``; a validation part or a limit is a subset)
    and their labels ``y`` (int64, in memory). ``sample(pos)`` is the input at position ``pos``,
    adapted by ``data.input``. Quacks like :class:`kdcli.data.tensors.TensorData` for what the
    splitting code needs (``len``, ``y``, ``subset``, ``sample_shape``, ``dtype``); ``x`` does not
    exist: the split is not in memory."""

    streamed = True

    def __init__(self, reader, y: torch.Tensor, *, index: np.ndarray | None = None, adapt: InputAdapt | None = None,
                 split: str = "training", what: str = ""):
        self.reader, self.y = reader, y
        self.index = np.arange(len(y), dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)
        self.adapt = adapt if adapt is not None and adapt.active else InputAdapt()
        self.split, self.what = split, what
        shape = adapted_shape((len(y), *reader.sample_shape), self.adapt, what)
        self.sample_shape: tuple[int, ...] = tuple(int(s) for s in shape[1:])

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.reader.dtype

    @property
    def decoded_bytes(self) -> int:
        """What the split would take in memory: N x C x H x W x the bytes of its dtype."""
        return len(self) * math.prod(self.sample_shape) * (1 if self.dtype == torch.uint8 else 4)

    def subset(self, idx: torch.Tensor) -> "StreamData":
        """The samples at positions ``idx`` (int64) as a new split."""
        return StreamData(self.reader, self.y[idx], index=self.index[np.asarray(idx, dtype=np.int64)],
                          adapt=self.adapt, split=self.split, what=self.what)

    def adapted(self, spec: InputAdapt) -> "StreamData":
        """This split with ``data.input`` applied to each sample (DataError when it cannot apply)."""
        return StreamData(self.reader, self.y, index=self.index, adapt=spec, split=self.split, what=self.what)

    def sample(self, pos: int) -> torch.Tensor:
        """The input at position ``pos``: uint8 or float32 ``[C, H, W]`` (``[D]``), adapted."""
        j = int(self.index[pos])
        x = self.reader.read(j)
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise DataError(f"{self.what}: {self.split} sample {j} has NaN or infinite inputs; clean the data "
                            "(this is not a training problem)")
        return adapt_sample(x, self.adapt)

    @property
    def x(self):
        raise DataError(f"data.loading: {self.what} is streamed from disk, and this step needs its {self.split} split "
                        "in memory; set data.loading: memory (with data.limit_train for a large set)")


def open_stream(spec, base_dir: Path):
    """``(train, test, class_names, what)`` of a streamable source as :class:`StreamData` (nothing
    decoded but the first image), or None when the source cannot stream (``.npz`` shards)."""
    if isinstance(spec, ImageFolderSource):
        train_dir, test_dir, classes, what = image_folder_layout(spec, base_dir)
        files, labels = image_files(train_dir, classes)
        reader = ImageFiles(train_dir, files, spec)
        train = StreamData(reader, torch.tensor(labels, dtype=torch.int64), what=what)
        test = None
        if test_dir is not None:
            tfiles, tlabels = image_files(test_dir, classes)
            test = StreamData(ImageFiles(test_dir, tfiles, spec, first=reader.first),
                              torch.tensor(tlabels, dtype=torch.int64), split="test", what=what)
        return train, test, classes, what
    if isinstance(spec, TensorShardsSource):
        train_shards, test_shards, what = shard_layout(spec, base_dir)
        if any(y is None for _, y in train_shards + (test_shards or [])):
            return None
        train = _shard_split(train_shards, "training", what)
        test = _shard_split(test_shards, "test", what) if test_shards else None
        if test is not None and test.sample_shape != train.sample_shape:
            raise DataError(f"{what}: test inputs of shape {list(test.sample_shape)}, expected "
                            f"{list(train.sample_shape)} like the training inputs")
        return train, test, list(spec.classes or []), what
    return None


def _shard_split(shards: list, split: str, what: str) -> StreamData:
    lengths, labels, row, dtype = [], [], None, None
    for x_path, y_path in shards:
        x, y = shard_labels((x_path, y_path), mmap=True)
        if x.dtype.kind not in "iuf":
            raise DataError(f"{x_path}: inputs of type {x.dtype}, expected real numbers")
        kind = np.uint8 if x.dtype == np.uint8 else np.float32
        if row is None:
            row, dtype = x.shape[1:], kind
        elif x.shape[1:] != row or kind != dtype:
            raise DataError(f"{x_path}: inputs {list(x.shape[1:])} {x.dtype}, but {shards[0][0].name} has "
                            f"{list(row)} {np.dtype(dtype)}; every shard must match")
        lengths.append(len(x))
        labels.append(y)
    reader = NpyShards([p for p, _ in shards], lengths, row, np.dtype(dtype))
    return StreamData(reader, torch.cat(labels), split=split, what=what)


# ----------------------------------------------------------------------------- per-sample work (on the workers)


def sample_rng(seed: int, epoch: int, pos: int) -> np.random.Generator:
    """The augmentation generator of sample ``pos`` in ``epoch``: the same on any worker."""
    return np.random.default_rng([int(seed) % (1 << 64), int(epoch), int(pos), 0x6B6463])


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``x`` [..., H, W] moved by (dy, dx) pixels, zeros filling in: out[r, c] = x[r - dy, c - dx]
    (what :func:`kdcli.data.loader.translate` does to a batch)."""
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    if abs(dy) >= h or abs(dx) >= w:
        return out
    out[..., max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)] = \
        x[..., max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    return out


def augment_sample(x: torch.Tensor, spec: AugmentSpec, rng: np.random.Generator) -> torch.Tensor:
    """Random crop with zero padding (a shift by up to ±``crop_padding``), jitter (±``jitter``)
    and horizontal flip of one image ``[C, H, W]``, the in-memory loader's augmentations per sample."""
    for p in (spec.crop_padding, spec.jitter):
        if p:
            dy, dx = rng.integers(-p, p + 1, size=2)
            x = shift(x, int(dy), int(dx))
    if spec.hflip and rng.random() < 0.5:
        x = x.flip(-1)
    return x


class _Samples(torch.utils.data.Dataset):
    """Item ``(pos, epoch)`` -> ``(normalised float input, label, pos)``: everything a worker does.
    The epoch comes with the key, so persistent workers need no message when it changes."""

    def __init__(self, data: StreamData, *, mean, std, scale: float, augment: AugmentSpec | None, seed: int):
        self.data, self.scale, self.seed = data, float(scale), int(seed)
        self.augment = augment if augment is not None and augment.active else None
        shape = (-1,) + (1,) * (len(data.sample_shape) - 1)
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(shape)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(shape)
        self.labels = data.y.numpy()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key):
        pos, epoch = key
        x = self.data.sample(pos)
        if self.augment is not None:  # on the stored values: zero fill and flips commute with the scaling
            x = augment_sample(x, self.augment, sample_rng(self.seed, epoch, pos))
        x = x.float()
        if self.scale != 1.0:
            x = x * self.scale
        return (x - self.mean) / self.std, int(self.labels[pos]), pos


class _EpochBatches:
    """The DataLoader's batch sampler: lists of ``(pos, epoch)`` in :func:`epoch_order`."""

    def __init__(self, n: int, batch_size: int, *, train: bool, seed: int, rank: int, world_size: int,
                 drop_last: bool):
        self.n, self.batch_size, self.train, self.seed = n, batch_size, train, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0

    def __len__(self) -> int:
        return batch_count(self.n, self.batch_size, train=self.train, rank=self.rank, world_size=self.world_size,
                           drop_last=self.drop_last)

    def __iter__(self):
        order = epoch_order(self.n, train=self.train, seed=self.seed, epoch=self.epoch, rank=self.rank,
                            world_size=self.world_size).tolist()
        bs = self.batch_size
        for s in range(len(self)):
            yield [(p, self.epoch) for p in order[s * bs:(s + 1) * bs]]


def _worker_message(exc: Exception) -> str:
    """The one line of a DataError raised on a worker (DataLoader re-raises it with the worker's
    traceback in the message)."""
    text = str(exc).strip()
    if "Original Traceback" not in text:
        return text
    return text.splitlines()[-1].split("DataError: ", 1)[-1]


class StreamLoader:
    """Batches ``(x, y, idx)`` of a :class:`StreamData` split, as :class:`kdcli.data.loader.BatchLoader`
    gives them (same order, same normalisation; ``idx`` int64 positions in the split, on the CPU),
    prepared by ``workers`` DataLoader processes (persistent across epochs; 0: in this process)
    with ``PREFETCH`` batches each in flight, pinned when ``device`` is CUDA."""

    def __init__(self, data: StreamData, *, batch_size: int, train: bool, mean, std, scale: float,
                 augment: AugmentSpec | None = None, device="cpu", seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False, workers: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.data, self.batch_size, self.train = data, int(batch_size), train
        self.device = torch.device(device)
        self.seed, self.rank, self.world_size, self.drop_last = seed, rank, world_size, drop_last
        self.scale, self.workers = scale, int(workers)
        self.augment = augment if (train and augment is not None) else AugmentSpec()
        self.epoch = 0
        self._batches = _EpochBatches(len(data), self.batch_size, train=train, seed=seed, rank=rank,
                                      world_size=world_size, drop_last=drop_last)
        self._dataset = _Samples(data, mean=mean, std=std, scale=scale, augment=self.augment, seed=seed)
        self._dl = None

    @property
    def augmented(self) -> bool:
        """True when batches are augmented (train=True and any augmentation switched on)."""
        return self.train and self.augment.active

    def set_epoch(self, epoch: int) -> None:
        """Choose the permutation (and augmentation draws) of this epoch."""
        self.epoch = int(epoch)
        self._batches.epoch = self.epoch

    def __len__(self) -> int:
        return len(self._batches)

    def _loader(self) -> torch.utils.data.DataLoader:
        if self._dl is None:
            w = self.workers
            # generator: the DataLoader draws its workers' base seed from it, not from torch's global RNG
            self._dl = torch.utils.data.DataLoader(
                self._dataset, batch_sampler=self._batches, num_workers=w, pin_memory=self.device.type == "cuda",
                persistent_workers=w > 0, prefetch_factor=PREFETCH if w > 0 else None,
                generator=torch.Generator().manual_seed(self.seed))
        return self._dl

    def __iter__(self):
        if len(self) == 0:
            return
        it = iter(self._loader())
        while True:
            try:
                x, y, idx = next(it)
            except StopIteration:
                return
            except DataError as exc:
                raise DataError(_worker_message(exc)) from None
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), idx

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the loader is garbage-collected)."""
        dl, self._dl = self._dl, None
        it = getattr(dl, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
